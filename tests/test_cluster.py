"""tools/sweep.py on two real Ray nodes, one of which dies mid-sweep.

Two network namespaces joined by a veth pair are the two machines: the head at 10.231.0.1 and a worker at
10.231.0.2, each with one CPU, its own Ray processes and its own Ray temporary folder, and nothing but that pair and
loopback (no traffic leaves them), and each its own HOME. They share the filesystem, which stands for the shared
disk a cluster's `--out` needs. The commands are docs/reproducing.md's cluster recipe: Ray's token authentication on
(`RAY_AUTH_MODE=token`), the head's token copied to the worker, `ray start --head` on one node, `ray start --address`
on the other, the sweep on the head with `--address`.

The sweep runs twin runs: two tasks with identical data, the same seed and the same arguments, so that each is the
other's uninterrupted reference. One lands on each node. As soon as the worker's run has written its first
checkpoint, every process of the worker namespace gets SIGKILL (its raylet, its Ray workers and the run): the node
is lost as a machine is. Ray retries the lost task on the head (a task on a dead node is a system failure, retried up
to `max_retries` times), the retry continues the run's checkpoint in the shared `--out`, and both runs end with
identical weights. Both namespaces and everything in them are removed at the end, whatever happens.

Needs root (network namespaces); skipped otherwise.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from conftest import write_d4rl_file
from test_sweep import RAY, SWEEP, headers, tiny

HEAD_IP, WORKER_IP, PORT = "10.231.0.1", "10.231.0.2", 6390  # a private test subnet, inside the namespaces only
RUNS = ["twin-a__two__0", "twin-b__two__0"]
# Ray's head marks a silent node dead after missed health checks: about 15 s with the defaults, longer than the rest of
# this sweep may take on an idle machine. Checked every 0.5 s here, so the sweep is still running to report it.
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "500",
                   "RAY_health_check_failure_threshold": "3"}


def netns(name: str, *command: str) -> list[str]:
    return ["ip", "netns", "exec", name, *command]


def kill_namespace(name: str) -> list[int]:
    """SIGKILL every process in network namespace `name` (what a machine's death does to them); their pids."""
    found = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
    for pid in map(int, found):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return list(map(int, found))


@pytest.fixture
def two_nodes():
    """(head namespace, worker namespace), joined by a veth pair, loopback up in each; removed afterwards with every
    process in them."""
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("unshare") is None:
        pytest.skip("network namespaces for two Ray nodes need root, `ip` (iproute2) and `unshare` (util-linux)")
    head, worker = f"divo-head-{os.getpid()}", f"divo-worker-{os.getpid()}"
    setup = [["ip", "netns", "add", head], ["ip", "netns", "add", worker],
             ["ip", "link", "add", "dvh0", "netns", head, "type", "veth", "peer", "name", "dvw0", "netns", worker],
             ["ip", "-n", head, "addr", "add", f"{HEAD_IP}/24", "dev", "dvh0"],
             ["ip", "-n", worker, "addr", "add", f"{WORKER_IP}/24", "dev", "dvw0"],
             *[["ip", "-n", name, "link", "set", link, "up"] for name, end in ((head, "dvh0"), (worker, "dvw0"))
               for link in ("lo", end)]]
    try:
        for command in setup:
            made = subprocess.run(command, capture_output=True, text=True)
            if made.returncode != 0:
                pytest.skip(f"no network namespaces for two Ray nodes: `{' '.join(command)}`: {made.stderr.strip()}")
        yield head, worker
    finally:
        for name in (worker, head):
            kill_namespace(name)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)  # its veth end goes with it


def wait_for(condition, seconds: float, what: str, log=None):
    """Poll `condition` until it returns something true; fail naming `what` (and showing `log`) after `seconds`."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.02)
    pytest.fail(f"no {what} after {seconds:g} s" + (f"\nsweep output:\n{log.read_text()[-6000:]}" if log else ""))


def alive_nodes(head: str, env: dict) -> int:
    status = subprocess.run(netns(head, RAY, "status", "--address", f"{HEAD_IP}:{PORT}"), env=env, capture_output=True,
                            text=True).stdout
    active = status.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return sum(line.strip().startswith("1 node_") for line in active.splitlines())


def tensors(payload, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (networks, optimisers, random streams), by its path in the payload."""
    if isinstance(payload, torch.Tensor):
        return {prefix: payload}
    items = payload.items() if isinstance(payload, dict) else enumerate(payload) if isinstance(payload, (list, tuple)) \
        else ()
    return {path: t for key, value in items for path, t in tensors(value, f"{prefix}/{key}").items()}


def start_cluster(head: str, worker: str, envs: dict, temp_dirs: list[str], worker_wrapper: tuple[str, ...] = ()):
    """docs/reproducing.md's recipe: the head's token made and copied to the worker, `ray start --head` on the head
    node, `ray start --address` on the worker (run through `worker_wrapper`), one CPU each; returns once both are in
    the cluster."""
    made = subprocess.run([RAY, "get-auth-token", "--generate"], env=envs[head], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    token = os.path.join(".ray", "auth_token")
    os.makedirs(os.path.join(envs[worker]["HOME"], ".ray"))
    shutil.copy(os.path.join(envs[head]["HOME"], token), os.path.join(envs[worker]["HOME"], token))
    for name, command in ((head, [RAY, "start", "--head", "--port", str(PORT), "--node-ip-address", HEAD_IP,
                                  "--num-cpus", "1", "--temp-dir", temp_dirs[0], "--include-dashboard", "false"]),
                          (worker, [*worker_wrapper, RAY, "start", "--address", f"{HEAD_IP}:{PORT}", "--node-ip-address",
                                    WORKER_IP, "--num-cpus", "1", "--temp-dir", temp_dirs[1]])):
        started = subprocess.run(netns(name, *command, "--disable-usage-stats"), env=envs[name], capture_output=True,
                                 text=True, timeout=120)
        assert started.returncode == 0, f"{' '.join(command)}:\n{started.stdout[-3000:]}\n{started.stderr[-3000:]}"
    wait_for(lambda: alive_nodes(head, envs[head]) == 2, 60, "second node in the cluster")


def twin_data(folder) -> list[str]:
    """The same small hopper-shaped file twice, as --datasets entries: twin runs."""
    folder.mkdir()
    for twin in ("twin-a", "twin-b"):
        write_d4rl_file(folder / f"{twin}.hdf5", episode_lengths=(120, 90, 150, 140), terminal_episodes=(1,))
    return [f"hopper-medium-v2={folder}/{twin}.hdf5" for twin in ("twin-a", "twin-b")]


@pytest.fixture
def ray_env(two_nodes, tmp_path):
    """Each node's environment (its own HOME; Ray's token authentication on, as from Ray 2.61 by default) and a short
    Ray temporary folder for each node. The sweep runs on the head, in the head's environment."""
    envs, temp_dirs = {}, []
    for name in two_nodes:
        home = tmp_path / f"home-{name.split('-')[1]}"
        home.mkdir()
        envs[name] = dict(os.environ, HOME=str(home), RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0",
                          PYTHONUNBUFFERED="1", **FAST_NODE_DEATH)
        temp_dirs.append(tempfile.mkdtemp(prefix="rt_", dir="/tmp"))  # short: Ray's Unix sockets live there
    yield envs, temp_dirs
    for folder in temp_dirs:
        shutil.rmtree(folder, ignore_errors=True)


def sweep_command(datasets: list[str], out, total_timesteps: int) -> list[str]:
    return [sys.executable, SWEEP, "--datasets", *datasets, "--seeds", "0", "--label", "two", "--out", str(out),
            "--address", f"{HEAD_IP}:{PORT}", "--status-every", "5", "--report-reps", "50", "--",
            *tiny(total_timesteps)]


def test_a_sweep_on_two_nodes_survives_the_loss_of_one(two_nodes, ray_env, tmp_path):
    (head, worker), (envs, temp_dirs) = two_nodes, ray_env
    datasets, out, log = twin_data(tmp_path / "data"), tmp_path / "out", tmp_path / "sweep.log"
    start_cluster(head, worker, envs, temp_dirs)
    with open(log, "w") as sweep_log:
        proc = subprocess.Popen(netns(head, *sweep_command(datasets, out, 1500)), env=envs[head], stdout=sweep_log,
                                stderr=subprocess.STDOUT)
    try:
        def worker_run_checkpointed():
            for name in RUNS:
                run_log = out / "logs" / f"{name}.log"
                if run_log.is_file() and f"on node {WORKER_IP} " in run_log.read_text() and \
                        (out / "runs" / name / "checkpoint.pt").is_file():
                    return name
        lost = wait_for(worker_run_checkpointed, 120, "checkpoint of a run on the worker node", log)
        assert not (out / "runs" / lost / "scores.json").exists(), "the worker's run finished before the kill"
        assert kill_namespace(worker), "no process in the worker's namespace"
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log.read_text()
    explain = f"sweep output:\n{output[-8000:]}"
    assert proc.returncode == 0, explain
    (kept,) = set(RUNS) - {lost}

    # The sweep's log: the cluster, runs started on both nodes, the worker's death, the lost run finishing on the head
    # from its checkpoint, and the report.
    assert f"the Ray cluster at {HEAD_IP}:{PORT}: 2 CPUs" in output, explain
    assert f"nodes: {HEAD_IP} (" in output and f", {WORKER_IP} (" in output, explain
    assert f"node {WORKER_IP} (" in output and "lost: Ray retries each run it held on the nodes left" in output, explain
    first, second = headers(out / "logs" / f"{lost}.log")
    assert f"on node {WORKER_IP} (" in first and "--resume" not in first
    assert f"on node {HEAD_IP} (" in second and f"--resume runs/{lost}/checkpoint.pt" in second
    lost_log = (out / "logs" / f"{lost}.log").read_text()
    assert lost_log.count("=== exit") == 1, "the killed attempt wrote no exit line; the retry wrote one"
    resumed_at = int(lost_log.split(f"resumed {lost} at step ", 1)[1].split()[0].replace(",", ""))
    assert 20 <= resumed_at < 1500
    assert f"finished {lost} on node {HEAD_IP} (" in output and \
           f", continuing its checkpoint of step {resumed_at:,} (log:" in output, explain
    (only,) = headers(out / "logs" / f"{kept}.log")
    assert f"on node {HEAD_IP} (" in only and f"finished {kept} on node {HEAD_IP} (" in output, explain
    assert "2 of 2 runs finished" in output and "report: " in output, explain
    table = (out / "report" / "table.md").read_text()
    assert "twin-a" in table and "twin-b" in table

    # Bit-exact: the run that lost its node equals its twin that never stopped.
    scores = [json.loads((out / "runs" / name / "scores.json").read_text()) for name in (lost, kept)]
    assert scores[0]["step"] == scores[1]["step"] == 1500 and scores[0]["evaluations"] == scores[1]["evaluations"]
    lost_state, kept_state = (tensors(torch.load(out / "runs" / name / "checkpoint.pt", weights_only=True))
                              for name in (lost, kept))
    assert lost_state.keys() == kept_state.keys() and len(lost_state) > 20
    assert all(torch.equal(lost_state[key], kept_state[key]) for key in lost_state)


def test_without_a_shared_out_the_sweep_says_where_the_results_went(two_nodes, ray_env, tmp_path):
    """The worker node has its own empty folder at --out's path (a private mount): its run finishes there, and the
    sweep on the head reports it failed, naming the node and what --out must be, instead of calling it finished."""
    (head, worker), (envs, temp_dirs) = two_nodes, ray_env
    datasets, out = twin_data(tmp_path / "data"), tmp_path / "out"
    out.mkdir()
    private_out = ("unshare", "--mount", "sh", "-c", f'mount -t tmpfs none "{out}" && exec "$0" "$@"')
    start_cluster(head, worker, envs, temp_dirs, private_out)
    proc = subprocess.run(netns(head, *sweep_command(datasets, out, 40)), env=envs[head], capture_output=True, text=True,
                          timeout=300)
    explain = f"exit {proc.returncode}\nstdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 1, explain
    elsewhere = [name for name in RUNS if not (out / "logs" / f"{name}.log").exists()]
    assert len(elsewhere) == 1, explain  # one run ran on each node; the worker's wrote only to its own folder
    (here,) = set(RUNS) - set(elsewhere)
    assert f"finished {here} on node {HEAD_IP} (" in proc.stdout, explain
    assert f"FAILED {elsewhere[0]}: finished on node {WORKER_IP} (" in proc.stdout and f"but {out} here has no runs/" \
           f"{elsewhere[0]}/scores.json: --out must be one folder every node shares, at the same path" in proc.stdout, \
        explain
    assert "1 of 2 runs finished" in proc.stdout and "twin" in (out / "report" / "table.md").read_text()
