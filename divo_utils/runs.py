"""A run's folder: made and locked, checkpoints, the finished file, stop signals, divergence and the progress line
(its lock and atomic files: divo_utils.files; --resume: divo_utils.resume).

A run writes everything under runs/{run_name}/: args.json at once, TensorBoard events, its checkpoint every
--checkpoint-freq steps, and last the file that marks it finished (scores.json; pad_diagnostics.json for
pretraining), which always describes the checkpoint beside it.
"""

import hashlib
import io
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, replace
from typing import Optional

import torch
import torch.nn as nn

from divo_utils import LOCK, InputError, task_name
from divo_utils.files import lock_run, remove, write_atomically, write_json

PROGRESS = "progress.json"  # a run's step, speed and starting step, rewritten at every progress line
FIRST_LINE = 100  # gradient steps after each start (new or resumed) before the first progress line: seconds on a CPU


def clear_for_resume(resume: str) -> None:
    """Before a resumed run writes: remove a partial checkpoint, or, when the run stopped before its first checkpoint
    (it starts again from step 0), that attempt's files."""
    folder = os.path.dirname(resume)
    if os.path.exists(resume):  # the atomic rename keeps the checkpoint itself whole
        stale = {f"{resume}.tmp": "a partial checkpoint left by an interrupted save"}
    else:  # TensorBoard events, a partial checkpoint; args.json is written again
        stale = {os.path.join(folder, name): "left by the attempt that stopped before its first checkpoint"
                 for name in sorted(os.listdir(folder)) if name not in (LOCK, "args.json")}
    for path, why in stale.items():
        remove(path, why)


def save_checkpoint(path: str, payload: dict, checkpoint: str, finished: Optional[str] = None) -> None:
    """torch.save, atomically (write_atomically). A run's checkpoint replaces the run's `finished` file: that file
    describes an earlier checkpoint (a run extended with --resume) and is removed only once the new checkpoint is
    whole, just before it takes the old one's place; it is written again after the last checkpoint."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_atomically(path, buffer.getvalue(), checkpoint, replaces=finished)


# What every checkpoint holds besides its script's state (Run.save): --resume reads each of them.
CHECKPOINT_KEYS = ("step", "args", "rng", "dataset_sha1")


def load_checkpoint(path: str, kind: str) -> dict:
    """Read a checkpoint whose "kind" is `kind` (the label of the script that wrote it), or stop with what is wrong. The payload gets "file_sha1",
    the SHA-1 of the bytes read (what was loaded, even if the file changes afterwards)."""
    if not os.path.isfile(path):
        raise InputError(f"no checkpoint at {path}")
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.startswith(b"PK\x03\x04"):  # torch.save writes a zip archive; torch's own error gives pickle advice
        raise InputError(f"{path} is not a PyTorch checkpoint ({len(raw):,} bytes, empty or of another format): pass "
                         "the checkpoint.pt of a run's folder")
    try:
        payload = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise InputError(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0]}); it is "
                         "partial or not a checkpoint of this project") from e
    found = payload.get("kind") if isinstance(payload, dict) else None
    if found != kind:
        raise InputError(f"{path} is a checkpoint of {found or 'something else'}, not of {kind}.py")
    missing = [key for key in CHECKPOINT_KEYS if key not in payload]
    if missing or not isinstance(payload["args"], dict):
        raise InputError(f"{path} has no {', '.join(missing) or 'dict of arguments'} (a checkpoint of another "
                         "version of this project, or edited): resume it with that version, or start a new run")
    payload["file_sha1"] = hashlib.sha1(raw).hexdigest()
    return payload


def networks(agent) -> dict[str, nn.Module]:
    """The agent's networks (online and target), by attribute name."""
    return {name: part for name, part in vars(agent).items() if isinstance(part, nn.Module)}


def optimizers(agent) -> dict[str, torch.optim.Optimizer]:
    """The agent's optimisers, by attribute name."""
    return {name: part for name, part in vars(agent).items() if isinstance(part, torch.optim.Optimizer)}


def agent_state(agent) -> dict:
    """What a checkpoint keeps of the agent: every network's and optimiser's state, by name."""
    return {name: part.state_dict() for name, part in {**networks(agent), **optimizers(agent)}.items()}


def load_agent_state(agent, state: dict) -> None:
    """Restore what agent_state saved, or stop if it was saved by a version with other networks."""
    for name, part in {**networks(agent), **optimizers(agent)}.items():
        try:
            part.load_state_dict(state[name])
        except (KeyError, RuntimeError, ValueError) as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise InputError(f"the checkpoint's {name} does not fit this script's ({type(e).__name__}: {first}); "
                             f"was it written by another version? Use that version, or start a new run") from e


def rng_state(device: torch.device) -> dict:
    """The random streams a checkpoint keeps, so that a resumed run draws what the uninterrupted one would."""
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}


def make_run_dir(args, checkpoint_name: str):
    """The run's folder, locked, and its name in `args`: a new one under runs/ (a new run never writes into an
    existing folder), or with --resume the run's own (locked by parse_args), cleared of what is no longer valid."""
    if args.resume:
        clear_for_resume(args.resume)
        return args, os.path.dirname(args.resume)
    base = args.run_name or f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    for attempt in range(1000):  # runs started in the same second get -1, -2, ...
        name = base if attempt == 0 else f"{base}-{attempt}"
        try:
            os.makedirs(os.path.join("runs", name))
        except FileExistsError:
            if args.run_name:
                raise InputError(f"runs/{name} exists: choose another --run-name, or continue that run with "
                                 f"--resume runs/{name}/{checkpoint_name}") from None
            continue
        lock_run(os.path.join("runs", name))
        return replace(args, run_name=name), os.path.join("runs", name)
    raise InputError(f"could not create a new folder runs/{base}-N: remove old runs or pass --run-name")


class Run:
    """A run's folder and files: made (or the resumed run's own, cleared) and locked, args.json written at once
    (--resume needs it) with the labels tools/report.py reads (script, mode, task), the checkpoint, and last the
    finished file. `last_checkpoint` names the newest checkpoint, for the messages that stop a run.

    `script` labels its files (the checkpoint's "kind"); `files` are its checkpoint's and finished file's names
    (divo_utils.DIVO_FILES, PAD_FILES); `mode` the algorithm it trains (run_mode), None for pretraining."""

    def __init__(self, args, script: str, files: tuple[str, str], mode: Optional[str], start_step: int,
                 started_from: Optional[dict] = None):
        checkpoint_name, finished_name = files
        self.args, self.dir = make_run_dir(args, checkpoint_name)
        self.started_from = started_from or {}  # what restore_run loaded: kept in args.json and every checkpoint
        self.kind = script
        self.labels = {"script": script, **({"mode": mode, "task": task_name(vars(args))} if mode else {})}
        self.checkpoint_path = os.path.join(self.dir, checkpoint_name)
        self.finished_path = os.path.join(self.dir, finished_name)
        resumed = args.resume is not None
        self.last_checkpoint = f"{self.checkpoint_path} (step {start_step:,})" if resumed else "none yet"
        self.info, self.device = {}, torch.device("cpu")
        self.resumed, self.saved = resumed, False
        sys.excepthook = self.out_of_memory  # an uncaught out-of-memory error: one line, and no half-made folder
        self.start_step = start_step
        try:
            self.write_json("args.json", {**asdict(self.args), **self.labels, **self.started_from})
            self.write_json(PROGRESS, self.progress(start_step, 0.0))
        except InputError as e:  # a full disk: a new run leaves no half-made folder behind
            if resumed:
                raise
            shutil.rmtree(self.dir, ignore_errors=True)
            why = getattr(e.__cause__, "strerror", None) or e.__cause__
            raise InputError(f"could not write {os.path.join(self.dir, 'args.json')} ({why}); the run's new folder "
                             "was removed again. Free some disk space, then run the same command again") from e

    def describe(self, task, obs_mean, obs_std, num_transitions: int, device: torch.device) -> None:
        """What every checkpoint records of the run besides its state: the script, arguments, data and the state
        normalisation (a saved actor needs it), and the device whose random stream it keeps."""
        self.device = device
        labels = self.labels if "mode" in self.labels else {}  # pretraining's checkpoints: without
        self.info = {"kind": self.kind, "args": asdict(self.args), **labels, "started_from": self.started_from,
                     "env_id": self.args.env_id,
                     "obs_dim": task.obs_dim, "act_dim": task.act_dim, "dataset_sha1": task.fingerprint,
                     "num_transitions": num_transitions, "obs_mean": torch.tensor(obs_mean),
                     "obs_std": torch.tensor(obs_std)}

    def out_of_memory(self, kind, error, trace) -> None:
        """sys.excepthook while the run lives: out of (GPU or host) memory ends the run with one line that names the
        fix; a new run that wrote no checkpoint yet removes its folder, so that the same command can run again.
        Every other error keeps Python's traceback."""
        if not is_out_of_memory(kind, error):
            return sys.__excepthook__(kind, error, trace)
        first = (str(error).strip().splitlines() or [""])[0]
        if not self.resumed and not self.saved:
            shutil.rmtree(self.dir, ignore_errors=True)
            where = f"the run's new folder {self.dir} was removed again"
        else:
            where = f"the run's folder keeps its last checkpoint ({self.last_checkpoint})"
        print(f"error: out of memory ({kind.__name__}: {first}); {where}. Lower --batch-size or --hidden-dim "
              f"(batch {self.args.batch_size}, width {self.args.hidden_dim}), or free memory on the device",
              file=sys.stderr)

    def write_json(self, name: str, content: dict) -> None:
        """A JSON file of the run's folder, written atomically."""
        write_json(os.path.join(self.dir, name), content, self.checkpoint_path)

    def sync_or_stop(self, step: int, metrics: dict[str, torch.Tensor], agent) -> dict[str, float]:
        """The metrics as numbers (the loop's one host sync); stop if a metric or a weight is NaN/inf."""
        try:
            return check_finite(step, metrics, agent, self.last_checkpoint)
        except InputError as e:
            raise self.no_folder_left(e) from None

    def no_folder_left(self, error: InputError) -> InputError:
        """A new run that diverged before its first checkpoint keeps nothing worth a folder: it is removed, so that
        the same command (with the data or arguments fixed) runs again."""
        if self.resumed or self.saved:
            return error
        shutil.rmtree(self.dir, ignore_errors=True)
        return InputError(f"{str(error).removeprefix('error: ')}; the run's new folder {self.dir} was removed again")

    def progress(self, step: int, sps: float) -> dict:
        """What progress.json says: the step reached, of how many, how fast, and where this attempt started."""
        return {"step": step, "total_timesteps": self.args.total_timesteps, "steps_per_second": sps,
                "start_step": self.start_step}

    def log_due(self, step: int) -> bool:
        """Log and print a progress line at this step (`step` gradient steps done): every --log-freq steps, and once
        FIRST_LINE steps after the start (new or resumed), so that a slow CPU shows its speed within seconds."""
        return step % self.args.log_freq == 0 or step - self.start_step == FIRST_LINE < self.args.log_freq

    def report_progress(self, step: int, sps: float, evaluations: list[dict], extra: str = "") -> None:
        """Print the progress line (and `extra` after it), and write progress.json, which tools/sweep.py reads."""
        print(progress_line(step, self.args.total_timesteps, sps, evaluations) + extra, flush=True)
        self.write_json(PROGRESS, self.progress(step, sps))

    def log_evaluation(self, writer, step: int, scalars: dict[str, float], evaluations: list[dict], words: str,
                       scores, returns, seconds: float) -> None:
        """Log an evaluation's `scalars` (stop if one is NaN or inf), keep its score in `evaluations` (what
        checkpoints and scores.json keep), and print it (`words`: the metric, as the line names it)."""
        self.log(writer, step, scalars)
        mean, std = scores.mean().item(), scores.std().item()
        evaluations.append({"step": step, "score": mean, "score_std": std})
        print(f"eval   step {step:,}: {words} {mean:.1f} +- {std:.1f} (return {returns.mean():.1f}, "
              f"{len(returns)} episodes, {seconds:.1f}s)", flush=True)

    def log(self, writer, step: int, values: dict[str, float]) -> None:
        """Write `values` to TensorBoard; stop if one is NaN or inf."""
        try:
            log_scalars(writer, step, values, self.last_checkpoint)
        except InputError as e:
            raise self.no_folder_left(e) from None

    def save(self, step: int, metrics: dict[str, torch.Tensor], agent, state: dict) -> str:
        """The checkpoint at `step`: the run's description, `state` and the random streams (never of a diverged
        run: a good checkpoint is never overwritten by a bad one)."""
        self.sync_or_stop(step, metrics, agent)
        payload = {**self.info, "step": step, **state, "rng": rng_state(self.device)}
        save_checkpoint(self.checkpoint_path, payload, self.checkpoint_path, self.finished_path)
        self.last_checkpoint, self.saved = f"{self.checkpoint_path} (step {step:,})", True
        return self.last_checkpoint

    def save_model(self, state: dict) -> None:
        """--save-model: `state` (the actor's weights) with the run's description, beside the checkpoint."""
        path = os.path.join(self.dir, f"{self.args.exp_name}.cleanrl_model")
        save_checkpoint(path, {**self.info, **state}, self.checkpoint_path)
        print(f"model saved to {path}")

    def finish(self, content: dict) -> None:
        """The finished file, written last: its presence means every file of the run is final. It names the data it
        came from (the rows' SHA-1, as the checkpoints do), so a committed result says which file it was trained on."""
        write_json(self.finished_path, {**content, "dataset_sha1": self.info["dataset_sha1"]}, self.checkpoint_path)


def is_out_of_memory(kind, error) -> bool:
    """Whether an uncaught error is PyTorch's or Python's out of memory (host or GPU)."""
    return issubclass(kind, MemoryError) or isinstance(error, torch.OutOfMemoryError) or (
        issubclass(kind, RuntimeError) and "can't allocate memory" in str(error))


def out_of_memory_before_the_run(kind, error, trace) -> None:
    """sys.excepthook from the command line on (parse_args), until the run's folder exists (Run replaces it): out of
    memory while the networks are built is one line naming the fix; every other error keeps its traceback."""
    if not is_out_of_memory(kind, error):
        return sys.__excepthook__(kind, error, trace)
    first = (str(error).strip().splitlines() or [""])[0]
    print(f"error: out of memory ({kind.__name__}: {first}); no run folder was made. Lower --batch-size or "
          "--hidden-dim, or free memory on the device", file=sys.stderr)


def pick_device(cuda: bool) -> torch.device:
    """The GPU with --cuda (the default) where there is one, else the CPU; say so when --cuda found none (the run
    trains tens of times slower)."""
    if cuda and not torch.cuda.is_available():
        print(f"no GPU found: training on the CPU ({os.cpu_count()} cores); expect about 30 gradient steps/s per core "
              "with the default sizes (tools/benchmark.py --no-cuda measures this machine; --no-cuda silences this)")
    return torch.device("cuda" if cuda and torch.cuda.is_available() else "cpu")


def markdown_table(values: dict) -> str:
    """The arguments as a markdown table, for TensorBoard's text tab."""
    return "|param|value|\n|-|-|\n%s" % "\n".join(f"|{key}|{value}|" for key, value in values.items())


def check_finite(step: int, metrics: dict[str, torch.Tensor], agent, last_checkpoint: str) -> dict[str, float]:
    """The metrics as numbers (the loop's one host sync); stop with a message if a metric or a weight is NaN/inf."""
    weights = {name: torch.stack([p.isfinite().all() for p in module.parameters()]).all().float()
               for name, module in networks(agent).items()}
    values = dict(zip([*metrics, *weights], torch.stack([*metrics.values(), *weights.values()]).tolist()))
    bad = [f"{name} = {values[name]}" for name in metrics if not math.isfinite(values[name])]
    bad += [f"the {name} network's weights" for name in weights if values[name] != 1.0]
    if bad:
        raise diverged(step, bad, last_checkpoint)
    return {name: values[name] for name in metrics}


def log_scalars(writer, step: int, values: dict[str, float], last_checkpoint: str) -> None:
    """Write `values` to TensorBoard; stop as check_finite does if one (a diagnostic, a score) is NaN or inf."""
    bad = [f"{name} = {value}" for name, value in values.items() if not math.isfinite(value)]
    if bad:
        raise diverged(step, bad, last_checkpoint)
    for name, value in values.items():
        writer.add_scalar(name, value, step)


def diverged(step: int, bad: list[str], last_checkpoint: str) -> InputError:
    """The message that stops a run whose metrics, diagnostics or weights are not finite."""
    return InputError(f"training diverged by step {step:,}: {', '.join(bad)} not finite. Nothing after the last good "
                      f"checkpoint was saved ({last_checkpoint}). Check the rewards' scale, or lower the learning "
                      f"rates or --alpha")


class StopSignal:
    """SIGINT / SIGTERM end the loop after the current iteration, with a checkpoint; a second one stops at once."""

    def __init__(self):
        self.signum = None
        signal.signal(signal.SIGINT, self.request)
        signal.signal(signal.SIGTERM, self.request)

    def exit(self, step: int, checkpoint: str, script: str, checkpoint_path: str):
        """After the checkpoint at `step`: say how to resume, and exit as the signal asked (128 + its number)."""
        print(f"stopped at step {step:,}; resume with: python {os.path.basename(script)} --resume {checkpoint_path}")
        raise SystemExit(128 + self.signum)

    def request(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print("\nstopping after this step with a checkpoint (signal again to stop at once)", flush=True)


def progress_line(done: int, total: int, sps: float, evaluations: list[dict]) -> str:
    """[ 12.0%] step 120,000/1,000,000 | 1,234 steps/s | score 45.6 @ 115,000 | ETA 11m53s"""
    score = f"{evaluations[-1]['score']:.1f} @ {evaluations[-1]['step']:,}" if evaluations else "-"
    eta = int((total - done) / sps)
    eta = (f"{eta // 3600}h" if eta >= 3600 else "") + f"{eta % 3600 // 60:02d}m{eta % 60:02d}s"
    return f"[{done / total:6.1%}] step {done:,}/{total:,} | {sps:,.0f} steps/s | score {score} | ETA {eta}"
