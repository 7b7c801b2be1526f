"""tools/adpo_contest.py: the contest of eq. 12 measured on a trained run, and the arithmetic behind it."""

import os
import re
import shutil
import sys

import pytest
import torch

from conftest import run_script, write_d4rl_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import adpo_contest  # noqa: E402


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


def test_contest_on_a_tiny_run_and_refusals(tmp_path, monkeypatch, capsys):
    write_d4rl_file(tmp_path / "d.hdf5", episode_lengths=(120, 90, 150, 140), terminal_episodes=(1,))
    tiny = ["--env-id", "hopper-medium-v2", "--dataset-path", tmp_path / "d.hdf5", "--hidden-dim", "32", "--num-layers",
            "2", "--batch-size", "64", "--eval-episodes", "1", "--no-legacy-inertia", "--total-timesteps", "40",
            "--eval-freq", "40", "--no-cuda"]
    run_script("divo_continuous.py", *tiny, "--run-name", "divo", cwd=tmp_path)
    out = run_script("tools/adpo_contest.py", "runs/divo", "--samples", "300", cwd=tmp_path).stdout
    assert "runs/divo (step 40, 300 states)" in out
    for line in ("generated action wins eq. 12", "twin critics agree on the winner", "both critics prefer the generated"):
        value = float(re.search(re.escape(line) + r"\s+([\d.]+)", out)[1])
        assert 0.0 <= value <= 1.0, line
    run_script("divo_continuous.py", *tiny, "--run-name", "backbone", "--no-adpo", cwd=tmp_path)
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
