"""Minari datasets: ids, episodes as transitions, the dataset's own evaluation env and score, the three scripts run on
small datasets built here with Minari's own tools, the missing-dataset error, and tools/ on Minari ids."""

import glob
import json
import os

import gymnasium as gym
import gymnasium_robotics
import minari
import numpy as np
import pytest
from minari.data_collector import EpisodeBuffer

import divo_antmaze as da
import divo_continuous as dc
import pad_pretrain as pp
from conftest import ROOT, run_script

gym.register_envs(gymnasium_robotics)
TINY = ["--hidden-dim", "16", "--num-layers", "1", "--batch-size", "32", "--eval-episodes", "1", "--log-freq", "2",
        "--checkpoint-freq", "0", "--no-cuda"]
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
    stacked = {key: np.stack([o[key] for o in observations]) for key in obs} if isinstance(obs, dict) else np.stack(observations)
    return episode(stacked, actions, rewards, terminations, truncations)


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
    with da.private_tempdir("test_antmaze_"):  # gymnasium-robotics leaves an xml file in the temp folder
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


def test_smoke(store):
    print(store)
