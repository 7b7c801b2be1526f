"""divo_utils: the infrastructure the DIVO scripts share, written once (as CleanRL's scripts import `cleanrl_utils`).

The scripts (`divo_continuous.py`, `divo_antmaze.py`, `pad_pretrain.py`) hold DIVO itself; what is here is what a run
needs around it. Copying a script into another project means copying this folder with it.

    files        a run folder's files without torch: the lock, atomic writes, JSON (the sweep and report share them)
    args         the checks of the command line: the env id, the values every script refuses
    runs         a run's folder: checkpoints, the finished file, stop signals, divergence, the progress line
    resume       --resume: the command line under the checkpoint's arguments, what may differ, restoring the run
    data         D4RL files (download, checks) and Minari datasets behind one call, `load_task`
    envs         evaluation envs: MuJoCo locomotion with D4RL's masses, D4RL's AntMaze, Minari's recorded envs
    speed        --compile and --cudagraphs around one training step
    diagnostics  does ADPO's contest exploit the critics; how well PAD's model fits the data

This file imports neither torch nor MuJoCo, so that `tools/sweep.py` and `tools/report.py` read the ids, file names,
limits and the domain of an id from here on a machine that only launches runs. No module of this package imports a
script or knows which script calls it: each takes values (a domain, sizes, paths, options) and returns values.

Imports, from the bottom up (no arrow back):  __init__ <- files <- runs <- resume;  __init__ <- args;
__init__, files <- data;  envs, video, speed (<- runs), diagnostics stand alone.
"""

import os

# D4RL's locomotion datasets: robot -> the Gymnasium env that matches D4RL's (v4: v5 changed rewards and friction)
GYM_IDS = {"halfcheetah": "HalfCheetah-v4", "hopper": "Hopper-v4", "walker2d": "Walker2d-v4"}
LEVELS = ("random", "medium", "medium-replay", "medium-expert", "expert", "full-replay")
LOCOMOTION_IDS = tuple(f"{robot}-{level}-v2" for robot in GYM_IDS for level in LEVELS)
# D4RL's AntMaze datasets
ANTMAZE_TASKS = ("umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play", "large-diverse")
ANTMAZE_IDS = tuple(f"antmaze-{task}-v2" for task in ANTMAZE_TASKS)

MAZES = ("umaze", "medium", "large")
# A run's checkpoint and the file it writes last (its presence means every file of the run is final): a DIVO run's
# (divo_continuous.py, divo_antmaze.py) and a PAD pretraining's (pad_pretrain.py)
DIVO_FILES = ("checkpoint.pt", "scores.json")
PAD_FILES = ("pad_checkpoint.pt", "pad_diagnostics.json")
# Arguments that name files a run reads: stored as absolute paths, so that --resume works from any folder (and made
# absolute by tools/sweep.py, whose runs work in the sweep's folder).
PATH_ARGS = ("dataset_path", "pad_checkpoint")
LOCK = "lock"  # the file a run's writer holds locked (flock) for its whole life, naming that process
MAX_NAME = 200  # bytes of --run-name (a file name has at most 255)
MAX_EXP_NAME = 150  # bytes of --exp-name: the default run name adds up to ~60
MIN_TRANSITIONS = 20  # the diagnostics compare half of the states with their 10 nearest neighbours in the other half


class InputError(SystemExit):
    """Bad input from the user: exits with one message that says what is wrong and what to do."""

    def __init__(self, message: str):
        super().__init__(f"error: {message}")


def flag(name: str, value=None) -> str:
    """The command-line spelling of an argument (`--no-x` for a boolean x that is off)."""
    return ("--no-" if value is False else "--") + name.replace("_", "-")


def is_folder_name(name: str, limit: int) -> bool:
    """Whether `name` can name one folder: no path in it, not `.` or `..`, no control character (a newline would
    break every line that names the run), no space at either end, at most `limit` bytes."""
    return os.path.basename(name) == name and name not in ("", ".", "..") and name.strip() == name \
        and not any(ord(c) < 32 or ord(c) == 127 for c in name) and len(os.fsencode(name)) <= limit


def is_minari_id(env_id: str) -> bool:
    """Whether --env-id names a Minari dataset (namespace/name-vN, e.g. mujoco/hopper/medium-v0), not a D4RL one."""
    return "/" in env_id


def domain_of(env_id: str) -> str:
    """Which domain a D4RL or Minari id (or a run, by its env_id) is: "antmaze" (antmaze-*-v2, or a Minari id with
    antmaze in its namespace, e.g. D4RL/antmaze/umaze-v1) or "locomotion" (every other id)."""
    if is_minari_id(env_id):
        return "antmaze" if "antmaze" in env_id.split("/")[:-1] else "locomotion"
    return "antmaze" if env_id.startswith("antmaze-") else "locomotion"


def robot_of(env_id: str) -> str:
    """The robot of a D4RL locomotion id (hopper-medium-v2: hopper)."""
    return env_id.split("-")[0]


def maze_of(env_id: str) -> str:
    """The maze (umaze, medium or large) of an AntMaze id: D4RL's antmaze-medium-play-v2, or Minari's
    D4RL/antmaze/medium-play-v1, whose name must begin with its maze; else stop."""
    maze = env_id.split("/")[-1].split("-")[0] if is_minari_id(env_id) else env_id.split("-")[1]
    if maze not in MAZES:
        raise InputError(f"the Minari AntMaze id {env_id} must name its maze first (umaze, medium or large), as "
                         "D4RL/antmaze/medium-play-v1 does: it picks --alpha")
    return maze


def run_mode(args: dict) -> str:
    """The algorithm a DIVO run trains (its arguments, or an args.json), as scores.json and the report name it."""
    return "td3bc" if args.get("adpo") is False else "divo-no-pad" if args.get("pad") is False else "divo"


def task_name(args: dict) -> str:
    """The data a run learns from (its arguments, or an args.json): the id, or the name of a local file."""
    if args.get("dataset_path"):
        return os.path.splitext(os.path.basename(args["dataset_path"]))[0]
    return str(args.get("env_id", "unknown-task"))
