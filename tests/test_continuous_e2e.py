"""divo_continuous.py run as a user runs it, on a small D4RL-format file made here."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import divo_continuous as dc
from conftest import ROOT, only_run, refused, run_script, write_d4rl_file
from divo_utils.data import d4rl_score
from divo_utils.runs import load_checkpoint

TINY = ["--env-id", "hopper-medium-v2", "--hidden-dim", "32", "--num-layers", "2", "--batch-size", "64",
        "--eval-episodes", "2", "--log-freq", "20", "--no-cuda"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """60 steps in one go, evaluated at 30 and 60: the reference for the tests below."""
    cwd = tmp_path_factory.mktemp("straight")
    write_d4rl_file(cwd / "data.hdf5", episode_lengths=(120, 90, 150, 140), terminal_episodes=(1,))
    proc = run_script("divo_continuous.py", *TINY, "--dataset-path", cwd / "data.hdf5", "--total-timesteps", 60,
                      "--eval-freq", 30, "--checkpoint-freq", 30, "--save-model", cwd=cwd)
    return cwd, proc


def test_training_writes_scores_checkpoint_and_logs(straight_run):
    cwd, proc = straight_run
    run = only_run(cwd)
    assert run.name.startswith("hopper-medium-v2__divo_continuous__1__")
    assert "[ 33.3%] step 20/60" in proc.stdout and "steps/s" in proc.stdout and "ETA" in proc.stdout
    assert "500 rows -> 497 transitions" in proc.stdout  # the last row and two timeout rows dropped

    scores = json.loads((run / "scores.json").read_text())
    assert scores["step"] == 60 and len(scores["returns"]) == 2
    assert (scores["script"], scores["mode"], scores["task"]) == ("divo_continuous", "divo", "data")  # for tools/report.py
    assert json.loads((run / "args.json").read_text())["script"] == "divo_continuous"
    np.testing.assert_allclose(scores["normalized_scores"], d4rl_score(scores["returns"], dc.REF_SCORES["hopper"]))
    assert [e["step"] for e in scores["evaluations"]] == [30, 60]

    checkpoint = load_checkpoint(str(run / "checkpoint.pt"), "divo_continuous")
    assert checkpoint["step"] == 60 and checkpoint["env_id"] == "hopper-medium-v2"
    assert (checkpoint["kind"], checkpoint["obs_dim"], checkpoint["act_dim"], checkpoint["num_transitions"]) == \
        ("divo_continuous", 11, 3, 497)
    assert set(checkpoint["agent"]) >= {"actor", "critic", "value", "diffusion", "actor_optimizer", "diffusion_optimizer"}
    # 60 iterations, the actor and the targets every second one (--policy-freq 2): the optimisers' step counts
    steps = {name: {int(state["step"]) for state in checkpoint["agent"][name]["state"].values()}
             for name in ("actor_optimizer", "critic_optimizer", "value_optimizer", "diffusion_optimizer")}
    assert steps == {"actor_optimizer": {30}, "critic_optimizer": {60}, "value_optimizer": {60}, "diffusion_optimizer": {60}}
    model = torch.load(run / "divo_continuous.cleanrl_model", weights_only=True)
    assert torch.equal(model["actor"]["net.0.weight"], checkpoint["agent"]["actor"]["net.0.weight"])

    events = EventAccumulator(str(run)).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"charts/SPS", "charts/d4rl_normalized_score", "eval/return_mean", "eval/normalized_score_std",
            "eval/seconds", "losses/qf_loss", "losses/qf1_values", "losses/value_loss", "losses/pad_loss",
            "losses/actor_loss", "losses/bc_loss", "pad/positive_fraction", "adpo/generated_fraction"} <= tags
    assert [e.step for e in events.Scalars("losses/qf_loss")] == [20, 40, 60]
    fraction = events.Scalars("pad/positive_fraction")[-1].value
    assert 0.0 < fraction < 1.0


def test_resumed_run_continues_exactly_where_it_stopped(straight_run, tmp_path):
    cwd, _ = straight_run
    data = cwd / "data.hdf5"
    run_script("divo_continuous.py", *TINY, "--dataset-path", data, "--total-timesteps", 30, "--eval-freq", 30, cwd=tmp_path)
    checkpoint = only_run(tmp_path) / "checkpoint.pt"
    assert load_checkpoint(str(checkpoint), "divo_continuous")["step"] == 30
    # resume with only --resume and a longer horizon: every other argument comes from the checkpoint
    proc = run_script("divo_continuous.py", "--resume", checkpoint, "--total-timesteps", 60, "--no-cuda", cwd=tmp_path)
    assert "resumed" in proc.stdout and "at step 30" in proc.stdout
    assert "step 40/60" in proc.stdout and "step 20/60" not in proc.stdout
    resumed = load_checkpoint(str(checkpoint), "divo_continuous")
    straight = load_checkpoint(str(only_run(cwd) / "checkpoint.pt"), "divo_continuous")
    assert resumed["step"] == 60
    for name, state in straight["agent"].items():
        if name.endswith("optimizer"):
            continue
        for key, value in state.items():
            assert torch.equal(value, resumed["agent"][name][key]), f"{name}.{key} differs from the uninterrupted run"
    assert [e["score"] for e in resumed["evaluations"]] == [e["score"] for e in straight["evaluations"]]


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(straight_run, tmp_path):
    cwd, _ = straight_run
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "divo_continuous.py"), *TINY, "--dataset-path",
                             cwd / "data.hdf5", "--total-timesteps", "1000000", "--eval-freq", "0"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    for line in proc.stdout:  # wait until training runs
        if "step 20/" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    out = proc.stdout.read()
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM, out
    assert "resume with: python divo_continuous.py --resume runs/" in out
    step = load_checkpoint(str(only_run(tmp_path) / "checkpoint.pt"), "divo_continuous")["step"]
    assert step >= 20


def test_resume_refuses_another_task_and_keeps_the_checkpoint(straight_run, tmp_path):
    cwd, _ = straight_run
    checkpoint = only_run(cwd) / "checkpoint.pt"
    before = checkpoint.read_bytes()
    proc = run_script("divo_continuous.py", "--resume", checkpoint, "--env-id", "walker2d-medium-v2", cwd=cwd, check=False)
    assert refused(proc, "does not match this run: --env-id 'walker2d-medium-v2' here, 'hopper-medium-v2' in the "
                         "checkpoint"), proc.stderr
    write_d4rl_file(tmp_path / "other.hdf5", seed=5)
    proc = run_script("divo_continuous.py", "--resume", checkpoint, "--dataset-path", tmp_path / "other.hdf5",
                      "--total-timesteps", 90, cwd=cwd, check=False)
    assert refused(proc, "was trained on another dataset"), proc.stderr
    assert checkpoint.read_bytes() == before


def test_bad_command_lines_fail_with_one_clear_message(tmp_path):
    proc = run_script("divo_continuous.py", "--env-id", "hopper-medum-v2", cwd=tmp_path, check=False)
    assert refused(proc, "error: unknown --env-id 'hopper-medum-v2'") and "did you mean hopper-medium-v2" in proc.stderr
    proc = run_script("divo_continuous.py", "--env-id", "hopper-medium-v2", "--dataset-path", tmp_path / "none.hdf5",
                      cwd=tmp_path, check=False)
    assert refused(proc, "no dataset file at"), proc.stderr
    assert not (tmp_path / "runs").exists()


def test_help_documents_every_argument(tmp_path):
    out = run_script("divo_continuous.py", "--help", cwd=tmp_path).stdout
    for field in dc.Args.__dataclass_fields__:
        assert f"--{field.replace('_', '-')}" in out, field
    assert "zeta of eq. (10)" in out


def test_track_logs_to_weights_and_biases_offline(straight_run, tmp_path, monkeypatch):
    """--track with W&B in offline mode (no account, no network): the run and its synced TensorBoard file."""
    cwd, _ = straight_run
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_script("divo_continuous.py", *TINY, "--dataset-path", cwd / "data.hdf5", "--total-timesteps", 20, "--track",
               cwd=tmp_path)
    run_name = only_run(tmp_path).name
    (offline,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_name}")
    assert list((offline / "files" / "runs" / run_name).glob("events.out.tfevents.*"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there: the run uses it")
def test_cuda_without_a_gpu_says_so_in_one_line(tmp_path):
    write_d4rl_file(tmp_path / "data.hdf5", episode_lengths=(120, 90, 150, 140), terminal_episodes=(1,))
    args = [a for a in TINY if a != "--no-cuda"]
    proc = run_script("divo_continuous.py", *args, "--dataset-path", tmp_path / "data.hdf5", "--total-timesteps", 20,
                      "--eval-freq", 0, cwd=tmp_path)
    assert [line for line in proc.stdout.splitlines() if line.startswith("no GPU found: training on the CPU")]
    quiet = run_script("divo_continuous.py", *TINY, "--dataset-path", tmp_path / "data.hdf5", "--total-timesteps", 20,
                       "--eval-freq", 0, cwd=tmp_path)
    assert "no GPU found" not in quiet.stdout


def test_the_first_progress_line_comes_100_steps_after_each_start(tmp_path):
    """With the default --log-freq 1000, a CPU user still sees the speed within seconds: a line at step 100 of the
    run, and 100 steps after a resume; the other lines stay on --log-freq's multiples."""
    write_d4rl_file(tmp_path / "data.hdf5", episode_lengths=(120, 90, 150, 140), terminal_episodes=(1,))
    common = [*TINY, "--log-freq", 1000, "--eval-freq", 0]
    proc = run_script("divo_continuous.py", *common, "--dataset-path", tmp_path / "data.hdf5", "--total-timesteps", 150,
                      "--checkpoint-freq", 50, "--run-name", "r", cwd=tmp_path)
    assert [line.split("|")[0].split()[-1] for line in proc.stdout.splitlines() if line.startswith("[")] == ["100/150"]
    resumed = run_script("divo_continuous.py", "--resume", tmp_path / "runs" / "r" / "checkpoint.pt",
                         "--total-timesteps", 1200, cwd=tmp_path)
    steps = [line.split("|")[0].split()[-1] for line in resumed.stdout.splitlines() if line.startswith("[")]
    assert steps == ["250/1,200", "1,000/1,200"], resumed.stdout


def test_track_without_a_wandb_key_is_refused_before_any_file(tmp_path):
    """--track with no W&B key and no WANDB_MODE: one line naming --no-track and WANDB_MODE=offline, no run folder;
    resuming a --track run the same way leaves its args.json as it was."""
    write_d4rl_file(tmp_path / "data.hdf5", episode_lengths=(120, 90, 150, 140), terminal_episodes=(1,))
    no_key = {"WANDB_MODE": "", "WANDB_API_KEY": "", "HOME": str(tmp_path)}  # no ~/.netrc either
    common = [*TINY, "--dataset-path", tmp_path / "data.hdf5", "--total-timesteps", 20, "--eval-freq", 0]
    proc = run_script("divo_continuous.py", *common, "--track", "--run-name", "t", cwd=tmp_path, check=False,
                      env=no_key)
    assert refused(proc, "--no-track") and "WANDB_MODE=offline" in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists()
    run_script("divo_continuous.py", *common, "--track", "--run-name", "t", cwd=tmp_path,
               env={**no_key, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"})
    before = (tmp_path / "runs/t/args.json").read_bytes()
    proc = run_script("divo_continuous.py", "--resume", "runs/t/checkpoint.pt", "--total-timesteps", 40, "--no-cuda",
                      cwd=tmp_path, check=False, env=no_key)
    assert refused(proc, "--no-track"), proc.stderr
    assert (tmp_path / "runs/t/args.json").read_bytes() == before
