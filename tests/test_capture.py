"""--cudagraphs checked without a GPU, and on a GPU when there is one.

On the CPU: (1) one whole iteration, batch sampling included, makes no host sync and no data-dependent shape
outside the optimisers (whose internals `capturable=True` makes graph-safe on a GPU), so it can be captured as a
CUDA graph; the same guard counts its aten ops. (2) The graph path's machinery (warm-up, state saved and written
back in place, static output tensors) computes exactly what the plain path computes. On a GPU: eager against
real CUDA graphs over 50 iterations, and a whole tiny run with --cudagraphs that checkpoints and resumes.
"""

import collections
import copy
import os

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import divo_antmaze as da
import divo_continuous as dc
import pad_pretrain as pp
from conftest import run_script, write_d4rl_file

aten = torch.ops.aten
# Ops that wait for the GPU or whose output shape depends on the data: neither can live in a CUDA graph.
SYNCING_OPS = {aten._local_scalar_dense, aten.item, aten.nonzero, aten.masked_select, aten.unique_dim, aten._unique2,
               aten.unique_consecutive, aten.equal, aten.is_nonzero, aten.repeat_interleave}
HOST_METHODS = {"cpu", "numpy", "tolist", "item", "__bool__", "__int__", "__float__"}


class CaptureGuard(TorchDispatchMode):
    """Records every aten op outside the optimisers' steps, and every op there that a CUDA graph cannot hold."""

    def __init__(self):
        super().__init__()
        self.ops, self.optimizer_ops, self.violations, self.in_optimizer = collections.Counter(), 0, [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.in_optimizer:
            self.optimizer_ops += 1
        else:
            self.ops[str(func.overloadpacket)] += 1
            boolean_index = func.overloadpacket in (aten.index, aten.index_put, aten.index_put_) and any(
                isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in args[1] if t is not None)
            if func.overloadpacket in SYNCING_OPS or boolean_index:
                self.violations.append(str(func))
        return func(*args, **(kwargs or {}))


class HostGuard(TorchFunctionMode):
    """Records every move of a tensor's value to the host (.cpu(), .numpy(), .item(), bool(t), ...)."""

    def __init__(self, dispatch: CaptureGuard):
        super().__init__()
        self.dispatch = dispatch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        to_cpu = name == "to" and any(str(x).startswith("cpu") for x in [*args[1:], *(kwargs or {}).values()])
        if not self.dispatch.in_optimizer and (name in HOST_METHODS or to_cpu):
            self.dispatch.violations.append(f"Tensor.{name}")
        return func(*args, **(kwargs or {}))


def guarded(step):
    """Run `step()` under both guards; return the guard (violations, op counts)."""
    guard = CaptureGuard()
    hooks = [register_optimizer_step_pre_hook(lambda *_: setattr(guard, "in_optimizer", True)),
             register_optimizer_step_post_hook(lambda *_: setattr(guard, "in_optimizer", False))]
    try:
        with HostGuard(guard), guard:
            step()
    finally:
        for hook in hooks:
            hook.remove()
    return guard


def tiny_data(n=500, obs_dim=5, act_dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"observations": torch.randn(n, obs_dim, generator=g), "actions": torch.rand(n, act_dim, generator=g) * 2 - 1,
            "rewards": torch.randn(n, generator=g), "next_observations": torch.randn(n, obs_dim, generator=g),
            "not_done": (torch.rand(n, generator=g) > 0.01).float()}


VARIANTS = {
    "divo": {}, "td3bc (--no-adpo)": {"adpo": False}, "--no-pad": {"pad": False}, "--num-candidates 4": {"num_candidates": 4},
    "--adpo-positive-only": {"adpo_positive_only": True}, "--adpo-critic online-q1": {"adpo_critic": "online-q1"},
    "--adpo-critic online-min": {"adpo_critic": "online-min"}, "--bc-weight a2pr": {"bc_weight": "a2pr"},
}


@pytest.mark.parametrize("module, variant", [(dc, variant) for variant in VARIANTS] + [(da, "divo")])
def test_an_iteration_makes_no_host_sync_outside_the_optimisers(module, variant):
    """Both scripts' DIVO classes are the same text (test_drift.py): the variants are checked on one."""
    env_id = "antmaze-umaze-v2" if module is da else "hopper-medium-v2"
    agent = module.DIVO(5, 3, module.Args(env_id=env_id, hidden_dim=16, num_layers=2, **VARIANTS[variant]),
                        torch.device("cpu"))
    data = tiny_data()
    train_step = module.make_train_step(agent, data, 64, cudagraphs=False)
    for update_actor, use_adpo in ((False, True), (True, True), (True, False)):
        guard = guarded(lambda: train_step(update_actor, use_adpo))
        assert not guard.violations, f"{variant}, actor step {update_actor}: {guard.violations}"
        assert guard.optimizer_ops > 0  # the optimisers ran, outside the guard's ban


def test_a_pretraining_iteration_makes_no_host_sync():
    pretrainer = pp.PADPretrainer(5, 3, pp.Args(hidden_dim=16, num_layers=2), torch.device("cpu"))
    train_step = pp.make_train_step(pretrainer, tiny_data(), 64, cudagraphs=False)
    guard = guarded(train_step)
    assert not guard.violations and guard.optimizer_ops > 0


def test_the_guard_catches_what_would_break_a_graph():
    x = torch.randn(8)
    for bad in (lambda: x.sum().item(), lambda: x[x > 0], lambda: torch.nonzero(x), lambda: x.cpu(), lambda: bool(x[0] > 0),
                lambda: x.numpy()):
        assert guarded(bad).violations
    assert not guarded(lambda: torch.where(x > 0, x, 0.0).sum()).violations


def test_aten_ops_per_iteration(capsys):
    """The count of aten ops per iteration, outside the optimisers (printed; the README and the notes quote it)."""
    agent = dc.DIVO(11, 3, dc.Args(env_id="hopper-medium-v2"), torch.device("cpu"))
    backbone = dc.DIVO(11, 3, dc.Args(env_id="hopper-medium-v2", adpo=False), torch.device("cpu"))
    counts = {}
    for name, which in (("DIVO", agent), ("TD3+BC backbone", backbone)):
        train_step = dc.make_train_step(which, tiny_data(obs_dim=11), 256, cudagraphs=False)
        for update_actor in (False, True):
            guard = guarded(lambda: train_step(update_actor, True))
            counts[name, update_actor] = sum(guard.ops.values()), guard.optimizer_ops
    with capsys.disabled():
        for (name, update_actor), (ops, optimizer_ops) in counts.items():
            print(f"\n  {name}, {'with' if update_actor else 'without'} the actor step: {ops} aten ops "
                  f"(+ {optimizer_ops} inside the optimisers' steps, on the CPU)", end="")
    assert counts["DIVO", True][0] > counts["DIVO", False][0] > counts["TD3+BC backbone", False][0]
    assert counts["DIVO", False][0] < 400 and counts["DIVO", True][0] < 800  # the counts: 319 and 691


# ---------------------------------------------------------------------------------------------- graph path, CPU
@pytest.mark.parametrize("variant", ["divo", "td3bc (--no-adpo)", "--bc-weight a2pr"])
def test_the_graph_path_computes_exactly_what_the_plain_path_computes(variant):
    """Warm-up, state written back in place, static outputs: bit-identical losses, weights, optimiser states, RNG."""
    def build():
        torch.manual_seed(0)
        overrides = {"adpo_start": 3, **VARIANTS[variant]} if variant != "td3bc (--no-adpo)" else VARIANTS[variant]
        return dc.DIVO(5, 3, dc.Args(env_id="hopper-medium-v2", hidden_dim=16, num_layers=2, **overrides),
                       torch.device("cpu"))

    data = tiny_data()
    plain, graphed = build(), build()
    plain_step = dc.make_train_step(plain, data, 64, cudagraphs=False)
    graphed_step = dc.GraphedTrainStep(lambda *flags: graphed.update(dc.sample_batch(data, 64), *flags),
                                       lambda: dc.training_state(graphed), torch.device("cpu"))
    runs = {}
    for name, agent, step_fn in (("plain", plain, plain_step), ("graphed", graphed, graphed_step)):
        torch.manual_seed(123)
        history = []
        for step in range(10):  # the variants (actor step or not, ADPO or not) are captured when first met
            metrics = step_fn(step % 2 == 0, step >= 3)
            history.append({key: value.clone() for key, value in metrics.items()})
            if name == "graphed" and step == 0:
                addresses = [t.data_ptr() for t in dc.training_state(agent)]
        runs[name] = history, torch.get_rng_state()
    assert set(graphed_step.graphs) == {(True, False), (False, False), (False, True), (True, True)}
    for a, b in zip(runs["plain"][0], runs["graphed"][0]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(runs["plain"][1], runs["graphed"][1])  # the RNG stream continues as in eager mode
    for (key, a), b in zip(plain.state_dict().items(), graphed.state_dict().values()):
        assert str(a) == str(b), key  # weights and optimiser states, bit for bit (exact decimal print of every entry)
    assert [t.data_ptr() for t in dc.training_state(graphed)][: len(addresses)] == addresses  # written back in place


def test_the_graph_path_resumes_from_a_checkpoint_of_the_plain_path():
    torch.manual_seed(0)
    args = dc.Args(env_id="hopper-medium-v2", hidden_dim=16, num_layers=2)
    data, plain = tiny_data(), dc.DIVO(5, 3, args, torch.device("cpu"))
    plain_step = dc.make_train_step(plain, data, 64, cudagraphs=False)
    for step in range(4):
        plain_step(step % 2 == 0, True)
    saved, rng = copy.deepcopy(plain.state_dict()), torch.get_rng_state()  # as torch.save and torch.load would
    resumed = dc.DIVO(5, 3, args, torch.device("cpu"))
    resumed.load_state_dict(saved)
    graphed_step = dc.GraphedTrainStep(lambda *flags: resumed.update(dc.sample_batch(data, 64), *flags),
                                       lambda: dc.training_state(resumed), torch.device("cpu"))
    results = []
    for step_fn in (plain_step, graphed_step):
        torch.set_rng_state(rng)
        results.append([{k: v.clone() for k, v in step_fn(step % 2 == 0, True).items()} for step in range(4, 8)])
    assert all(torch.equal(a[k], b[k]) for a, b in zip(*results) for k in a)


# ---------------------------------------------------------------------------------------------- GPU
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def gpu_history(data: dict, capturable: bool, graphs: bool, steps: int = 50) -> tuple[list[dict], dict]:
    """`steps` iterations on the GPU from fixed seeds: the metrics of each and the final weights."""
    torch.manual_seed(0)
    agent = dc.DIVO(11, 3, dc.Args(env_id="hopper-medium-v2", cudagraphs=capturable), data["rewards"].device)
    train_step = dc.make_train_step(agent, data, 256, graphs)
    torch.manual_seed(1)
    history = [{k: v.clone() for k, v in train_step(step % 2 == 0, True).items()} for step in range(steps)]
    return history, agent.state_dict()


@cuda
def test_cuda_graphs_match_eager_on_the_gpu():
    """50 iterations: replayed CUDA graphs against eager PyTorch with the same (capturable) Adam agree to float32
    rounding, here taken as rtol 1e-6, atol 1e-7 (an H200 with torch 2.11 gave identical bits). Plain eager differs
    from both in Adam alone: its bias correction is computed on the host, not on the GPU, so the last bits differ
    and training amplifies them (the same H200: within rtol 1e-3, atol 1e-4 but for one loss at 1.2e-3 after 50
    iterations). Batches drawn from a wrongly advanced RNG would differ in every metric from the first iteration."""
    data = {k: v.to("cuda") for k, v in tiny_data(n=5000, obs_dim=11).items()}
    (graphed, graphed_weights), (eager, eager_weights) = (gpu_history(data, True, graphs) for graphs in (True, False))
    for a, b in zip(graphed, eager):
        for key in b:
            torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)
    for name in ("actor", "critic", "value", "diffusion"):
        for key, value in eager_weights[name].items():
            torch.testing.assert_close(graphed_weights[name][key], value, rtol=1e-6, atol=1e-7)


@cuda
def test_a_tiny_cuda_run_with_graphs_trains_checkpoints_and_resumes(tmp_path):
    write_d4rl_file(tmp_path / "d.hdf5", episode_lengths=(120, 90, 150, 140), terminal_episodes=(1,))
    tiny = ["--env-id", "hopper-medium-v2", "--dataset-path", tmp_path / "d.hdf5", "--hidden-dim", "32", "--num-layers",
            "2", "--batch-size", "64", "--eval-episodes", "2", "--log-freq", "20", "--cuda", "--cudagraphs",
            "--no-legacy-inertia", "--eval-freq", "30", "--checkpoint-freq", "30"]
    run_script("divo_continuous.py", *tiny, "--total-timesteps", 60, "--run-name", "straight", cwd=tmp_path)
    run_script("divo_continuous.py", *tiny, "--total-timesteps", 30, "--run-name", "halves", cwd=tmp_path)
    run_script("divo_continuous.py", "--resume", tmp_path / "runs/halves/checkpoint.pt", "--total-timesteps", 60,
               "--cuda", "--cudagraphs", cwd=tmp_path)
    straight, halves = (dc.load_checkpoint(str(tmp_path / f"runs/{n}/checkpoint.pt"), "divo_continuous")
                        for n in ("straight", "halves"))
    assert straight["step"] == halves["step"] == 60
    for name in ("actor", "critic", "diffusion"):
        for key, value in straight["agent"][name].items():
            torch.testing.assert_close(halves["agent"][name][key], value, rtol=1e-4, atol=1e-5)
    assert os.path.exists(tmp_path / "runs/straight/scores.json")
    assert np.isfinite(straight["evaluations"][-1]["score"])
