"""Reliability probes: this round's own cases of bad input to the tools, each one a mistake that used to lose a file,
end in a traceback after the work, or give advice that did not fit, each with its fix.

As in tests/test_reliability_iv.py, everything runs as a user runs it (the tools as subprocesses, on tiny settings
and small D4RL-format files made here) and is checked on what the user sees: the exit status, no traceback, the
words of the message, and the files left afterwards.
"""

import json
import os
import shutil

import pytest

from conftest import TINY, explain, folder_bytes, one_line, run_script, write_d4rl_file

REPORT_FAST = ["--reps", "50", "--profile-reps", "50"]
MAKE_ANTMAZE = ["tools/make_antmaze_dataset.py", "--expert-episodes", "0"]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A finished 20-step run `done` with --save-model; returns (its working folder, the run folder)."""
    cwd = tmp_path_factory.mktemp("saved")
    write_d4rl_file(cwd / "data.hdf5", episode_lengths=(120, 90, 150, 140), terminal_episodes=(1,))
    run_script("divo_continuous.py", *TINY, "--dataset-path", cwd / "data.hdf5", "--total-timesteps", 20,
               "--save-model", "--run-name", "done", cwd=cwd)
    return cwd, cwd / "runs" / "done"


def copy_run(source, cwd, name="r"):
    target = cwd / "runs" / name
    shutil.copytree(source, target)
    return target


# ---------------------------------------------------------------------------------------------- tools/evaluate.py
@pytest.mark.parametrize("policy, flag, target", [
    ("checkpoint.pt", "--out", "checkpoint.pt"),  # the scores' JSON written over the checkpoint evaluated
    ("divo_continuous.cleanrl_model", "--out", "divo_continuous.cleanrl_model"),  # over the model evaluated
    ("divo_continuous.cleanrl_model", "--export", "checkpoint.pt"),  # TorchScript written over the run's checkpoint
], ids=["out-over-checkpoint", "out-over-model", "export-over-checkpoint"])
def test_evaluate_never_writes_over_a_runs_own_file(policy, flag, target, saved_run, tmp_path):
    _, done = saved_run
    run = copy_run(done, tmp_path)
    before = folder_bytes(run)
    proc = run_script("tools/evaluate.py", run / policy, "--episodes", 1, flag, run / target, cwd=tmp_path, check=False)
    assert one_line(proc, flag, target), explain(proc)
    assert folder_bytes(run) == before  # nothing written, not even evaluation.json


@pytest.mark.parametrize("flag, target, words", [
    ("--out", "missing/e.json", ["does not exist", "missing"]),
    ("--out", "a-folder", ["is a folder", "evaluation.json"]),
    ("--export", "missing/p.pt", ["does not exist", "missing"]),
    ("--export", "a-folder", ["is a folder", "policy.pt"]),
], ids=["out-missing-folder", "out-folder", "export-missing-folder", "export-folder"])
def test_evaluate_checks_its_output_files_before_the_episodes(flag, target, words, saved_run, tmp_path):
    """A file that cannot be written was a traceback after every episode had run (and, for --export, after
    evaluation.json was written): now one line first, nothing written."""
    _, done = saved_run
    run = copy_run(done, tmp_path)
    (tmp_path / "a-folder").mkdir()
    before = folder_bytes(run)
    proc = run_script("tools/evaluate.py", run / "divo_continuous.cleanrl_model", "--episodes", 1, flag,
                      tmp_path / target, cwd=tmp_path, check=False)
    assert one_line(proc, flag, *words), explain(proc)
    assert "score" not in proc.stdout, explain(proc)  # before the evaluation
    assert folder_bytes(run) == before and os.listdir(tmp_path / "a-folder") == []


def test_evaluate_refuses_a_negative_seed_in_one_line(saved_run, tmp_path):
    _, done = saved_run
    proc = run_script("tools/evaluate.py", done / "checkpoint.pt", "--episodes", 1, "--seed", -20000, "--out",
                      tmp_path / "e.json", cwd=tmp_path, check=False)
    assert one_line(proc, "--seed -20000", "at least 0"), explain(proc)
    assert not (tmp_path / "e.json").exists()


def test_evaluate_of_a_run_folder_names_the_file_to_give(saved_run, tmp_path):
    """The run's folder itself was told 'no file at runs/done', as if nothing were there."""
    _, done = saved_run
    proc = run_script("tools/evaluate.py", done, "--episodes", 1, "--out", tmp_path / "e.json", cwd=tmp_path,
                      check=False)
    assert one_line(proc, "is a folder", str(done / "checkpoint.pt")), explain(proc)
    assert "no file at" not in proc.stderr


# ---------------------------------------------------------------------------------------------- tools/report.py
@pytest.mark.parametrize("broken", ["scores.json", "args.json"])
def test_the_report_does_not_say_train_first_when_its_runs_cannot_be_read(broken, saved_run, tmp_path):
    """The only finished run has a file that is not UTF-8: not 'no finished run: train first', but which run was
    skipped and why; no --out made."""
    _, done = saved_run
    run = copy_run(done, tmp_path)
    (run / broken).write_bytes(b"\xff\xfe{}")
    proc = run_script("tools/report.py", tmp_path / "runs", "--out", tmp_path / "rep", *REPORT_FAST, cwd=tmp_path,
                      check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, explain(proc)
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and str(run) in error and "skipped" in error, explain(proc)
    assert "train first" not in proc.stderr and not (tmp_path / "rep").exists(), explain(proc)


def test_the_report_of_a_file_says_it_is_a_file(saved_run, tmp_path):
    _, done = saved_run
    proc = run_script("tools/report.py", done / "scores.json", "--out", tmp_path / "rep", *REPORT_FAST, cwd=tmp_path,
                      check=False)
    assert one_line(proc, "is a file, not a folder", str(done)), explain(proc)
    assert "no such folder" not in proc.stderr and not (tmp_path / "rep").exists()


# ---------------------------------------------------------------------------------------------- make_antmaze_dataset
@pytest.mark.parametrize("args, words", [
    (["--transitions", "0"], ["--transitions 0", "at least 1"]),  # a traceback after the file was written
    (["--noise", "-1"], ["--noise -1.0", ">= 0"]),  # silently the same as --noise 1
    (["--noise", "nan"], ["--noise nan", "finite"]),  # a file of NaN actions
    (["--expert-episodes", "-3"], ["--expert-episodes -3", "at least 0"]),  # "0% success (-3 episodes)"
], ids=["transitions-0", "noise-negative", "noise-nan", "expert-episodes-negative"])
def test_make_antmaze_dataset_checks_its_arguments_first(args, words, tmp_path):
    proc = run_script(*MAKE_ANTMAZE, "--transitions", 50, *args, "--out", tmp_path / "a.hdf5", cwd=tmp_path,
                      check=False)
    assert one_line(proc, *words), explain(proc)
    assert os.listdir(tmp_path) == []


def test_make_antmaze_dataset_refuses_a_missing_folder_before_the_rollouts(tmp_path):
    proc = run_script(*MAKE_ANTMAZE, "--transitions", 50, "--out", tmp_path / "missing" / "a.hdf5", cwd=tmp_path,
                      check=False)
    assert one_line(proc, "--out", "does not exist"), explain(proc)
    assert "antmaze-umaze-play" not in proc.stderr and os.listdir(tmp_path) == []  # no rollout was made


@pytest.mark.parametrize("existing", ["a.json", "a.png"])
def test_make_antmaze_dataset_never_overwrites_the_files_beside_its_out(existing, tmp_path):
    """--out a.hdf5 writes a.json and a.png too: a file of the user's of those names was overwritten."""
    (tmp_path / existing).write_text('{"mine": 1}')
    proc = run_script(*MAKE_ANTMAZE, "--transitions", 50, "--out", tmp_path / "a.hdf5", cwd=tmp_path, check=False)
    assert one_line(proc, existing, "exists", "--out"), explain(proc)
    assert (tmp_path / existing).read_text() == '{"mine": 1}' and os.listdir(tmp_path) == [existing]


def test_make_antmaze_dataset_still_writes_its_three_files(tmp_path):
    run_script(*MAKE_ANTMAZE, "--transitions", 50, "--out", tmp_path / "a.hdf5", cwd=tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["a.hdf5", "a.json", "a.png"]
    assert json.loads((tmp_path / "a.json").read_text())["transitions"] == 50


# ---------------------------------------------------------------------------------------------- --pad-checkpoint
@pytest.mark.parametrize("case", ["divo-checkpoint", "truncated"])
def test_a_pad_checkpoint_of_the_wrong_kind_is_refused_before_the_data_loads(case, saved_run, tmp_path):
    """A DIVO run's checkpoint.pt, or a truncated file, as --pad-checkpoint: refused only after the dataset had
    been read; now from the command line, with no run folder."""
    cwd, done = saved_run
    path = done / "checkpoint.pt"
    if case == "truncated":
        path = tmp_path / "pad.pt"
        path.write_bytes((done / "checkpoint.pt").read_bytes()[:5000])
    proc = run_script("divo_continuous.py", *TINY, "--dataset-path", cwd / "data.hdf5", "--total-timesteps", 10,
                      "--pad-checkpoint", path, cwd=tmp_path, check=False)
    words = ["divo_continuous", "pad_pretrain"] if case == "divo-checkpoint" else ["cannot read", "partial"]
    assert one_line(proc, str(path), *words), explain(proc)
    assert "dataset " not in proc.stdout and "rows ->" not in proc.stdout, explain(proc)
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------- tools/benchmark.py
def test_benchmark_of_a_dataset_folder_says_it_is_a_folder(saved_run, tmp_path):
    cwd, _ = saved_run
    proc = run_script("tools/benchmark.py", "--env-id", "hopper-medium-v2", "--dataset-path", cwd, "--steps", 2,
                      "--modes", "eager", "--no-cuda", cwd=tmp_path, check=False)
    assert one_line(proc, "--dataset-path", "is a folder", "HDF5 file"), explain(proc)
    assert "no such file" not in proc.stderr
