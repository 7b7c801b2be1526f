"""divo_antmaze.py: the AntMaze data path (D4RL's layout, rewards, scores, load_task), the evaluation loop on the
D4RL AntMaze env, and end-to-end runs. The env itself: test_antmaze_env.py."""

import glob
import json
import os
import tempfile

import numpy as np
import pytest
import torch

import divo_antmaze as da
import divo_utils.envs
from conftest import FakeEnv, only_run, refused, run_main, run_script, write_d4rl_file
from divo_utils import InputError
from divo_utils.data import d4rl_score, dataset_summary, load_d4rl_file, load_task
from divo_utils.envs import D4RLAntMaze, antmaze_horizon
from divo_utils.runs import load_checkpoint


def make_env(maze):
    return D4RLAntMaze(maze, antmaze_horizon(maze), True)


# ---------------------------------------------------------------------------------------------- data
def antmaze_file(path, goal_rewards=True, seed=0):
    """A small file in D4RL's AntMaze layout: no next_observations, 1000-step episodes cut by timeouts,
    terminals on goal states inside continuing trajectories."""
    rng = np.random.default_rng(seed)
    rewards = (rng.random(300) < 0.05).astype(np.float32) if goal_rewards else np.zeros(300, np.float32)
    return write_d4rl_file(path, obs_dim=29, act_dim=8, episode_lengths=(100, 100, 100), terminal_episodes=(),
                           next_observations=False, rewards=rewards, terminals=rewards.astype(bool),
                           **{"infos/goal": rng.uniform(0, 9, (300, 2))})


def test_antmaze_layout_loads_with_qlearning_semantics(tmp_path):
    data = antmaze_file(tmp_path / "am.hdf5")
    raw = load_d4rl_file(str(tmp_path / "am.hdf5"), 29, 8)
    q = da.qlearning_dataset(raw)
    assert len(q["rewards"]) == 297  # last row and the timeouts at rows 99 and 199 dropped
    assert q["terminals"].sum() == data["terminals"][:-1][~data["timeouts"][:-1]].sum()  # terminals as stored
    text = dataset_summary("am.hdf5", raw, q, "antmaze")
    assert "episodes   3 (split by timeouts" in text and f"{int(data['rewards'].sum())} rows (" in text


def test_reward_transform():
    r = np.array([0.0, 1.0, 0.0], dtype=np.float32)
    assert da.transform_rewards(r, "minus-one").tolist() == [-1.0, 0.0, -1.0]
    assert da.transform_rewards(r, "none").tolist() == [0.0, 1.0, 0.0]


def test_scores_are_success_rates():
    assert d4rl_score(np.array([1.0, 0.0, 1.0, 1.0]), da.REF_SCORES).mean() == 75.0


@pytest.mark.parametrize("env_id, maze, horizon", [("antmaze-umaze-diverse-v2", "umaze", 700),
                                                   ("antmaze-large-play-v2", "large", 1000)])
def test_load_task_checks_the_goal_rewards_before_it_builds_the_mazes(tmp_path, monkeypatch, env_id, maze, horizon):
    """load_task: the AntMaze file's rows and sizes, one D4RL maze per evaluation episode with the maze's horizon and
    --legacy-inertia, the success-rate score; a file without goal rewards is refused before any maze is built."""
    built = []

    def fake_maze(*args):
        built.append(args)
        return object()

    monkeypatch.setattr(divo_utils.envs, "D4RLAntMaze", fake_maze)
    data = antmaze_file(tmp_path / "am.hdf5")
    args = da.Args(env_id=env_id, dataset_path=str(tmp_path / "am.hdf5"), eval_episodes=3, legacy_inertia=False,
                   cuda=False)
    task = load_task(args.env_id, args.dataset_path, args.eval_episodes, args.legacy_inertia, da.REF_SCORES)
    assert (task.obs_dim, task.act_dim, task.domain, task.horizon) == (29, 8, "antmaze", horizon)
    assert built == [(maze, horizon, False)] * 3 and len(task.envs) == 3
    assert task.path == str(tmp_path / "am.hdf5") and task.metric == "normalized_score" and task.minari is None
    assert np.array_equal(task.rows["rewards"], data["rewards"]) and np.array_equal(task.rows["timeouts"], data["timeouts"])
    assert task.score(np.array([1.0, 0.0])).tolist() == [100.0, 0.0]
    built.clear()
    antmaze_file(tmp_path / "flat.hdf5", goal_rewards=False)
    flat = da.Args(env_id=env_id, dataset_path=str(tmp_path / "flat.hdf5"), eval_episodes=3, cuda=False)
    with pytest.raises(InputError, match="flat.hdf5 has no goal rewards"):
        load_task(flat.env_id, flat.dataset_path, flat.eval_episodes, flat.legacy_inertia, da.REF_SCORES)
    assert built == []


@pytest.mark.parametrize("transform, shift", [("minus-one", -1.0), ("none", 0.0)])
def test_the_main_block_learns_from_the_transformed_rewards(tmp_path, monkeypatch, transform, shift):
    """The script's own main block on an AntMaze file: every transition of every batch it trains on carries the file's
    reward, minus 1 with --reward-transform minus-one (IQL's AntMaze convention), as stored with none."""
    data = antmaze_file(tmp_path / "am.hdf5")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(divo_utils.envs, "D4RLAntMaze", lambda *args: FakeEnv(29, 8))
    batches = []

    class Recording(da.DIVO):
        def update(self, batch, actor_step):
            batches.append(batch)
            return super().update(batch, actor_step)

    ns = run_main(da, [*TINY, "--dataset-path", tmp_path / "am.hdf5", "--total-timesteps", 4, "--eval-freq", 0,
                       "--eval-threads", 1, "--reward-transform", transform], monkeypatch, DIVO=Recording)
    kept = np.flatnonzero(~data["timeouts"][:-1])  # the transitions' rows (D4RL's qlearning_dataset)
    assert np.array_equal(ns["transitions"]["rewards"], data["rewards"][kept] + shift)
    actions = np.clip(data["actions"][kept], -1, 1)
    rewards = []
    for _, a, r, _, _ in batches:
        for row in range(len(a)):
            (j,) = np.flatnonzero((actions == a[row].numpy()).all(axis=1))  # its transition, by its action
            assert r[row].item() == data["rewards"][kept[j]] + shift
            rewards.append(r[row].item())
    assert len(batches) == 4 and set(rewards) == {shift, 1.0 + shift}  # goal rows and others were drawn


# ---------------------------------------------------------------------------------------------- evaluation
def test_evaluate_reports_one_success_per_reached_goal():
    """An actor-free check of the episode loop: episodes that reach the goal end with return 1."""
    envs = [make_env("umaze") for _ in range(3)]
    for env in envs:
        env.horizon = 5
    torch.manual_seed(0)
    actor = da.Actor(29, 8, 16, 1)
    returns = da.evaluate(actor, envs, np.zeros(29), np.ones(29), seed=0)
    assert returns.tolist() == [0.0, 0.0, 0.0]  # far from the goal after 5 steps
    envs[1].goal_cell_xy = np.array([-2.0, -2.0])  # max(., 0) puts the goal on the start: reached at once
    returns = da.evaluate(actor, envs, np.zeros(29), np.ones(29), seed=0)
    assert returns.tolist() == [0.0, 1.0, 0.0]
    assert envs[1].t == 1
    for env in envs:
        env.close()


def test_threaded_evaluation_gives_the_same_returns_and_observations():
    envs = [make_env("umaze") for _ in range(5)]
    for env in envs:
        env.horizon = 30
    torch.manual_seed(1)
    actor = da.Actor(29, 8, 16, 1)
    serial = da.evaluate(actor, envs, np.zeros(29), np.ones(29), seed=3, threads=1)
    last = [env.observation() for env in envs]
    threaded = da.evaluate(actor, envs, np.zeros(29), np.ones(29), seed=3, threads=3)
    assert np.array_equal(serial, threaded)
    assert all(np.array_equal(a, env.observation()) for a, env in zip(last, envs))
    assert [env.t for env in envs] == [30] * 5
    for env in envs:
        env.close()


# ---------------------------------------------------------------------------------------------- end to end
TINY = ["--env-id", "antmaze-umaze-v2", "--hidden-dim", "32", "--num-layers", "2", "--batch-size", "64",
        "--eval-episodes", "2", "--log-freq", "10", "--no-cuda"]


def test_training_evaluates_checkpoints_and_resumes_exactly(tmp_path):
    antmaze_file(tmp_path / "am.hdf5")
    proc = run_script("divo_antmaze.py", *TINY, "--dataset-path", tmp_path / "am.hdf5", "--total-timesteps", 20,
                      "--eval-freq", 10, cwd=tmp_path)
    assert "reward     r - 1 (--reward-transform minus-one); alpha 2.5; 2 evaluation episodes of 700 steps" in proc.stdout
    run = only_run(tmp_path)
    scores = json.loads((run / "scores.json").read_text())
    assert len(scores["normalized_scores"]) == 2 and set(scores["normalized_scores"]) <= {0.0, 100.0}
    assert [e["step"] for e in scores["evaluations"]] == [10, 20]
    assert (scores["script"], scores["mode"], scores["task"], scores["step"]) == ("divo_antmaze", "divo", "am", 20)
    assert json.loads((run / "args.json").read_text())["script"] == "divo_antmaze"
    checkpoint = load_checkpoint(str(run / "checkpoint.pt"), "divo_antmaze")
    assert checkpoint["step"] == 20 and checkpoint["args"]["alpha"] == 2.5 and checkpoint["args"]["gamma"] == 0.995
    assert checkpoint["kind"] == "divo_antmaze" and checkpoint["obs_dim"] == 29 and checkpoint["act_dim"] == 8
    proc = run_script("divo_antmaze.py", "--resume", run / "checkpoint.pt", "--total-timesteps", 30, "--no-cuda", cwd=tmp_path)
    assert "at step 20" in proc.stdout and "step 30/30" in proc.stdout and "step 10/30" not in proc.stdout
    resumed = load_checkpoint(str(run / "checkpoint.pt"), "divo_antmaze")
    assert resumed["step"] == 30
    assert not glob.glob(os.path.join(tempfile.gettempdir(), "d4rl_antmaze_*"))
    # the same 30 steps in one go: the resumed run continued exactly where it stopped
    straight_dir = tmp_path / "straight"
    straight_dir.mkdir()
    run_script("divo_antmaze.py", *TINY, "--dataset-path", tmp_path / "am.hdf5", "--total-timesteps", 30,
               "--eval-freq", 10, cwd=straight_dir)
    straight = load_checkpoint(str(only_run(straight_dir) / "checkpoint.pt"), "divo_antmaze")
    for name, state in straight["agent"].items():
        if name.endswith("optimizer"):
            continue
        for key, value in state.items():
            assert torch.equal(value, resumed["agent"][name][key]), f"{name}.{key} differs from the uninterrupted run"
    assert resumed["evaluations"] == straight["evaluations"] and [e["step"] for e in straight["evaluations"]] == [10, 20, 30]
    resumed_scores = json.loads((run / "scores.json").read_text())
    straight_scores = json.loads((only_run(straight_dir) / "scores.json").read_text())
    assert resumed_scores["normalized_scores"] == straight_scores["normalized_scores"]
    assert resumed_scores["evaluations"] == straight_scores["evaluations"]


def test_bad_antmaze_inputs(tmp_path):
    antmaze_file(tmp_path / "flat.hdf5", goal_rewards=False)
    proc = run_script("divo_antmaze.py", *TINY, "--dataset-path", tmp_path / "flat.hdf5", cwd=tmp_path, check=False)
    assert refused(proc, "has no goal rewards"), proc.stderr
    write_d4rl_file(tmp_path / "hopper.hdf5")
    proc = run_script("divo_antmaze.py", *TINY, "--dataset-path", tmp_path / "hopper.hdf5", cwd=tmp_path, check=False)
    assert refused(proc, "'observations' has shape (95, 11), expected (95, 29)"), proc.stderr
    proc = run_script("divo_antmaze.py", "--env-id", "antmaze-medium-v2", cwd=tmp_path, check=False)
    assert refused(proc, "unknown --env-id 'antmaze-medium-v2'"), proc.stderr
    assert not (tmp_path / "runs").exists()
