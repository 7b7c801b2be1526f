"""The data path end to end, in each script: D4RL's qlearning_dataset on a hand-made file (a timeout, a terminal, a
last row), states normalised with one set of statistics in training (s and s') and in evaluation, not_done from
terminals and not from timeouts; and the normalised score against D4RL's published reference returns, typed in here
from D4RL's own table (d4rl/infos.py, REF_MIN_SCORE / REF_MAX_SCORE), for every task id."""

import json
import os

import numpy as np
import pytest
import torch

import divo_antmaze as da
import divo_continuous as dc
import pad_pretrain as pp
from conftest import FakeEnv, only_run, write_d4rl_file
from divo_utils import ANTMAZE_IDS, DIVO_FILES, LOCOMOTION_IDS, PAD_FILES, InputError, maze_of, robot_of
from divo_utils import data as dd
from divo_utils import envs as de
from divo_utils.args import check_env_id
from divo_utils.data import d4rl_score, load_d4rl_file
from divo_utils.runs import load_checkpoint
from test_wiring import ROWS, hand_file, traced_main

# D4RL's reference returns (random, expert), from d4rl/infos.py; the same for every dataset of a robot.
D4RL_REFERENCE = {"halfcheetah": (-280.178953, 12135.0), "hopper": (-20.272305, 3234.3),
                  "walker2d": (1.629008, 4592.3), "antmaze": (0.0, 1.0)}
KEPT = [i for i in range(ROWS - 1) if i != 3]  # hand_file's rows that start a transition: not the timeout (3), not the last


def hand_statistics(data):
    """The normalisation a reader expects: mean and std (+ 1e-3) of the transitions' states, in float64."""
    obs = data["observations"][KEPT].astype(np.float64)
    return obs.mean(axis=0), obs.std(axis=0) + 1e-3


@pytest.mark.parametrize("m", [dc, da, pp], ids=["continuous", "antmaze", "pad_pretrain"])
def test_file_to_batch(m, tmp_path, monkeypatch):
    """qlearning_dataset -> to_device -> sample_batch on hand_file: the transitions of KEPT, next state = next row
    (normalised with the same statistics as the state), not_done = 1 - terminal, rewards as stored."""
    data = hand_file(tmp_path / "hand.hdf5", 11, 3)
    raw = load_d4rl_file(str(tmp_path / "hand.hdf5"), 11, 3)
    transitions = m.qlearning_dataset(raw)
    mean, std = hand_statistics(data)
    device_data = m.to_device(transitions, np.arange(len(KEPT)), mean, std, torch.device("cpu"))
    rows, next_rows = np.array(KEPT), np.array(KEPT) + 1
    expected = {
        "observations": (data["observations"][rows] - mean) / std,
        "next_observations": (data["observations"][next_rows] - mean) / std,
        "actions": data["actions"][rows],
        "rewards": data["rewards"][rows],
        "not_done": 1.0 - data["terminals"][rows],
    }
    assert expected["not_done"].tolist() == [1] * 6 + [0] + [1] * 15  # row 7's terminal; row 3's timeout is gone
    for key, value in expected.items():
        np.testing.assert_allclose(device_data[key].numpy(), value, rtol=1e-5, atol=1e-5, err_msg=key)
    torch.manual_seed(0)
    idx = torch.randint(len(KEPT), (64,))
    torch.manual_seed(0)
    s, a, r, s_next, not_done = m.sample_batch(device_data, 64)
    for got, key in zip((s, a, r, s_next, not_done), ("observations", "actions", "rewards", "next_observations",
                                                      "not_done")):
        assert torch.equal(got, device_data[key][idx]), key


@pytest.mark.parametrize("m", [dc, da, pp], ids=["continuous", "antmaze", "pad_pretrain"])
def test_the_main_block_trains_on_the_transitions_it_should(m, tmp_path, monkeypatch):
    """The script's own main block on hand_file: every row of every batch it trains on is one of the transitions
    of KEPT (each of them drawn), with the state and the next state normalised by the transitions' mean and std,
    the action clipped to [-1, 1], the reward as stored (r - 1 for AntMaze), not_done from the terminal."""
    trace = traced_main(m, tmp_path, monkeypatch, "--total-timesteps", 6)
    data, ns = trace["data"], trace["namespace"]
    mean, std = hand_statistics(data)
    np.testing.assert_allclose(ns["obs_mean"], mean, rtol=1e-5)
    np.testing.assert_allclose(ns["obs_std"], std, rtol=1e-5)
    np.testing.assert_allclose(ns["run"].info["obs_mean"].numpy(), mean, rtol=1e-5)  # what checkpoints keep
    kind = m.__name__
    files = PAD_FILES if m is pp else DIVO_FILES
    checkpoint = load_checkpoint(str(only_run(tmp_path) / files[0]), kind)  # and the one written
    np.testing.assert_allclose(checkpoint["obs_mean"].numpy(), mean, rtol=1e-5)
    np.testing.assert_allclose(checkpoint["obs_std"].numpy(), std, rtol=1e-5)
    actions = np.clip(data["actions"][KEPT], -1, 1)
    drawn = set()
    for s, a, r, s_next, not_done in trace["batches"]:
        for row in range(len(a)):
            (j,) = np.flatnonzero((actions == a[row].numpy()).all(axis=1))  # its transition, by its action
            i = KEPT[j]
            drawn.add(i)
            np.testing.assert_allclose(s[row].numpy(), (data["observations"][i] - mean) / std, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(s_next[row].numpy(), (data["observations"][i + 1] - mean) / std, rtol=1e-4,
                                       atol=1e-4)
            assert r[row].item() == pytest.approx(data["rewards"][i] - (1.0 if m is da else 0.0))
            assert not_done[row].item() == (0.0 if i == 7 else 1.0)
    assert sorted(drawn) == KEPT and len(trace["batches"]) == 6


@pytest.mark.parametrize("m", [dc, da], ids=["continuous", "antmaze"])
def test_the_main_block_evaluates_on_the_training_statistics(m, tmp_path, monkeypatch):
    """The final evaluation of the script's own main block feeds the actor each observation normalised with the
    training data's mean and std (by hand), and scores the returns with D4RL's reference returns."""
    trace = traced_main(m, tmp_path, monkeypatch, "--total-timesteps", 4)
    ns = trace["namespace"]
    mean, std = hand_statistics(trace["data"])
    actor = ns["agent"].actor
    pairs = [pair for env in trace["envs"] for pair in env.seen]
    assert len(pairs) == 8  # 2 episodes of 4 steps
    with torch.no_grad():
        for obs, action in pairs:
            expected = actor(torch.as_tensor((obs - mean) / std, dtype=torch.float32)[None])[0]
            np.testing.assert_allclose(action, expected.numpy(), rtol=1e-4, atol=1e-5)
            unnormalised = actor(torch.as_tensor(obs, dtype=torch.float32)[None])[0]
            assert np.abs(action - unnormalised.numpy()).max() > 1e-3  # the check can tell the two apart
    scores = json.loads(next((tmp_path / "runs").iterdir()).joinpath("scores.json").read_text())
    low, high = D4RL_REFERENCE["antmaze" if m is da else "walker2d"]
    returns = np.array([sum(action[0] for _, action in env.seen) for env in trace["envs"]])
    np.testing.assert_allclose(scores["returns"], returns, rtol=1e-6)
    np.testing.assert_allclose(scores["normalized_scores"], 100 * (returns - low) / (high - low), rtol=1e-6)


class RecordingActor(torch.nn.Module):
    """A linear policy that records every batch of states it is fed."""

    def __init__(self, obs_dim, act_dim):
        super().__init__()
        self.linear, self.fed = torch.nn.Linear(obs_dim, act_dim), []

    def forward(self, s):
        self.fed.append(s.clone())
        return torch.tanh(self.linear(s))


@pytest.mark.parametrize("m", [dc, da], ids=["continuous", "antmaze"])
def test_evaluate_normalises_every_observation(m):
    envs = [FakeEnv(6, 2, length=3), FakeEnv(6, 2, length=3)]
    actor = RecordingActor(6, 2)
    mean, std = np.linspace(4, 6, 6), np.linspace(2, 4, 6)
    kwargs = {"threads": 2} if m is da else {}
    returns = m.evaluate(actor, envs, mean, std, seed=3, **kwargs)
    fed = torch.cat(actor.fed).numpy()
    shown = np.stack([obs for env in envs for obs, _ in env.seen])
    assert len(fed) == len(shown) == 6
    expected = (shown - mean) / std
    order = lambda x: x[np.lexsort(x.T)]  # noqa: E731  the envs are stepped side by side: compare as sets of rows
    np.testing.assert_allclose(order(fed), order(expected), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(returns, [sum(a[0] for _, a in env.seen) for env in envs], rtol=1e-6)


def test_locomotion_scores_against_d4rl_reference_returns():
    assert len(LOCOMOTION_IDS) == 18
    for env_id in LOCOMOTION_IDS:
        robot = robot_of(env_id)
        low, high = D4RL_REFERENCE[env_id.split("-")[0]]
        returns = np.array([low, high, 1234.5, -50.0])
        np.testing.assert_allclose(d4rl_score(returns, dc.REF_SCORES[robot]), 100 * (returns - low) / (high - low),
                                   rtol=1e-12, err_msg=env_id)
        np.testing.assert_allclose(d4rl_score([low, high], dc.REF_SCORES[robot]), [0.0, 100.0], atol=1e-9)


def test_antmaze_scores_against_d4rl_reference_returns():
    low, high = D4RL_REFERENCE["antmaze"]
    assert len(ANTMAZE_IDS) == 6
    assert all(maze_of(env_id) in ("umaze", "medium", "large") for env_id in ANTMAZE_IDS)
    returns = np.array([1.0, 0.0, 1.0, 1.0])
    np.testing.assert_allclose(d4rl_score(returns, da.REF_SCORES), 100 * (returns - low) / (high - low))
    assert d4rl_score(returns, da.REF_SCORES).mean() == 75.0


# ---------------------------------------------------------------------------------------------- ids, files, env
def test_env_ids_and_urls(monkeypatch, tmp_path):
    assert len(LOCOMOTION_IDS) == 18
    assert dd.dataset_url("halfcheetah-medium-expert-v2").endswith("gym_mujoco_v2/halfcheetah_medium_expert-v2.hdf5")
    assert dd.dataset_url("walker2d-full-replay-v2").endswith("/walker2d_full_replay-v2.hdf5")
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    assert dd.default_dataset_path("hopper-medium-v2") == str(tmp_path / "hopper_medium-v2.hdf5")
    locomotion = ("locomotion",), {"antmaze": "divo_antmaze.py"}  # as divo_continuous.py checks its ids
    assert check_env_id("walker2d-medium-replay-v2", *locomotion) == "locomotion"
    assert robot_of("walker2d-medium-replay-v2") == "walker2d"
    with pytest.raises(InputError, match="did you mean hopper-medium-v2"):
        check_env_id("hopper-meduim-v2", *locomotion)
    with pytest.raises(InputError, match="is an AntMaze dataset: run divo_antmaze.py --env-id antmaze-umaze-v2"):
        check_env_id("antmaze-umaze-v2", *locomotion)
    with pytest.raises(InputError, match="did you mean hopper-medium-v2"):  # the script's Args makes the same check
        dc.Args(env_id="hopper-meduim-v2")


# ---------------------------------------------------------------------------------------------- env
@pytest.mark.parametrize("robot, legacy, patched", [("hopper", 15.820, 15.265), ("walker2d", 23.677, 22.698)])
def test_legacy_inertia_restores_d4rl_masses(robot, legacy, patched):
    assert de.make_eval_env(robot, legacy_inertia=False).unwrapped.model.body_mass.sum() == pytest.approx(legacy, abs=1e-3)
    env = de.make_eval_env(robot, legacy_inertia=True)
    assert env.unwrapped.model.body_mass.sum() == pytest.approx(patched, abs=1e-3)
    env.reset(seed=0)
    obs, *_ = env.step(env.action_space.sample())
    assert np.isfinite(obs).all()


def test_evaluate_runs_episodes_side_by_side_and_is_deterministic():
    envs = [de.make_eval_env("hopper", True) for _ in range(3)]
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
    with pytest.raises(InputError, match=message):
        dd.load_d4rl_file(str(path), obs_dim=11, act_dim=3)


def test_rewards_of_the_wrong_width_are_refused_not_truncated(tmp_path):
    path = tmp_path / "wide.hdf5"
    write_d4rl_file(path, rewards=np.ones((95, 2), np.float32))
    with pytest.raises(InputError, match="'rewards' has shape \\(95, 2\\), expected \\(95,\\)"):
        dd.load_d4rl_file(str(path), 11, 3)
