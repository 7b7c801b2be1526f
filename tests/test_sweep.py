"""tools/sweep.py: a tiny grid on a local Ray and on a joined cluster, a killed run that resumes, a repeated sweep that
starts nothing, and bad input refused before Ray starts.

Ray runs only inside a private network and PID namespace (`unshare --net --pid --fork --mount-proc`) with nothing but
loopback: it binds no real interface, and `ray stop` there cannot see any Ray outside it. Every sweep gets its own
HOME (Ray keeps an authentication token there) and a short temporary folder (Ray's Unix sockets live in it).
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

import pytest
from conftest import ROOT, write_d4rl_file

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


def run_local_sweep(tmp, out, label, env_ids, datasets, env: dict = None) -> subprocess.CompletedProcess:
    """A sweep on a local Ray (started and stopped by the sweep) inside the namespace."""
    temp_dir = tempfile.mkdtemp(prefix="rt_", dir="/tmp")  # short: Unix socket paths are limited to ~107 characters
    try:
        command = sweep_command("--env-ids", *env_ids, "--seeds", "0", "--label", label, "--out", out, "--dataset-dir",
                                datasets, "--temp-dir", temp_dir, "--status-every", "1", "--", *tiny())
        return in_namespace(command, tmp / f"home_{label}", env)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-6000:]}"


def headers(log_path) -> list[str]:
    with open(log_path) as f:
        return [line for line in f if line.startswith(HEADER)]


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


def test_killed_run_resumes_from_its_checkpoint(local_sweep, datasets, tmp_path):
    """SIGKILL of the first attempt after its first checkpoint: Ray retries, the retry resumes, the result is identical."""
    _, reference = local_sweep
    out = tmp_path / "out"
    proc = run_local_sweep(tmp_path, out, "killed", ["hopper-medium-v2"], datasets,
                           env={"DIVO_SWEEP_TEST_KILL_AFTER_CHECKPOINT": "1"})
    assert proc.returncode == 0, explain(proc)
    log = (out / "logs" / "hopper-medium-v2__killed__0.log").read_text()
    first, second = headers(out / "logs" / "hopper-medium-v2__killed__0.log")
    assert "--resume" not in first and "--run-name hopper-medium-v2__killed__0" in first
    assert "--resume runs/hopper-medium-v2__killed__0/checkpoint.pt" in second
    assert "killed by the test hook" in log and "=== exit -9" in log
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


def test_sweep_joins_a_running_cluster(namespace, datasets, tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="rt_", dir="/tmp")
    out = tmp_path / "out"
    head = shlex.join([RAY, "start", "--head", "--port", str(PORT), "--node-ip-address", "127.0.0.1", "--temp-dir",
                       temp_dir, "--num-cpus", "1", "--include-dashboard", "false", "--disable-usage-stats"])
    sweep = sweep_command("--env-ids", "hopper-medium-v2", "--seeds", "3", "--label", "cluster", "--out", out,
                          "--dataset-dir", datasets, "--address", f"127.0.0.1:{PORT}", "--", *tiny(40))
    stop = shlex.join([RAY, "stop", "--force"])  # sees only this namespace's processes
    try:
        proc = in_namespace(f"trap '{stop} >/dev/null 2>&1' EXIT; {head} >/dev/null || exit 3; {sweep}", tmp_path / "home")
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert proc.returncode == 0, explain(proc)
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


def test_env_ids_match_the_scripts():
    """The sweep's copies of the valid ids (it does not import the scripts, to start fast) are theirs; paper = Table I."""
    import importlib.util

    import divo_antmaze
    import divo_continuous

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from report import TABLE_I_TASKS

    spec = importlib.util.spec_from_file_location("sweep", SWEEP)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    assert sweep.LOCOMOTION_IDS == divo_continuous.ENV_IDS and sweep.ANTMAZE_IDS == divo_antmaze.ENV_IDS
    assert sorted(sweep.SUITES["paper"]) == sorted(TABLE_I_TASKS) and len(sweep.SUITES["paper"]) == 15
    assert set(sweep.SUITES["locomotion"]) <= set(sweep.LOCOMOTION_IDS) and sweep.SUITES["antmaze"] == list(sweep.ANTMAZE_IDS)
