"""Table I, rliable statistics and evaluation curves from finished training runs.

Every run of divo_continuous.py / divo_antmaze.py writes `runs/{run_name}/` with `args.json` (at the start) and
`scores.json` (last, when every file of the run is final); pad_pretrain.py's runs have no score and are left out.
This script groups the runs by a label (the `exp_name` by default) and by task, treats the seeds of one (label, task)
as independent runs (one run per seed and, scored by the last policy, one length per cell: the others are listed, see
select_runs), and writes into `--out`:

    table.md        the paper's Table I layout: mean ± std over seeds per task, block averages, unfinished runs
    aggregate.json  median, IQM, mean and optimality gap with 95% stratified bootstrap CIs (rliable)
    aggregate.png   the same as interval plots
    profiles.png    performance profiles (fraction of runs above each score) with CIs (rliable)
    curves.png      evaluation curves per task, mean ± std over seeds

Run:
    python tools/report.py                                  # runs/ -> report/ (ignored by git)
    python tools/report.py runs/sweep_a runs/sweep_b --out report/ab --reps 2000
    python tools/report.py runs/ --label-key mode           # one column per algorithm variant

From Python (e.g. at the end of a sweep):
    from report import collect_runs, make_report
    make_report(collect_runs(["runs/sweep_a"]), "report/sweep_a")
"""

import contextlib
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import tyro  # noqa: E402
from rliable import library as rly  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # divo_utils (its package: no torch)
from divo_utils import ANTMAZE_IDS, DIVO_FILES, LOCOMOTION_IDS, flag, is_minari_id, run_mode, task_name  # noqa: E402
from divo_utils.files import read_json as read_json_file, remove  # noqa: E402
from rliable import metrics, plot_utils  # noqa: E402
from sweep import out_problem  # noqa: E402  (the checks of an --out; sweep.py imports no Ray until a sweep starts)


@dataclass
class Args:
    runs_dirs: tyro.conf.Positional[list[str]] = field(default_factory=lambda: ["runs/"])
    """folders that hold run folders (or run folders themselves); a run folder is one with an `args.json`"""
    out: str = "report/"
    """the folder to write table.md, aggregate.json and the figures into (created if needed)"""
    label_key: str = "exp_name"
    """the args.json key whose value names a table column; the runs of one label and task are its seeds"""
    reps: int = 2000
    """bootstrap replications for the confidence intervals of the aggregate metrics (about 0.4 s per 1000 and label)"""
    profile_reps: int = 1000
    """bootstrap replications for the confidence bands of the performance profiles (slower per replication)"""
    at_step: Optional[list[int]] = None
    """score each run by its evaluation at this gradient step (from its history) instead of its last policy; with
    several steps, by the mean of its evaluations at them (an early-training window, less noisy than one)"""
    versus: Optional[str] = None
    """compare every other label with this one (e.g. td3bc): per task and over all tasks, the difference with its 95%
    bootstrap interval and a verdict (beats, ties, trails); written to versus.md and versus.json"""


# The rows of the paper's Table I, in the order of the standard D4RL tables.
TABLE_I_BLOCKS: list[tuple[str, list[str]]] = [
    ("Gym", [
        "halfcheetah-medium-v2", "hopper-medium-v2", "walker2d-medium-v2",
        "halfcheetah-medium-replay-v2", "hopper-medium-replay-v2", "walker2d-medium-replay-v2",
        "halfcheetah-medium-expert-v2", "hopper-medium-expert-v2", "walker2d-medium-expert-v2",
    ]),
    ("AntMaze", list(ANTMAZE_IDS)),
]
CHECKPOINT, SCORES = DIVO_FILES  # a DIVO run's checkpoint and the file it writes last
TABLE_I_TASKS: list[str] = [task for _, tasks in TABLE_I_BLOCKS for task in tasks]
MINARI_BLOCK, RETURN_BLOCK = "Minari", "Minari, return"  # Minari ids hold a "/"; RETURN_BLOCK: no reference returns
OTHER_BLOCK = "Other tasks"
METRIC_NAMES = ["Median", "IQM", "Mean", "Optimality Gap"]
METRIC_KEYS = ["median", "iqm", "mean", "optimality_gap"]


class ReportError(Exception):
    """A problem the user has to fix (no runs, no folder); main() prints it as one `error: ` line."""


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Reading run folders
# ----------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One training run: its identity, and its final score when it finished."""

    path: str
    run_name: str
    label: str
    task: str
    mode: str
    seed: Optional[int]
    total_timesteps: Optional[int]
    finished: bool
    score: Optional[float] = None
    """`normalized_score_mean` of scores.json: the last policy's mean over its evaluation episodes"""
    evaluations: list[dict] = field(default_factory=list)
    """the evaluation history [{"step", "score", ...}] of a finished run"""
    progress: str = ""
    """for an unfinished run: "step S / T" of its last checkpoint, "no checkpoint" or "broken checkpoint (...)" """
    metric: str = "normalized_score"
    """what `score` is: a normalised score, or ("return") the return of a Minari dataset without reference returns"""
    length: Optional[int] = None
    """the gradient step of the policy its final score is of: scores.json's `step` (older runs: --total-timesteps)"""
    finished_at: float = 0.0
    """when it finished: the modification time of its scores.json"""
    dataset_path: Optional[str] = None
    """the local file it learnt from (args.json's --dataset-path), None for D4RL's downloaded data and Minari's"""
    args: dict = field(default_factory=dict)
    """its args.json"""


def check_args(args: Args) -> None:
    """Stop with one message for arguments that cannot make a report, before any run is read."""
    if args.reps < 1 or args.profile_reps < 1:
        raise ReportError(f"--reps and --profile-reps must be at least 1, got {args.reps} and {args.profile_reps}")
    if args.versus is not None and not args.versus:
        raise ReportError("--versus needs the label to compare with, e.g. --versus td3bc")
    if args.at_step is not None and (not args.at_step or min(args.at_step) < 0):
        raise ReportError(f"--at-step needs one or more steps >= 0, got {' '.join(map(str, args.at_step)) or 'none'}")
    problem = out_problem(args.out, args.out)  # a read-only folder, /proc, a run's folder: refused now, not after the work
    if problem:
        raise ReportError(problem)


def find_run_folders(dirs: list[str]) -> list[str]:
    """Run folders (with an args.json) among `dirs` and their direct subfolders, each once."""
    existing = [d for d in dirs if os.path.isdir(d)]
    for d in dirs:
        if os.path.isfile(d):
            raise ReportError(f"{d} is a file, not a folder: pass the folder that holds your runs (or a run's folder, "
                              f"{os.path.dirname(d) or '.'})")
    if not existing:
        raise ReportError(f"no such folder: {', '.join(dirs)}: train first (runs go to runs/), "
                          "or pass the folder that holds your runs")
    for d in dirs:
        if d not in existing:
            warn(f"no such folder: {d} (skipped)")
    folders: list[str] = []
    seen: set[str] = set()  # the same folder given twice (or as a run and as its parent) counts once
    def results(folder: str) -> list[str]:
        return [name for name in (SCORES, CHECKPOINT) if os.path.isfile(os.path.join(folder, name))]

    for d in existing:
        if os.path.isfile(os.path.join(d, "args.json")) or results(d):
            candidates = [d]
        else:
            candidates = [os.path.join(d, name) for name in sorted(os.listdir(d))]
        for folder in candidates:
            if not os.path.isfile(os.path.join(folder, "args.json")):
                if results(folder):  # a run's folder whose args.json (its label, task, seed) is gone
                    warn(f"{folder} has {' and '.join(results(folder))} but no args.json, which names the run's label, "
                         "task and seed: left out of the report; copy its args.json back to include it")
            elif os.path.realpath(folder) not in seen:
                seen.add(os.path.realpath(folder))
                folders.append(folder)
    return folders


SKIPPED: list[str] = []  # the run folders collect_runs skipped with a warning (a file it could not read)


def read_json(path: str) -> Optional[dict]:
    """The JSON object in `path`, or None with a warning when it is not valid JSON or not an object."""
    content, problem = read_json_file(path)
    if problem:
        warn(f"{problem}; run skipped")
        SKIPPED.append(os.path.dirname(path))
    return content


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def score_key(scores: dict) -> str:
    """The scores.json key of a run's score: its normalised score, or its return where it says "metric": "return"."""
    return "return_mean" if scores.get("metric") == "return" else "normalized_score_mean"


def check_scores(scores: dict) -> Optional[str]:
    """What is wrong with a scores.json, or None when it is usable."""
    key = score_key(scores)
    if key not in scores:
        return f"has no {key!r}"
    if not is_number(scores[key]):
        return f"{key!r} is {scores[key]!r}, not a finite number"
    evaluations = scores.get("evaluations", [])
    if not isinstance(evaluations, list) or not all(
            isinstance(e, dict) and is_number(e.get("step")) and is_number(e.get("score")) for e in evaluations):
        return "has an 'evaluations' entry that is not {'step': number, 'score': number, ...}"
    return None


D4RL_IDS = frozenset(LOCOMOTION_IDS + ANTMAZE_IDS)  # the D4RL datasets a run can download


def own_data_name(task: str, dataset_path: str) -> str:
    """The name of a run's task on the user's own file (`dataset_path`): the user's data are never D4RL's, so a file
    named like a D4RL dataset (my/hopper-medium-v2.hdf5) is a task of its own under its file's name
    (hopper-medium-v2.hdf5), outside Table I, not a D4RL id; other files keep their stem (`task`)."""
    if task not in D4RL_IDS:
        return task
    name = os.path.basename(dataset_path)
    return name if name != task else f"{name} (your file)"


def name_files_apart(runs: list[Run]) -> None:
    """Runs on different files of one name (a/mydata.hdf5, b/mydata.hdf5) learnt other tasks: each task gets as much
    of its file's path as tells them apart, `mydata (a/mydata.hdf5)`. A path stored as typed (a file name, by runs made
    before paths were stored absolute) does not say where its file was: its runs keep the task's name."""
    files: dict[str, set[str]] = {}
    for run in runs:
        if run.dataset_path and os.path.isabs(run.dataset_path):
            files.setdefault(run.task, set()).add(os.path.normpath(run.dataset_path))
    for task, paths in files.items():
        if len(paths) < 2:
            continue
        parts = {path: path.split(os.sep) for path in paths}
        depth = next(k for k in range(1, max(map(len, parts.values())) + 1)
                     if len({os.sep.join(p[-k:]) for p in parts.values()}) == len(paths))
        names = {path: f"{task} ({os.sep.join(p[-depth:])})" for path, p in parts.items()}
        warn(f"{len(paths)} different files make the task {task} ({', '.join(sorted(paths))}): not pooled, each is a "
             f"task of its own: {', '.join(sorted(names.values()))}")
        for run in runs:
            if run.task == task and run.dataset_path and os.path.isabs(run.dataset_path):
                run.task = names[os.path.normpath(run.dataset_path)]


def checkpoint_progress(folder: str, total_timesteps: Optional[int]) -> str:
    """How far an unfinished run got, from the step of its checkpoint.pt."""
    path = os.path.join(folder, CHECKPOINT)
    if not os.path.isfile(path):
        return "no checkpoint"
    import torch  # only needed for unfinished runs with a checkpoint; slow to import

    try:
        step = int(torch.load(path, map_location="cpu", weights_only=True)["step"])
    except Exception as e:  # a truncated file, another format, no "step": all mean the same to the reader
        return f"broken checkpoint ({type(e).__name__})"
    total = f"{total_timesteps:,}" if total_timesteps else "?"
    return f"step {step:,} / {total}"


def read_run(folder: str, label_key: str) -> Optional[Run]:
    """The run in `folder`, or None (with a warning) when its args.json or scores.json is malformed."""
    args = read_json(os.path.join(folder, "args.json"))
    if args is None or args.get("script") == "pad_pretrain":  # a pretrained PAD model has no score
        return None
    scores_path = os.path.join(folder, SCORES)
    scores: dict = {}
    if os.path.isfile(scores_path):
        scores = read_json(scores_path)
        if scores is None:
            return None
        problem = check_scores(scores)
        if problem:
            warn(f"{scores_path} {problem}; run skipped")
            SKIPPED.append(folder)
            return None
    if label_key in args:
        label = str(args[label_key])
    elif label_key in scores:
        label = str(scores[label_key])
    else:
        label = f"(no {label_key})"
        warn(f"{os.path.join(folder, 'args.json')} has no '{label_key}'; its run is labelled {label}")
    run_name = scores.get("run_name", args.get("run_name", os.path.basename(folder)))
    task = str(scores.get("task", task_name(args)))
    dataset_path = str(args["dataset_path"]) if args.get("dataset_path") else None  # null: D4RL's download, Minari
    if dataset_path:  # a local file
        task = own_data_name(task, dataset_path)
    mode = scores.get("mode", args.get("mode", run_mode(args)))
    seed = scores.get("seed", args.get("seed"))
    total_timesteps = args.get("total_timesteps")
    run = Run(path=folder, run_name=str(run_name), label=label, task=task, mode=str(mode),
              seed=seed if isinstance(seed, int) else None,
              total_timesteps=total_timesteps if isinstance(total_timesteps, int) else None,
              finished=os.path.isfile(scores_path), dataset_path=dataset_path, args=args)
    if run.finished:
        run.score, run.metric = float(scores[score_key(scores)]), scores.get("metric", run.metric)
        run.evaluations = scores.get("evaluations", [])
        step = scores.get("step")
        run.length = step if isinstance(step, int) and not isinstance(step, bool) else run.total_timesteps
        run.finished_at = os.path.getmtime(scores_path)
    else:
        run.progress = checkpoint_progress(folder, run.total_timesteps)
    return run


def score_at_step(runs: list[Run], steps: list[int]) -> list[Run]:
    """Score each finished run by the mean of its evaluations at `steps` (its history), not its last policy's.

    Training up to a step does not depend on the total length, so this compares runs of different lengths at
    the same point. A run that lacks an evaluation at one of `steps` leaves the table, with the reason listed; when
    that leaves no run, stop with the steps the runs were evaluated at."""
    finished = [run for run in runs if run.finished]
    for run in finished:
        found = {e["step"]: e["score"] for e in run.evaluations}
        missing = [step for step in steps if step not in found]
        if missing:
            run.finished, run.progress = False, f"finished, but no evaluation at step {missing[0]:,}"
        else:
            run.score = float(np.mean([found[step] for step in steps]))
    if finished and not any(run.finished for run in finished):
        evaluated = sorted({e["step"] for run in finished for e in run.evaluations})
        shown = ", ".join(f"{step:,}" for step in evaluated[:10]) + (f", ... {evaluated[-1]:,}" if len(evaluated) > 10
                                                                     else "")
        raise ReportError(f"--at-step {' '.join(map(str, steps))}: no finished run has an evaluation at "
                          f"{'that step' if len(steps) == 1 else 'all of those steps'}; "
                          + (f"they were evaluated at steps {shown}: pass some of those" if evaluated else
                             "they have no evaluation history (--eval-freq 0): leave out --at-step"))
    return runs


def split_labels_by_mode(runs: list[Run]) -> None:
    """Runs that share a label but whose finished runs are different algorithms get the mode appended: `divo [td3bc]`."""
    modes: dict[str, set[str]] = {run.label: set() for run in runs}
    for run in runs:
        if run.finished:
            modes[run.label].add(run.mode)
    for run in runs:
        if len(modes[run.label]) > 1:
            run.label = f"{run.label} [{run.mode}]"


def steps(length: Optional[int]) -> str:
    return "an unknown number of steps" if length is None else f"{length:,} step{'s' * (length != 1)}"


def leave_out(run: Run, reason: str) -> None:
    """Take a finished run out of the table; table.md lists it with `reason`."""
    run.finished, run.progress = False, f"finished, but {reason}"


def select_runs(runs: list[Run], at_step: Optional[list[int]] = None) -> list[Run]:
    """Make each cell (label, task) one run per seed, of one length; leave the other runs out, each with its reason
    (listed in table.md) and a warning. Nothing is pooled silently:

    - runs scored by their last policy (no `at_step`) are of one length: the length (scores.json's `step`) with the
      most seeds stays, ties to the longer; with `at_step` every run is scored at the same steps, and training up to a
      step does not depend on --total-timesteps, so runs of any length share a cell;
    - one run per seed (a rerun, a copied folder): the last to finish (scores.json's time, then the run name) stays."""
    for (label, task), cell in group_runs(runs).items():
        where = f"{label} on {task}"
        if not at_step:
            seeds_of: dict[Optional[int], set] = {}
            for run in cell:
                seeds_of.setdefault(run.length, set()).add(run.seed)
            if len(seeds_of) > 1:
                kept = max(seeds_of, key=lambda n: (len(seeds_of[n]), -1 if n is None else n))
                others = [run for run in cell if run.length != kept]
                for run in others:
                    leave_out(run, f"{steps(run.length)}: the cell holds its runs of {steps(kept)} (one length per cell)")
                cell = [run for run in cell if run.length == kept]
                found = ", ".join(f"{steps(n)}: {len(s)} seed{'s' * (len(s) != 1)}" for n, s in seeds_of.items())
                warn(f"{where}: runs of different lengths ({found}); kept those of {steps(kept)} (the most seeds, ties "
                     f"to the longer), left out {', '.join(run.run_name for run in others)}: pass only the folders of "
                     "one length, or score every run at the same step with --at-step")
        by_seed: dict[Optional[int], list[Run]] = {}
        for run in cell:
            by_seed.setdefault(run.seed, []).append(run)
        for seed, same in by_seed.items():
            if len(same) > 1:
                *others, kept_run = sorted(same, key=lambda r: (r.finished_at, r.run_name, r.path))
                seed_words = "an unknown seed" if seed is None else f"seed {seed}"
                for run in others:
                    leave_out(run, f"{seed_words} again: {kept_run.run_name} (finished later) is the one in the table")
                warn(f"{where}: {len(same)} finished runs of {seed_words} (a rerun or a copied folder) count as one seed: "
                     f"kept {kept_run.run_name} (finished last), left out {', '.join(run.run_name for run in others)}")
    return runs


def warn_mixed_arguments(runs: list[Run]) -> None:
    """Warn of each cell whose runs were trained with different arguments (those that change the training: not the
    seed or the names, nor what a resume may change, RESUME_FREE_ARGS): they are pooled as its seeds all the same."""
    for (label, task), cell in group_runs(runs).items():
        values: dict[str, dict[str, list[str]]] = {}  # argument -> its value (as JSON) -> the runs
        for run in cell:
            for name in run.args.keys() - {"seed", "run_name", "exp_name"}:
                values.setdefault(name, {}).setdefault(json.dumps(run.args[name], sort_keys=True), []).append(run.run_name)
        mixed = {name: found for name, found in values.items()
                 if len(found) > 1 or sum(map(len, found.values())) < len(cell)}  # or absent from some runs' args.json
        if mixed:
            from divo_utils.resume import RESUME_FREE_ARGS  # imports torch: only once some argument differs

            mixed = {name: found for name, found in mixed.items() if name not in RESUME_FREE_ARGS}
        if mixed:
            what = "; ".join(f"{flag(name)} " + ", ".join(f"{value} ({', '.join(names)})" for value, names in found.items())
                             for name, found in sorted(mixed.items()))
            warn(f"{label} on {task}: its runs were trained with different arguments ({what}), and are pooled as the "
                 "seeds of one cell: give runs of other arguments another --exp-name, or pass only the folders of one")


def collect_runs(dirs: list[str], label_key: str = "exp_name", at_step: Optional[list[int]] = None) -> list[Run]:
    """All runs (finished or not) under `dirs`, labelled by args.json's `label_key` (split by mode when mixed), scored
    at `at_step` if given, with each cell made one run per seed of one length (select_runs: the others are listed)."""
    runs = []
    SKIPPED.clear()
    for folder in find_run_folders(dirs):
        run = read_run(folder, label_key)
        if run is not None:
            runs.append(run)
    name_files_apart(runs)
    split_labels_by_mode(runs)
    if at_step:
        score_at_step(runs, at_step)
    select_runs(runs, at_step)
    warn_mixed_arguments(runs)
    return runs


def group_runs(runs: list[Run]) -> dict[tuple[str, str], list[Run]]:
    """The finished runs of each (label, task), sorted by seed: the independent runs of one table cell."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        if run.finished:
            groups.setdefault((run.label, run.task), []).append(run)
    for cell in groups.values():
        cell.sort(key=lambda r: (r.seed is None, r.seed or 0, r.run_name))
    return groups


def ordered_tasks(tasks: set[str]) -> list[str]:
    """Table-I tasks in Table-I order, then the others alphabetically."""
    return [t for t in TABLE_I_TASKS if t in tasks] + sorted(tasks - set(TABLE_I_TASKS))


# ----------------------------------------------------------------------------------------------
# Table I
# ----------------------------------------------------------------------------------------------
@dataclass
class Cell:
    mean: float
    std: float = 0.0
    """population standard deviation over seeds (numpy's default, ddof=0); 0 for average rows"""
    n: int = 0
    """task rows: the number of seeds; average rows: the number of tasks averaged"""
    of: int = 0
    """average rows: the number of tasks in the block"""


@dataclass
class Row:
    name: str
    cells: dict[str, Cell]
    """label -> cell; a label without runs on this task has no cell"""
    average: bool = False
    metric: str = "normalized_score"
    """"return" for a task scored by its return (RETURN_BLOCK): table.md puts those rows in a table of their own"""


@dataclass
class Table:
    labels: list[str]
    rows: list[Row]


def build_table(runs: list[Run]) -> Table:
    """Table I from the finished runs: task rows in Table-I order, block averages, Total, then other tasks."""
    scores = pd.DataFrame([(run.task, run.label, run.score) for run in runs if run.finished],
                          columns=["task", "label", "score"])
    cells = scores.groupby(["task", "label"])["score"].agg(mean="mean", std=lambda s: s.std(ddof=0), n="size")
    means = cells["mean"].unstack()  # task x label, NaN where a label has no run of a task
    labels = list(means.columns)

    returns = returns_tasks(runs)

    def task_row(task: str) -> Row:
        return Row(task, {label: Cell(float(cell["mean"]), float(cell["std"]), int(cell["n"]))
                          for (_, label), cell in cells.loc[[task]].iterrows()},
                   metric="return" if task in returns else "normalized_score")

    def average_row(name: str, tasks: list[str]) -> Row:
        """Per label, the mean of its per-task means over the `tasks` it has."""
        block = means.loc[tasks]
        return Row(name, {label: Cell(float(block[label].mean()), n=int(block[label].count()), of=len(tasks))
                          for label in labels if block[label].count()}, average=True)

    rows: list[Row] = []
    table_i_present: list[str] = []
    for block, block_tasks in TABLE_I_BLOCKS:
        present = [task for task in block_tasks if task in means.index]
        if present:
            rows += [task_row(task) for task in present] + [average_row(f"{block} average", present)]
            table_i_present += present
    if table_i_present:
        rows.append(average_row("Total", table_i_present))
    others = sorted(set(means.index) - set(TABLE_I_TASKS))
    minari = {run.task for run in runs if run.finished and not run.dataset_path and is_minari_id(run.task)} - returns
    blocks = {MINARI_BLOCK: [t for t in others if t in minari], RETURN_BLOCK: sorted(returns),
              OTHER_BLOCK: [t for t in others if t not in minari | returns]}  # a file's name may hold its path's "/"
    for block, block_tasks in blocks.items():
        if block_tasks:
            rows += [task_row(task) for task in block_tasks]
            if block != RETURN_BLOCK:  # returns of different tasks are on different scales: no average
                rows.append(average_row(f"{block} average", block_tasks))
    return Table(labels, rows)


def returns_tasks(runs: list[Run]) -> set[str]:
    """Tasks scored by the return (Minari datasets without reference returns): not on the 0-100 scale of the others."""
    return {run.task for run in runs if run.finished and run.metric == "return"}


def format_cell(cell: Optional[Cell], average: bool) -> str:
    if cell is None:
        return "–"
    if not average:
        return f"{cell.mean:.1f} ± {cell.std:.1f} ({cell.n})"
    if cell.n < cell.of:
        return f"{cell.mean:.1f} ({cell.n} of {cell.of} tasks)"
    return f"{cell.mean:.1f}"


def scored_at(steps: list[int], metric: str = "D4RL normalised score") -> str:
    """What a cell's score is, in words, for --at-step."""
    if len(steps) == 1:
        return f"{metric} at step {steps[0]:,} (its evaluation there, from its history; the"
    return (f"{metric} averaged over its evaluations at steps {', '.join(f'{s:,}' for s in steps)} "
            "(from its history; each evaluation the")


def md_cell(text: str) -> str:
    """`text` (a label or task name: --exp-name may hold a `|`) as one cell of a Markdown table."""
    return str(text).replace("|", "\\|")


def markdown_table(labels: list[str], rows: list[Row]) -> list[str]:
    lines = ["| Task | " + " | ".join(map(md_cell, labels)) + " |", "|:--|" + "--:|" * len(labels)]
    for row in rows:
        name = f"**{md_cell(row.name)}**" if row.average else md_cell(row.name)
        lines.append(f"| {name} | " + " | ".join(format_cell(row.cells.get(label), row.average) for label in labels) + " |")
    return lines


def lengths_line(finished: list[Run]) -> str:
    """How long the runs in the table trained, per label when they differ."""
    def counted(runs: list[Run]) -> str:
        counts: dict[Optional[int], int] = {}
        for run in runs:
            counts[run.length] = counts.get(run.length, 0) + 1
        if len(counts) == 1:
            return steps(next(iter(counts)))
        return ", ".join(f"{steps(n)} ({c} run{'s' * (c != 1)})"
                         for n, c in sorted(counts.items(), key=lambda item: -1 if item[0] is None else item[0]))

    if len({run.length for run in finished}) <= 1:
        return f"Length: every run in the table trained for {counted(finished)} (--total-timesteps)."
    labels = sorted({run.label for run in finished})
    return "Lengths (--total-timesteps): " + "; ".join(
        f"{label}: {counted([run for run in finished if run.label == label])}" for label in labels) + "."


def format_table(table: Table, runs: list[Run], at_step: Optional[list[int]] = None) -> str:
    """table.md: the markdown table, what its numbers are, the table of returns, and the runs it leaves out."""
    scored = [row for row in table.rows if row.metric != "return"]
    returns = [row for row in table.rows if row.metric == "return"]
    finished = [r for r in runs if r.finished]
    unfinished = [r for r in runs if not r.finished]
    one_length = ("each cell holds runs of one length, scored by their last policy" if not at_step else
                  "runs of any length, all scored at the same steps: training up to a step does not depend on "
                  "--total-timesteps")
    lines: list[str] = []
    if scored:
        lines += markdown_table(table.labels, scored) + [
            "",
            "Cells: mean ± standard deviation over seeds of each run's "
            + (scored_at(at_step) if at_step else
               "final D4RL normalised score (the last policy's")
            + " mean over its evaluation episodes; AntMaze: 100 x success rate); the std is the population std (ddof=0); "
            f"(n) is the number of seeds (distinct seeds: a rerun of a seed counts once; {one_length}).",
            "Average rows: the mean of a label's per-task means over the block's tasks in this table that it has; "
            "\"(k of m tasks)\" marks a label that lacks some of them. Total: all Table-I tasks present (D4RL's own data "
            f"only). {MINARI_BLOCK}: Minari datasets, normalised with each dataset's own reference returns (AntMaze: 100 x "
            f"success rate). {OTHER_BLOCK}: datasets outside Table I, among them your own files (never D4RL's, whatever "
            "their name: a file named like a D4RL dataset is listed under its file name). Neither is in Total."
            + (f" {RETURN_BLOCK}: below, in a table of their own." if returns else ""),
        ]
    if returns:
        if lines:
            lines.append("")
        lines += [f"### {RETURN_BLOCK}: returns, not normalised scores", ""] + markdown_table(table.labels, returns) + [
            "",
            "Cells: mean ± standard deviation over seeds of each run's "
            + (scored_at(at_step, "return") if at_step else "final return (the last policy's")
            + " mean episode return; these Minari datasets have no reference returns to normalise it); the std is the "
            f"population std (ddof=0); (n) is the number of seeds ({one_length}). Returns of different tasks are on "
            "different scales: no average, and not in Total, the aggregates, the profiles or --versus.",
        ]
    lines += [
        "",
        lengths_line(finished),
        "",
        f"The table{'s use' if scored and returns else ' uses'} {len(finished)} finished run{'s' * (len(finished) != 1)}.",
    ]
    if unfinished:
        lines += ["", f"Runs not in the table (unfinished: no scores.json; or as noted): {len(unfinished)}", ""]
        lines += [f"- {r.run_name}: {r.task}, {r.label}, {r.progress}" for r in unfinished]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# rliable aggregates and performance profiles
# ----------------------------------------------------------------------------------------------
def aggregate_inputs(runs: list[Run]) -> tuple[dict[str, np.ndarray], list[str], int, dict[str, dict[str, list]]]:
    """rliable's input: per label a (runs x tasks) array of score / 100 over the tasks every label has,
    with the first k seeds of each cell (k: the smallest seed count among them); also the tasks, k and the seeds."""
    groups = group_runs(runs)
    labels = sorted({label for label, _ in groups})
    common = set.intersection(*({task for lab, task in groups if lab == label} for label in labels)) - returns_tasks(runs)
    tasks = ordered_tasks(common)
    if not tasks:
        return {}, [], 0, {}
    k = min(len(groups[label, task]) for label in labels for task in tasks)
    score_dict: dict[str, np.ndarray] = {}
    seeds: dict[str, dict[str, list]] = {}
    for label in labels:
        cells = [groups[label, task][:k] for task in tasks]
        score_dict[label] = np.array([[cell[i].score / 100 for cell in cells] for i in range(k)])
        seeds[label] = {task: [r.seed for r in cell] for task, cell in zip(tasks, cells)}
    return score_dict, tasks, k, seeds


def aggregate_metrics(scores: np.ndarray) -> np.ndarray:
    """Median, IQM, mean and optimality gap (threshold 1 = a normalised score of 100) of a (runs x tasks) array."""
    return np.array([metrics.aggregate_median(scores), metrics.aggregate_iqm(scores),
                     metrics.aggregate_mean(scores), metrics.aggregate_optimality_gap(scores)])


@contextlib.contextmanager
def seeded_bootstrap(seed: int):
    """Run rliable's bootstraps reproducibly. rliable 1.2 draws its resampling indices with np.random.choice, from
    numpy's global generator, whatever random_state it is given (which arch only uses for its own draws), so an
    unseeded call gives other intervals each time: seed the global generator for the call and restore it after."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        with warnings.catch_warnings():  # arch deprecates random_state; rliable 1.2 only passes that one
            warnings.simplefilter("ignore", FutureWarning)
            yield np.random.RandomState(seed)
    finally:
        np.random.set_state(state)


def compute_aggregates(score_dict: dict[str, np.ndarray], reps: int, seed: int = 0) -> tuple[dict, dict]:
    """Point estimates and 95% stratified bootstrap CIs (2 x 4 per label), back on the 0-100 scale."""
    with seeded_bootstrap(seed) as random_state:
        points, intervals = rly.get_interval_estimates(score_dict, aggregate_metrics, reps=reps,
                                                       random_state=random_state)
    return ({label: 100 * value for label, value in points.items()},
            {label: 100 * value for label, value in intervals.items()})


# ----------------------------------------------------------------------------------------------
# One label against another (--versus): does it beat, tie or trail it, with the interval that says so
# ----------------------------------------------------------------------------------------------
MIN_RUNS_FOR_VERDICT = 3  # a bootstrap over fewer runs per group only shows their range


def verdict(low: float, high: float, runs: int) -> str:
    """Beats or trails where the 95% interval of the difference excludes 0; else a tie (within the noise)."""
    if runs < MIN_RUNS_FOR_VERDICT:
        return f"(fewer than {MIN_RUNS_FOR_VERDICT} runs)"
    return "beats" if low > 0 else "trails" if high < 0 else "ties"


def iqm_interval(scores: np.ndarray, reps: int, seed: int = 0) -> tuple[float, float, float]:
    """IQM of one cell's runs (0-100 scale) with rliable's 95% bootstrap interval."""
    with seeded_bootstrap(seed) as random_state:
        point, interval = rly.get_interval_estimates({"x": scores[:, None] / 100}, metrics.aggregate_iqm, reps=reps,
                                                     random_state=random_state)
    low, high = np.ravel(interval["x"])
    return 100 * float(point["x"]), 100 * float(low), 100 * float(high)


def mean_difference(x: np.ndarray, y: np.ndarray, reps: int, seed: int = 0) -> tuple[float, float, float]:
    """mean(x) - mean(y) of two independent groups of runs, with a 95% percentile bootstrap interval (each group
    resampled on its own)."""
    rng = np.random.default_rng(seed)
    resampled = (rng.choice(x, (reps, len(x))).mean(axis=1) - rng.choice(y, (reps, len(y))).mean(axis=1))
    low, high = np.percentile(resampled, [2.5, 97.5])
    return float(x.mean() - y.mean()), float(low), float(high)


def pair_metrics(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """IQM(x) - IQM(y) and the probability that a run of x beats a run of y on a task (rliable)."""
    return np.array([metrics.aggregate_iqm(x) - metrics.aggregate_iqm(y), metrics.probability_of_improvement(x, y)])


def compare_labels(runs: list[Run], reference: str, reps: int, seed: int = 0) -> dict:
    """Every label against `reference`: per task (cells: mean, std, IQM, difference of means, verdict), and over the
    tasks each label shares with it (IQM difference and probability of improvement, stratified bootstrap intervals)."""
    groups = group_runs(runs)
    labels = sorted({label for label, _ in groups})
    if reference not in labels:
        raise ReportError(f"--versus {reference}: no finished run has that label; the labels are {', '.join(labels)}")
    tasks = ordered_tasks({task for label, task in groups if label == reference} - returns_tasks(runs))
    result: dict = {"reference": reference, "reps": reps, "confidence": 0.95, "tasks": []}
    for task in tasks:
        ref = np.array([r.score for r in groups[reference, task]])
        cells = []
        for label in [reference] + [lab for lab in labels if lab != reference and (lab, task) in groups]:
            x = np.array([r.score for r in groups[label, task]])
            cell = {"label": label, "n": len(x), "mean": float(x.mean()), "std": float(x.std()),
                    "iqm": iqm_interval(x, reps, seed)}
            if label != reference:
                cell["difference"] = mean_difference(x, ref, reps, seed)
                cell["verdict"] = verdict(*cell["difference"][1:], min(len(x), len(ref)))
            cells.append(cell)
        result["tasks"].append({"task": task, "cells": cells})
    result["overall"] = {"labels": {}}
    for label in [lab for lab in labels if lab != reference]:  # over the tasks this label shares with the reference
        score_dict, common, k, _ = aggregate_inputs([r for r in runs if r.label in (label, reference)])
        if not common:
            continue
        with seeded_bootstrap(seed) as random_state:
            point, interval = rly.get_interval_estimates({"pair": (score_dict[label], score_dict[reference])},
                                                         pair_metrics, reps=reps, random_state=random_state)
        difference = (100 * point["pair"][0], 100 * interval["pair"][0, 0], 100 * interval["pair"][1, 0])
        result["overall"]["labels"][label] = {
            "tasks": common, "runs_per_task": k, "iqm_difference": difference, "verdict": verdict(*difference[1:], k),
            "probability_of_improvement": (point["pair"][1], interval["pair"][0, 1], interval["pair"][1, 1])}
    return result


def format_versus(result: dict, at_step: Optional[list[int]] = None) -> str:
    """versus.md: the per-task table, the overall one, and what their numbers are."""
    ref = result["reference"]
    lines = [f"| Task | label | n | mean ± std | IQM [95% CI] | mean − {ref} [95% CI] | verdict |",
             "|:--|:--|--:|--:|--:|--:|:--|"]
    for row in result["tasks"]:
        for cell in row["cells"]:
            iqm, diff = cell["iqm"], cell.get("difference")
            lines.append(f"| {md_cell(row['task'])} | {md_cell(cell['label'])} | {cell['n']} | "
                         f"{cell['mean']:.1f} ± {cell['std']:.1f} | "
                         f"{iqm[0]:.1f} [{iqm[1]:.1f}, {iqm[2]:.1f}] | "
                         + (f"{diff[0]:+.1f} [{diff[1]:+.1f}, {diff[2]:+.1f}] | {cell['verdict']} |" if diff else
                            "(reference) | |"))
    overall = result["overall"]
    if overall["labels"]:
        lines += ["", f"Over the tasks each label shares with {ref} (the first k seeds of each cell, k the fewest "
                  "seeds among them):", "",
                  f"| label | tasks | k | IQM − IQM of {ref} [95% CI] | P(a run beats a {ref} run) [95% CI] | verdict |",
                  "|:--|--:|--:|--:|--:|:--|"]
        for label, entry in overall["labels"].items():
            d, p = entry["iqm_difference"], entry["probability_of_improvement"]
            lines.append(f"| {md_cell(label)} | {len(entry['tasks'])} | {entry['runs_per_task']} | "
                         f"{d[0]:+.1f} [{d[1]:+.1f}, {d[2]:+.1f}] | {p[0]:.2f} [{p[1]:.2f}, {p[2]:.2f}] | "
                         f"{entry['verdict']} |")
    lines += ["", "Scores: " + (scored_at(at_step) + " mean over its episodes)" if at_step else
                                 "each run's final D4RL normalised score (the last policy's mean over its episodes)")
              + f". Intervals: 95% bootstrap over runs ({result['reps']} replications): per cell rliable's IQM "
              "interval; per task the percentile interval of the difference of means, each label's runs resampled on "
              "their own; overall rliable's stratified bootstrap of the IQM difference and of the probability of "
              "improvement. Verdict: beats or trails where the interval of the difference excludes 0, else ties (a "
              "difference within the noise of evaluation and seeds)."]
    return "\n".join(lines) + "\n"


def plot_aggregates(points: dict, intervals: dict, labels: list[str], colors: dict[str, str], title: str, path: str) -> None:
    row_height = max(0.6, 2.0 / len(labels))
    fig, _ = plot_utils.plot_interval_estimates(points, intervals, METRIC_NAMES, algorithms=labels, colors=colors,
                                                row_height=row_height, subfigure_width=4.0, xlabel="D4RL normalised score",
                                                xlabel_y_coordinate=-0.5 / (row_height * len(labels)))
    fig.suptitle(title, x=0.4, y=1.0 + 0.6 / (row_height * len(labels)), fontsize="x-large")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_profiles(score_dict: dict[str, np.ndarray], reps: int, colors: dict[str, str], title: str, path: str,
                  seed: int = 0) -> None:
    """Fraction of runs whose score exceeds each threshold tau, from 0 to a bit above the best score."""
    top = max(float(scores.max()) for scores in score_dict.values())
    taus = np.linspace(0, max(1.05 * top, 0.05), 51)
    with seeded_bootstrap(seed):
        profiles, profile_cis = rly.create_performance_profile(score_dict, taus, reps=reps)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    # rliable works on score / 100; the axis shows the table's 0-100 scale
    plot_utils.plot_performance_profiles(profiles, 100 * taus, performance_profile_cis=profile_cis, ax=ax, colors=colors,
                                         xlabel=r"D4RL normalised score $\tau$",
                                         ylabel=r"Fraction of runs with score $> \tau$", labelsize="large",
                                         ticklabelsize="large")
    ax.set_title(title)
    ax.legend(loc="lower left")  # profiles start at 1 on the left
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Evaluation curves
# ----------------------------------------------------------------------------------------------
def mean_curve(cell: list[Run]) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Steps every seed evaluated at, and the mean and std over seeds there; None when they share no step."""
    by_step = [{e["step"]: e["score"] for e in run.evaluations} for run in cell]
    steps = sorted(set.intersection(*(set(scores) for scores in by_step)))
    if not steps:
        return None
    values = np.array([[scores[s] for s in steps] for scores in by_step])
    return np.array(steps), values.mean(axis=0), values.std(axis=0)


def plot_curves(runs: list[Run], colors: dict[str, str], path: str) -> None:
    groups = group_runs(runs)
    tasks = ordered_tasks({task for _, task in groups})
    ncols = min(3, len(tasks))
    nrows = math.ceil(len(tasks) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for label in colors:
            if (label, task) not in groups:
                continue
            cell = groups[label, task]
            curve = mean_curve(cell)
            if curve is None:
                warn(f"the runs of {label!r} on {task} have no evaluation step in common; no curve")
                continue
            steps, mean, std = curve
            ax.plot(steps, mean, color=colors[label], marker="." if len(steps) < 30 else None,
                    label=f"{label} (n={len(cell)})")
            ax.fill_between(steps, mean - std, mean + std, color=colors[label], alpha=0.2)
        ax.set_title(task)
        ax.set_xlabel("gradient step")
        ax.set_ylabel("return" if task in returns_tasks(runs) else "normalised score")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no evaluation history", ha="center", va="center", transform=ax.transAxes)
    for ax in list(axes.flat)[len(tasks):]:
        ax.set_visible(False)
    fig.suptitle("Evaluation curves: mean ± std over seeds (finished runs)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------
def make_report(runs: list[Run], out_dir: str, reps: int = 2000, profile_reps: int = 1000,
                at_step: Optional[list[int]] = None, versus: Optional[str] = None) -> dict[str, str]:
    """Write table.md, aggregate.json, aggregate.png, profiles.png and curves.png into `out_dir` (and with `versus`,
    versus.md and versus.json); print the tables.

    Returns {file name: path} of what it wrote. Raises ReportError when no run is finished."""
    if not any(run.finished for run in runs):
        raise ReportError("no finished run (scores.json) among the run folders: train first, "
                          "or pass the folder that holds your runs")
    select_runs(runs, at_step)  # runs made otherwise than by collect_runs: one run per seed, one length per cell
    os.makedirs(out_dir, exist_ok=True)
    written: dict[str, str] = {}

    table = build_table(runs)
    colors = {label: f"C{i % 10}" for i, label in enumerate(table.labels)}
    text = format_table(table, runs, at_step)
    written["table.md"] = os.path.join(out_dir, "table.md")
    with open(written["table.md"], "w") as f:
        f.write(text)
    print(text)

    score_dict, tasks, k, seeds = aggregate_inputs(runs)
    aggregate: dict = {"reps": reps, "confidence": 0.95, "scale": "D4RL normalised score (0-100); rliable got score / 100",
                       "optimality_gap_threshold": 100}
    if not tasks:
        note = "no task is shared by every label, so the aggregate metrics and profiles are skipped"
        aggregate["skipped"] = note
        print(f"note: {note}")
        for name in ("aggregate.png", "profiles.png"):  # never leave a figure of an earlier report next to this one
            remove(os.path.join(out_dir, name), "a figure of an earlier report (this one has no aggregates)")
    else:
        points, intervals = compute_aggregates(score_dict, reps)
        aggregate["tasks"] = tasks
        aggregate["runs_per_task"] = k
        aggregate["profile_reps"] = profile_reps
        aggregate["labels"] = {}
        for label in table.labels:
            entry: dict = {"seeds": seeds[label]}
            for i, key in enumerate(METRIC_KEYS):
                entry[key] = {"estimate": float(points[label][i]), "ci_low": float(intervals[label][0, i]),
                              "ci_high": float(intervals[label][1, i])}
            aggregate["labels"][label] = entry
        title = f"{k} run{'s' * (k != 1)} x {len(tasks)} task{'s' * (len(tasks) != 1)}, 95% stratified bootstrap CIs"
        written["aggregate.png"] = os.path.join(out_dir, "aggregate.png")
        plot_aggregates(points, intervals, table.labels, colors, title, written["aggregate.png"])
        written["profiles.png"] = os.path.join(out_dir, "profiles.png")
        plot_profiles(score_dict, profile_reps, colors, f"Performance profiles ({title})", written["profiles.png"])
    written["aggregate.json"] = os.path.join(out_dir, "aggregate.json")
    with open(written["aggregate.json"], "w") as f:
        json.dump(aggregate, f, indent=2, allow_nan=False)  # strict JSON: parses anywhere

    written["curves.png"] = os.path.join(out_dir, "curves.png")
    plot_curves(runs, colors, written["curves.png"])

    if versus is None:  # nor an earlier report's comparison, of other runs
        for name in ("versus.md", "versus.json"):
            remove(os.path.join(out_dir, name), "the --versus comparison of an earlier report (this one has no --versus)")
    else:
        result = compare_labels(runs, versus, reps)
        text = format_versus(result, at_step)
        written["versus.md"], written["versus.json"] = (os.path.join(out_dir, name) for name in ("versus.md", "versus.json"))
        with open(written["versus.md"], "w") as f:
            f.write(text)
        with open(written["versus.json"], "w") as f:
            json.dump(result, f, indent=2, allow_nan=False)
        print(text)

    for name in ("table.md", "aggregate.json", "aggregate.png", "profiles.png", "curves.png", "versus.md", "versus.json"):
        if name in written:
            print(f"wrote {written[name]}")
    return written


def main() -> None:
    args = tyro.cli(Args)
    try:
        check_args(args)
        runs = collect_runs(args.runs_dirs, args.label_key, args.at_step)
        if not any(run.finished for run in runs) and SKIPPED:  # there are runs: their files could not be read
            raise ReportError(f"no readable finished run under {', '.join(args.runs_dirs)}: {len(SKIPPED)} run "
                              f"folder(s) skipped for a file that cannot be read ({', '.join(SKIPPED[:3])}"
                              f"{', ...' if len(SKIPPED) > 3 else ''}; see the warnings): repair or restore it")
        if not any(run.finished for run in runs):
            raise ReportError(f"no finished run (scores.json) under {', '.join(args.runs_dirs)}: train first, "
                              "or pass the folder that holds your runs")
        labels = sorted({run.label for run in runs if run.finished})
        if args.versus is not None and args.versus not in labels:
            raise ReportError(f"--versus {args.versus}: no finished run has that label; the labels are {', '.join(labels)}")
        make_report(runs, args.out, reps=args.reps, profile_reps=args.profile_reps, at_step=args.at_step,
                    versus=args.versus)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
