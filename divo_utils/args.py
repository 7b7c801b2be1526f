"""The command line: range checks, the checks every script makes, and --resume (a run's own arguments)."""

import difflib
import json
import os
import sys
from dataclasses import fields, replace
from typing import Optional

import torch
import tyro

from divo_utils import (ANTMAZE_IDS, LOCOMOTION_IDS, MAX_EXP_NAME, MAX_NAME, PATH_ARGS, RUN_FILES, InputError, flag,
                        is_folder_name, is_minari_id)

# Arguments that may differ between a checkpoint and the command that resumes it (a script has some of them).
RESUME_FREE_ARGS = {"resume", "cuda", "track", "wandb_project_name", "wandb_entity", "total_timesteps",
                    "dataset_path", "log_freq", "eval_freq", "checkpoint_freq", "save_model", "compile", "cudagraphs",
                    "eval_threads", "diag_freq", "capture_video", "video_each_eval"}


def check_env_id(env_id: str, kind: str) -> Optional[str]:
    """What a script needs to know of --env-id, or stop with the valid ids (and the script that takes it):
    divo_continuous: the robot (None for a Minari id); divo_antmaze: the maze ("umaze", "medium" or
    "large"), which picks --alpha; pad_pretrain: the domain ("locomotion" or "antmaze")."""
    from divo_utils.data import parse_minari_id

    domain, name = parse_minari_id(env_id) if is_minari_id(env_id) else (
        "antmaze" if env_id.startswith("antmaze-") else "locomotion", env_id)
    if kind == "divo_continuous" and domain == "antmaze":
        raise InputError(f"{env_id} is an AntMaze dataset: run divo_antmaze.py --env-id {env_id}")
    if kind == "divo_antmaze" and is_minari_id(env_id) and domain != "antmaze":
        raise InputError(f"{env_id} is not an AntMaze dataset: run divo_continuous.py --env-id {env_id}")
    if kind == "divo_antmaze" and env_id.split("-")[0] in ("halfcheetah", "hopper", "walker2d"):
        raise InputError(f"{env_id} is a locomotion dataset: run divo_continuous.py --env-id {env_id}")
    if kind == "divo_antmaze" and is_minari_id(env_id) and name.split("-")[0] not in ("umaze", "medium", "large"):
        raise InputError(f"the Minari AntMaze id {env_id} must name its maze first (umaze, medium or large), as "
                         "D4RL/antmaze/medium-play-v1 does: it picks --alpha")
    if not is_minari_id(env_id):
        valid = {"divo_continuous": LOCOMOTION_IDS, "divo_antmaze": ANTMAZE_IDS}.get(kind, LOCOMOTION_IDS + ANTMAZE_IDS)
        example = "D4RL/antmaze/umaze-v1" if kind == "divo_antmaze" else "mujoco/hopper/medium-v0"
        if env_id not in valid:
            close = difflib.get_close_matches(env_id, valid, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise InputError(f"unknown --env-id {env_id!r}; {hint}valid ids: {', '.join(valid)}, or a Minari "
                             f"dataset id such as {example}")
    if kind == "divo_continuous":
        return None if is_minari_id(env_id) else env_id.split("-")[0]
    if kind == "divo_antmaze":
        return name.split("-")[0] if is_minari_id(env_id) else env_id.split("-")[1]
    return domain


def check_ranges(args, ranges: dict[str, str]) -> None:
    """Refuse a numeric argument outside its interval ("[" closed, "(" open, e.g. "[0, inf)"); NaN is outside all."""
    for name, interval in ranges.items():
        value = getattr(args, name)
        low, high = (float(bound) for bound in interval[1:-1].split(","))
        above = low <= value if interval[0] == "[" else low < value
        below = value <= high if interval[-1] == "]" else value < high
        if not (above and below):  # also refuses NaN
            raise InputError(f"{flag(name)} {value} is out of range: it must lie in {interval}")


def schedule_is_finite(diffusion_class, num_steps: int, beta_min: float, beta_max: float) -> bool:
    """Whether the diffusion model's schedule (eq. 3-8) is finite in float32, with alpha_bar_K > 0."""
    with torch.random.fork_rng(devices=[]):  # building the model draws its initial weights
        d = diffusion_class(1, 1, num_steps, beta_min, beta_max, 1, 1)
    sampler = [d.sqrt_recip_alpha_bar, d.sqrt_recipm1_alpha_bar, d.posterior_coef_a0, d.posterior_coef_ak,
               d.posterior_std]
    values = torch.cat([d.sqrt_alpha_bar, d.sqrt_one_minus_alpha_bar, torch.tensor(sampler).flatten()])
    return bool(values.isfinite().all()) and bool(d.sqrt_alpha_bar[-1] > 0)


def check_common(args, diffusion_class) -> None:
    """The checks every script makes: diagnostics' size, the device, folder names, the noise schedule, the data."""
    problems = {
        "--beta-max must be larger than --beta-min": args.beta_max <= args.beta_min,
        "--holdout must be 0 (diagnostics on training transitions) or at least 10": 0 < args.holdout < 10,
        "--cudagraphs needs a CUDA GPU (and --cuda)": args.cudagraphs and not (args.cuda and torch.cuda.is_available()),
        f"--run-name {args.run_name!r} must be a plain folder name of at most {MAX_NAME} bytes": args.run_name
        is not None and not is_folder_name(args.run_name, MAX_NAME),
        f"--exp-name {args.exp_name!r} must be a plain folder name of at most {MAX_EXP_NAME} bytes (the run's folder "
        "is named after it)": not is_folder_name(args.exp_name, MAX_EXP_NAME),
        f"--beta-min {args.beta_min} and --beta-max {args.beta_max} give a noise schedule over {args.diffusion_steps} "
        "steps whose coefficients are not finite in float32 (alpha_bar_K underflows): lower --beta-max":
        args.beta_max > args.beta_min
        and not schedule_is_finite(diffusion_class, args.diffusion_steps, args.beta_min, args.beta_max),
        "--dataset-path reads a D4RL-format file; a Minari id reads Minari's store: give one of them": bool(
            args.dataset_path) and is_minari_id(args.env_id),
    }
    for message, refused in problems.items():
        if refused:
            raise InputError(message)
    if getattr(args, "capture_video", False):
        from divo_utils.video import check_video

        check_video()  # renders offscreen and writes MP4, or one line naming the fix


def parse_args(args_class, kind: str):
    """The command line of the script `kind`; with --resume, the run's arguments under those given, and its
    checkpoint (None: restart it). Stops unless the run's folder can be written.

    A resumed run's folder is locked first, so that nothing is read, kept or removed while another process writes it.
    """
    args, checkpoint = read_command_line(args_class, kind)
    from divo_utils.runs import check_writable, out_of_memory_before_the_run

    sys.excepthook = out_of_memory_before_the_run  # networks too large for memory: one line (Run takes over)

    check_writable(os.path.dirname(args.resume) if checkpoint else "runs", "run where the run's folder can be written")
    return args, checkpoint


def read_command_line(args_class, kind: str):
    """parse_args without the check of the run's folder."""
    from divo_utils.runs import lock_run

    checkpoint_name, finished_name = RUN_FILES[kind]
    argv = sys.argv[1:]
    for i, arg in enumerate(argv):  # our message for a wrong id (the nearest id, the other script) before tyro's
        name, has_value, value = arg.partition("=")
        if name in ("--env-id", "--env_id") and (has_value or i + 1 < len(argv)):
            check_env_id(value if has_value else argv[i + 1], kind)
    args = tyro.cli(args_class)
    if args.resume is None:
        if args.run_name and os.path.exists(os.path.join("runs", args.run_name)):
            raise InputError(f"runs/{args.run_name} exists: choose another --run-name, or continue that run with "
                             f"--resume runs/{args.run_name}/{checkpoint_name}")
        # the files a run reads, as absolute paths: the run resumes from any folder
        return replace(args, **{name: os.path.abspath(getattr(args, name)) for name in PATH_ARGS
                                if getattr(args, name, None)}), None
    folder = os.path.dirname(args.resume) or "."  # "." when resumed from inside the run's folder
    resume = os.path.join(folder, os.path.basename(args.resume))
    if not os.path.isfile(resume) and not os.path.isfile(os.path.join(folder, "args.json")):
        raise InputError(f"no checkpoint at {resume}, and no args.json beside it (if that folder is of a run that "
                         "stopped before it began, remove it and start the run again)")
    lock_run(folder)  # held until this process ends
    checkpoint, saved = resume_point(resume, kind)
    values = {f.name: saved[f.name] for f in fields(args_class) if f.name in saved}
    origin = os.path.dirname(os.path.dirname(os.path.abspath(folder)))  # where runs/{run_name} was made
    for name in PATH_ARGS:  # a run made before paths were stored absolute: relative to where it was made
        if values.get(name) and not os.path.isabs(values[name]):
            values[name] = os.path.join(origin, values[name])
    values["run_name"] = values.get("run_name") or os.path.basename(os.path.abspath(folder))
    # --cudagraphs depends on this machine: it is checked once the command line (e.g. --no-cudagraphs) applies
    saved = args_class(**{**values, "resume": resume, "cudagraphs": False})
    saved.cudagraphs = values.get("cudagraphs", False)
    args = replace(tyro.cli(args_class, default=saved), resume=resume)
    args = replace(args, **{name: os.path.abspath(getattr(args, name)) for name in PATH_ARGS if getattr(args, name, None)})
    names = [f.name for f in fields(args_class) if f.name not in RESUME_FREE_ARGS]
    refuse_mismatch(resume, {n: getattr(args, n) for n in names}, {n: getattr(saved, n) for n in names},
                    f"resume with `--resume {resume}` and the original arguments, or start a new run without --resume")
    done = checkpoint["step"] if checkpoint else 0
    if done > args.total_timesteps or done == args.total_timesteps and os.path.exists(
            os.path.join(folder, finished_name)):
        state = "finished" if done == args.total_timesteps else f"at step {done:,}, beyond --total-timesteps"
        raise InputError(f"{resume} is {state} ({done:,} of {args.total_timesteps:,} steps; its results are in "
                         f"{folder}). To train it longer, pass --total-timesteps larger than {done:,}")
    if checkpoint is None:
        print(f"{folder} has no {checkpoint_name}: the run stopped before its first one, and starts again from step 0")
    return args, checkpoint


def resume_point(path: str, kind: str) -> tuple[Optional[dict], dict]:
    """--resume PATH: its checkpoint and that checkpoint's arguments; for a run that stopped before its first
    checkpoint (an args.json, no checkpoint, no results), None and the arguments of its args.json."""
    from divo_utils.runs import load_checkpoint

    checkpoint_name, finished_name = RUN_FILES[kind]
    folder, args_path = os.path.dirname(path), os.path.join(os.path.dirname(path), "args.json")
    if os.path.basename(path) != checkpoint_name or os.path.exists(path) or os.path.exists(
            os.path.join(folder, finished_name)):
        checkpoint = load_checkpoint(path, kind)
        return checkpoint, checkpoint["args"]
    try:
        with open(args_path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"no checkpoint at {path}, and {args_path} is unreadable ({e}): start a new run") from e
    if not isinstance(saved, dict) or saved.get("script") != kind:
        raise InputError(f"no checkpoint at {path}, and {args_path} is not of a {kind}.py run")
    return None, saved


def refuse_mismatch(path: str, ours: dict, theirs: dict, fix: str, same_data: bool = True) -> None:
    """Stop with one message if a checkpoint was made with other values of `ours` or on other data."""
    differences = [f"{flag(name)} {value!r} here, {theirs.get(name)!r} in the checkpoint"
                   for name, value in ours.items() if theirs.get(name) != value]
    if not same_data:
        differences.insert(0, "it was trained on another dataset than this one")
    if differences:
        raise InputError(f"{path} does not match this run: {'; '.join(differences)}. To fix: {fix}")
