"""The diffusion behaviour model (eq. 3-10), in each of the three scripts that carry a copy of it: the noise
schedule, the weighted denoising loss, and the sampler's stochastic part (which noise each step adds, where
a0_hat is clipped), with a statistical test on a case whose answer is known in closed form."""

import numpy as np
import pytest
import torch
import torch.nn as nn

import divo_antmaze as da
import divo_continuous as dc
import pad_pretrain as pp

SCRIPTS = pytest.mark.parametrize("module", [dc, da, pp], ids=["continuous", "antmaze", "pad_pretrain"])


def spec_schedule(K=5, b_min=0.1, b_max=10.0):
    """beta_k, alpha_k, alpha_bar_k for k = 0..K from DIVO_SPEC.md's formulas, in float64 (k = 0: no noise)."""
    k = np.arange(1, K + 1)
    beta = 1 - np.exp(-b_min / K - (b_max - b_min) * (2 * k - 1) / (2 * K**2))
    beta = np.concatenate([[0.0], beta])
    return beta, 1 - beta, np.cumprod(1 - beta)


def diffusion_of(module, obs_dim=4, act_dim=2, K=5):
    return module.Diffusion(obs_dim, act_dim, num_steps=K, beta_min=0.1, beta_max=10.0, hidden_dim=8, num_layers=1)


class StepIndex(nn.Module):
    """A stand-in for time_mlp: the "embedding" of step k is k itself, so a stand-in noise model knows its step."""

    def forward(self, k):
        return k.double()[:, None]


class StandInNoise(nn.Module):
    """eps(a_k, k) = fn(a_k, k), recording the step and the input of every call."""

    def __init__(self, fn):
        super().__init__()
        self.time_mlp, self.fn, self.calls = StepIndex(), fn, []

    def forward(self, a_k, k_emb, s):
        k = int(k_emb[0, 0])
        assert (k_emb == k).all()  # one step for the whole batch
        self.calls.append((k, a_k.clone()))
        return self.fn(a_k, k)


@SCRIPTS
def test_noise_schedule_constants(module):
    diffusion = diffusion_of(module)
    beta, alpha, alpha_bar = spec_schedule()
    np.testing.assert_allclose(alpha_bar[1:], [0.804125, 0.435178, 0.158500, 0.038852, 0.006409], atol=5e-7)
    np.testing.assert_allclose(module.vp_beta_schedule(5, 0.1, 10.0).numpy(), beta[1:], rtol=1e-12)
    np.testing.assert_allclose(diffusion.sqrt_alpha_bar.numpy() ** 2, alpha_bar, rtol=1e-6)
    np.testing.assert_allclose(diffusion.sqrt_one_minus_alpha_bar.numpy() ** 2, 1 - alpha_bar, rtol=1e-5, atol=1e-7)
    k = np.arange(1, 6)  # eq. (7) and (8), step by step
    expected = {
        "sqrt_recip_alpha_bar": 1 / np.sqrt(alpha_bar[k]),
        "sqrt_recipm1_alpha_bar": np.sqrt(1 / alpha_bar[k] - 1),
        "posterior_coef_a0": beta[k] * np.sqrt(alpha_bar[k - 1]) / (1 - alpha_bar[k]),
        "posterior_coef_ak": (1 - alpha_bar[k - 1]) * np.sqrt(alpha[k]) / (1 - alpha_bar[k]),
        "posterior_std": np.sqrt(beta[k] * (1 - alpha_bar[k - 1]) / (1 - alpha_bar[k])),
    }
    for name, values in expected.items():
        np.testing.assert_allclose(getattr(diffusion, name)[1:], values, rtol=1e-6, err_msg=name)
    # the last step (k = 1) returns a0_hat itself: no noise, coefficients exactly 1 and 0 (so a0_hat's clip
    # already keeps the result in [-1, 1]); every earlier step adds noise
    assert diffusion.posterior_std[1] == 0.0 and diffusion.posterior_coef_a0[1] == 1.0
    assert diffusion.posterior_coef_ak[1] == 0.0
    assert all(std > 0 for std in diffusion.posterior_std[2:])


@SCRIPTS
def test_each_reverse_step_adds_its_own_noise_and_clips_a0_hat(module, monkeypatch):
    """The noise is drawn up front as randn(K + 1, n, A): noise[K] is a_K, step k adds posterior_std[k] noise[k - 1],
    step 1 adds none; a0_hat is clipped to [-1, 1]. Traced with a stand-in noise model and known noise, against
    the chain by hand in float64 from the spec's formulas."""
    K, n, A = 5, 64, 2
    diffusion = diffusion_of(module, act_dim=A)
    fn = lambda a_k, k: 0.5 * a_k - 0.3  # noqa: E731  pushes a0_hat out of [-1, 1] at the noisy steps, not at the last
    diffusion.eps_model = StandInNoise(fn)
    noise = torch.randn(K + 1, n, A, generator=torch.Generator().manual_seed(0))
    real_randn = torch.randn

    def fake_randn(*size, **kwargs):
        if size == (K + 1, n, A):
            return noise.clone()
        return real_randn(*size, **kwargs)

    monkeypatch.setattr(torch, "randn", fake_randn)
    out = diffusion.sample(torch.zeros(n, 4))
    monkeypatch.undo()

    beta, alpha, alpha_bar = spec_schedule()
    a, clipped, kept = noise[K].double(), 0, 0
    for (k, a_k), expected_k in zip(diffusion.eps_model.calls, range(K, 0, -1)):
        assert k == expected_k
        torch.testing.assert_close(a_k.double(), a, atol=1e-5, rtol=1e-5)
        a0_hat = a / np.sqrt(alpha_bar[k]) - np.sqrt(1 / alpha_bar[k] - 1) * fn(a, k)
        clipped, kept = clipped + int((a0_hat.abs() > 1).sum()), kept + int((a0_hat.abs() < 1).sum())
        a0_hat = a0_hat.clamp(-1, 1)
        mean = beta[k] * np.sqrt(alpha_bar[k - 1]) / (1 - alpha_bar[k]) * a0_hat \
            + (1 - alpha_bar[k - 1]) * np.sqrt(alpha[k]) / (1 - alpha_bar[k]) * a
        std = np.sqrt(beta[k] * (1 - alpha_bar[k - 1]) / (1 - alpha_bar[k]))
        a = mean + std * noise[k - 1].double() if k > 1 else mean
    assert len(diffusion.eps_model.calls) == K
    assert clipped > 50 and kept > 50  # both sides of the clip were exercised
    torch.testing.assert_close(out.double(), a.clamp(-1, 1), atol=1e-5, rtol=1e-5)


@SCRIPTS
def test_sampler_shapes_clipping_and_no_grad(module):
    diffusion = diffusion_of(module, act_dim=3)
    with torch.no_grad():
        diffusion.eps_model.net[-1].bias.fill_(50.0)  # a wild noise prediction must still give actions in [-1, 1]
    s = torch.randn(64, 4, requires_grad=True)
    a = diffusion.sample(s)
    assert a.shape == (64, 3)
    assert a.abs().max() <= 1.0 and a.abs().max() == 1.0
    assert not a.requires_grad


@SCRIPTS
def test_sampler_recovers_a_point_mass_with_the_exact_noise_model(module):
    """With eps(a_k) = (a_k - sqrt(abar_k) c) / sqrt(1 - abar_k), eq. (7)-(8) must return exactly c."""
    diffusion = diffusion_of(module)
    c = torch.tensor([0.3, -0.6], dtype=torch.float64)
    _, _, alpha_bar = spec_schedule()
    diffusion.eps_model = StandInNoise(lambda a_k, k: (a_k - np.sqrt(alpha_bar[k]) * c) / np.sqrt(1 - alpha_bar[k]))
    a = diffusion.sample(torch.zeros(100, 4))
    torch.testing.assert_close(a.double(), c.expand(100, 2), atol=1e-5, rtol=0)


def gaussian_sampler_moments(mu, sigma, K=5):
    """Mean and variance of what eq. (4), (7), (8) return for data N(mu, sigma^2) with the exact noise model
    eps(a_k) = E[eps | a_k] = sqrt(1 - abar) (a_k - sqrt(abar) mu) / (abar sigma^2 + 1 - abar): every step is then
    linear in a_k plus independent Gaussian noise, so the moments follow exactly, step by step (no clip is met)."""
    beta, alpha, alpha_bar = spec_schedule(K)
    m, v = 0.0, 1.0  # a_K ~ N(0, 1)
    for k in range(K, 0, -1):
        ab = alpha_bar[k]
        g = np.sqrt(1 - ab) / (ab * sigma**2 + 1 - ab)  # eps = g (a_k - sqrt(ab) mu)
        slope = 1 / np.sqrt(ab) - np.sqrt(1 / ab - 1) * g  # a0_hat = slope a_k + shift
        shift = np.sqrt(1 / ab - 1) * g * np.sqrt(ab) * mu
        c0 = beta[k] * np.sqrt(alpha_bar[k - 1]) / (1 - ab)
        ck = (1 - alpha_bar[k - 1]) * np.sqrt(alpha[k]) / (1 - ab)
        var_noise = beta[k] * (1 - alpha_bar[k - 1]) / (1 - ab)
        m, v = (c0 * slope + ck) * m + c0 * shift, (c0 * slope + ck) ** 2 * v + var_noise
    return m, v


@SCRIPTS
def test_sampler_statistics_for_gaussian_data(module):
    """Data N(mu, sigma^2) per action dimension and its exact noise model: 20,000 samples have the mean and the
    variance that the moments of the chain give in closed form, within 5 standard errors. Without the noise, with
    another step's noise, or with the posterior coefficients swapped, the variance (or the mean) is far off."""
    mu, sigma, n = torch.tensor([0.2, -0.3], dtype=torch.float64), 0.1, 20_000
    diffusion = diffusion_of(module)
    _, _, alpha_bar = spec_schedule()

    def exact(a_k, k):
        ab = alpha_bar[k]
        return np.sqrt(1 - ab) * (a_k - np.sqrt(ab) * mu) / (ab * sigma**2 + 1 - ab)

    diffusion.eps_model = StandInNoise(exact)
    torch.manual_seed(0)
    samples = diffusion.sample(torch.zeros(n, 4)).double()
    for dim in range(2):
        m, v = gaussian_sampler_moments(mu[dim].item(), sigma)
        assert abs(samples[:, dim].mean().item() - m) < 5 * np.sqrt(v / n), dim
        assert abs(samples[:, dim].var().item() - v) < 5 * v * np.sqrt(2 / n), dim
    # K = 5 ancestral steps shrink the spread (v is 4% of sigma^2 here); with many steps the chain's answer tends to
    # the data's own N(mu, sigma^2), as DDPM's should
    m, v = gaussian_sampler_moments(0.2, sigma, K=1000)
    assert m == pytest.approx(0.2, abs=1e-3) and v == pytest.approx(sigma**2, rel=0.1)


@SCRIPTS
def test_diffusion_loss_is_weighted_mean_over_batch_and_action_dims(module):
    """Eq. (3), (9), (10) by hand: a_k = sqrt(abar_k) a + sqrt(1 - abar_k) eps, mean over the whole batch (rows of
    weight 0 included) and over action dimensions of w ||eps - eps_omega(a_k, k, s)||^2."""
    diffusion = diffusion_of(module, act_dim=3)
    s, a = torch.randn(10, 4), torch.rand(10, 3) * 2 - 1
    w = torch.tensor([1.0, 0, 2, 0, 1, 0, 0, 3, 0, 1])
    torch.manual_seed(3)
    loss = diffusion.loss(s, a, w)
    torch.manual_seed(3)  # the same draws of k and eps, by hand
    k = torch.randint(1, 6, (10,))
    eps = torch.randn_like(a)
    alpha_bar = torch.tensor(spec_schedule()[2], dtype=torch.float32)
    a_k = alpha_bar[k, None].sqrt() * a + (1 - alpha_bar[k, None]).sqrt() * eps
    per_row = ((eps - diffusion.eps_model(a_k, diffusion.eps_model.time_mlp(k), s)) ** 2).sum(dim=1) / 3
    torch.testing.assert_close(loss, (w * per_row).sum() / 10)
    assert diffusion.loss(s, a, torch.zeros(10)) == 0.0
