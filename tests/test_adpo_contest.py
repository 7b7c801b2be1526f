"""tools/adpo_contest.py: the contest of eq. 12 measured on a trained run, and the arithmetic behind it."""

import os
import re
import shutil
import sys

import pytest
import torch

from conftest import ROOT, only_run, run_script, write_d4rl_file
from divo_utils.data import load_d4rl_file

sys.path.insert(0, os.path.join(ROOT, "tools"))
import adpo_contest  # noqa: E402

MARGINS = [0.0, 0.25, 0.5, 1.0, 2.0, 4.0]


def test_contest_stats_on_hand_built_critic_values():
    """Three states; rows are the twin critics. Gap of the minimum: +1, -1, -0.5; critic verdicts:
    (+, +), (-, +), (-, -) -> agree on 2 of 3, both prefer the generated action on 1 of 3."""
    q_data = torch.tensor([[1.0, 1.0, 2.0], [1.5, 1.0, 2.0]])
    q_gen = torch.tensor([[2.5, 0.0, 1.5], [2.0, 2.0, 1.5]])
    stats = adpo_contest.contest_stats(q_data, q_gen)
    assert stats["generated_wins"] == pytest.approx(1 / 3)  # min 2.0 vs 1.0; 0.0 vs 1.0; 1.5 vs 2.0
    assert stats["gap_median"] == pytest.approx(1.0)  # |gaps| 1, 1, 0.5
    assert stats["twin_agree"] == pytest.approx(2 / 3)
    assert stats["both_prefer_generated"] == pytest.approx(1 / 3)
    assert stats["twin_gap_mean"] == pytest.approx(0.5 / 3)
    assert stats["q_mean"] == pytest.approx((1.0 + 1.0 + 2.0) / 3)


TINY = ["--env-id", "hopper-medium-v2", "--hidden-dim", "32", "--num-layers", "2", "--batch-size", "64",
        "--eval-episodes", "1", "--no-legacy-inertia", "--total-timesteps", "40", "--eval-freq", "40", "--no-cuda"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny DIVO run, runs/divo, in the folder returned."""
    cwd = tmp_path_factory.mktemp("contest")
    write_d4rl_file(cwd / "d.hdf5", episode_lengths=(120, 90, 150, 140), terminal_episodes=(1,))
    run_script("divo_continuous.py", *TINY, "--dataset-path", cwd / "d.hdf5", "--run-name", "divo", cwd=cwd)
    return cwd


def printed(line, out):
    return float(re.search(re.escape(line) + r"\s+([\d.]+)", out)[1])


def test_contest_on_a_tiny_run_and_refusals(trained, monkeypatch, capsys):
    tmp_path = trained
    out = run_script("tools/adpo_contest.py", "runs/divo", "--samples", "300", cwd=tmp_path).stdout
    assert "runs/divo (step 40, 300 states)" in out
    for line in ("generated action wins eq. 12", "twin critics agree on the winner", "both critics prefer the generated"):
        assert 0.0 <= printed(line, out) <= 1.0, line
    assert "kappa" not in out  # no --margins: no table
    run_script("divo_continuous.py", *TINY, "--dataset-path", tmp_path / "d.hdf5", "--run-name", "backbone", "--no-adpo",
               cwd=tmp_path)
    refused = run_script("tools/adpo_contest.py", "runs/backbone", cwd=tmp_path, check=False)
    assert refused.returncode == 1 and "is a --no-adpo run" in refused.stderr
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tmp_path / "runs" / "divo", tmp_path / "runs" / "graphs")
    checkpoint = torch.load(tmp_path / "runs" / "graphs" / "checkpoint.pt", weights_only=True)
    checkpoint["args"]["cudagraphs"] = True  # trained with --cudagraphs on a GPU: the contest runs on the CPU
    torch.save(checkpoint, tmp_path / "runs" / "graphs" / "checkpoint.pt")
    adpo_contest.main(adpo_contest.Args(runs=["runs/graphs"], samples=300))
    assert "runs/graphs (step 40, 300 states)" in capsys.readouterr().out
    shutil.copytree(tmp_path / "runs" / "divo", tmp_path / "runs" / "cut")
    with open(tmp_path / "runs" / "cut" / "checkpoint.pt", "r+b") as f:
        f.truncate(1000)
    for runs, samples, message in ((["runs/divo", "runs/nothing"], 300, "no checkpoint at runs/nothing/checkpoint.pt"),
                                   (["runs/cut"], 300, "cannot read runs/cut/checkpoint.pt (RuntimeError"),
                                   (["runs/divo"], 0, "--samples must be at least 1")):
        with pytest.raises(SystemExit) as refusal:
            adpo_contest.main(adpo_contest.Args(runs=runs, samples=samples))
        assert str(refusal.value.code).startswith("error: ") and message in str(refusal.value.code)
        assert capsys.readouterr().out == ""  # refused before any contest


@pytest.mark.parametrize("args, message", [
    ({"margins": [-1.0]}, "--margins takes finite numbers >= 0, got -1"),
    ({"margins": [0.0, float("nan")]}, "--margins takes finite numbers >= 0, got 0 nan"),
    ({"margins": [float("inf")]}, "--margins takes finite numbers >= 0, got inf"),
    ({"margins": [0.0], "num_candidates": [0]}, "--num-candidates takes counts of at least 1, got 0"),
    ({"margins": [0.0], "num_candidates": [2, -1]}, "--num-candidates takes counts of at least 1, got 2 -1"),
    ({"margins": [0.0], "num_candidates": []}, "--num-candidates needs at least one count"),
])
def test_bad_margins_and_candidate_counts_are_one_error_line_before_any_work(trained, monkeypatch, capsys, args, message):
    monkeypatch.chdir(trained)
    with pytest.raises(SystemExit) as refusal:
        adpo_contest.main(adpo_contest.Args(runs=["runs/divo"], samples=300, **args))
    assert str(refusal.value.code).startswith("error: ") and message in str(refusal.value.code)
    assert capsys.readouterr().out == ""  # refused before any contest


def hopper_minari_store(path, dataset_id: str) -> None:
    """A Minari store at `path` with a small Hopper-v5 dataset of random actions (reference returns given)."""
    import gymnasium as gym
    import minari
    import numpy as np
    from minari.data_collector import EpisodeBuffer

    env = gym.make("Hopper-v5", max_episode_steps=40)
    env.action_space.seed(0)
    episodes = []
    for seed in range(6):
        obs, _ = env.reset(seed=seed)
        observations, actions, rewards, terminations, truncations = [obs], [], [], [], []
        while not terminations or not (terminations[-1] or truncations[-1]):
            actions.append(env.action_space.sample())
            obs, reward, terminated, truncated, _ = env.step(actions[-1])
            for values, value in zip((observations, rewards, terminations, truncations),
                                     (obs, reward, terminated, truncated)):
                values.append(value)
        episodes.append(EpisodeBuffer(observations=np.stack(observations), actions=np.asarray(actions, np.float32),
                                      rewards=rewards, terminations=terminations, truncations=truncations))
    with pytest.MonkeyPatch.context() as patch:  # Minari writes into $MINARI_DATASETS_PATH
        patch.setenv("MINARI_DATASETS_PATH", str(path))
        minari.create_dataset_from_buffers(dataset_id, episodes, env=env, eval_env=env.spec, ref_min_score=-20.0,
                                           ref_max_score=3000.0, algorithm_name="random", author="tests",
                                           author_email="tests@example.org", code_permalink="tests",
                                           description="random actions")


def test_contest_on_a_run_of_a_minari_dataset(tmp_path):
    """A run trained on a Minari dataset: the contest reads the same rows from Minari's store; without the dataset in
    the store, one line says so."""
    store, dataset_id = tmp_path / "store", "test/hopper/random-v0"
    hopper_minari_store(store, dataset_id)
    env = {"MINARI_DATASETS_PATH": str(store)}
    run_script("divo_continuous.py", "--env-id", dataset_id, "--hidden-dim", "16", "--num-layers", "1", "--batch-size",
               "32", "--eval-episodes", "1", "--total-timesteps", "4", "--eval-freq", "0", "--log-freq", "2", "--no-cuda",
               "--run-name", "minari", cwd=tmp_path, env=env)
    assert only_run(tmp_path).name == "minari"
    out = run_script("tools/adpo_contest.py", "runs/minari", "--samples", "100", "--margins", "0", "1", cwd=tmp_path,
                     env=env).stdout
    assert "runs/minari (step 4, 100 states)" in out and 0.0 <= printed("generated action wins eq. 12", out) <= 1.0
    assert len(re.findall(r"\n  1\s+[01]\s+[\d.]+", out)) == 2, out
    refused = run_script("tools/adpo_contest.py", "runs/minari", cwd=tmp_path, check=False,
                         env={"MINARI_DATASETS_PATH": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"})
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert refused.stderr.startswith("error: runs/minari was trained on the Minari dataset test/hopper/random-v0, which "
                                     "is not in Minari's local store") and len(refused.stderr.strip().splitlines()) == 1


def test_the_margin_table_printed_for_each_n_and_kappa(trained):
    """--margins and --num-candidates: one row per (N, kappa) in the order given; kappa = 0 with N = 1 is the plain
    contest above it; a larger kappa never lets more samples win; the targets never lose advantage."""
    margins = ["0", "0.5", "1", "2"]
    out = run_script("tools/adpo_contest.py", "runs/divo", "--samples", "300", "--margins", *margins,
                     "--num-candidates", "1", "3", cwd=trained).stdout
    assert "  N  kappa  sample wins  winners both critics back  A(target) - A(data)  RMS target - data" in out
    rows = re.findall(r"\n  (\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(-?[\d.]+)\s+([\d.]+)", out)
    assert [(n, kappa) for n, kappa, *_ in rows] == [(n, k) for n in ("1", "3") for k in margins], out
    wins = {(int(n), float(kappa)): float(w) for n, kappa, w, *_ in rows}
    assert wins[1, 0.0] == printed("generated action wins eq. 12", out)
    for n in (1, 3):
        column = [wins[n, float(k)] for k in margins]
        assert column == sorted(column, reverse=True), (n, column)
    for _, _, w, backed, gain, distance in rows:
        assert 0 <= float(w) <= 1 and 0 <= float(backed) <= 1 and float(gain) >= 0 and float(distance) >= 0


def test_the_margin_table_on_the_trained_critics(trained, monkeypatch):
    """margin_table on the run's own states, as main() draws them: kappa = 0 reproduces the plain contest's win rate
    (eq. 12 itself); every larger kappa lets fewer or as many samples win, and the targets' advantage gain is never
    negative; from kappa = 2 on (N = 1) a sample wins only where both twin critics rate it above the dataset action."""
    monkeypatch.chdir(trained)
    module, agent, payload, path, obs_dim, act_dim = adpo_contest.load_run("runs/divo")
    transitions = module.qlearning_dataset(load_d4rl_file(path, obs_dim, act_dim))
    data = module.to_device(transitions, range(len(transitions["rewards"])), payload["obs_mean"].numpy(),
                            payload["obs_std"].numpy(), torch.device("cpu"))
    s, a = data["observations"], data["actions"].clamp(-1.0, 1.0)
    torch.manual_seed(7)
    with torch.no_grad():
        generated = agent.diffusion.sample(s)
        stats = adpo_contest.contest_stats(agent.critic_target(s, a), agent.critic_target(s, generated))
    rows = adpo_contest.margin_table(module, agent, s, a, MARGINS, [1, 4], seed=7)
    assert [(row["N"], row["kappa"]) for row in rows] == [(n, k) for n in (1, 4) for k in MARGINS]
    plain = rows[0]
    assert plain["generated_wins"] == pytest.approx(stats["generated_wins"], abs=0.5 / len(s))  # the same samples
    assert 0.0 < plain["generated_wins"] < 1.0  # both outcomes occur: the comparisons below mean something
    for n in (1, 4):
        table = [row for row in rows if row["N"] == n]
        wins = [row["generated_wins"] for row in table]
        assert all(later <= earlier for earlier, later in zip(wins, wins[1:])), (n, wins)
        assert wins[-1] < wins[0]  # the margin does bite
        for row in table:
            assert row["advantage_gain"] >= -1e-5 and row["target_distance"] >= 0.0
            if row["kappa"] >= 2.0 and row["generated_wins"] > 0:
                assert row["backed_by_both"] == pytest.approx(1.0), row
        if n == 1:  # one candidate: the winners at kappa > 0 are some of those at kappa = 0, so targets move less
            assert all(later["target_distance"] <= earlier["target_distance"] for earlier, later in zip(table, table[1:]))
