"""One writer per run folder, results that are final when they exist, and every interrupted state continued by the
one command its message names. Real processes, real signals (SIGKILL at an exact point of a run's writes: kill_at.py)
and real files; the runs are tiny (a few seconds each)."""

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, refused, run_script, write_d4rl_file
from divo_utils import runs

sys.path.insert(0, os.path.join(ROOT, "tools"))
import report  # noqa: E402

TINY = ["--env-id", "hopper-medium-v2", "--hidden-dim", "16", "--num-layers", "1", "--batch-size", "32",
        "--eval-episodes", "1", "--log-freq", "10", "--no-cuda", "--no-legacy-inertia", "--eval-freq", "20",
        "--checkpoint-freq", "20"]
KILL_AT = os.path.join(ROOT, "tests", "kill_at.py")


def results(run):
    """scores.json without the run's name, to compare runs of different names."""
    scores = json.loads((run / "scores.json").read_text())
    scores.pop("run_name")
    return scores


def leftovers(run):
    return sorted(name for name in os.listdir(run) if name.endswith(".tmp"))


def kill_at(file, script, *args, cwd):
    """Run `script args`, SIGKILLed just before it renames FILE.tmp to FILE."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, KILL_AT, file, os.path.join(ROOT, script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 40-step run with --save-model: what every interrupted and continued run must end with."""
    cwd = tmp_path_factory.mktemp("reference")
    write_d4rl_file(cwd / "data.hdf5", episode_lengths=(120, 90, 150, 140), terminal_episodes=(1,))
    run_script("divo_continuous.py", *TINY, "--dataset-path", cwd / "data.hdf5", "--total-timesteps", 40, "--save-model",
               "--run-name", "ref", cwd=cwd)
    return cwd, cwd / "runs" / "ref"


def test_a_second_writer_is_refused_and_a_killed_writer_leaves_no_lock(reference, tmp_path):
    """A run extended with --resume (its 40-step results go with its first new checkpoint) is refused to a second
    --resume while it trains; SIGKILLed, it leaves an unfinished run that resumes at once."""
    cwd, ref = reference
    run = tmp_path / "runs" / "r"
    shutil.copytree(ref, run)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "divo_continuous.py"), "--resume", "runs/r/checkpoint.pt",
                              "--total-timesteps", "1000000", "--log-freq", "100000", "--eval-freq", "0", "--no-cuda"],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, deadline = "", time.time() + 120
        while "removed runs/r/scores.json" not in out and first.poll() is None and time.time() < deadline:
            out += first.stdout.readline()
        assert "removed runs/r/scores.json, the results of an earlier step: the run trains on" in out, out
        assert not (run / "scores.json").exists()
        second = run_script("divo_continuous.py", "--resume", run / "checkpoint.pt", "--total-timesteps", 2000000,
                            "--no-cuda", cwd=tmp_path, check=False)
        assert refused(second, f"{run} is in use by process {first.pid} on {socket.gethostname()}, which holds "
                               f"{run / 'lock'}: a run has one writer at a time"), second.stderr
        assert first.poll() is None  # the first writer trains on, untouched
    finally:
        first.kill()
        first.wait()
    (unfinished,) = report.collect_runs([str(tmp_path / "runs")])
    assert not unfinished.finished and unfinished.progress.startswith("step ")
    step = runs.load_checkpoint(str(run / "checkpoint.pt"), "divo_continuous")["step"]
    proc = run_script("divo_continuous.py", "--resume", run / "checkpoint.pt", "--total-timesteps", step + 20, "--no-cuda",
                      "--dataset-path", cwd / "data.hdf5", cwd=tmp_path)  # the kernel freed the lock of the killed run
    assert f"resumed r at step {step:,}" in proc.stdout  # a copied run is named after its own folder
    assert json.loads((run / "scores.json").read_text())["step"] == step + 20
    assert (run / "lock").read_text().startswith("process ") and leftovers(run) == []


@pytest.mark.parametrize("file", ["checkpoint.pt", "divo_continuous.cleanrl_model", "scores.json"])
def test_a_run_killed_while_writing_a_file_is_unfinished_and_one_command_finishes_it(reference, tmp_path, file):
    """SIGKILL just before the first checkpoint, the model or scores.json is put in place: no scores.json (the run is
    not finished), and the command the messages name ends with exactly the uninterrupted run's files."""
    cwd, ref = reference
    args = [*TINY, "--dataset-path", cwd / "data.hdf5", "--total-timesteps", 40, "--save-model", "--run-name", "k"]
    assert kill_at(file, "divo_continuous.py", *args, cwd=tmp_path).returncode == -signal.SIGKILL
    run = tmp_path / "runs" / "k"
    assert not (run / "scores.json").exists() and (run / f"{file}.tmp").exists()
    if file == "checkpoint.pt":
        again = run_script("divo_continuous.py", *args, cwd=tmp_path, check=False)
        assert refused(again, "runs/k exists: choose another --run-name, or continue that run with --resume "
                              "runs/k/checkpoint.pt"), again.stderr
    proc = run_script("divo_continuous.py", "--resume", "runs/k/checkpoint.pt", "--no-cuda", cwd=tmp_path)
    if file == "checkpoint.pt":  # no checkpoint yet: the run starts again from step 0, in its folder
        assert "runs/k has no checkpoint.pt: the run stopped before its first one, and starts again from step 0" in proc.stdout
        assert "removed runs/k/checkpoint.pt.tmp, left by the attempt that stopped before its first checkpoint" in proc.stdout
        assert len(list(run.glob("events.out.tfevents.*"))) == 1  # the stopped attempt's events went
    else:  # at its last step: the run evaluates its last policy again and writes its final files
        assert "resumed k at step 40" in proc.stdout
    assert results(run) == results(ref)  # the evaluation history once, the same scores
    model = torch.load(run / "divo_continuous.cleanrl_model", weights_only=True)
    assert torch.equal(model["actor"]["net.0.weight"], torch.load(ref / "divo_continuous.cleanrl_model",
                                                                  weights_only=True)["actor"]["net.0.weight"])
    assert leftovers(run) == []


def test_pad_pretrain_killed_before_its_diagnostics_file_finishes_on_resume(reference, tmp_path):
    cwd, _ = reference
    args = ["--env-id", "hopper-medium-v2", "--dataset-path", cwd / "data.hdf5", "--hidden-dim", "16", "--num-layers", "1",
            "--batch-size", "32", "--total-timesteps", "40", "--holdout", "0", "--diag-freq", "20", "--log-freq", "10",
            "--no-cuda", "--run-name", "p"]
    assert kill_at("pad_diagnostics.json", "pad_pretrain.py", *args, cwd=tmp_path).returncode == -signal.SIGKILL
    run = tmp_path / "runs" / "p"
    assert runs.load_checkpoint(str(run / "pad_checkpoint.pt"), "pad_pretrain")["step"] == 40
    assert not (run / "pad_diagnostics.json").exists() and (run / "pad_samples.png").exists()
    run_script("pad_pretrain.py", "--resume", run / "pad_checkpoint.pt", "--no-cuda", cwd=tmp_path)
    diagnostics = json.loads((run / "pad_diagnostics.json").read_text())
    assert [row["step"] for row in diagnostics["history"]] == [0, 20, 40] and diagnostics["final"]["step"] == 40
    finished = run_script("pad_pretrain.py", "--resume", run / "pad_checkpoint.pt", "--no-cuda", cwd=tmp_path, check=False)
    assert refused(finished, "pad_checkpoint.pt is finished (40 of 40 steps"), finished.stderr


def test_resuming_from_inside_the_run_folder_logs_into_that_folder(reference, tmp_path):
    cwd, ref = reference
    run = tmp_path / "r"
    shutil.copytree(ref, run)
    run_script("divo_continuous.py", "--resume", "checkpoint.pt", "--total-timesteps", 60, "--no-cuda", "--dataset-path",
               cwd / "data.hdf5", cwd=run)
    assert not (run / "runs").exists() and len(list(run.glob("events.out.tfevents.*"))) == 2
    assert json.loads((run / "scores.json").read_text())["step"] == 60


def test_a_full_disk_stops_with_one_line_leaves_nothing_half_written_and_the_named_command_continues(reference, tmp_path):
    """A file-size limit below the checkpoint's size (a full disk as the run sees it: every write past it fails)."""
    cwd, ref = reference
    args = [sys.executable, os.path.join(ROOT, "divo_continuous.py"), *TINY, "--dataset-path", cwd / "data.hdf5",
            "--total-timesteps", "40", "--save-model", "--run-name", "f"]

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (32_000, 32_000))  # args.json and events fit, a checkpoint does not

    proc = subprocess.run(args, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300, preexec_fn=limit_file_size)
    assert refused(proc, "could not write runs/f/checkpoint.pt (File too large); nothing half-written was left: free "
                         "some disk space or raise the file-size limit (ulimit -f), then continue with --resume "
                         "runs/f/checkpoint.pt"), proc.stderr
    run = tmp_path / "runs" / "f"
    assert leftovers(run) == [] and not (run / "checkpoint.pt").exists()
    run_script("divo_continuous.py", "--resume", "runs/f/checkpoint.pt", "--no-cuda", cwd=tmp_path)
    assert results(run) == results(ref)


def test_resuming_an_older_copy_never_goes_back_over_the_runs_newer_checkpoint(reference, tmp_path):
    """--resume of an older copy of a checkpoint (a backup at step 20) in a folder whose checkpoint.pt is at step 40:
    refused in one line naming both, before anything changes (it used to replace checkpoint.pt and scores.json)."""
    cwd, ref = reference
    run = tmp_path / "runs" / "r"
    shutil.copytree(ref, run)
    older = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    older["step"] = 20
    torch.save(older, run / "ck20.pt")
    before = {name: (run / name).read_bytes() for name in ("checkpoint.pt", "scores.json")}
    proc = run_script("divo_continuous.py", "--resume", "runs/r/ck20.pt", "--no-cuda", cwd=tmp_path, check=False)
    assert refused(proc, "runs/r/ck20.pt is at step 20, and this folder's checkpoint.pt (which the run would "
                         "overwrite) at step 40: resuming would go backwards over it"), proc.stderr
    assert {name: (run / name).read_bytes() for name in before} == before
