"""Shared helpers: small D4RL-format files, perturbed target networks, and running a script as a user would."""

import ast
import os
import signal
import struct
import subprocess
import sys

import gymnasium as gym
import h5py
import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# The tests' networks are tiny: intra-op threads gain nothing there, and on a busy machine waiting for them at every
# op makes the suite several times slower. (Scripts run as subprocesses get OMP_NUM_THREADS=1, below.)
torch.set_num_threads(1)


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


def run_main(module, argv, monkeypatch, **names):
    """Run the `if __name__ == "__main__":` block of `module`'s file in this process, as `python script argv` would,
    with `names` (fake envs, recording wrappers) in place of the script's own; return the block's variables.

    The block's text is the file's own (a bug put into the loop is run, not a copy of it), and it runs in a copy
    of the module's namespace, so the module itself is left as it was. Run from the test's temporary folder.
    """
    tree = ast.parse(open(module.__file__).read())
    (main,) = [node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'"]
    code = compile(ast.Module(body=main.body, type_ignores=[]), module.__file__, "exec")
    namespace = {**vars(module), "__name__": "__main__", **names}
    monkeypatch.setattr(sys, "argv", [module.__file__, *map(str, argv)])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # the script's StopSignal sets them
    try:
        exec(code, namespace)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    return namespace


class FakeEnv(gym.Env):
    """An env whose observations are far from normalised (mean 5, std 3), that records every observation it
    shows and the action it then receives; episodes end after `length` steps."""

    def __init__(self, obs_dim, act_dim, length=4):
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float64)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (act_dim,), np.float32)
        self.length, self.seen = length, []

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.obs = 0, 5.0 + 3.0 * self.np_random.standard_normal(self.observation_space.shape)
        return self.obs.copy(), {}

    def step(self, action):
        self.seen.append((self.obs.copy(), np.array(action, dtype=np.float64)))
        self.t += 1
        self.obs = 5.0 + 3.0 * self.np_random.standard_normal(self.observation_space.shape)
        return self.obs.copy(), float(action[0]), False, self.t >= self.length, {}


def perturb(*modules, scale=0.1, seed=123):
    """Move every parameter of `modules` by N(0, scale^2), in place: a target network that equals its online
    network would hide a bug that uses one for the other."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.fixture
def hopper_file(tmp_path):
    """A small hopper-shaped dataset (observation 11, action 3)."""
    path = tmp_path / "hopper-small.hdf5"
    write_d4rl_file(path, episode_lengths=(120, 90, 150, 140), terminal_episodes=(1,))
    return path


# The arguments of a DIVO run of a second or two on a hopper-shaped file (the reliability tests' runs).
TINY = ["--env-id", "hopper-medium-v2", "--hidden-dim", "16", "--num-layers", "1", "--batch-size", "32",
        "--eval-episodes", "1", "--log-freq", "10", "--no-cuda", "--no-legacy-inertia"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 40-step run `done` (evaluations and checkpoints at 20 and 40) on a small hopper-shaped file, one
    per test module; returns (its working folder, the run folder)."""
    cwd = tmp_path_factory.mktemp("finished")
    write_d4rl_file(cwd / "data.hdf5", episode_lengths=(120, 90, 150, 140), terminal_episodes=(1,))
    run_script("divo_continuous.py", *TINY, "--dataset-path", cwd / "data.hdf5", "--total-timesteps", 40,
               "--eval-freq", 20, "--checkpoint-freq", 20, "--run-name", "done", cwd=cwd)
    return cwd, cwd / "runs" / "done"


def tiny_data(n=300, obs_dim=5, act_dim=3, seed=0, done_rate=0.05):
    """Random device-format transitions (what a script's to_device returns), for agents' updates."""
    g = torch.Generator().manual_seed(seed)
    return {"observations": torch.randn(n, obs_dim, generator=g), "actions": torch.rand(n, act_dim, generator=g) * 2 - 1,
            "rewards": torch.randn(n, generator=g), "next_observations": torch.randn(n, obs_dim, generator=g),
            "not_done": (torch.rand(n, generator=g) > done_rate).float()}


def explain(proc, tail: int = 6000) -> str:
    """A finished process's exit status and the ends of its output, for an assertion's message."""
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout[-tail:]}\nstderr:\n{proc.stderr[-tail:]}"


def one_line(proc, *words) -> bool:
    """Stopped with exit 1 and one `error:` line holding every one of `words` (case-insensitive), no traceback."""
    lines = proc.stderr.strip().splitlines()
    return (proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr
            and all(word.lower() in lines[0].lower() for word in words))


def refused(proc, message):
    """The process stopped with exactly one line on stderr, starting with `error:` and containing `message`."""
    lines = proc.stderr.strip().splitlines()
    return proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def only_run(cwd):
    """The one run folder under `cwd`/runs."""
    (run,) = (cwd / "runs").iterdir()
    return run


def png_size(path):
    """Width and height from a PNG's IHDR chunk (after checking the signature)."""
    head = open(path, "rb").read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def folder_bytes(folder):
    """Every file under `folder` with its bytes, but the lock file (it names the last process that held the run)."""
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files if f != "lock"}
