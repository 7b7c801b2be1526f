"""The wiring of one DIVO iteration and of the training loop, in both DIVO scripts: the target that ADPO picks is
the one the actor's BC term pulls toward (a_bar recorded, the actor's gradient against a hand computation), lambda
of eq. (13) is a constant of that gradient, the order critic -> value -> PAD -> ADPO -> actor with each step fed
what the previous one returned, the delay of the actor and the targets in the script's own loop, and diagnostics
that leave training's random numbers alone (divo_utils.diagnostics, fed each script's agent and eq. 12)."""

import copy

import numpy as np
import pytest
import torch

import divo_antmaze as da
import divo_utils.envs
import pad_pretrain as pp
from conftest import FakeEnv, run_main, tiny_data, write_d4rl_file
from divo_utils import diagnostics as dg
from divo_utils.diagnostics import Diagnostics
from divo_utils.runs import networks
from test_algorithm import DIVO_SCRIPTS, batch, small_agent


@DIVO_SCRIPTS
def test_the_actor_imitates_the_target_adpo_picks(m, monkeypatch):
    """One actor iteration: eq. (12)'s inputs are the dataset action and the advantage under the target critics
    and V before its step; update_actor receives exactly the target it returned; the gradient of the actor's loss
    with respect to pi(s) is -lambda dQ_1/dpi / B + 2 (pi - a_bar) / (B A), with lambda = alpha / mean |Q_1|
    held constant, and the actor's parameters get exactly that gradient. a_bar differs from the dataset action at
    some states, so imitating the data instead (TD3+BC) would fail here."""
    agent = small_agent(m, num_candidates=2, alpha=2.5)
    s, a, r, s2, not_done = batch(n=64)
    B, A = a.shape
    value, critic_t = copy.deepcopy(agent.value), copy.deepcopy(agent.critic_target)  # as the iteration finds them
    seen = {}
    real_adpo_target = m.adpo_target

    def recording_adpo_target(*args):
        seen["contest"], seen["picked"] = args, real_adpo_target(*args)
        return seen["picked"]

    monkeypatch.setattr(m, "adpo_target", recording_adpo_target)
    update_actor = agent.update_actor

    def recording_update_actor(s_, a_bar):
        seen.update(s=s_, a_bar=a_bar, actor=copy.deepcopy(agent.actor), critic=copy.deepcopy(agent.critic))

        def grad_of_pi(module, inputs, pi):
            pi.register_hook(lambda grad: seen.setdefault("dpi", grad))

        hook = agent.actor.register_forward_hook(grad_of_pi)
        try:
            return update_actor(s_, a_bar)
        finally:
            hook.remove()

    agent.update_actor = recording_update_actor
    agent.actor_optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.update(grads=[p.grad.clone() for p in agent.actor.parameters()]))
    agent.update((s, a, r, s2, not_done), actor_step=True)

    a_in, adv_in, candidates, cand_adv = seen["contest"]
    assert torch.equal(a_in, a)
    with torch.no_grad():
        torch.testing.assert_close(adv_in, critic_t(s, a).min(dim=0).values - value(s))
    target, generated, _ = seen["picked"]
    assert torch.equal(seen["s"], s) and torch.equal(seen["a_bar"], target)
    assert 0 < generated.sum() < B and not torch.equal(target, a)

    pi = seen["actor"](s)
    q1 = seen["critic"](s, pi)[0]
    lmbda = 2.5 / q1.abs().mean().detach()
    (dq1,) = torch.autograd.grad(q1.sum(), pi, retain_graph=True)
    by_hand = -lmbda * dq1 / B + 2 * (pi - target) / (B * A)
    torch.testing.assert_close(seen["dpi"], by_hand.detach())
    imitating_data = -lmbda * dq1 / B + 2 * (pi - a) / (B * A)
    assert (seen["dpi"] - imitating_data).abs().max() > 1e-4

    loss = -lmbda * q1.mean() + ((pi - target) ** 2).mean()
    expected = torch.autograd.grad(loss, list(seen["actor"].parameters()), retain_graph=True)
    for got, want in zip(seen["grads"], expected):
        torch.testing.assert_close(got, want)
    # lambda as a function of pi (not detached) gives another gradient: the test can tell them apart
    moving_lambda = -(2.5 / q1.abs().mean()) * q1.mean() + ((pi - target) ** 2).mean()
    other = torch.autograd.grad(moving_lambda, list(seen["actor"].parameters()))
    assert max((g - o).abs().max() for g, o in zip(seen["grads"], other)) > 1e-4


def record_calls(m, agent, monkeypatch) -> list:
    """Record, in order, each step of the iteration that is called, with its arguments and what it returned."""
    calls = []

    def wrap(name, fn):
        def recorded(*args):
            out = fn(*args)
            calls.append((name, args, out))
            return out
        return recorded

    for name in ("update_critic", "update_value", "update_pad", "adpo_candidates", "update_actor"):
        if hasattr(agent, name):
            setattr(agent, name, wrap(name, getattr(agent, name)))
    monkeypatch.setattr(m, "adpo_target", wrap("adpo_target", m.adpo_target))
    return calls


def same(got: tuple, expected: tuple) -> bool:
    """Argument lists that hold the same tensors (equal values)."""
    return len(got) == len(expected) and all(torch.equal(x, y) for x, y in zip(got, expected))


ITERATION = ["update_critic", "update_value", "update_pad"]
ACTOR = ["adpo_candidates", "adpo_target", "update_actor"]


@DIVO_SCRIPTS
@pytest.mark.parametrize("mode, without_actor, with_actor", [
    ({}, ITERATION, ITERATION + ACTOR),
    ({"freeze_pad": True}, ["update_critic", "update_value"], ["update_critic", "update_value"] + ACTOR),
    ({"adpo": False}, ["update_critic"], ["update_critic", "update_actor"]),
], ids=["divo", "freeze-pad", "no-adpo"])
def test_one_iteration_runs_critic_value_pad_then_adpo_and_actor(m, mode, without_actor, with_actor, monkeypatch):
    """The order of the spec (critic -> value -> PAD -> every policy_freq-th iteration: ADPO, actor and targets),
    each step fed what the previous ones returned: PAD weighs by the value step's advantage, ADPO scores against
    its V and twin target values, the actor imitates ADPO's target."""
    agent = small_agent(m, **mode)
    calls = record_calls(m, agent, monkeypatch)
    s, a, r, s2, not_done = batch()
    agent.update((s, a, r, s2, not_done), actor_step=False)
    assert [name for name, *_ in calls] == without_actor
    calls.clear()
    agent.update((s, a, r, s2, not_done), actor_step=True)
    assert [name for name, *_ in calls] == with_actor
    by_name = {name: (args, out) for name, args, out in calls}
    assert same(by_name["update_critic"][0], (s, a, r, s2, not_done))
    if not agent.args.adpo:
        assert same(by_name["update_actor"][0], (s, a))
        return
    (adv, v, _) = by_name["update_value"][1]
    assert same(by_name["update_value"][0], (s, a))
    if "update_pad" in by_name:
        assert same(by_name["update_pad"][0], (s, a, adv))
    assert same(by_name["adpo_candidates"][0], (s, v))
    assert same(by_name["adpo_target"][0], (a, adv, *by_name["adpo_candidates"][1]))
    assert same(by_name["update_actor"][0], (s, by_name["adpo_target"][1][0]))


ROWS = 24  # 22 transitions: the scripts refuse fewer than 20


def hand_file(path, obs_dim, act_dim, goal=False):
    """24 rows far from normalised (mean 5, std 3): a timeout at row 3, a terminal at row 7, and a last row that is
    neither; some actions outside [-1, 1]. AntMaze-like (`goal`): rewards 0 / 1, 1 at the terminal row."""
    rng = np.random.default_rng(7)
    rewards = np.zeros(ROWS, np.float32) if goal else rng.normal(1.0, 0.5, ROWS).astype(np.float32)
    rewards[7] = 1.0 if goal else rewards[7]
    terminals, timeouts = np.zeros(ROWS, bool), np.zeros(ROWS, bool)
    terminals[7], timeouts[3] = True, True
    observations = (5 + 3 * rng.standard_normal((ROWS, obs_dim))).astype(np.float32)
    actions = rng.uniform(-1.2, 1.2, (ROWS, act_dim)).astype(np.float32)
    return write_d4rl_file(path, obs_dim=obs_dim, act_dim=act_dim, episode_lengths=(ROWS,), terminal_episodes=(),
                           next_observations=False, observations=observations, actions=actions, rewards=rewards,
                           terminals=terminals, timeouts=timeouts)


def traced_main(m, tmp_path, monkeypatch, *extra):
    """The script's main block, run on hand_file's data with tiny networks and a fake env (2 episodes of 4 steps);
    the batches of every iteration, the actor_step flags, and the block's variables. divo_utils.data.load_task builds
    the envs with what divo_utils.envs holds when it is called: the fake goes there."""
    monkeypatch.chdir(tmp_path)
    if m is pp:
        obs_dim, act_dim, argv = 11, 3, ["--env-id", "hopper-medium-v2", "--holdout", 0, "--diag-freq", 0]
    elif m is da:
        obs_dim, act_dim, argv = 29, 8, ["--env-id", "antmaze-umaze-v2", "--eval-threads", "1"]
    else:
        obs_dim, act_dim, argv = 17, 6, ["--env-id", "walker2d-medium-v2"]
    data = hand_file(tmp_path / "hand.hdf5", obs_dim, act_dim, goal=m is da)
    argv += ["--dataset-path", tmp_path / "hand.hdf5", "--hidden-dim", 16, "--num-layers", 1, "--batch-size", 64,
             "--no-cuda", *extra]
    trace = {"batches": [], "flags": []}
    if m is pp:
        class Recording(pp.PADPretrainer):
            def update(self, batch):
                trace["batches"].append(batch)
                return super().update(batch)

        names = {"PADPretrainer": Recording, "plot_samples": lambda *args, **kwargs: None}
    else:
        class Recording(m.DIVO):
            def update(self, batch, actor_step):
                trace["batches"].append(batch)
                trace["flags"].append(actor_step)
                return super().update(batch, actor_step)

        envs = []

        def fake_env(*args):
            envs.append(FakeEnv(obs_dim, act_dim))
            return envs[-1]

        monkeypatch.setattr(divo_utils.envs, "D4RLAntMaze" if m is da else "make_eval_env", fake_env)
        names = {"DIVO": Recording}
        trace["envs"] = envs
        argv += ["--eval-episodes", 2, "--eval-freq", 0, "--legacy-inertia" if m is da else "--no-legacy-inertia"]
    trace["namespace"] = run_main(m, argv, monkeypatch, **names)
    trace["data"] = data
    return trace


def optimizer_steps(optimizer) -> set:
    return {int(state["step"]) for state in optimizer.state.values()}


@DIVO_SCRIPTS
def test_the_training_loop_steps_the_actor_every_policy_freq_iterations(m, tmp_path, monkeypatch):
    """The script's own loop, --policy-freq 3, 7 iterations: actor steps (with the targets' Polyak update) at
    iterations 0, 3, 6 and nowhere else, read from the flags it passes and from the optimisers' step counts."""
    trace = traced_main(m, tmp_path, monkeypatch, "--policy-freq", 3, "--total-timesteps", 7)
    assert trace["flags"] == [True, False, False, True, False, False, True]
    assert [len(env.seen) for env in trace["envs"]] == [4, 4]  # the final evaluation ran in the fake envs
    agent = trace["namespace"]["agent"]
    assert optimizer_steps(agent.actor_optimizer) == {3}
    assert optimizer_steps(agent.critic_optimizer) == optimizer_steps(agent.value_optimizer) == {7}
    assert optimizer_steps(agent.diffusion_optimizer) == {7}


@DIVO_SCRIPTS
def test_diagnostics_leave_training_unchanged(m):
    """The loop logs ADPO's contest and PAD's sample quality between iterations: training must go on exactly as
    without them (same weights, same random stream), since they draw samples of their own."""
    data, heldout = tiny_data(), tiny_data(n=40, seed=1)
    runs = []
    for diagnose in (False, True):
        agent = small_agent(m)
        diagnostics = Diagnostics(data, heldout, 0)
        torch.manual_seed(1)
        for step in range(4):
            agent.update(m.sample_batch(data, 32), actor_step=step % 2 == 0)
            if diagnose:
                diagnostics.contest(agent)
                diagnostics.sample_quality(agent)
        runs.append(({name: net.state_dict() for name, net in networks(agent).items()}, torch.get_rng_state()))
    (weights, rng), (weights_diagnosed, rng_diagnosed) = runs
    assert torch.equal(rng, rng_diagnosed)
    for name, state in weights.items():
        assert all(torch.equal(value, weights_diagnosed[name][key]) for key, value in state.items()), name


def test_pretraining_diagnostics_leave_training_unchanged():
    pretrainer = pp.PADPretrainer(5, 3, pp.Args(hidden_dim=16, num_layers=1), torch.device("cpu"))
    s, a = torch.randn(40, 5), torch.rand(40, 3) * 2 - 1
    torch.manual_seed(1)
    before = torch.get_rng_state()
    row = dg.diagnose(pretrainer, {"model": pretrainer.diffusion}, s, a, bandwidth=1.0)
    assert np.isfinite(row["model_wasserstein"]) and torch.equal(torch.get_rng_state(), before)
