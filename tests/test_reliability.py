"""Bad input and faults: one `error:` line before any work or file, and nothing on disk lost or overwritten.

Argument checks run in-process (they happen when the arguments are built); the rest runs each script as a
user would, on tiny settings.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

import divo_antmaze as da
import divo_continuous as dc
import pad_pretrain as pp
from conftest import TINY, folder_bytes, refused, run_script, write_d4rl_file
from divo_utils import InputError, data, diagnostics, files, run_mode, runs, task_name



# ---------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("module", [dc, da, pp])
@pytest.mark.parametrize("name, value, message", [
    ("batch_size", 0, "--batch-size 0 is out of range: it must lie in [1, inf)"),
    ("batch_size", -1, "--batch-size -1 is out of range"),
    ("total_timesteps", -5, "--total-timesteps -5 is out of range"),
    ("tau", 2.0, "--tau 2.0 is out of range: it must lie in (0, 1]"),
    ("expectile", 0.0, "--expectile 0.0 is out of range: it must lie in (0, 1)"),
    ("expectile", 1.5, "--expectile 1.5 is out of range"),
    ("gamma", 1.0, "--gamma 1.0 is out of range: it must lie in [0, 1)"),
    ("critic_lr", float("nan"), "--critic-lr nan is out of range"),
    ("checkpoint_freq", -1, "--checkpoint-freq -1 is out of range"),
    ("log_freq", 0, "--log-freq 0 is out of range"),
    ("diffusion_steps", 0, "--diffusion-steps 0 is out of range"),
    ("hidden_dim", 0, "--hidden-dim 0 is out of range"),
    ("num_layers", 0, "--num-layers 0 is out of range"),
    ("seed", -1, "--seed -1 is out of range"),
    ("beta_max", 0.05, "--beta-max must be larger than --beta-min"),
    ("holdout", 5, "--holdout must be 0 (diagnostics on training transitions) or at least 10"),
    ("run_name", "../elsewhere", "must be a plain folder name"),
    ("run_name", "r" * 201, "must be a plain folder name of at most 200 bytes"),
    ("exp_name", "sub/dir", "--exp-name 'sub/dir' must be a plain folder name of at most 150 bytes"),
    ("exp_name", "e" * 151, "must be a plain folder name of at most 150 bytes"),
    ("beta_max", 1000.0, "--beta-max 1000.0 give a noise schedule over 5 steps whose coefficients are not finite"),
])
def test_every_script_refuses_out_of_range_arguments(module, name, value, message):
    env_id = "antmaze-umaze-v2" if module is da else "hopper-medium-v2"
    with pytest.raises(InputError) as error:
        module.Args(env_id=env_id, **{name: value})
    assert message in str(error.value)


@pytest.mark.parametrize("module", [dc, da])
@pytest.mark.parametrize("overrides, message", [
    ({"alpha": -1.0}, "--alpha -1.0 is out of range: it must lie in [0, inf)"),
    ({"eval_freq": -1}, "--eval-freq -1 is out of range"),
    ({"eval_episodes": 0}, "--eval-episodes 0 is out of range: it must lie in [1, inf)"),
    ({"num_candidates": 0}, "--num-candidates 0 is out of range"),
    ({"policy_freq": 0}, "--policy-freq 0 is out of range"),
    ({"freeze_pad": True}, "--freeze-pad keeps a pretrained diffusion model fixed: pass --pad-checkpoint too"),
    ({"freeze_pad": True, "pad_checkpoint": "p.pt", "pad": False}, "--freeze-pad would not train it"),
    ({"adpo": False, "num_candidates": 4, "pad": False}, "these would have no effect: --num-candidates, --no-pad"),
    ({"cudagraphs": True, "cuda": False}, "--cudagraphs needs a CUDA GPU"),
])
def test_divo_scripts_refuse_nonsense_combinations(module, overrides, message):
    env_id = "antmaze-umaze-v2" if module is da else "hopper-medium-v2"
    with pytest.raises(InputError) as error:
        module.Args(env_id=env_id, **overrides)
    assert message in str(error.value)


def test_the_defaults_and_the_modes_pass():
    assert dc.Args().alpha == 2.5 and da.Args().alpha == 7.5 and da.Args(env_id="antmaze-large-play-v2").alpha == 20.0
    assert pp.Args(env_id="antmaze-umaze-v2").gamma == 0.995 and pp.Args().expectile == 0.7
    assert run_mode(vars(dc.Args(adpo=False))) == "td3bc" and run_mode(vars(dc.Args(pad=False))) == "divo-no-pad"
    assert run_mode(vars(da.Args())) == "divo" and run_mode({}) == "divo"  # an older args.json without the flags
    assert task_name(vars(dc.Args(dataset_path="/x/hopper-medium-dev.hdf5"))) == "hopper-medium-dev"


def test_bad_command_lines_exit_before_any_file(tmp_path):
    cases = [
        (["--env-id", "hopper-medium-v2", "--alpha", "-1"], "divo_continuous.py", "--alpha -1.0 is out of range"),
        (["--env-id=antmaze-umaze-v2"], "divo_continuous.py", "is an AntMaze dataset: run divo_antmaze.py"),
        (["--env-id", "walker2d-medium-v2"], "divo_antmaze.py", "is a locomotion dataset: run divo_continuous.py"),
        (["--env-id", "antmaze-umaze-v2", "--eval-episodes", "0"], "divo_antmaze.py", "--eval-episodes 0 is out of range"),
        (["--holdout", "0", "--batch-size", "0"], "pad_pretrain.py", "--batch-size 0 is out of range"),
        (["--env-id", "hopper-medium-v2", "--exp-name", "a/b"], "divo_continuous.py", "--exp-name 'a/b' must be a plain"),
        (["--env-id", "hopper-medium-v2", "--run-name", "r" * 300], "pad_pretrain.py", "at most 200 bytes"),
        (["--env-id", "antmaze-umaze-v2", "--beta-max", "1000"], "divo_antmaze.py", "coefficients are not finite"),
    ]
    for argv, script, message in cases:
        proc = run_script(script, *argv, cwd=tmp_path, check=False)
        assert refused(proc, message), (script, argv, proc.stderr)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------- data files
@pytest.mark.parametrize("obs_dim, act_dim", [(11, 3), (29, 8)], ids=["locomotion", "antmaze"])
def test_zero_transitions_and_bad_flags_are_refused(obs_dim, act_dim, tmp_path):
    path = tmp_path / "d.hdf5"
    write_d4rl_file(path, obs_dim=obs_dim, act_dim=act_dim, episode_lengths=(5, 5), timeouts=np.ones(10, bool))
    with pytest.raises(InputError, match="yields no transitions: every row but the last is a timeout"):
        data.load_d4rl_file(str(path), obs_dim, act_dim)
    for column, value, shown in (("terminals", 0.5, "0.5"), ("timeouts", np.nan, "nan"), ("terminals", 2, "2.0")):
        flags = np.zeros(10)
        flags[3] = value
        write_d4rl_file(path, obs_dim=obs_dim, act_dim=act_dim, episode_lengths=(5, 5), **{column: flags})
        with pytest.raises(InputError, match=f"'{column}' must hold only 0/1 .*row 3 holds {shown}"):
            data.load_d4rl_file(str(path), obs_dim, act_dim)


@pytest.mark.parametrize("column, row, value", [("observations", 4, np.nan), ("actions", 0, -np.inf), ("rewards", 8, np.nan)])
def test_nan_or_inf_in_a_column_is_refused_naming_it_and_its_first_row(tmp_path, column, row, value):
    path = tmp_path / "d.hdf5"
    values = write_d4rl_file(path, episode_lengths=(5, 5))[column]
    values[row] = value
    values[row + 1] = value  # two bad rows: the first is named
    write_d4rl_file(path, episode_lengths=(5, 5), **{column: values})
    with pytest.raises(InputError, match=rf"d.hdf5: 2 row\(s\) of '{column}' hold NaN or inf \(first at row {row}\)"):
        data.load_d4rl_file(str(path), 11, 3)


@pytest.mark.parametrize("case, message", [
    ("group", "'rewards' is a group, not an array of numbers"),
    ("strings", "'actions' is of type |S5, not an array of numbers"),
    ("directory", "is a directory; pass the D4RL-format HDF5 file itself"),
])
def test_files_that_are_not_d4rl_arrays_are_refused(tmp_path, case, message):
    path = tmp_path / "bad.hdf5"
    if case == "directory":
        path.mkdir()
    else:
        write_d4rl_file(path, **{"rewards" if case == "group" else "actions": None})
        with h5py.File(path, "a") as f:
            if case == "group":
                f.create_group("rewards")["x"] = np.zeros(3)
            else:
                f["actions"] = np.array([b"hello"] * 95)
    with pytest.raises(InputError, match=message):
        data.load_d4rl_file(str(path), 11, 3)


def test_unwritable_dataset_cache_and_runs_folder_are_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    env = {"D4RL_DATASET_DIR": str(blocker / "cache")}
    proc = run_script("divo_continuous.py", *TINY, cwd=tmp_path, check=False, env=env)
    assert refused(proc, "a-file is a file, not a folder; set D4RL_DATASET_DIR to a folder you can write to"), proc.stderr
    write_d4rl_file(tmp_path / "data.hdf5")
    (tmp_path / "runs").write_text("runs is a file here")
    proc = run_script("divo_continuous.py", *TINY, "--dataset-path", tmp_path / "data.hdf5", cwd=tmp_path, check=False)
    assert refused(proc, "cannot write to runs: "), proc.stderr
    assert "dataset " not in proc.stdout  # refused before the data was read
    if os.geteuid() != 0:  # root writes into read-only folders, so only other users can see this case
        (tmp_path / "runs").unlink()
        (tmp_path / "runs").mkdir(mode=0o555)
        proc = run_script("divo_continuous.py", *TINY, "--dataset-path", tmp_path / "data.hdf5", cwd=tmp_path, check=False)
        assert refused(proc, "cannot write to runs (Permission denied)"), proc.stderr


def test_a_huge_observation_is_refused_naming_its_dimension_before_any_folder(tmp_path):
    """1e30 is finite, but its square overflows float32: the state normalisation's std of that dimension is inf."""
    observations = np.random.default_rng(0).normal(size=(500, 11)).astype(np.float32)
    observations[7, 4] = 1e30
    write_d4rl_file(tmp_path / "d.hdf5", episode_lengths=(120, 90, 150, 140), observations=observations)
    proc = run_script("divo_continuous.py", *TINY, "--dataset-path", tmp_path / "d.hdf5", cwd=tmp_path, check=False)
    assert refused(proc, "d.hdf5: observation dimension 4 holds values up to 1e+30, too large for its standard "
                         "deviation in float32"), proc.stderr  # one line: no numpy overflow warning either
    assert not (tmp_path / "runs").exists()


def test_too_few_transitions_for_meaningful_diagnostics_are_refused(tmp_path):
    write_d4rl_file(tmp_path / "d.hdf5", episode_lengths=(2,))  # two rows: one transition
    proc = run_script("pad_pretrain.py", "--env-id", "hopper-medium-v2", "--dataset-path", tmp_path / "d.hdf5", "--holdout",
                      "0", "--no-cuda", cwd=tmp_path, check=False)
    assert refused(proc, "d.hdf5 yields 1 transition(s) (D4RL's qlearning_dataset); training needs at least 20"), proc.stderr
    assert not (tmp_path / "runs").exists()
    data.check_transitions(np.zeros((20, 3), np.float32), "f")
    with pytest.raises(InputError, match="f yields 19 transition"):
        data.check_transitions(np.zeros((19, 3), np.float32), "f")


def test_every_logged_value_is_checked_so_nan_samples_stop_the_run(tmp_path):
    """A sampler that makes NaN (its schedule broken behind the argument check's back) gives NaN ADPO diagnostics:
    the run stops with their names at the logging sync, and nothing of that step is logged."""
    agent = dc.DIVO(11, 3, dc.Args(hidden_dim=8, num_layers=1), torch.device("cpu"))
    rows = {"observations": torch.randn(100, 11), "actions": torch.rand(100, 3) * 2 - 1, "rewards": torch.zeros(100)}
    contest = diagnostics.Diagnostics(rows, rows, 0)
    writer = SummaryWriter(str(tmp_path))
    runs.log_scalars(writer, 5, contest.contest(agent), "none yet")
    agent.diffusion = dc.Diffusion(11, 3, 5, 0.1, 1000.0, 8, 1)  # --beta-max 1000, which check_args refuses
    with pytest.raises(InputError, match=r"diverged by step 10: .*adpo/candidate_distance = nan.*not finite"):
        runs.log_scalars(writer, 10, contest.contest(agent), "none yet")
    writer.close()
    assert [e.step for e in EventAccumulator(str(tmp_path)).Reload().Scalars("adpo/candidate_distance")] == [5]


@pytest.mark.skipif(os.environ.get("HDF5_USE_FILE_LOCKING", "").upper() == "FALSE", reason="HDF5 file locking is off")
def test_a_dataset_open_for_writing_in_another_process_is_named_so(tmp_path):
    path = tmp_path / "d.hdf5"
    write_d4rl_file(path)
    holder = subprocess.Popen([sys.executable, "-c", "import h5py, sys, time; f = h5py.File(sys.argv[1], 'a'); "
                               "print('open', flush=True); time.sleep(120)", str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(InputError, match="d.hdf5 is open for writing in another process .HDF5 file lock.: wait"):
            data.load_d4rl_file(str(path), 11, 3)
    finally:
        holder.kill()
        holder.wait()
    assert len(data.load_d4rl_file(str(path), 11, 3)["rewards"]) == 95


def test_a_frozen_pad_model_of_another_gamma_is_refused(tmp_path):
    write_d4rl_file(tmp_path / "d.hdf5", episode_lengths=(120, 90, 150, 140))
    run_script("pad_pretrain.py", "--env-id", "hopper-medium-v2", "--dataset-path", tmp_path / "d.hdf5", "--hidden-dim",
               "16", "--num-layers", "1", "--batch-size", "32", "--total-timesteps", "10", "--holdout", "0", "--gamma",
               "0.9", "--no-cuda", "--run-name", "pad", cwd=tmp_path)
    proc = run_script("divo_continuous.py", *TINY, "--dataset-path", tmp_path / "d.hdf5", "--pad-checkpoint",
                      tmp_path / "runs" / "pad" / "pad_checkpoint.pt", "--freeze-pad", cwd=tmp_path, check=False)
    assert refused(proc, "does not match this run: --gamma 0.99 here, 0.9 in the checkpoint"), proc.stderr
    assert os.listdir(tmp_path / "runs") == ["pad"]


# ---------------------------------------------------------------------------------------------- run folders
def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runs.time, "time", lambda: 1_700_000_000.5)
    args = dc.Args(env_id="hopper-medium-v2", seed=3)
    names = [runs.make_run_dir(args, "divo_continuous")[0].run_name for _ in range(3)]
    base = "hopper-medium-v2__divo_continuous__3__1700000000"
    assert names == [base, f"{base}-1", f"{base}-2"]
    assert sorted(os.listdir(tmp_path / "runs")) == sorted(names)


def test_scores_json_names_the_data_it_was_trained_on(finished_run):
    """A committed scores.json (without its checkpoint) still says which file made it: the rows' SHA-1."""
    cwd, run = finished_run
    scores = json.loads((run / "scores.json").read_text())
    expected = data.dataset_fingerprint(data.load_d4rl_file(str(cwd / "data.hdf5"), 11, 3, "hopper"))
    assert scores["dataset_sha1"] == expected == torch.load(run / "checkpoint.pt", weights_only=False)["dataset_sha1"]


def test_an_existing_run_name_is_refused_and_left_untouched(finished_run):
    cwd, run = finished_run
    before = folder_bytes(run)
    proc = run_script("divo_continuous.py", *TINY, "--dataset-path", cwd / "data.hdf5", "--total-timesteps", 20,
                      "--run-name", "done", cwd=cwd, check=False)
    assert refused(proc, "runs/done exists: choose another --run-name, or continue that run with --resume "
                         "runs/done/checkpoint.pt"), proc.stderr
    assert folder_bytes(run) == before


def test_resuming_a_finished_run_or_going_back_in_time_is_refused(finished_run):
    cwd, run = finished_run
    before = folder_bytes(run)
    proc = run_script("divo_continuous.py", "--resume", run / "checkpoint.pt", "--no-cuda", cwd=cwd, check=False)
    assert refused(proc, "checkpoint.pt is finished (40 of 40 steps; its results are in"), proc.stderr
    assert "pass --total-timesteps larger than 40" in proc.stderr
    proc = run_script("divo_continuous.py", "--resume", run / "checkpoint.pt", "--total-timesteps", 30, "--no-cuda", cwd=cwd,
                      check=False)
    assert refused(proc, "checkpoint.pt is at step 40, beyond --total-timesteps (40 of 30 steps"), proc.stderr
    assert folder_bytes(run) == before
    assert json.loads((run / "scores.json").read_text())["evaluations"][-1]["step"] == 40  # no duplicate entry


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_a_cudagraphs_run_resumes_without_a_gpu_with_no_cudagraphs(finished_run, tmp_path):
    """--cudagraphs is resume-free: the checkpoint's value is checked only after the command line's applies."""
    cwd, run = finished_run
    copy = tmp_path / "runs" / "done"
    shutil.copytree(run, copy)
    checkpoint = torch.load(copy / "checkpoint.pt", weights_only=True)
    checkpoint["args"]["cudagraphs"] = True  # as a run trained with --cudagraphs on a GPU saved it
    torch.save(checkpoint, copy / "checkpoint.pt")
    common = ["--resume", copy / "checkpoint.pt", "--total-timesteps", 50, "--dataset-path", cwd / "data.hdf5"]
    proc = run_script("divo_continuous.py", *common, cwd=tmp_path, check=False)
    assert refused(proc, "--cudagraphs needs a CUDA GPU (and --cuda)"), proc.stderr
    run_script("divo_continuous.py", *common, "--no-cudagraphs", cwd=tmp_path)
    assert json.loads((copy / "scores.json").read_text())["step"] == 50


def test_a_stale_partial_checkpoint_is_removed_when_the_run_resumes(finished_run, tmp_path):
    cwd, run = finished_run
    copy = tmp_path / "runs" / "done"
    shutil.copytree(run, copy)
    (copy / "checkpoint.pt.tmp").write_bytes(b"half a checkpoint")
    proc = run_script("divo_continuous.py", "--resume", copy / "checkpoint.pt", "--total-timesteps", 50, "--no-cuda",
                      "--dataset-path", cwd / "data.hdf5", cwd=tmp_path)
    assert "a partial checkpoint left by an interrupted save" in proc.stdout
    assert not (copy / "checkpoint.pt.tmp").exists()
    assert runs.load_checkpoint(str(copy / "checkpoint.pt"), "divo_continuous")["step"] == 50


def test_divergence_stops_with_the_step_and_the_loss_and_keeps_the_last_good_checkpoint(finished_run, tmp_path):
    cwd, run = finished_run
    copy = tmp_path / "runs" / "done"
    shutil.copytree(run, copy)
    checkpoint = torch.load(copy / "checkpoint.pt", weights_only=True)
    # weights stay finite, but Adam's second moment is negative: the next critic step writes NaN into the weights
    for state in checkpoint["agent"]["critic_optimizer"]["state"].values():
        state["exp_avg_sq"].fill_(-1.0)
    torch.save(checkpoint, copy / "checkpoint.pt")
    before = folder_bytes(copy)
    proc = run_script("divo_continuous.py", "--resume", copy / "checkpoint.pt", "--total-timesteps", 80, "--no-cuda",
                      "--dataset-path", cwd / "data.hdf5", "--checkpoint-freq", 5, cwd=tmp_path, check=False)
    assert refused(proc, "training diverged by step 45: losses/qf_loss = nan"), proc.stderr
    assert "the critic network's weights" in proc.stderr and f"({copy / 'checkpoint.pt'} (step 40))" in proc.stderr
    after = folder_bytes(copy)
    assert after["checkpoint.pt"] == before["checkpoint.pt"] and "scores.json" in after
    assert json.loads(after["scores.json"]) == json.loads(before["scores.json"])  # the old, valid scores
    assert not any(name.endswith(".tmp") for name in after)


def test_check_finite_names_the_loss_or_the_network():
    agent = dc.DIVO(5, 3, dc.Args(hidden_dim=8, num_layers=1), torch.device("cpu"))
    ok = {"losses/qf_loss": torch.tensor(1.0), "losses/pad_loss": torch.tensor(0.5)}
    assert runs.check_finite(7, ok, agent, "none yet") == {"losses/qf_loss": 1.0, "losses/pad_loss": 0.5}
    with pytest.raises(InputError, match=r"diverged by step 7: losses/pad_loss = inf not finite.*\(none yet\)"):
        runs.check_finite(7, {**ok, "losses/pad_loss": torch.tensor(float("inf"))}, agent, "none yet")
    with torch.no_grad():
        agent.value.net[0].weight[0, 0] = float("nan")
    with pytest.raises(InputError, match="diverged by step 9: the value network's weights not finite"):
        runs.check_finite(9, ok, agent, "none yet")


def test_a_foreign_checkpoint_is_refused_in_one_line(tmp_path):
    """torch's refusal of a pickle it does not trust spans many lines: only its first is kept."""
    torch.save({"kind": argparse.Namespace(run="not ours")}, tmp_path / "c.pt")
    with pytest.raises(InputError) as error:
        runs.load_checkpoint(str(tmp_path / "c.pt"), "pad_pretrain")
    assert "cannot read checkpoint" in str(error.value) and len(str(error.value).splitlines()) == 1


def test_scores_json_is_strict_json(tmp_path):
    files.write_json(str(tmp_path / "a.json"), {"x": 1.5}, "c.pt")
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1.5}
    with pytest.raises(ValueError):
        files.write_json(str(tmp_path / "b.json"), {"x": float("nan")}, "c.pt")
    assert sorted(os.listdir(tmp_path)) == ["a.json"]  # nothing of the refused file, not even a partial one


# ---------------------------------------------------------------------------------------------- pad_pretrain
def test_pad_pretrain_ends_without_a_holdout_and_refuses_a_holdout_too_large(tmp_path):
    write_d4rl_file(tmp_path / "d.hdf5", episode_lengths=(120, 90, 150, 140), terminal_episodes=(1,))
    common = ["--env-id", "hopper-medium-v2", "--dataset-path", tmp_path / "d.hdf5", "--hidden-dim", "16",
              "--num-layers", "1", "--batch-size", "32", "--total-timesteps", "20", "--log-freq", "10", "--no-cuda"]
    proc = run_script("pad_pretrain.py", *common, "--holdout", "400", cwd=tmp_path, check=False)
    assert refused(proc, "--holdout 400 would hold out more than half of the 497 transitions"), proc.stderr
    assert not (tmp_path / "runs").exists()
    proc = run_script("pad_pretrain.py", *common, "--holdout", "0", "--run-name", "p", cwd=tmp_path)
    assert "diagnostics on 497 training ones (--holdout 0)" in proc.stdout
    run = tmp_path / "runs" / "p"
    assert runs.load_checkpoint(str(run / "pad_checkpoint.pt"), "pad_pretrain")["step"] == 20
    diagnostics = json.loads((run / "pad_diagnostics.json").read_text())
    assert diagnostics["heldout"] is False and diagnostics["heldout_transitions"] == 497
    assert (run / "pad_samples.png").stat().st_size > 1000


@pytest.mark.skipif(sys.platform != "linux", reason="the file-as-folder trick is checked on Linux")
def test_check_writable_tries_the_nearest_existing_folder_and_creates_nothing(tmp_path):
    files.check_writable(str(tmp_path / "not" / "yet"), "fix")
    assert os.listdir(tmp_path) == []
    (tmp_path / "f").write_text("")
    with pytest.raises(InputError, match="f is a file, not a folder; fix"):
        files.check_writable(str(tmp_path / "f" / "below"), "fix")
