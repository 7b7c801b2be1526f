"""Evaluation envs that match the data: D4RL's MuJoCo locomotion (with D4RL's link masses), D4RL's AntMaze, and the
envs a Minari dataset records (docs/envs.md)."""

import contextlib
import io
import os
import shutil
import sys
import tempfile
import threading
import warnings
import xml.etree.ElementTree as ET
from typing import Optional

import gymnasium as gym
import mujoco
import numpy as np

from divo_utils import GYM_IDS, InputError

ANTMAZE_OBS_DIM, ANTMAZE_ACT_DIM = 29, 8  # D4RL's AntMaze: [x, y, qpos[2:15], qvel[0:14]]; 8 joint torques


def restore_legacy_inertia(model: mujoco.MjModel, data: mujoco.MjData, xml_path: str) -> None:
    """Give `model` the masses MuJoCo 2.x computed: each capsule as a cylinder extended by r/2 per end."""
    spec = mujoco.MjSpec.from_file(xml_path)
    for geom in spec.geoms:
        if geom.type != mujoco.mjtGeom.mjGEOM_CAPSULE:
            continue
        radius = geom.size[0]
        if np.isnan(geom.fromto[0]):  # capsule given by half-length
            geom.size = [radius, geom.size[1] + radius / 2, 0.0]
        else:  # capsule given by its two end points
            p0, p1 = np.array(geom.fromto[:3]), np.array(geom.fromto[3:])
            axis = (p1 - p0) / np.linalg.norm(p1 - p0)
            geom.fromto = np.concatenate([p0 - axis * radius / 2, p1 + axis * radius / 2])
        geom.type = mujoco.mjtGeom.mjGEOM_CYLINDER
    legacy = spec.compile()
    for name in ("body_mass", "body_inertia", "body_ipos", "body_iquat"):
        getattr(model, name)[:] = getattr(legacy, name)
    mujoco.mj_setConst(model, data)


def make_eval_env(robot: str, legacy_inertia: bool, **render) -> gym.Env:
    """One D4RL-faithful evaluation env (1000-step limit, D4RL observation and reward); `render`: gymnasium's
    render_mode, width and height, for --capture-video."""
    with warnings.catch_warnings():  # v4 is deliberate: v5 changed Hopper's reward and Walker2d's friction
        warnings.filterwarnings("ignore", message=".*is out of date.*")
        env = gym.make(GYM_IDS[robot], **render)
    if legacy_inertia:
        restore_legacy_inertia(env.unwrapped.model, env.unwrapped.data, env.unwrapped.fullpath)
    return env


def make_minari_env(dataset, **kwargs) -> gym.Env:
    """The evaluation env a Minari dataset records (its eval env spec, else its data env's), made with `kwargs`, its
    observations flattened as the dataset's are."""
    try:
        env = dataset.recover_environment(eval_env=True, **kwargs)
    except Exception as e:  # no env spec in the metadata, a package the env needs, ...
        raise InputError(f"cannot make the evaluation env of the Minari dataset {dataset.spec.dataset_id} "
                         f"({type(e).__name__}: {e})") from e
    return gym.wrappers.FlattenObservation(env) if isinstance(env.observation_space, gym.spaces.Dict) else env


# --------------------------------------------------------------------------------------------------------------
# D4RL's AntMaze, rebuilt on gymnasium-robotics' maze (docs/envs.md)
# --------------------------------------------------------------------------------------------------------------


ANTMAZE_MAPS = {
    "umaze": ["11111", "1r001", "11101", "1g001", "11111"],
    "medium": ["11111111", "1r011001", "10010001", "11000111", "10010001", "10100101", "100010g1", "11111111"],
    "large": ["111111111111", "1r0001000001", "101101010101", "100000010001", "101111011101", "100101000001",
              "110101010111", "100100010g01", "111111111111"],
}
ANTMAZE_OFFSETS = {"umaze": (-4.0, -4.0), "medium": (-10.0, -10.0), "large": (-18.0, -12.0)}  # D4RL = gym - offset


def write_d4rl_ant_xml(path: str) -> None:
    """D4RL's ant: gymnasium's ant.xml with timestep 0.02, D4RL's contact defaults, gear 1, ctrlrange +-30."""
    from gymnasium.envs.mujoco import ant_v5

    tree = ET.parse(os.path.join(os.path.dirname(ant_v5.__file__), "assets", "ant.xml"))
    tree.find("option").set("timestep", "0.02")  # with frame skip 5: dt = 0.1
    tree.find("default/geom").set("solref", ".02 1")
    tree.find("default/geom").set("solimp", ".8 .8 .01")
    for motor in tree.iter("motor"):
        motor.attrib.pop("gear", None)
        motor.set("ctrlrange", "-30 30")
    tree.write(path)


def import_ant_maze_env() -> type:
    """gymnasium-robotics' AntMazeEnv, without the unrelated AdroitHand notice it prints on import."""
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        from gymnasium_robotics.envs.maze.ant_maze_v5 import AntMazeEnv  # the class of AntMaze_UMaze-v5
    sys.stderr.write("".join(line for line in captured.getvalue().splitlines(True) if "AdroitHand" not in line))
    return AntMazeEnv


@contextlib.contextmanager
def private_tempdir(prefix: str):
    """Point `tempfile` at a new folder for the block, then remove it: gymnasium-robotics 1.4.2 writes a temporary
    ant_maze*.xml on every maze construction and never deletes it."""
    tmp_dir, saved_tempdir = tempfile.mkdtemp(prefix=prefix), tempfile.tempdir
    tempfile.tempdir = tmp_dir
    try:
        yield tmp_dir
    finally:
        tempfile.tempdir = saved_tempdir
        shutil.rmtree(tmp_dir, ignore_errors=True)


class D4RLAntMaze(gym.Env):
    """D4RL's antmaze-*-v2 evaluation episodes: its maze, ant, start and goal sampling, observation and reward."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (ANTMAZE_OBS_DIM,), np.float64)
    action_space = gym.spaces.Box(-1.0, 1.0, (ANTMAZE_ACT_DIM,), np.float32)
    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}  # dt = 0.1 s

    def __init__(self, maze: str, horizon: int, legacy_inertia: bool = True, render_mode: Optional[str] = None,
                 width: int = 480, height: int = 480):
        self.render_mode, self.size, self.renderers = render_mode, (height, width), {}
        self.extent = 4.0 * max(len(ANTMAZE_MAPS[maze]), len(ANTMAZE_MAPS[maze][0]))  # the maze's larger side, m
        AntMazeEnv = import_ant_maze_env()
        rows = ANTMAZE_MAPS[maze]
        start, goal = ((i, row.index(c)) for c in "rg" for i, row in enumerate(rows) if c in row)
        self.start_xy = 4.0 * np.array([start[1] - 1, start[0] - 1])  # D4RL's origin (0, 0)
        self.goal_cell_xy = 4.0 * np.array([goal[1] - 1, goal[0] - 1])
        self.offset, self.horizon = np.array(ANTMAZE_OFFSETS[maze]), horizon
        # gymnasium-robotics' row 0 is at the top (largest y), D4RL's row index grows with y: reverse the rows
        maze_map = [[int(c) if c in "01" else c for c in row] for row in reversed(rows)]
        with private_tempdir("d4rl_antmaze_") as tmp_dir:
            ant_xml = os.path.join(tmp_dir, "d4rl_ant.xml")
            write_d4rl_ant_xml(ant_xml)
            self.env = AntMazeEnv(maze_map=maze_map, xml_file=ant_xml, reward_type="sparse", continuing_task=True,
                                  reset_target=False, include_cfrc_ext_in_observation=False)
            self.ant = self.env.ant_env  # the MuJoCo env of the maze model; reset and step are driven here
            if legacy_inertia:
                restore_legacy_inertia(self.ant.model, self.ant.data, self.env.tmp_xml_file_path)
        self.model, self.data = self.ant.model, self.ant.data
        self.goal, self.t = self.goal_cell_xy.copy(), 0

    def observation(self) -> np.ndarray:
        """D4RL's 29 numbers: [x, y in D4RL's frame, qpos[2:15], qvel[0:14]]."""
        return np.concatenate([self.data.qpos[:2] - self.offset, self.data.qpos[2:15], self.data.qvel[:14]])

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None) -> tuple[np.ndarray, dict]:
        """D4RL's goal (goal cell + U(0, 1) + U(0, 0.5) per axis) and noisy start at the start cell."""
        super().reset(seed=seed)  # a seed restarts self.np_random; without one it continues
        rng = self.np_random
        self.goal = np.maximum(self.goal_cell_xy + rng.uniform(0, 1, 2) + rng.uniform(0, 0.5, 2), 0.0)
        self.model.site_pos[self.env.target_site_id][:2] = self.goal + self.offset  # the goal marker, for renders
        qpos = self.model.qpos0.copy()
        qpos[:2] = self.start_xy + self.offset
        qpos += rng.uniform(-0.1, 0.1, self.model.nq)
        qvel = 0.1 * rng.standard_normal(self.model.nv)
        mujoco.mj_resetData(self.model, self.data)
        self.ant.set_state(qpos, qvel)
        self.t = 0
        return self.observation(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        """Torques 30 x action (D4RL's NormalizedBoxEnv), clipped; reward 1 and the end within 0.5 of the goal."""
        low, high = self.model.actuator_ctrlrange.T
        self.ant.do_simulation(np.clip(30.0 * np.asarray(action, dtype=np.float64), low, high), self.ant.frame_skip)
        self.t += 1
        obs = self.observation()
        success = bool(np.linalg.norm(obs[:2] - self.goal) <= 0.5)
        return obs, float(success), success, self.t >= self.horizon, {}

    def render(self) -> Optional[np.ndarray]:
        """A top view of the whole maze, the ant and the goal marker (render_mode "rgb_array")."""
        if self.render_mode != "rgb_array":
            return None
        # one renderer per thread: an OpenGL context is current in one thread (evaluate steps envs in a pool)
        renderer = self.renderers.get(threading.get_ident())
        if renderer is None:
            renderer = self.renderers[threading.get_ident()] = mujoco.Renderer(self.model, *self.size)
        camera = mujoco.MjvCamera()  # a free camera above the maze's centre (the world origin), looking down
        camera.lookat[:], camera.distance = (0.0, 0.0, 0.0), 1.25 * self.extent
        camera.elevation, camera.azimuth = -90.0, 90.0
        renderer.update_scene(self.data, camera)
        return renderer.render()

    def close(self) -> None:
        for renderer in self.renderers.values():
            with contextlib.suppress(Exception):  # a context made current in another thread may refuse to go
                renderer.close()
        self.renderers.clear()
        self.env.close()


def antmaze_horizon(maze: str) -> int:
    """D4RL's episode length: 700 steps in umaze, 1000 in medium and large."""
    return 700 if maze == "umaze" else 1000


def make_minari_mazes(dataset, count: int) -> list[gym.Env]:
    """`count` copies of the maze a Minari dataset records for evaluation, each episode ending at the goal
    (continuing_task=False) so that its return is 1 for a success and 0 otherwise, as in D4RL."""
    import_ant_maze_env()  # gymnasium-robotics, imported without its unrelated notice
    with private_tempdir("minari_antmaze_"):
        envs = [make_minari_env(dataset, continuing_task=False) for _ in range(count)]
    walls = [[[cell == 1 for cell in row] for row in spec.kwargs.get("maze_map", [])]
             for spec in (dataset.env_spec or envs[0].spec, envs[0].spec)]
    print(f"evaluation {envs[0].spec.id} as the dataset records it, each episode ending at the goal: the score is "
          "100 x the success rate")
    if walls[0] != walls[1]:
        print("warning: the evaluation maze's walls differ from those of the maze the data come from (a known issue of "
              "Minari's D4RL/antmaze/umaze datasets, Farama-Foundation/Minari#304): the score measures another maze")
    return envs
