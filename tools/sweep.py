"""The paper's grid (tasks x seeds) of DIVO runs on Ray: on one machine, or on a cluster.

Every (task, seed) is one Ray task that runs divo_continuous.py (locomotion ids) or divo_antmaze.py (antmaze-* ids) as
a subprocess in the sweep's folder `--out` (default sweeps/{label}): the run writes `{out}/runs/{task}__{label}__{seed}/`
and its output goes to `{out}/logs/{task}__{label}__{seed}.log`. A failed run is retried from its own checkpoint
(`--max-retries`), but not one whose script refused its input (an `error:` line), and running the same command again
continues an interrupted sweep: finished runs are skipped, unfinished ones resume from their last checkpoint. A run
folder that another process writes (its lock file held, e.g. by a second sweep on the same --out) is left alone. At
the end, tools/report.py writes `{out}/report/` (Table I, rliable aggregates, curves) from the runs that finished.
Arguments after `--` go to every run unchanged, except that a relative --pad-checkpoint is made absolute (the runs
work in the sweep's folder, where it would name another file). Ctrl-C (or SIGTERM) stops the sweep: running runs write
a checkpoint first, and the same command continues them. A finished (or resumable) run made with other arguments than
this sweep passes stops the sweep before anything starts, with one line naming the runs and what differs (use another
--label or --out for other arguments); only a larger --total-timesteps is not a mismatch: it extends the finished runs
from their checkpoints. `--script pad_pretrain.py` pretrains a PAD model per (task, seed).

One machine (Ray is started for the sweep and stopped after it):
    pip install -r requirements-tools.txt
    python tools/sweep.py --suite paper --seeds 0 1 2 3 4                          # the paper's 15 tasks x 5 seeds
    python tools/sweep.py --suite locomotion --seeds 0 1 2 --runs-per-gpu 4 -- --no-adpo --total-timesteps 500000
    python tools/sweep.py --env-ids hopper-medium-v2 walker2d-medium-v2 --seeds 0 1 --dataset-dir ~/d4rl_files
    python tools/sweep.py --suite minari-locomotion --seeds 0 1 2                  # Minari's datasets (docs/data.md)
    python tools/sweep.py --suite paper --seeds 0 1 2 3 4 --dry-run                # print the planned commands only

A cluster (the repository, the Python environment and `--out` at the same paths on every node; `--out` on a disk every
node shares), as tests/test_cluster.py runs it on two nodes (docs/reproducing.md):
    export RAY_AUTH_MODE=token            # on every node and for the sweep (Ray 2.52+; Ray's default from 2.61)
    ray get-auth-token --generate         # on the head: makes ~/.ray/auth_token; copy that file to every node
    ray start --head --port 6379                                 # on the head node
    ray start --address HEAD_IP:6379                             # on every other node
    python tools/sweep.py --suite paper --seeds 0 1 2 3 4 --address HEAD_IP:6379 --out /shared/sweeps/divo  # on the head
    ray stop                                                     # on every node, when done
A node lost mid-sweep: Ray retries each run it held on the nodes left (--max-retries), and the retry continues the
run's checkpoint in the shared --out; each run's line and log name the node it ran on.
"""

import contextlib
import difflib
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Literal, Optional

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: the training scripts live here
sys.path.insert(0, ROOT)  # divo_utils, whose package imports no torch: the ids, file names and limits
from divo_utils import (ANTMAZE_IDS, DIVO_FILES, LOCK, LOCOMOTION_IDS, MAX_EXP_NAME, MAX_NAME,  # noqa: E402
                        PAD_FILES, PATH_ARGS, domain_of, flag, is_minari_id)
from divo_utils.files import read_json, try_lock  # noqa: E402

LOCOMOTION_SCRIPT, ANTMAZE_SCRIPT = "divo_continuous.py", "divo_antmaze.py"
SUITES = {
    "locomotion": [f"{robot}-{level}-v2" for level in ("medium", "medium-replay", "medium-expert")
                   for robot in ("halfcheetah", "hopper", "walker2d")],
    "antmaze": list(ANTMAZE_IDS),
}
SUITES["paper"] = SUITES["locomotion"] + SUITES["antmaze"]
# Minari ids (namespace/name-vN) are not listed above: the scripts check them. This suite is Minari's re-collection
# of the locomotion tasks in Gymnasium's v5 envs (docs/data.md).
SUITES["minari-locomotion"] = [f"mujoco/{robot}/{level}-v0" for level in ("medium", "expert")
                               for robot in ("halfcheetah", "hopper", "walker2d")]
# Arguments the sweep sets for every run itself; passing them after `--` is refused.
SWEEP_FLAGS = ("--env-id", "--seed", "--exp-name", "--run-name", "--resume", "--dataset-path")
ATTEMPT_HEADER = "=== sweep attempt"  # the first words of the line the log gets before every attempt
MAX_LABEL, MAX_RUN_NAME = MAX_EXP_NAME, MAX_NAME  # bytes of a run's --exp-name and --run-name, as the scripts take
# A script's progress line: "[ 12.0%] step 120,000/1,000,000 | 1,234 steps/s | ..."
NODE_CHECK_EVERY = 2.0  # seconds between the sweep's looks at which Ray nodes are alive
PROGRESS = "progress.json"  # what a run writes of its progress (divo_utils.runs.Run.report_progress)
COMPARE_FLAG = "--compare-arguments"  # this file run as check_existing_runs' subprocess


@dataclass
class Args:
    suite: Optional[str] = None
    """the tasks: `locomotion` (9 Gym-MuJoCo), `antmaze` (6), `paper` (all 15 of Table I) or `minari-locomotion` (6
    Minari datasets); or give --env-ids"""
    env_ids: list[str] = field(default_factory=list)
    """D4RL or Minari ids to run instead of a suite, e.g. hopper-medium-v2 antmaze-umaze-v2 mujoco/hopper/medium-v0"""
    datasets: list[str] = field(default_factory=list)
    """instead of a suite or ids: local files as ENV_ID=FILE, e.g. hopper-medium-v2=data/my-hopper.hdf5; each task is
    named after its file, and ENV_ID names its evaluation env and score"""
    script: Optional[str] = None
    """the training script of every task (default: divo_antmaze.py for antmaze-* ids, else divo_continuous.py)"""
    seeds: list[int] = field(default_factory=list)
    """the seeds of every task, e.g. 0 1 2 3 4"""
    label: str = "divo"
    """the runs' --exp-name: the column of the report's table, and part of every run name {task}__{label}__{seed}"""
    out: Optional[str] = None
    """the sweep's folder, holding runs/, logs/ and report/ (default sweeps/{label}); on a cluster, a shared path"""
    dataset_dir: Optional[str] = None
    """train on local D4RL files DIR/{env_id}.hdf5 or DIR/{env_id without -v2}.hdf5 instead of downloading"""
    runs_per_gpu: int = 1
    """runs sharing one GPU (each asks Ray for 1/N GPU) when the cluster has GPUs"""
    cpus_per_run: int = 1
    """CPUs Ray reserves for each run, also its OMP_NUM_THREADS"""
    address: Optional[str] = None
    """join a running Ray cluster (`auto`, or HOST:PORT of `ray start --head`) instead of starting Ray here"""
    num_cpus: Optional[int] = None
    """with a local Ray: the CPUs it may use (default all), which bounds the runs at a time"""
    temp_dir: Optional[str] = None
    """with a local Ray: its temporary folder (default Ray's /tmp/ray; keep it short, it holds Unix sockets)"""
    max_retries: int = 2
    """times a failed run is started again (from its last checkpoint) before it counts as failed; a run whose
    node is lost is retried the same way (Ray's max_retries)"""
    status_every: float = 30.0
    """seconds between two status lines"""
    report_reps: int = 2000
    """bootstrap replications of the report's confidence intervals (tools/report.py's --reps)"""
    dry_run: bool = False
    """print the planned commands and exit without starting Ray"""


class SweepError(Exception):
    """Bad input: main() prints it as one `error: ` line and exits 1."""


class RunFailed(Exception):
    """A run's script failed (killed, crashed); raised inside the Ray task so that Ray retries it."""


class RunRefused(Exception):
    """A run that no retry would help: its script refused its input (an `error:` line), or another process writes it."""


@dataclass(frozen=True)
class Run:
    """One (task, seed) of the grid."""

    env_id: str
    seed: int
    script: str
    """absolute path of the training script"""
    dataset_path: Optional[str]
    """absolute path of the local D4RL file, or None to let the script download the dataset"""
    name: str
    """the run's folder under {out}/runs and its log's name under {out}/logs"""


# ----------------------------------------------------------------------------------------------
# The command line and the grid
# ----------------------------------------------------------------------------------------------
def parse_command_line(argv: list[str]) -> tuple[Args, list[str]]:
    """The sweep's own arguments, and those after the first `--` that go to every run (files made absolute)."""
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    description = (f"{__doc__.splitlines()[0]} Arguments after `--` go to every run unchanged, e.g. `-- --no-adpo`, "
                   "except that a file they name (--pad-checkpoint) is made absolute: a run works in the sweep's folder.")
    return tyro.cli(Args, args=own, description=description), absolute_paths(extra)


def absolute_paths(extra: list[str]) -> list[str]:
    """`extra` with the file of each path argument (`--pad-checkpoint F` or `--pad-checkpoint=F`) made absolute from
    here: every run works in the sweep's folder (--out), where a relative path would name another file."""
    options, out, follows = {flag(name) for name in PATH_ARGS}, [], False
    for arg in extra:
        name, equals, value = arg.partition("=")
        if follows:  # the file after `--pad-checkpoint`
            arg, follows = os.path.abspath(os.path.expanduser(arg)), False
        elif name.replace("_", "-") in options:
            if not equals:
                follows = True
            elif value:
                arg = f"{name}={os.path.abspath(os.path.expanduser(value))}"
        out.append(arg)
    return out


def script_of(env_id: str) -> str:
    return ANTMAZE_SCRIPT if domain_of(env_id) == "antmaze" else LOCOMOTION_SCRIPT


def find_dataset(dataset_dir: str, env_id: str) -> tuple[Optional[str], list[str]]:
    """The task's file in `dataset_dir` (or None), and the names looked for."""
    names = [f"{env_id}.hdf5"] + ([f"{env_id[: -len('-v2')]}.hdf5"] if env_id.endswith("-v2") else [])
    for name in names:
        if os.path.isfile(os.path.join(dataset_dir, name)):
            return os.path.join(dataset_dir, name), names
    return None, names


def check_args(args: Args, extra: list[str]) -> None:
    """Stop with one message for input that cannot make a sweep."""
    if (args.suite is not None) + bool(args.env_ids) + bool(args.datasets) != 1:
        raise SweepError(f"give one of --suite ({', '.join(SUITES)}), --env-ids or --datasets")
    if args.datasets and args.dataset_dir is not None:
        raise SweepError("--datasets names each file itself: leave out --dataset-dir")
    for entry in args.datasets:
        env_id, _, path = entry.partition("=")
        if not path:
            raise SweepError(f"--datasets {entry!r}: write ENV_ID=FILE, e.g. hopper-medium-v2=data/my-hopper.hdf5")
        if not os.path.isfile(path):
            raise SweepError(f"--datasets {entry!r}: no file at {path}")
    if args.suite is not None and args.suite not in SUITES:
        raise SweepError(f"unknown --suite {args.suite!r}: choose {', '.join(SUITES)}")
    if not args.seeds:
        raise SweepError("no seeds: pass e.g. --seeds 0 1 2 3 4")
    for values, what in ((args.seeds, "seed"), (args.env_ids, "env id")):
        twice = sorted({str(v) for v in values if values.count(v) > 1})
        if twice:
            raise SweepError(f"{what} given more than once: {', '.join(twice)}")
    if any(not 0 <= seed < 2**32 for seed in args.seeds):
        raise SweepError(f"seeds must be in [0, 4294967295], got {' '.join(map(str, args.seeds))}")
    minari = [env_id for env_id in args.env_ids + SUITES.get(args.suite, []) if is_minari_id(env_id)]
    if minari and (args.dataset_dir is not None or args.datasets):
        raise SweepError(f"{minari[0]} is a Minari id, read from Minari's store ($MINARI_DATASETS_PATH): --dataset-dir and "
                         "--datasets are for D4RL-format files")
    for env_id in [e for e in args.env_ids if not is_minari_id(e)] + [entry.partition("=")[0] for entry in args.datasets]:
        if env_id not in LOCOMOTION_IDS + ANTMAZE_IDS:
            close = difflib.get_close_matches(env_id, LOCOMOTION_IDS + ANTMAZE_IDS, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise SweepError(f"unknown env id {env_id!r}; {hint}valid ids: {', '.join(LOCOMOTION_IDS + ANTMAZE_IDS)}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", args.label):
        raise SweepError(f"--label {args.label!r} must be a folder name: letters, digits and . _ + -")
    for name, value, low in (("--runs-per-gpu", args.runs_per_gpu, 1), ("--cpus-per-run", args.cpus_per_run, 1),
                             ("--max-retries", args.max_retries, 0), ("--report-reps", args.report_reps, 1)):
        if value < low:
            raise SweepError(f"{name} must be at least {low}, got {value}")
    cpus = args.num_cpus or os.cpu_count() or 1
    if not args.address and cpus < args.cpus_per_run:
        raise SweepError(f"--cpus-per-run {args.cpus_per_run} is more than the {cpus} CPUs a local Ray has here "
                         "(--num-cpus, default all): no run could start")
    if not 0 < args.status_every < math.inf:
        raise SweepError(f"--status-every must be a positive number of seconds, got {args.status_every}")
    if args.status_every < 1:  # a line per loop of the sweep would flood the output
        raise SweepError(f"--status-every {args.status_every:g}: at most one status line a second; pass 1 or more")
    if len(args.label.encode()) > MAX_LABEL:
        raise SweepError(f"--label is {len(args.label.encode())} bytes long: the scripts take at most {MAX_LABEL}")
    if args.address and (args.num_cpus is not None or args.temp_dir):
        raise SweepError("--num-cpus and --temp-dir are for a local Ray; a cluster's are set by its `ray start`")
    taken = [arg for arg in extra if arg.partition("=")[0].replace("_", "-") in SWEEP_FLAGS]
    if taken:
        raise SweepError(f"{', '.join(taken)} after `--`: the sweep sets {', '.join(SWEEP_FLAGS)} for every run itself "
                         "(use --env-ids, --seeds, --label and --dataset-dir)")
    if args.dataset_dir is not None and not os.path.isdir(args.dataset_dir):
        raise SweepError(f"--dataset-dir {args.dataset_dir} is not a folder")
    problem = out_problem(args.out, os.path.expanduser(args.out)) if args.out is not None else None
    if problem:
        raise SweepError(problem)


def out_problem(out: str, folder: str) -> Optional[str]:
    """What keeps --out `out` (the folder `folder`) from holding a sweep's or a report's files, or None: a file where
    a folder of its path goes, a run's folder around it (one with an args.json: it holds that run's files only), or
    no right to make folders there. tools/report.py checks its --out with this too."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):  # the folder that --out would be made in
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"--out {out}: {existing} is a file, not a folder"
    around = existing  # the folders it would be in, up to /
    while not os.path.isfile(os.path.join(around, "args.json")) and os.path.dirname(around) != around:
        around = os.path.dirname(around)
    if os.path.isfile(os.path.join(around, "args.json")):
        return (f"--out {out} is inside the run folder {around} (it has an args.json), which holds that run's own files "
                "only: choose an --out outside it")
    try:  # os.access alone says yes to root, also in /proc
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        return f"--out {out}: cannot make folders in {existing} ({e.strerror or e})"
    return None


def resolve_script(script: str) -> str:
    """An explicit --script: as given (from the working directory), else relative to the repository."""
    for path in (os.path.abspath(script), os.path.join(ROOT, script)):
        if os.path.isfile(path):
            return path
    raise SweepError(f"--script {script}: no such file here or in {ROOT}")


def plan_runs(args: Args) -> list[Run]:
    """The grid, task by task and seed by seed, with each run's script, data and name."""
    if args.datasets:  # (env id, local file) pairs, as given
        tasks = [(entry.partition("=")[0], os.path.abspath(entry.partition("=")[2])) for entry in args.datasets]
    else:
        tasks = [(env_id, None) for env_id in (SUITES[args.suite] if args.suite else args.env_ids)]
    script = resolve_script(args.script) if args.script else None
    for env_id, _ in tasks:  # a known script given for the other family of ids would refuse every run
        if script and os.path.basename(script) in (LOCOMOTION_SCRIPT, ANTMAZE_SCRIPT) \
                and os.path.basename(script) != script_of(env_id):
            raise SweepError(f"{env_id} is run by {script_of(env_id)}, not by --script {args.script}")
    if args.dataset_dir is not None:
        found = [(env_id, *find_dataset(args.dataset_dir, env_id)) for env_id, _ in tasks]
        missing = [f"{env_id} (looked for {' or '.join(names)})" for env_id, path, names in found if path is None]
        if missing:
            raise SweepError(f"no dataset file in --dataset-dir {args.dataset_dir} for {'; '.join(missing)}")
        tasks = [(env_id, os.path.abspath(path)) for env_id, path, _ in found]
    # a task's folder-safe name: its file's, or its id's (a Minari id's "/" made "-")
    names = [os.path.splitext(os.path.basename(path))[0] if path else env_id.replace("/", "-") for env_id, path in tasks]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:  # the scripts name a task after its file: two files of one name would share their run folders
        raise SweepError(f"two tasks named {', '.join(twice)}: give the files different names")
    long = [name for name in names if len(f"{name}__{args.label}__{max(args.seeds)}".encode()) > MAX_RUN_NAME]
    if long:
        raise SweepError(f"the run names of {long[0]} would be longer than {MAX_RUN_NAME} bytes: shorten its file's "
                         "name or --label")
    runs = []
    for (env_id, path), task in zip(tasks, names):
        for seed in args.seeds:
            runs.append(Run(env_id, seed, script or os.path.join(ROOT, script_of(env_id)), path,
                            f"{task}__{args.label}__{seed}"))
    return runs


# ----------------------------------------------------------------------------------------------
# One run (the body of a Ray task; also used by the driver to plan)
# ----------------------------------------------------------------------------------------------
def run_files(run: Run) -> tuple[str, str]:
    """The file the run's script writes last (its presence means the run finished) and its checkpoint's."""
    checkpoint, finished = PAD_FILES if os.path.basename(run.script) == "pad_pretrain.py" else DIVO_FILES
    return finished, checkpoint


def finished_steps(out: str, run: Run) -> Optional[int]:
    """The gradient steps a finished run trained: its finished file's (scores.json's "step", pad_diagnostics.json's
    last diagnostics), else its args.json's --total-timesteps; None where neither says."""
    run_dir = os.path.join(out, "runs", run.name)
    finished = read_json(os.path.join(run_dir, run_files(run)[0]))[0] or {}
    steps = finished.get("step", (finished.get("final") or {}).get("step"))
    if not isinstance(steps, int):  # not the finished file's (scores.json of an extension that died before its first
        # checkpoint still has its old step, while args.json has the new --total-timesteps already)
        steps = (read_json(os.path.join(run_dir, "args.json"))[0] or {}).get("total_timesteps")
    return steps if isinstance(steps, int) else None


def other_results(out: str, run: Run) -> list[str]:
    """The files in the run's folder that another script writes as its checkpoint or finished file: results of a
    run of another script under the same name, which this sweep must never continue, replace or remove."""
    ours, run_dir = set(run_files(run)), os.path.join(out, "runs", run.name)
    return [name for name in (*DIVO_FILES, *PAD_FILES) if name not in ours and os.path.exists(os.path.join(run_dir, name))]


def run_state(out: str, run: Run, extend_to: Optional[int] = None) -> Literal["finished", "extend", "resume", "restart",
                                                                              "new"]:
    """What the next attempt of a run does: nothing, continue its finished run to `extend_to` steps (the sweep asks
    for more than it trained), continue its checkpoint, start over, or start."""
    run_dir, (finished, checkpoint) = os.path.join(out, "runs", run.name), run_files(run)
    if os.path.isfile(os.path.join(run_dir, finished)):
        steps = finished_steps(out, run) if extend_to is not None else None
        return "extend" if steps is not None and steps < extend_to else "finished"
    if os.path.isfile(os.path.join(run_dir, checkpoint)):
        return "resume"
    return "restart" if os.path.exists(run_dir) else "new"  # restart: an attempt died before its first checkpoint


def script_args(run: Run, label: str, state: str, extra: list[str], cuda: bool) -> list[str]:
    """The script and its arguments for an attempt (paths relative to the sweep's folder, its working directory)."""
    data = ["--dataset-path", run.dataset_path] if run.dataset_path else []
    if state in ("resume", "extend"):  # the other arguments come from the checkpoint; extend: --total-timesteps larger
        start = ["--resume", f"runs/{run.name}/{run_files(run)[1]}"]
    else:
        start = ["--env-id", run.env_id, "--seed", str(run.seed), "--exp-name", label, "--run-name", run.name]
    return [run.script, *start, *data, *(["--cuda"] if cuda else []), *extra]


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, minutes = seconds // 3600, seconds // 60 % 60
    return f"{hours}h{minutes:02d}m{seconds % 60:02d}s" if hours else f"{minutes}m{seconds % 60:02d}s"


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def last_line(path: str, offset: int) -> str:
    """The last non-empty line written to `path` after `offset` (an attempt's last words)."""
    with open(path, errors="replace") as f:
        f.seek(offset)
        lines = [line.strip() for line in f.read().splitlines() if line.strip() and not line.startswith("=== ")]
    errors = [line for line in lines if line.startswith("error: ")]
    return (errors or lines or ["(no output)"])[-1]


def this_node() -> str:
    """Where this attempt runs: the Ray node's address and the start of its id (in a Ray task; the nodes of one
    machine, such as containers, share a host name), else the host name."""
    ray = sys.modules.get("ray")  # imported by Ray's worker process; this module never imports it
    if ray is not None and ray.is_initialized():
        return f"node {ray.util.get_node_ip_address()} ({ray.get_runtime_context().get_node_id()[:8]})"
    return socket.gethostname()


def run_one(run: Run, out: str, label: str, extra: list[str], cuda: bool, threads: int,
            extend_to: Optional[int] = None) -> dict:
    """One attempt at a run: skip it if finished (with `extend_to`: finished at that many steps), else run its script
    (resuming its checkpoint) and wait for it.

    Raises RunFailed when the script fails, so that Ray tries again (the next attempt resumes the checkpoint), and
    RunRefused when no retry would help: the script refused its input, or another process writes the run's folder."""
    state = run_state(out, run, extend_to)
    if state == "finished":
        return {"name": run.name, "status": "skipped"}
    run_dir, log_path = os.path.join(out, "runs", run.name), os.path.join(out, "logs", f"{run.name}.log")
    if other_results(out, run):  # checked before Ray by check_existing_runs; a folder made since is left alone too
        raise RunRefused(f"left alone: runs/{run.name} holds {', '.join(other_results(out, run))} of another script")
    if state != "new":  # a run folder is never touched while its lock is held
        fd, holder = try_lock(run_dir)
        if fd is None:
            raise RunRefused(f"left alone: {holder} is writing it (it holds runs/{run.name}/{LOCK})")
        if state == "restart":  # an attempt that died before its first checkpoint left nothing to continue
            shutil.rmtree(run_dir)
        os.close(fd)
    command = [sys.executable, *script_args(run, label, state, extra, cuda)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    if threading.current_thread() is threading.main_thread():  # ray.cancel interrupts us through Python's SIGINT
        signal.signal(signal.SIGINT, signal.default_int_handler)  # handler, absent if Ray started with SIGINT ignored
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    start, node = time.time(), this_node()
    with open(log_path, "a") as log:
        offset = log.tell()
        log.write(f"{ATTEMPT_HEADER} {time.strftime('%Y-%m-%d %H:%M:%S')} on {node} "
                  f"in {out}: {shlex.join(command)}\n")
        log.flush()
        proc = subprocess.Popen(command, cwd=out, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # a Ctrl-C of the sweep reaches the run only as our SIGTERM
        try:
            while proc.poll() is None:
                time.sleep(0.5)
        finally:
            if proc.poll() is None:  # the task is cancelled (the sweep was stopped): the run checkpoints on SIGTERM
                proc.terminate()
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            seconds = time.time() - start
            log.write(f"=== exit {proc.returncode} after {format_seconds(seconds)}\n")
    if run_state(out, run, extend_to) == "finished":  # its finished file, written last, is there (of the steps asked)
        start = (read_json(os.path.join(run_dir, PROGRESS))[0] or {}).get("start_step")  # this attempt's
        return {"name": run.name, "status": "finished", "seconds": seconds, "node": node,
                "resumed_at": start if isinstance(start, int) and start > 0 else None}
    exit_status = f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0 else \
        f"exited {proc.returncode}"
    message = f"no {run_files(run)[0]}" if proc.returncode == 0 else last_line(log_path, offset)
    if proc.returncode == 1 and message.startswith("error: "):  # the script refused its input: so would a retry
        raise RunRefused(f"{exit_status}: {message}")
    raise RunFailed(f"{exit_status}: {message}")


# ----------------------------------------------------------------------------------------------
# Runs made earlier in --out: are they this sweep's?
# ----------------------------------------------------------------------------------------------
# A run folder's args.json holds the arguments it was made with; what this sweep would give it is what its script
# makes of the command line script_args builds: the scripts' Args are tyro dataclasses whose defaults and
# __post_init__ fill in values (divo_antmaze's --alpha per maze, pad_pretrain's per-domain defaults), so only the
# script's own parser says. Importing a script imports torch, which this process never does (it only launches
# runs), so compare_arguments runs in one subprocess (this file with COMPARE_FLAG) for the whole sweep: for the run
# folders with an args.json, and for one run of each script (its parser's refusal of the arguments after `--`). The
# decision (mismatch, extension) is made here, from its answers.
def compare_arguments(items: list[dict]) -> list[dict]:
    """For each {"name", "script", "argv", "recorded"}: the arguments the script makes of argv that differ from the
    recorded ones (those a resume may change aside: RESUME_FREE_ARGS) and the --total-timesteps asked, or the
    script's refusal of argv. Imports the scripts (and torch): run in the subprocess, never in the driver."""
    import importlib.util
    import io
    from dataclasses import asdict, is_dataclass

    import torch

    from divo_utils.resume import RESUME_FREE_ARGS

    torch.cuda.is_available = lambda: True  # --cudagraphs is checked by the machine that runs it, not this one
    modules, answers = {}, []
    for item in items:
        if item["script"] not in modules:
            name = os.path.splitext(os.path.basename(item["script"]))[0]
            spec = importlib.util.spec_from_file_location(name, item["script"])
            modules[item["script"]] = sys.modules[name] = module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        module = modules[item["script"]]
        if not is_dataclass(getattr(module, "Args", None)):  # not a script of this project: nothing to compare
            answers.append({"name": item["name"]})
            continue
        errors = io.StringIO()
        try:
            with contextlib.redirect_stderr(errors):
                args = tyro.cli(module.Args, args=item["argv"])
        except SystemExit as e:  # the script's one-line InputError, or tyro's box of usage errors
            answers.append({"name": item["name"], "refused": refusal(e, errors.getvalue())})
            continue
        if item["recorded"] is None:  # no earlier run: only the script's parser is asked
            answers.append({"name": item["name"]})
            continue
        asked, recorded = json.loads(json.dumps(asdict(args))), item["recorded"]
        for values in (asked, recorded):  # files a run reads: absolute, from where its runs/ is (our cwd)
            values.update({k: os.path.abspath(values[k]) for k in PATH_ARGS if isinstance(values.get(k), str)})
        answers.append({"name": item["name"], "total_timesteps": asked.get("total_timesteps"), "differences": {
            k: [recorded[k], v] for k, v in asked.items() if k not in RESUME_FREE_ARGS and k in recorded
            and recorded[k] != v}})
    return answers


def refusal(error: SystemExit, stderr: str) -> str:
    """A script's refusal of its arguments in one line: its InputError's, or the lines of tyro's box of errors."""
    if isinstance(error.code, str):
        return error.code.removeprefix("error: ")
    lines = [line.strip(" \u2502\u256d\u256e\u2570\u256f\u2500") for line in stderr.splitlines()][1:]
    ends = [i for i, line in enumerate(lines) if line.startswith(("Argument helptext", "For full helptext"))]
    return "; ".join(line for line in lines[:min(ends, default=len(lines))] if line) or "see its --help"


def answer_comparisons() -> None:
    """The subprocess of check_existing_runs: compare_arguments of the JSON list on stdin, printed as JSON."""
    sys.path.insert(0, ROOT)
    items = json.load(sys.stdin)
    with contextlib.redirect_stdout(sys.stderr):  # what a script prints stays out of the answer
        answers = compare_arguments(items)
    print(json.dumps(answers))


def names_of(names: list[str], most: int = 4) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def check_existing_runs(runs: list[Run], out: str, label: str, extra: list[str]) -> dict[str, int]:
    """Stop unless each script takes the arguments after `--` (its own parser, once, before Ray and any folder) and
    every finished or resumable run of the grid in `out` was made with the arguments this sweep passes (those a resume
    may change aside, but not a shorter --total-timesteps); return the finished runs to extend to a larger
    --total-timesteps: run name -> steps."""
    foreign = {run.name: other_results(out, run) for run in runs if other_results(out, run)}
    if foreign:
        name, files = next(iter(foreign.items()))
        raise SweepError(f"{plural(len(foreign), 'run folder')} in {out}/runs hold results of another script than "
                         f"its own ({name}: {', '.join(files)}{' and more' * (len(foreign) > 1)}); "
                         "a sweep never continues or removes another script's run: give this sweep another --out or "
                         "--label. Nothing was started")
    items, recorded, states = [], {}, {}
    for run in runs:
        state = run_state(out, run)
        content = read_json(os.path.join(out, "runs", run.name, "args.json"))[0]
        if state in ("finished", "resume") and content is not None:  # restart, new: made anew with our arguments
            recorded[run.name], states[run.name] = content, state
            items.append({"name": run.name, "script": run.script, "recorded": content,
                          "argv": script_args(run, label, "new", extra, False)[1:]})
    for script in dict.fromkeys(run.script for run in runs):  # each script's parser once, even without earlier runs
        if not any(item["script"] == script for item in items):
            run = next(run for run in runs if run.script == script)
            items.append({"name": run.name, "script": script, "recorded": None,
                          "argv": script_args(run, label, "new", extra, False)[1:]})
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), COMPARE_FLAG], input=json.dumps(items),
                          cwd=out if os.path.isdir(out) else None, text=True, capture_output=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        answers = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None
    except (IndexError, ValueError):
        answers = None
    if not isinstance(answers, list):
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SweepError(f"could not compare the runs in {out}/runs with this sweep's arguments: {last}")
    by_name = {run.name: run for run in runs}
    mismatches: dict[str, list[str]] = {}  # what differs -> the runs
    extend: dict[str, int] = {}
    unextendable: list[str] = []
    for answer in answers:
        name = answer["name"]
        run = by_name[name]
        if "refused" in answer:  # so would every run be
            raise SweepError(f"{os.path.basename(run.script)} refuses the arguments after `--`: {answer['refused']}")
        if "differences" not in answer:  # a script's parser only, or not a script of this project
            continue
        finished = states[name] == "finished"
        what = [f"{flag(k)} {old!r} recorded, {new!r} asked" for k, (old, new) in answer["differences"].items()]
        asked = answer["total_timesteps"]
        done = finished_steps(out, run) if finished else recorded[name].get("total_timesteps")
        if isinstance(asked, int) and isinstance(done, int) and asked != done:
            if asked < done:  # a sweep extends runs, never shortens them
                what.append(f"--total-timesteps {done} {'trained' if finished else 'recorded'}, {asked} asked")
            elif finished and not what:  # only longer: continue the finished run from its checkpoint
                if os.path.isfile(os.path.join(out, "runs", name, run_files(run)[1])):
                    extend[name] = asked
                else:
                    unextendable.append(name)
        if what:
            mismatches.setdefault("; ".join(what), []).append(name)
    if mismatches:
        count = sum(map(len, mismatches.values()))
        raise SweepError(
            f"{plural(count, 'run')} in {out}/runs {'was' if count == 1 else 'were'} made with other arguments than this "
            f"sweep passes: {' | '.join(f'{names_of(names)}: {what}' for what, names in mismatches.items())}. To fix: "
            "run these arguments with another --out or --label (or pass the recorded ones to continue this sweep)")
    if unextendable:
        raise SweepError(
            f"{names_of(unextendable)} finished without a checkpoint (made with --checkpoint-freq 0), so "
            f"{'it cannot' if len(unextendable) == 1 else 'they cannot'} be extended to a larger --total-timesteps: "
            "use another --out or --label for the longer runs")
    return extend


# ----------------------------------------------------------------------------------------------
# The sweep on Ray
# ----------------------------------------------------------------------------------------------
def start_ray(args: Args):
    """Import Ray and start it here, or join the cluster at --address."""
    try:
        import ray
    except ImportError:
        raise SweepError("Ray is not installed: pip install -r requirements-tools.txt") from None
    if args.address:
        check_reachable(args.address)
    try:
        if args.address:
            ray.init(address=args.address, log_to_driver=False, logging_level="WARNING")
        else:
            ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
                     object_store_memory=128 * 1024**2, _temp_dir=os.path.abspath(args.temp_dir) if args.temp_dir else None)
    except Exception as e:  # no cluster at that address, refused authentication, no room for Ray's files, ...
        where = f"join the Ray cluster at {args.address} (is `ray start --head` running there?)" if args.address \
            else "start Ray on this machine"
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise SweepError(f"could not {where}: {type(e).__name__}: {first_line}") from None
    return ray


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """Stop at once if nothing answers at HOST:PORT (ray.init would wait minutes); `auto` and other forms are Ray's."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise SweepError(f"could not join the Ray cluster at {address}: nothing answers there ({e.strerror or e}); is "
                         "`ray start --head` running there, at that port?") from None


def error_message(error: Exception) -> str:
    """The cause of a failed Ray task in one line."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, Exception):
        error = cause
    lines = str(error).strip().splitlines() or [""]
    return lines[0] if isinstance(error, (RunFailed, RunRefused)) else f"{type(error).__name__}: {lines[0]}"


class Progress:
    """Counts of the sweep's runs, the line printed for each result and the periodic status line."""

    def __init__(self, total: int, skipped: int, cpus_per_run: int):
        self.total, self.skipped, self.cpus_per_run = total, skipped, cpus_per_run
        self.start = time.time()
        self.durations: list[float] = []
        self.failed: dict[str, str] = {}

    def finished(self, name: str, result: dict, log_path: str) -> None:
        self.durations.append(result["seconds"])
        resumed = "" if result["resumed_at"] is None else f", continuing its checkpoint of step {result['resumed_at']:,}"
        print(f"[{self.skipped + len(self.durations) + len(self.failed)}/{self.total}] finished {name} on "
              f"{result['node']} in {format_seconds(result['seconds'])}{resumed} (log: {log_path})", flush=True)

    def failure(self, name: str, message: str, log_path: str) -> None:
        self.failed[name] = message
        print(f"[{self.skipped + len(self.durations) + len(self.failed)}/{self.total}] FAILED {name}: {message} "
              f"(log: {log_path})", flush=True)

    def status(self, ray, pending_dirs: list[str]) -> str:
        """`runs: N done, N running, N failed, N queued (skipped: N) | elapsed 12m03s | ETA ~40m`."""
        busy = ray.cluster_resources().get("CPU", 0) - ray.available_resources().get("CPU", 0)
        pending = len(pending_dirs)
        running = max(0, min(pending, round(busy / self.cpus_per_run)))  # Ray's busy CPUs; exact on a dedicated cluster
        return (f"runs: {len(self.durations)} done, {running} running, {len(self.failed)} failed, {pending - running} "
                f"queued (skipped: {self.skipped}) | elapsed {format_seconds(time.time() - self.start)} | ETA "
                f"{self.eta(pending_dirs, running)}")

    def eta(self, pending_dirs: list[str], running: int) -> str:
        """Time left: the running runs' own estimates (their progress.json, in their folders `pending_dirs`), and for
        each run without one a run's duration (the finished runs' mean, else a running run's total steps / steps per
        second), over the slots."""
        progress = [p for p in map(running_progress, pending_dirs) if p]
        per_run = [*self.durations] or [total / speed for _, total, speed in progress]
        if not pending_dirs or not per_run:
            return "-"
        left = sum((total - step) / speed for step, total, speed in progress)
        left = (left + (len(pending_dirs) - len(progress)) * sum(per_run) / len(per_run)) / max(running, 1)
        return f"~{format_seconds(left)[:-3]}" if left >= 60 else "~<1m"


def running_progress(run_dir: str) -> Optional[tuple[float, float, float]]:
    """(step, total steps, steps per second) of a run that has not finished, from the progress.json it writes at
    every progress line; None when it has none yet, has no speed yet or reached its last step."""
    progress = read_json(os.path.join(run_dir, PROGRESS))[0] or {}
    step, total, speed = (progress.get(key) for key in ("step", "total_timesteps", "steps_per_second"))
    if not all(isinstance(value, (int, float)) for value in (step, total, speed)) or speed <= 0 or step >= total:
        return None
    return float(step), float(total), float(speed)


class Nodes:
    """The Ray nodes alive, and a line for each that joins or is lost while the sweep runs. A lost node's runs are
    Ray's to retry (a task on a dead node is a system failure: `max_retries` covers it): the sweep only says so."""

    def __init__(self, ray, max_retries: int):
        self.ray, self.max_retries = ray, max_retries
        self.alive = self.now()

    def now(self) -> dict[str, str]:
        return {node["NodeID"]: f"{node['NodeManagerAddress']} ({node['NodeID'][:8]}, "
                f"{plural(int(node['Resources'].get('CPU', 0)), 'CPU')})" for node in self.ray.nodes() if node["Alive"]}

    def check(self) -> None:
        alive = self.now()
        for node in self.alive.keys() - alive.keys():
            print(f"node {self.alive[node]} lost: Ray retries each run it held on the nodes left (up to --max-retries "
                  f"{self.max_retries} times), continuing the run's last checkpoint in --out", flush=True)
        for node in alive.keys() - self.alive.keys():
            print(f"node {alive[node]} joined", flush=True)
        self.alive = alive


def stop_on_sigterm(signum: int, frame) -> None:
    raise KeyboardInterrupt


def run_sweep(args: Args, extra: list[str], runs: list[Run], out: str, extend: dict[str, int]) -> Progress:
    """Run every unfinished run of the grid on Ray (and extend the finished runs of `extend` to its number of steps),
    printing each result and a status line now and then."""
    todo = [run for run in runs if run_state(out, run, extend.get(run.name)) != "finished"]
    for run in runs:
        if run not in todo:
            print(f"skipped (finished): {run.name}")
    progress = Progress(len(runs), len(runs) - len(todo), args.cpus_per_run)
    if not todo:
        print("nothing to run: every run finished earlier")
        return progress
    ray = start_ray(args)
    try:
        for folder in ("runs", "logs"):  # made once Ray is there: a sweep that cannot start leaves nothing
            try:
                os.makedirs(os.path.join(out, folder), exist_ok=True)
            except OSError as e:
                raise SweepError(f"--out {args.out or out}: cannot make {os.path.join(out, folder)} ({e.strerror or e})") \
                    from None
        resources = ray.cluster_resources()
        gpus = resources.get("GPU", 0) > 0
        where = f"the Ray cluster at {args.address}" if args.address else "a local Ray"
        largest = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]), default=0)
        if largest < args.cpus_per_run:  # Ray would queue every run forever
            raise SweepError(f"--cpus-per-run {args.cpus_per_run}: no node of {where} has that many CPUs (the largest "
                             f"has {largest:g}), so no run could start")
        print(f"{where}: {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs; each run asks for "
              f"{plural(args.cpus_per_run, 'CPU')}" + (f" and 1/{args.runs_per_gpu} GPU" if gpus else ""))
        nodes = Nodes(ray, args.max_retries)
        if len(nodes.alive) > 1:
            print(f"nodes: {', '.join(sorted(nodes.alive.values()))}")
        print_plan(todo, out, args.label, extra, gpus, extend)
        remote = ray.remote(run_one)
        options = {"num_cpus": args.cpus_per_run, "num_gpus": 1 / args.runs_per_gpu if gpus else 0,
                   "max_retries": args.max_retries, "retry_exceptions": [RunFailed]}  # not RunRefused
        refs = {remote.options(**options, name=run.name).remote(run, out, args.label, extra, gpus, args.cpus_per_run,
                                                                extend.get(run.name)): run for run in todo}
        pending = list(refs)
        signal.signal(signal.SIGTERM, stop_on_sigterm)  # `kill` of the sweep stops it like Ctrl-C
        try:
            next_status = time.time() + args.status_every
            while pending:
                ready, pending = ray.wait(pending, num_returns=1,
                                          timeout=min(NODE_CHECK_EVERY, max(0.0, next_status - time.time())))
                nodes.check()
                for ref in ready:
                    run, log_path = refs[ref], os.path.join(out, "logs", f"{refs[ref].name}.log")
                    try:
                        result = ray.get(ref)
                    except Exception as error:  # the last attempt failed (the script, the worker or its node)
                        progress.failure(run.name, error_message(error), log_path)
                    else:
                        if result["status"] == "skipped":  # finished by someone else since the sweep started
                            progress.skipped += 1
                            print(f"skipped (finished): {run.name}", flush=True)
                        elif run_state(out, run, extend.get(run.name)) != "finished":  # not this machine's --out
                            progress.failure(run.name, f"finished on {result['node']}, but {out} here has no runs/"
                                             f"{run.name}/{run_files(run)[0]}: --out must be one folder every node "
                                             "shares, at the same path (docs/reproducing.md)", log_path)
                        else:
                            progress.finished(run.name, result, log_path)
                if time.time() >= next_status:
                    print(progress.status(ray, [os.path.join(out, "runs", refs[r].name) for r in pending]),
                          flush=True)
                    next_status = time.time() + args.status_every
        except KeyboardInterrupt:
            print(f"\nstopping {len(pending)} unfinished runs (running ones checkpoint first); "
                  "the same command continues the sweep", flush=True)
            for ref in pending:
                ray.cancel(ref)
            ray.wait(pending, num_returns=len(pending), timeout=150)
            for ref in pending:
                progress.failed[refs[ref].name] = "stopped (the sweep was interrupted)"
        return progress
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        ray.shutdown()


def print_plan(runs: list[Run], out: str, label: str, extra: list[str], cuda: bool, extend: dict[str, int]) -> None:
    """The command each run starts with (from the sweep's folder), as the next attempt would run it."""
    print(f"planned commands (working directory {out}):")
    for run in runs:
        state = run_state(out, run, extend.get(run.name))
        note = {"resume": "  # continues its checkpoint", "restart": "  # after removing its folder (no checkpoint yet)",
                "finished": "  # finished: skipped"}.get(state, "")
        if state == "extend":
            note = f"  # extends the finished run from {finished_steps(out, run):,} to {extend[run.name]:,} steps"
        print(f"  {shlex.join([sys.executable, *script_args(run, label, state, extra, cuda)])}{note}")


def write_report(out: str, reps: int) -> Optional[str]:
    """tools/report.py over the sweep's runs into {out}/report; the table's path, or None if nothing finished."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from report import ReportError, collect_runs, make_report

    try:
        written = make_report(collect_runs([os.path.join(out, "runs")]), os.path.join(out, "report"),
                              reps=reps, profile_reps=max(1, reps // 2))
    except ReportError as e:
        print(f"no report: {e}", file=sys.stderr)
        return None
    return written["table.md"]


def main() -> None:
    args, extra = parse_command_line(sys.argv[1:])
    try:
        check_args(args, extra)
        runs = plan_runs(args)
    except SweepError as e:
        raise SystemExit(f"error: {e}") from None
    out = os.path.abspath(os.path.expanduser(args.out or os.path.join("sweeps", args.label)))
    tasks = len(runs) // len(args.seeds)
    print(f"sweep {args.label}: {plural(len(runs), 'run')} ({plural(tasks, 'task')} x {plural(len(args.seeds), 'seed')}) "
          f"in {out}")
    try:
        extend = check_existing_runs(runs, out, args.label, extra)
        if args.dry_run:
            print_plan(runs, out, args.label, extra, False, extend)
            print("(with --cuda added when the Ray cluster has GPUs)")
            return
        progress = run_sweep(args, extra, runs, out, extend)
    except SweepError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"sweep done in {format_seconds(time.time() - progress.start)}: {len(runs) - len(progress.failed)} of "
          f"{len(runs)} runs finished ({progress.skipped} skipped as finished earlier), {len(progress.failed)} failed")
    for name, message in progress.failed.items():
        print(f"  failed {name}: {message}\n    log: {os.path.join(out, 'logs', name + '.log')}")
    table = write_report(out, args.report_reps) if any(run_files(run)[0] == "scores.json" for run in runs) else None
    if table:
        print(f"report: {os.path.dirname(table)} (table: {table})")
    raise SystemExit(1 if progress.failed else 0)


if __name__ == "__main__":
    if sys.argv[1:] == [COMPARE_FLAG]:  # check_existing_runs' subprocess
        answer_comparisons()
    else:
        main()
