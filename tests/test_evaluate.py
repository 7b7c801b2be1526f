"""tools/evaluate.py and divo_utils.policy: a trained policy evaluated, loaded and exported outside training."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, refused, run_script, write_d4rl_file
from divo_utils import InputError
from divo_utils.policy import load_actor
from test_minari import HOPPER as MINARI_HOPPER, store  # noqa: F401 (test_minari's Minari store fixture)

TINY = ["--env-id", "hopper-medium-v2", "--hidden-dim", "32", "--num-layers", "2", "--batch-size", "64",
        "--eval-episodes", "3", "--log-freq", "20", "--no-cuda", "--no-legacy-inertia", "--seed", "4"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny locomotion run with --save-model: its folder."""
    cwd = tmp_path_factory.mktemp("trained")
    write_d4rl_file(cwd / "data.hdf5", episode_lengths=(120, 90, 150, 140), terminal_episodes=(1,))
    run_script("divo_continuous.py", *TINY, "--dataset-path", cwd / "data.hdf5", "--total-timesteps", 40,
               "--save-model", "--run-name", "r", cwd=cwd)
    return cwd / "runs" / "r"


@pytest.mark.parametrize("name", ["divo_continuous.cleanrl_model", "checkpoint.pt"])
def test_evaluate_reproduces_the_runs_final_scores(trained, name, tmp_path):
    """The run's own seed and number of episodes give its final per-episode scores exactly; the run's scores.json is
    left alone."""
    before = (trained / "scores.json").read_bytes()
    proc = run_script("tools/evaluate.py", trained / name, "--episodes", 3, "--out", tmp_path / "e.json", cwd=tmp_path)
    result = json.loads((tmp_path / "e.json").read_text())
    run = json.loads(before)
    assert result["scores"] == run["normalized_scores"] and result["returns"] == run["returns"], proc.stdout
    assert result["seed"] == 4 and result["step"] in (None, 40) and (trained / "scores.json").read_bytes() == before


def test_load_actor_is_the_scripts_actor_with_the_normalisation_inside(trained):
    import divo_continuous as dc

    payload = torch.load(trained / "checkpoint.pt", map_location="cpu", weights_only=True)
    actor = dc.Actor(payload["obs_dim"], payload["act_dim"], 32, 2)
    actor.load_state_dict(payload["agent"]["actor"])
    policy = load_actor(str(trained / "divo_continuous.cleanrl_model"))
    obs = np.random.default_rng(0).normal(2.0, 3.0, (5, payload["obs_dim"]))
    mean, std = payload["obs_mean"].numpy(), payload["obs_std"].numpy()
    expected = actor(torch.as_tensor(dc.normalize_states(obs, mean, std), dtype=torch.float32)).detach().numpy()
    assert np.array_equal(policy(obs), expected) and policy(obs[0]).shape == (payload["act_dim"],)
    with pytest.raises(InputError, match="observations of 11 numbers"):
        policy(np.zeros(7))


def test_the_exported_policy_runs_with_torch_alone(trained, tmp_path):
    """--export: a TorchScript file that a process without this repository on its path loads with torch.jit.load and
    steps a gymnasium env with, giving the loaded policy's actions."""
    run_script("tools/evaluate.py", trained / "divo_continuous.cleanrl_model", "--episodes", 1, "--out",
               tmp_path / "e.json", "--export", tmp_path / "policy.pt", cwd=tmp_path)
    code = ("import sys, torch, gymnasium as gym, numpy as np\n"
            "import importlib.util\n"
            "assert sys.argv[2] not in sys.path and importlib.util.find_spec('divo_utils') is None\n"
            "policy = torch.jit.load(sys.argv[1])\n"
            "env = gym.make('Hopper-v4')\n"
            "obs, _ = env.reset(seed=0)\n"
            "first = None\n"
            "for _ in range(5):\n"
            "    action = policy(torch.as_tensor(obs, dtype=torch.float32)[None])[0].numpy()\n"
            "    first = action if first is None else first\n"
            "    obs, *_ = env.step(action)\n"
            "print(' '.join(map(repr, first.tolist())))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "policy.pt"), ROOT], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    import gymnasium as gym

    obs, _ = gym.make("Hopper-v4").reset(seed=0)
    expected = load_actor(str(trained / "divo_continuous.cleanrl_model"))(obs.astype(np.float32))
    assert np.allclose([float(x) for x in proc.stdout.split()], expected, atol=1e-6)


def test_wrong_files_are_refused_in_one_line(trained, tmp_path):
    (tmp_path / "random.pt").write_bytes(os.urandom(3000))
    (tmp_path / "truncated.pt").write_bytes((trained / "checkpoint.pt").read_bytes()[:5000])
    pad = torch.load(trained / "checkpoint.pt", map_location="cpu", weights_only=True)
    torch.save({**pad, "kind": "pad_pretrain"}, tmp_path / "pad.pt")
    wrong = torch.load(trained / "divo_continuous.cleanrl_model", map_location="cpu", weights_only=True)
    torch.save({**wrong, "env_id": "halfcheetah-medium-v2"}, tmp_path / "cheetah.pt")  # hopper sizes, cheetah env
    cases = {trained / "args.json": "not a readable checkpoint", tmp_path / "random.pt": "not a readable checkpoint",
             tmp_path / "truncated.pt": "not a readable checkpoint", tmp_path / "pad.pt": "trains no policy",
             tmp_path / "cheetah.pt": "is the file of another env", tmp_path / "none.pt": "no file at"}
    for path, words in cases.items():
        proc = run_script("tools/evaluate.py", path, "--episodes", 1, "--out", tmp_path / "e.json", cwd=tmp_path,
                          check=False)
        assert refused(proc, words) and "error: error" not in proc.stderr, (path, proc.stderr)
        assert not (tmp_path / "e.json").exists()


def test_evaluate_reproduces_an_antmaze_runs_final_scores(tmp_path):
    """AntMaze: D4RL's maze envs with the run's --legacy-inertia, 100 x success per episode, as the run scored them."""
    rng = np.random.default_rng(0)
    rewards = (rng.random(300) < 0.05).astype(np.float32)
    write_d4rl_file(tmp_path / "am.hdf5", obs_dim=29, act_dim=8, episode_lengths=(100, 100, 100), terminal_episodes=(),
                    next_observations=False, rewards=rewards, terminals=rewards.astype(bool),
                    **{"infos/goal": rng.uniform(0, 9, (300, 2))})
    run_script("divo_antmaze.py", "--env-id", "antmaze-umaze-v2", "--hidden-dim", "32", "--num-layers", "2",
               "--batch-size", "64", "--eval-episodes", "2", "--log-freq", "10", "--no-cuda", "--seed", "3",
               "--dataset-path", tmp_path / "am.hdf5", "--total-timesteps", 10, "--save-model", "--run-name", "am",
               cwd=tmp_path)
    run = tmp_path / "runs" / "am"
    proc = run_script("tools/evaluate.py", run / "divo_antmaze.cleanrl_model", "--episodes", 2, cwd=tmp_path)
    result = json.loads((run / "evaluation.json").read_text())
    scores = json.loads((run / "scores.json").read_text())
    assert result["scores"] == scores["normalized_scores"] and result["returns"] == scores["returns"], proc.stdout
    assert result["env_id"] == "antmaze-umaze-v2" and set(result["scores"]) <= {0.0, 100.0}



def test_evaluate_reproduces_a_minari_runs_final_scores_with_minaris_normalisation(store, tmp_path):
    """A Minari run: the env the dataset records and its reference returns, as the run scored them."""
    env = {"MINARI_DATASETS_PATH": str(store)}
    run_script("divo_continuous.py", "--env-id", MINARI_HOPPER, "--hidden-dim", "16", "--num-layers", "1",
               "--batch-size", "32", "--eval-episodes", "2", "--no-cuda", "--seed", "5", "--total-timesteps", 4,
               "--save-model", "--run-name", "m", cwd=tmp_path, env=env)
    run = tmp_path / "runs" / "m"
    proc = run_script("tools/evaluate.py", run / "divo_continuous.cleanrl_model", "--episodes", 2, cwd=tmp_path,
                      env=env)
    result = json.loads((run / "evaluation.json").read_text())
    scores = json.loads((run / "scores.json").read_text())
    assert result["scores"] == scores["normalized_scores"] and result["returns"] == scores["returns"], proc.stdout
    np.testing.assert_allclose(result["scores"], 100 * (np.array(result["returns"]) + 20.0) / 3020.0)


def test_capture_video_films_the_first_episode_and_keeps_the_scores(trained, tmp_path):
    """--capture-video: the scripts' filming code writes videos/evaluation-episode-0.mp4 beside --out; the scores are
    the run's all the same."""
    from test_video import can_render, frames

    if can_render():
        pytest.skip(f"no offscreen rendering here: {can_render()}")
    run_script("tools/evaluate.py", trained / "checkpoint.pt", "--episodes", 3, "--out", tmp_path / "e.json",
               "--capture-video", cwd=tmp_path)
    video = tmp_path / "videos" / "evaluation-episode-0.mp4"
    assert video.is_file() and len(frames(video)) > 1
    run = json.loads((trained / "scores.json").read_text())
    assert json.loads((tmp_path / "e.json").read_text())["scores"] == run["normalized_scores"]
