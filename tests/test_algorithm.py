"""The maths of both DIVO scripts (divo_continuous.py, and the copies in divo_antmaze.py: test_drift.py keeps them
identical): every loss against a hand computation with target networks that differ from the online ones, the ADPO
contest, the diagnostics of the contest (divo_utils.diagnostics, fed each script's agent and eq. 12), the data
semantics. Env ids, D4RL files, the evaluation loop and the locomotion env: test_data_path.py; checkpoints:
test_run_integrity.py. The sampler: test_diffusion.py; one iteration's wiring: test_wiring.py; --compile
and --cudagraphs: test_speed.py; the data path end to end and the scores: test_data_path.py."""

import copy

import h5py
import numpy as np
import pytest
import torch

import divo_antmaze as da
import divo_continuous as dc
import pad_pretrain as pp
from conftest import perturb, write_d4rl_file
from divo_utils import InputError
from divo_utils import data as dd
from divo_utils.diagnostics import Diagnostics, wasserstein_per_dim
from divo_utils.runs import networks, optimizers

DIVO_SCRIPTS = pytest.mark.parametrize("m", [dc, da], ids=["continuous", "antmaze"])


def small_agent(m=dc, perturbed=True, **overrides):
    """A DIVO agent with tiny networks on the CPU; its target networks moved away from the online ones."""
    env_id = "antmaze-umaze-v2" if m is da else "hopper-medium-v2"
    if overrides.get("freeze_pad"):  # Args refuses --freeze-pad alone; the agent never reads the checkpoint itself
        overrides.setdefault("pad_checkpoint", "pad_checkpoint.pt")
    args = m.Args(env_id=env_id, hidden_dim=16, num_layers=2, **overrides)
    torch.manual_seed(0)
    agent = m.DIVO(obs_dim=5, act_dim=3, args=args, device=torch.device("cpu"))
    if perturbed:
        perturb(agent.actor_target, agent.critic_target)
    return agent


def batch(n=32, obs_dim=5, act_dim=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, obs_dim, generator=g), torch.rand(n, act_dim, generator=g) * 2 - 1,
            torch.randn(n, generator=g), torch.randn(n, obs_dim, generator=g), (torch.rand(n, generator=g) > 0.3).float())


def changed(agent, before) -> set:
    """The networks whose weights differ from `before` ({name: state_dict})."""
    return {name for name, net in networks(agent).items()
            if any(not torch.equal(before[name][k], v) for k, v in net.state_dict().items())}


def snapshot(agent) -> dict:
    return {name: copy.deepcopy(net.state_dict()) for name, net in networks(agent).items()}


def test_small_agents_have_targets_unlike_their_online_networks():
    agent = small_agent()
    for online, target in ((agent.actor, agent.actor_target), (agent.critic, agent.critic_target)):
        assert all(not torch.equal(p, q) for p, q in zip(online.parameters(), target.parameters()))


# ---------------------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("m", [dc, da, pp], ids=["continuous", "antmaze", "pad_pretrain"])
def test_expectile_loss(m):
    u = torch.tensor([-2.0, 1.0])
    assert m.expectile_loss(u, 0.7).item() == pytest.approx((0.3 * 4 + 0.7 * 1) / 2)
    assert m.expectile_loss(u, 0.9).item() == pytest.approx((0.1 * 4 + 0.9 * 1) / 2)
    assert m.expectile_loss(u, 0.5).item() == pytest.approx(0.5 * (4 + 1) / 2)


def expectile_by_hand(u, tau):
    return (torch.where(u < 0, 1 - tau, tau) * u**2).mean()


@DIVO_SCRIPTS
def test_critic_loss_matches_eq_1(m):
    """y = r + gamma (1 - d) min_i Q_theta'_i(s', clip(pi_phi'(s') + clip(noise), -1, 1)); the loss sums the twins'."""
    agent = small_agent(m, gamma=0.9, policy_noise=0.4, noise_clip=0.3)
    with torch.no_grad():  # a target actor that saturates, so that clipping the noisy action matters
        agent.actor_target.net[-1].weight.mul_(10)
    s, a, r, s2, not_done = batch()
    critic, actor_t, critic_t = (copy.deepcopy(x) for x in (agent.critic, agent.actor_target, agent.critic_target))
    torch.manual_seed(5)
    metrics = agent.update_critic(s, a, r, s2, not_done)
    torch.manual_seed(5)
    noise = (torch.randn_like(a) * 0.4).clamp(-0.3, 0.3)
    a2 = (actor_t(s2) + noise).clamp(-1, 1)
    assert (actor_t(s2) + noise).abs().max() > 1 and (noise.abs() == 0.3).any()  # both clips are exercised
    y = r + 0.9 * not_done * torch.minimum(*critic_t(s2, a2))
    q1, q2 = critic(s, a)
    expected = ((q1 - y) ** 2).mean() + ((q2 - y) ** 2).mean()
    torch.testing.assert_close(metrics["losses/qf_loss"], expected.detach())
    torch.testing.assert_close(metrics["losses/qf1_values"], q1.mean().detach())
    assert not torch.equal(agent.critic.net[0].weight, critic.net[0].weight)  # the step was taken
    for new, old in ((agent.critic_target, critic_t), (agent.actor_target, actor_t)):  # targets untouched
        assert all(torch.equal(p, q) for p, q in zip(new.parameters(), old.parameters()))


@DIVO_SCRIPTS
def test_value_step_returns_the_advantage_of_eq_2(m):
    """u = min_i Q_theta'_i(s, a) - V(s) with V before its step; L_V = mean |tau - 1(u < 0)| u^2."""
    agent = small_agent(m, expectile=0.7)
    s, a, *_ = batch()
    value, critic_t = copy.deepcopy(agent.value), copy.deepcopy(agent.critic_target)
    adv, v, metrics = agent.update_value(s, a)
    q = critic_t(s, a).detach()
    u = q.min(dim=0).values - value(s).detach()
    torch.testing.assert_close(v, value(s).detach())
    torch.testing.assert_close(adv, u)
    assert (u > 0).any() and (u < 0).any()  # both sides of the expectile
    torch.testing.assert_close(metrics["losses/value_loss"], expectile_by_hand(u, 0.7))
    assert not torch.equal(agent.value.net[0].weight, value.net[0].weight)  # the step was taken


@DIVO_SCRIPTS
def test_actor_loss_matches_eq_13_and_polyak_update(m):
    """L = -lambda mean Q_theta1(s, pi(s)) + mean ||pi(s) - a_bar||^2 / A, lambda = alpha / mean |Q_theta1|; then
    theta' <- tau theta + (1 - tau) theta' for the target critics and the target actor (after its step)."""
    agent = small_agent(m, alpha=2.5, tau=0.1)
    s, a, *_ = batch()
    a_bar = torch.rand_like(a) * 2 - 1
    actor, critic = copy.deepcopy(agent.actor), copy.deepcopy(agent.critic)
    old_actor_t, old_critic_t = copy.deepcopy(agent.actor_target), copy.deepcopy(agent.critic_target)
    agent.critic_optimizer.zero_grad(set_to_none=True)
    metrics = agent.update_actor(s, a_bar)
    pi = actor(s)
    q1 = critic(s, pi)[0]
    bc = ((pi - a_bar) ** 2).sum(-1).mean() / 3
    expected = -(2.5 / q1.abs().mean()) * q1.mean() + bc
    torch.testing.assert_close(metrics["losses/actor_loss"], expected.detach())
    torch.testing.assert_close(metrics["losses/bc_loss"], bc.detach())
    assert not torch.equal(agent.actor.net[0].weight, actor.net[0].weight)  # the actor's step was taken
    assert all(torch.equal(p, q) for p, q in zip(agent.critic.parameters(), critic.parameters()))  # not the critic's
    assert all(p.grad is None for p in agent.critic.parameters())  # nor even a gradient for it (wasted kernels)
    assert all(p.requires_grad for p in agent.critic.parameters())  # and the critic trains again afterwards
    for target, old, online in ((agent.actor_target, old_actor_t, agent.actor), (agent.critic_target, old_critic_t,
                                                                                 agent.critic)):
        for new_p, old_p, online_p in zip(target.parameters(), old.parameters(), online.parameters()):
            torch.testing.assert_close(new_p, 0.9 * old_p + 0.1 * online_p)


def pad_weights(agent) -> tuple[list[float], dict]:
    """The weights one PAD step gives the diffusion loss for advantages (0.3, 0, -1, 2), and its metrics."""
    seen = {}

    def recording_loss(s, a, w):
        seen.update(s=s, a=a, w=w)
        return agent.diffusion.eps_model.net[0].weight.sum()

    agent.diffusion.loss = recording_loss
    s, a, *_ = batch(n=4)
    metrics = agent.update_pad(s, a, adv=torch.tensor([0.3, 0.0, -1.0, 2.0]))
    assert seen["s"] is s and seen["a"] is a  # the whole batch, rows of weight 0 included
    return seen["w"].tolist(), metrics


@DIVO_SCRIPTS
def test_pad_weights_are_binary_advantage_times_strength(m):
    weights, metrics = pad_weights(small_agent(m, pad_strength=2.5))
    assert weights == [2.5, 0.0, 0.0, 2.5]  # A = 0 is not positive
    assert metrics["pad/positive_fraction"].item() == pytest.approx(0.5)


@DIVO_SCRIPTS
def test_pad_step_trains_on_the_weighted_loss_of_the_whole_batch(m):
    """Eq. (10): the PAD step's loss is the diffusion loss with weights zeta 1[A > 0] over the whole batch."""
    agent = small_agent(m, pad_strength=2.0)
    s, a, *_ = batch(n=16)
    adv = torch.linspace(-1, 1, 16)
    diffusion = copy.deepcopy(agent.diffusion)
    torch.manual_seed(9)
    metrics = agent.update_pad(s, a, adv)
    torch.manual_seed(9)
    expected = diffusion.loss(s, a, 2.0 * (adv > 0).float())
    torch.testing.assert_close(metrics["losses/pad_loss"], expected.detach())
    assert not torch.equal(agent.diffusion.eps_model.net[0].weight, diffusion.eps_model.net[0].weight)


# ---------------------------------------------------------------------------------------------- ADPO, eq. (12)
@DIVO_SCRIPTS
def test_adpo_target_choice(m):
    a = torch.tensor([[0.0], [0.0], [0.0]])
    adv = torch.tensor([1.0, 1.0, 1.0])
    candidates = torch.tensor([[[0.1], [0.2], [0.3]], [[0.4], [0.5], [0.6]]])  # N = 2 candidates for 3 states
    cand_adv = torch.tensor([[2.0, 0.5, 1.0], [3.0, 0.9, 0.2]])
    target, generated, target_adv = m.adpo_target(a, adv, candidates, cand_adv)
    # state 0: candidate 2 is best (3.0 > 2.0 > 1.0); state 1: the data wins; state 2: a tie goes to the candidate
    assert target.squeeze(1).tolist() == pytest.approx([0.4, 0.0, 0.3])
    assert generated.tolist() == [True, False, True]
    assert target_adv.tolist() == [3.0, 1.0, 1.0]


@DIVO_SCRIPTS
def test_adpo_candidates_are_samples_scored_by_the_target_critics(m):
    """N samples per state (sample j of state i is row j B + i of the repeated states) and their advantages
    min_i Q'_i(s, a_hat) - V(s)."""
    agent = small_agent(m, num_candidates=3)
    s, a, *_ = batch(n=8)
    seen = {}

    def sample(s_n):  # sample j of state i: tanh(s_i[:3]) + 0.1 j, if the rows are laid out as documented
        seen["s_n"] = s_n
        return torch.tanh(s_n[:, :3]) + 0.1 * (torch.arange(len(s_n)) // 8)[:, None]

    agent.diffusion.sample = sample
    v = torch.randn(8)
    candidates, cand_adv = agent.adpo_candidates(s, v)
    assert candidates.shape == (3, 8, 3) and cand_adv.shape == (3, 8)
    torch.testing.assert_close(seen["s_n"], s.repeat(3, 1))
    for j in range(3):
        c = torch.tanh(s[:, :3]) + 0.1 * j
        q = agent.critic_target(s, c)
        torch.testing.assert_close(candidates[j], c)
        torch.testing.assert_close(cand_adv[j], torch.minimum(q[0], q[1]) - v)


@DIVO_SCRIPTS
def test_the_contest_is_the_papers(m):
    """The target is eq. (12) as the paper states it, written out per state: the action of largest
    min_i Q'_i(s, .) - V(s) among {a, a_hat_1..N}, ties going to a sample (no margin: the scripts have none)."""
    agent = small_agent(m, num_candidates=3)
    assert not hasattr(agent.args, "adpo_margin")
    s, a, *_ = batch(n=64, seed=5)
    with torch.no_grad():
        v, q_data = agent.value(s), agent.critic_target(s, a)
    torch.manual_seed(7)
    candidates, cand_adv = agent.adpo_candidates(s, v)
    target, generated, _ = m.adpo_target(a, q_data.min(0).values - v, candidates, cand_adv)
    with torch.no_grad():
        for i in range(64):
            options = [a[i]] + [candidates[j, i] for j in range(3)]
            values = [agent.critic_target(s[i:i + 1], o[None]).min().item() - v[i].item() for o in options]
            best = max(range(1, 4), key=lambda j: values[j])
            assert torch.equal(target[i], options[best] if values[best] >= values[0] else a[i]), i
    assert 0 < generated.sum() < 64  # both outcomes occur


# ---------------------------------------------------------------------------------------------- diagnostics
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


@DIVO_SCRIPTS
def test_adpo_diagnostics_on_a_hand_built_contest(m):
    """Gains, distances, and the check against the dataset actions of the nearest states, each by hand."""
    agent = small_agent(m, num_candidates=2)
    s, a, draws = hand_built_contest(agent)
    agent.actor = lambda s: torch.zeros(3, 3)
    s_ref = torch.tensor([[0.0] * 5, [10.0] * 5])  # the first reference state is nearest to every probe state
    a_ref = torch.tensor([[0.3, 0.3, 0.3], [-0.9, -0.9, -0.9]])  # Q' = 0.9 and -2.7
    d = Diagnostics.__new__(Diagnostics)
    d.probe, d.reference, d.neighbours = (s, a), (s_ref, a_ref), 1
    row = d.contest(agent)
    target = torch.stack([draws[0, 0], a[1], draws[0, 2]])  # generated wins at states 0 and 2
    assert row["adpo/advantage_gain"] == pytest.approx((0.3 + 0.0 + 0.3) / 3)
    assert row["adpo/candidate_advantage_gain"] == pytest.approx(((0.3 - 1.5 + 0.3) + (-0.3 - 0.3 - 0.3)) / 6)
    assert row["adpo/candidate_distance"] == pytest.approx((draws - a).pow(2).mean().sqrt().item())
    assert row["adpo/actor_target_distance"] == pytest.approx(target.pow(2).mean().sqrt().item())
    assert row["adpo/actor_data_distance"] == pytest.approx(a.pow(2).mean().sqrt().item())
    assert row["adpo/twin_disagreement"] == 0.0 and row["adpo/winners_backed_by_both"] == 1.0  # twins agree here
    # Q'(s, action) - 0.9 (the best nearby dataset Q'), and the RMS gap to the nearby dataset action (0.3, 0.3, 0.3)
    assert row["adpo/data_q_margin"] == pytest.approx(((0.3 - 0.9) + (1.5 - 0.9) + (-1.5 - 0.9)) / 3)
    assert row["adpo/data_action_gap"] == pytest.approx((0.2 + 0.2 + 0.8) / 3)
    assert row["adpo/winner_q_margin"] == pytest.approx(((0.6 - 0.9) + (-1.2 - 0.9)) / 2)
    assert row["adpo/winner_action_gap"] == pytest.approx((0.1 + 0.7) / 2)


@DIVO_SCRIPTS
def test_twin_critic_diagnostics_on_a_hand_built_contest(m):
    """Q'_1 = a_1 + a_2 + a_3, Q'_2 = 3 a_1, V = 0. State 0: the sample wins and both critics prefer it; state 1:
    it wins on min Q' (0.3 > 0) though Q'_2 rates the dataset action higher (0.6 > 0.3)."""
    agent = small_agent(m, num_candidates=1)
    agent.critic_target = lambda s, a: torch.stack([a.sum(-1), 3 * a[:, 0]])
    agent.value = lambda s: torch.zeros(len(s))
    agent.actor = lambda s: torch.zeros(len(s), 3)
    s = torch.zeros(2, 5)
    a = torch.tensor([[0.0, 0.0, 0.0], [0.2, 0.0, -0.2]])  # Q' = (0, 0) and (0, 0.6)
    agent.diffusion.sample = lambda s_rep: torch.tensor([[0.3, -0.1, -0.1], [0.1, 0.1, 0.1]])  # (0.1, 0.9), (0.3, 0.3)
    d = Diagnostics.__new__(Diagnostics)
    d.probe, d.reference, d.neighbours = (s, a), (s[:1], a[:1]), 1
    row = d.contest(agent)
    assert row["adpo/advantage_gain"] == pytest.approx((0.1 + 0.3) / 2)
    assert row["adpo/twin_disagreement"] == pytest.approx((0.0 + 0.6) / 2)
    assert row["adpo/winners_backed_by_both"] == pytest.approx(0.5)


def test_pad_sample_quality_diagnostic_uses_the_positive_advantage_rows():
    """divo_utils.diagnostics alone (every part of the agent it calls is replaced): run once."""
    agent = small_agent()
    s, a = torch.randn(40, 5), torch.rand(40, 3) * 2 - 1
    agent.critic_target = lambda s_, a_: a_[:, 0].expand(2, -1)  # A > 0 where the first action entry is positive
    agent.value = lambda s_: torch.zeros(len(s_))
    seen = {}

    def sample(states):  # every sample is (0.5, 0.5, 0.5)
        seen["s"] = states
        return torch.full((len(states), 3), 0.5)

    agent.diffusion.sample = sample
    d = Diagnostics.__new__(Diagnostics)
    d.heldout, d.bandwidth = (s, a), 1.0
    row = d.sample_quality(agent)
    positive = a[:, 0] > 0
    assert row["pad/heldout_positive_fraction"] == pytest.approx(positive.float().mean().item())
    assert len(seen["s"]) == positive.sum()
    expected = wasserstein_per_dim(torch.full((int(positive.sum()), 3), 0.5), a[positive]).mean()
    assert row["pad/sample_wasserstein"] == pytest.approx(expected.item())


# ---------------------------------------------------------------------------------------------- one iteration
@DIVO_SCRIPTS
def test_only_actor_steps_move_the_actor_and_the_targets(m):
    """Delayed updates (TD3): without the actor step, the critic, V and the diffusion model train; the actor and every
    target network stay. With it, all six move. (The loop's choice of actor steps: test_wiring.py.)"""
    agent = small_agent(m)
    before = snapshot(agent)
    metrics = agent.update(batch(), actor_step=False)
    assert set(metrics) == {"losses/qf_loss", "losses/qf1_values", "losses/value_loss", "losses/pad_loss",
                            "pad/positive_fraction"}
    assert changed(agent, before) == {"critic", "value", "diffusion"}
    before = snapshot(agent)
    metrics = agent.update(batch(seed=2), actor_step=True)
    assert {"losses/actor_loss", "losses/bc_loss", "adpo/generated_fraction"} <= set(metrics)
    assert changed(agent, before) == {"critic", "value", "diffusion", "actor", "actor_target", "critic_target"}


@DIVO_SCRIPTS
def test_frozen_pad_skips_the_diffusion_step(m):
    with pytest.raises(InputError, match="pass --pad-checkpoint too"):  # never without the pretrained model
        small_agent(m, freeze_pad=True, pad_checkpoint=None)
    agent = small_agent(m, freeze_pad=True)
    before = snapshot(agent)
    metrics = agent.update(batch(), actor_step=True)
    assert "losses/pad_loss" not in metrics and "adpo/generated_fraction" in metrics
    assert "diffusion" not in changed(agent, before)


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
    raw = dd.load_d4rl_file(str(path), obs_dim=11, act_dim=3)
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
    q = dc.qlearning_dataset(dd.load_d4rl_file(str(path), 11, 3))
    np.testing.assert_array_equal(q["next_observations"][0], data["observations"][1])


def test_dataset_summary_counts_episodes_and_returns(tmp_path):
    path = tmp_path / "d.hdf5"
    write_d4rl_file(path, episode_lengths=(4, 6), terminal_episodes=(0,), rewards=np.ones(10, dtype=np.float32))
    raw = dd.load_d4rl_file(str(path), 11, 3)
    text = dd.dataset_summary(str(path), raw, dc.qlearning_dataset(raw), "locomotion",
                              lambda returns: dd.d4rl_score(returns, dc.REF_SCORES["hopper"]))  # as load_task's
    low, high = dd.d4rl_score([4.0, 6.0], dc.REF_SCORES["hopper"])
    assert f"episodes   2, mean length 5, normalised return min {low:.1f}  mean" in text and f"max {high:.1f}" in text
    assert "10 rows -> 9 transitions" in text  # the last row (also episode 2's timeout) is dropped
    assert "terminals 11.1111% of transitions" in text  # one terminal among 9 transitions


# ---------------------------------------------------------------------------------------------- modes
@DIVO_SCRIPTS
def test_no_adpo_is_the_td3bc_backbone(m):
    """--no-adpo: no diffusion model and no value net exist, only the critic and actor steps run, the BC target is a."""
    agent = small_agent(m, adpo=False)
    assert set(networks(agent)) == {"actor", "actor_target", "critic", "critic_target"}
    assert set(optimizers(agent)) == {"actor_optimizer", "critic_optimizer"}
    seen = {}
    update_actor = agent.update_actor
    agent.update_actor = lambda s, a_bar: seen.update(a_bar=a_bar) or update_actor(s, a_bar)
    s, a, *rest = batch()
    metrics = agent.update((s, a, *rest), actor_step=True)
    assert set(metrics) == {"losses/qf_loss", "losses/qf1_values", "losses/actor_loss", "losses/bc_loss"}
    assert seen["a_bar"] is a


@DIVO_SCRIPTS
def test_no_pad_trains_the_diffusion_model_on_every_action(m):
    """--no-pad: uniform weights zeta in the diffusion loss, whatever the advantage; ADPO still runs."""
    weights, metrics = pad_weights(small_agent(m, pad=False, pad_strength=2.0))
    assert weights == [2.0, 2.0, 2.0, 2.0]
    assert metrics["pad/positive_fraction"].item() == pytest.approx(0.5)  # still logged: the share PAD would keep
    assert "adpo/generated_fraction" in small_agent(m, pad=False).update(batch(), actor_step=True)


def test_antmaze_alpha_follows_the_maze():
    assert [da.Args(env_id=f"antmaze-{task}-v2").alpha for task in ("umaze", "medium-play", "large-diverse")] == \
        [2.5, 7.5, 20.0]
    assert da.Args(env_id="antmaze-large-play-v2", alpha=1.0).alpha == 1.0
