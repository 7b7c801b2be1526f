"""Minari datasets: ids, episodes as transitions, the dataset's own evaluation env and score, the three scripts run on
small datasets built here with Minari's own tools, the missing-dataset error, and tools/ on Minari ids."""

import json
import tempfile
import os
import shutil

import gymnasium as gym
import gymnasium_robotics
import minari
import numpy as np
import pytest
from minari.data_collector import EpisodeBuffer

import divo_antmaze as da
import divo_continuous as dc
import pad_pretrain as pp
from conftest import ROOT, only_run, run_script
from divo_utils import InputError, data, envs
from divo_utils import maze_of, robot_of
from divo_utils.args import check_env_id
from divo_utils.runs import load_checkpoint

gym.register_envs(gymnasium_robotics)
TINY = ["--hidden-dim", "16", "--num-layers", "1", "--batch-size", "32", "--eval-episodes", "1", "--log-freq", "2",
        "--no-cuda"]
HOPPER, HOPPER_RAW, ANTMAZE = "test/hopper/random-v0", "test/hopper/unscored-v0", "D4RL/antmaze/umaze-v1"


def episode(observations, actions, rewards, terminations, truncations) -> EpisodeBuffer:
    """One episode as Minari stores it: T + 1 observations (the final one included), T of everything else."""
    return EpisodeBuffer(observations=observations, actions=np.asarray(actions, dtype=np.float32), rewards=rewards,
                         terminations=terminations, truncations=truncations)


def rollout(env: gym.Env, seed: int, options=None) -> EpisodeBuffer:
    """An episode of random actions, recorded as Minari's DataCollector records one (without its jax dependency)."""
    obs, _ = env.reset(seed=seed, options=options)
    observations, actions, rewards, terminations, truncations = [obs], [], [], [], []
    while not terminations or not (terminations[-1] or truncations[-1]):
        actions.append(env.action_space.sample())
        obs, reward, terminated, truncated, _ = env.step(actions[-1])
        for values, value in zip((observations, rewards, terminations, truncations), (obs, reward, terminated, truncated)):
            values.append(value)
    if isinstance(obs, dict):  # Minari stores a Dict space's observations as one array per key
        return episode({key: np.stack([o[key] for o in observations]) for key in obs}, actions, rewards, terminations,
                       truncations)
    return episode(np.stack(observations), actions, rewards, terminations, truncations)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A Minari store with a Hopper-v5 dataset (reference returns given), the same without them, and an AntMaze
    dataset recorded like Minari's D4RL/antmaze ones (AntMaze_UMaze-v4, continuing task, the goal never reset)."""
    path = tmp_path_factory.mktemp("minari_store")
    saved = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(path)
    about = dict(algorithm_name="random", author="tests", author_email="tests@example.org", code_permalink="tests",
                 description="random actions")
    hopper = gym.make("Hopper-v5", max_episode_steps=40)
    hopper.action_space.seed(0)
    episodes = [rollout(hopper, seed) for seed in range(8)]
    minari.create_dataset_from_buffers(HOPPER, episodes, env=hopper, ref_min_score=-20.0, ref_max_score=3000.0, **about)
    minari.create_dataset_from_buffers(HOPPER_RAW, episodes, env=hopper, **about)
    with envs.private_tempdir("test_antmaze_"):  # gymnasium-robotics leaves an xml file in the temp folder
        maze = gym.make("AntMaze_UMaze-v4", continuing_task=True, reset_target=False, max_episode_steps=20)
        maze.action_space.seed(0)
        # reset in the goal's cell: seeds 6, 10 and 49 start within 0.45 of the goal, so some steps have reward 1
        at_goal = {"goal_cell": np.array([1, 1]), "reset_cell": np.array([1, 1])}
        episodes = [rollout(maze, seed, at_goal) for seed in (6, 10, 49, 1)]
        minari.create_dataset_from_buffers(ANTMAZE, episodes, env=maze, eval_env=maze.spec, **about)
    yield path
    if saved is None:
        del os.environ["MINARI_DATASETS_PATH"]
    else:
        os.environ["MINARI_DATASETS_PATH"] = saved



@pytest.fixture
def in_store(store, monkeypatch):
    """The module's Minari store, for Minari's functions called in this process."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(store))
    return store


# ----------------------------------------------------------------------------------------------
# Ids
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module, env_id, message", [
    (dc, "D4RL/antmaze/umaze-v1", "run divo_antmaze.py --env-id D4RL/antmaze/umaze-v1"),
    (da, "mujoco/hopper/medium-v0", "run divo_continuous.py --env-id mujoco/hopper/medium-v0"),
    (da, "D4RL/antmaze/diverse-v1", "must name its maze first"),
    (dc, "mujoco/hopper/medium", "not a Minari dataset id: write namespace/name-vN"),
    (da, "D4RL/antmaze/medium", "not a Minari dataset id: write namespace/name-vN"),
    (pp, "mujoco/hopper/medium", "not a Minari dataset id: write namespace/name-vN"),
], ids=["continuous-antmaze", "antmaze-locomotion", "antmaze-no-maze", "continuous-bad", "antmaze-bad", "pad-bad"])
def test_each_script_refuses_a_minari_id_it_cannot_take(module, env_id, message):
    """The check of the script's kind, and the script's own arguments, which run it."""
    with pytest.raises(InputError, match=message):
        module.Args(env_id=env_id)


def test_minari_ids_pick_the_script_the_maze_and_the_domain_defaults():
    assert check_env_id("mujoco/hopper/medium-v0", ("locomotion",), {}) == "locomotion"
    assert robot_of("hopper-medium-v2") == "hopper" and maze_of("D4RL/antmaze/large-diverse-v1") == "large"
    assert check_env_id("D4RL/antmaze/umaze-v1", ("locomotion", "antmaze"), {}) == "antmaze"
    assert check_env_id("mujoco/walker2d/expert-v0", ("locomotion", "antmaze"), {}) == "locomotion"
    assert dc.Args(env_id="mujoco/hopper/medium-v0").env_id == "mujoco/hopper/medium-v0"
    assert da.Args(env_id="D4RL/antmaze/large-diverse-v1").alpha == 20.0
    assert da.Args(env_id="D4RL/antmaze/medium-play-v1").alpha == 7.5
    assert pp.Args(env_id="D4RL/antmaze/umaze-v1").gamma == 0.995
    assert pp.Args(env_id="mujoco/hopper/medium-v0").gamma == 0.99
    for module, env_id in ((dc, "mujoco/hopper/medium-v0"), (da, "D4RL/antmaze/umaze-v1"), (pp, "mujoco/hopper/medium-v0")):
        with pytest.raises(InputError, match="--dataset-path reads a D4RL-format file"):
            module.Args(env_id=env_id, dataset_path="x.hdf5")


# ----------------------------------------------------------------------------------------------
# Episodes as transitions, by hand
# ----------------------------------------------------------------------------------------------
def hand_dataset(dataset_id, episodes, obs_space=None, act_space=None):
    """A Minari dataset of the given episodes, with no env (the spaces say what the data are)."""
    obs_space = obs_space or gym.spaces.Box(-np.inf, np.inf, (2,), np.float64)
    act_space = act_space or gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    return minari.create_dataset_from_buffers(dataset_id, episodes, observation_space=obs_space, action_space=act_space,
                                              algorithm_name="hand", author="tests", author_email="tests@example.org",
                                              code_permalink="tests", description="hand-made")


def test_episodes_become_transitions_with_d4rls_semantics_and_the_last_steps(tmp_path, monkeypatch):
    """Episode A terminates after 3 steps, B is truncated after 2. Every step is a transition to its true next state,
    terminal only where Minari's terminations say so: the truncated last step of B is kept, with not_done = 1."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    a_obs, b_obs = np.arange(8.0).reshape(4, 2), 100 + np.arange(6.0).reshape(3, 2)
    dataset = hand_dataset("hand/two-v0", [
        episode(a_obs, [[0.1], [0.2], [0.3]], [1.0, 2.0, 3.0], [False, False, True], [False, False, False]),
        episode(b_obs, [[0.4], [0.5]], [4.0, 5.0], [False, False], [False, True])])
    rows = data.minari_rows(dataset, obs_dim=2, act_dim=1)
    t = dc.qlearning_dataset(rows)  # D4RL's own function makes the transitions
    np.testing.assert_array_equal(t["observations"], np.concatenate([a_obs[:3], b_obs[:2]]))
    np.testing.assert_array_equal(t["next_observations"], np.concatenate([a_obs[1:], b_obs[1:]]))
    np.testing.assert_allclose(t["actions"][:, 0], [0.1, 0.2, 0.3, 0.4, 0.5])
    np.testing.assert_array_equal(t["rewards"], [1.0, 2.0, 3.0, 4.0, 5.0])
    np.testing.assert_array_equal(t["terminals"], [False, False, True, False, False])

    # the D4RL path on the same episodes, stored as D4RL stores them (no final observations): the same transitions but
    # the truncated last step (its successor row would be another episode's), and a terminal step's next state is the
    # next row (masked by not_done = 0); Minari's final observations give both their true next state
    d4rl = {"observations": np.concatenate([a_obs[:3], b_obs[:2]]).astype(np.float32), "actions": t["actions"],
            "rewards": t["rewards"], "terminals": t["terminals"], "timeouts": np.array([0, 0, 0, 0, 1], dtype=bool)}
    t_d4rl = dc.qlearning_dataset(d4rl)
    assert len(t_d4rl["rewards"]) == 4  # the last row dropped
    for key in ("observations", "actions", "rewards", "terminals"):
        np.testing.assert_array_equal(t_d4rl[key], t[key][:4])
    np.testing.assert_array_equal(t_d4rl["next_observations"][2], b_obs[0])
    np.testing.assert_array_equal(t["next_observations"][2], a_obs[3])
    # the same transitions in every script's qlearning_dataset (the PAD checkpoint's data must be DIVO's)
    for module in (da, pp):
        for key, value in module.qlearning_dataset(rows).items():
            np.testing.assert_array_equal(value, t[key], err_msg=f"{module.__name__}: {key}")


@pytest.mark.parametrize("dataset_id, divo", [(HOPPER, dc), (ANTMAZE, da)], ids=["locomotion", "antmaze"])
def test_pretraining_and_divo_load_the_same_rows_of_a_minari_dataset(in_store, tmp_path, monkeypatch, dataset_id, divo):
    """load_task of pad_pretrain.py and of the DIVO script of the dataset's domain: the same rows, sizes and fingerprint
    (a PAD checkpoint is accepted only on the data it was trained on)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the maze's xml files
    pad = data.load_task(dataset_id, None)
    task = data.load_task(dataset_id, None, eval_episodes=1, reference_returns=getattr(divo, "REF_SCORES", None)
                          if divo is da else None)
    try:
        assert pad.fingerprint == task.fingerprint == data.dataset_fingerprint(pad.rows)
        assert (pad.obs_dim, pad.act_dim) == (task.obs_dim, task.act_dim) == data.minari_dims(minari.load_dataset(dataset_id))
        assert pad.envs == [] and len(task.envs) == 1
        for key, value in pad.rows.items():
            np.testing.assert_array_equal(value, task.rows[key], err_msg=key)
    finally:
        task.close()


def test_dict_observations_are_flattened_as_gymnasium_flattens_them(in_store):
    """AntMaze: [achieved_goal (x, y), desired_goal, observation (qpos[2:15], qvel)], D4RL's 29 numbers plus the goal."""
    dataset = minari.load_dataset(ANTMAZE)
    first = next(dataset.iterate_episodes())
    rows = data.flatten_observations(dataset.observation_space, first.observations)
    assert rows.shape == (21, 31) and data.minari_dims(dataset) == (31, 8)
    for t in (0, 7, 20):
        step = {key: value[t] for key, value in first.observations.items()}
        np.testing.assert_array_equal(rows[t], gym.spaces.flatten(dataset.observation_space, step))
    np.testing.assert_array_equal(rows[:, :2], first.observations["achieved_goal"])
    np.testing.assert_array_equal(rows[:, 2:4], first.observations["desired_goal"])


def test_bad_minari_data_is_refused_with_one_message(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    obs = np.zeros((3, 2))
    broken = obs.copy()
    broken[1, 0] = np.nan
    dataset = hand_dataset("hand/nan-v0", [episode(obs, [[0.0]] * 2, [0.0, 0.0], [False, True], [False, False]),
                                           episode(broken, [[0.0]] * 2, [0.0, 0.0], [False, True], [False, False])])
    with pytest.raises(InputError, match=r"1 step\(s\) of 'observations' hold NaN or inf \(first in episode 1\)"):
        data.minari_rows(dataset, 2, 1)
    with pytest.raises(InputError, match="has 2 numbers in its observations, its evaluation env 11"):
        data.minari_rows(dataset, 11, 1)
    discrete = hand_dataset("hand/discrete-v0", [episode(obs, [0, 1], [0.0, 0.0], [False, True], [False, False])],
                            act_space=gym.spaces.Discrete(2))
    with pytest.raises(InputError, match="DIVO needs continuous ones"):
        data.minari_rows(discrete, 2, 1)


def test_a_failed_download_leaves_nothing_behind(tmp_path, monkeypatch):
    """Minari's download fails half-way (a partial folder, then no network): one error line, and the folder is gone."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))

    def half_download(dataset_id):
        os.makedirs(tmp_path / dataset_id / "data")
        (tmp_path / dataset_id / "data" / "metadata.json").write_text("{")
        raise ConnectionError("Name or service not known\nmore detail")

    monkeypatch.setattr(minari, "download_dataset", half_download)
    with pytest.raises(InputError) as error:
        data.load_minari_dataset("mujoco/hopper/medium-v0")
    message = str(error.value)
    assert message.startswith("error: the Minari dataset mujoco/hopper/medium-v0 is not in Minari's local store")
    assert "(ConnectionError: Name or service not known)" in message and "minari download mujoco/hopper/medium-v0" in message
    assert "\n" not in message and not (tmp_path / "mujoco" / "hopper" / "medium-v0").exists()


# ----------------------------------------------------------------------------------------------
# The dataset's own evaluation env and score
# ----------------------------------------------------------------------------------------------
def test_score_uses_the_datasets_reference_returns_or_is_the_return(in_store, capsys):
    metric, score = data.minari_scorer(minari.load_dataset(HOPPER))  # ref_min_score -20, ref_max_score 3000
    assert metric == "normalized_score"
    np.testing.assert_allclose(score(np.array([-20.0, 1490.0, 3000.0])), [0.0, 50.0, 100.0])
    metric, score = data.minari_scorer(minari.load_dataset(HOPPER_RAW))
    assert metric == "return" and "no ref_min_score" in capsys.readouterr().out
    np.testing.assert_array_equal(score(np.array([12.5, -3.0])), [12.5, -3.0])
    fields = data.score_fields(metric, score(np.array([12.5, -3.0])), np.array([12.5, -3.0]))
    assert fields == {"metric": "return", "return_mean": 4.75, "return_std": 7.75, "returns": [12.5, -3.0]}


def test_antmaze_evaluation_ends_at_the_goal_with_reward_1(in_store, tmp_path, monkeypatch):
    """The dataset's maze with continuing_task=False: the return is 1 for a success, as in D4RL; no file left behind."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    (env,) = envs.make_minari_mazes(minari.load_dataset(ANTMAZE), 1)
    obs, _ = env.reset(seed=49, options={"goal_cell": np.array([1, 1]), "reset_cell": np.array([1, 1])})
    assert obs.shape == (31,) and np.linalg.norm(obs[:2] - obs[2:4]) <= 0.45  # starts at the goal
    _, reward, terminated, truncated, _ = env.step(np.zeros(8))
    assert (reward, terminated, truncated) == (1.0, True, False)
    env.close()
    assert os.listdir(tmp_path) == []  # gymnasium-robotics' ant_maze*.xml went with the private folder


# ----------------------------------------------------------------------------------------------
# The scripts, run as a user runs them
# ----------------------------------------------------------------------------------------------
def test_divo_continuous_trains_evaluates_and_resumes_on_a_minari_dataset(store, tmp_path):
    env = {"MINARI_DATASETS_PATH": str(store)}
    proc = run_script("divo_continuous.py", "--env-id", HOPPER, *TINY, "--total-timesteps", 4, "--eval-freq", 2,
                      "--eval-episodes", 2, cwd=tmp_path, env=env)
    dataset_line = next(line for line in proc.stdout.splitlines() if line.startswith("dataset"))
    assert "test/hopper/random-v0 (Minari, " in dataset_line and "8 episodes" in dataset_line
    assert "evaluation in Hopper-v5 (40 steps)" in proc.stdout
    assert "normalised with the dataset's reference returns -20.0 (random) and 3000.0 (expert)" in proc.stdout
    run = only_run(tmp_path)
    assert run.name.startswith("test-hopper-random-v0__divo_continuous__1__")  # folder-safe
    scores = json.loads((run / "scores.json").read_text())
    assert scores["env_id"] == HOPPER and scores["task"] == HOPPER and len(scores["returns"]) == 2
    np.testing.assert_allclose(scores["normalized_scores"], 100 * (np.array(scores["returns"]) + 20.0) / 3020.0)
    checkpoint = load_checkpoint(str(run / "checkpoint.pt"), "divo_continuous")
    assert checkpoint["obs_dim"] == 11 and checkpoint["num_transitions"] == 238  # every step of the 8 episodes

    proc = run_script("divo_continuous.py", "--resume", run / "checkpoint.pt", "--total-timesteps", 6, cwd=tmp_path,
                      env=env)
    assert "resumed" in proc.stdout and "at step 4" in proc.stdout and "step 6/6" in proc.stdout
    resumed = json.loads((run / "scores.json").read_text())
    assert [e["step"] for e in resumed["evaluations"]] == [2, 4, 6]
    assert load_checkpoint(str(run / "checkpoint.pt"), "divo_continuous")["dataset_sha1"] == checkpoint["dataset_sha1"]


def test_divo_antmaze_and_pad_pretrain_on_a_minari_antmaze(store, tmp_path):
    """The recorded maze scores success; the PAD checkpoint of the same dataset is accepted by divo_antmaze.py."""
    env = {"MINARI_DATASETS_PATH": str(store), "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    run_script("pad_pretrain.py", "--env-id", ANTMAZE, "--hidden-dim", "16", "--num-layers", "1", "--batch-size", "32",
               "--total-timesteps", 2, "--holdout", 10, "--log-freq", 2, "--no-cuda", cwd=tmp_path, env=env)
    pad = load_checkpoint(str(only_run(tmp_path) / "pad_checkpoint.pt"), "pad_pretrain")
    assert pad["obs_dim"] == 31 and pad["args"]["gamma"] == 0.995 and pad["args"]["reward_transform"] == "minus-one"
    pad_path = only_run(tmp_path) / "pad_checkpoint.pt"
    (tmp_path / "pad.pt").write_bytes(pad_path.read_bytes())
    shutil.rmtree(tmp_path / "runs")
    proc = run_script("divo_antmaze.py", "--env-id", ANTMAZE, *TINY, "--total-timesteps", 2, "--eval-episodes", 2,
                      "--pad-checkpoint", tmp_path / "pad.pt", cwd=tmp_path, env=env)
    assert "evaluation AntMaze_UMaze-v4 as the dataset records it" in proc.stdout and "loaded the PAD model" in proc.stdout
    assert "2 evaluation episodes of 20 steps" in proc.stdout and "terminated" in proc.stdout
    scores = json.loads((only_run(tmp_path) / "scores.json").read_text())
    assert set(scores["returns"]) <= {0.0, 1.0} and scores["normalized_scores"] == [100 * r for r in scores["returns"]]
    assert [p.name for p in (tmp_path / "tmp").iterdir() if p.name.startswith("ant_maze")] == []


def test_a_missing_dataset_without_network_ends_in_one_error_and_no_run_folder(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    proc = run_script("divo_continuous.py", "--env-id", "mujoco/hopper/medium-v0", "--no-cuda", cwd=tmp_path, check=False,
                      env={"MINARI_DATASETS_PATH": str(store), "HF_HUB_OFFLINE": "1"})
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert last.startswith(f"error: the Minari dataset mujoco/hopper/medium-v0 is not in Minari's local store {store}")
    assert "`pip install \"minari[hf]\" && minari download mujoco/hopper/medium-v0`" in last
    assert not (tmp_path / "runs").exists() and os.listdir(store) == []


# ----------------------------------------------------------------------------------------------
# tools/: the sweep plans Minari ids, the report keeps them apart
# ----------------------------------------------------------------------------------------------
def test_sweep_plans_minari_ids_with_folder_safe_names_and_the_right_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sweep", os.path.join(ROOT, "tools", "sweep.py"))
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    args = sweep.Args(env_ids=["mujoco/hopper/medium-v0", "D4RL/antmaze/umaze-v1", "hopper-medium-v2"], seeds=[0])
    sweep.check_args(args, [])
    runs = sweep.plan_runs(args)
    assert [run.name for run in runs] == ["mujoco-hopper-medium-v0__divo__0", "D4RL-antmaze-umaze-v1__divo__0",
                                          "hopper-medium-v2__divo__0"]
    assert [os.path.basename(run.script) for run in runs] == ["divo_continuous.py", "divo_antmaze.py", "divo_continuous.py"]
    suite = sweep.plan_runs(sweep.Args(suite="minari-locomotion", seeds=[0]))
    assert len(suite) == 6 and suite[0].env_id == "mujoco/halfcheetah/medium-v0"
    with pytest.raises(sweep.SweepError, match="is a Minari id"):
        sweep.check_args(sweep.Args(env_ids=["mujoco/hopper/medium-v0"], seeds=[0], dataset_dir=ROOT), [])


def test_report_keeps_minari_tasks_in_their_own_blocks(tmp_path):
    import sys

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import report

    def write(name, task, scores):
        folder = tmp_path / "runs" / name
        folder.mkdir(parents=True)
        (folder / "args.json").write_text(json.dumps({"exp_name": "divo", "seed": 0, "env_id": task, "task": task}))
        (folder / "scores.json").write_text(json.dumps({"task": task, "seed": 0, "evaluations": [], **scores}))

    write("a", "hopper-medium-v2", {"normalized_score_mean": 50.0})
    write("b", "mujoco/hopper/medium-v0", {"normalized_score_mean": 40.0})
    write("c", "D4RL/antmaze/umaze-v1", {"normalized_score_mean": 20.0})
    write("d", "test/hopper/unscored-v0", {"metric": "return", "return_mean": 1234.5})
    runs = report.collect_runs([str(tmp_path / "runs")])
    names = [row.name for row in report.build_table(runs).rows]
    assert names == ["hopper-medium-v2", "Gym average", "Total", "D4RL/antmaze/umaze-v1", "mujoco/hopper/medium-v0",
                     "Minari average", "test/hopper/unscored-v0"]
    rows = {row.name: row for row in report.build_table(runs).rows}
    assert rows["Minari average"].cells["divo"].mean == 30.0 and rows["Total"].cells["divo"].mean == 50.0
    assert rows["test/hopper/unscored-v0"].cells["divo"].mean == 1234.5
    _, tasks, _, _ = report.aggregate_inputs(runs)
    assert "test/hopper/unscored-v0" not in tasks and "mujoco/hopper/medium-v0" in tasks


def test_a_truncated_minari_file_is_one_clear_line(store, tmp_path, monkeypatch):
    """A dataset whose data file was cut short (an interrupted copy or download) is refused with the dataset, its
    file and the fix, not a traceback from h5py."""
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(copy))
    (data_file,) = (copy / HOPPER).rglob("*.hdf5")
    data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
    with pytest.raises(InputError) as error:
        data.minari_rows(data.load_minari_dataset(HOPPER), 11, 3)
    message = str(error.value)
    assert message.startswith("error: ") and "\n" not in message
    assert f"the Minari dataset {HOPPER}" in message and "partial or corrupt" in message, message
