"""Reliability IV (issue 40): a finished result is never removed or overwritten, every failure after training keeps
the run, and every mistake gets one line that says what to do, before any file changes.

Everything runs as a user runs it (the scripts and tools as subprocesses on tiny settings, on small D4RL-format
files made here) and is checked on what the user sees: the exit status, no traceback, the words of the message, and
the files left afterwards. The messages are matched loosely (a few words: the file or argument named, what to do).
Sweeps that start Ray run in a private network and PID namespace with only loopback, as in tests/test_sweep.py.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np
import pytest
import torch

from conftest import ROOT, TINY, explain, folder_bytes, one_line, run_script, write_d4rl_file

PAD_TINY = ["--hidden-dim", "16", "--num-layers", "1", "--batch-size", "32", "--total-timesteps", "20", "--holdout", "0",
            "--no-cuda"]
REPORT_FAST = ["--reps", "50", "--profile-reps", "50"]
SWEEP = os.path.join(ROOT, "tools", "sweep.py")
NAMESPACE = ["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount-proc", "bash", "-c"]


def sweep_tiny(total_timesteps: int = 20) -> list[str]:
    """Pass-through arguments of a sweep's DIVO run of a second or two."""
    return ["--hidden-dim", "16", "--num-layers", "1", "--batch-size", "32", "--eval-episodes", "1", "--eval-freq", "0",
            "--log-freq", "10", "--total-timesteps", str(total_timesteps), "--checkpoint-freq", "20",
            "--no-legacy-inertia", "--no-cuda"]


def scores_step(run) -> int:
    return json.loads((run / "scores.json").read_text())["step"]


def checkpoint_step(path) -> int:
    return torch.load(path, weights_only=True)["step"]


def copy_run(source, cwd, name):
    """A copy of the run folder `source` as `cwd`/runs/`name` (its run_name left as it was)."""
    target = cwd / "runs" / name
    shutil.copytree(source, target)
    return target


def namespace_available() -> bool:
    try:
        return subprocess.run([*NAMESPACE, "ip link set lo up"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def namespace():
    """Skip the Ray tests where a private network namespace cannot be made (not root, no unshare)."""
    if not namespace_available():
        pytest.skip("no private network namespace for Ray")


def in_namespace(command: list, home, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run `command` in a fresh network + PID namespace with only loopback up (all of it killed on a timeout)."""
    home.mkdir(exist_ok=True)
    env = dict(os.environ, HOME=str(home), PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1")
    return subprocess.run([*NAMESPACE, f"ip link set lo up && {shlex.join(map(str, command))}"], env=env,
                          capture_output=True, text=True, timeout=timeout)


def sweep(tmp, *args, timeout: int = 240) -> subprocess.CompletedProcess:
    """tools/sweep.py on a local Ray in the namespace, with its own short Ray folder and HOME."""
    temp_dir = tempfile.mkdtemp(prefix="rt_", dir="/tmp")  # Unix socket paths are limited to ~107 characters
    try:
        return in_namespace([sys.executable, SWEEP, "--report-reps", "50", "--temp-dir", temp_dir, "--status-every", "1",
                             *args], tmp / "home", timeout=timeout)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """A small hopper-shaped file named as a sweep's --dataset-dir looks it up."""
    folder = tmp_path_factory.mktemp("data")
    write_d4rl_file(folder / "hopper-medium-v2.hdf5", episode_lengths=(120, 90, 150, 140), terminal_episodes=(1,))
    return folder


# ==============================================================================================================
# The cases of issue 40
# ==============================================================================================================
# ---------------------------------------------------------------------------------------------- data loss
@pytest.mark.parametrize("first", ["divo", "pad"])
def test_a_sweep_of_another_script_never_removes_a_finished_run(first, namespace, datasets, tmp_path):
    """A finished DIVO run, then a pad_pretrain.py sweep over the same --out/--label (and the reverse): the earlier
    run is a mismatch named before anything starts; its folder keeps every byte."""
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    name = "hopper-medium-v2__lbl__0"
    common = ["--env-id", "hopper-medium-v2", "--seed", 0, "--exp-name", "lbl", "--run-name", name, "--dataset-path",
              datasets / "hopper-medium-v2.hdf5"]
    if first == "divo":
        run_script("divo_continuous.py", *common, *sweep_tiny(), cwd=out)
        script, extra, kept = "pad_pretrain.py", PAD_TINY, "scores.json"
    else:
        run_script("pad_pretrain.py", *common, *PAD_TINY, cwd=out)
        script, extra, kept = "divo_continuous.py", sweep_tiny(), "pad_checkpoint.pt"
    before = folder_bytes(out / "runs" / name)
    proc = sweep(tmp_path, "--script", script, "--env-ids", "hopper-medium-v2", "--seeds", 0, "--label", "lbl", "--out",
                 out, "--dataset-dir", datasets, "--", *extra)
    assert kept in os.listdir(out / "runs" / name), explain(proc)
    assert folder_bytes(out / "runs" / name) == before, explain(proc)
    assert one_line(proc, name) and ("script" in proc.stderr or script in proc.stderr), explain(proc)
    assert "planned commands" not in proc.stdout


def test_resuming_an_older_copy_never_overwrites_a_newer_checkpoint(finished_run, tmp_path):
    """runs/bk/ck40.pt (a copy kept at step 40) resumed to 50 in the run whose checkpoint.pt is at 60: refused (or
    written elsewhere, saying where); the run's step-60 checkpoint and scores stay."""
    cwd, done = finished_run
    run = copy_run(done, tmp_path, "bk")
    shutil.copy(run / "checkpoint.pt", run / "ck40.pt")
    run_script("divo_continuous.py", "--resume", run / "checkpoint.pt", "--total-timesteps", 60, "--no-cuda",
               cwd=tmp_path)
    assert scores_step(run) == 60
    before = {name: (run / name).read_bytes() for name in ("checkpoint.pt", "scores.json")}
    proc = run_script("divo_continuous.py", "--resume", run / "ck40.pt", "--total-timesteps", 50, "--no-cuda",
                      cwd=tmp_path, check=False)
    assert "Traceback" not in proc.stderr, explain(proc)
    assert {name: (run / name).read_bytes() for name in before} == before, explain(proc)
    assert checkpoint_step(run / "checkpoint.pt") == 60
    if proc.returncode == 0:  # written elsewhere: it must say where
        assert "60" in proc.stdout and "ck40.pt" in proc.stdout, explain(proc)
    else:
        assert one_line(proc, "ck40.pt", "60"), explain(proc)


@pytest.mark.parametrize("blocker", ["checkpoint.pt.tmp", "scores.json.tmp"])
def test_an_extension_keeps_scores_json_until_its_new_files_are_safe(blocker, finished_run, tmp_path):
    """A directory standing at a temporary file of an atomic write (as a full disk would fail that write) during an
    extension: the finished run keeps its scores.json and checkpoint (it still reads as finished), one line."""
    cwd, done = finished_run
    run = copy_run(done, tmp_path, "x")
    (run / blocker).mkdir()
    before = {name: (run / name).read_bytes() for name in ("checkpoint.pt", "scores.json")}
    proc = run_script("divo_continuous.py", "--resume", run / "checkpoint.pt", "--total-timesteps", 60, "--no-cuda",
                      cwd=tmp_path, check=False)
    assert "Traceback" not in proc.stderr, explain(proc)
    if proc.returncode == 0:  # the stale .tmp was cleared away, as a partial checkpoint is
        assert scores_step(run) == 60 and checkpoint_step(run / "checkpoint.pt") == 60
    else:
        assert one_line(proc, blocker), explain(proc)
        assert (run / "scores.json").is_file(), "a finished run lost its scores.json: " + explain(proc)
        assert json.loads((run / "scores.json").read_text())["step"] == checkpoint_step(run / "checkpoint.pt")
        assert (run / "checkpoint.pt").read_bytes() == before["checkpoint.pt"] or scores_step(run) == 60


def test_a_video_that_cannot_be_made_never_costs_the_run(finished_run, tmp_path):
    """--capture-video where MuJoCo cannot render (MUJOCO_GL=glfw without a display): refused before any run folder
    (filming is checked first), or the run saved with one line about the video; never a traceback after training."""
    cwd, _ = finished_run
    env = {"MUJOCO_GL": "glfw", "DISPLAY": ""}
    proc = run_script("divo_continuous.py", *TINY, "--dataset-path", cwd / "data.hdf5", "--total-timesteps", 20,
                      "--eval-freq", 0, "--capture-video", "--run-name", "vid", cwd=tmp_path, check=False, env=env)
    assert "Traceback" not in proc.stderr, explain(proc)
    run = tmp_path / "runs" / "vid"
    if run.exists():  # filming failed only at the end: the run is saved first
        assert (run / "checkpoint.pt").is_file() and scores_step(run) == 20, explain(proc)
        assert "video" in (proc.stdout + proc.stderr).lower()
    else:
        assert one_line(proc, "--capture-video", "MUJOCO_GL"), explain(proc)
        assert "dataset " not in proc.stdout  # checked before the data were read, let alone training


# ---------------------------------------------------------------------------------------------- silent-wrong
def test_a_file_recorded_for_another_robot_is_refused_or_warned(tmp_path):
    """A HalfCheetah file (same sizes as Walker2d's) whose own `env` attribute says so, under --env-id walker2d-...:
    scored with Walker2d's reference returns without a word today."""
    path = tmp_path / "robot.hdf5"
    write_d4rl_file(path, obs_dim=17, act_dim=6, episode_lengths=(120, 90, 150, 140), terminal_episodes=(1,))
    with h5py.File(path, "a") as f:
        f.attrs["env"] = "halfcheetah-medium-v2"
    argv = [*TINY[2:], "--env-id", "walker2d-medium-v2", "--dataset-path", path, "--total-timesteps", 10, "--eval-freq", 0]
    proc = run_script("divo_continuous.py", *argv, cwd=tmp_path, check=False)
    assert "Traceback" not in proc.stderr, explain(proc)
    assert "halfcheetah" in (proc.stdout + proc.stderr).lower() and "walker2d" in (proc.stdout + proc.stderr), explain(proc)
    if proc.returncode != 0:
        assert one_line(proc, "robot.hdf5", "halfcheetah") and not (tmp_path / "runs").exists(), explain(proc)


@pytest.fixture(scope="module")
def two_files_one_name(tmp_path_factory):
    """Two finished runs (label same) on two different files that share a name: a/mydata.hdf5 and b/mydata.hdf5."""
    cwd = tmp_path_factory.mktemp("samename")
    for i, folder in enumerate("ab"):
        (cwd / folder).mkdir()
        write_d4rl_file(cwd / folder / "mydata.hdf5", episode_lengths=(120, 90, 150, 140), seed=i)
        run_script("divo_continuous.py", *TINY, "--dataset-path", cwd / folder / "mydata.hdf5", "--total-timesteps", 10,
                   "--eval-freq", 0, "--exp-name", "same", "--run-name", f"on_{folder}", cwd=cwd)
    return cwd


def test_the_report_keeps_two_files_of_one_name_apart(two_files_one_name, tmp_path):
    cwd = two_files_one_name
    proc = run_script("tools/report.py", cwd / "runs", "--out", tmp_path / "rep", *REPORT_FAST, cwd=tmp_path, check=False)
    assert "Traceback" not in proc.stderr, explain(proc)
    if proc.returncode == 0:  # two tasks, each named so that a reader tells them apart
        table = (tmp_path / "rep" / "table.md").read_text()
        rows = [line for line in table.splitlines() if line.startswith("|") and "mydata" in line]
        assert len(rows) >= 2, table
    else:
        assert one_line(proc, str(cwd / "a" / "mydata.hdf5"), str(cwd / "b" / "mydata.hdf5")), explain(proc)


def test_the_report_names_a_finished_run_it_leaves_out_for_a_missing_args_json(finished_run, tmp_path):
    _, done = finished_run
    copy_run(done, tmp_path, "kept")
    (copy_run(done, tmp_path, "no_args") / "args.json").unlink()
    proc = run_script("tools/report.py", tmp_path / "runs", "--out", tmp_path / "rep", *REPORT_FAST, cwd=tmp_path,
                      check=False)
    assert "Traceback" not in proc.stderr, explain(proc)
    said = proc.stdout + proc.stderr
    assert "no_args" in said and "args.json" in said, explain(proc)


def test_the_report_leaves_no_stale_versus_table_beside_a_new_one(two_files_one_name, finished_run, tmp_path):
    """A --versus report, then a report of other runs without --versus into the same --out: the old versus.md and
    versus.json (about runs no longer in the table) are gone, or the report says they are stale."""
    cwd = two_files_one_name
    _, done = finished_run
    both = tmp_path / "both"
    shutil.copytree(cwd / "runs", both)
    shutil.copytree(done, both / "done")  # label divo_continuous beside the label `same`
    out = tmp_path / "rep"
    run_script("tools/report.py", both, "--out", out, *REPORT_FAST, "--versus", "same", cwd=tmp_path)
    assert (out / "versus.md").is_file()
    proc = run_script("tools/report.py", cwd / "runs", "--out", out, *REPORT_FAST, cwd=tmp_path, check=False)
    assert "Traceback" not in proc.stderr, explain(proc)
    leftover = [name for name in ("versus.md", "versus.json") if (out / name).exists()]
    assert not leftover or "versus" in proc.stdout + proc.stderr, (leftover, explain(proc))


def test_the_sweep_never_makes_its_lock_through_a_symbolic_link(namespace, datasets, tmp_path):
    """A run folder (an attempt that died before its first checkpoint) whose `lock` is a link to a file outside
    --out: the sweep creates nothing outside --out."""
    out, outside = tmp_path / "out", tmp_path / "outside"
    run = out / "runs" / "hopper-medium-v2__lk__0"
    run.mkdir(parents=True)
    outside.mkdir()
    os.symlink(outside / "made-through-the-link", run / "lock")
    proc = sweep(tmp_path, "--env-ids", "hopper-medium-v2", "--seeds", 0, "--label", "lk", "--out", out, "--dataset-dir",
                 datasets, "--", *sweep_tiny())
    assert os.listdir(outside) == [], explain(proc)
    assert "Traceback" not in proc.stderr, explain(proc)


def test_adpo_contest_refuses_a_run_whose_dataset_was_replaced(finished_run, tmp_path):
    """The run's file replaced by other data of the same shape: the contest would read other states than the critics
    were trained on; --resume checks the SHA-1, so must the contest."""
    cwd, done = finished_run
    shutil.copy(cwd / "data.hdf5", tmp_path / "data.hdf5")
    run = copy_run(done, tmp_path, "done")
    args = json.loads((run / "args.json").read_text())
    args["dataset_path"] = str(tmp_path / "data.hdf5")
    (run / "args.json").write_text(json.dumps(args))
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    checkpoint["args"]["dataset_path"] = str(tmp_path / "data.hdf5")
    torch.save(checkpoint, run / "checkpoint.pt")
    write_d4rl_file(tmp_path / "data.hdf5", episode_lengths=(120, 90, 150, 140), terminal_episodes=(1,), seed=7)
    proc = run_script("tools/adpo_contest.py", run, "--samples", 50, cwd=tmp_path, check=False)
    assert one_line(proc, "data.hdf5"), explain(proc)
    assert any(word in proc.stderr.lower() for word in ("sha-1", "sha1", "changed", "replaced", "differs")), explain(proc)


def test_the_report_warns_of_mixed_algorithm_arguments_in_one_cell(finished_run, tmp_path):
    """Two seeds of one label and task, one trained with --alpha 1.0: pooled into one cell, but with a warning that
    names the argument (as the report warns for mixed lengths)."""
    cwd, _ = finished_run
    for seed, alpha in ((1, 2.5), (2, 1.0)):
        run_script("divo_continuous.py", *TINY, "--dataset-path", cwd / "data.hdf5", "--total-timesteps", 10,
                   "--eval-freq", 0, "--seed", seed, "--alpha", alpha, "--exp-name", "mix", "--run-name", f"s{seed}",
                   cwd=tmp_path)
    proc = run_script("tools/report.py", tmp_path / "runs", "--out", tmp_path / "rep", *REPORT_FAST, cwd=tmp_path,
                      check=False)
    said = proc.stdout + proc.stderr + ((tmp_path / "rep" / "table.md").read_text()
                                        if (tmp_path / "rep" / "table.md").exists() else "")
    assert "alpha" in said, explain(proc)


# ---------------------------------------------------------------------------------------------- tracebacks, the hang
def no_wandb_key(tmp_path) -> dict:
    """An environment with no W&B key anywhere: no variable, a HOME without .netrc or W&B settings."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {"HOME": str(home), "WANDB_API_KEY": "", "WANDB_MODE": "", "WANDB_DIR": str(tmp_path / "wandb-dir"),
            "WANDB_CONFIG_DIR": str(home / ".config" / "wandb")}


def test_track_without_a_wandb_key_is_refused_before_the_run_folder(finished_run, tmp_path):
    cwd, _ = finished_run
    env = no_wandb_key(tmp_path)
    argv = [*TINY, "--dataset-path", cwd / "data.hdf5", "--total-timesteps", 10, "--eval-freq", 0, "--track",
            "--run-name", "trk"]
    proc = run_script("divo_continuous.py", *argv, cwd=tmp_path, check=False, env=env)
    assert one_line(proc, "--track"), explain(proc)
    assert "--no-track" in proc.stderr or "WANDB_MODE=offline" in proc.stderr or "wandb login" in proc.stderr
    assert not (tmp_path / "runs").exists(), explain(proc)
    again = run_script("divo_continuous.py", *argv, cwd=tmp_path, check=False, env=env)
    assert "exists" not in again.stderr  # the same command is refused for the key, not for a folder it left


def test_resuming_a_tracked_run_without_a_wandb_key_changes_no_file(finished_run, tmp_path):
    cwd, _ = finished_run
    offline = {**no_wandb_key(tmp_path), "WANDB_MODE": "offline"}
    run_script("divo_continuous.py", *TINY, "--dataset-path", cwd / "data.hdf5", "--total-timesteps", 20, "--eval-freq",
               0, "--track", "--run-name", "trk", cwd=tmp_path, env=offline)
    run = tmp_path / "runs" / "trk"
    before = folder_bytes(run)
    proc = run_script("divo_continuous.py", "--resume", run / "checkpoint.pt", "--total-timesteps", 40, "--no-cuda",
                      cwd=tmp_path, check=False, env=no_wandb_key(tmp_path))
    assert one_line(proc, "--track"), explain(proc)
    assert folder_bytes(run) == before


def edit_args_json(run, **values):
    args = json.loads((run / "args.json").read_text())
    args.update(values)
    (run / "args.json").write_text(json.dumps(args))


@pytest.mark.parametrize("key, value", [("batch_size", "abc"), ("env_id", None)])
def test_a_hand_edited_args_json_is_one_line_naming_it(key, value, finished_run, tmp_path):
    """A run stopped before its first checkpoint starts again from its args.json: a wrong type or null there is
    named (the file and the key), with nothing changed."""
    _, done = finished_run
    run = tmp_path / "runs" / "y"
    run.mkdir(parents=True)
    shutil.copy(done / "args.json", run / "args.json")
    edit_args_json(run, run_name="y", **{key: value})
    before = folder_bytes(run)
    proc = run_script("divo_continuous.py", "--resume", run / "checkpoint.pt", "--no-cuda", cwd=tmp_path, check=False)
    assert one_line(proc, "args.json", key), explain(proc)
    assert folder_bytes(run) == before


@pytest.mark.parametrize("key", ["dataset_sha1", "rng", "args", "step"])
def test_a_checkpoint_missing_a_key_is_one_line_naming_it(key, finished_run, tmp_path):
    """A checkpoint of another version (a key missing): one line naming the file and the key, nothing changed."""
    _, done = finished_run
    run = copy_run(done, tmp_path, "z")
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    del checkpoint[key]
    torch.save(checkpoint, run / "checkpoint.pt")
    before = folder_bytes(run)
    proc = run_script("divo_continuous.py", "--resume", run / "checkpoint.pt", "--total-timesteps", 60, "--no-cuda",
                      cwd=tmp_path, check=False)
    assert one_line(proc, "checkpoint.pt", key), explain(proc)
    assert folder_bytes(run) == before


def test_a_cluster_that_cannot_be_reached_fails_within_a_minute_and_leaves_nothing(namespace, datasets, tmp_path):
    out = tmp_path / "out"
    start = time.time()
    try:
        proc = in_namespace([sys.executable, SWEEP, "--env-ids", "hopper-medium-v2", "--seeds", 0, "--label", "far",
                             "--out", out, "--dataset-dir", datasets, "--address", "127.0.0.1:1", "--", *sweep_tiny()],
                            tmp_path / "home", timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"--address 127.0.0.1:1 still running after 60 s; left {os.listdir(tmp_path)}")
    assert time.time() - start < 60
    assert one_line(proc, "127.0.0.1:1"), explain(proc)
    assert not out.exists(), os.listdir(out)


# ---------------------------------------------------------------------------------------------- messes: advice
def test_resuming_a_finished_run_by_its_folder_is_not_told_to_delete_it(finished_run, tmp_path):
    _, done = finished_run
    run = copy_run(done, tmp_path, "s0")
    before = folder_bytes(run)
    proc = run_script("divo_continuous.py", "--resume", run, "--no-cuda", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, explain(proc)
    assert "remove" not in proc.stderr.lower() and "delete" not in proc.stderr.lower(), explain(proc)
    assert "finished" in proc.stderr or "checkpoint.pt" in proc.stderr, explain(proc)
    assert folder_bytes(run) == before


def test_resuming_args_json_names_the_checkpoint_not_pytorch_advice(finished_run, tmp_path):
    _, done = finished_run
    run = copy_run(done, tmp_path, "s0")
    proc = run_script("divo_continuous.py", "--resume", run / "args.json", "--no-cuda", cwd=tmp_path, check=False)
    assert one_line(proc, "args.json", "checkpoint.pt"), explain(proc)
    assert "weights_only" not in proc.stderr and "arbitrary code" not in proc.stderr


def test_a_directory_where_a_file_goes_is_not_called_a_full_disk(finished_run, tmp_path):
    """A directory at the model's file of an extension with --save-model: say that a directory stands there."""
    _, done = finished_run
    run = copy_run(done, tmp_path, "x")
    (run / "divo_continuous.cleanrl_model").mkdir()
    proc = run_script("divo_continuous.py", "--resume", run / "checkpoint.pt", "--total-timesteps", 60, "--save-model",
                      "--no-cuda", cwd=tmp_path, check=False)
    assert one_line(proc, "divo_continuous.cleanrl_model", "directory"), explain(proc)
    assert "disk space" not in proc.stderr.lower()


def test_a_lock_that_is_a_directory_is_named_not_its_folder(finished_run, tmp_path):
    _, done = finished_run
    run = copy_run(done, tmp_path, "x")
    (run / "lock").unlink()
    (run / "lock").mkdir()
    proc = run_script("divo_continuous.py", "--resume", run / "checkpoint.pt", "--total-timesteps", 60, "--no-cuda",
                      cwd=tmp_path, check=False)
    assert one_line(proc, str(run / "lock")) or one_line(proc, "runs/x/lock"), explain(proc)


def test_a_run_beyond_its_length_does_not_claim_results_it_has_not(finished_run, tmp_path):
    """runs/ex_b holds only a copied checkpoint at step 40; --total-timesteps 30: no results are in runs/ex_b."""
    _, done = finished_run
    run = tmp_path / "runs" / "ex_b"
    run.mkdir(parents=True)
    shutil.copy(done / "checkpoint.pt", run / "checkpoint.pt")
    proc = run_script("divo_continuous.py", "--resume", run / "checkpoint.pt", "--total-timesteps", 30, "--no-cuda",
                      cwd=tmp_path, check=False)
    assert one_line(proc, "40"), explain(proc)
    assert "results are in" not in proc.stderr, explain(proc)


def test_at_step_without_an_evaluation_there_does_not_say_train_first(finished_run, tmp_path):
    _, done = finished_run
    proc = run_script("tools/report.py", done, "--out", tmp_path / "rep", *REPORT_FAST, "--at-step", 12345,
                      cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, explain(proc)
    assert "train first" not in proc.stderr and "12345" in proc.stderr.replace(",", ""), explain(proc)


def test_a_hand_edited_batch_size_is_named_as_coming_from_args_json(finished_run, tmp_path):
    _, done = finished_run
    run = tmp_path / "runs" / "y"
    run.mkdir(parents=True)
    shutil.copy(done / "args.json", run / "args.json")
    edit_args_json(run, run_name="y", batch_size=-5)
    proc = run_script("divo_continuous.py", "--resume", run / "checkpoint.pt", "--no-cuda", cwd=tmp_path, check=False)
    assert one_line(proc, "args.json", "batch_size" if "batch_size" in proc.stderr else "batch-size", "-5"), explain(proc)


# ---------------------------------------------------------------------------------------------- messes: checks too late
def test_huge_rewards_leave_no_folder_that_blocks_the_same_command(tmp_path):
    rewards = np.full(500, 1e30, np.float32)
    write_d4rl_file(tmp_path / "d.hdf5", episode_lengths=(120, 90, 150, 140), rewards=rewards)
    argv = [*TINY, "--dataset-path", tmp_path / "d.hdf5", "--total-timesteps", 30, "--eval-freq", 0, "--run-name", "big"]
    first = run_script("divo_continuous.py", *argv, cwd=tmp_path, check=False)
    assert first.returncode == 1 and "Traceback" not in first.stderr, explain(first)
    second = run_script("divo_continuous.py", *argv, cwd=tmp_path, check=False)
    assert "exists" not in second.stderr and second.stderr == first.stderr, explain(second)


def test_float64_values_too_large_for_float32_are_not_called_nan_or_corrupt(tmp_path):
    rewards = np.random.default_rng(0).normal(size=500)
    rewards[9] = 1e300  # finite in the file's float64, inf in float32
    write_d4rl_file(tmp_path / "d.hdf5", episode_lengths=(120, 90, 150, 140), dtype=np.float64, rewards=rewards)
    proc = run_script("divo_continuous.py", *TINY, "--dataset-path", tmp_path / "d.hdf5", "--total-timesteps", 10,
                      cwd=tmp_path, check=False)
    assert one_line(proc, "d.hdf5", "rewards", "float32"), explain(proc)
    assert "NaN or inf" not in proc.stderr and "corrupt" not in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("extra, words", [(["--alpha", "-1"], ["--alpha", "out of range"]),
                                          (["--alphaa", "1"], ["--alphaa"])], ids=["out-of-range", "typo"])
def test_the_sweep_checks_the_script_arguments_before_ray(extra, words, namespace, datasets, tmp_path):
    """Checked once with the script's own parser, before Ray starts and before any folder: one line, no retries,
    no border of tyro's box."""
    out = tmp_path / "out"
    proc = sweep(tmp_path, "--env-ids", "hopper-medium-v2", "--seeds", 0, "--label", "bad", "--out", out, "--dataset-dir",
                 datasets, "--", *sweep_tiny(), *extra)
    assert one_line(proc, *words), explain(proc)
    assert not any(ch in proc.stderr for ch in "│╭╰─"), explain(proc)
    assert "Ray" not in proc.stdout and not out.exists(), explain(proc)


def test_a_pad_checkpoint_folder_is_refused_before_the_data_loads(finished_run, tmp_path):
    cwd, done = finished_run
    proc = run_script("divo_continuous.py", *TINY, "--dataset-path", cwd / "data.hdf5", "--pad-checkpoint", done,
                      cwd=tmp_path, check=False)
    assert one_line(proc, "--pad-checkpoint"), explain(proc)
    assert "dataset " not in proc.stdout and "rows ->" not in proc.stdout, explain(proc)
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------- messes: names
def test_a_newline_in_the_run_name_is_refused(finished_run, tmp_path):
    cwd, _ = finished_run
    proc = run_script("divo_continuous.py", *TINY, "--dataset-path", cwd / "data.hdf5", "--total-timesteps", 10,
                      "--run-name", "two\nlines", cwd=tmp_path, check=False)
    assert one_line(proc, "--run-name"), explain(proc)
    assert not (tmp_path / "runs").exists()


def test_a_bar_in_the_exp_name_does_not_break_the_table(finished_run, tmp_path):
    cwd, _ = finished_run
    proc = run_script("divo_continuous.py", *TINY, "--dataset-path", cwd / "data.hdf5", "--total-timesteps", 10,
                      "--eval-freq", 0, "--exp-name", "a|b", "--run-name", "bar", cwd=tmp_path, check=False)
    if proc.returncode != 0:
        assert one_line(proc, "--exp-name") and not (tmp_path / "runs").exists(), explain(proc)
        return
    run_script("tools/report.py", tmp_path / "runs", "--out", tmp_path / "rep", *REPORT_FAST, cwd=tmp_path)
    table = [line for line in (tmp_path / "rep" / "table.md").read_text().splitlines() if line.startswith("|")]
    cells = {len(line.replace("\\|", "").split("|")) for line in table}
    assert len(cells) == 1, table  # every row of the Markdown table has the header's columns


def test_an_out_inside_a_run_folder_is_refused(finished_run, datasets, tmp_path):
    _, done = finished_run
    run = copy_run(done, tmp_path, "r")
    before = folder_bytes(run)
    proc = run_script("tools/report.py", tmp_path / "runs", "--out", run / "report", *REPORT_FAST, cwd=tmp_path,
                      check=False)
    assert one_line(proc, "--out"), explain(proc)
    proc = subprocess.run([sys.executable, SWEEP, "--env-ids", "hopper-medium-v2", "--seeds", "0", "--out", str(run / "sw"),
                           "--dataset-dir", str(datasets), "--dry-run"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert one_line(proc, "--out"), explain(proc)
    assert folder_bytes(run) == before


def test_a_copied_checkpoint_resumed_in_another_folder_writes_that_folders_name(finished_run, tmp_path):
    _, done = finished_run
    run = copy_run(done, tmp_path, "copy")
    proc = run_script("divo_continuous.py", "--resume", run / "checkpoint.pt", "--total-timesteps", 50, "--no-cuda",
                      cwd=tmp_path, check=False)
    assert "Traceback" not in proc.stderr, explain(proc)
    if proc.returncode == 0:
        assert json.loads((run / "scores.json").read_text())["run_name"] == "copy"
        assert json.loads((run / "args.json").read_text())["run_name"] == "copy"
    else:
        assert one_line(proc, "done", "copy"), explain(proc)


# ---------------------------------------------------------------------------------------------- messes: switches
def test_video_each_eval_without_capture_video_is_said(finished_run, tmp_path):
    cwd, _ = finished_run
    proc = run_script("divo_continuous.py", *TINY, "--dataset-path", cwd / "data.hdf5", "--total-timesteps", 10,
                      "--eval-freq", 0, "--video-each-eval", cwd=tmp_path, check=False)
    assert "Traceback" not in proc.stderr and "--capture-video" in proc.stdout + proc.stderr, explain(proc)
    if proc.returncode != 0:
        assert one_line(proc, "--video-each-eval", "--capture-video") and not (tmp_path / "runs").exists()


def test_benchmark_of_pad_pretrain_says_num_candidates_does_nothing(finished_run, tmp_path):
    cwd, _ = finished_run
    proc = run_script("tools/benchmark.py", "--env-id", "hopper-medium-v2", "--dataset-path", cwd / "data.hdf5",
                      "--script", "pad_pretrain", "--num-candidates", 8, "--modes", "eager", "--steps", 5, "--no-cuda",
                      "--hidden-dim", 16, "--num-layers", 1, "--batch-size", 32, cwd=tmp_path, check=False)
    assert "Traceback" not in proc.stderr, explain(proc)
    if proc.returncode == 0:
        assert "N 8" not in proc.stdout and "--num-candidates" in proc.stdout + proc.stderr, explain(proc)
    else:
        assert one_line(proc, "--num-candidates"), explain(proc)


def test_benchmark_of_pad_pretrain_refuses_runs_per_gpu(finished_run, tmp_path):
    """--runs-per-gpu packs DIVO and backbone copies; with --script pad_pretrain it would be dropped without a word."""
    cwd, _ = finished_run
    proc = run_script("tools/benchmark.py", "--env-id", "hopper-medium-v2", "--dataset-path", cwd / "data.hdf5",
                      "--script", "pad_pretrain", "--runs-per-gpu", 2, "--modes", "eager", "--steps", 5, "--no-cuda",
                      cwd=tmp_path, check=False)
    assert one_line(proc, "--runs-per-gpu", "pad_pretrain"), explain(proc)


def test_benchmark_cudagraphs_without_cuda_is_refused(finished_run, tmp_path):
    cwd, _ = finished_run
    proc = run_script("tools/benchmark.py", "--env-id", "hopper-medium-v2", "--dataset-path", cwd / "data.hdf5",
                      "--modes", "cudagraphs", "--no-cuda", "--steps", 5, cwd=tmp_path, check=False)
    assert one_line(proc, "cudagraphs"), explain(proc)


def test_a_tiny_status_every_does_not_flood_the_output(namespace, datasets, tmp_path):
    """--status-every 0.000001: refused (one line, nothing started), or bounded to a readable rate."""
    out = tmp_path / "out"
    temp_dir = tempfile.mkdtemp(prefix="rt_", dir="/tmp")
    try:
        proc = in_namespace([sys.executable, SWEEP, "--report-reps", "50", "--temp-dir", temp_dir, "--status-every",
                             "0.000001", "--env-ids", "hopper-medium-v2", "--seeds", 0, "--label", "st", "--out", out,
                             "--dataset-dir", datasets, "--", *sweep_tiny()], tmp_path / "home")
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    if proc.returncode == 1 and not out.exists():
        assert one_line(proc, "--status-every"), explain(proc)
    else:
        assert proc.returncode == 0, explain(proc)
        assert sum(line.startswith("runs: ") for line in proc.stdout.splitlines()) < 100, proc.stdout[-2000:]
