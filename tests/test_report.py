"""tools/report.py on hand-made run folders with known scores: Table I, rliable aggregates, figures, errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.stats import trim_mean

from conftest import ROOT, png_size

sys.path.insert(0, os.path.join(ROOT, "tools"))
import report  # noqa: E402

REPS = 200

# label -> task -> {seed: final normalised score}. "divo" is used by two algorithms (DIVO and its --no-adpo TD3+BC
# backbone), so the report must split it into "divo [divo]" and "divo [td3bc]".
DIVO = {
    "hopper-medium-v2": {4: 0.0, 0: 50.0, 1: 60.0, 2: 70.0, 3: 80.0},  # seed 4 is the 5th seed: left out of the aggregates
    "walker2d-medium-v2": {0: 30.0, 1: 50.0, 2: 70.0},
    "antmaze-umaze-v2": {0: 0.0, 1: 20.0, 2: 40.0, 3: 100.0},
    "hopper-medium-dev": {0: 33.0, 1: 35.0},  # the user's own file: not a Table-I task
}
TD3BC = {
    "hopper-medium-v2": {0: 40.0, 1: 45.0, 2: 50.0, 3: 57.0},
    "antmaze-umaze-v2": {0: 5.0, 1: 10.0, 2: 15.0, 3: 20.0},
    "halfcheetah-medium-v2": {0: 24.0},
}
NUM_FINISHED = sum(len(seeds) for table in (DIVO, TD3BC) for seeds in table.values())


def write_run(root, name, args, scores=None, checkpoint=None):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "args.json").write_text(json.dumps(args))
    if scores is not None:
        (folder / "scores.json").write_text(scores if isinstance(scores, str) else json.dumps(scores))
    if checkpoint is not None:
        torch.save(checkpoint, folder / "checkpoint.pt")
    return folder


def run_args(task, seed, adpo=True, total_timesteps=100):
    """An args.json as the training scripts write it; a task that is not a D4RL id comes from a local file."""
    own_file = task == "hopper-medium-dev"
    return {"exp_name": "divo", "seed": seed, "env_id": "hopper-medium-v2" if own_file else task,
            "dataset_path": f"/data/{task}.hdf5" if own_file else None, "total_timesteps": total_timesteps,
            "adpo": adpo, "pad": True}


def evaluations(final, steps=(50, 100)):
    return [{"step": s, "score": final * s / steps[-1], "score_std": 1.0} for s in steps]


def write_all(root):
    """The runs of DIVO and TD3BC (newer scores.json with task/mode for DIVO, older ones without for TD3BC)."""
    for task, seeds in DIVO.items():
        for seed, score in seeds.items():
            write_run(root, f"{task}__divo__{seed}", run_args(task, seed),
                      {"task": task, "mode": "divo", "seed": seed, "normalized_score_mean": score,
                       "evaluations": evaluations(score)})
    for task, seeds in TD3BC.items():
        for seed, score in seeds.items():
            write_run(root, f"{task}__td3bc__{seed}", run_args(task, seed, adpo=False),
                      {"seed": seed, "normalized_score_mean": score, "evaluations": evaluations(score)})
    # unfinished: killed after a checkpoint at step 30, killed before any checkpoint, a truncated checkpoint
    write_run(root, "hopper-medium-v2__divo__7", run_args("hopper-medium-v2", 7), checkpoint={"step": 30})
    write_run(root, "hopper-medium-v2__divo__8", run_args("hopper-medium-v2", 8))
    broken = write_run(root, "hopper-medium-v2__divo__9", run_args("hopper-medium-v2", 9))
    (broken / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    write_all(root)
    out = tmp_path_factory.mktemp("report")
    runs = report.collect_runs([str(root)])
    written = report.make_report(runs, str(out), reps=REPS, profile_reps=50)
    return {"root": root, "out": out, "runs": runs, "written": written, "table": report.build_table(runs)}


def rows_by_name(table):
    return {row.name: row for row in table.rows}


def test_labels_split_by_mode(result):
    assert result["table"].labels == ["divo [divo]", "divo [td3bc]"]
    modes = {run.label: run.mode for run in result["runs"]}
    assert modes == {"divo [divo]": "divo", "divo [td3bc]": "td3bc"}  # td3bc derived from adpo=false in args.json


def test_rows_in_table_i_order_with_other_block(result):
    names = [row.name for row in result["table"].rows]
    assert names == ["halfcheetah-medium-v2", "hopper-medium-v2", "walker2d-medium-v2", "Gym average",
                     "antmaze-umaze-v2", "AntMaze average", "Total",
                     "hopper-medium-dev", "Other tasks average"]


def test_task_cells_mean_std_and_seed_counts(result):
    rows = rows_by_name(result["table"])
    hopper = rows["hopper-medium-v2"].cells["divo [divo]"]
    assert hopper.n == 5  # the unfinished seeds 7, 8, 9 are not counted
    assert hopper.mean == pytest.approx(52.0)
    assert hopper.std == pytest.approx(np.sqrt(((np.array([0, 50, 60, 70, 80]) - 52) ** 2).mean()))
    antmaze = rows["antmaze-umaze-v2"].cells["divo [td3bc]"]
    assert (antmaze.n, antmaze.mean) == (4, pytest.approx(12.5))
    assert antmaze.std == pytest.approx(np.std([5, 10, 15, 20]))
    assert "divo [divo]" not in rows["halfcheetah-medium-v2"].cells
    assert rows["hopper-medium-dev"].cells["divo [divo]"].mean == pytest.approx(34.0)
    assert "divo [td3bc]" not in rows["hopper-medium-dev"].cells


def test_block_averages(result):
    rows = rows_by_name(result["table"])
    gym = rows["Gym average"].cells
    assert (gym["divo [divo]"].mean, gym["divo [divo]"].n, gym["divo [divo]"].of) == (pytest.approx(51.0), 2, 3)
    assert (gym["divo [td3bc]"].mean, gym["divo [td3bc]"].n) == (pytest.approx(36.0), 2)
    assert rows["AntMaze average"].cells["divo [divo]"].mean == pytest.approx(40.0)
    total = rows["Total"].cells  # Table-I tasks only: the user's hopper-medium-dev is not in it
    assert total["divo [divo]"].mean == pytest.approx((52 + 50 + 40) / 3)
    assert total["divo [td3bc]"].mean == pytest.approx((24 + 48 + 12.5) / 3)
    assert rows["Other tasks average"].cells["divo [divo]"].mean == pytest.approx(34.0)
    assert "divo [td3bc]" not in rows["Other tasks average"].cells


def test_table_md(result):
    text = (result["out"] / "table.md").read_text()
    lines = text.splitlines()
    assert lines[0] == "| Task | divo [divo] | divo [td3bc] |"
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines if line.startswith("| ")}
    assert cells["hopper-medium-v2"] == ["52.0 ± 27.9 (5)", "48.0 ± 6.3 (4)"]
    assert cells["halfcheetah-medium-v2"] == ["–", "24.0 ± 0.0 (1)"]
    assert cells["**Gym average**"] == ["51.0 (2 of 3 tasks)", "36.0 (2 of 3 tasks)"]
    assert cells["**AntMaze average**"] == ["40.0", "12.5"]
    assert cells["**Total**"] == ["47.3 (3 of 4 tasks)", "28.2 (3 of 4 tasks)"]
    assert cells["**Other tasks average**"] == ["34.0", "–"]
    assert "population std" in text
    assert f"The table uses {NUM_FINISHED} finished runs." in text


def test_unfinished_runs_listed_not_used(result):
    unfinished = {run.run_name: run for run in result["runs"] if not run.finished}
    assert set(unfinished) == {"hopper-medium-v2__divo__7", "hopper-medium-v2__divo__8", "hopper-medium-v2__divo__9"}
    assert unfinished["hopper-medium-v2__divo__7"].progress == "step 30 / 100"
    assert unfinished["hopper-medium-v2__divo__8"].progress == "no checkpoint"
    assert unfinished["hopper-medium-v2__divo__9"].progress.startswith("broken checkpoint")
    text = (result["out"] / "table.md").read_text()
    assert "- hopper-medium-v2__divo__7: hopper-medium-v2, divo [divo], step 30 / 100" in text
    assert "- hopper-medium-v2__divo__8: hopper-medium-v2, divo [divo], no checkpoint" in text
    assert "Runs not in the table (unfinished: no scores.json; or as noted): 3" in text


def test_aggregates_match_hand_computation(result):
    agg = json.loads((result["out"] / "aggregate.json").read_text())
    assert agg["reps"] == REPS
    assert agg["tasks"] == ["hopper-medium-v2", "antmaze-umaze-v2"]  # the tasks both labels have, Table-I order
    assert agg["runs_per_task"] == 4
    divo, td3bc = agg["labels"]["divo [divo]"], agg["labels"]["divo [td3bc]"]
    assert divo["seeds"]["hopper-medium-v2"] == [0, 1, 2, 3]  # the first 4 seeds: seed 4 (score 0) is left out
    pooled = [50, 60, 70, 80, 0, 20, 40, 100]
    assert divo["iqm"]["estimate"] == pytest.approx(trim_mean(pooled, 0.25)) == pytest.approx(55.0)
    assert divo["mean"]["estimate"] == pytest.approx((65 + 40) / 2)
    assert divo["median"]["estimate"] == pytest.approx(52.5)  # median of the 2 task means
    assert divo["optimality_gap"]["estimate"] == pytest.approx(np.mean([100 - s for s in pooled]))
    assert td3bc["iqm"]["estimate"] == pytest.approx(trim_mean([40, 45, 50, 57, 5, 10, 15, 20], 0.25))
    assert td3bc["mean"]["estimate"] == pytest.approx((48 + 12.5) / 2)
    for label in (divo, td3bc):
        for key in ("median", "iqm", "mean", "optimality_gap"):
            assert label[key]["ci_low"] <= label[key]["estimate"] <= label[key]["ci_high"]
        assert label["iqm"]["ci_low"] < label["iqm"]["ci_high"]  # real bootstrap intervals, not points


@pytest.mark.parametrize("name", ["aggregate.png", "profiles.png", "curves.png"])
def test_figures_are_pngs(result, name):
    path = result["out"] / name
    assert result["written"][name] == str(path)
    width, height = png_size(path)
    assert width > 100 and height > 100


def test_mean_curve_aligns_on_common_steps():
    def run(history):
        return report.Run(path="", run_name="r", label="a", task="t", mode="divo", seed=0, total_timesteps=30,
                          finished=True, score=0.0, evaluations=[{"step": s, "score": v} for s, v in history])

    steps, mean, std = report.mean_curve([run([(10, 1.0), (20, 2.0), (30, 3.0)]), run([(10, 3.0), (30, 7.0)])])
    assert steps.tolist() == [10, 30]
    assert mean.tolist() == [2.0, 5.0] and std.tolist() == [1.0, 2.0]
    assert report.mean_curve([run([(10, 1.0)]), run([(20, 1.0)])]) is None


def test_malformed_scores_warned_and_skipped(tmp_path, capsys):
    write_run(tmp_path, "good", run_args("hopper-medium-v2", 0), {"normalized_score_mean": 40.0})
    write_run(tmp_path, "not_json", run_args("hopper-medium-v2", 1), "{oops")
    write_run(tmp_path, "no_score", run_args("hopper-medium-v2", 2), {"evaluations": []})
    runs = report.collect_runs([str(tmp_path)])
    err = capsys.readouterr().err
    assert [run.run_name for run in runs] == ["good"]
    assert runs[0].label == "divo" and runs[0].task == "hopper-medium-v2"  # one mode: the plain exp_name
    assert f"warning: {tmp_path / 'not_json' / 'scores.json'}" in err
    assert f"warning: {tmp_path / 'no_score' / 'scores.json'}" in err and "normalized_score_mean" in err


@pytest.mark.parametrize("case", ["missing_folder", "only_unfinished"])
def test_main_errors(tmp_path, capsys, monkeypatch, case):
    if case == "only_unfinished":
        write_run(tmp_path, "killed", run_args("hopper-medium-v2", 0))
        runs_dir = tmp_path
    else:
        runs_dir = tmp_path / "nope"
    monkeypatch.setattr(sys, "argv", ["report.py", str(runs_dir), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        report.main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert ("no finished run" if case == "only_unfinished" else "no such folder") in err
    assert not (tmp_path / "out").exists()


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "report.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_cli_empty_folder_fails_cleanly(tmp_path):
    proc = run_cli(tmp_path, "--out", tmp_path / "out")
    assert proc.returncode != 0
    assert proc.stderr.startswith("error:") and "no finished run" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_cli_writes_report(tmp_path):
    runs = tmp_path / "runs"
    for seed, score in enumerate([30.0, 50.0]):
        write_run(runs, f"run{seed}", run_args("antmaze-umaze-v2", seed),
                  {"normalized_score_mean": score, "evaluations": evaluations(score)})
    out = tmp_path / "out"
    proc = run_cli(runs, "--out", out, "--reps", REPS, "--profile-reps", 20)
    assert proc.returncode == 0, proc.stderr
    assert "| antmaze-umaze-v2 | 40.0 ± 10.0 (2) |" in proc.stdout  # the table goes to stdout too
    for name in ("table.md", "aggregate.json", "aggregate.png", "profiles.png", "curves.png"):
        assert f"wrote {out / name}" in proc.stdout
        assert (out / name).stat().st_size > 0


def test_at_step_scores_runs_of_different_lengths_at_the_same_step(tmp_path):
    """--at-step: the evaluation at that step replaces the final score; a run without one is listed, not used."""
    long = {"seed": 0, "normalized_score_mean": 90.0, "evaluations": evaluations(90.0, steps=(50, 100, 150))}
    short = {"seed": 1, "normalized_score_mean": 40.0, "evaluations": evaluations(40.0, steps=(50, 100))}
    odd = {"seed": 2, "normalized_score_mean": 10.0, "evaluations": evaluations(10.0, steps=(70,))}
    for seed, scores in enumerate((long, short, odd)):
        write_run(tmp_path / "runs", f"hopper-medium-v2__divo__{seed}", run_args("hopper-medium-v2", seed), scores)
    runs = report.score_at_step(report.collect_runs([str(tmp_path / "runs")]), [100])
    assert {r.seed: r.score for r in runs if r.finished} == {0: 60.0, 1: 40.0}  # 90 * 100 / 150, and 40's final
    (left_out,) = [r for r in runs if not r.finished]
    assert left_out.seed == 2 and left_out.progress == "finished, but no evaluation at step 100"
    report.make_report(runs, str(tmp_path / "out"), reps=REPS, profile_reps=20, at_step=[100])
    text = (tmp_path / "out" / "table.md").read_text()
    assert "| hopper-medium-v2 | 50.0 ± 10.0 (2) |" in text and "score at step 100 (its evaluation there" in text
    assert "finished, but no evaluation at step 100" in text


def test_at_several_steps_scores_runs_by_the_mean_of_those_evaluations(tmp_path):
    """--at-step 50 100: the mean of the two evaluations; a run that lacks one of them is listed, not used."""
    two = {"seed": 0, "normalized_score_mean": 90.0, "evaluations": evaluations(90.0, steps=(50, 100, 150))}
    one = {"seed": 1, "normalized_score_mean": 40.0, "evaluations": evaluations(40.0, steps=(100,))}
    for seed, scores in enumerate((two, one)):
        write_run(tmp_path / "runs", f"hopper-medium-v2__divo__{seed}", run_args("hopper-medium-v2", seed), scores)
    runs = report.score_at_step(report.collect_runs([str(tmp_path / "runs")]), [50, 100])
    assert {r.seed: r.score for r in runs if r.finished} == {0: 45.0}  # (30 + 60) / 2
    assert [r.progress for r in runs if not r.finished] == ["finished, but no evaluation at step 50"]
    report.make_report(runs, str(tmp_path / "out"), reps=REPS, profile_reps=20, at_step=[50, 100])
    text = (tmp_path / "out" / "table.md").read_text()
    assert "| hopper-medium-v2 | 45.0 ± 0.0 (1) |" in text and "averaged over its evaluations at steps 50, 100" in text


def test_a_label_is_split_by_mode_only_among_finished_runs_and_pretraining_runs_are_left_out(tmp_path):
    write_run(tmp_path, "divo0", run_args("hopper-medium-v2", 0), {"normalized_score_mean": 40.0})
    write_run(tmp_path, "backbone1", run_args("hopper-medium-v2", 1, adpo=False))  # unfinished, another mode
    write_run(tmp_path, "pad", {"exp_name": "divo", "seed": 0, "env_id": "hopper-medium-v2", "script": "pad_pretrain"})
    runs = report.collect_runs([str(tmp_path)])
    assert sorted((run.run_name, run.label, run.finished) for run in runs) == [("backbone1", "divo", False),
                                                                              ("divo0", "divo", True)]


@pytest.mark.parametrize("args, message", [
    (["--reps", "0"], "--reps and --profile-reps must be at least 1, got 0 and 1000"),
    (["--profile-reps", "0"], "got 2000 and 0"),
    (["--at-step"], "--at-step needs one or more steps >= 0, got none"),
    (["--at-step", "-5"], "--at-step needs one or more steps >= 0, got -5"),
    (["--out", "{runs}/run0/args.json/report"], "args.json is a file, not a folder"),
    (["--versus", "td3bc"], "--versus td3bc: no finished run has that label; the labels are divo"),
])
def test_bad_arguments_are_one_error_line_before_any_file(tmp_path, capsys, monkeypatch, args, message):
    runs = tmp_path / "runs"
    write_run(runs, "run0", run_args("hopper-medium-v2", 0), {"normalized_score_mean": 30.0, "evaluations": evaluations(30)})
    args = [arg.replace("{runs}", str(runs)) for arg in args]
    monkeypatch.setattr(sys, "argv", ["report.py", str(runs), *(["--out", str(tmp_path / "out")] * ("--out" not in args)),
                                      *args])
    with pytest.raises(SystemExit) as exit_info:
        report.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.startswith("error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    assert sorted(os.listdir(runs / "run0")) == ["args.json", "scores.json"]


def test_versus_names_each_difference_with_its_interval_and_verdict(tmp_path):
    """--versus td3bc: task A is beaten by far, task B is a tie, task C has too few runs for a verdict; each cell's mean,
    IQM and difference by hand, and the overall IQM difference and probability of improvement, over the tasks each
    label shares with td3bc (a pilot run on task A only does not shrink divo's)."""
    cells = {("td3bc", "A"): [10, 20, 30, 40], ("divo", "A"): [50, 60, 70, 80], ("pilot", "A"): [0, 5, 10, 15],
             ("td3bc", "B"): [10, 30, 50, 70], ("divo", "B"): [15, 25, 55, 65],
             ("td3bc", "C"): [10, 20, 30], ("divo", "C"): [90, 95]}
    for (label, task), scores in cells.items():
        for seed, score in enumerate(scores):
            args = {"exp_name": label, "seed": seed, "env_id": "hopper-medium-v2", "dataset_path": f"/d/{task}.hdf5",
                    "total_timesteps": 100, "adpo": label != "td3bc", "pad": True}
            write_run(tmp_path / "runs", f"{task}__{label}__{seed}", args, {"normalized_score_mean": score})
    runs = report.collect_runs([str(tmp_path / "runs")])
    written = report.make_report(runs, str(tmp_path / "out"), reps=REPS, profile_reps=20, versus="td3bc")
    result = json.loads((tmp_path / "out" / "versus.json").read_text())
    found = {(row["task"], cell["label"]): cell for row in result["tasks"] for cell in row["cells"]}
    a, b, c = found["A", "divo"], found["B", "divo"], found["C", "divo"]
    assert a["difference"][0] == pytest.approx(40.0) and a["difference"][1] > 0 and a["verdict"] == "beats"
    assert b["difference"][0] == pytest.approx(0.0) and b["difference"][1] < 0 < b["difference"][2]
    assert b["verdict"] == "ties" and c["verdict"] == "(fewer than 3 runs)"
    assert found["A", "td3bc"]["mean"] == 25.0 and a["iqm"][0] == pytest.approx(trim_mean([50, 60, 70, 80], 0.25))
    assert a["iqm"][1] <= a["iqm"][0] <= a["iqm"][2] and "difference" not in found["A", "td3bc"]
    entry, pilot = result["overall"]["labels"]["divo"], result["overall"]["labels"]["pilot"]
    assert entry["tasks"] == ["A", "B", "C"] and entry["runs_per_task"] == 2  # C's divo has 2 runs
    assert pilot["tasks"] == ["A"] and pilot["runs_per_task"] == 4 and pilot["verdict"] == "trails"
    assert pilot["iqm_difference"][0] == pytest.approx(trim_mean([0, 5, 10, 15], 0.25) - trim_mean([10, 20, 30, 40], 0.25))
    # IQM over the first two runs of each cell: divo (50, 60, 15, 25, 90, 95), td3bc (10, 20, 10, 30, 10, 20)
    expected = trim_mean([50, 60, 15, 25, 90, 95], 0.25) - trim_mean([10, 20, 10, 30, 10, 20], 0.25)
    assert entry["iqm_difference"][0] == pytest.approx(expected) and entry["verdict"] == "(fewer than 3 runs)"
    assert 0.5 < entry["probability_of_improvement"][0] <= 1.0
    text = (tmp_path / "out" / "versus.md").read_text()
    assert "| A | divo | 4 | 65.0 ± 11.2 |" in text and "+40.0 [" in text and "| beats |" in text and "versus.md" in written
    assert "| divo | 3 | 2 | " in text and "| pilot | 1 | 4 | " in text


def test_every_interval_is_the_same_on_a_rerun_and_the_global_numpy_generator_is_left_alone(tmp_path):
    """rliable draws its resampling indices from numpy's global generator whatever random_state says: the report seeds
    it per call, so the same runs give the same intervals in every process, whatever state numpy was left in, and
    numpy's state after a report is what it was before."""
    rng = np.random.default_rng(1)
    cells = {(label, task): rng.uniform(0, 100, 5) for label in ("td3bc", "divo") for task in ("A", "B")}
    for (label, task), scores in cells.items():
        for seed, score in enumerate(scores):
            args = {"exp_name": label, "seed": seed, "env_id": "hopper-medium-v2", "dataset_path": f"/d/{task}.hdf5",
                    "total_timesteps": 100, "adpo": label != "td3bc", "pad": True}
            write_run(tmp_path / "runs", f"{task}__{label}__{seed}", args, {"normalized_score_mean": float(score)})
    runs = report.collect_runs([str(tmp_path / "runs")])
    score_dict = report.aggregate_inputs(runs)[0]
    outcomes = []
    for global_seed in (0, 1):
        np.random.seed(global_seed)
        before = np.random.get_state()[1].copy()
        outcomes.append((json.dumps(report.compare_labels(runs, "td3bc", REPS), default=float),
                         [np.asarray(x).tolist() for x in report.compute_aggregates(score_dict, REPS)[1].values()]))
        assert (np.random.get_state()[1] == before).all()
    assert outcomes[0] == outcomes[1]
    # and the seed matters: another seed gives other intervals (the bootstrap is not degenerate here)
    assert json.dumps(report.compare_labels(runs, "td3bc", REPS, seed=1), default=float) != outcomes[0][0]


def test_the_file_names_it_reads_are_those_the_divo_scripts_write():
    """report.py reads args.json, scores.json (a finished run) and checkpoint.pt (an unfinished one's step) by name: they
    are the names divo_utils gives the DIVO scripts' files; pretraining's are others (and its runs are left out)."""
    from divo_utils import DIVO_FILES, PAD_FILES

    assert DIVO_FILES == ("checkpoint.pt", "scores.json")
    assert "scores.json" not in PAD_FILES and "checkpoint.pt" not in PAD_FILES


def test_a_seed_run_twice_is_one_seed_the_latest_finished(tmp_path, capsys):
    """Two finished runs of one (task, label, seed) (a rerun, a copied folder) are one seed: the later finished one is in
    the cell, the other is listed with the reason, and a warning names both."""
    runs_dir = tmp_path / "runs"
    for name, seed, score, finished_at in [("first", 0, 10.0, 1000), ("rerun", 0, 30.0, 2000), ("other", 1, 50.0, 1500)]:
        folder = write_run(runs_dir, name, run_args("hopper-medium-v2", seed), {"seed": seed, "normalized_score_mean": score})
        os.utime(folder / "scores.json", (finished_at, finished_at))
    runs = report.collect_runs([str(runs_dir)])
    err = capsys.readouterr().err
    cell = rows_by_name(report.build_table(runs))["hopper-medium-v2"].cells["divo"]
    assert (cell.n, cell.mean) == (2, pytest.approx(40.0))  # seeds 0 (the rerun's 30) and 1, not 3 "seeds"
    assert "first" in err and "rerun" in err and "seed 0" in err
    report.make_report(runs, str(tmp_path / "out"), reps=REPS, profile_reps=20)
    text = (tmp_path / "out" / "table.md").read_text()
    assert "| hopper-medium-v2 | 40.0 ± 10.0 (2) |" in text
    left_out = "- first: hopper-medium-v2, divo, finished, but seed 0 again: rerun (finished later) is the one in the table"
    assert left_out in text


def test_a_cell_holds_runs_of_one_length(tmp_path, capsys):
    """Scored by the last policy, runs of 100 and 200 steps are not pooled: the length with the most seeds stays (ties: the
    longer), the others are listed with the reason. With --at-step every run is scored at the same step: all stay."""
    runs_dir = tmp_path / "runs"
    cells = {"hopper-medium-v2": [(0, 100, 10.0), (1, 100, 20.0), (2, 100, 30.0), (3, 200, 90.0)],  # 100 has most seeds
             "walker2d-medium-v2": [(0, 100, 10.0), (1, 200, 60.0), (2, 200, 80.0), (3, 100, 30.0)]}  # a tie: 200 stays
    for task, cell in cells.items():
        for seed, length, score in cell:
            write_run(runs_dir, f"{task}__divo__{seed}", run_args(task, seed, total_timesteps=length),
                      {"seed": seed, "step": length, "normalized_score_mean": score,
                       "evaluations": evaluations(score, steps=(50, length))})
    runs = report.collect_runs([str(runs_dir)])
    err = capsys.readouterr().err
    rows = rows_by_name(report.build_table(runs))
    hopper, walker = rows["hopper-medium-v2"].cells["divo"], rows["walker2d-medium-v2"].cells["divo"]
    assert (hopper.n, hopper.mean) == (3, pytest.approx(20.0)) and (walker.n, walker.mean) == (2, pytest.approx(70.0))
    assert "hopper-medium-v2__divo__3" in err and "different lengths" in err and "--at-step" in err
    left_out = {r.run_name: r.progress for r in runs if not r.finished}
    assert set(left_out) == {"hopper-medium-v2__divo__3", "walker2d-medium-v2__divo__0", "walker2d-medium-v2__divo__3"}
    assert left_out["hopper-medium-v2__divo__3"].startswith("finished, but 200 steps: the cell holds its runs of 100")
    at_step = report.collect_runs([str(runs_dir)], at_step=[50])  # every run scored at step 50: lengths do not matter
    assert sum(r.finished for r in at_step) == 8
    assert rows_by_name(report.build_table(at_step))["hopper-medium-v2"].cells["divo"].n == 4


def test_your_own_file_named_like_a_d4rl_dataset_is_not_d4rl(tmp_path):
    """--dataset-path my/hopper-medium-v2.hdf5: the user's data, whatever the file's name: not in Table I's D4RL row, nor
    in the Gym average or Total, but in the other tasks under its file's name."""
    runs_dir = tmp_path / "runs"
    write_run(runs_dir, "d4rl", run_args("hopper-medium-v2", 0), {"normalized_score_mean": 50.0})
    for seed, path, score in [(1, "/home/me/my/hopper-medium-v2.hdf5", 90.0), (2, "hopper-medium-v2.hdf5", 70.0)]:
        args = {**run_args("hopper-medium-v2", seed), "dataset_path": path}  # absolute (new runs) or a file name (results/)
        write_run(runs_dir, f"mine{seed}", args, {"task": "hopper-medium-v2", "normalized_score_mean": score})
    runs = report.collect_runs([str(runs_dir)])
    table = report.build_table(runs)
    assert [row.name for row in table.rows] == ["hopper-medium-v2", "Gym average", "Total",
                                                "hopper-medium-v2.hdf5", "Other tasks average"]
    rows = rows_by_name(table)
    assert (rows["hopper-medium-v2"].cells["divo"].n, rows["hopper-medium-v2"].cells["divo"].mean) == (1, 50.0)
    assert rows["Total"].cells["divo"].mean == 50.0 and rows["Gym average"].cells["divo"].mean == 50.0
    assert rows["hopper-medium-v2.hdf5"].cells["divo"].mean == pytest.approx(80.0)
    assert report.aggregate_inputs(runs)[1] == ["hopper-medium-v2", "hopper-medium-v2.hdf5"]


def test_returns_have_a_table_and_a_caption_of_their_own(tmp_path):
    """A Minari dataset scored by its return is not under the caption of normalised scores: it has its own heading."""
    runs_dir = tmp_path / "runs"
    write_run(runs_dir, "d4rl", run_args("hopper-medium-v2", 0), {"normalized_score_mean": 50.0})
    args = {"exp_name": "divo", "seed": 0, "env_id": "test/hopper/unscored-v0", "dataset_path": None}
    write_run(runs_dir, "minari", args, {"task": "test/hopper/unscored-v0", "metric": "return", "return_mean": 1234.5})
    runs = report.collect_runs([str(runs_dir)])
    report.make_report(runs, str(tmp_path / "out"), reps=REPS, profile_reps=20)
    lines = (tmp_path / "out" / "table.md").read_text().splitlines()
    main_table = lines[:lines.index("")]
    assert "| hopper-medium-v2 | 50.0 ± 0.0 (1) |" in main_table
    assert not any("unscored" in line for line in main_table)
    heading = lines.index(f"### {report.RETURN_BLOCK}: returns, not normalised scores")
    row = lines.index("| test/hopper/unscored-v0 | 1234.5 ± 0.0 (1) |")
    assert heading < row and lines[heading + 2] == "| Task | divo |"
    caption = next(line for line in lines[row:] if line.startswith("Cells:"))
    assert "return" in caption and "normalised score" not in caption.split(";")[0]
