"""divo_utils: the infrastructure the DIVO scripts share, written once (as CleanRL's scripts import `cleanrl_utils`).

The scripts (`divo_continuous.py`, `divo_antmaze.py`, `pad_pretrain.py`) hold DIVO itself; what is here is what a run
needs around it. Copying a script into another project means copying this folder with it.

    args         the command line: ranges, --resume (the checkpoint's arguments), what may differ on resume
    runs         a run's folder: lock, atomic files, checkpoints, resume, the finished file, stop signals,
                 divergence, the progress line
    data         D4RL files (download, checks) and Minari datasets behind one call, `load_task`
    envs         evaluation envs: MuJoCo locomotion with D4RL's masses, D4RL's AntMaze, Minari's recorded envs
    speed        --compile and --cudagraphs around one training step
    diagnostics  does ADPO's contest exploit the critics; how well PAD's model fits the data

This file imports neither torch nor MuJoCo, so that `tools/sweep.py` reads the ids, file names and limits from here
on a machine that only launches runs. No module of this package imports a script.
"""

import os

# D4RL's locomotion datasets: robot -> the Gymnasium env that matches D4RL's (v4: v5 changed rewards and friction)
GYM_IDS = {"halfcheetah": "HalfCheetah-v4", "hopper": "Hopper-v4", "walker2d": "Walker2d-v4"}
LEVELS = ("random", "medium", "medium-replay", "medium-expert", "expert", "full-replay")
LOCOMOTION_IDS = tuple(f"{robot}-{level}-v2" for robot in GYM_IDS for level in LEVELS)
# D4RL's AntMaze datasets
ANTMAZE_TASKS = ("umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play", "large-diverse")
ANTMAZE_IDS = tuple(f"antmaze-{task}-v2" for task in ANTMAZE_TASKS)

# Each script's checkpoint and the file it writes last (its presence means every file of the run is final).
RUN_FILES = {
    "divo_continuous": ("checkpoint.pt", "scores.json"),
    "divo_antmaze": ("checkpoint.pt", "scores.json"),
    "pad_pretrain": ("pad_checkpoint.pt", "pad_diagnostics.json"),
}
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
    """Whether `name` can name one folder: no path in it, not `.` or `..`, at most `limit` bytes."""
    return os.path.basename(name) == name and name not in ("", ".", "..") and "\0" not in name \
        and len(os.fsencode(name)) <= limit


def is_minari_id(env_id: str) -> bool:
    """Whether --env-id names a Minari dataset (namespace/name-vN, e.g. mujoco/hopper/medium-v0), not a D4RL one."""
    return "/" in env_id
