"""A trained DIVO policy outside training: load it from a run's file, call it on raw observations, export it.

    from divo_utils.policy import load_actor
    policy = load_actor("runs/<run>/<exp>.cleanrl_model")   # or the run's checkpoint.pt
    action = policy(obs)                                     # a raw env observation (or a batch) -> action(s)

The file holds the actor's weights and the dataset's observation statistics; the policy standardises the
observation with them (as training and evaluation do) before the actor, so it takes the env's own observations.
"""

import io
import os
import re
from typing import Union

import numpy as np
import torch
import torch.nn as nn

from divo_utils import InputError

POLICY_KINDS = ("divo_continuous", "divo_antmaze")  # the scripts whose files hold an actor


class Policy(nn.Module):
    """tanh(MLP((obs - mean) / std)): the scripts' Actor (eq. 13) with the dataset's standardisation inside."""

    def __init__(self, layers: list[tuple[int, int]], obs_mean: torch.Tensor, obs_std: torch.Tensor):
        super().__init__()
        modules = []
        for i, (n_in, n_out) in enumerate(layers):
            modules.append(nn.Linear(n_in, n_out))
            if i < len(layers) - 1:
                modules.append(nn.ReLU())
        self.net = nn.Sequential(*modules)  # the same layout as the scripts' mlp(): its state dict loads as is
        self.register_buffer("obs_mean", obs_mean.float())
        self.register_buffer("obs_std", obs_std.float())
        self.obs_dim, self.act_dim = layers[0][0], layers[-1][1]

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net((obs - self.obs_mean) / self.obs_std))

    @torch.no_grad()
    def __call__(self, obs: Union[np.ndarray, torch.Tensor]):
        """Numpy in, numpy out (one observation or a batch); a tensor in, a tensor out. Numpy observations are
        standardised in numpy first, exactly as the scripts' evaluation does, so the actions are the run's own."""
        if isinstance(obs, torch.Tensor):
            return super().__call__(obs)
        obs = np.asarray(obs)
        if obs.shape[-1:] != (self.obs_dim,):
            raise InputError(f"the policy takes observations of {self.obs_dim} numbers, not shape {obs.shape}")
        states = (obs - self.obs_mean.cpu().numpy()) / self.obs_std.cpu().numpy()
        states = torch.as_tensor(states, dtype=torch.float32, device=self.obs_mean.device)
        return torch.tanh(self.net(states)).cpu().numpy()


def read_policy_file(path: str) -> dict:
    """The payload of a --save-model file or a checkpoint of a DIVO run, or stop with what is wrong with the file."""
    if os.path.isdir(path):
        raise InputError(f"{path} is a folder: give the file in it, {os.path.join(path, 'checkpoint.pt')} or its "
                         "<exp>.cleanrl_model (--save-model)")
    if not os.path.isfile(path):
        raise InputError(f"no file at {path}: give a run's <exp>.cleanrl_model (--save-model) or its checkpoint.pt")
    try:
        with open(path, "rb") as f:
            payload = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, corrupt, or pickled objects beyond tensors and dicts
        # torch's own text for these is pages long and talks about weights_only; its type name says enough
        raise InputError(f"{path} is not a readable checkpoint or model file ({type(e).__name__}: not a torch file, "
                         "or truncated or damaged); give a run's <exp>.cleanrl_model or checkpoint.pt") from None
    if not isinstance(payload, dict) or "kind" not in payload:
        raise InputError(f"{path} is not a file of this project's runs (no 'kind'); give a run's <exp>.cleanrl_model "
                         "or checkpoint.pt")
    if payload["kind"] not in POLICY_KINDS:
        raise InputError(f"{path} was written by {payload['kind']}.py, which trains no policy (a pretrained PAD model "
                         "has no actor): give a file of a divo_continuous.py or divo_antmaze.py run")
    actor = payload.get("actor", (payload.get("agent") or {}).get("actor"))
    missing = [key for key in ("obs_mean", "obs_std", "env_id", "obs_dim", "act_dim") if key not in payload]
    if not isinstance(actor, dict) or missing:
        raise InputError(f"{path} lacks {', '.join(missing) or 'the actor'}: was it written by another version of "
                         "the scripts? Evaluate it with that version")
    return {**payload, "actor": actor}


def load_actor(path: str, device: str = "cpu") -> Policy:
    """The deterministic policy of a run's --save-model file or checkpoint, with its observation standardisation, in
    evaluation mode on `device`. Call it on the env's raw observations."""
    payload = read_policy_file(path)
    weights = {int(m.group(1)): value for key, value in payload["actor"].items()
               if (m := re.fullmatch(r"net\.(\d+)\.weight", key))}
    layers = [tuple(weights[i].shape[::-1]) for i in sorted(weights)]
    if not layers or layers[0][0] != payload["obs_dim"] or layers[-1][1] != payload["act_dim"]:
        raise InputError(f"{path}: the actor's layers {layers} do not match its observation size {payload['obs_dim']} "
                         f"and action size {payload['act_dim']}: the file is damaged")
    policy = Policy(layers, payload["obs_mean"], payload["obs_std"])
    try:  # the scripts' mlp(): Linear, ReLU, ..., Linear, under the name "net", as here
        policy.load_state_dict({**payload["actor"], "obs_mean": policy.obs_mean, "obs_std": policy.obs_std})
    except RuntimeError as e:
        raise InputError(f"{path}: its actor is not the scripts' MLP ({str(e).splitlines()[0]})") from None
    policy.env_id = payload["env_id"]
    return policy.to(device).eval()


def export_torchscript(policy: Policy, path: str) -> None:
    """The policy as TorchScript (`torch.jit.load(path)` alone runs it: float32 observations in, actions out)."""
    policy = policy.cpu().eval().requires_grad_(False)  # a deployed policy computes no gradients
    scripted = torch.jit.trace(policy, torch.zeros(1, policy.obs_dim))
    scripted.save(path)
