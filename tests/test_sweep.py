"""tools/sweep.py: a tiny grid on a local Ray and on a joined cluster, a killed run that resumes, a refused run that is
not retried, a repeated sweep that starts nothing, run folders another process writes left alone, pretraining sweeps,
the ETA, and bad input refused before Ray starts.

Ray runs only inside a private network and PID namespace (`unshare --net --pid --fork --mount-proc`) with nothing but
loopback: it binds no real interface, and `ray stop` there cannot see any Ray outside it. Every sweep gets its own
HOME (Ray keeps an authentication token there) and a short temporary folder (Ray's Unix sockets live in it).
"""

import importlib.util
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from conftest import ROOT, explain, write_d4rl_file

SWEEP = os.path.join(ROOT, "tools", "sweep.py")
RAY = os.path.join(os.path.dirname(sys.executable), "ray")
HEADER = "=== sweep attempt"
NAMESPACE = ["unshare", "--net", "--pid", "--fork", "--mount-proc", "bash", "-c"]
PORT = 6390  # free in any fresh network namespace


def tiny(total_timesteps: int = 200) -> list[str]:
    """Pass-through arguments for a run of a second or two on the CPU (first checkpoint at step 20)."""
    return ["--hidden-dim", "16", "--num-layers", "1", "--batch-size", "32", "--eval-episodes", "1", "--eval-freq", "0",
            "--log-freq", "10", "--total-timesteps", str(total_timesteps), "--checkpoint-freq", "20",
            "--no-legacy-inertia", "--no-cuda"]


def sweep_command(*args: str) -> str:
    return shlex.join([sys.executable, SWEEP, "--report-reps", "50", *map(str, args)])


def in_namespace(script: str, home, env: dict = None, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run a bash script in a fresh network + PID namespace with only loopback up."""
    home.mkdir(exist_ok=True)
    full_env = dict(os.environ, HOME=str(home), PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0", **(env or {}))
    return subprocess.run([*NAMESPACE, f"ip link set lo up && {script}"], env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def run_local_sweep(tmp, out, label, env_ids, datasets, before: str = "", extra=None) -> subprocess.CompletedProcess:
    """A sweep on a local Ray (started and stopped by the sweep) inside the namespace, after the commands `before`,
    each run given `extra` (default tiny())."""
    temp_dir = tempfile.mkdtemp(prefix="rt_", dir="/tmp")  # short: Unix socket paths are limited to ~107 characters
    try:
        command = sweep_command("--env-ids", *env_ids, "--seeds", "0", "--label", label, "--out", out, "--dataset-dir",
                                datasets, "--temp-dir", temp_dir, "--status-every", "1", "--",
                                *(tiny() if extra is None else extra))
        return in_namespace(before + command, tmp / f"home_{label}")
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def headers(log_path) -> list[str]:
    with open(log_path) as f:
        return [line for line in f if line.startswith(HEADER)]


def load_sweep():
    """tools/sweep.py as a module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("sweep", SWEEP)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    return sweep


# Run in the sweep's namespace: SIGKILL a run (the process its lock file names) as soon as its first checkpoint appears.
KILL_AFTER_FIRST_CHECKPOINT = """
import os, signal, sys, time
run = sys.argv[1]
while not os.path.isfile(os.path.join(run, "checkpoint.pt")):
    time.sleep(0.02)
os.kill(int(open(os.path.join(run, "lock")).read().split()[1]), signal.SIGKILL)
"""


@pytest.fixture(scope="module")
def namespace():
    """Skip the Ray tests where a private network namespace cannot be made (not root, no unshare)."""
    try:
        proc = subprocess.run([*NAMESPACE, "ip link set lo up"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"no private network namespace for Ray: {e}")
    if proc.returncode != 0:
        pytest.skip(f"no private network namespace for Ray: {proc.stderr.strip()}")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """Two small hopper-shaped D4RL files, named as --dataset-dir looks them up (with and without -v2)."""
    folder = tmp_path_factory.mktemp("data")
    write_d4rl_file(folder / "hopper-medium-v2.hdf5", episode_lengths=(120, 90, 150, 140), terminal_episodes=(1,))
    write_d4rl_file(folder / "hopper-medium-replay.hdf5", episode_lengths=(120, 90, 150, 140), terminal_episodes=(1,),
                    seed=1)
    write_d4rl_file(folder / "halfcheetah-medium.hdf5")  # hopper's shapes: halfcheetah-medium-v2 refuses it
    return folder


@pytest.fixture(scope="module")
def local_sweep(namespace, datasets, tmp_path_factory):
    """Two tiny runs (two tasks, seed 0) on a local Ray: the sweep's output and its folder."""
    tmp = tmp_path_factory.mktemp("local")
    out = tmp / "out"
    proc = run_local_sweep(tmp, out, "tiny", ["hopper-medium-v2", "hopper-medium-replay-v2"], datasets)
    return proc, out


RUN_NAMES = ["hopper-medium-v2__tiny__0", "hopper-medium-replay__tiny__0"]


def test_local_sweep_finishes_runs_and_reports(local_sweep):
    proc, out = local_sweep
    assert proc.returncode == 0, explain(proc)
    for name in RUN_NAMES:
        scores = json.loads((out / "runs" / name / "scores.json").read_text())
        assert scores["run_name"] == name and scores["exp_name"] == "tiny" and scores["step"] == 200
        assert f"finished {name}" in proc.stdout
        (header,) = headers(out / "logs" / f"{name}.log")  # one attempt, with the exact command
        assert f"--run-name {name}" in header and "--resume" not in header
        assert "--seed 0 --exp-name tiny" in header and "--dataset-path" in header and "--total-timesteps 200" in header
        assert header.split(": ", 1)[1].startswith(sys.executable)
    assert "hopper-medium-replay.hdf5" in headers(out / "logs" / f"{RUN_NAMES[1]}.log")[0]
    table = (out / "report" / "table.md").read_text()
    assert "| tiny |" in table and "hopper-medium-v2" in table and "hopper-medium-replay" in table
    assert "2 of 2 runs finished" in proc.stdout and "runs: " in proc.stdout  # the summary and a status line


def test_killed_run_resumes_from_its_checkpoint_and_a_refused_run_is_not_retried(local_sweep, datasets, tmp_path):
    """SIGKILL of the first attempt after its first checkpoint: Ray retries, the retry resumes, the result is identical.
    A run whose script refuses its data (an `error:` line) fails at once: a retry would be refused the same way."""
    _, reference = local_sweep
    out = tmp_path / "out"
    killer = shlex.join([sys.executable, "-c", KILL_AFTER_FIRST_CHECKPOINT, str(out / "runs" / "hopper-medium-v2__killed__0")])
    proc = run_local_sweep(tmp_path, out, "killed", ["hopper-medium-v2", "halfcheetah-medium-v2"], datasets,
                           before=f"{killer} & ")
    assert proc.returncode == 1, explain(proc)
    log = (out / "logs" / "hopper-medium-v2__killed__0.log").read_text()
    first, second = headers(out / "logs" / "hopper-medium-v2__killed__0.log")
    assert "--resume" not in first and "--run-name hopper-medium-v2__killed__0" in first
    assert "--resume runs/hopper-medium-v2__killed__0/checkpoint.pt" in second
    assert "=== exit -9" in log
    assert len(headers(out / "logs" / "halfcheetah-medium__killed__0.log")) == 1
    assert "FAILED halfcheetah-medium__killed__0: exited 1: error: " in proc.stdout and "observation size 17" in proc.stdout
    resumed = json.loads((out / "runs" / "hopper-medium-v2__killed__0" / "scores.json").read_text())
    uninterrupted = json.loads((reference / "runs" / "hopper-medium-v2__tiny__0" / "scores.json").read_text())
    assert resumed["step"] == uninterrupted["step"] == 200
    assert resumed["normalized_scores"] == uninterrupted["normalized_scores"]
    assert resumed["evaluations"] == uninterrupted["evaluations"]


def test_second_sweep_starts_nothing(local_sweep, datasets, tmp_path):
    _, out = local_sweep
    scores = {name: (out / "runs" / name / "scores.json").read_bytes() for name in RUN_NAMES}
    attempts = {name: len(headers(out / "logs" / f"{name}.log")) for name in RUN_NAMES}
    proc = run_local_sweep(tmp_path, out, "tiny", ["hopper-medium-v2", "hopper-medium-replay-v2"], datasets)
    assert proc.returncode == 0, explain(proc)
    for name in RUN_NAMES:
        assert f"skipped (finished): {name}" in proc.stdout
        assert (out / "runs" / name / "scores.json").read_bytes() == scores[name]
        assert len(headers(out / "logs" / f"{name}.log")) == attempts[name] == 1
    assert "planned commands" not in proc.stdout and "2 skipped as finished earlier" in proc.stdout
    assert (out / "report" / "table.md").is_file()


@pytest.mark.parametrize("extra, differences", [
    ([*tiny(), "--alpha", "1.0"], "--alpha 2.5 recorded, 1.0 asked"),
    (tiny(100), "--total-timesteps 200 trained, 100 asked"),
    ([*tiny(), "--no-adpo"], "--adpo True recorded, False asked"),
], ids=["alpha", "shorter", "no-adpo"])
def test_finished_runs_of_other_arguments_are_a_mismatch_named_before_anything_starts(local_sweep, datasets, tmp_path,
                                                                                       extra, differences):
    """A second sweep on the same --out with other arguments after `--` does not count the earlier runs as its own:
    it stops before Ray starts, naming the runs, what differs (recorded vs asked) and the fix."""
    _, out = local_sweep
    before = {name: (out / "runs" / name / "scores.json").read_bytes() for name in RUN_NAMES}
    proc = run_local_sweep(tmp_path, out, "tiny", ["hopper-medium-v2", "hopper-medium-replay-v2"], datasets,
                           extra=extra)
    assert proc.returncode == 1, explain(proc)
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1, explain(proc)
    assert all(name in proc.stderr for name in RUN_NAMES) and differences in proc.stderr
    assert "another --out or --label" in proc.stderr and "Traceback" not in proc.stderr
    assert "planned commands" not in proc.stdout and "Ray" not in proc.stdout
    for name in RUN_NAMES:
        assert (out / "runs" / name / "scores.json").read_bytes() == before[name]
        assert len(headers(out / "logs" / f"{name}.log")) == 1


def test_a_longer_total_timesteps_extends_the_finished_runs(local_sweep, datasets, tmp_path):
    """Only --total-timesteps larger than the runs': each finished run continues from its checkpoint to the new
    length (the scripts' --resume with --total-timesteps), then counts as finished for that length."""
    _, reference = local_sweep
    out = tmp_path / "out"
    shutil.copytree(reference, out)

    def dry_run(total: int) -> str:
        proc = subprocess.run([sys.executable, SWEEP, "--env-ids", "hopper-medium-v2", "hopper-medium-replay-v2",
                               "--seeds", "0", "--label", "tiny", "--out", out, "--dataset-dir", datasets, "--dry-run",
                               "--", *tiny(total)], capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, explain(proc)
        return proc.stdout

    plan = dry_run(400)
    for name in RUN_NAMES:
        assert f"--resume runs/{name}/checkpoint.pt" in plan and "extends the finished run from 200 to 400 steps" in plan
    proc = run_local_sweep(tmp_path, out, "tiny", ["hopper-medium-v2", "hopper-medium-replay-v2"], datasets,
                           extra=tiny(400))
    assert proc.returncode == 0, explain(proc)
    assert "2 of 2 runs finished (0 skipped as finished earlier)" in proc.stdout
    for name in RUN_NAMES:
        scores = json.loads((out / "runs" / name / "scores.json").read_text())
        assert scores["step"] == 400 and scores["run_name"] == name
        first, second = headers(out / "logs" / f"{name}.log")
        assert f"--resume runs/{name}/checkpoint.pt" in second and "--total-timesteps 400" in second
        assert json.loads((out / "runs" / name / "args.json").read_text())["total_timesteps"] == 400
    assert dry_run(400).count("# finished: skipped") == 2


def test_resumable_runs_are_compared_too_and_a_run_without_checkpoint_is_not_extended(local_sweep, datasets, tmp_path):
    """An unfinished run with a checkpoint is compared as a finished one (its --resume would refuse other arguments
    anyway, one run at a time); a finished run without a checkpoint cannot be extended; arguments the script refuses
    stop the sweep with the script's own message. Planned with --dry-run: nothing starts."""
    _, reference = local_sweep
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    resumable, finished = RUN_NAMES
    (out / "runs" / resumable / "scores.json").unlink()
    (out / "runs" / finished / "checkpoint.pt").unlink()

    def dry_run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, SWEEP, "--env-ids", "hopper-medium-v2", "hopper-medium-replay-v2",
                               "--seeds", "0", "--label", "tiny", "--out", out, "--dataset-dir", datasets, "--dry-run",
                               "--", *extra], capture_output=True, text=True, timeout=240)

    for extra, message in (([*tiny(), "--alpha", "1.0"], f"{resumable}, {finished}: --alpha 2.5 recorded, 1.0 asked"),
                           (tiny(400), f"{finished} finished without a checkpoint"),
                           ([*tiny(), "--alpha", "-1"], "divo_continuous.py refuses the arguments after `--`: "
                                                        "--alpha -1.0 is out of range")):
        proc = dry_run(*extra)
        assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, explain(proc)
        assert proc.stderr.startswith("error: ") and message in proc.stderr, explain(proc)
        assert "planned commands" not in proc.stdout
        if extra == tiny(400):  # the resumable run continues to 400 steps: no mismatch
            assert resumable not in proc.stderr


def test_sweep_joins_a_running_cluster(namespace, datasets, tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="rt_", dir="/tmp")
    out = tmp_path / "out"
    head = shlex.join([RAY, "start", "--head", "--port", str(PORT), "--node-ip-address", "127.0.0.1", "--temp-dir",
                       temp_dir, "--num-cpus", "1", "--include-dashboard", "false", "--disable-usage-stats"])
    sweep = sweep_command("--env-ids", "hopper-medium-v2", "--seeds", "3", "--label", "cluster", "--out", out,
                          "--dataset-dir", datasets, "--address", f"127.0.0.1:{PORT}", "--", *tiny(40))
    too_wide = sweep_command("--env-ids", "hopper-medium-v2", "--seeds", "4", "--label", "wide", "--out", out,
                             "--dataset-dir", datasets, "--address", f"127.0.0.1:{PORT}", "--cpus-per-run", "2")
    stop = shlex.join([RAY, "stop", "--force"])  # sees only this namespace's processes
    try:
        proc = in_namespace(f"trap '{stop} >/dev/null 2>&1' EXIT; {head} >/dev/null || exit 3; {sweep} || exit 4; "
                            f"{too_wide}", tmp_path / "home")
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert proc.returncode == 1, explain(proc)  # the second sweep: a run of 2 CPUs would wait forever on a 1-CPU node
    assert f"error: --cpus-per-run 2: no node of the Ray cluster at 127.0.0.1:{PORT} has that many CPUs (the largest " \
           "has 1), so no run could start" in proc.stderr and not (out / "runs" / "hopper-medium-v2__wide__4").exists()
    assert f"the Ray cluster at 127.0.0.1:{PORT}: 1 CPUs" in proc.stdout
    scores = json.loads((out / "runs" / "hopper-medium-v2__cluster__3" / "scores.json").read_text())
    assert scores["seed"] == 3 and scores["step"] == 40


@pytest.mark.parametrize("args, message", [
    (["--env-ids", "hopper-medium-v2", "walker2d-medium-v2", "--dataset-dir", "{data}"],
     "walker2d-medium-v2 (looked for walker2d-medium-v2.hdf5 or walker2d-medium.hdf5)"),
    (["--env-ids", "hopper-medum-v2"], "unknown env id 'hopper-medum-v2'; did you mean hopper-medium-v2?"),
    (["--env-ids", "hopper-medium-v2", "--dataset-dir", "{data}/nowhere"], "is not a folder"),
    (["--suite", "gym"], "unknown --suite 'gym'"),
    (["--suite", "paper", "--env-ids", "hopper-medium-v2"], "give one of --suite"),
    (["--env-ids", "hopper-medium-v2", "--datasets", "hopper-medium-v2={data}/hopper-medium-replay.hdf5"],
     "give one of --suite"),
    (["--datasets", "hopper-medium-v2"], "write ENV_ID=FILE"),
    (["--datasets", "hopper-medium-v2={data}/nothing.hdf5"], "no file at"),
    (["--datasets", "hoper-medium-v2={data}/hopper-medium-replay.hdf5"], "did you mean hopper-medium-v2?"),
    (["--datasets", "hopper-medium-v2={data}/hopper-medium-replay.hdf5", "--dataset-dir", "{data}"],
     "leave out --dataset-dir"),
    (["--datasets", "hopper-medium-v2={data}/hopper-medium-replay.hdf5",
      "hopper-medium-replay-v2={data}/hopper-medium-replay.hdf5"], "two tasks named hopper-medium-replay"),
    (["--suite", "paper", "--seeds"], "no seeds"),
    (["--suite", "paper", "--", "--seed", "3"], "--seed after `--`"),
    (["--env-ids", "Hopper-Medium-v2"], "unknown env id 'Hopper-Medium-v2'; did you mean hopper-medium-v2?"),
    (["--suite", "paper", "--status-every", "inf"], "--status-every must be a positive number of seconds, got inf"),
    (["--suite", "paper", "--cpus-per-run", "100000"], "--cpus-per-run 100000 is more than the"),
    (["--suite", "paper", "--out", "{data}/hopper-medium-v2.hdf5/sweep"], "hopper-medium-v2.hdf5 is a file, not a folder"),
    (["--suite", "paper", "--out", "/proc/x/sweep"], "--out /proc/x/sweep: cannot make folders in /proc ("),
    (["--suite", "paper", "--label", "l" * 151], "--label is 151 bytes long: the scripts take at most 150"),
    (["--suite", "paper", "--report-reps", "0"], "--report-reps must be at least 1, got 0"),
])
def test_bad_input_is_one_error_line(args, message, datasets, tmp_path):
    """Refused before Ray starts (outside the namespace): exit 1, one `error:` line, nothing created."""
    args = [arg.replace("{data}", str(datasets)) for arg in args]
    seeds = [] if "--seeds" in args else ["--seeds", "0"]
    dash = args.index("--") if "--" in args else len(args)
    proc = subprocess.run([sys.executable, SWEEP, *args[:dash], *seeds, *args[dash:]], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, explain(proc)
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert os.listdir(tmp_path) == []  # no sweeps/ folder: nothing was started


def test_the_report_refuses_an_out_it_cannot_make_before_its_work(local_sweep, tmp_path):
    """tools/report.py (the sweep's last step) with an --out where no folder can be made: one line, at once.
    (Here rather than in tests/test_report.py: it reads this file's sweep.)"""
    _, out = local_sweep
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "report.py"), str(out / "runs"), "--out",
                           "/proc/x/report", "--reps", "50", "--profile-reps", "50"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr.startswith("error: --out /proc/x/report: cannot make folders in /proc ("), \
        explain(proc)
    assert len(proc.stderr.strip().splitlines()) == 1 and "wrote" not in proc.stdout


def test_dry_run_prints_the_plan_and_starts_nothing(tmp_path):
    proc = subprocess.run([sys.executable, SWEEP, "--suite", "paper", "--seeds", "0", "1", "--label", "abl", "--dry-run",
                           "--", "--no-adpo"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, explain(proc)
    commands = [line.split() for line in proc.stdout.splitlines() if line.startswith(f"  {sys.executable} ")]
    assert len(commands) == 30 and all(command[-1] == "--no-adpo" for command in commands)
    scripts = {command[command.index("--env-id") + 1]: os.path.basename(command[1]) for command in commands}
    assert scripts["antmaze-large-diverse-v2"] == "divo_antmaze.py" and scripts["walker2d-medium-expert-v2"] == \
        "divo_continuous.py" and len(scripts) == 15
    assert any(" --seed 1 --exp-name abl --run-name antmaze-umaze-v2__abl__1 " in " ".join(c) for c in commands)
    assert os.listdir(tmp_path) == []


def test_datasets_name_each_task_after_its_file(datasets, tmp_path):
    """--datasets ENV_ID=FILE: the run is named after the file, trains on it, and is evaluated as ENV_ID."""
    data = os.path.join(datasets, "hopper-medium-replay.hdf5")
    proc = subprocess.run([sys.executable, SWEEP, "--datasets", f"hopper-medium-replay-v2={data}", "--seeds", "4",
                           "--label", "dev", "--dry-run"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, explain(proc)
    [command] = [line.split() for line in proc.stdout.splitlines() if line.startswith(f"  {sys.executable} ")]
    assert command[command.index("--env-id") + 1] == "hopper-medium-replay-v2"
    assert command[command.index("--dataset-path") + 1] == data
    assert command[command.index("--run-name") + 1] == "hopper-medium-replay__dev__4"


@pytest.mark.parametrize("spelling", ["--pad-checkpoint", "--pad_checkpoint="])
def test_a_file_after_the_dashes_is_made_absolute(spelling, datasets, tmp_path):
    """Runs work in the sweep's folder: `-- --pad-checkpoint pre/pad.pt` reaches them as the file under the folder the
    sweep was started in, whichever way it is spelled; the other arguments pass unchanged."""
    data = os.path.join(datasets, "hopper-medium-replay.hdf5")
    given = [spelling + "pre/pad.pt"] if spelling.endswith("=") else [spelling, "pre/pad.pt"]
    proc = subprocess.run([sys.executable, SWEEP, "--datasets", f"hopper-medium-replay-v2={data}", "--seeds", "0",
                           "--label", "pre", "--out", "elsewhere", "--dry-run", "--", *given, "--freeze-pad"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, explain(proc)
    [command] = [line.split() for line in proc.stdout.splitlines() if line.startswith(f"  {sys.executable} ")]
    expected = os.path.join(tmp_path, "pre", "pad.pt")
    wanted = [f"--pad_checkpoint={expected}"] if spelling.endswith("=") else ["--pad-checkpoint", expected]
    assert command[-len(wanted) - 1:] == [*wanted, "--freeze-pad"], command


def test_env_ids_match_the_scripts():
    """The sweep's valid ids (it does not import the scripts, to start fast) are divo_utils'; paper = Table I."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from report import TABLE_I_TASKS

    sweep = load_sweep()
    assert sorted(sweep.SUITES["paper"]) == sorted(TABLE_I_TASKS) and len(sweep.SUITES["paper"]) == 15
    assert set(sweep.SUITES["locomotion"]) <= set(sweep.LOCOMOTION_IDS) and sweep.SUITES["antmaze"] == list(sweep.ANTMAZE_IDS)


def test_the_sweep_reads_the_scripts_names_and_limits_without_torch():
    """The ids, file names and limits come from divo_utils' torch-free package: the sweep starts without torch or MuJoCo,
    and knows each script's finished file and checkpoint as the scripts write them."""
    import divo_utils

    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('sweep', sys.argv[1]); "
            "spec.loader.exec_module(importlib.util.module_from_spec(spec)); "
            "print(sorted(m for m in ('torch', 'mujoco', 'gymnasium', 'h5py', 'ray') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, SWEEP], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", explain(proc)
    sweep = load_sweep()
    assert (sweep.LOCOMOTION_IDS, sweep.ANTMAZE_IDS) == (divo_utils.LOCOMOTION_IDS, divo_utils.ANTMAZE_IDS)
    assert (sweep.MAX_LABEL, sweep.MAX_RUN_NAME, sweep.LOCK) == (divo_utils.MAX_EXP_NAME, divo_utils.MAX_NAME, "lock")
    for script in ("divo_continuous", "divo_antmaze", "pad_pretrain"):
        run = sweep.Run("hopper-medium-v2", 0, os.path.join(ROOT, f"{script}.py"), None, "r")
        checkpoint, finished = divo_utils.PAD_FILES if script == "pad_pretrain" else divo_utils.DIVO_FILES
        assert sweep.run_files(run) == (finished, checkpoint), script
    assert sweep.run_files(sweep.Run("antmaze-umaze-v2", 0, sweep.script_of("antmaze-umaze-v2"), None, "r")) == \
        ("scores.json", "checkpoint.pt")


def test_a_run_folder_another_process_writes_is_left_alone(datasets, tmp_path):
    """A run that died before its first checkpoint is started again after its folder is removed, but a folder whose
    lock is held (a second sweep on the same --out, a user's --resume) is never removed nor restarted."""
    sweep, out = load_sweep(), tmp_path / "out"
    run = sweep.Run("hopper-medium-v2", 0, os.path.join(ROOT, "divo_continuous.py"),
                    str(datasets / "hopper-medium-v2.hdf5"), "hopper-medium-v2__lk__0")
    (out / "runs").mkdir(parents=True)
    endless = [*tiny(10**6), "--checkpoint-freq", "0"]  # no checkpoint: what the sweep took for a dead attempt
    writer = subprocess.Popen([sys.executable, *sweep.script_args(run, "lk", "new", endless, False)], cwd=out,
                              env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = out / "runs" / run.name
    try:
        deadline = time.time() + 120
        while not (folder / "args.json").exists() and writer.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert sweep.run_state(str(out), run) == "restart"
        with pytest.raises(sweep.RunRefused, match=f"left alone: process {writer.pid} on {socket.gethostname()} is "
                                                   f"writing it .it holds runs/{run.name}/lock."):
            sweep.run_one(run, str(out), "lk", tiny(40), False, 1)
        assert (folder / "args.json").exists() and writer.poll() is None and not (out / "logs").exists()
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    result = sweep.run_one(run, str(out), "lk", tiny(40), False, 1)  # the kernel freed the dead writer's lock
    assert result["status"] == "finished" and json.loads((folder / "scores.json").read_text())["step"] == 40
    (header,) = headers(out / "logs" / f"{run.name}.log")
    assert "--run-name hopper-medium-v2__lk__0" in header


def test_a_pretraining_sweep_knows_when_pad_pretrain_finished(datasets, tmp_path):
    """pad_pretrain.py writes pad_diagnostics.json last: a finished pretraining counts as finished and is skipped."""
    sweep, out = load_sweep(), tmp_path / "out"
    run = sweep.Run("hopper-medium-v2", 0, os.path.join(ROOT, "pad_pretrain.py"), str(datasets / "hopper-medium-v2.hdf5"),
                    "hopper-medium-v2__pad__0")
    extra = ["--hidden-dim", "16", "--num-layers", "1", "--batch-size", "32", "--total-timesteps", "20", "--holdout", "0",
             "--no-cuda"]
    assert sweep.run_one(run, str(out), "pad", extra, False, 1)["status"] == "finished"
    assert sweep.run_state(str(out), run) == "finished"
    assert sweep.script_args(run, "pad", "resume", [], False)[1:3] == ["--resume", f"runs/{run.name}/pad_checkpoint.pt"]
    before = sorted(os.listdir(out / "runs" / run.name))
    assert sweep.run_one(run, str(out), "pad", extra, False, 1) == {"name": run.name, "status": "skipped"}
    assert sorted(os.listdir(out / "runs" / run.name)) == before and "pad_diagnostics.json" in before


def test_the_eta_counts_the_running_runs_progress(tmp_path):
    """Before any run finished: running runs' own estimates, and their whole length for each run still queued."""
    sweep = load_sweep()
    running, ended, queued = tmp_path / "a", tmp_path / "b", tmp_path / "never-started"  # the runs' folders
    for folder, step in ((running, 1000), (ended, 10_000)):  # what divo_utils.runs.Run.report_progress writes
        folder.mkdir()
        (folder / "progress.json").write_text(json.dumps(
            {"step": step, "total_timesteps": 10_000, "steps_per_second": 5.0, "start_step": 0}))
    progress = sweep.Progress(total=3, skipped=0, cpus_per_run=1)
    assert sweep.running_progress(str(running)) == (1000.0, 10000.0, 5.0) and sweep.running_progress(str(ended)) is None
    # 1,800 s left for the running run, 2,000 s (10,000 steps at 5 per second) for each of the two others, 2 slots
    assert progress.eta([str(running), str(ended), str(queued)], running=2) == "~48m"
    progress.durations.append(600.0)  # once a run finished, its duration is the length of a queued one
    assert progress.eta([str(running), str(ended), str(queued)], running=2) == "~25m"
    assert sweep.Progress(total=1, skipped=0, cpus_per_run=1).eta([str(queued)], running=1) == "-"


@pytest.mark.parametrize("script, others", [("pad_pretrain.py", ("checkpoint.pt", "scores.json")),
                                            ("divo_continuous.py", ("pad_checkpoint.pt", "pad_diagnostics.json"))])
def test_a_sweep_of_another_script_never_touches_a_finished_run(script, others, datasets, tmp_path):
    """The same --out and --label with another --script: the other script's finished run is named and left alone
    (it was removed as if it were an attempt that died before its first checkpoint), before anything starts."""
    run_dir = tmp_path / "out" / "runs" / "hopper-medium-v2__tiny__0"
    run_dir.mkdir(parents=True)
    for name in others:
        (run_dir / name).write_text("{}")
    for dry in (["--dry-run"], []):
        proc = subprocess.run([sys.executable, SWEEP, "--env-ids", "hopper-medium-v2", "--script", script, "--seeds", "0",
                               "--label", "tiny", "--out", tmp_path / "out", "--dataset-dir", datasets, *dry],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and "another script" in proc.stderr and "Traceback" not in proc.stderr, explain(proc)
        assert sorted(os.listdir(run_dir)) == sorted(others) and "--out" in proc.stderr
