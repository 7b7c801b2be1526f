"""The goal-reaching ant behind our AntMaze-style datasets (D4RL's recipe, docs/data.md).

D4RL made its AntMaze files with an ant trained to walk to a goal point in an open arena, steered through the maze
by a planner that hands it the next cell's centre. This tool trains that ant: D4RL's own ant (the model
`divo_utils.envs` writes, with MuJoCo 2.x's masses) on an open floor, a goal a few metres away, reward = progress
toward the goal + staying upright, trained with stable-baselines3's SAC, the library Minari's generator uses.

    python tools/antmaze_walker.py train --total-steps 1000000      # resumable: run it again to go on
    python tools/antmaze_walker.py export                            # -> tools/antmaze_data/walker.pt
    python tools/antmaze_walker.py evaluate --episodes 100           # success at 2-4 m, and a plot of paths

What the walker sees (29 numbers): the vector from the ant to its goal, then D4RL's AntMaze observation without
the ant's own position ([qpos[2:15], qvel[0:14]]), so that one policy walks alike anywhere in the largest maze.
The committed file is the deterministic policy only (tanh of the mean), a few hundred kB, read by
`tools/make_antmaze_dataset.py` with torch alone.
"""

import os
import sys
from dataclasses import dataclass
from typing import Literal, Optional

import gymnasium as gym
import mujoco
import numpy as np
import torch
import torch.nn as nn
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # divo_utils

from divo_utils.envs import private_tempdir, restore_legacy_inertia, write_d4rl_ant_xml  # noqa: E402

WALKER_FILE = os.path.join(ROOT, "tools", "antmaze_data", "walker.pt")
WALKER_OBS_DIM, WALKER_ACT_DIM = 29, 8
FRAME_SKIP, DT = 5, 0.1  # D4RL's ant: timestep 0.02, 5 substeps per action
HEALTHY_Z = (0.2, 1.0)  # torso height range of gymnasium's Ant (the same torso)


def walker_observation(qpos: np.ndarray, qvel: np.ndarray, goal_xy: np.ndarray) -> np.ndarray:
    """[goal - xy, qpos[2:15], qvel[0:14]]: D4RL's AntMaze observation with the position replaced by the goal vector."""
    return np.concatenate([goal_xy - qpos[:2], qpos[2:15], qvel[:14]]).astype(np.float32)


def is_healthy(model_data: mujoco.MjData) -> bool:
    """Torso within gymnasium Ant's height range, and not upside down (the torso's z axis points up)."""
    z, up = model_data.qpos[2], model_data.xmat[1][8]  # body 1 = torso; xmat[8] = z component of its z axis
    return HEALTHY_Z[0] <= z <= HEALTHY_Z[1] and up > 0.0


class GoalAnt(gym.Env):
    """D4RL's ant in an open arena, walking to goals `goal_range` metres away; a new goal on reaching one.

    Reward per step: progress toward the goal in m/s, + `healthy_reward` while upright, - `ctrl_cost` |a|^2.
    The episode ends when the ant falls or flips (terminal) or after `horizon` steps (truncation)."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (WALKER_OBS_DIM,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (WALKER_ACT_DIM,), np.float32)

    def __init__(self, horizon: int = 500, goal_range: tuple[float, float] = (1.0, 5.0), goal_radius: float = 0.5,
                 healthy_reward: float = 0.2, ctrl_cost: float = 0.02):
        with private_tempdir("goal_ant_") as tmp_dir:
            xml = os.path.join(tmp_dir, "d4rl_ant.xml")
            write_d4rl_ant_xml(xml)
            self.model = mujoco.MjModel.from_xml_path(xml)
            self.data = mujoco.MjData(self.model)
            restore_legacy_inertia(self.model, self.data, xml)
        self.horizon, self.goal_range, self.goal_radius = horizon, goal_range, goal_radius
        self.healthy_reward, self.ctrl_cost = healthy_reward, ctrl_cost
        self.goal, self.t, self.goals_reached = np.zeros(2), 0, 0

    def sample_goal(self) -> np.ndarray:
        """A point `goal_range` metres from the ant, in any direction."""
        distance, angle = self.np_random.uniform(*self.goal_range), self.np_random.uniform(-np.pi, np.pi)
        return self.data.qpos[:2] + distance * np.array([np.cos(angle), np.sin(angle)])

    def set_state(self, qpos: np.ndarray, qvel: np.ndarray) -> None:
        self.data.qpos[:], self.data.qvel[:] = qpos, qvel
        mujoco.mj_forward(self.model, self.data)

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        """D4RL's noisy start (U(-0.1, 0.1) on qpos, 0.1 N(0, 1) on qvel) at the origin, facing a random way."""
        super().reset(seed=seed)
        mujoco.mj_resetData(self.model, self.data)
        qpos = self.model.qpos0 + self.np_random.uniform(-0.1, 0.1, self.model.nq)
        yaw = self.np_random.uniform(-np.pi, np.pi)
        qpos[3:7] = [np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)]
        self.set_state(qpos, 0.1 * self.np_random.standard_normal(self.model.nv))
        self.goal, self.t, self.goals_reached = self.sample_goal(), 0, 0
        return walker_observation(self.data.qpos, self.data.qvel, self.goal), {}

    def step(self, action: np.ndarray):
        before = np.linalg.norm(self.goal - self.data.qpos[:2])
        action = np.clip(action, -1.0, 1.0)
        self.data.ctrl[:] = 30.0 * action  # D4RL's NormalizedBoxEnv: [-1, 1] -> the ctrlrange +-30
        mujoco.mj_step(self.model, self.data, nstep=FRAME_SKIP)
        self.t += 1
        after = np.linalg.norm(self.goal - self.data.qpos[:2])
        healthy = is_healthy(self.data)
        reward = (before - after) / DT + self.healthy_reward * healthy - self.ctrl_cost * float(np.sum(action ** 2))
        if after <= self.goal_radius:
            self.goal, self.goals_reached = self.sample_goal(), self.goals_reached + 1
        obs = walker_observation(self.data.qpos, self.data.qvel, self.goal)
        return obs, reward, not healthy, self.t >= self.horizon, {"goals_reached": self.goals_reached}


class WalkerPolicy(nn.Module):
    """The walker's deterministic policy: SAC's actor mean squashed by tanh (the file `export` writes)."""

    def __init__(self, hidden: list[int]):
        super().__init__()
        sizes = [WALKER_OBS_DIM, *hidden]
        layers = [m for a, b in zip(sizes, sizes[1:]) for m in (nn.Linear(a, b), nn.ReLU())]
        self.net = nn.Sequential(*layers, nn.Linear(sizes[-1], WALKER_ACT_DIM))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(obs))


def load_walker(path: str = WALKER_FILE) -> WalkerPolicy:
    """The committed walker, on the CPU, in evaluation mode."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: no walker at {path}: train one (python tools/antmaze_walker.py train) and export it")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    policy = WalkerPolicy(saved["hidden"])
    policy.load_state_dict(saved["state_dict"])
    return policy.eval()


# --------------------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Train:
    """Train (or go on training) the walker with stable-baselines3's SAC; a checkpoint every `checkpoint_every`."""

    total_steps: int = 1_000_000
    """environment steps in all (one gradient step each)"""
    out_dir: str = "runs/antmaze_walker"
    """where the checkpoint (model + replay buffer) lives; training resumes from it"""
    hidden: tuple[int, ...] = (256, 256)
    """hidden layer sizes of the actor and of each critic"""
    checkpoint_every: int = 25_000
    """steps between checkpoints"""
    seed: int = 0
    threads: int = 1
    """torch threads (the training runs on one core beside other work)"""


@dataclass
class Export:
    """Write the trained actor's deterministic policy to the committed file."""

    out_dir: str = "runs/antmaze_walker"
    path: str = WALKER_FILE


@dataclass
class Evaluate:
    """Success at reaching one goal 2-4 m away (within 0.5 m, in 200 steps), and a plot of some paths."""

    episodes: int = 100
    seed: int = 12345
    path: str = WALKER_FILE
    noise: float = 0.0
    """Gaussian action noise (the dataset generator uses 0.2)"""
    plot: str = os.path.join(ROOT, "docs", "antmaze-walker-paths.png")
    """where the plot of the first paths goes ("" for none)"""


def train(cmd: Train) -> None:
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import CheckpointCallback

    torch.set_num_threads(cmd.threads)
    os.makedirs(cmd.out_dir, exist_ok=True)
    model_file, buffer_file = os.path.join(cmd.out_dir, "sac.zip"), os.path.join(cmd.out_dir, "replay_buffer.pkl")
    env = gym.wrappers.RecordEpisodeStatistics(GoalAnt())
    if os.path.exists(model_file):
        model = SAC.load(model_file, env=env, device="cpu")
        model.load_replay_buffer(buffer_file)
        print(f"resuming from {model_file} at step {model.num_timesteps}", flush=True)
    else:
        model = SAC("MlpPolicy", env, learning_starts=10_000, batch_size=256, seed=cmd.seed, device="cpu",
                    policy_kwargs={"net_arch": list(cmd.hidden)}, verbose=1, tensorboard_log=cmd.out_dir)

    class Save(CheckpointCallback):
        """Keep one checkpoint (model and buffer) in place, written atomically, every `checkpoint_every` steps."""

        def _on_step(self) -> bool:
            if self.num_timesteps % cmd.checkpoint_every == 0:
                save_checkpoint(self.model, model_file, buffer_file)
            return True

    remaining = cmd.total_steps - model.num_timesteps
    if remaining > 0:
        model.learn(remaining, callback=Save(cmd.checkpoint_every, cmd.out_dir), reset_num_timesteps=False,
                    log_interval=20, progress_bar=False)
        save_checkpoint(model, model_file, buffer_file)
    print(f"trained {model.num_timesteps} steps; export with: python tools/antmaze_walker.py export")


def save_checkpoint(model, model_file: str, buffer_file: str) -> None:
    """Model then buffer, each to a temporary name first, so an interrupted save leaves the last good pair."""
    model.save(model_file + ".tmp.zip")
    model.save_replay_buffer(buffer_file[:-len(".pkl")] + ".tmp.pkl")
    os.replace(buffer_file[:-len(".pkl")] + ".tmp.pkl", buffer_file)
    os.replace(model_file + ".tmp.zip", model_file)


def export(cmd: Export) -> None:
    from stable_baselines3 import SAC

    model = SAC.load(os.path.join(cmd.out_dir, "sac.zip"), device="cpu")
    actor = model.policy.actor
    hidden = [m.out_features for m in actor.latent_pi if isinstance(m, nn.Linear)]
    policy = WalkerPolicy(hidden)
    linears = [m for m in actor.latent_pi if isinstance(m, nn.Linear)] + [actor.mu]
    for mine, theirs in zip([m for m in policy.net if isinstance(m, nn.Linear)], linears):
        mine.load_state_dict(theirs.state_dict())
    obs = torch.randn(64, WALKER_OBS_DIM)
    assert torch.allclose(policy(obs), model.policy.actor(obs, deterministic=True), atol=1e-6)
    os.makedirs(os.path.dirname(cmd.path), exist_ok=True)
    torch.save({"hidden": hidden, "state_dict": policy.state_dict(), "steps": int(model.num_timesteps)}, cmd.path)
    print(f"wrote {cmd.path} ({os.path.getsize(cmd.path) / 1e3:.0f} kB, trained {model.num_timesteps} steps)")


def evaluate(cmd: Evaluate) -> None:
    policy = load_walker(cmd.path)
    env = GoalAnt(horizon=200, goal_range=(2.0, 4.0))
    rng = np.random.default_rng(cmd.seed)
    successes, paths = [], []
    for episode in range(cmd.episodes):
        obs, _ = env.reset(seed=cmd.seed + episode)
        goal, path, reached = env.goal.copy(), [env.data.qpos[:2].copy()], False
        for _ in range(env.horizon):
            with torch.no_grad():
                action = policy(torch.as_tensor(obs)).numpy()
            action = np.clip(action + cmd.noise * rng.standard_normal(WALKER_ACT_DIM), -1.0, 1.0)
            obs, _, terminated, truncated, info = env.step(action)
            path.append(env.data.qpos[:2].copy())
            if info["goals_reached"] or terminated:
                reached = bool(info["goals_reached"])
                break
        successes.append(reached)
        paths.append((np.array(path), goal, reached))
    rate = float(np.mean(successes))
    print(f"walker {cmd.path}: reached {sum(successes)} of {cmd.episodes} goals 2-4 m away "
          f"({100 * rate:.0f}%, action noise {cmd.noise})")
    if cmd.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 5))
        for path, goal, reached in paths[:16]:
            line, = ax.plot(path[:, 0], path[:, 1], lw=1)
            ax.add_patch(plt.Circle(goal, 0.5, fill=False, color=line.get_color(), ls="-" if reached else ":"))
        ax.plot(0, 0, "k+")
        ax.set_aspect("equal")
        ax.set_title(f"16 paths to goals 2-4 m away\n(of {cmd.episodes}: {100 * rate:.0f}% reached, noise {cmd.noise})")
        ax.set_xlabel("x (m)")
        ax.set_ylabel("y (m)")
        fig.tight_layout()
        fig.savefig(cmd.plot, dpi=120)
        print(f"wrote {cmd.plot}")


if __name__ == "__main__":
    command = tyro.extras.subcommand_cli_from_dict({"train": Train, "export": Export, "evaluate": Evaluate})
    {Train: train, Export: export, Evaluate: evaluate}[type(command)](command)
