"""tools/make_antmaze_dataset.py and tools/antmaze_walker.py: the planner solves every maze, the generator writes
D4RL's AntMaze layout and semantics deterministically, and divo_antmaze.py trains on what it writes."""

import json
import os
import sys

import h5py
import numpy as np
import pytest
import torch

from conftest import ROOT, run_script

sys.path.insert(0, os.path.join(ROOT, "tools"))
import antmaze_walker as aw  # noqa: E402
import make_antmaze_dataset as mad  # noqa: E402
from divo_utils.envs import ANTMAZE_MAPS  # noqa: E402


# ---------------------------------------------------------------------------------------------- the planner
@pytest.mark.parametrize("maze", sorted(ANTMAZE_MAPS))
def test_the_planner_solves_every_maze_from_every_cell(maze):
    """From every free cell to every free goal cell, following next_cell walks free, adjacent cells and arrives in
    exactly the breadth-first distance, which is the grid's shortest path (never longer than the free cells)."""
    free = mad.free_cells(maze)
    for goal in free:
        distance = mad.distances_to(maze, goal)
        assert set(distance) == set(free), "every free cell of D4RL's mazes is connected"
        for start in free:
            cell, moves = start, 0
            while cell != goal:
                step = mad.next_cell(distance, cell)
                assert step in distance and abs(step[0] - cell[0]) + abs(step[1] - cell[1]) == 1
                assert distance[step] == distance[cell] - 1
                cell, moves = step, moves + 1
            assert moves == distance[start] < len(free)


def test_cells_and_their_centres_use_d4rls_frame():
    """D4RL's origin is the start cell (1, 1); x grows with the column, y with the row; the evaluation goal cell of
    umaze is at (0, 8) (../shared/D4RL_COMPAT.md)."""
    assert mad.marked_cell("umaze", "r") == (1, 1) and mad.cell_centre((1, 1)).tolist() == [0.0, 0.0]
    assert mad.cell_centre(mad.marked_cell("umaze", "g")).tolist() == [0.0, 8.0]
    assert mad.cell_centre(mad.marked_cell("large", "g")).tolist() == [32.0, 24.0]
    for cell in mad.free_cells("large"):
        centre = mad.cell_centre(cell)
        assert mad.cell_of(centre) == cell and mad.cell_of(centre + np.array([1.9, -1.9])) == cell


def test_waypoints_lead_along_the_corridor_and_end_at_the_goal():
    """umaze from the start cell: first the next cell's centre (not the goal through the wall), the cell after it
    once within the switch radius, and the goal point itself from the goal's neighbour."""
    goal = np.array([0.7, 8.4])
    distance = mad.distances_to("umaze", mad.cell_of(goal))
    assert mad.waypoint(distance, np.array([0.0, 0.0]), goal).tolist() == [4.0, 0.0]
    assert mad.waypoint(distance, np.array([3.0, 0.2]), goal).tolist() == [8.0, 0.0]  # 1.0 m from (4, 0)
    assert mad.waypoint(distance, np.array([8.0, 4.0]), goal).tolist() == [8.0, 8.0]
    assert mad.waypoint(distance, np.array([4.0, 8.0]), goal).tolist() == goal.tolist()
    for row in range(5):  # no waypoint is ever inside a wall
        for col in range(5):
            xy = mad.cell_centre((row, col))
            point = mad.waypoint(distance, xy, goal)
            assert ANTMAZE_MAPS["umaze"][mad.cell_of(point)[0]][mad.cell_of(point)[1]] != "1"


def test_play_and_diverse_episodes_start_and_end_where_they_should():
    rng = np.random.default_rng(0)
    assert mad.episode_cells("umaze", "play", rng) == ((1, 1), (3, 1))  # antmaze-umaze-v2's fixed start and goal
    free = set(mad.free_cells("medium"))
    for _ in range(50):
        start, goal = mad.episode_cells("medium", "play", rng)
        assert start in free and goal in mad.PLAY_GOALS["medium"] and start != goal
        start, goal = mad.episode_cells("medium", "diverse", rng)
        assert start in free and goal in free and start != goal
    assert all(cell in set(mad.free_cells(m)) for m, cells in mad.PLAY_GOALS.items() for cell in cells)


# ---------------------------------------------------------------------------------------------- the walker
def test_the_walkers_observation_is_the_goal_vector_and_d4rls_observation_without_position():
    qpos, qvel = np.arange(15.0), np.arange(100.0, 114.0)
    obs = aw.walker_observation(qpos, qvel, np.array([5.0, -1.0]))
    assert obs.dtype == np.float32 and obs.shape == (aw.WALKER_OBS_DIM,)
    assert obs[:2].tolist() == [5.0, -2.0] and obs[2:15].tolist() == qpos[2:15].tolist()
    assert obs[15:].tolist() == qvel.tolist()


def test_the_goal_ant_rewards_progress_and_ends_when_it_falls():
    env = aw.GoalAnt(horizon=50)
    env.reset(seed=0)
    goal = env.goal.copy()
    distance = np.linalg.norm(goal - env.data.qpos[:2])
    _, reward, terminated, truncated, _ = env.step(np.zeros(8))
    progress = (distance - np.linalg.norm(goal - env.data.qpos[:2])) / aw.DT
    assert reward == pytest.approx(progress + env.healthy_reward) and not terminated and not truncated
    qpos = env.data.qpos.copy()
    qpos[3:7] = [0.0, 1.0, 0.0, 0.0]  # upside down
    env.set_state(qpos, env.data.qvel)
    assert env.step(np.zeros(8))[2], "a flipped ant ends the episode"


def test_the_committed_walker_is_small_and_loads_with_torch_alone():
    assert os.path.getsize(aw.WALKER_FILE) < 2_000_000
    policy = aw.load_walker()
    action = policy(torch.zeros(4, aw.WALKER_OBS_DIM))
    assert action.shape == (4, 8) and action.abs().max() <= 1.0


# ---------------------------------------------------------------------------------------------- the generator
def random_walker(path):
    policy = aw.WalkerPolicy([16])
    torch.save({"hidden": [16], "state_dict": policy.state_dict(), "steps": 0}, path)
    return str(path)


def test_the_generator_writes_d4rls_antmaze_layout_deterministically(tmp_path):
    walker = random_walker(tmp_path / "walker.pt")
    stats = [mad.main(mad.Args(maze="medium", kind="diverse", transitions=1500, seed=3, walker=walker,
                               out=str(tmp_path / f"{name}.hdf5"), expert_episodes=0)) for name in ("a", "b")]
    with h5py.File(tmp_path / "a.hdf5") as a, h5py.File(tmp_path / "b.hdf5") as b:
        assert a.attrs["env"] == "antmaze-medium-diverse-v2"
        columns = {"observations": ((1500, 29), np.float32), "actions": ((1500, 8), np.float32),
                   "rewards": ((1500,), np.float32), "terminals": ((1500,), bool), "timeouts": ((1500,), bool),
                   "infos/goal": ((1500, 2), np.float32), "infos/qpos": ((1500, 15), np.float32),
                   "infos/qvel": ((1500, 14), np.float32)}
        for key, (shape, dtype) in columns.items():
            assert a[key].shape == shape and a[key].dtype == dtype, key
            assert np.array_equal(a[key][()], b[key][()]), f"{key} differs between two runs of one seed"
        obs, qpos, qvel = a["observations"][()], a["infos/qpos"][()], a["infos/qvel"][()]
        assert np.array_equal(obs[:, :2], qpos[:, :2]) and np.array_equal(obs[:, 2:15], qpos[:, 2:15])
        assert np.array_equal(obs[:, 15:], qvel)
        assert np.flatnonzero(a["timeouts"][()]).tolist() == [999], "1000-step episodes end in a timeout"
        goal = a["infos/goal"][()]
        assert (goal[:1000] == goal[0]).all() and (goal[1000:] == goal[1000]).all() and (goal[0] != goal[1000]).any()
        target = a.attrs["target_goal"]  # the evaluation goal: D4RL's relabelling, whatever the walker's goal
        assert target.shape == (2,) and np.all(target >= [20, 20]) and np.all(target <= [21.5, 21.5]), target
        at_target = np.linalg.norm(obs[1:, :2] - target, axis=1) <= 0.5  # the row's next state
        rewards = a["rewards"][()]
        assert np.array_equal(rewards[:-1] > 0, at_target) and rewards[-1] == 0, "reward 1 when the next row is there"
        assert set(np.unique(rewards)) <= {0.0, 1.0}
        assert np.array_equal(a["terminals"][()], rewards > 0), "terminals mark the rewarded rows"
        assert np.abs(a["actions"][()]).max() <= 1.0
    assert stats[0]["episodes"] == 2 and stats[0] == {**stats[1], "seconds": stats[0]["seconds"]}
    assert json.load(open(tmp_path / "a.json"))["cells_visited"] >= 1 and os.path.getsize(tmp_path / "a.png") > 5000
    with pytest.raises(SystemExit, match="exists"):
        mad.main(mad.Args(transitions=10, walker=walker, out=str(tmp_path / "a.hdf5"), expert_episodes=0))


def test_the_rewards_mark_the_evaluation_goal_not_the_walkers(tmp_path, monkeypatch):
    """D4RL's relabelling: rewards and terminals mark the rows whose next state is within 0.5 of the evaluation goal,
    whatever goal the walker was sent to. With that goal moved onto the start (the walker's goal is 8 m away), the
    ant that dawdles there is rewarded from its first rows; the walker's own goal is never reached."""
    monkeypatch.setattr(mad, "evaluation_goal", lambda maze, rng: np.zeros(2))
    walker = random_walker(tmp_path / "walker.pt")
    columns, target, reached = mad.generate(mad.Args(maze="umaze", kind="play", transitions=300, walker=walker,
                                                     expert_episodes=0))
    xy = columns["observations"][:, :2]
    expected = np.append(np.linalg.norm(xy[1:], axis=1) <= 0.5, False)
    assert np.array_equal(columns["rewards"] > 0, expected) and columns["rewards"][:10].all(), columns["rewards"][:10]
    assert np.array_equal(columns["terminals"], expected) and not reached.any()
    assert np.linalg.norm(columns["infos/goal"][0] - [0.0, 8.0]) < 2.2, "infos/goal keeps the walker's goal"


def test_relabel_is_d4rls_sparse_relabelling():
    obs = np.zeros((4, 29), np.float32)
    obs[:, 0] = [3.0, 0.6, 0.4, 0.0]  # the next states of rows 0, 1, 2 are at 0.6, 0.4, 0.0 from the goal
    assert mad.relabel(obs, np.zeros(2)).tolist() == [0.0, 1.0, 1.0, 0.0]  # the last row has no next state: 0


def test_a_generated_umaze_file_trains_in_divo_antmaze(tmp_path):
    """The committed walker on umaze: one episode reaches the goal, and divo_antmaze.py trains on the file and
    evaluates in antmaze-umaze-v2."""
    proc = run_script("tools/make_antmaze_dataset.py", "--maze", "umaze", "--kind", "play", "--transitions", 1000,
                      "--expert-episodes", 0, "--out", tmp_path / "umaze.hdf5", cwd=tmp_path)
    assert "1 episodes, 100% reached their goal" in proc.stdout, proc.stdout
    proc = run_script("divo_antmaze.py", "--env-id", "antmaze-umaze-v2", "--dataset-path", tmp_path / "umaze.hdf5",
                      "--hidden-dim", 32, "--num-layers", 2, "--batch-size", 64, "--eval-episodes", 2,
                      "--total-timesteps", 20, "--eval-freq", 10, "--log-freq", 10, "--no-cuda", cwd=tmp_path)
    scores = [json.load(open(os.path.join(root, "scores.json"))) for root, _, files in os.walk(tmp_path / "runs")
              if "scores.json" in files]
    assert len(scores) == 1, proc.stdout
