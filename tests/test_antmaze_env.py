"""divo_utils.envs: the D4RL-faithful AntMaze env (maps, offsets, start and goal, observation, reward, horizon), and
the ids that name its maze. The data and runs of divo_antmaze.py: test_antmaze_e2e.py."""

import glob
import os
import tempfile

import mujoco
import numpy as np
import pytest
from gymnasium.envs.mujoco import ant_v5

import divo_antmaze
from divo_utils import ANTMAZE_IDS, InputError
from divo_utils import maze_of
from divo_utils.args import check_env_id
from divo_utils.data import dataset_url
from divo_utils.envs import (ANTMAZE_ACT_DIM, ANTMAZE_MAPS, ANTMAZE_OFFSETS, ANTMAZE_OBS_DIM, D4RLAntMaze, antmaze_horizon,
                             restore_legacy_inertia)

MAZES = ("umaze", "medium", "large")
GOAL_RANGES = {"umaze": ((0, 1.5), (8, 9.5)), "medium": ((20, 21.5), (20, 21.5)), "large": ((32, 33.5), (24, 25.5))}
ASSETS = os.path.join(os.path.dirname(ant_v5.__file__), "assets")


def make_env(maze, legacy_inertia=True):
    env = D4RLAntMaze(maze, antmaze_horizon(maze), legacy_inertia)
    env.maze = maze
    return env


@pytest.fixture(scope="module", params=MAZES)
def env(request):
    e = make_env(request.param)
    yield e
    e.close()


def check_maze(env_id):
    check_env_id(env_id, ("antmaze",), {"locomotion": "divo_continuous.py"})  # as divo_antmaze.py checks its ids
    return maze_of(env_id)


def test_ids_and_horizons():
    assert len(ANTMAZE_IDS) == 6
    assert check_maze("antmaze-medium-play-v2") == "medium"
    assert check_maze("antmaze-umaze-diverse-v2") == "umaze"
    assert check_maze("antmaze-large-diverse-v2") == "large"
    assert check_maze("antmaze-umaze-v2") == "umaze"
    assert antmaze_horizon("umaze") == 700 and antmaze_horizon("medium") == antmaze_horizon("large") == 1000
    for bad in ["antmaze-medium-v2", "antmaze-umaze-v0"]:
        with pytest.raises(InputError, match="antmaze-large-play-v2"):
            check_maze(bad)
    with pytest.raises(InputError, match="is a locomotion dataset: run divo_continuous.py --env-id hopper-medium-v2"):
        check_maze("hopper-medium-v2")
    with pytest.raises(InputError, match="did you mean antmaze-medium-play-v2"):
        check_maze("antmaze-medium-ply-v2")
    assert dataset_url("antmaze-umaze-diverse-v2").endswith(
        "ant_maze_v2/Ant_maze_u-maze_noisy_multistart_True_multigoal_True_sparse_fixed.hdf5")
    assert dataset_url("antmaze-large-play-v2").endswith(
        "ant_maze_v2/Ant_maze_hardest-maze_noisy_multistart_True_multigoal_False_sparse_fixed.hdf5")


def test_walls_match_d4rl_map(env):
    m = env.model
    boxes = [g for g in range(m.ngeom) if m.geom_type[g] == mujoco.mjtGeom.mjGEOM_BOX]
    pos, size = m.geom_pos[boxes, :2], m.geom_size[boxes, :2]
    rows = ANTMAZE_MAPS[env.maze]
    assert len(boxes) == sum(row.count("1") for row in rows)
    for i, row in enumerate(rows):
        for j, c in enumerate(row):
            p = np.array([4.0 * (j - 1), 4.0 * (i - 1)]) + np.array(ANTMAZE_OFFSETS[env.maze])
            inside = np.all(np.abs(p - pos) < size, axis=1).any()
            assert inside == (c == "1"), (env.maze, i, j, c)


def test_start_and_goal_cells(env):
    assert np.allclose(env.start_xy, 0.0)
    lo = np.array([GOAL_RANGES[env.maze][0][0], GOAL_RANGES[env.maze][1][0]])
    assert np.allclose(env.goal_cell_xy, lo)


def test_reset_start_state(env):
    for seed in range(20):
        obs, info = env.reset(seed=seed)
        assert obs.shape == (29,) and info == {} and obs.dtype == np.float64
        assert np.all(np.abs(obs[:2]) <= 0.1)
        assert np.all(np.abs(obs[2:15] - env.model.qpos0[2:15]) <= 0.1)
        assert np.allclose(obs[:2], env.data.body("torso").xpos[:2] - env.offset)
        assert env.data.time == 0.0


def test_goal_distribution(env):
    (x0, x1), (y0, y1) = GOAL_RANGES[env.maze]
    env.reset(seed=0)
    goals = []
    for _ in range(500):
        env.reset()  # unseeded resets continue the generator and resample the goal
        goals.append(env.goal.copy())
    goals = np.array(goals)
    assert np.all((goals[:, 0] >= x0) & (goals[:, 0] <= x1) & (goals[:, 1] >= y0) & (goals[:, 1] <= y1))
    assert len(np.unique(goals[:, 0])) == len(goals)
    assert goals[:, 0].max() - goals[:, 0].min() > 1.0 and goals[:, 1].max() - goals[:, 1].min() > 1.0


@pytest.mark.parametrize("dist, success", [(0.49, True), (0.51, False)])
def test_success_radius(dist, success):
    env = make_env("medium")
    env.reset(seed=0)
    qpos = env.model.qpos0.copy()
    qpos[:2] = np.array([20.0, 20.0]) + env.offset  # goal cell centre, placed by qpos
    qvel = np.zeros(env.model.nv)
    action = np.zeros(8)

    def place():
        mujoco.mj_resetData(env.model, env.data)
        env.ant.set_state(qpos, qvel)

    place()
    xy_next = env.step(action)[0][:2]  # where the torso is after one step from this state
    place()
    env.goal = xy_next + dist * np.array([0.6, 0.8])
    obs, reward, terminated, truncated, _ = env.step(action)
    assert np.array_equal(obs[:2], xy_next)
    assert np.isclose(np.linalg.norm(obs[:2] - env.goal), dist)
    assert reward == float(success) and terminated == success and not truncated
    env.close()


def test_horizon_truncation():
    for maze, horizon in [("umaze", 700), ("large", 1000)]:
        env = make_env(maze)
        assert env.horizon == horizon
        env.reset(seed=0)
        for t in range(1, horizon + 1):
            _, reward, terminated, truncated, _ = env.step(np.zeros(8))
            assert not terminated and reward == 0.0
            assert truncated == (t == horizon)
        env.reset(seed=1)
        assert not env.step(np.zeros(8))[3]
        env.close()


def test_observation_layout(env):
    obs, _ = env.reset(seed=5)
    rng = np.random.default_rng(0)
    for _ in range(20):
        obs = env.step(rng.uniform(-1, 1, 8))[0]
    d = env.data
    assert obs.shape == (ANTMAZE_OBS_DIM,) == (29,)
    assert np.array_equal(obs[:2], d.qpos[:2] - env.offset)
    fresh = mujoco.MjData(env.model)  # xpos in `d` lags by one substep; recompute kinematics on a copy
    fresh.qpos[:] = d.qpos
    mujoco.mj_kinematics(env.model, fresh)
    assert np.allclose(obs[:2], fresh.body("torso").xpos[:2] - env.offset)
    assert np.array_equal(obs[2:15], d.qpos[2:15]) and np.array_equal(obs[15:], d.qvel[:14])


def test_action_scaling(env):
    env.reset(seed=0)
    env.step(np.full(8, 0.5))
    assert np.allclose(env.data.ctrl, 15.0)
    env.step(np.full(8, 1.0))
    assert np.allclose(env.data.ctrl, 30.0)
    env.step(np.array([2.0, -3.0, -1.0, 0.1, 0.0, 1.5, -0.5, 1.0]))
    assert np.allclose(env.data.ctrl, [30, -30, -30, 3, 0, 30, -15, 30])


def test_d4rl_ant_model(env):
    m = env.model
    assert m.opt.timestep == 0.02 and env.ant.frame_skip == 5 and np.isclose(env.ant.dt, 0.1)
    assert m.opt.integrator == mujoco.mjtIntegrator.mjINT_RK4
    assert m.nu == ANTMAZE_ACT_DIM == 8 and m.nq == 15 and m.nv == 14
    assert np.all(m.actuator_gear[:, 0] == 1.0) and np.all(m.actuator_gear[:, 1:] == 0.0)
    assert np.all(m.actuator_ctrlrange == [-30.0, 30.0]) and np.all(m.actuator_ctrllimited == 1)
    ant_geoms = [g for g in range(m.ngeom) if m.geom_bodyid[g] > 0]
    assert np.allclose(m.geom_solref[ant_geoms], [0.02, 1.0])
    assert np.allclose(m.geom_solimp[ant_geoms, :3], [0.8, 0.8, 0.01])
    env.reset(seed=0)
    env.step(np.zeros(8))
    assert np.isclose(env.data.time, 0.1)


def test_legacy_inertia():
    patched, plain = make_env("umaze"), make_env("umaze", legacy_inertia=False)
    m_new, m_old = plain.model.body_mass.sum(), patched.model.body_mass.sum()
    assert m_old < m_new - 0.01  # exact capsules are heavier than MuJoCo 2.x's extended cylinders
    assert np.isclose(patched.model.body_mass[1], plain.model.body_mass[1])  # the sphere torso is unchanged
    assert np.allclose(patched.model.body_subtreemass[0], m_old)  # mj_setConst refreshed derived quantities
    patched.close(), plain.close()
    for name, legacy_total, exact_total in [("hopper", 15.265, 15.820), ("walker2d", 22.698, 23.677)]:
        path = os.path.join(ASSETS, f"{name}.xml")
        model = mujoco.MjModel.from_xml_path(path)
        assert abs(model.body_mass.sum() - exact_total) < 1e-3
        restore_legacy_inertia(model, mujoco.MjData(model), path)
        assert abs(model.body_mass.sum() - legacy_total) < 1e-3


def test_no_temp_files_left(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    sentinel = tmp_path / "ant_maze.xml"  # someone else's file with the library's fixed name
    sentinel.write_text("not ours")
    before = sorted(os.listdir(tmp_path))
    for maze in MAZES:
        make_env(maze).close()
    assert sorted(os.listdir(tmp_path)) == before and sentinel.read_text() == "not ours"
    assert tempfile.tempdir == str(tmp_path)


def test_no_ant_maze_files_in_system_tempdir():
    pattern = os.path.join(tempfile.gettempdir(), "ant_maze*.xml")
    before = sorted(glob.glob(pattern))
    make_env("large").close()
    assert sorted(glob.glob(pattern)) == before


def test_seed_reproducibility():
    def rollout(env, seed):
        rng = np.random.default_rng(123)
        obs = [env.reset(seed=seed)[0]]
        goal = env.goal.copy()
        for _ in range(100):
            obs.append(env.step(rng.uniform(-1, 1, 8))[0])
        return np.array(obs), goal

    a, b = make_env("medium"), make_env("medium")
    o1, g1 = rollout(a, 7)
    rollout(a, 8)
    o2, g2 = rollout(a, 7)
    o3, g3 = rollout(b, 7)
    o4, g4 = rollout(b, 8)
    assert np.array_equal(o1, o2) and np.array_equal(o1, o3) and np.array_equal(g1, g2) and np.array_equal(g1, g3)
    assert not np.array_equal(o1, o4) and not np.array_equal(g1, g4)
    a.close(), b.close()
