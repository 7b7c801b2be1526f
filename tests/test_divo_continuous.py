"""Unit tests of divo_continuous.py: the maths of every loss, the data semantics, scores and the env."""

import copy
import os
from dataclasses import replace

import h5py
import numpy as np
import pytest
import torch

import divo_continuous as dc
from conftest import write_d4rl_file


def small_agent(**overrides):
    """A DIVO agent with tiny networks on the CPU."""
    args = dc.Args(hidden_dim=16, num_layers=2, **overrides)
    torch.manual_seed(0)
    return dc.DIVO(obs_dim=5, act_dim=3, args=args, device=torch.device("cpu"))


def batch(n=32, obs_dim=5, act_dim=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, obs_dim, generator=g), torch.rand(n, act_dim, generator=g) * 2 - 1,
            torch.randn(n, generator=g), torch.randn(n, obs_dim, generator=g), (torch.rand(n, generator=g) > 0.1).float())


# ---------------------------------------------------------------------------------------------- diffusion
def test_noise_schedule_constants():
    diffusion = dc.Diffusion(4, 2, num_steps=5, beta_min=0.1, beta_max=10.0, hidden_dim=8, num_layers=1)
    expected = [0.804125, 0.435178, 0.158500, 0.038852, 0.006409]
    np.testing.assert_allclose(diffusion.alpha_bar[1:].numpy(), expected, atol=5e-7)
    assert diffusion.alpha_bar[0] == 1.0
    assert diffusion.posterior_std[1] == 0.0  # no noise is added on the last reverse step
    assert (diffusion.posterior_std[2:] > 0).all()


def test_sampler_shapes_clipping_and_no_grad():
    diffusion = dc.Diffusion(4, 3, num_steps=5, beta_min=0.1, beta_max=10.0, hidden_dim=8, num_layers=1)
    with torch.no_grad():
        diffusion.eps_model.net[-1].bias.fill_(50.0)  # a wild noise prediction must still give actions in [-1, 1]
    s = torch.randn(64, 4, requires_grad=True)
    a = diffusion.sample(s)
    assert a.shape == (64, 3)
    assert a.abs().max() <= 1.0 and a.abs().max() == 1.0
    assert not a.requires_grad


def test_sampler_recovers_a_point_mass_with_the_exact_noise_model():
    """With eps(a_k) = (a_k - sqrt(abar_k) c) / sqrt(1 - abar_k), eq. (7)-(8) must return exactly c."""
    diffusion = dc.Diffusion(4, 2, num_steps=5, beta_min=0.1, beta_max=10.0, hidden_dim=8, num_layers=1)
    c = torch.tensor([0.3, -0.6])

    def exact_eps(a_k, k, s):
        return (a_k - diffusion.sqrt_alpha_bar[k, None] * c) / diffusion.sqrt_one_minus_alpha_bar[k, None]

    diffusion.eps_model.forward = exact_eps
    a = diffusion.sample(torch.zeros(100, 4))
    torch.testing.assert_close(a, c.expand(100, 2), atol=1e-5, rtol=0)


def test_diffusion_loss_is_weighted_mean_over_batch_and_action_dims():
    diffusion = dc.Diffusion(4, 3, num_steps=5, beta_min=0.1, beta_max=10.0, hidden_dim=8, num_layers=1)
    s, a = torch.randn(10, 4), torch.rand(10, 3) * 2 - 1
    w = torch.tensor([1.0, 0, 2, 0, 1, 0, 0, 3, 0, 1])
    torch.manual_seed(3)
    loss = diffusion.loss(s, a, w)
    torch.manual_seed(3)  # the same draws of k and eps, by hand (eq. 3, 9, 10)
    k = torch.randint(1, 6, (10,))
    eps = torch.randn_like(a)
    a_k = diffusion.alpha_bar[k, None].sqrt() * a + (1 - diffusion.alpha_bar[k, None]).sqrt() * eps
    per_row = ((eps - diffusion.eps_model(a_k, k, s)) ** 2).sum(dim=1) / 3
    torch.testing.assert_close(loss, (w * per_row).sum() / 10)
    assert diffusion.loss(s, a, torch.zeros(10)) == 0.0


# ---------------------------------------------------------------------------------------------- losses
def test_expectile_loss():
    u = torch.tensor([-2.0, 1.0])
    assert dc.expectile_loss(u, 0.7).item() == pytest.approx((0.3 * 4 + 0.7 * 1) / 2)
    assert dc.expectile_loss(u, 0.5).item() == pytest.approx(0.5 * (4 + 1) / 2)


def pad_weights(agent) -> tuple[list[float], dict]:
    """The weights one PAD step gives the diffusion loss for advantages (0.3, 0, -1, 2), and its metrics."""
    seen = {}

    def recording_loss(s, a, w):
        seen["w"] = w
        return agent.diffusion.eps_model.net[0].weight.sum()

    agent.diffusion.loss = recording_loss
    s, a, *_ = batch(n=4)
    metrics = agent.update_pad(s, a, adv=torch.tensor([0.3, 0.0, -1.0, 2.0]))
    return seen["w"].tolist(), metrics


def test_pad_weights_are_binary_advantage_times_strength():
    weights, metrics = pad_weights(small_agent(pad_strength=2.5))
    assert weights == [2.5, 0.0, 0.0, 2.5]  # A = 0 is not positive
    assert metrics["pad/positive_fraction"].item() == pytest.approx(0.5)


def test_adpo_target_choice():
    a = torch.tensor([[0.0], [0.0], [0.0]])
    adv = torch.tensor([1.0, 1.0, 1.0])
    candidates = torch.tensor([[[0.1], [0.2], [0.3]], [[0.4], [0.5], [0.6]]])  # N = 2 candidates for 3 states
    cand_adv = torch.tensor([[2.0, 0.5, 1.0], [3.0, 0.9, 0.2]])
    target, generated, target_adv = dc.adpo_target(a, adv, candidates, cand_adv)
    # state 0: candidate 2 is best (3.0 > 2.0 > 1.0); state 1: the data wins; state 2: a tie goes to the candidate
    assert target.squeeze(1).tolist() == pytest.approx([0.4, 0.0, 0.3])
    assert generated.tolist() == [True, False, True]
    assert target_adv.tolist() == [3.0, 1.0, 1.0]
    # the variant --adpo-positive-only: a generated action needs a positive advantage of its own
    adv = torch.tensor([-2.0, -2.0, -2.0])
    cand_adv = torch.tensor([[-1.0, 0.5, -3.0], [-1.5, 0.2, -4.0]])
    target, generated, target_adv = dc.adpo_target(a, adv, candidates, cand_adv, positive_only=True)
    assert generated.tolist() == [False, True, False] and target.squeeze(1).tolist() == pytest.approx([0.0, 0.2, 0.0])
    assert target_adv.tolist() == [-2.0, 0.5, -2.0]
    assert dc.adpo_target(a, adv, candidates, cand_adv)[1].tolist() == [True, True, False]


def test_select_target_compares_advantages_of_samples_and_data():
    agent = small_agent(num_candidates=3)
    best = torch.tensor([0.5, -0.5, 0.25])
    agent.critic_target = lambda s, a: -((a - best) ** 2).sum(-1).expand(2, -1)  # Q peaks at `best`
    s, a, *_ = batch(n=8)
    v = torch.randn(8)
    adv = -((a - best) ** 2).sum(-1) - v
    agent.diffusion.sample = lambda s_rep: best.expand(len(s_rep), 3).clone()
    target, weight, metrics = agent.select_target(s, a, v, adv)
    torch.testing.assert_close(target, best.expand(8, 3))
    assert metrics["adpo/generated_fraction"].item() == 1.0 and weight is None  # weight 1 everywhere, eq. (13)
    agent.diffusion.sample = lambda s_rep: torch.full((len(s_rep), 3), -1.0)  # far worse than any data action
    target, weight, metrics = agent.select_target(s, a, v, adv)
    torch.testing.assert_close(target, a)
    assert metrics["adpo/generated_fraction"].item() == 0.0


def hand_built_contest(agent):
    """Q'(s, a) = sum of a's entries, V = (0, 1, 0), N = 2 fixed candidates for 3 states."""
    agent.critic_target = lambda s, a: a.sum(-1).expand(2, -1)
    agent.value = lambda s: torch.tensor([0.0, 1.0, 0.0])
    s = torch.zeros(3, 5)
    a = torch.tensor([[0.1, 0.1, 0.1], [0.5, 0.5, 0.5], [-0.5, -0.5, -0.5]])  # A(s, a) = 0.3, 0.5, -1.5
    draws = [torch.tensor([[0.2, 0.2, 0.2], [0.0, 0.0, 0.0], [-0.4, -0.4, -0.4]]),  # A = 0.6, -1.0, -1.2
             torch.tensor([[0.0, 0.0, 0.0], [0.4, 0.4, 0.4], [-0.6, -0.6, -0.6]])]  # A = 0.0,  0.2, -1.8
    agent.diffusion.sample = lambda s_rep: torch.cat(draws)
    return s, a, torch.stack(draws)


def test_a2pr_bc_weight_imitates_only_targets_with_a_nonnegative_advantage():
    agent = small_agent(num_candidates=2, bc_weight="a2pr")
    s, a, draws = hand_built_contest(agent)
    v = agent.value(s)
    target, weight, metrics = agent.select_target(s, a, v, agent.target_q(s, a) - v)
    torch.testing.assert_close(target, torch.stack([draws[0, 0], a[1], draws[0, 2]]))
    assert weight.tolist() == [1.0, 1.0, 0.0]  # state 2: its best (a generated action, A = -1.2) is still negative
    assert metrics["adpo/generated_fraction"].item() == pytest.approx(2 / 3)


def test_adpo_diagnostics_on_a_hand_built_contest():
    """Gains, distances, and the check against the dataset actions of the nearest states, each by hand."""
    agent = small_agent(num_candidates=2)
    s, a, draws = hand_built_contest(agent)
    agent.actor = lambda s: torch.zeros(3, 3)
    s_ref = torch.tensor([[0.0] * 5, [10.0] * 5])  # the first reference state is nearest to every probe state
    a_ref = torch.tensor([[0.3, 0.3, 0.3], [-0.9, -0.9, -0.9]])  # Q' = 0.9 and -2.7
    d = dc.Diagnostics.__new__(dc.Diagnostics)
    d.probe, d.reference, d.neighbours = (s, a), (s_ref, a_ref), 1
    row = d.adpo(agent)
    target = torch.stack([draws[0, 0], a[1], draws[0, 2]])  # generated wins at states 0 and 2
    assert row["adpo/advantage_gain"] == pytest.approx((0.3 + 0.0 + 0.3) / 3)
    assert row["adpo/candidate_advantage_gain"] == pytest.approx(((0.3 - 1.5 + 0.3) + (-0.3 - 0.3 - 0.3)) / 6)
    assert row["adpo/candidate_distance"] == pytest.approx((draws - a).pow(2).mean().sqrt().item())
    assert row["adpo/actor_target_distance"] == pytest.approx(target.pow(2).mean().sqrt().item())
    assert row["adpo/actor_data_distance"] == pytest.approx(a.pow(2).mean().sqrt().item())
    # Q'(s, action) - 0.9 (the best nearby dataset Q'), and the RMS gap to the nearby dataset action (0.3, 0.3, 0.3)
    assert row["adpo/data_q_margin"] == pytest.approx(((0.3 - 0.9) + (1.5 - 0.9) + (-1.5 - 0.9)) / 3)
    assert row["adpo/data_action_gap"] == pytest.approx((0.2 + 0.2 + 0.8) / 3)
    assert row["adpo/winner_q_margin"] == pytest.approx(((0.6 - 0.9) + (-1.2 - 0.9)) / 2)
    assert row["adpo/winner_action_gap"] == pytest.approx((0.1 + 0.7) / 2)


def test_pad_sample_quality_diagnostic_uses_the_positive_advantage_rows():
    agent = small_agent()
    s, a = torch.randn(40, 5), torch.rand(40, 3) * 2 - 1
    agent.critic_target = lambda s_, a_: a_[:, 0].expand(2, -1)  # A > 0 where the first action entry is positive
    agent.value = lambda s_: torch.zeros(len(s_))
    seen = {}

    def sample(states):  # every sample is (0.5, 0.5, 0.5)
        seen["s"] = states
        return torch.full((len(states), 3), 0.5)

    agent.diffusion.sample = sample
    d = dc.Diagnostics.__new__(dc.Diagnostics)
    d.heldout, d.bandwidth = (s, a), 1.0
    row = d.pad(agent)
    positive = a[:, 0] > 0
    assert row["pad/heldout_positive_fraction"] == pytest.approx(positive.float().mean().item())
    assert len(seen["s"]) == positive.sum()
    expected = dc.wasserstein_per_dim(torch.full((int(positive.sum()), 3), 0.5), a[positive]).mean()
    assert row["pad/sample_wasserstein"] == pytest.approx(expected.item())


def test_online_critic_variants_score_data_and_candidates_alike():
    agent = small_agent(adpo_critic="online-q1")
    agent.critic_target = lambda s, a: torch.full((2, len(a)), 100.0)  # would make every action equal
    agent.critic = lambda s, a: torch.stack([-a.sum(-1), a.sum(-1)])  # Q1 prefers small actions
    s, a = torch.zeros(2, 5), torch.full((2, 3), 0.5)
    agent.diffusion.sample = lambda s_rep: torch.full((len(s_rep), 3), -0.5)
    v = torch.zeros(2)
    target, _, metrics = agent.select_target(s, a, v, adv=torch.full((2,), 1e9))  # adv from eq. (2) is not used
    torch.testing.assert_close(target, torch.full((2, 3), -0.5))
    agent.args = replace(agent.args, adpo_critic="online-min")  # min(-sum, sum) prefers large |sum|: a tie here
    target, _, _ = agent.select_target(s, a, v, adv=torch.full((2,), 1e9))
    torch.testing.assert_close(target, torch.full((2, 3), -0.5))  # ties go to the generated action


def test_critic_loss_matches_eq_1():
    agent = small_agent()
    s, a, r, s2, not_done = batch()
    critic, actor_t, critic_t = (copy.deepcopy(m) for m in (agent.critic, agent.actor_target, agent.critic_target))
    torch.manual_seed(5)
    metrics = agent.update_critic(s, a, r, s2, not_done)
    torch.manual_seed(5)
    noise = (torch.randn_like(a) * 0.2).clamp(-0.5, 0.5)
    a2 = (actor_t(s2) + noise).clamp(-1, 1)
    y = r + 0.99 * not_done * torch.minimum(*critic_t(s2, a2))
    q1, q2 = critic(s, a)
    expected = ((q1 - y) ** 2).mean() + ((q2 - y) ** 2).mean()
    torch.testing.assert_close(metrics["losses/qf_loss"], expected.detach())
    assert not torch.equal(agent.critic.net[0].weight, critic.net[0].weight)  # the step was taken
    torch.testing.assert_close(agent.critic_target.net[0].weight, critic_t.net[0].weight)  # targets untouched


def test_value_step_returns_the_advantage_of_eq_2():
    agent = small_agent()
    s, a, *_ = batch()
    value, critic_t = copy.deepcopy(agent.value), agent.critic_target
    v, adv, metrics = agent.update_value(s, a)
    q = critic_t(s, a).min(dim=0).values
    torch.testing.assert_close(v, value(s).detach())
    torch.testing.assert_close(adv, q - value(s).detach())
    torch.testing.assert_close(metrics["losses/value_loss"], dc.expectile_loss(adv, 0.7))


def test_actor_loss_matches_eq_13_and_polyak_update():
    agent = small_agent(alpha=2.5, tau=0.1)
    s, a, *_ = batch()
    a_bar = torch.rand_like(a) * 2 - 1
    actor, critic, old_target = copy.deepcopy(agent.actor), copy.deepcopy(agent.critic), copy.deepcopy(agent.actor_target)
    weight = (torch.arange(32) % 3 > 0).float()  # A2PR-style weights; 1 everywhere in eq. (13)
    metrics = agent.update_actor(s, a_bar, weight)
    pi = actor(s)
    q1 = critic(s, pi)[0]
    bc = (weight * ((pi - a_bar) ** 2).sum(-1)).mean() / 3
    expected = -(2.5 / q1.abs().mean()) * q1.mean() + bc
    torch.testing.assert_close(metrics["losses/actor_loss"], expected.detach())
    torch.testing.assert_close(metrics["losses/bc_loss"], bc.detach())
    for new, old, online in zip(agent.actor_target.parameters(), old_target.parameters(), agent.actor.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * online)


def test_update_order_and_delayed_actor():
    agent = small_agent()
    actor_before = copy.deepcopy(agent.actor.state_dict())
    metrics = agent.update(batch(), update_actor=False)
    assert set(metrics) == {"losses/qf_loss", "losses/qf1_values", "losses/value_loss", "losses/pad_loss",
                            "pad/positive_fraction"}
    assert all(torch.equal(actor_before[k], v) for k, v in agent.actor.state_dict().items())
    metrics = agent.update(batch(), update_actor=True)
    assert {"losses/actor_loss", "losses/bc_loss", "adpo/generated_fraction"} <= set(metrics)
    assert not torch.equal(actor_before["net.0.weight"], agent.actor.state_dict()["net.0.weight"])


def test_frozen_pad_skips_the_diffusion_step():
    agent = small_agent(freeze_pad=True, pad_checkpoint="pretrained.pt")  # Args does not open the file
    before = copy.deepcopy(agent.diffusion.state_dict())
    metrics = agent.update(batch(), update_actor=True)
    assert "losses/pad_loss" not in metrics
    assert all(torch.equal(before[k], v) for k, v in agent.diffusion.state_dict().items())


def test_twin_critic_members_are_independent_linear_stacks():
    critic = dc.TwinCritic(5, 3, hidden_dim=16, num_layers=2)
    s, a = torch.randn(7, 5), torch.randn(7, 3)
    q = critic(s, a)
    assert q.shape == (2, 7)
    x = torch.cat([s, a], -1)
    for i in range(2):  # member i by hand
        h = x
        for layer in critic.net:
            h = h @ layer.weight[i] + layer.bias[i] if isinstance(layer, dc.VectorizedLinear) else layer(h)
        torch.testing.assert_close(q[i], h.squeeze(-1))
    assert not torch.equal(q[0], q[1])


# ---------------------------------------------------------------------------------------------- data
def test_qlearning_dataset_semantics(tmp_path):
    """Hand-built file: rows i hold observation i; episodes end by timeout (rows 2, 8) or terminal (row 5)."""
    n = 10
    obs = np.arange(n, dtype=np.float64)[:, None].repeat(11, axis=1)  # float64 as in medium-replay files
    terminals = np.zeros((n, 1))  # (N, 1) as in old files
    terminals[5] = 1
    timeouts = np.zeros(n, dtype=bool)
    timeouts[[2, 8]] = True
    path = tmp_path / "hand.hdf5"
    write_d4rl_file(path, observations=obs, actions=np.zeros((n, 3)), rewards=np.arange(n, dtype=np.float64)[:, None],
                    terminals=terminals, timeouts=timeouts, next_observations=None)
    raw = dc.load_d4rl_file(str(path), obs_dim=11, act_dim=3)
    assert raw["observations"].dtype == np.float32 and raw["rewards"].shape == (n,)
    q = dc.qlearning_dataset(raw)
    kept = [0, 1, 3, 4, 5, 6, 7]  # row 9 (last) dropped, timeout rows 2 and 8 skipped
    assert q["observations"][:, 0].tolist() == kept
    assert q["next_observations"][:, 0].tolist() == [i + 1 for i in kept]  # next row, not the file's key
    assert q["rewards"].tolist() == kept
    assert q["terminals"].tolist() == [False, False, False, False, True, False, False]


def test_next_observations_key_is_ignored(tmp_path):
    path = tmp_path / "d.hdf5"
    data = write_d4rl_file(path, next_observations=False, episode_lengths=(5, 5))
    with h5py.File(path, "a") as f:
        f["next_observations"] = np.full_like(data["observations"], 123.0)
    q = dc.qlearning_dataset(dc.load_d4rl_file(str(path), 11, 3))
    np.testing.assert_array_equal(q["next_observations"][0], data["observations"][1])


def test_dataset_summary_counts_episodes_and_returns(tmp_path):
    path = tmp_path / "d.hdf5"
    write_d4rl_file(path, episode_lengths=(4, 6), terminal_episodes=(0,), rewards=np.ones(10, dtype=np.float32))
    raw = dc.load_d4rl_file(str(path), 11, 3)
    text = dc.dataset_summary(str(path), raw, dc.qlearning_dataset(raw), "hopper")
    low, high = dc.normalized_score("hopper", [4.0, 6.0])
    assert f"episodes   2, mean length 5, normalised return min {low:.1f}  mean" in text and f"max {high:.1f}" in text
    assert "10 rows -> 9 transitions" in text  # the last row (also episode 2's timeout) is dropped
    assert "terminals 11.1111% of transitions" in text  # one terminal among 9 transitions


def test_scores():
    np.testing.assert_allclose(dc.normalized_score("hopper", [-20.272305, 3234.3]), [0.0, 100.0])
    assert dc.normalized_score("halfcheetah", [12135.0 / 2 - 280.178953 / 2])[0] == pytest.approx(50.0)
    assert dc.normalized_score("walker2d", [1.629008])[0] == pytest.approx(0.0)


def test_env_ids_and_urls(monkeypatch, tmp_path):
    assert len(dc.ENV_IDS) == 18
    assert dc.dataset_url("halfcheetah-medium-expert-v2").endswith("gym_mujoco_v2/halfcheetah_medium_expert-v2.hdf5")
    assert dc.dataset_url("walker2d-full-replay-v2").endswith("/walker2d_full_replay-v2.hdf5")
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    assert dc.default_dataset_path("hopper-medium-v2") == str(tmp_path / "hopper_medium-v2.hdf5")
    assert dc.check_env_id("walker2d-medium-replay-v2") == "walker2d"
    with pytest.raises(dc.InputError, match="did you mean hopper-medium-v2"):
        dc.check_env_id("hopper-meduim-v2")
    with pytest.raises(dc.InputError, match="is an AntMaze dataset: run divo_antmaze.py --env-id antmaze-umaze-v2"):
        dc.check_env_id("antmaze-umaze-v2")


# ---------------------------------------------------------------------------------------------- env
@pytest.mark.parametrize("robot, legacy, patched", [("hopper", 15.820, 15.265), ("walker2d", 23.677, 22.698)])
def test_legacy_inertia_restores_d4rl_masses(robot, legacy, patched):
    assert dc.make_eval_env(robot, legacy_inertia=False).unwrapped.model.body_mass.sum() == pytest.approx(legacy, abs=1e-3)
    env = dc.make_eval_env(robot, legacy_inertia=True)
    assert env.unwrapped.model.body_mass.sum() == pytest.approx(patched, abs=1e-3)
    env.reset(seed=0)
    obs, *_ = env.step(env.action_space.sample())
    assert np.isfinite(obs).all()


def test_evaluate_runs_episodes_side_by_side_and_is_deterministic():
    envs = [dc.make_eval_env("hopper", True) for _ in range(3)]
    torch.manual_seed(0)
    actor = dc.Actor(11, 3, 16, 1)
    mean, std = np.zeros(11), np.ones(11)
    r1 = dc.evaluate(actor, envs, mean, std, seed=7)
    r2 = dc.evaluate(actor, envs, mean, std, seed=7)
    assert r1.shape == (3,) and np.array_equal(r1, r2)
    assert len(set(r1.tolist())) == 3  # each env has its own start state
    # the same first episode, by hand
    env = envs[0]
    obs, _ = env.reset(seed=7)
    total, done = 0.0, False
    while not done:
        with torch.no_grad():
            action = actor(torch.as_tensor(obs, dtype=torch.float32)[None]).numpy()[0]
        obs, reward, terminated, truncated, _ = env.step(action)
        total, done = total + reward, terminated or truncated
    assert total == pytest.approx(r1[0])


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("case, message", [
    ("missing", "no dataset file"),
    ("garbage", "partial or corrupt"),
    ("truncated", "partial or corrupt"),
    ("missing_key", "lacks the D4RL keys \\['timeouts'\\]"),
    ("wrong_obs", "'observations' has shape \\(95, 7\\), expected \\(95, 11\\)"),
    ("wrong_len", "'actions' has shape \\(94, 3\\)"),
    ("nan", "1 row\\(s\\) of 'observations' hold NaN or inf \\(first at row 17\\)"),
    ("inf", "'rewards' hold NaN or inf"),
])
def test_bad_dataset_files_are_refused_with_a_clear_message(tmp_path, case, message):
    path = tmp_path / "bad.hdf5"
    if case == "garbage":
        path.write_bytes(os.urandom(5000))
    elif case == "truncated":
        write_d4rl_file(path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif case == "missing_key":
        write_d4rl_file(path, timeouts=None)
    elif case == "wrong_obs":
        write_d4rl_file(path, obs_dim=7)
    elif case == "wrong_len":
        write_d4rl_file(path, actions=np.zeros((94, 3), np.float32))
    elif case in ("nan", "inf"):
        data = write_d4rl_file(tmp_path / "ok.hdf5")
        if case == "nan":
            data["observations"][17, 3] = np.nan
        else:
            data["rewards"][4] = np.inf
        write_d4rl_file(path, observations=data["observations"], rewards=data["rewards"])
    with pytest.raises(dc.InputError, match=message):
        dc.load_d4rl_file(str(path), obs_dim=11, act_dim=3)


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    dc.save_checkpoint(path, {"kind": "divo_continuous", "step": 1})

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        dc.save_checkpoint(path, {"kind": "divo_continuous", "step": 2})
    assert dc.load_checkpoint(path, "divo_continuous")["step"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # nothing half-written beside it (a real full disk: test_run_folders)


def test_foreign_and_corrupt_checkpoints_are_refused(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"kind": "pad_pretrain"}, path)
    with pytest.raises(dc.InputError, match="checkpoint of pad_pretrain, not of divo_continuous.py"):
        dc.load_checkpoint(str(path), "divo_continuous")
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(dc.InputError, match="cannot read checkpoint"):
        dc.load_checkpoint(str(path), "divo_continuous")
    with pytest.raises(dc.InputError, match="no checkpoint at"):
        dc.load_checkpoint(str(tmp_path / "nothing.pt"), "divo_continuous")


def test_compiled_updates_compute_the_same_losses_and_weights():
    """--compile: the same losses and parameters as eager on the same batches and seeds.

    The "aot_eager" backend runs TorchDynamo's graph capture and AOTAutograd (where a compiled update could
    diverge from eager) without inductor's C++ build, which takes minutes on a small CPU.
    """
    eager, compiled = small_agent(), small_agent()
    compiled.compile(backend="aot_eager")
    for step in range(4):
        torch.manual_seed(100 + step)
        m_eager = eager.update(batch(seed=step), update_actor=step % 2 == 0)
        torch.manual_seed(100 + step)
        m_compiled = compiled.update(batch(seed=step), update_actor=step % 2 == 0)
        assert m_eager.keys() == m_compiled.keys()
        for key in m_eager:
            torch.testing.assert_close(m_compiled[key], m_eager[key], rtol=1e-5, atol=1e-6)
    for name, module in eager.modules().items():
        for key, value in module.state_dict().items():
            torch.testing.assert_close(compiled.modules()[name].state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_rewards_of_the_wrong_width_are_refused_not_truncated(tmp_path):
    path = tmp_path / "wide.hdf5"
    write_d4rl_file(path, rewards=np.ones((95, 2), np.float32))
    with pytest.raises(dc.InputError, match="'rewards' has shape \\(95, 2\\), expected \\(95,\\)"):
        dc.load_d4rl_file(str(path), 11, 3)


# ---------------------------------------------------------------------------------------------- modes and variants
def test_no_adpo_is_the_td3bc_backbone():
    """--no-adpo: no diffusion model and no value net exist, only the critic and actor steps run, the BC target is a."""
    agent = small_agent(adpo=False)
    assert set(agent.modules()) == {"actor", "actor_target", "critic", "critic_target"}
    assert set(agent.optimizers()) == {"actor_optimizer", "critic_optimizer"}
    seen = {}
    update_actor = agent.update_actor
    agent.update_actor = lambda s, a_bar, w: seen.update(a_bar=a_bar, w=w) or update_actor(s, a_bar, w)
    s, a, *rest = batch()
    metrics = agent.update((s, a, *rest), update_actor=True)
    assert set(metrics) == {"losses/qf_loss", "losses/qf1_values", "losses/actor_loss", "losses/bc_loss"}
    assert seen["a_bar"] is a and seen["w"] is None


def test_no_pad_trains_the_diffusion_model_on_every_action():
    """--no-pad: uniform weights zeta in the diffusion loss, whatever the advantage; ADPO still runs."""
    weights, metrics = pad_weights(small_agent(pad=False, pad_strength=2.0))
    assert weights == [2.0, 2.0, 2.0, 2.0]
    assert metrics["pad/positive_fraction"].item() == pytest.approx(0.5)  # still logged: the share PAD would keep
    assert "adpo/generated_fraction" in small_agent(pad=False).update(batch(), update_actor=True)


def test_adpo_start_imitates_the_dataset_action_first():
    agent = small_agent()
    agent.select_target = lambda *args: pytest.fail("ADPO must not run before --adpo-start")
    metrics = agent.update(batch(), update_actor=True, use_adpo=False)
    assert "adpo/generated_fraction" not in metrics and "losses/pad_loss" in metrics  # PAD trains all along
