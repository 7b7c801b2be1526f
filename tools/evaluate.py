"""Evaluate a trained policy without training: a run's --save-model file or its checkpoint.pt.

    python tools/evaluate.py runs/<run>/<exp>.cleanrl_model --episodes 10
    python tools/evaluate.py runs/<run>/checkpoint.pt --episodes 100 --capture-video
    python tools/evaluate.py runs/<run>/<exp>.cleanrl_model --export policy.pt   # TorchScript: torch.jit.load alone

The evaluation is the training run's own: the env the run was scored in (D4RL's locomotion env with the run's
--legacy-inertia, D4RL's AntMaze, or the env a Minari dataset records), one episode per env, episode i started
with seed --seed + 10,000 + i, the deterministic actor, and the run's score (D4RL's normalised score, 100 x the
success rate on AntMaze). With the run's --seed and --eval-episodes it gives the run's final per-episode scores.
The per-episode scores go to `evaluation.json` beside the file (or --out); a run's own scores.json is never touched.
"""

import json
import os
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the scripts and divo_utils

from divo_utils import InputError, domain_of, is_minari_id, maze_of, robot_of  # noqa: E402
from divo_utils.policy import Policy, export_torchscript, load_actor, read_policy_file  # noqa: E402


@dataclass
class Args:
    path: tyro.conf.Positional[str]
    """a run's <exp>.cleanrl_model (--save-model) or its checkpoint.pt"""
    episodes: int = 10
    """evaluation episodes"""
    seed: Optional[int] = None
    """episode i starts with seed + 10,000 + i, as in training (default: the run's --seed)"""
    capture_video: bool = False
    """film the first episode to videos/evaluation-episode-0.mp4 beside --out"""
    out: Optional[str] = None
    """the JSON of per-episode scores (default: evaluation.json beside the file)"""
    export: Optional[str] = None
    """also write the policy as TorchScript to this file (loads with torch.jit.load, without this repository)"""


def make_envs(env_id: str, count: int, legacy_inertia: bool, **render) -> tuple[list, object]:
    """`count` evaluation envs of `env_id`, as the training run made them, and its score (returns -> scores)."""
    from divo_utils import envs as eval_envs  # imports MuJoCo: only once a video backend is chosen
    from divo_utils.data import d4rl_score, load_minari_dataset, minari_scorer

    domain = domain_of(env_id)
    if is_minari_id(env_id):
        dataset = load_minari_dataset(env_id)
        if domain == "antmaze":
            return eval_envs.make_minari_mazes(dataset, count), lambda returns: 100.0 * np.asarray(returns)
        return [eval_envs.make_minari_env(dataset, **render) for _ in range(count)], minari_scorer(dataset)[1]
    if domain == "antmaze":
        from divo_antmaze import REF_SCORES

        maze = maze_of(env_id)
        envs = [eval_envs.D4RLAntMaze(maze, eval_envs.antmaze_horizon(maze), legacy_inertia, **render)
                for _ in range(count)]
        return envs, lambda returns: d4rl_score(returns, REF_SCORES)
    from divo_continuous import REF_SCORES

    envs = [eval_envs.make_eval_env(robot_of(env_id), legacy_inertia, **render) for _ in range(count)]
    return envs, lambda returns: d4rl_score(returns, REF_SCORES[robot_of(env_id)])


def run_episodes(policy: Policy, envs: list, seed: int) -> np.ndarray:
    """One episode per env, side by side, with the deterministic policy (the scripts' evaluate()); the returns."""
    obs = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(envs)])
    returns, alive = np.zeros(len(envs)), np.ones(len(envs), dtype=bool)
    while alive.any():
        idx = np.flatnonzero(alive)
        for i, action in zip(idx, policy(obs[idx])):
            obs[i], reward, terminated, truncated, _ = envs[i].step(action)
            returns[i] += reward
            alive[i] = not (terminated or truncated)
    return returns


# The files a run's folder holds: --out and --export never replace one of them.
RUN_FILES = ("scores.json", "args.json", "progress.json", "checkpoint.pt", "pad_checkpoint.pt", "pad_diagnostics.json",
             "lock")


def check_output(flag: str, path: str, policy_file: str, example: str) -> None:
    """Stop, before any episode, where the file `path` of `flag` cannot be written or would replace a run's file."""
    name = os.path.basename(path)
    if os.path.exists(path) and os.path.realpath(path) == os.path.realpath(policy_file):
        raise InputError(f"{flag} {path} is the file evaluated: give another name")
    if name in RUN_FILES or name.endswith((".cleanrl_model", ".tmp")) or name.startswith("events.out.tfevents"):
        raise InputError(f"{flag} {path} would replace a run's own file: give another name")
    if os.path.isdir(path):
        raise InputError(f"{flag} {path} is a folder: give a file's name (e.g. {os.path.join(path, example)})")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"{flag} {path}: the folder {folder} does not exist; make it first, or give another file")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise InputError(f"{flag} {path} cannot be written: give a file in a folder you can write to")


def main(args: Args) -> dict:
    if args.episodes < 1:
        raise InputError(f"--episodes {args.episodes} is out of range: it must be at least 1")
    if args.seed is not None and args.seed < 0:
        raise InputError(f"--seed {args.seed} is out of range: it must be at least 0, as the scripts' --seed")
    payload = read_policy_file(args.path)
    policy = load_actor(args.path)
    run_args = payload.get("args") or {}
    seed = run_args.get("seed", 1) if args.seed is None else args.seed
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.path)), "evaluation.json")
    check_output("--out", out, args.path, "evaluation.json")
    if args.export:
        check_output("--export", args.export, args.path, "policy.pt")
        if os.path.realpath(args.export) == os.path.realpath(out):
            raise InputError(f"--export {args.export} is the file of the scores (--out): give another name")
    if args.capture_video:
        from divo_utils.video import check_video

        check_video()
    envs, score = make_envs(policy.env_id, args.episodes, run_args.get("legacy_inertia", True))
    space = envs[0].observation_space.shape
    if space != (policy.obs_dim,) or envs[0].action_space.shape != (policy.act_dim,):
        raise InputError(f"{args.path} holds a policy for observations of {policy.obs_dim} and actions of "
                         f"{policy.act_dim} numbers, but {policy.env_id}'s env has {space} and "
                         f"{envs[0].action_space.shape}: is the file of another env?")
    returns = run_episodes(policy, envs, seed + 10_000)
    scores = score(returns)
    for env in envs:
        env.close()
    if args.capture_video:
        from divo_utils.video import SIZE, filmed

        (env,), _ = make_envs(policy.env_id, 1, run_args.get("legacy_inertia", True), render_mode="rgb_array",
                              width=SIZE, height=SIZE)
        run_episodes(policy, [filmed(env, os.path.join(os.path.dirname(out), "videos"), "evaluation")], seed + 10_000)
    result = {"file": os.path.abspath(args.path), "env_id": policy.env_id, "seed": seed, "episodes": args.episodes,
              "step": payload.get("step"), "scores": scores.tolist(), "returns": returns.tolist(),
              "score_mean": float(scores.mean()), "score_std": float(scores.std())}
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"{policy.env_id}: score {scores.mean():.1f} +- {scores.std():.1f} over {args.episodes} episodes "
          f"(seed {seed}); per-episode scores in {out}")
    if args.export:
        export_torchscript(policy, args.export)
        print(f"TorchScript policy written to {args.export} (torch.jit.load it; raw observations in, actions out)")
    return result


if __name__ == "__main__":
    main(tyro.cli(Args))  # bad input ends in InputError: one line, `error: ...`, exit status 1
