"""Gradient steps per second of the training iteration: eager, --compile and --cudagraphs side by side, on the same
data, with the TD3+BC backbone (--no-adpo) beside DIVO, and the time of each part of the iteration.

It imports the training scripts and times their own update functions (the scripts keep only their in-loop
`charts/SPS`). Data: the dataset file given, else the cached D4RL file if there is one, else a million random
transitions of the task's shapes (speed does not depend on the values). A Minari id (mujoco/hopper/medium-v0) times
on that dataset, read from Minari's local store ($MINARI_DATASETS_PATH; it is not downloaded here).

With --runs-per-gpu K [K ...] it also runs K copies of the iteration side by side on one device (K processes, as
tools/sweep.py --runs-per-gpu packs runs), DIVO and backbone, and prints their aggregate steps per second and what the
paper's grid (15 tasks x 5 seeds x 1M gradient steps, DIVO and its backbone, evaluation not included) costs at that rate.

Run:
    python tools/benchmark.py --env-id hopper-medium-v2 --cuda
    python tools/benchmark.py --env-id hopper-medium-v2 --cuda --modes cudagraphs --runs-per-gpu 1 2 4 8
    python tools/benchmark.py --env-id halfcheetah-medium-expert-v2 --cuda --steps 5000
    python tools/benchmark.py --env-id antmaze-medium-play-v2 --cuda
    python tools/benchmark.py --env-id mujoco/hopper/medium-v0 --cuda
    python tools/benchmark.py --env-id hopper-medium-v2 --script pad_pretrain --modes eager compile --no-cuda
"""

import importlib
import multiprocessing
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

import numpy as np
import torch
import tyro

# torch.compile on a CPU warns through torch._logging about what it cannot fuse: not about the measurement
warnings.filterwarnings("ignore", module=r"torch\._logging.*")
warnings.filterwarnings("ignore", module=r"torch\._inductor.*")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the scripts and divo_utils

from divo_utils import domain_of, is_minari_id, robot_of  # noqa: E402
from divo_utils.data import (D4RL_DIMS, default_dataset_path, load_d4rl_file, load_minari_dataset,  # noqa: E402
                             minari_dims, minari_rows)
from divo_utils.speed import GraphedTrainStep, compile_updates, training_state  # noqa: E402

Mode = Literal["eager", "compile", "cudagraphs", "compile+cudagraphs"]


@dataclass
class Args:
    env_id: str = "hopper-medium-v2"
    """a D4RL id, or a Minari one in Minari's local store: it picks the DIVO script (divo_continuous or divo_antmaze)
    and the data's shapes"""
    script: Literal["divo", "pad_pretrain"] = "divo"
    """time DIVO's iteration (and its TD3+BC backbone), or pad_pretrain.py's"""
    dataset_path: Optional[str] = None
    """a D4RL-format file to draw batches from (default: the cached D4RL file, else random transitions)"""
    modes: list[Mode] = field(default_factory=lambda: ["eager", "compile", "cudagraphs", "compile+cudagraphs"])
    """how to run the iteration: plain PyTorch, torch.compile, CUDA graphs (needs a GPU), or compiled code captured
    as CUDA graphs (the scripts' `--compile --cudagraphs`)"""
    steps: int = 2000
    """timed gradient steps per mode, after the warm-up"""
    warmup: int = 200
    """untimed gradient steps first (compilation and graph capture happen there)"""
    parts: bool = True
    """also time each part of the iteration alone (eager)"""
    cuda: bool = True
    """use the GPU when there is one"""
    batch_size: int = 256
    """the batch size of every update"""
    hidden_dim: int = 256
    """width of every hidden layer"""
    num_layers: int = 3
    """number of hidden layers of every network"""
    diffusion_steps: int = 5
    """number of DDPM steps K"""
    num_candidates: int = 1
    """N of eq. (12) (DIVO's; pad_pretrain has no contest)"""
    runs_per_gpu: list[int] = field(default_factory=list)
    """also time K copies side by side on the device, for each K given (e.g. 1 2 4 8): aggregate steps per second"""


class BenchmarkError(Exception):
    """Bad input: main() prints it as one `error: ` line and exits 1."""


def load_script(args: Args):
    """The training script's module: pad_pretrain, or the DIVO script of the env id's domain."""
    if args.script == "pad_pretrain":
        return importlib.import_module("pad_pretrain")
    antmaze = domain_of(args.env_id.lower()) == "antmaze"  # AntMaze-umaze-v2 too: the script names the id
    return importlib.import_module("divo_antmaze" if antmaze else "divo_continuous")


def check_args(args: Args, module) -> None:
    """Stop with one message for arguments that cannot make a benchmark, before any data is read or made."""
    if args.steps < 1 or args.warmup < 0:
        raise BenchmarkError(f"--steps must be at least 1 and --warmup at least 0, got {args.steps} and {args.warmup}")
    if not args.modes:
        raise BenchmarkError("--modes needs at least one of eager, compile, cudagraphs, compile+cudagraphs")
    if any(copies < 1 for copies in args.runs_per_gpu):
        raise BenchmarkError(f"--runs-per-gpu takes counts of at least 1, got {' '.join(map(str, args.runs_per_gpu))}")
    if args.script == "pad_pretrain" and args.num_candidates != 1:
        raise BenchmarkError(f"--num-candidates {args.num_candidates} is N of DIVO's contest (eq. 12), which "
                             "pad_pretrain has not: leave it out with --script pad_pretrain")
    if args.script == "pad_pretrain" and args.runs_per_gpu:
        raise BenchmarkError("--runs-per-gpu times DIVO and its backbone side by side, not pad_pretrain: leave it out "
                             "with --script pad_pretrain")
    if args.dataset_path is not None and os.path.isdir(args.dataset_path):
        raise BenchmarkError(f"--dataset-path {args.dataset_path} is a folder: pass the D4RL-format HDF5 file itself")
    if args.dataset_path is not None and not os.path.isfile(args.dataset_path):
        raise BenchmarkError(f"--dataset-path {args.dataset_path}: no such file (leave it out to use the cached D4RL "
                             "file, or else random transitions)")
    run_args(module, args)  # the script's own checks of the env id and the sizes (its one-line InputError)
    if is_minari_id(args.env_id):
        from minari.storage import get_dataset_path

        if not os.path.isdir(os.path.join(get_dataset_path(args.env_id), "data")):  # what minari.load_dataset reads
            raise BenchmarkError(f"the Minari dataset {args.env_id} is not in Minari's local store {get_dataset_path()}, "
                                 "and the benchmark does not download it: run `minari download "
                                 f"{args.env_id}`, or set MINARI_DATASETS_PATH to a store that holds it")


def run_args(module, args: Args, **overrides):
    """The script's Args with the benchmark's sizes."""
    sizes = {"env_id": args.env_id, "batch_size": args.batch_size, "hidden_dim": args.hidden_dim,
             "num_layers": args.num_layers, "cuda": args.cuda, **overrides}
    if overrides.get("adpo", True):  # --no-adpo refuses the diffusion model's arguments
        sizes["diffusion_steps"] = args.diffusion_steps
        if not hasattr(module, "PADPretrainer"):
            sizes["num_candidates"] = args.num_candidates
    return module.Args(**sizes)  # the script's checks run


def shapes(module, env_id: str) -> tuple[int, int]:
    """Observation and action sizes of the task (without building its env): a Minari dataset's own."""
    if is_minari_id(env_id):
        return minari_dims(load_minari_dataset(env_id))
    return D4RL_DIMS["antmaze" if domain_of(env_id) == "antmaze" else robot_of(env_id)]


def load_data(module, args: Args, obs_dim: int, act_dim: int, device: torch.device) -> tuple[dict, str]:
    """Transitions on the device, as the script prepares them, and where they came from."""
    path = None if is_minari_id(args.env_id) else args.dataset_path or default_dataset_path(args.env_id)
    if path is None:  # a Minari dataset, in the store (check_args): read, never downloaded
        dataset = load_minari_dataset(args.env_id)
        transitions = module.qlearning_dataset(minari_rows(dataset, obs_dim, act_dim))
        source = f"the Minari dataset {args.env_id} ({dataset.spec.data_path})"
    elif os.path.isfile(path):
        transitions = module.qlearning_dataset(load_d4rl_file(path, obs_dim, act_dim))
        source = path
    else:
        n, rng = 1_000_000, np.random.default_rng(0)
        transitions = {"observations": rng.standard_normal((n, obs_dim), dtype=np.float32),
                       "actions": rng.uniform(-1, 1, (n, act_dim)).astype(np.float32),
                       "rewards": rng.standard_normal(n, dtype=np.float32), "terminals": rng.random(n) < 1e-3}
        transitions["next_observations"] = np.roll(transitions["observations"], -1, axis=0)
        source = f"{n:,} random transitions (no dataset at {path})"
    transitions["actions"] = np.clip(transitions["actions"], -1.0, 1.0)
    mean, std = transitions["observations"].mean(axis=0), transitions["observations"].std(axis=0) + 1e-3
    rows = np.arange(len(transitions["rewards"]))
    return module.to_device(transitions, rows, mean, std, device), source


def build(module, args: Args, obs_dim: int, act_dim: int, device: torch.device, **overrides):
    """The script's agent (DIVO, or PADPretrainer) with the benchmark's sizes."""
    agent = module.PADPretrainer if hasattr(module, "PADPretrainer") else module.DIVO
    return agent(obs_dim, act_dim, run_args(module, args, cuda=device.type == "cuda", **overrides), device)


def steps_per_second(step: Callable[[int], object], steps: int, warmup: int, device: torch.device,
                     timings: Optional[dict] = None) -> float:
    """Run `step(i)` for warm-up then timed steps; gradient steps per second of the timed ones (and, into
    `timings`, the warm-up's seconds: compilation and graph capture happen there)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for i in range(warmup):
        step(i)
    sync()
    if timings is not None:
        timings["warmup_s"] = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    sync()
    return steps / (time.perf_counter() - start)


def train_step_of(module, args: Args, data: dict, mode: Mode, device: torch.device, obs_dim: int, act_dim: int,
                  **overrides) -> Callable[[int], object]:
    """Step i of the script's training loop in `mode`, as its __main__ builds it: a batch, then the update."""
    agent = build(module, args, obs_dim, act_dim, device, **overrides)
    if "compile" in mode:
        compile_updates(agent)
    if hasattr(module, "PADPretrainer"):
        def train_step():
            return agent.update(module.sample_batch(data, args.batch_size))
    else:
        def train_step(actor_step):
            return agent.update(module.sample_batch(data, args.batch_size), actor_step)
    if "cudagraphs" in mode:
        train_step = GraphedTrainStep(train_step, lambda: training_state(agent), device)
    if hasattr(module, "PADPretrainer"):
        return lambda i: train_step()
    return lambda i: train_step(i % agent.args.policy_freq == 0)


def time_mode(module, args: Args, data: dict, mode: Mode, device: torch.device, obs_dim: int, act_dim: int,
              timings: Optional[dict] = None, **overrides) -> float:
    """Steps per second of the whole iteration (batch sampling included) in one mode."""
    step = train_step_of(module, args, data, mode, device, obs_dim, act_dim, **overrides)
    return steps_per_second(step, args.steps, args.warmup, device, timings)


def packed_worker(args: Args, mode: Mode, barrier, results) -> None:
    """One of K copies: DIVO, then its backbone; each built and warmed up, then timed when every copy is ready."""
    module = load_script(args)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    if device.type == "cpu":  # K copies share the cores
        torch.set_num_threads(1)
    obs_dim, act_dim = shapes(module, args.env_id)
    data, _ = load_data(module, args, obs_dim, act_dim, device)
    for name, overrides in (("divo", {}), ("backbone", {"adpo": False})):
        step = train_step_of(module, args, data, mode, device, obs_dim, act_dim, **overrides)
        steps_per_second(step, 0, args.warmup, device)  # the warm-up only (compilation, graph capture)
        barrier.wait()
        results.put((name, steps_per_second(step, args.steps, 0, device)))


def time_packed(args: Args, mode: Mode, copies: int) -> dict[str, float]:
    """Aggregate steps per second of `copies` processes running the iteration side by side, DIVO and backbone."""
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    barrier, results = context.Barrier(copies), context.Queue()
    workers = [context.Process(target=packed_worker, args=(args, mode, barrier, results)) for _ in range(copies)]
    for worker in workers:
        worker.start()
    rates: dict[str, list[float]] = {"divo": [], "backbone": []}
    for _ in range(2 * copies):
        name, rate = results.get()
        rates[name].append(rate)
    for worker in workers:
        worker.join()
    return {name: copies * min(values) for name, values in rates.items()}  # the slowest copy sets the pace


def time_parts(module, args: Args, data: dict, device: torch.device, obs_dim: int, act_dim: int) -> dict[str, float]:
    """Milliseconds per gradient step of each part of DIVO's iteration, each timed alone (eager)."""
    agent = build(module, args, obs_dim, act_dim, device)
    s, a, r, s_next, not_done = module.sample_batch(data, args.batch_size)
    adv, v, _ = agent.update_value(s, a)
    a_bar, *_ = module.adpo_target(a, adv, *agent.adpo_candidates(s, v))
    share = 1 / agent.args.policy_freq  # ADPO and the actor run on every policy_freq-th step
    parts = {"critic, eq. (1)": (1.0, lambda i: agent.update_critic(s, a, r, s_next, not_done)),
             "value, eq. (2)": (1.0, lambda i: agent.update_value(s, a)),
             "PAD, eq. (9)-(10)": (1.0, lambda i: agent.update_pad(s, a, adv)),
             "ADPO sampling, eq. (12)": (share, lambda i: module.adpo_target(a, adv, *agent.adpo_candidates(s, v))),
             "actor + targets, eq. (13)": (share, lambda i: agent.update_actor(s, a_bar))}
    repeats = max(20, args.steps // 10)
    return {name: weight * 1e3 / steps_per_second(part, repeats, 10, device) for name, (weight, part) in parts.items()}


def main(args: Args) -> None:
    module = load_script(args)
    try:
        check_args(args, module)
    except BenchmarkError as e:
        raise SystemExit(f"error: {e}") from None
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    obs_dim, act_dim = shapes(module, args.env_id)
    data, source = load_data(module, args, obs_dim, act_dim, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    divo = not hasattr(module, "PADPretrainer")
    print(f"benchmark: {module.__name__}, {args.env_id} shapes (observation {obs_dim}, action {act_dim}), batch "
          f"{args.batch_size}, {args.num_layers} x {args.hidden_dim} hidden, K {args.diffusion_steps}"
          + (f", N {args.num_candidates}" if divo else "") + f"\n  device {name}, torch {torch.__version__}; data: {source}")
    print(f"  {'mode':<20}{'steps/s':>10}{'warm-up s':>11}"
          + (f"{'TD3+BC backbone':>17}{'warm-up s':>11}{'DIVO / backbone':>17}" if divo else ""))
    if all("cudagraphs" in mode for mode in args.modes) and device.type != "cuda":
        raise SystemExit(f"error: --modes {' '.join(args.modes)} needs a CUDA GPU (and --cuda); on the CPU, time "
                         "--modes eager or compile")
    for mode in args.modes:
        if "cudagraphs" in mode and device.type != "cuda":
            print(f"  {mode:<20}{'needs a CUDA GPU':>10}")
            continue
        timings = {}
        sps = time_mode(module, args, data, mode, device, obs_dim, act_dim, timings)
        line = f"  {mode:<20}{rate(sps):>10}{timings['warmup_s']:>11.1f}"
        if divo:
            backbone = time_mode(module, args, data, mode, device, obs_dim, act_dim, timings, adpo=False)
            line += f"{rate(backbone):>17}{timings['warmup_s']:>11.1f}{backbone / sps:>16.2f}x"
        print(line, flush=True)
    if args.parts and divo:
        print("  per gradient step, eager, each part timed alone (ADPO and actor parts divided by policy_freq):")
        for part, ms in time_parts(module, args, data, device, obs_dim, act_dim).items():
            print(f"    {part:<28}{ms:8.3f} ms")
    if args.runs_per_gpu and divo:
        print_packed(args, device)


def rate(steps_per_second: float) -> str:
    """Steps per second with at least three significant digits (a CPU's 1.4 is not "1")."""
    return f"{steps_per_second:,.0f}" if steps_per_second >= 100 else f"{steps_per_second:.3g}"


def print_packed(args: Args, device: torch.device) -> None:
    """K copies side by side per mode: aggregate steps per second, and the paper's grid in device-hours."""
    grid_runs, grid_steps = 75, 1_000_000  # 15 tasks x 5 seeds, per algorithm
    print(f"  packed: K copies side by side on {'the GPU' if device.type == 'cuda' else 'the CPU (one thread each)'}, "
          f"aggregate steps/s; the paper's grid = {grid_runs} DIVO + {grid_runs} backbone runs of {grid_steps:,} steps")
    print(f"  {'mode':<20}{'K':>3}{'DIVO':>10}{'backbone':>10}{'grid, device-hours':>20}")
    for mode in args.modes:
        if "cudagraphs" in mode and device.type != "cuda":
            continue
        for copies in args.runs_per_gpu:
            rates = time_packed(args, mode, copies)
            divo, backbone = rates["divo"], rates["backbone"]
            hours = grid_runs * grid_steps * (1 / divo + 1 / backbone) / 3600
            print(f"  {mode:<20}{copies:>3}{rate(divo):>10}{rate(backbone):>10}{hours:>20.1f}", flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
