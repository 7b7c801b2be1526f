"""--resume, in one place: the command line under a run's own arguments (its folder locked first), what may differ
from them, and the run's state restored (networks, optimisers, random streams, history), or a new run's start from a
pretrained PAD model (--pad-checkpoint)."""

import json
import os
import sys
from dataclasses import fields, replace
from typing import Literal, Optional, Union, get_args, get_origin, get_type_hints

import torch
import torch.nn as nn
import tyro

from divo_utils import PAD_FILES, PATH_ARGS, InputError, flag
from divo_utils.args import check_pad_checkpoint
from divo_utils.files import check_writable, lock_run
from divo_utils.runs import load_agent_state, load_checkpoint, out_of_memory_before_the_run

# Arguments that may differ between a checkpoint and the command that resumes it (a script has some of them).
RESUME_FREE_ARGS = {"resume", "cuda", "track", "wandb_project_name", "wandb_entity", "total_timesteps",
                    "dataset_path", "log_freq", "eval_freq", "checkpoint_freq", "save_model", "compile", "cudagraphs",
                    "eval_threads", "diag_freq", "capture_video", "video_each_eval"}


def parse_args(args_class, script: str, files: tuple[str, str]):
    """The command line of a script (`script`: the label its checkpoints carry; `files`: its checkpoint's and finished
    file's names); with --resume, the run's arguments under those given, and its checkpoint (None: restart it).
    Stops unless the run's folder can be written.

    A resumed run's folder is locked first, so that nothing is read, kept or removed while another process writes it.
    """
    args, checkpoint = read_command_line(args_class, script, files)
    sys.excepthook = out_of_memory_before_the_run  # networks too large for memory: one line (Run takes over)
    check_writable(os.path.dirname(args.resume) if checkpoint else "runs", "run where the run's folder can be written")
    return args, checkpoint


def absolute_paths(args):
    """`args` with the files a run reads as absolute paths: the run resumes from any folder."""
    present = {f.name for f in fields(args)}
    return replace(args, **{name: os.path.abspath(getattr(args, name)) for name in PATH_ARGS
                            if name in present and getattr(args, name)})


def read_command_line(args_class, script: str, files: tuple[str, str]):
    """parse_args without the check of the run's folder."""
    checkpoint_name, finished_name = files
    args = tyro.cli(args_class)
    if args.resume is None:
        if args.run_name and os.path.exists(os.path.join("runs", args.run_name)):
            raise InputError(f"runs/{args.run_name} exists: choose another --run-name, or continue that run with "
                             f"--resume runs/{args.run_name}/{checkpoint_name}")
        check_pad_checkpoint(args)  # a new run reads it once its data are loaded: check it now
        if getattr(args, "pad_checkpoint", None):  # and what it holds (a DIVO checkpoint, a truncated file)
            load_checkpoint(args.pad_checkpoint, "pad_pretrain")
        return absolute_paths(args), None
    if os.path.isdir(args.resume):  # --resume runs/NAME: that run's checkpoint
        args = replace(args, resume=os.path.join(args.resume, checkpoint_name))
    folder = os.path.dirname(args.resume) or "."  # "." when resumed from inside the run's folder
    resume = os.path.join(folder, os.path.basename(args.resume))
    if os.path.basename(resume) == "args.json":
        raise InputError(f"{resume} holds a run's arguments, not a checkpoint: resume with --resume "
                         f"{os.path.join(folder, checkpoint_name)}")
    if not os.path.isfile(resume) and not os.path.isfile(os.path.join(folder, "args.json")):
        raise InputError(f"no checkpoint at {resume}, and no args.json beside it (if that folder is of a run that "
                         "stopped before it began, remove it and start the run again)")
    lock_run(folder)  # held until this process ends
    checkpoint, saved = resume_point(resume, script, files)
    source = f"{resume}'s arguments" if checkpoint else os.path.join(folder, "args.json")
    values = {f.name: saved[f.name] for f in fields(args_class) if f.name in saved}
    check_types(values, args_class, source)
    origin = os.path.dirname(os.path.dirname(os.path.abspath(folder)))  # where runs/{run_name} was made
    for name in PATH_ARGS:  # a run made before paths were stored absolute: relative to where it was made
        if values.get(name) and not os.path.isabs(values[name]):
            values[name] = os.path.join(origin, values[name])
    values["run_name"] = os.path.basename(os.path.abspath(folder))  # a copied run is the run of its own folder
    try:  # --cudagraphs depends on this machine: it is checked once the command line (e.g. --no-cudagraphs) applies
        saved = args_class(**{**values, "resume": resume, "cudagraphs": False})
    except InputError as e:  # a value the checks refuse came from the run's files, not from the command line
        raise InputError(f"{source} (run {values['run_name']}): {str(e).removeprefix('error: ')}") from e
    saved.cudagraphs = values.get("cudagraphs", False)
    args = absolute_paths(replace(tyro.cli(args_class, default=saved), resume=resume))
    names = [f.name for f in fields(args_class) if f.name not in RESUME_FREE_ARGS]
    refuse_mismatch(resume, {n: getattr(args, n) for n in names}, {n: getattr(saved, n) for n in names},
                    f"resume with `--resume {resume}` and the original arguments, or start a new run without --resume")
    step = checkpoint["step"] if checkpoint else 0
    if step > args.total_timesteps or step == args.total_timesteps and os.path.exists(
            os.path.join(folder, finished_name)):
        state = "finished" if step == args.total_timesteps else f"at step {step:,}, beyond --total-timesteps"
        results = f"; its results are in {folder}" if os.path.exists(os.path.join(folder, finished_name)) else ""
        raise InputError(f"{resume} is {state} ({step:,} of {args.total_timesteps:,} steps{results}). To train it "
                         f"longer, pass --total-timesteps larger than {step:,}")
    if checkpoint is None:
        print(f"{folder} has no {checkpoint_name}: the run stopped before its first one, and starts again from step 0")
    return args, checkpoint


def fits(value, hint) -> bool:
    """Whether a value read back from a run's files has the type of its argument (bool, int, float, str, Optional,
    Literal; other annotations are not checked)."""
    if get_origin(hint) is Union:
        return any(fits(value, h) for h in get_args(hint))
    if get_origin(hint) is Literal:
        return value in get_args(hint)
    if hint is type(None):
        return value is None
    if hint in (int, float):
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    return isinstance(value, hint) if hint in (bool, str) else True


def check_types(values: dict, args_class, source: str) -> None:
    """Stop with one line if a value of a run's files (`source`: a hand-edited args.json, say) is not of its
    argument's type."""
    hints = get_type_hints(args_class)
    for name, value in values.items():
        if not fits(value, hints[name]):
            raise InputError(f"{source}: {name} is {value!r}, not a value of {flag(name)} "
                             f"({getattr(hints[name], '__name__', hints[name])}): correct it, or start a new run")


def resume_point(path: str, script: str, files: tuple[str, str]) -> tuple[Optional[dict], dict]:
    """--resume PATH: its checkpoint and that checkpoint's arguments; for a run that stopped before its first
    checkpoint (an args.json, no checkpoint, no results), None and the arguments of its args.json."""
    checkpoint_name, finished_name = files
    folder, args_path = os.path.dirname(path), os.path.join(os.path.dirname(path), "args.json")
    if os.path.basename(path) != checkpoint_name or os.path.exists(path) or os.path.exists(
            os.path.join(folder, finished_name)):
        checkpoint = load_checkpoint(path, script)
        newer = os.path.join(folder, checkpoint_name)
        if os.path.basename(path) != checkpoint_name and os.path.isfile(newer):  # a copy beside the run's own
            theirs = load_checkpoint(newer, script)
            if theirs["step"] > checkpoint["step"]:
                raise InputError(f"{path} is at step {checkpoint['step']:,}, and this folder's {checkpoint_name} (which "
                                 f"the run would overwrite) at step {theirs['step']:,}: resuming would go backwards "
                                 f"over it. Resume {newer}, or copy {path} into a folder of its own first")
        return checkpoint, checkpoint["args"]
    try:
        with open(args_path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"no checkpoint at {path}, and {args_path} is unreadable ({e}): start a new run") from e
    if not isinstance(saved, dict) or saved.get("script") != script:
        raise InputError(f"no checkpoint at {path}, and {args_path} is not of a {script}.py run")
    return None, saved


def refuse_mismatch(path: str, ours: dict, theirs: dict, fix: str, same_data: bool = True) -> None:
    """Stop with one message if a checkpoint was made with other values of `ours` or on other data."""
    differences = [f"{flag(name)} {value!r} here, {theirs.get(name)!r} in the checkpoint"
                   for name, value in ours.items() if theirs.get(name) != value]
    if not same_data:
        differences.insert(0, "it was trained on another dataset than this one")
    if differences:
        raise InputError(f"{path} does not match this run: {'; '.join(differences)}. To fix: {fix}")


def load_pretrained_pad(agent, args, fingerprint: str, pad_script: str, reward_transform: str) -> dict:
    """--pad-checkpoint: start the diffusion model, critics and value net from a checkpoint of `pad_script` (the
    pretraining's label), made with the same sizes and learning from the same reward (`reward_transform`). Returns
    what was loaded (its step, the SHA-1 of the file's bytes, whether that pretraining had finished), for args.json:
    the path alone does not say, since a pretraining that still trains rewrites its checkpoint."""
    pad = load_checkpoint(args.pad_checkpoint, pad_script)
    names = ("diffusion_steps", "beta_min", "beta_max", "hidden_dim", "num_layers")
    names += ("gamma", "expectile") if args.freeze_pad else ()  # a frozen model keeps the advantages it learnt from
    ours = {"reward_transform": reward_transform, **{n: getattr(args, n) for n in names}}
    theirs = " ".join(f"{flag(n)} {pad['args'][n]}" for n in names
                      if n in pad["args"] and pad["args"][n] != getattr(args, n))  # the checkpoint's own values
    fix = "pretrain with the same values" + (" (this run learns from r: --reward-transform none)"
                                             if reward_transform == "none" else "") + " on the dataset you train on"
    fix += f", or pass the checkpoint's values ({theirs})" if theirs else ""
    refuse_mismatch(args.pad_checkpoint, ours, pad["args"], fix, same_data=pad["dataset_sha1"] == fingerprint)
    for name in ("diffusion", "critic", "critic_target", "value"):
        getattr(agent, name).load_state_dict(pad[name])
    total = pad["args"].get("total_timesteps")
    finished = pad["step"] == total and os.path.isfile(
        os.path.join(os.path.dirname(args.pad_checkpoint), PAD_FILES[1]))
    print(f"loaded the PAD model, critics and value net of {args.pad_checkpoint} (step {pad['step']:,}, SHA-1 "
          f"{pad['file_sha1'][:12]})" + (" (diffusion model frozen)" if args.freeze_pad else ""))
    if not finished:
        print(f"warning: that pretraining has not finished (step {pad['step']:,} of {total:,}, or no "
              f"{PAD_FILES[1]} beside it): if it still trains, its checkpoint will change; this run "
              "records the step and SHA-1 it loaded in its args.json")
    return {"pad_checkpoint_step": pad["step"], "pad_checkpoint_sha1": pad["file_sha1"],
            "pad_checkpoint_finished": finished}


def restore_run(agent, args, checkpoint: Optional[dict], fingerprint: str, history: str = "evaluations",
                pad_script: Optional[str] = None, reward_transform: str = "none",
                **extra: nn.Module) -> tuple[int, list, dict]:
    """The step and history (evaluations, or pretraining's diagnostics) to start from: a resumed run's (networks,
    optimisers, RNG, and the `extra` modules saved under their names), or a new run's (with --pad-checkpoint, where
    `pad_script` labels pretraining checkpoints, the pretrained PAD model's); and what the run started from (the PAD
    checkpoint loaded, see load_pretrained_pad)."""
    if checkpoint is None:
        if pad_script and args.pad_checkpoint:
            return 0, [], load_pretrained_pad(agent, args, fingerprint, pad_script, reward_transform)
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
