"""pad_pretrain.py: its losses and diagnostics, and the checkpoint both DIVO scripts start from (or refuse)."""

import copy
import json
import shutil

import numpy as np
import pytest
import torch

import pad_pretrain as pp
from conftest import only_run, perturb, png_size, refused, run_script, write_d4rl_file
from divo_utils import ANTMAZE_IDS, LOCOMOTION_IDS, InputError
from divo_utils.args import check_env_id
from divo_utils.data import D4RL_DIMS, dataset_url, load_task
from divo_utils.diagnostics import mmd_rbf, wasserstein_per_dim
from divo_utils.runs import load_checkpoint
from test_antmaze_e2e import antmaze_file

PAD_TINY = ["--hidden-dim", "32", "--num-layers", "2", "--batch-size", "64", "--log-freq", "20", "--holdout", "40",
            "--no-cuda"]
DIVO_TINY = ["--hidden-dim", "32", "--num-layers", "2", "--batch-size", "64", "--log-freq", "10",
             "--eval-episodes", "2", "--no-cuda"]


def test_pretraining_losses_are_in_sample():
    """Q regresses on r + gamma (1 - d) V(s'), V on the expectile of min Q' (target critics), PAD weights
    zeta 1[A > 0], then the target critics' Polyak step."""
    args = pp.Args(hidden_dim=16, num_layers=2, gamma=0.9, critic_lr=3e-4, expectile=0.7, reward_transform="none",
                   pad_strength=2.0)
    torch.manual_seed(0)
    pretrainer = pp.PADPretrainer(5, 3, args, torch.device("cpu"))
    perturb(pretrainer.critic_target)  # target critics unlike the online ones, as after any training
    s, a, r, s2 = torch.randn(32, 5), torch.rand(32, 3) * 2 - 1, torch.randn(32), torch.randn(32, 5)
    with torch.no_grad():  # V in the middle of min Q': advantages of both signs
        pretrainer.value.net[-1].bias += (pretrainer.critic_target(s, a).min(0).values - pretrainer.value(s)).median() + 1e-3
    not_done = (torch.rand(32) > 0.2).float()
    value, critic, critic_t = (copy.deepcopy(m) for m in (pretrainer.value, pretrainer.critic, pretrainer.critic_target))
    seen, loss = {}, pretrainer.diffusion.loss

    def recording_loss(s_, a_, w):
        seen["w"] = w
        return loss(s_, a_, w)

    pretrainer.diffusion.loss = recording_loss
    metrics = pretrainer.update((s, a, r, s2, not_done))
    u = critic_t(s, a).min(0).values - value(s)
    assert (u > 0).any() and (u < 0).any()
    torch.testing.assert_close(metrics["losses/value_loss"], (torch.where(u < 0, 0.3, 0.7) * u**2).mean().detach())
    y = r + 0.9 * not_done * pretrainer.value(s2)  # V after its own step, as in IQL
    q = critic(s, a)
    torch.testing.assert_close(metrics["losses/qf_loss"], ((q - y) ** 2).mean(1).sum().detach())
    torch.testing.assert_close(seen["w"], 2.0 * (u > 0).float())
    for new, old, online in zip(pretrainer.critic_target.parameters(), critic_t.parameters(), pretrainer.critic.parameters()):
        torch.testing.assert_close(new, 0.995 * old + 0.005 * online)


def test_pretraining_pad_weights_are_binary_advantage_times_strength():
    """Eq. (10) in pretraining: w = zeta 1[A > 0], A = min_i Q'_i(s, a) - V(s); A = 0 is not positive."""
    pretrainer = pp.PADPretrainer(5, 3, pp.Args(hidden_dim=16, num_layers=1, pad_strength=2.5), torch.device("cpu"))
    advantages = torch.tensor([0.3, 0.0, -1.0, 2.0])
    pretrainer.target_q = lambda s, a: pretrainer.value(s) + advantages  # (V + 0) - V is exactly 0
    seen, loss = {}, pretrainer.diffusion.loss
    pretrainer.diffusion.loss = lambda s, a, w: seen.update(w=w) or loss(s, a, w)
    metrics = pretrainer.update((torch.randn(4, 5), torch.rand(4, 3) * 2 - 1, torch.randn(4), torch.randn(4, 5),
                                 torch.ones(4)))
    assert seen["w"].tolist() == [2.5, 0.0, 0.0, 2.5]
    assert metrics["pad/positive_fraction"].item() == pytest.approx(0.5)


def test_distances():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 3, generator=g)
    assert wasserstein_per_dim(x, x).abs().max() == 0
    torch.testing.assert_close(wasserstein_per_dim(x, x + torch.tensor([0.5, 0.0, -1.0])), torch.tensor([0.5, 0.0, 1.0]))
    assert mmd_rbf(x, x, 1.0).abs() < 1e-6
    assert mmd_rbf(x, x + 1.0, 1.0) > 0.1 > mmd_rbf(x, torch.randn(500, 3, generator=g), 1.0)


def test_domain_defaults_and_ids(tmp_path):
    def domain(env_id):
        return check_env_id(env_id, ("locomotion", "antmaze"), {})  # as pad_pretrain.py checks its ids

    assert domain("antmaze-large-play-v2") == "antmaze" and domain("hopper-medium-v2") == "locomotion"
    assert all(domain(i) == "locomotion" for i in LOCOMOTION_IDS) and all(domain(i) == "antmaze" for i in ANTMAZE_IDS)
    with pytest.raises(InputError, match="unknown --env-id 'hopper-medum-v2'; did you mean hopper-medium-v2"):
        domain("hopper-medum-v2")
    assert D4RL_DIMS["antmaze"] == (29, 8) and D4RL_DIMS["walker2d"] == (17, 6)
    # pretraining takes the sizes of the id's domain (no env is built): AntMaze's, and walker2d's
    antmaze_file(tmp_path / "am.hdf5")
    write_d4rl_file(tmp_path / "w.hdf5", obs_dim=17, act_dim=6)
    for env_id, path, dims in [("antmaze-umaze-v2", "am.hdf5", (29, 8)), ("walker2d-expert-v2", "w.hdf5", (17, 6))]:
        task = load_task(env_id, str(tmp_path / path))  # as pad_pretrain.py's main: no evaluation envs
        assert (task.obs_dim, task.act_dim) == dims and task.envs == []
    assert dataset_url("antmaze-umaze-v2") == "http://rail.eecs.berkeley.edu/datasets/offline_rl/ant_maze_v2/" \
        "Ant_maze_u-maze_noisy_multistart_False_multigoal_False_sparse_fixed.hdf5"
    assert dataset_url("hopper-medium-replay-v2") == \
        "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/hopper_medium_replay-v2.hdf5"
    assert pp.DOMAIN_DEFAULTS["antmaze"] == {"gamma": 0.995, "critic_lr": 1e-4, "expectile": 0.9,
                                             "reward_transform": "minus-one"}
    assert pp.DOMAIN_DEFAULTS["locomotion"] == {"gamma": 0.99, "critic_lr": 3e-4, "expectile": 0.7,
                                                "reward_transform": "none"}
    for env_id, defaults in [("antmaze-umaze-v2", pp.DOMAIN_DEFAULTS["antmaze"]),
                             ("hopper-medium-v2", pp.DOMAIN_DEFAULTS["locomotion"])]:
        args = pp.Args(env_id=env_id, cuda=False)
        assert {name: getattr(args, name) for name in defaults} == defaults
    assert pp.Args(env_id="antmaze-umaze-v2", gamma=0.9, cuda=False).gamma == 0.9  # given values win


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("pad")
    write_d4rl_file(cwd / "hopper.hdf5", episode_lengths=(120, 90, 150, 140), terminal_episodes=(1,))
    proc = run_script("pad_pretrain.py", "--env-id", "hopper-medium-v2", "--dataset-path", cwd / "hopper.hdf5",
                      *PAD_TINY, "--total-timesteps", 60, "--diag-freq", 30, cwd=cwd)
    return cwd, only_run(cwd), proc


def test_pretraining_writes_checkpoint_diagnostics_and_figure(pretrained):
    _, run, proc = pretrained
    assert "sample-to-data distance on held-out positive-advantage states: Wasserstein" in proc.stdout
    checkpoint = load_checkpoint(str(run / "pad_checkpoint.pt"), "pad_pretrain")
    assert checkpoint["step"] == 60 and checkpoint["obs_dim"] == 11
    assert {"diffusion", "critic", "critic_target", "value", "obs_mean", "obs_std", "args"} <= set(checkpoint)
    assert checkpoint["args"]["diffusion_steps"] == 5 and checkpoint["args"]["gamma"] == 0.99
    diagnostics = json.loads((run / "pad_diagnostics.json").read_text())
    assert [row["step"] for row in diagnostics["history"]] == [0, 30, 60]
    final = diagnostics["final"]
    for key in ("model_wasserstein", "model_mmd", "initial_wasserstein", "initial_mmd", "positive_fraction"):
        assert np.isfinite(final[key])
    assert 0 < final["positive_fraction"] < 1
    width, height = png_size(run / "pad_samples.png")
    assert width > 500 and height > 200


def test_divo_continuous_starts_from_the_checkpoint_frozen_or_fine_tuned(pretrained):
    cwd, run, _ = pretrained
    pad = load_checkpoint(str(run / "pad_checkpoint.pt"), "pad_pretrain")
    common = ["--env-id", "hopper-medium-v2", "--dataset-path", cwd / "hopper.hdf5", *DIVO_TINY, "--total-timesteps", 20,
              "--eval-freq", 0, "--pad-checkpoint", run / "pad_checkpoint.pt"]
    for freeze in (True, False):
        out = cwd / f"divo_{freeze}"
        out.mkdir()
        proc = run_script("divo_continuous.py", *common, *(["--freeze-pad"] if freeze else []), cwd=out)
        assert "loaded the PAD model, critics and value net" in proc.stdout
        divo_run = only_run(out)
        agent = load_checkpoint(str(divo_run / "checkpoint.pt"), "divo_continuous")["agent"]
        same = [torch.equal(agent["diffusion"][k], v) for k, v in pad["diffusion"].items()]
        assert all(same) if freeze else not all(same)
        assert not torch.equal(agent["critic"]["net.0.weight"], pad["critic"]["net.0.weight"])  # trained on
        assert len(json.loads((divo_run / "scores.json").read_text())["normalized_scores"]) == 2


def test_divo_refuses_a_checkpoint_that_does_not_match(pretrained, tmp_path):
    cwd, run, _ = pretrained
    pad = run / "pad_checkpoint.pt"
    write_d4rl_file(tmp_path / "other.hdf5", seed=3)
    cases = [
        (["--dataset-path", tmp_path / "other.hdf5", "--pad-checkpoint", pad], "was trained on another dataset"),
        (["--dataset-path", cwd / "hopper.hdf5", "--pad-checkpoint", pad, "--diffusion-steps", "10"],
         "does not match this run: --diffusion-steps 10 here, 5 in the checkpoint. To fix: pretrain with the same "
         "values (this run learns from r: --reward-transform none) on the dataset you train on, or pass the "
         "checkpoint's values (--diffusion-steps 5)"),
        (["--dataset-path", cwd / "hopper.hdf5", "--freeze-pad"], "--freeze-pad keeps a pretrained diffusion model fixed"),
    ]
    for extra, message in cases:
        proc = run_script("divo_continuous.py", "--env-id", "hopper-medium-v2", *DIVO_TINY, *extra, cwd=tmp_path, check=False)
        assert refused(proc, message), proc.stderr
    torch.save({"kind": "divo_continuous"}, tmp_path / "divo.pt")
    with pytest.raises(InputError, match="checkpoint of divo_continuous, not of pad_pretrain.py"):
        load_checkpoint(str(tmp_path / "divo.pt"), "pad_pretrain")


def test_antmaze_pretraining_feeds_divo_antmaze(tmp_path):
    antmaze_file(tmp_path / "am.hdf5")
    run_script("pad_pretrain.py", "--env-id", "antmaze-umaze-v2", "--dataset-path", tmp_path / "am.hdf5", *PAD_TINY,
               "--total-timesteps", 20, "--diag-freq", 0, cwd=tmp_path)
    run = only_run(tmp_path)
    pad = load_checkpoint(str(run / "pad_checkpoint.pt"), "pad_pretrain")
    assert pad["args"]["gamma"] == 0.995 and pad["args"]["expectile"] == 0.9 and pad["args"]["reward_transform"] == "minus-one"
    common = ["--env-id", "antmaze-umaze-v2", "--dataset-path", tmp_path / "am.hdf5", *DIVO_TINY, "--total-timesteps", 10,
              "--eval-freq", 0, "--pad-checkpoint", run / "pad_checkpoint.pt"]
    out = tmp_path / "divo"
    out.mkdir()
    proc = run_script("divo_antmaze.py", *common, "--freeze-pad", cwd=out)
    assert "loaded the PAD model" in proc.stdout
    proc = run_script("divo_antmaze.py", *common, "--reward-transform", "none", cwd=out, check=False)
    assert refused(proc, "--reward-transform 'none' here, 'minus-one' in the checkpoint"), proc.stderr


def test_pretraining_resumes(pretrained, tmp_path):
    cwd, run, _ = pretrained
    copy_dir = tmp_path / "runs" / run.name
    shutil.copytree(run, copy_dir)
    proc = run_script("pad_pretrain.py", "--resume", copy_dir / "pad_checkpoint.pt", "--total-timesteps", 80,
                      "--dataset-path", cwd / "hopper.hdf5", "--no-cuda", cwd=tmp_path)
    assert "at step 60" in proc.stdout and "step 80/80" in proc.stdout
    resumed = load_checkpoint(str(copy_dir / "pad_checkpoint.pt"), "pad_pretrain")
    assert resumed["step"] == 80 and [row["step"] for row in resumed["diagnostics"]] == [0, 30, 60, 80]
