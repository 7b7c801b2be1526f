"""Shared helpers: small D4RL-format files and running a script as a user would."""

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def write_d4rl_file(path, obs_dim=11, act_dim=3, episode_lengths=(30, 25, 40), terminal_episodes=(1,), seed=0,
                    dtype=np.float32, next_observations=True, **replace):
    """A D4RL v2-layout file: episodes end in a timeout, or a terminal for those in `terminal_episodes`."""
    rng = np.random.default_rng(seed)
    n = sum(episode_lengths)
    data = {
        "observations": rng.normal(size=(n, obs_dim)).astype(dtype),
        "actions": rng.uniform(-1, 1, size=(n, act_dim)).astype(dtype),
        "rewards": rng.normal(1.0, 0.5, size=n).astype(dtype),
        "terminals": np.zeros(n, dtype=bool),
        "timeouts": np.zeros(n, dtype=bool),
    }
    end = np.cumsum(episode_lengths) - 1
    for i, e in enumerate(end):
        data["terminals" if i in terminal_episodes else "timeouts"][e] = True
    if next_observations:
        data["next_observations"] = np.roll(data["observations"], -1, axis=0)
    data.update(replace)
    with h5py.File(path, "w") as f:
        for key, value in data.items():
            if value is not None:
                f[key] = value
    return data


def run_script(script, *args, cwd, timeout=300, check=True, env=None):
    """Run `python script args` in `cwd` like a user (with extra environment variables `env`); return the result."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.fixture
def hopper_file(tmp_path):
    """A small hopper-shaped dataset (observation 11, action 3)."""
    path = tmp_path / "hopper-small.hdf5"
    write_d4rl_file(path, episode_lengths=(120, 90, 150, 140), terminal_episodes=(1,))
    return path
