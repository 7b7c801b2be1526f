"""A run's folder describes what is there, and nothing outside it is touched: links are never written through, its
checkpoint and scores.json agree in every mode, and the files it reads are found from any folder."""

import errno
import hashlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, refused, run_script, write_d4rl_file
from divo_utils import InputError
from divo_utils.files import lock_run, write_atomically
from divo_utils.runs import load_checkpoint, save_checkpoint

TINY = ["--env-id", "hopper-medium-v2", "--hidden-dim", "16", "--num-layers", "1", "--batch-size", "32",
        "--eval-episodes", "1", "--log-freq", "10", "--no-cuda"]


def step_of(checkpoint) -> int:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["step"]


def test_a_lock_that_is_a_link_is_refused_and_its_target_left_alone(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("do not touch\n")
    folder = tmp_path / "run"
    folder.mkdir()
    os.symlink(target, folder / "lock")
    with pytest.raises(InputError, match="symbolic link"):
        lock_run(str(folder))
    assert target.read_text() == "do not touch\n"


def test_a_write_never_goes_through_a_link(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("do not touch\n")
    os.symlink(target, tmp_path / "args.json.tmp")  # the temporary file of an atomic write
    with pytest.raises(InputError, match="symbolic link"):
        write_atomically(str(tmp_path / "args.json"), b"{}", "checkpoint.pt")
    assert target.read_text() == "do not touch\n"
    os.remove(tmp_path / "args.json.tmp")
    os.symlink(target, tmp_path / "scores.json")  # the file itself: the link is replaced, its target untouched
    write_atomically(str(tmp_path / "scores.json"), b"{}", "checkpoint.pt")
    assert not os.path.islink(tmp_path / "scores.json") and target.read_text() == "do not touch\n"


def test_resuming_a_run_whose_lock_is_a_link_is_refused_with_its_target_intact(tmp_path):
    write_d4rl_file(tmp_path / "data.hdf5", episode_lengths=(40, 40))
    run_script("divo_continuous.py", *TINY, "--dataset-path", tmp_path / "data.hdf5", "--total-timesteps", 10,
               "--eval-freq", 0, "--checkpoint-freq", 10, "--run-name", "r", cwd=tmp_path)
    target = tmp_path / "precious.txt"
    target.write_text("do not touch\n")
    os.remove(tmp_path / "runs/r/lock")
    os.symlink(target, tmp_path / "runs/r/lock")
    proc = run_script("divo_continuous.py", "--resume", "runs/r/checkpoint.pt", "--total-timesteps", 20, cwd=tmp_path,
                      check=False)
    assert refused(proc, "symbolic link"), proc.stderr
    assert target.read_text() == "do not touch\n"


@pytest.mark.parametrize("script", ["divo_continuous.py", "divo_antmaze.py"])
def test_extending_a_run_without_checkpoints_leaves_a_checkpoint_that_agrees_with_its_scores(tmp_path, script):
    if script == "divo_antmaze.py":
        from test_antmaze_e2e import antmaze_file

        antmaze_file(tmp_path / "data.hdf5")
        tiny = ["--env-id", "antmaze-umaze-v2", *TINY[2:], "--eval-threads", "1"]
    else:
        write_d4rl_file(tmp_path / "data.hdf5", episode_lengths=(40, 40))
        tiny = TINY
    run_script(script, *tiny, "--dataset-path", tmp_path / "data.hdf5", "--total-timesteps", 10, "--eval-freq", 0,
               "--checkpoint-freq", 10, "--run-name", "r", cwd=tmp_path)
    run_script(script, "--resume", "runs/r/checkpoint.pt", "--total-timesteps", 20, "--checkpoint-freq", 0,
               cwd=tmp_path)
    scores = json.loads((tmp_path / "runs/r/scores.json").read_text())
    assert scores["step"] == 20 and step_of(tmp_path / "runs/r/checkpoint.pt") == 20
    # and the next --resume sees the run finished at 20, not at 10
    proc = run_script(script, "--resume", "runs/r/checkpoint.pt", cwd=tmp_path, check=False)
    assert refused(proc, "is finished (20 of 20 steps"), proc.stderr


def test_a_run_on_a_relative_dataset_path_resumes_from_another_folder_and_from_inside_its_own(tmp_path):
    (tmp_path / "work").mkdir()
    write_d4rl_file(tmp_path / "work/data.hdf5", episode_lengths=(40, 40))
    run_script("divo_continuous.py", *TINY, "--dataset-path", "data.hdf5", "--total-timesteps", 10, "--eval-freq", 0,
               "--checkpoint-freq", 10, "--run-name", "r", cwd=tmp_path / "work")
    saved = json.loads((tmp_path / "work/runs/r/args.json").read_text())
    assert saved["dataset_path"] == str(tmp_path / "work/data.hdf5")  # stored absolute
    run_script("divo_continuous.py", "--resume", "work/runs/r/checkpoint.pt", "--total-timesteps", 20, cwd=tmp_path)
    run_script("divo_continuous.py", "--resume", "checkpoint.pt", "--total-timesteps", 30,
               cwd=tmp_path / "work/runs/r")
    assert json.loads((tmp_path / "work/runs/r/scores.json").read_text())["step"] == 30


def test_a_run_made_with_a_relative_path_before_paths_were_absolute_still_resumes(tmp_path):
    """A checkpoint whose arguments hold a relative --dataset-path (as runs of earlier versions do): resolved
    against the folder the run was made in (the parent of runs/), from wherever --resume is given."""
    (tmp_path / "work").mkdir()
    write_d4rl_file(tmp_path / "work/data.hdf5", episode_lengths=(40, 40))
    run_script("divo_continuous.py", *TINY, "--dataset-path", "data.hdf5", "--total-timesteps", 10, "--eval-freq", 0,
               "--checkpoint-freq", 10, "--run-name", "r", cwd=tmp_path / "work")
    path = tmp_path / "work/runs/r/checkpoint.pt"
    payload = torch.load(path, map_location="cpu", weights_only=True)
    payload["args"]["dataset_path"] = "data.hdf5"  # as an earlier version stored it
    torch.save(payload, path)
    run_script("divo_continuous.py", "--resume", "work/runs/r/checkpoint.pt", "--total-timesteps", 20, cwd=tmp_path)
    assert json.loads((tmp_path / "work/runs/r/scores.json").read_text())["step"] == 20


def test_equal_reference_returns_score_by_return_with_the_reason(capsys):
    """A Minari dataset whose two reference returns are equal (or not finite) cannot normalise a score: the run is
    scored by its return from the start, and says why, instead of dividing by zero and calling that divergence."""
    from types import SimpleNamespace

    from divo_utils.data import minari_scorer

    for low, high in ((5.0, 5.0), (0.0, float("nan"))):
        dataset = SimpleNamespace(storage=SimpleNamespace(metadata={"ref_min_score": low, "ref_max_score": high}))
        metric, score = minari_scorer(dataset)
        assert metric == "return" and "cannot normalise it" in capsys.readouterr().out
        np.testing.assert_array_equal(score(np.array([1.0, 2.0])), [1.0, 2.0])


def test_a_new_run_whose_args_json_cannot_be_written_leaves_no_folder_and_names_the_fix(tmp_path):
    write_d4rl_file(tmp_path / "data.hdf5", episode_lengths=(40, 40))
    command = [sys.executable, os.path.join(ROOT, "divo_continuous.py"), *TINY, "--dataset-path", "data.hdf5",
               "--total-timesteps", "10", "--eval-freq", "0", "--run-name", "f"]

    def tiny_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))  # the lock's line fits, args.json does not

    proc = subprocess.run(command, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300, preexec_fn=tiny_files)
    assert refused(proc, "the run's new folder was removed again. Free some disk space, then run the same command "
                         "again"), proc.stderr
    assert not (tmp_path / "runs/f").exists()
    subprocess.run(command, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), check=True, capture_output=True,
                   timeout=300)  # the fix it names works
    assert json.loads((tmp_path / "runs/f/scores.json").read_text())["step"] == 10


def test_a_run_records_the_pad_checkpoint_it_loaded_and_says_when_that_pretraining_is_unfinished(tmp_path):
    write_d4rl_file(tmp_path / "data.hdf5", episode_lengths=(40, 40))
    sizes = ["--hidden-dim", "16", "--num-layers", "1", "--batch-size", "32", "--no-cuda"]
    run_script("pad_pretrain.py", "--env-id", "hopper-medium-v2", "--dataset-path", "data.hdf5", *sizes,
               "--total-timesteps", 10, "--holdout", 0, "--run-name", "pad", cwd=tmp_path)
    pad = tmp_path / "runs/pad/pad_checkpoint.pt"
    sha1 = hashlib.sha1(pad.read_bytes()).hexdigest()
    common = [*TINY, "--dataset-path", "data.hdf5", "--total-timesteps", 10, "--eval-freq", 0]
    out = run_script("divo_continuous.py", *common, "--pad-checkpoint", pad, "--run-name", "a", cwd=tmp_path).stdout
    assert "warning" not in out and f"(step 10, SHA-1 {sha1[:12]})" in out
    saved = json.loads((tmp_path / "runs/a/args.json").read_text())
    assert (saved["pad_checkpoint_step"], saved["pad_checkpoint_sha1"], saved["pad_checkpoint_finished"]) == (10, sha1, True)
    # the same checkpoint without its pretraining's finished file: a pretraining still under way, or killed
    (tmp_path / "unfinished").mkdir()
    shutil.copy(pad, tmp_path / "unfinished/pad_checkpoint.pt")
    out = run_script("divo_continuous.py", *common, "--pad-checkpoint", "unfinished/pad_checkpoint.pt", "--run-name", "b",
                     cwd=tmp_path).stdout
    assert "warning: that pretraining has not finished" in out
    saved = json.loads((tmp_path / "runs/b/args.json").read_text())
    assert saved["pad_checkpoint_finished"] is False and saved["pad_checkpoint_sha1"] == sha1
    # and a resumed run keeps the record
    run_script("divo_continuous.py", "--resume", "runs/b/checkpoint.pt", "--total-timesteps", 20, cwd=tmp_path)
    assert json.loads((tmp_path / "runs/b/args.json").read_text())["pad_checkpoint_sha1"] == sha1


@pytest.mark.skipif(not os.path.exists("/proc/sys/vm/overcommit_memory")
                    or open("/proc/sys/vm/overcommit_memory").read().strip() != "0",
                    reason="needs Linux's default overcommit heuristic, which refuses an allocation larger than memory")
def test_out_of_memory_is_one_line_and_a_new_run_leaves_no_folder(tmp_path):
    """A --batch-size too large for memory: one line naming the fix, and no half-made folder, so that the same command
    with a smaller batch runs (instead of being refused because its folder exists)."""
    write_d4rl_file(tmp_path / "data.hdf5", episode_lengths=(40, 40))
    common = [*TINY, "--dataset-path", "data.hdf5", "--total-timesteps", 10, "--eval-freq", 0, "--run-name", "big"]
    proc = run_script("divo_continuous.py", *common, "--batch-size", 10**11, cwd=tmp_path, check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("error: out of memory"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert "Lower --batch-size or --hidden-dim" in proc.stderr and not (tmp_path / "runs/big").exists()
    run_script("divo_continuous.py", *common, cwd=tmp_path)
    assert (tmp_path / "runs/big/scores.json").exists()
    # networks too large for memory: built before the run's folder, one line too
    proc = run_script("divo_continuous.py", *common[:-2], "--hidden-dim", 10**6, "--num-layers", 2, "--run-name", "wide",
                      cwd=tmp_path, check=False)  # a 10^6 x 10^6 layer: 4 TB
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("error: out of memory"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert "no run folder was made" in proc.stderr and not (tmp_path / "runs/wide").exists()


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    save_checkpoint(path, minimal_checkpoint(1), path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint(path, minimal_checkpoint(2), path)
    assert load_checkpoint(path, "divo_continuous")["step"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # nothing half-written beside it (a real full disk: test_run_folders)


def minimal_checkpoint(step: int) -> dict:
    """The keys every checkpoint holds (load_checkpoint refuses one without them), at `step`."""
    return {"kind": "divo_continuous", "step": step, "args": {}, "rng": {}, "dataset_sha1": "0" * 40}


def test_foreign_and_corrupt_checkpoints_are_refused(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"kind": "pad_pretrain"}, path)
    with pytest.raises(InputError, match="checkpoint of pad_pretrain, not of divo_continuous.py"):
        load_checkpoint(str(path), "divo_continuous")
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="is not a PyTorch checkpoint"):
        load_checkpoint(str(path), "divo_continuous")
    save_checkpoint(str(path), minimal_checkpoint(1), str(path))
    path.write_bytes(path.read_bytes()[:200])  # a zip archive cut short
    with pytest.raises(InputError, match="cannot read checkpoint"):
        load_checkpoint(str(path), "divo_continuous")
    save_checkpoint(str(path), {**minimal_checkpoint(1), "args": None}, str(path))
    with pytest.raises(InputError, match="no dict of arguments"):
        load_checkpoint(str(path), "divo_continuous")
    with pytest.raises(InputError, match="no checkpoint at"):
        load_checkpoint(str(tmp_path / "nothing.pt"), "divo_continuous")


def test_a_failed_checkpoint_write_keeps_the_finished_file(tmp_path, monkeypatch):
    """An extension whose new checkpoint cannot be written (a full disk) keeps scores.json, which still describes the
    checkpoint that stays (it used to be removed first, and the finished run read as unfinished)."""
    path, finished = str(tmp_path / "checkpoint.pt"), tmp_path / "scores.json"
    save_checkpoint(path, minimal_checkpoint(1), path)
    finished.write_text('{"step": 1}')
    real_fdopen = os.fdopen

    class FullDisk(io.BytesIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def full_disk(fd, mode):
        os.close(fd)
        return FullDisk()

    monkeypatch.setattr(os, "fdopen", full_disk)
    with pytest.raises(InputError, match="free some disk space"):
        save_checkpoint(path, minimal_checkpoint(2), path, str(finished))
    monkeypatch.setattr(os, "fdopen", real_fdopen)
    assert os.listdir(tmp_path) == ["checkpoint.pt", "scores.json"] or sorted(os.listdir(tmp_path)) == [
        "checkpoint.pt", "scores.json"]
    assert finished.read_text() == '{"step": 1}' and load_checkpoint(path, "divo_continuous")["step"] == 1
    save_checkpoint(path, minimal_checkpoint(3), path, str(finished))  # a good write replaces both
    assert not finished.exists() and load_checkpoint(path, "divo_continuous")["step"] == 3


def test_a_folder_where_a_file_goes_is_named_and_the_results_stay(tmp_path):
    path, finished = str(tmp_path / "checkpoint.pt"), tmp_path / "scores.json"
    save_checkpoint(path, minimal_checkpoint(1), path)
    finished.write_text("{}")
    os.mkdir(path + ".tmp")
    with pytest.raises(InputError, match=r"a folder stands at .*checkpoint\.pt\.tmp; move or remove that folder"):
        save_checkpoint(path, minimal_checkpoint(2), path, str(finished))
    assert finished.exists() and os.path.isdir(path + ".tmp")
