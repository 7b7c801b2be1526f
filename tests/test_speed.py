"""--compile and --cudagraphs (divo_utils.speed, run once: the three scripts share it) checked without a GPU, and on
a GPU when there is one.

--compile: the compiled update functions compute what eager ones do; speed_up wraps the step as the flags say.
--cudagraphs, on the CPU: (1) one whole iteration of each script's agent, batch sampling included, makes no host sync
and no data-dependent shape outside the optimisers (whose internals `capturable=True` makes graph-safe on a GPU), so
it can be captured as a CUDA graph, in every mode; the same guard counts its aten ops and its kernel-launching ops
(what a GPU pays for). (2) The graph path's machinery (warm-up, state saved and written back in place, static output
tensors) computes exactly what the plain path computes. (3) Fused Adam, the default, against PyTorch's for-loop Adam.
On a GPU: eager against real CUDA graphs over 50 iterations, and a whole tiny run with --cudagraphs that checkpoints
and resumes.
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
from conftest import run_script, tiny_data, write_d4rl_file
from divo_utils.runs import agent_state, load_agent_state, load_checkpoint, networks, optimizers
from divo_utils.speed import GraphedTrainStep, compile_updates, speed_up, training_state
from test_algorithm import batch, small_agent

aten = torch.ops.aten
# Ops that wait for the GPU or whose output shape depends on the data: neither can live in a CUDA graph.
SYNCING_OPS = {aten._local_scalar_dense, aten.item, aten.nonzero, aten.masked_select, aten.unique_dim, aten._unique2,
               aten.unique_consecutive, aten.equal, aten.is_nonzero, aten.repeat_interleave}
HOST_METHODS = {"cpu", "numpy", "tolist", "item", "__bool__", "__int__", "__float__"}


class CaptureGuard(TorchDispatchMode):
    """Counts aten ops (the `profiler` namespace's markers left out) and those among them that launch a kernel (not
    views), outside and inside the optimisers' steps; records every op outside them that a CUDA graph cannot hold."""

    def __init__(self):
        super().__init__()
        self.ops, self.violations, self.in_optimizer = collections.Counter(), [], False
        self.counts = collections.Counter()  # ("outside" | "inside", "aten" | "kernels")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        where = "inside" if self.in_optimizer else "outside"
        if func.namespace == "aten":
            self.counts[where, "aten"] += 1
            self.counts[where, "kernels"] += not func.is_view
        if not self.in_optimizer:
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


def capture_data(**kwargs):
    """conftest's tiny_data with these tests' sizes (500 transitions, 1% terminal) unless told otherwise."""
    return tiny_data(**{"n": 500, "done_rate": 0.01, **kwargs})


def train_step_of(module, agent, data, batch_size):
    """The scripts' train_step (defined in their main blocks): a batch drawn on the device, then the update."""
    if isinstance(agent, pp.PADPretrainer):
        return lambda: agent.update(module.sample_batch(data, batch_size))
    return lambda actor_step: agent.update(module.sample_batch(data, batch_size), actor_step)


VARIANTS = {
    "divo": {}, "td3bc (--no-adpo)": {"adpo": False}, "--no-pad": {"pad": False}, "--num-candidates 4": {"num_candidates": 4},
    "--freeze-pad": {"freeze_pad": True, "pad_checkpoint": "pad_checkpoint.pt"},  # Args wants the checkpoint's name
}


def divo_agent(module, variant="divo", obs_dim=5, hidden_dim=16, num_layers=2, device=torch.device("cpu")):
    env_id = "antmaze-umaze-v2" if module is da else "hopper-medium-v2"
    args = module.Args(env_id=env_id, hidden_dim=hidden_dim, num_layers=num_layers, **VARIANTS[variant])
    return module.DIVO(obs_dim, 3, args, device)


@pytest.mark.parametrize("module, variant", [(dc, variant) for variant in VARIANTS] + [(da, "divo")])
def test_an_iteration_makes_no_host_sync_outside_the_optimisers(module, variant):
    """Both scripts' DIVO classes are the same text (test_drift.py): the variants are checked on one."""
    agent = divo_agent(module, variant)
    train_step = train_step_of(module, agent, capture_data(), 64)
    for actor_step in (False, True):
        guard = guarded(lambda: train_step(actor_step))
        assert not guard.violations, f"{variant}, actor step {actor_step}: {guard.violations}"
        assert guard.counts["inside", "aten"] > 0  # the optimisers ran, outside the guard's ban


def test_a_pretraining_iteration_makes_no_host_sync():
    pretrainer = pp.PADPretrainer(5, 3, pp.Args(hidden_dim=16, num_layers=2), torch.device("cpu"))
    guard = guarded(train_step_of(pp, pretrainer, capture_data(), 64))
    assert not guard.violations and guard.counts["inside", "aten"] > 0


def test_the_guard_catches_what_would_break_a_graph():
    x = torch.randn(8)
    for bad in (lambda: x.sum().item(), lambda: x[x > 0], lambda: torch.nonzero(x), lambda: x.cpu(), lambda: bool(x[0] > 0),
                lambda: x.numpy()):
        assert guarded(bad).violations
    assert not guarded(lambda: torch.where(x > 0, x, 0.0).sum()).violations
    guard = guarded(lambda: (x.view(2, 4).t() + 1).sum())  # two views, two kernels
    assert guard.counts["outside", "aten"] == 4 and guard.counts["outside", "kernels"] == 2


def test_ops_per_iteration(capsys):
    """Ops per steady-state iteration (after 4 warm-up iterations, so that the optimisers' lazily created states are
    not counted), on the CPU, hopper's shapes and the default depth: aten ops and kernel-launching ops (aten ops that
    are not views), outside and inside the optimisers' steps, with and without the actor step; printed (the README
    quotes them). DIVO's average over one iteration with and one without the actor step, optimisers included: about
    447 aten ops and 260 kernel-launching ones (451 and 264 while the scripts computed --adpo-margin's penalty; the
    code before fused Adam and the sampler's precomputed steps: about 794 and 565 by this counter)."""
    data, counts = capture_data(obs_dim=11), {}
    for name, variant in (("DIVO", "divo"), ("TD3+BC backbone", "td3bc (--no-adpo)")):
        torch.manual_seed(0)
        agent = divo_agent(dc, variant, obs_dim=11, hidden_dim=32, num_layers=3)
        train_step = train_step_of(dc, agent, data, 256)
        for step in range(4):
            train_step(step % 2 == 0)
        for actor_step in (False, True):
            counts[name, actor_step] = guarded(lambda: train_step(actor_step)).counts
    with capsys.disabled():
        for (name, actor_step), c in counts.items():
            print(f"\n  {name}, {'with' if actor_step else 'without'} the actor step: {c['outside', 'aten']} aten ops "
                  f"({c['outside', 'kernels']} kernel-launching) + {c['inside', 'aten']} ({c['inside', 'kernels']}) "
                  f"inside the optimisers' steps", end="")

    def average(name, kind):
        return sum(counts[name, actor_step]["outside", kind] + counts[name, actor_step]["inside", kind]
                   for actor_step in (False, True)) / 2

    with capsys.disabled():
        print(f"\n  per iteration, the actor every second one: DIVO {average('DIVO', 'aten'):.0f} aten ops "
              f"({average('DIVO', 'kernels'):.0f} kernel-launching), backbone {average('TD3+BC backbone', 'aten'):.0f} "
              f"({average('TD3+BC backbone', 'kernels'):.0f})", end="")
    assert counts["DIVO", True]["outside", "aten"] > counts["DIVO", False]["outside", "aten"]
    assert counts["DIVO", False]["outside", "aten"] > counts["TD3+BC backbone", False]["outside", "aten"]
    assert average("DIVO", "aten") <= 470 and average("DIVO", "kernels") <= 280


def test_fused_adam_trains_as_pytorchs_for_loop_adam():
    """Fused Adam (the scripts' default, one kernel per step) against torch.optim.Adam(foreach=False) on the same
    parameters, seeds and batches: 20 iterations of DIVO agree within rtol 1e-5, atol 1e-6 in every metric and
    weight. Both compute the same update; the fused kernel rounds in another order, which measured at most 6e-8 in
    a metric and 3e-8 in a weight after 20 iterations here, while one Adam step moves each weight by about the
    learning rate (3e-4): a wrong learning rate, bias correction or epsilon would be hundreds of times the tolerance.
    (A sample whose advantage is within rounding of the dataset action's could switch sides in eq. (12) and make
    larger differences; with these seeds none does.)"""
    data = capture_data()

    def build(for_loop: bool):
        torch.manual_seed(0)
        agent = divo_agent(dc, "divo")
        for name, optimizer in optimizers(agent).items():
            assert optimizer.defaults["fused"]
            if for_loop:
                group = optimizer.param_groups[0]
                setattr(agent, name, torch.optim.Adam(group["params"], lr=group["lr"], foreach=False))
        return agent

    fused, for_loop = build(False), build(True)
    assert not for_loop.actor_optimizer.defaults["fused"] and for_loop.actor_optimizer.param_groups[0]["lr"] == 3e-4
    for step in range(20):
        metrics = []
        for agent in (fused, for_loop):
            torch.manual_seed(100 + step)
            metrics.append(train_step_of(dc, agent, data, 64)(step % 2 == 0))
        assert metrics[0].keys() == metrics[1].keys()
        for key in metrics[0]:
            torch.testing.assert_close(metrics[1][key], metrics[0][key], rtol=1e-5, atol=1e-6)
    for name, net in networks(fused).items():
        for key, value in net.state_dict().items():
            torch.testing.assert_close(networks(for_loop)[name].state_dict()[key], value, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- --compile
def test_compiled_updates_compute_the_same_losses_and_weights(monkeypatch):
    """--compile: the same losses and parameters as eager on the same batches and seeds.

    The "aot_eager" backend runs TorchDynamo's graph capture and AOTAutograd (where a compiled update could
    diverge from eager) without inductor's C++ build, which takes minutes on a small CPU.
    """
    eager, compiled = small_agent(), small_agent()
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn: real_compile(fn, backend="aot_eager"))
    compile_updates(compiled)
    assert all(hasattr(getattr(compiled, name), "_torchdynamo_orig_callable") for name in
               ("update_critic", "update_value", "update_pad", "adpo_candidates", "update_actor"))
    for step in range(4):
        torch.manual_seed(100 + step)
        m_eager = eager.update(batch(seed=step), actor_step=step % 2 == 0)
        torch.manual_seed(100 + step)
        m_compiled = compiled.update(batch(seed=step), actor_step=step % 2 == 0)
        assert m_eager.keys() == m_compiled.keys()
        for key in m_eager:
            torch.testing.assert_close(m_compiled[key], m_eager[key], rtol=1e-5, atol=1e-6)
    for name, module in networks(eager).items():
        for key, value in module.state_dict().items():
            torch.testing.assert_close(networks(compiled)[name].state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_speed_up_wraps_the_step_as_the_flags_say(monkeypatch):
    """What the scripts' main blocks call: without --compile and --cudagraphs the step itself, the agent untouched;
    with --compile the same step, the agent's update functions compiled (DIVO's five parts; a pretrainer's update);
    with --cudagraphs the step in a GraphedTrainStep that saves and restores the agent's training state."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn: compiled.append(fn.__name__) or fn)
    agent = small_agent()

    def step(actor_step):
        return agent.update(batch(), actor_step)

    assert speed_up(step, agent, agent.args, torch.device("cpu")) is step and compiled == []
    agent.args.compile = True
    assert speed_up(step, agent, agent.args, torch.device("cpu")) is step
    assert compiled == ["update_critic", "update_value", "update_pad", "adpo_candidates", "update_actor"]
    compiled.clear()
    agent.args.compile, agent.args.cudagraphs = False, True  # (Args refuses --cudagraphs without a GPU)
    graphed = speed_up(step, agent, agent.args, torch.device("cpu"))
    assert isinstance(graphed, GraphedTrainStep) and graphed.step is step and compiled == []
    assert [id(t) for t in graphed.state()] == [id(t) for t in training_state(agent)]  # the agent's state, saved
    pretrainer = pp.PADPretrainer(5, 3, pp.Args(hidden_dim=16, num_layers=2, compile=True), torch.device("cpu"))
    speed_up(step, pretrainer, pretrainer.args, torch.device("cpu"))
    assert compiled == ["update"]


# ---------------------------------------------------------------------------------------------- graph path, CPU
@pytest.mark.parametrize("variant", ["divo", "td3bc (--no-adpo)", "--num-candidates 4"])
def test_the_graph_path_computes_exactly_what_the_plain_path_computes(variant):
    """Warm-up, state written back in place, static outputs: bit-identical losses, weights, optimiser states, RNG."""
    def build():
        torch.manual_seed(0)
        return divo_agent(dc, variant)

    data = capture_data()
    plain, graphed = build(), build()
    plain_step = train_step_of(dc, plain, data, 64)
    graphed_step = GraphedTrainStep(train_step_of(dc, graphed, data, 64), lambda: training_state(graphed),
                                       torch.device("cpu"))
    runs = {}
    for name, agent, step_fn in (("plain", plain, plain_step), ("graphed", graphed, graphed_step)):
        torch.manual_seed(123)
        history = []
        for step in range(10):  # the variants (actor step or not) are captured when first met
            metrics = step_fn(step % 2 == 0)
            history.append({key: value.clone() for key, value in metrics.items()})
            if name == "graphed" and step == 0:
                addresses = [t.data_ptr() for t in training_state(agent)]
        runs[name] = history, torch.get_rng_state()
    assert set(graphed_step.graphs) == {(True,), (False,)}
    for a, b in zip(runs["plain"][0], runs["graphed"][0]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(runs["plain"][1], runs["graphed"][1])  # the RNG stream continues as in eager mode
    for (key, a), b in zip(agent_state(plain).items(), agent_state(graphed).values()):
        assert str(a) == str(b), key  # weights and optimiser states, bit for bit (exact decimal print of every entry)
    assert [t.data_ptr() for t in training_state(graphed)][: len(addresses)] == addresses  # written back in place


def test_the_graph_path_resumes_from_a_checkpoint_of_the_plain_path():
    torch.manual_seed(0)
    data, plain = capture_data(), divo_agent(dc)
    plain_step = train_step_of(dc, plain, data, 64)
    for step in range(4):
        plain_step(step % 2 == 0)
    saved, rng = copy.deepcopy(agent_state(plain)), torch.get_rng_state()  # as torch.save and torch.load would
    resumed = divo_agent(dc)
    load_agent_state(resumed, saved)
    graphed_step = GraphedTrainStep(train_step_of(dc, resumed, data, 64), lambda: training_state(resumed),
                                       torch.device("cpu"))
    results = []
    for step_fn in (plain_step, graphed_step):
        torch.set_rng_state(rng)
        results.append([{k: v.clone() for k, v in step_fn(step % 2 == 0).items()} for step in range(4, 8)])
    assert all(torch.equal(a[k], b[k]) for a, b in zip(*results) for k in a)


# ---------------------------------------------------------------------------------------------- GPU
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def gpu_history(data: dict, graphs: bool, steps: int = 50) -> tuple[list[dict], dict]:
    """`steps` iterations on the GPU from fixed seeds: the metrics of each and the final weights."""
    torch.manual_seed(0)
    device = data["rewards"].device
    agent = divo_agent(dc, obs_dim=11, hidden_dim=256, num_layers=3, device=device)  # capturable Adam on a GPU
    train_step = train_step_of(dc, agent, data, 256)
    if graphs:
        train_step = GraphedTrainStep(train_step, lambda: training_state(agent), device)
    torch.manual_seed(1)
    history = [{k: v.clone() for k, v in train_step(step % 2 == 0).items()} for step in range(steps)]
    return history, agent_state(agent)


@cuda
def test_cuda_graphs_match_eager_on_the_gpu():
    """50 iterations: replayed CUDA graphs against eager PyTorch with the same (capturable) Adam agree to float32
    rounding, here taken as rtol 1e-6, atol 1e-7 (an H200 with torch 2.11 gave identical bits). Plain eager differs
    from both in Adam alone: its bias correction is computed on the host, not on the GPU, so the last bits differ
    and training amplifies them (the same H200: within rtol 1e-3, atol 1e-4 but for one loss at 1.2e-3 after 50
    iterations). Batches drawn from a wrongly advanced RNG would differ in every metric from the first iteration."""
    data = {k: v.to("cuda") for k, v in capture_data(n=5000, obs_dim=11).items()}
    (graphed, graphed_weights), (eager, eager_weights) = (gpu_history(data, graphs) for graphs in (True, False))
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
    straight, halves = (load_checkpoint(str(tmp_path / f"runs/{n}/checkpoint.pt"), "divo_continuous")
                        for n in ("straight", "halves"))
    assert straight["step"] == halves["step"] == 60
    for name in ("actor", "critic", "diffusion"):
        for key, value in straight["agent"][name].items():
            torch.testing.assert_close(halves["agent"][name][key], value, rtol=1e-4, atol=1e-5)
    assert os.path.exists(tmp_path / "runs/straight/scores.json")
    assert np.isfinite(straight["evaluations"][-1]["score"])
