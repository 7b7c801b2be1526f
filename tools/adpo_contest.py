"""How decisive is ADPO's contest (eq. 12) in a trained DIVO run? Reads a run's checkpoint, draws one generated
action for each of many dataset states, and compares it with the dataset action under the target critics.

Eq. 12 keeps the generated action where min_i Q'_i(s, a_gen) - V(s) >= min_i Q'_i(s, a) - V(s); V cancels, so the
contest is decided by the gap of the twin minimum. The twin critics are trained alike, so where they disagree
on the winner the gap is below what the critic resolves; |Q'_1 - Q'_2| on dataset actions is a yardstick of it.

With --margins and --num-candidates it also holds the contest with a margin kappa (a sample must win by kappa x the
twin critics' disagreement; a reading the scripts no longer have, see docs/results.md) and N candidates (the
scripts' own adpo_candidates and adpo_target) and prints, per (N, kappa), how often a sample wins, how many winners
both twin critics back, what the targets gain and how far they lie from the data: a table to choose kappa and N from.

Runs on D4RL files read their file; runs on a Minari dataset read it from Minari's local store ($MINARI_DATASETS_PATH).

Run (on finished or running DIVO runs of either script; N = 1 candidate, as the default):
    python tools/adpo_contest.py runs/hopper-medium-v2__divo__1 [more run folders] [--samples 20000]
    python tools/adpo_contest.py runs/hopper-medium-v2__divo__1 --margins 0 0.5 1 2 --num-candidates 1 4
"""

import importlib
import math
import os
import sys
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the scripts and divo_utils

from divo_utils import is_minari_id  # noqa: E402
from divo_utils.data import (dataset_fingerprint, default_dataset_path, load_d4rl_file,  # noqa: E402
                             load_minari_dataset, minari_rows)
from divo_utils.resume import refuse_mismatch  # noqa: E402
from divo_utils.runs import load_agent_state  # noqa: E402


@dataclass
class Args:
    runs: tyro.conf.Positional[list[str]] = field(default_factory=list)
    """run folders (each holding checkpoint.pt) of divo_continuous.py or divo_antmaze.py"""
    samples: int = 20_000
    """dataset states to hold the contest on (drawn once, without replacement)"""
    seed: int = 0
    """seed of the states drawn and of the diffusion model's noise"""
    margins: list[float] = field(default_factory=list)
    """also hold the contest with these margins kappa (0: eq. 12 itself), e.g. 0 0.5 1 2"""
    num_candidates: list[int] = field(default_factory=lambda: [1])
    """... and with these --num-candidates values (N), e.g. 1 4"""


def contest_stats(q_data: torch.Tensor, q_gen: torch.Tensor) -> dict[str, float]:
    """The contest of eq. 12 from the twin target critics' values (2, B) of the dataset and generated actions."""
    gap = q_gen.min(dim=0).values - q_data.min(dim=0).values  # A(s, a_gen) - A(s, a): V(s) cancels
    per_critic = q_gen - q_data  # (2, B): each critic's own verdict
    return {
        "generated_wins": (gap >= 0).float().mean().item(),
        "gap_median": gap.abs().median().item(),
        "q_mean": q_data.min(dim=0).values.mean().item(),
        "twin_agree": ((per_critic[0] >= 0) == (per_critic[1] >= 0)).float().mean().item(),
        "twin_gap_mean": (q_data[0] - q_data[1]).abs().mean().item(),
        "both_prefer_generated": (per_critic >= 0).all(dim=0).float().mean().item(),
    }


@torch.no_grad()
def margin_table(module, agent, s, a, margins: list[float], counts: list[int], seed: int) -> list[dict]:
    """Eq. (12) as the run would hold it with each N and kappa: one row per (N, kappa)."""
    q_data = agent.critic_target(s, a)
    v = agent.value(s)
    adv = q_data.min(dim=0).values - v
    rows = []
    for n in counts:
        agent.args = replace(agent.args, num_candidates=n)
        torch.manual_seed(seed)
        candidates, cand_adv = agent.adpo_candidates(s, v)
        # the twin target critics' disagreement |Q'_1 - Q'_2|, averaged over the sample and the dataset action
        q = agent.critic_target(s.repeat(n, 1), candidates.reshape(n * len(s), -1)).view(2, n, len(s))
        disagreement = (q.max(dim=0).values - q.min(dim=0).values + (q_data[0] - q_data[1]).abs()) / 2
        for kappa in margins:  # a sample must win by kappa x the disagreement (kappa = 0: eq. 12 itself)
            target, generated, _ = module.adpo_target(a, adv, candidates, cand_adv - kappa * disagreement)
            target_adv = agent.critic_target(s, target).min(dim=0).values - v
            backed = (agent.critic_target(s, target) >= q_data).all(dim=0) & generated
            rows.append({"N": n, "kappa": kappa, "generated_wins": generated.float().mean().item(),
                         "backed_by_both": (backed.sum() / generated.sum().clamp(min=1)).item(),
                         "advantage_gain": (target_adv - adv).mean().item(),
                         "target_distance": (target - a).pow(2).mean().sqrt().item()})
    return rows


class ContestError(Exception):
    """Bad input: main() prints it as one `error: ` line and exits 1."""


def minari_folder(env_id: str) -> str:
    """Where Minari's local store keeps the dataset `env_id`."""
    try:
        from minari.storage import get_dataset_path
    except ImportError:
        raise ContestError(f"{env_id} is a Minari dataset: pip install minari") from None
    return str(get_dataset_path(env_id))


def read_rows(args, path: str, obs_dim: int, act_dim: int) -> dict:
    """The run's dataset in D4RL's layout, as it trained on it: a D4RL file's rows, or a Minari dataset's episodes."""
    if is_minari_id(args.env_id):
        return minari_rows(load_minari_dataset(args.env_id), obs_dim, act_dim)
    return load_d4rl_file(path, obs_dim, act_dim)


def load_run(folder: str):
    """The script module, its restored agent, the checkpoint, its dataset's path (a Minari dataset's folder in
    Minari's store) and the sizes of its observations and actions."""
    path = os.path.join(folder, "checkpoint.pt")
    if not os.path.isfile(path):
        raise ContestError(f"no checkpoint at {path}: give the folders of divo_continuous.py or divo_antmaze.py runs")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise ContestError(f"cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0]}); it is partial or not "
                           "a checkpoint of this project") from e
    kind = payload.get("kind") if isinstance(payload, dict) else None
    if kind not in ("divo_continuous", "divo_antmaze"):
        raise ContestError(f"{path} is not a checkpoint of divo_continuous.py or divo_antmaze.py")
    module = importlib.import_module(kind)
    names = {f.name for f in fields(module.Args)} - {"cuda", "cudagraphs", "compile", "resume"}  # this process: CPU
    args = module.Args(**{k: v for k, v in payload["args"].items() if k in names}, cuda=False)
    if not args.adpo:
        raise ContestError(f"{folder} is a --no-adpo run: it has no diffusion model and no contest")
    if is_minari_id(args.env_id):  # its data: the Minari dataset, from Minari's local store (never downloaded here)
        data = minari_folder(args.env_id)
        if not os.path.isdir(os.path.join(data, "data")):
            raise ContestError(f"{folder} was trained on the Minari dataset {args.env_id}, which is not in Minari's local "
                               f"store ({data} is missing): set MINARI_DATASETS_PATH to the store that holds it, or "
                               f"run `minari download {args.env_id}`")
    else:
        data = args.dataset_path or default_dataset_path(args.env_id)
        if not os.path.isabs(data):  # a run made before paths were stored absolute: relative to where it was made
            data = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(folder))), data)
        if not os.path.isfile(data):
            raise ContestError(f"{folder} was trained on {data}, which is not there")
    obs_dim = len(payload["obs_mean"])
    act_dim = [v for k, v in payload["agent"]["actor"].items() if k.endswith("weight")][-1].shape[0]
    agent = module.DIVO(obs_dim, act_dim, args, torch.device("cpu"))
    load_agent_state(agent, payload["agent"])
    return module, agent, payload, data, obs_dim, act_dim


def read_trained_rows(folder: str, agent, payload: dict, path: str, obs_dim: int, act_dim: int) -> dict:
    """The rows of the run's dataset `path`, or stop if they are not those it trained on (their SHA-1 is not the
    checkpoint's, as --resume checks): the contest would be held on states its critics never learnt."""
    rows = read_rows(agent.args, path, obs_dim, act_dim)
    refuse_mismatch(os.path.join(folder, "checkpoint.pt"), {}, {}, f"{path} changed since the run trained on it (its "
                    "SHA-1 is not the checkpoint's dataset_sha1): put back the file the run was trained on",
                    same_data=dataset_fingerprint(rows) == payload["dataset_sha1"])
    return rows


def main(args: Args) -> None:
    try:  # every argument and run before any work
        if not args.runs:
            raise ContestError("give one or more run folders, e.g. runs/hopper-medium-v2__divo__1")
        if args.samples < 1 or not 0 <= args.seed < 2**32:
            raise ContestError(f"--samples must be at least 1 and --seed in [0, 4294967295], got {args.samples} and "
                               f"{args.seed}")
        if not all(math.isfinite(kappa) and kappa >= 0 for kappa in args.margins):
            raise ContestError(f"--margins takes finite numbers >= 0, got "
                               f"{' '.join(f'{kappa:g}' for kappa in args.margins)}")
        if not args.num_candidates:
            raise ContestError("--num-candidates needs at least one count N, e.g. 1 4")
        if min(args.num_candidates) < 1:
            raise ContestError(f"--num-candidates takes counts of at least 1, got "
                               f"{' '.join(map(str, args.num_candidates))}")
        runs = [load_run(folder) for folder in args.runs]
        datasets = [read_trained_rows(folder, agent, payload, path, obs_dim, act_dim)
                    for folder, (_, agent, payload, path, obs_dim, act_dim) in zip(args.runs, runs)]
    except ContestError as e:
        raise SystemExit(f"error: {e}") from None
    for folder, (module, agent, payload, _, obs_dim, act_dim), dataset in zip(args.runs, runs, datasets):
        transitions = module.qlearning_dataset(dataset)
        n = len(transitions["rewards"])
        rows = np.random.default_rng(args.seed).choice(n, min(args.samples, n), replace=False)
        mean, std = payload["obs_mean"].numpy(), payload["obs_std"].numpy()
        data = module.to_device(transitions, rows, mean, std, torch.device("cpu"))
        s, a = data["observations"], data["actions"].clamp(-1.0, 1.0)
        torch.manual_seed(args.seed)
        with torch.no_grad():
            generated = agent.diffusion.sample(s)
            stats = contest_stats(agent.critic_target(s, a), agent.critic_target(s, generated))
        distance = (generated - a).pow(2).mean().sqrt().item()
        print(f"{folder} (step {payload['step']:,}, {len(rows):,} states):\n"
              f"  generated action wins eq. 12        {stats['generated_wins']:.3f}\n"
              f"  |A(gen) - A(data)|, median          {stats['gap_median']:.3f}   (mean Q' {stats['q_mean']:.1f})\n"
              f"  twin critics agree on the winner    {stats['twin_agree']:.3f}\n"
              f"  |Q'_1 - Q'_2| on dataset actions    {stats['twin_gap_mean']:.3f}\n"
              f"  both critics prefer the generated   {stats['both_prefer_generated']:.3f}\n"
              f"  RMS distance generated - dataset    {distance:.3f}")
        if args.margins:
            print("  N  kappa  sample wins  winners both critics back  A(target) - A(data)  RMS target - data")
            for row in margin_table(module, agent, s, a, args.margins, args.num_candidates, args.seed):
                print(f"  {row['N']:<2d} {row['kappa']:<6g} {row['generated_wins']:>11.3f}  {row['backed_by_both']:>25.3f}"
                      f"  {row['advantage_gain']:>19.3f}  {row['target_distance']:>16.3f}")


if __name__ == "__main__":
    main(tyro.cli(Args))
