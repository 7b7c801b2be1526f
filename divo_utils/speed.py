"""Speed: --compile (torch.compile of the update functions) and --cudagraphs (one training step captured as a CUDA
graph and replayed), around the same step the script's loop calls (docs/speed.md)."""

import contextlib
from typing import Callable

import torch

from divo_utils.runs import networks, optimizers

# DIVO's update functions; its update() itself branches in Python on the actor step, so its parts are compiled
DIVO_PARTS = ("update_critic", "update_value", "update_pad", "adpo_candidates", "update_actor")


def speed_up(step: Callable[..., dict], agent, args, device: torch.device) -> Callable[..., dict]:
    """The training step as the loop should call it: with --compile the agent's update functions compiled first,
    with --cudagraphs the step captured once per value of its arguments and replayed; else the step itself."""
    if args.compile:
        compile_updates(agent)
    if args.cudagraphs:
        return GraphedTrainStep(step, lambda: training_state(agent), device)
    return step


def compile_updates(agent) -> None:
    """--compile: replace each update function of the agent (DIVO's parts, or a pretrainer's update) by its
    torch.compile'd version (compiled at its first call)."""
    for name in [name for name in DIVO_PARTS if hasattr(agent, name)] or ["update"]:
        setattr(agent, name, torch.compile(getattr(agent, name)))


class GraphedTrainStep:
    """--cudagraphs: each variant of one iteration (batch sampling included) captured once as a CUDA graph, then replayed.

    A replay runs the iteration's kernels with no Python and no launch overhead; the metrics it returns are the
    graph's static output tensors, overwritten by every replay. Capturing needs a few warm-up iterations (on a side
    stream) that would move the weights, the optimiser states and the RNG: all three are saved before and written
    back in place after capture, so training continues exactly where it was, and checkpoints and resume work as in
    eager mode. Without CUDA (the tests) capture does the same warm-up and restore, and a replay runs the iteration
    eagerly and copies its metrics into the static tensors.
    """

    def __init__(self, step: Callable[..., dict[str, torch.Tensor]], state: Callable[[], list[torch.Tensor]],
                 device: torch.device, warmup: int = 3):
        self.step, self.state, self.device, self.warmup = step, state, device, warmup
        self.graphs = {}

    def __call__(self, *flags) -> dict[str, torch.Tensor]:
        if flags not in self.graphs:
            self.graphs[flags] = self.capture(flags)
        replay, metrics = self.graphs[flags]
        replay()
        return metrics

    def capture(self, flags: tuple) -> tuple[Callable[[], None], dict[str, torch.Tensor]]:
        cuda = self.device.type == "cuda"
        tensors = self.state()
        # detached copies: an autograd graph of the copy would tie the weights to this (the default) stream
        saved = [t.detach().clone() for t in tensors]
        rng = torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if cuda else None
        stream = torch.cuda.Stream(self.device) if cuda else None
        if cuda:
            stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
            for _ in range(self.warmup):
                metrics = self.step(*flags)
        if cuda:
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                metrics = self.step(*flags)
            replay = graph.replay
        else:
            metrics = {name: value.clone() for name, value in metrics.items()}

            def replay():
                for name, value in self.step(*flags).items():
                    metrics[name].copy_(value)
        with torch.no_grad():  # back to the state before the warm-up, in place: the graph holds these tensors
            for tensor, value in zip(tensors, saved):
                tensor.copy_(value)
            known = {id(t) for t in tensors}
            for tensor in self.state():  # optimiser states the warm-up created: a fresh state is all zeros
                if id(tensor) not in known:
                    tensor.zero_()
        torch.set_rng_state(rng[0])
        if cuda:
            torch.cuda.set_rng_state(rng[1], self.device)
        return replay, metrics


def training_state(agent) -> list[torch.Tensor]:
    """Every tensor an iteration changes or reads as state: weights, buffers and optimiser states."""
    tensors = [t for module in networks(agent).values() for t in module.state_dict(keep_vars=True).values()]
    return tensors + [t for opt in optimizers(agent).values() for state in opt.state.values() for t in state.values()
                      if torch.is_tensor(t)]


def adam(module: torch.nn.Module, lr: float, capturable: bool) -> torch.optim.Adam:
    """Adam, fused (one kernel a step); `capturable` keeps its step count on the GPU, so that a step can be graphed."""
    return torch.optim.Adam(module.parameters(), lr=lr, fused=True, capturable=capturable)
