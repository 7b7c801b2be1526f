"""Make an AntMaze dataset the way D4RL made its own: a goal-reaching ant steered through the maze by a planner.

    python tools/make_antmaze_dataset.py --maze umaze --kind play --out umaze.hdf5
    python divo_antmaze.py --env-id antmaze-umaze-v2 --dataset-path umaze.hdf5

D4RL's recipe (its `generate_ant_maze_datasets.py`, Fu et al., 2020), rebuilt on our D4RL-faithful maze
(`divo_utils.envs.D4RLAntMaze`): the committed walker (`tools/antmaze_walker.py`) walks to a waypoint, and a
planner hands it the centre of the next cell on a shortest path over the maze grid (the goal point itself once the
ant is in the goal's cell); Gaussian noise 0.2 on every action, clipped to [-1, 1]. Episodes of 1,000 steps that
go on after the goal is reached, so the data hold the goal states inside continuing trajectories, as D4RL's do.
Then D4RL's relabelling (its `relabel_antmaze_rewards.py`, which made the `*_sparse` files it serves): rewards and
terminals mark the rows whose next state lies within 0.5 of one evaluation goal (the target_goal of a freshly made
evaluation env: the goal cell's centre + U(0, 1) + U(0, 0.5) per axis), whatever goal the walker was sent to in that
episode. The policies trained on the file take no goal as input, and are scored on that one goal: without the
relabelling, a diverse file rewards reaching random cells, and nothing learns the evaluation task from it.
- umaze, play: the fixed start and goal of antmaze-umaze-v2 (D4RL: multistart False, multigoal False).
- play (medium, large): a random free start cell, the goal one of a few hand-picked cells.
- diverse: a random free start cell and a random free goal cell.

The file has D4RL's layout and semantics (docs/data.md): observations (N, 29) float32 in D4RL's frame, actions
(N, 8) float32, rewards (N,) float32 = 1 where the next row's xy is within 0.5 of the evaluation goal (0 on the
last row), terminals (N,) bool = the same rows, timeouts (N,) bool on each episode's last row, infos/goal (N, 2) the
walker's goal of the episode, infos/qpos (N, 15), infos/qvel (N, 14) float32; the file's `target_goal` attribute is
the evaluation goal. It is not D4RL's own data: another walker made it, on today's MuJoCo.
Beside the file: `<out>.json` (its statistics) and `<out>.png` (the ant's xy over the maze).
"""

import collections
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import h5py
import mujoco
import numpy as np
import torch
import tyro
from tqdm import tqdm

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(TOOLS))  # divo_utils
sys.path.insert(0, TOOLS)  # antmaze_walker

from antmaze_walker import WALKER_FILE, load_walker, walker_observation  # noqa: E402
from divo_utils.envs import ANTMAZE_MAPS, D4RLAntMaze, antmaze_horizon  # noqa: E402

CELL = 4.0  # metres per maze cell (D4RL's maze_size_scaling)
GOAL_RADIUS = 0.5
EPISODE_STEPS = 1000  # D4RL's max_episode_steps for its AntMaze files
SWITCH_RADIUS = 1.5  # within this of the next cell's centre, aim at the cell after it
MAX_WAYPOINT = 5.0  # the walker was trained on goals 1-5 m away: a farther waypoint is shown at 5 m
PLAY_GOALS = {  # hand-picked goal cells (row, column) of the play datasets: dead ends and far corners
    "medium": [(6, 6), (1, 6), (6, 1), (4, 4)],
    "large": [(7, 9), (1, 10), (7, 1), (3, 6), (5, 10)],
}
Cell = tuple[int, int]


# --------------------------------------------------------------------------------------------------------------
# The planner: shortest paths over the maze grid
# --------------------------------------------------------------------------------------------------------------


def free_cells(maze: str) -> list[Cell]:
    """Every cell of the map that is not a wall, in row-major order."""
    return [(i, j) for i, row in enumerate(ANTMAZE_MAPS[maze]) for j, c in enumerate(row) if c != "1"]


def marked_cell(maze: str, mark: str) -> Cell:
    """The cell of "r" (D4RL's start) or "g" (its evaluation goal)."""
    return next((i, row.index(mark)) for i, row in enumerate(ANTMAZE_MAPS[maze]) if mark in row)


def cell_centre(cell: Cell) -> np.ndarray:
    """A cell's centre in D4RL's frame: the start cell (1, 1) is the origin, x grows with the column, y with the row."""
    return CELL * np.array([cell[1] - 1.0, cell[0] - 1.0])


def cell_of(xy: np.ndarray) -> Cell:
    """The cell that holds a point of D4RL's frame."""
    return int(np.floor(xy[1] / CELL + 0.5)) + 1, int(np.floor(xy[0] / CELL + 0.5)) + 1


def distances_to(maze: str, goal: Cell) -> dict[Cell, int]:
    """Breadth-first search from the goal cell: the number of moves (up, down, left, right) from each free cell."""
    free, distance, queue = set(free_cells(maze)), {goal: 0}, collections.deque([goal])
    while queue:
        i, j = queue.popleft()
        for step in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)):
            if step in free and step not in distance:
                distance[step] = distance[(i, j)] + 1
                queue.append(step)
    return distance


def next_cell(distance: dict[Cell, int], cell: Cell) -> Cell:
    """The neighbour one move closer to the goal (the first of equals, in a fixed order); the goal cell itself."""
    if distance[cell] == 0:
        return cell
    i, j = cell
    return min(((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)), key=lambda c: distance.get(c, 1 << 30))


def waypoint(distance: dict[Cell, int], xy: np.ndarray, goal_xy: np.ndarray) -> np.ndarray:
    """Where the walker should go next: the next cell's centre on a shortest path (the cell after it once the ant is
    within SWITCH_RADIUS of that centre), the goal point itself from the goal's cell or its neighbour."""
    cell = cell_of(xy)
    if cell not in distance:  # the ant's centre over a wall's edge: use the nearest free cell
        cell = min(distance, key=lambda c: np.linalg.norm(cell_centre(c) - xy))
    target = next_cell(distance, cell)
    if np.linalg.norm(cell_centre(target) - xy) < SWITCH_RADIUS:
        target = next_cell(distance, target)
    return goal_xy if distance[target] == 0 else cell_centre(target)


# --------------------------------------------------------------------------------------------------------------
# The walker in the maze
# --------------------------------------------------------------------------------------------------------------


class Navigator:
    """The walker steered by the planner: one action for the ant's state and the episode's goal."""

    def __init__(self, maze: str, walker_path: str):
        self.maze, self.policy, self.distance, self.goal = maze, load_walker(walker_path), {}, np.zeros(2)

    def set_goal(self, goal_xy: np.ndarray) -> None:
        self.goal, self.distance = goal_xy, distances_to(self.maze, cell_of(goal_xy))

    def act(self, qpos_d4rl: np.ndarray, qvel: np.ndarray) -> np.ndarray:
        target = waypoint(self.distance, qpos_d4rl[:2], self.goal)
        offset = target - qpos_d4rl[:2]
        if np.linalg.norm(offset) > MAX_WAYPOINT:
            target = qpos_d4rl[:2] + offset * MAX_WAYPOINT / np.linalg.norm(offset)
        with torch.no_grad():
            return self.policy(torch.as_tensor(walker_observation(qpos_d4rl, qvel, target))).numpy()


def place_ant(env: D4RLAntMaze, start_xy: np.ndarray, goal_xy: np.ndarray, rng: np.random.Generator) -> None:
    """D4RL's noisy start (U(-0.1, 0.1) on qpos, 0.1 N(0, 1) on qvel) at `start_xy`, and the goal the env rewards."""
    qpos = env.model.qpos0.copy()
    qpos[:2] = start_xy + env.offset
    qpos += rng.uniform(-0.1, 0.1, env.model.nq)
    qvel = 0.1 * rng.standard_normal(env.model.nv)
    mujoco.mj_resetData(env.model, env.data)
    env.ant.set_state(qpos, qvel)
    env.goal, env.t = goal_xy.copy(), 0
    env.model.site_pos[env.env.target_site_id][:2] = goal_xy + env.offset  # the goal marker, for renders


def d4rl_qpos(env: D4RLAntMaze) -> np.ndarray:
    """The ant's qpos with its xy in D4RL's frame (as D4RL's infos/qpos)."""
    qpos = env.data.qpos.copy()
    qpos[:2] -= env.offset
    return qpos


def episode_cells(maze: str, kind: str, rng: np.random.Generator) -> tuple[Cell, Cell]:
    """The start and goal cells of one episode (see the module docstring)."""
    start, goal = marked_cell(maze, "r"), marked_cell(maze, "g")
    if maze == "umaze" and kind == "play":
        return start, goal
    free = free_cells(maze)
    goals = free if kind == "diverse" else PLAY_GOALS[maze]
    goal = goals[rng.integers(len(goals))]
    start = free[rng.integers(len(free))]
    while start == goal:
        start = free[rng.integers(len(free))]
    return start, goal


def jitter(cell: Cell, rng: np.random.Generator) -> np.ndarray:
    """A point near a cell's centre (U(-1, 1) m per axis: inside the cell, clear of its walls)."""
    return cell_centre(cell) + rng.uniform(-1.0, 1.0, 2)


@dataclass
class Args:
    maze: Literal["umaze", "medium", "large"] = "umaze"
    """D4RL's maze layout"""
    kind: Literal["play", "diverse"] = "play"
    """play: fixed (umaze) or hand-picked goals; diverse: random starts and goals"""
    transitions: int = 1_000_000
    """rows in the file (D4RL's AntMaze files have 1M)"""
    seed: int = 0
    out: str = "antmaze.hdf5"
    """the HDF5 file to write (refused if it exists); its statistics and figure go beside it"""
    walker: str = WALKER_FILE
    """the goal-reaching ant's policy"""
    noise: float = 0.2
    """standard deviation of the Gaussian action noise (D4RL's and Minari's)"""
    expert_episodes: int = 100
    """evaluation episodes of the noiseless walker + planner on D4RL's own start and goal (0: skip)"""


def generate(args: Args) -> tuple[dict, np.ndarray, np.ndarray]:
    """Roll out `args.transitions` rows; returns the D4RL columns (relabelled on the evaluation goal), that goal, and
    whether each row's step ended within GOAL_RADIUS of the walker's own goal."""
    rng = np.random.default_rng(args.seed)
    env = D4RLAntMaze(args.maze, horizon=EPISODE_STEPS)
    env.reset(seed=args.seed)
    navigator = Navigator(args.maze, args.walker)
    n = args.transitions
    columns = {"observations": np.zeros((n, 29), np.float32), "actions": np.zeros((n, 8), np.float32),
               "rewards": np.zeros(n, np.float32), "terminals": np.zeros(n, bool), "timeouts": np.zeros(n, bool),
               "infos/goal": np.zeros((n, 2), np.float32), "infos/qpos": np.zeros((n, 15), np.float32),
               "infos/qvel": np.zeros((n, 14), np.float32)}
    reached = np.zeros(n, bool)
    t = EPISODE_STEPS
    for row in tqdm(range(n), desc=f"antmaze-{args.maze}-{args.kind}", unit="step", mininterval=2.0):
        if t == EPISODE_STEPS:  # a new episode
            start, goal = episode_cells(args.maze, args.kind, rng)
            goal_xy = np.maximum(cell_centre(goal) + rng.uniform(0, 1, 2) + rng.uniform(0, 0.5, 2), 0.0) \
                if args.maze == "umaze" and args.kind == "play" else jitter(goal, rng)
            place_ant(env, cell_centre(start) if start == marked_cell(args.maze, "r") else jitter(start, rng),
                      goal_xy, rng)
            navigator.set_goal(goal_xy)
            t = 0
        qpos, qvel = d4rl_qpos(env), env.data.qvel.copy()
        columns["observations"][row] = env.observation()
        columns["infos/goal"][row], columns["infos/qpos"][row], columns["infos/qvel"][row] = env.goal, qpos, qvel
        action = navigator.act(qpos, qvel)
        action = np.clip(action + args.noise * rng.standard_normal(8), -1.0, 1.0).astype(np.float32)
        _, _, reached[row], _, _ = env.step(action)  # the episode goes on past its goal, as in D4RL's files
        t += 1
        columns["actions"][row], columns["timeouts"][row] = action, t == EPISODE_STEPS
    env.close()
    target = evaluation_goal(args.maze, rng)  # drawn after the rollouts: they do not depend on it
    columns["rewards"][:] = relabel(columns["observations"], target)
    columns["terminals"][:] = columns["rewards"] > 0  # D4RL's relabelling marks the same rows
    return columns, target, reached


def evaluation_goal(maze: str, rng: np.random.Generator) -> np.ndarray:
    """One draw of the evaluation env's goal (D4RL's target_goal: the goal cell + U(0, 1) + U(0, 0.5) per axis)."""
    return np.maximum(cell_centre(marked_cell(maze, "g")) + rng.uniform(0, 1, 2) + rng.uniform(0, 0.5, 2), 0.0)


def relabel(observations: np.ndarray, target: np.ndarray) -> np.ndarray:
    """D4RL's sparse relabelling: row i's reward is 1 when row i + 1's xy lies within GOAL_RADIUS of `target`; the
    last row, which has no next row, gets 0."""
    rewards = np.zeros(len(observations), np.float32)
    rewards[:-1] = np.linalg.norm(observations[1:, :2] - target, axis=1) <= GOAL_RADIUS
    return rewards


def expert_success(args: Args) -> float:
    """The noiseless walker + planner on D4RL's evaluation episodes (its start, goal and horizon): success rate."""
    env = D4RLAntMaze(args.maze, horizon=antmaze_horizon(args.maze))
    navigator, successes = Navigator(args.maze, args.walker), 0
    for episode in range(args.expert_episodes):
        env.reset(seed=10_000 + episode)
        navigator.set_goal(env.goal)
        for _ in range(env.horizon):
            _, _, reached, truncated, _ = env.step(navigator.act(d4rl_qpos(env), env.data.qvel.copy()))
            if reached or truncated:
                successes += reached
                break
    env.close()
    return successes / max(args.expert_episodes, 1)


def statistics(args: Args, columns: dict, target: np.ndarray, reached: np.ndarray, seconds: float) -> dict:
    """Episodes, the share that reached the walker's goal and the share rewarded (at the evaluation goal), the cells
    visited."""
    ends = np.flatnonzero(columns["timeouts"])
    episode_of_row = np.searchsorted(ends, np.arange(len(columns["rewards"])))
    episodes = int(episode_of_row[-1]) + 1
    own = np.unique(episode_of_row[reached]).size
    rewarded = np.unique(episode_of_row[columns["rewards"] > 0]).size
    visited = {cell_of(xy) for xy in columns["observations"][:, :2]}
    free = free_cells(args.maze)
    return {"maze": args.maze, "kind": args.kind, "seed": args.seed, "transitions": len(columns["rewards"]),
            "episodes": episodes, "episodes_reaching_their_goal": int(own), "share_reaching_their_goal": own / episodes,
            "target_goal": [round(float(v), 4) for v in target], "episodes_rewarded": int(rewarded),
            "share_rewarded": rewarded / episodes, "rewarded_rows": int((columns["rewards"] > 0).sum()),
            "cells_visited": len(visited & set(free)), "free_cells": len(free), "noise": args.noise,
            "walker": os.path.basename(args.walker), "seconds": round(seconds, 1)}


def plot_coverage(maze: str, xy: np.ndarray, path: str, title: str) -> None:
    """The ant's xy over the maze's walls (a 2-D histogram, log colour scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    rows = ANTMAZE_MAPS[maze]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(rows[0]) + 1.5), max(4.0, 0.6 * len(rows) + 0.6)))
    for i, row in enumerate(rows):
        for j, c in enumerate(row):
            if c == "1":
                x, y = cell_centre((i, j)) - CELL / 2
                ax.add_patch(plt.Rectangle((x, y), CELL, CELL, color="0.35"))
    extent = [-CELL * 1.5, CELL * (len(rows[0]) - 1.5), -CELL * 1.5, CELL * (len(rows) - 1.5)]
    h = ax.hist2d(xy[:, 0], xy[:, 1], bins=[8 * len(rows[0]), 8 * len(rows)], range=[extent[:2], extent[2:]],
                  norm=LogNorm(), cmap="viridis")
    fig.colorbar(h[3], ax=ax, label="rows")
    ax.set_xlim(extent[:2])
    ax.set_ylim(extent[2:])
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def dataset_env_id(maze: str, kind: str) -> str:
    """The D4RL id whose evaluation episodes match the data: antmaze-umaze-v2, antmaze-medium-play-v2, ..."""
    return "antmaze-umaze-v2" if (maze, kind) == ("umaze", "play") else f"antmaze-{maze}-{kind}-v2"


def write_hdf5(path: str, columns: dict, target: np.ndarray, args: Args) -> None:
    """D4RL's layout, written to a temporary name and moved into place, so a partial file never stands at `path`."""
    tmp = path + ".tmp"
    with h5py.File(tmp, "w") as f:
        for key, value in columns.items():
            f.create_dataset(key, data=value, compression="gzip")
        f.attrs["env"] = dataset_env_id(args.maze, args.kind)
        f.attrs["target_goal"] = target  # the evaluation goal its rewards and terminals mark
        f.attrs["generator"] = f"tools/make_antmaze_dataset.py --maze {args.maze} --kind {args.kind} --seed {args.seed}"
    os.replace(tmp, path)


def check_args(args: Args) -> None:
    """Every argument checked before the rollouts (minutes for a 1M-row file), with one line that says what to do."""
    if args.transitions < 1:
        raise SystemExit(f"error: --transitions {args.transitions} is out of range: it must be at least 1")
    if not (np.isfinite(args.noise) and args.noise >= 0):
        raise SystemExit(f"error: --noise {args.noise} is out of range: the noise's standard deviation must be a "
                         "finite number >= 0 (0: the noiseless walker)")
    if args.expert_episodes < 0:
        raise SystemExit(f"error: --expert-episodes {args.expert_episodes} is out of range: it must be at least 0 "
                         "(0: skip the evaluation)")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise SystemExit(f"error: --out {args.out}: the folder {folder} does not exist; make it first, or pass "
                         "another --out (nothing was written)")
    if not os.access(folder, os.W_OK):
        raise SystemExit(f"error: --out {args.out}: the folder {folder} cannot be written; pass another --out "
                         "(nothing was written)")


def main(args: Args) -> Optional[dict]:
    stem = os.path.splitext(args.out)[0]
    for path in (args.out, stem + ".json", stem + ".png"):  # the statistics and the figure go beside the file
        if os.path.exists(path):
            raise SystemExit(f"error: {path} exists; pass another --out (nothing was written)")
    check_args(args)
    if args.transitions < EPISODE_STEPS:
        print(f"note: {args.transitions} transitions is less than one {EPISODE_STEPS}-step episode")
    torch.set_num_threads(1)
    started = time.time()
    columns, target, reached = generate(args)
    write_hdf5(args.out, columns, target, args)
    stats = statistics(args, columns, target, reached, time.time() - started)
    if args.expert_episodes:
        stats["expert_success"] = expert_success(args)
        stats["expert_episodes"] = args.expert_episodes
    with open(stem + ".json", "w") as f:
        json.dump(stats, f, indent=1)
    plot_coverage(args.maze, columns["observations"][:, :2], stem + ".png",
                  f"{args.transitions:,} rows of {args.maze} {args.kind}: {stats['episodes_reaching_their_goal']} of "
                  f"{stats['episodes']} episodes reach their goal, {stats['episodes_rewarded']} the evaluation goal")
    print(f"wrote {args.out}: {stats['episodes']} episodes, {100 * stats['share_reaching_their_goal']:.0f}% reached "
          f"their goal, {100 * stats['share_rewarded']:.0f}% the evaluation goal (rewarded: "
          f"{stats['rewarded_rows']:,} rows), {stats['cells_visited']} of {stats['free_cells']} free cells visited, "
          f"{stats['seconds']:.0f} s")
    if args.expert_episodes:
        print(f"walker + planner on D4RL's evaluation episodes: {100 * stats['expert_success']:.0f}% success "
              f"({args.expert_episodes} episodes)")
    print(f"statistics {stem}.json, coverage {stem}.png")
    return stats


if __name__ == "__main__":
    main(tyro.cli(Args))
