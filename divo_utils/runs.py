"""A run's folder: one writer (a lock), files that are whole or absent, checkpoints, resume, the finished file,
stop signals, divergence and the progress line.

A run writes everything under runs/{run_name}/: args.json at once, TensorBoard events, its checkpoint every
--checkpoint-freq steps, and last the file that marks it finished (scores.json; pad_diagnostics.json for
pretraining), which always describes the checkpoint beside it.
"""

import hashlib
import io
import json
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import asdict, replace
from typing import Optional

import torch
import torch.nn as nn

from divo_utils import LOCK, RUN_FILES, InputError
from divo_utils.args import refuse_mismatch

try:
    import fcntl  # POSIX file locks: one writer per run folder (on Windows, run folders are not locked)
except ImportError:
    fcntl = None


# Open a run's own files without following a symbolic link: a link would make a run write outside its folder.
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def refuse_link(path: str) -> None:
    """Stop if `path` (a file of a run's folder) is a symbolic link: nothing outside a run folder is written."""
    if os.path.islink(path):
        raise InputError(f"{path} is a symbolic link (to {os.readlink(path)}); a run's folder holds only its own "
                         f"files, and this one would write through the link: remove {path} and run again")


def lock_run(folder: str) -> None:
    """Lock the run `folder` for this process's whole life (the kernel frees it however the process ends), or stop."""
    refuse_link(os.path.join(folder, LOCK))
    try:  # never closed: the lock lasts
        fd = os.open(os.path.join(folder, LOCK), os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o644)
    except OSError as e:
        refuse_link(os.path.join(folder, LOCK))  # made between the check and the open
        raise InputError(f"cannot write to {folder} ({e.strerror}): run where the run's folder can be written") from e
    if fcntl is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise InputError(f"{folder} is in use by {holder}, which holds {os.path.join(folder, LOCK)}: a run has one "
                         "writer at a time; wait until that process ends, or stop it first") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode())


def write_atomically(path: str, data: bytes, checkpoint: str) -> None:
    """Write `data` to `path` by renaming a complete copy: a crash never leaves a broken file in place of a good one,
    and a write that fails (a full disk) leaves nothing behind and stops with one line (resume from `checkpoint`)."""
    tmp = f"{path}.tmp"
    refuse_link(tmp)
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | NOFOLLOW, 0o644), "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # a link at `path` is replaced, not followed
    except OSError as e:
        if os.path.exists(tmp) and not os.path.islink(tmp):
            os.remove(tmp)
        raise InputError(f"could not write {path} ({e.strerror or e}); nothing half-written was left. Free some disk "
                         f"space, then continue with --resume {checkpoint}") from e


def write_json(path: str, content: dict, checkpoint: str) -> None:
    """Strict JSON (NaN and inf refused, so every file parses anywhere), written atomically."""
    write_atomically(path, json.dumps(content, indent=2, allow_nan=False).encode(), checkpoint)


def remove(path: str, why: str) -> None:
    """Remove the file `path` if it is there (a link: the link itself, never its target), and say so."""
    if os.path.isfile(path) or os.path.islink(path):
        os.remove(path)
        print(f"removed {path}, {why}")


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


def check_writable(folder: str, fix: str) -> None:
    """Stop with `fix` unless files can be made in `folder` (or, if it does not exist yet, where it would be made)."""
    existing = os.path.abspath(folder)
    while not os.path.isdir(existing):  # nothing is created here: the nearest existing folder is tried
        if os.path.exists(existing):
            raise InputError(f"cannot write to {folder}: {existing} is a file, not a folder; {fix}")
        existing = os.path.dirname(existing)
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise InputError(f"cannot write to {folder} ({e.strerror or e}): {fix}") from e


def save_checkpoint(path: str, payload: dict, checkpoint: str, finished: Optional[str] = None) -> None:
    """torch.save, atomically (write_atomically). A run's checkpoint first removes the run's `finished` file: that
    file describes an earlier checkpoint (a run extended with --resume), and is written again after the last one."""
    if finished:
        remove(finished, "the results of an earlier step: the run trains on")
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_atomically(path, buffer.getvalue(), checkpoint)


def load_checkpoint(path: str, kind: str) -> dict:
    """Read a checkpoint written by `kind` (a script name), or stop with what is wrong. The payload gets "file_sha1",
    the SHA-1 of the bytes read (what was loaded, even if the file changes afterwards)."""
    if not os.path.isfile(path):
        raise InputError(f"no checkpoint at {path}")
    try:
        with open(path, "rb") as f:
            raw = f.read()
        payload = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise InputError(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0]}); it is "
                         "partial or not a checkpoint of this project") from e
    found = payload.get("kind") if isinstance(payload, dict) else None
    if found != kind:
        raise InputError(f"{path} is a checkpoint of {found or 'something else'}, not of {kind}.py")
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


def load_pretrained_pad(agent, args, fingerprint: str) -> dict:
    """--pad-checkpoint: start the diffusion model, critics and value net from a pad_pretrain.py checkpoint. Returns
    what was loaded (its step, the SHA-1 of the file's bytes, whether that pretraining had finished), for args.json:
    the path alone does not say, since a pretraining that still trains rewrites its checkpoint."""
    pad = load_checkpoint(args.pad_checkpoint, "pad_pretrain")
    names = ("diffusion_steps", "beta_min", "beta_max", "hidden_dim", "num_layers")
    names += ("gamma", "expectile") if args.freeze_pad else ()  # a frozen model keeps the advantages it learnt from
    if hasattr(args, "reward_transform"):  # AntMaze learns from r - 1 or r, as the pretraining did
        ours, fix = {n: getattr(args, n) for n in ("reward_transform", *names)}, "pretrain with the same values"
    else:  # locomotion learns from r
        ours = {"reward_transform": "none", **{n: getattr(args, n) for n in names}}
        fix = "pretrain with the same values (locomotion learns from r: --reward-transform none)"
    refuse_mismatch(args.pad_checkpoint, ours, pad["args"], f"{fix} on the dataset you train on",
                    same_data=pad["dataset_sha1"] == fingerprint)
    for name in ("diffusion", "critic", "critic_target", "value"):
        getattr(agent, name).load_state_dict(pad[name])
    total = pad["args"].get("total_timesteps")
    finished = pad["step"] == total and os.path.isfile(
        os.path.join(os.path.dirname(args.pad_checkpoint), RUN_FILES["pad_pretrain"][1]))
    print(f"loaded the PAD model, critics and value net of {args.pad_checkpoint} (step {pad['step']:,}, SHA-1 "
          f"{pad['file_sha1'][:12]})" + (" (diffusion model frozen)" if args.freeze_pad else ""))
    if not finished:
        print(f"warning: that pretraining has not finished (step {pad['step']:,} of {total:,}, or no "
              f"{RUN_FILES['pad_pretrain'][1]} beside it): if it still trains, its checkpoint will change; this run "
              "records the step and SHA-1 it loaded in its args.json")
    return {"pad_checkpoint_step": pad["step"], "pad_checkpoint_sha1": pad["file_sha1"],
            "pad_checkpoint_finished": finished}


def restore_run(agent, args, checkpoint: Optional[dict], fingerprint: str, history: str = "evaluations",
                **extra: nn.Module) -> tuple[int, list, dict]:
    """The step and history (evaluations, or pretraining's diagnostics) to start from: a resumed run's (networks,
    optimisers, RNG, and the `extra` modules saved under their names), or a new run's (with --pad-checkpoint, the
    pretrained PAD model's); and what the run started from (the PAD checkpoint loaded, see load_pretrained_pad)."""
    if checkpoint is None:
        if getattr(args, "pad_checkpoint", None):
            return 0, [], load_pretrained_pad(agent, args, fingerprint)
        return 0, [], {}
    refuse_mismatch(args.resume, {}, {}, "resume on the dataset it was trained on",
                    same_data=checkpoint["dataset_sha1"] == fingerprint)
    load_agent_state(agent, checkpoint["agent"] if "agent" in checkpoint else checkpoint)
    for name, module in extra.items():
        module.load_state_dict(checkpoint[name])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if torch.cuda.is_available() and args.cuda and checkpoint["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"])
    print(f"resumed {args.run_name} at step {checkpoint['step']:,}")
    # a run stopped while writing its final files evaluates (or diagnoses) its last step again
    return checkpoint["step"], [e for e in checkpoint[history] if e["step"] < args.total_timesteps], \
        checkpoint.get("started_from", {})


def make_run_dir(args, kind: str):
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
                                 f"--resume runs/{name}/{RUN_FILES[kind][0]}") from None
            continue
        lock_run(os.path.join("runs", name))
        return replace(args, run_name=name), os.path.join("runs", name)
    raise InputError(f"could not create a new folder runs/{base}-N: remove old runs or pass --run-name")


def run_mode(args) -> str:
    """The algorithm a DIVO run trains, as args.json, scores.json and the report name it."""
    return "td3bc" if not args.adpo else "divo" if args.pad else "divo-no-pad"


def task_name(args) -> str:
    """The data a run learns from, as tools/report.py names it: the D4RL id, or the name of a local file."""
    if args.dataset_path:
        return os.path.splitext(os.path.basename(args.dataset_path))[0]
    return args.env_id


class Run:
    """A run's folder and files: made (or the resumed run's own, cleared) and locked, args.json written at once
    (--resume needs it) with the labels tools/report.py reads (script, mode, task), the checkpoint, and last the
    finished file. `last_checkpoint` names the newest checkpoint, for the messages that stop a run."""

    def __init__(self, args, kind: str, mode: Optional[str], start_step: int, started_from: Optional[dict] = None):
        self.args, self.dir = make_run_dir(args, kind)
        self.started_from = started_from or {}  # what restore_run loaded: kept in args.json and every checkpoint
        self.kind = kind
        self.labels = {"script": kind, **({"mode": mode, "task": task_name(args)} if mode else {})}
        checkpoint_name, finished_name = RUN_FILES[kind]
        self.checkpoint_path = os.path.join(self.dir, checkpoint_name)
        self.finished_path = os.path.join(self.dir, finished_name)
        resumed = args.resume is not None
        self.last_checkpoint = f"{self.checkpoint_path} (step {start_step:,})" if resumed else "none yet"
        self.info, self.device = {}, torch.device("cpu")
        self.resumed, self.saved = resumed, False
        sys.excepthook = self.out_of_memory  # an uncaught out-of-memory error: one line, and no half-made folder
        try:
            self.write_json("args.json", {**asdict(self.args), **self.labels, **self.started_from})
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

    def check(self, step: int, metrics: dict[str, torch.Tensor], agent) -> dict[str, float]:
        """The metrics as numbers (the loop's one host sync); stop if a metric or a weight is NaN/inf."""
        return check_finite(step, metrics, agent, self.last_checkpoint)

    def log(self, writer, step: int, values: dict[str, float]) -> None:
        """Write `values` to TensorBoard; stop if one is NaN or inf."""
        log_scalars(writer, step, values, self.last_checkpoint)

    def save(self, step: int, metrics: dict[str, torch.Tensor], agent, state: dict) -> str:
        """The checkpoint at `step`: the run's description, `state` and the random streams (never of a diverged
        run: a good checkpoint is never overwritten by a bad one)."""
        self.check(step, metrics, agent)
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
        """The finished file, written last: its presence means every file of the run is final."""
        write_json(self.finished_path, content, self.checkpoint_path)


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
