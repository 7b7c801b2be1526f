"""The checks of the command line that every script makes: the env id, the range of every numeric argument, names,
the device, the noise schedule, the data source, and the combinations DIVO's switches refuse. Each takes the
parsed arguments and values (a domain, the schedule's betas, the defaults) and stops with one line, or returns."""

import difflib
import math
import os
from dataclasses import fields

import torch

from divo_utils import (ANTMAZE_IDS, GYM_IDS, LOCOMOTION_IDS, MAX_EXP_NAME, MAX_NAME, PAD_FILES, InputError, domain_of,
                        flag, is_folder_name, is_minari_id)
from divo_utils.video import check_video

DOMAIN_IDS = {"locomotion": LOCOMOTION_IDS, "antmaze": ANTMAZE_IDS}
DOMAIN_WORDS = {"locomotion": "a locomotion", "antmaze": "an AntMaze"}
MINARI_EXAMPLES = {"locomotion": "mujoco/hopper/medium-v0", "antmaze": "D4RL/antmaze/umaze-v1"}


def check_env_id(env_id: str, domains: tuple[str, ...], elsewhere: dict[str, str]) -> str:
    """The domain of --env-id, a D4RL id of one of `domains` or a Minari id; or stop with the valid ids, naming
    the script that takes an id of another domain (`elsewhere`: domain -> script)."""
    if is_minari_id(env_id):
        check_minari_id(env_id)
    domain = domain_of(env_id)
    d4rl_like = env_id.startswith("antmaze-") or env_id.split("-")[0] in GYM_IDS  # a misspelt id keeps its domain
    if domain not in domains and (is_minari_id(env_id) or d4rl_like):
        raise InputError(f"{env_id} is {DOMAIN_WORDS[domain]} dataset: run {elsewhere[domain]} --env-id {env_id}")
    valid = tuple(env for d in domains for env in DOMAIN_IDS[d])
    if not is_minari_id(env_id) and env_id not in valid:
        close = difflib.get_close_matches(env_id, valid, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise InputError(f"unknown --env-id {env_id!r}; {hint}valid ids: {', '.join(valid)}, or a Minari "
                         f"dataset id such as {MINARI_EXAMPLES[domains[-1]]}")
    return domain


def check_minari_id(env_id: str) -> None:
    """Stop unless `env_id` is written as Minari writes a dataset id (namespace/name-vN)."""
    from minari.dataset.minari_dataset import parse_dataset_id  # minari is imported only for a Minari id

    try:
        parse_dataset_id(env_id)
    except (ValueError, TypeError):  # TypeError: an id without -vN
        raise InputError(f"--env-id {env_id!r} is not a Minari dataset id: write namespace/name-vN, e.g. "
                         "mujoco/hopper/medium-v0 or D4RL/antmaze/umaze-v1") from None


# The range of every numeric argument of the scripts (each has some of them): a check and how the message says it.
AT_LEAST_1 = (lambda v: v >= 1, "[1, inf)")
AT_LEAST_0 = (lambda v: v >= 0, "[0, inf)")
POSITIVE = (lambda v: v > 0, "(0, inf)")
RANGES = {
    "seed": (lambda v: 0 <= v <= 2**32 - 1, "[0, 4294967295]"),
    "gamma": (lambda v: 0 <= v < 1, "[0, 1)"),
    "tau": (lambda v: 0 < v <= 1, "(0, 1]"),
    "expectile": (lambda v: 0 < v < 1, "(0, 1)"),
    **dict.fromkeys(("total_timesteps", "batch_size", "policy_freq", "diffusion_steps", "num_candidates",
                     "hidden_dim", "num_layers", "eval_episodes", "log_freq"), AT_LEAST_1),
    **dict.fromkeys(("policy_noise", "noise_clip", "alpha", "eval_freq", "checkpoint_freq", "holdout",
                     "eval_threads", "diag_freq"), AT_LEAST_0),
    **dict.fromkeys(("actor_lr", "critic_lr", "value_lr", "diffusion_lr", "beta_min", "beta_max", "pad_strength"),
                    POSITIVE),
}


def check_ranges(args) -> None:
    """Refuse a numeric argument outside its range (RANGES); NaN is outside every range."""
    for f in fields(args):
        if f.name in RANGES:
            value, (inside, words) = getattr(args, f.name), RANGES[f.name]
            if math.isnan(value) or not inside(value):
                raise InputError(f"{flag(f.name)} {value} is out of range: it must lie in {words}")


def schedule_is_finite(betas: torch.Tensor) -> bool:
    """Whether a noise schedule's betas (float64) keep the diffusion model's coefficients finite in float32: its
    alpha_bar_K = prod(1 - beta_k) is above zero in float32 (each coefficient of eq. 3-8 divides by at most it)."""
    alpha_bar = torch.cumprod(1 - betas, dim=0)
    return bool(betas.isfinite().all()) and bool(alpha_bar[-1].float() > 0)


def check_wandb() -> None:
    """--track: refuse before any file is made unless W&B can log (a key, or WANDB_MODE offline or disabled)."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return
    try:
        import netrc

        key = os.environ.get("WANDB_API_KEY") or (netrc.netrc().authenticators("api.wandb.ai") or (None,) * 3)[2]
    except (OSError, netrc.NetrcParseError):  # no ~/.netrc
        key = None
    if not key:
        raise InputError("--track logs to W&B, which has no API key here (no WANDB_API_KEY, no `wandb login`): run "
                         "`wandb login`, or set WANDB_MODE=offline to log locally, or pass --no-track; nothing was "
                         "written")


def check_common(args, capture_video: bool) -> None:
    """The checks every script makes: ranges, diagnostics' size, the device, folder names, the data, and
    --capture-video (the noise schedule: check_schedule, once the ranges allow building it)."""
    check_ranges(args)
    problems = {
        "--beta-max must be larger than --beta-min": args.beta_max <= args.beta_min,
        "--holdout must be 0 (diagnostics on training transitions) or at least 10": 0 < args.holdout < 10,
        "--cudagraphs needs a CUDA GPU (and --cuda)": args.cudagraphs and not (args.cuda and torch.cuda.is_available()),
        f"--run-name {args.run_name!r} must be a plain folder name of at most {MAX_NAME} bytes": args.run_name
        is not None and not is_folder_name(args.run_name, MAX_NAME),
        f"--exp-name {args.exp_name!r} must be a plain folder name of at most {MAX_EXP_NAME} bytes (the run's folder "
        "is named after it)": not is_folder_name(args.exp_name, MAX_EXP_NAME),
        "--dataset-path reads a D4RL-format file; a Minari id reads Minari's store: give one of them": bool(
            args.dataset_path) and is_minari_id(args.env_id),
    }
    if getattr(args, "video_each_eval", False) and not capture_video and args.resume is None:
        problems["--video-each-eval films every evaluation of --capture-video: pass --capture-video too"] = True
    for message, refused in problems.items():
        if refused:
            raise InputError(message)
    if args.track:
        check_wandb()
    if capture_video:
        check_video()  # renders offscreen and writes MP4, or one line naming the fix


def check_schedule(args, betas: torch.Tensor) -> None:
    """Refuse a noise schedule (`betas`, the script's schedule of its --beta-min, --beta-max and --diffusion-steps)
    whose coefficients are not finite in float32."""
    if not schedule_is_finite(betas):
        raise InputError(f"--beta-min {args.beta_min} and --beta-max {args.beta_max} give a noise schedule over "
                         f"{args.diffusion_steps} steps whose coefficients are not finite in float32 (alpha_bar_K "
                         "underflows): lower --beta-max")


# Arguments that only act through the diffusion model or V_psi: --no-adpo refuses them.
ADPO_ONLY_ARGS = ("value_lr", "diffusion_lr", "expectile", "diffusion_steps", "beta_min", "beta_max", "pad_strength",
                  "num_candidates", "pad_checkpoint", "freeze_pad", "pad")


def check_switches(args) -> None:
    """Refuse the combinations of DIVO's switches (--no-adpo, --no-pad, --freeze-pad) that would not do what they
    say: --freeze-pad without a pretrained model or with --no-pad, --no-adpo with values of what it does not build."""
    defaults = {f.name: f.default for f in fields(args)}
    no_effect = [flag(n, v) for n in ADPO_ONLY_ARGS if (v := getattr(args, n)) != defaults[n]]
    if args.freeze_pad and not args.pad_checkpoint:
        raise InputError("--freeze-pad keeps a pretrained diffusion model fixed: pass --pad-checkpoint too")
    if args.freeze_pad and not args.pad:
        raise InputError("--no-pad trains the diffusion model with uniform weights; --freeze-pad would not train it")
    if not args.adpo and no_effect:
        raise InputError(f"--no-adpo trains no diffusion model and no value net; these would have no effect: "
                         f"{', '.join(no_effect)}")


def check_pad_checkpoint(args) -> None:
    """A new run's --pad-checkpoint must be a file: refused from the command line, before any data loads (Args leave
    it to the command line, so that the sweep's check of a plan and the tests build them without the file)."""
    path = getattr(args, "pad_checkpoint", None)
    if path and not os.path.isfile(path):
        what = "is a folder" if os.path.isdir(path) else "does not exist"
        raise InputError(f"--pad-checkpoint {path} {what}: pass a pretraining's checkpoint file "
                         f"(runs/NAME/{PAD_FILES[0]})")
