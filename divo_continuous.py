"""DIVO on D4RL MuJoCo locomotion: a one-step TD3+BC actor guided by a value-conditioned diffusion model.

Paper: Ma et al., "Diffusion Policies with Value-Conditional Optimization for Offline Reinforcement
Learning" (arXiv 2511.08922, IROS 2025). A DDPM behaviour model is trained on the dataset with binary
advantage weights (PAD, eq. 9-10); on every actor step it proposes actions, and the deterministic
actor is pulled toward whichever of {dataset action, generated actions} has the larger advantage
(ADPO, eq. 12-13). Equation numbers are those of the README's "The algorithm" table.

Run:
    python divo_continuous.py --env-id halfcheetah-medium-expert-v2 --cuda
    python divo_continuous.py --env-id hopper-medium-v2 --dataset-path my_hopper.hdf5
    python divo_continuous.py --env-id hopper-medium-v2 --no-adpo   # the TD3+BC backbone alone
    python divo_continuous.py --resume runs/<run_name>/checkpoint.pt
"""

import contextlib
import copy
import difflib
import hashlib
import http.client
import io
import json
import math
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
import urllib.request
import warnings
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable, Literal, Optional

import gymnasium as gym
import h5py
import mujoco
import numpy as np
import torch
import torch.nn as nn
import tyro
from torch.utils.tensorboard import SummaryWriter

try:
    import fcntl  # POSIX file locks: one writer per run folder (on Windows, run folders are not locked)
except ImportError:
    fcntl = None

GYM_IDS = {"halfcheetah": "HalfCheetah-v4", "hopper": "Hopper-v4", "walker2d": "Walker2d-v4"}
REF_SCORES = {"halfcheetah": (-280.178953, 12135.0), "hopper": (-20.272305, 3234.3), "walker2d": (1.629008, 4592.3)}
LEVELS = ("random", "medium", "medium-replay", "medium-expert", "expert", "full-replay")
ENV_IDS = tuple(f"{env}-{level}-v2" for env in GYM_IDS for level in LEVELS)


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be used when available (falls back to the CPU otherwise)"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "divo"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    save_model: bool = False
    """whether to save the final actor (with its observation normalisation) to `runs/{run_name}`"""

    # Algorithm specific arguments
    env_id: str = "halfcheetah-medium-expert-v2"
    """a D4RL id, or a Minari one (mujoco/hopper/medium-v0); it names the eval env and the score"""
    dataset_path: Optional[str] = None
    """a local D4RL-format HDF5 file to train on instead of the downloaded dataset"""
    total_timesteps: int = 1_000_000
    """total gradient steps (one step = one batch)"""
    batch_size: int = 256
    """the batch size of every update"""
    actor_lr: float = 3e-4
    """the learning rate of the actor"""
    critic_lr: float = 3e-4
    """the learning rate of the twin critics"""
    value_lr: float = 3e-4
    """the learning rate of the value network V_psi"""
    diffusion_lr: float = 3e-4
    """the learning rate of the diffusion noise network eps_omega"""
    gamma: float = 0.99
    """the discount factor gamma"""
    tau: float = 0.005
    """target smoothing coefficient (Polyak)"""
    policy_noise: float = 0.2
    """std of the target policy smoothing noise (eq. 1)"""
    noise_clip: float = 0.5
    """clip of the target policy smoothing noise (eq. 1)"""
    policy_freq: int = 2
    """the frequency of actor and target updates (delayed, as in TD3)"""
    alpha: float = 2.5
    """alpha of eq. (13): weight of the Q term, normalised by the mean |Q|"""
    expectile: float = 0.7
    """expectile tau of the value loss (eq. 2)"""
    diffusion_steps: int = 5
    """number of DDPM steps K"""
    beta_min: float = 0.1
    """b_min of the variance-preserving noise schedule"""
    beta_max: float = 10.0
    """b_max of the variance-preserving noise schedule"""
    pad_strength: float = 1.0
    """zeta of eq. (10), the strength of the PAD guidance"""
    num_candidates: int = 1
    """N, the number of diffusion samples per state that compete with the dataset action (eq. 12)"""
    adpo_margin: float = 0.0
    """kappa: a sample must win eq. (12) by kappa x the twin critics' disagreement (0: paper)"""
    adpo_candidate: Literal["sample", "null", "proj"] = "sample"
    """STUDY: eq. (12)'s candidate: a fresh diffusion sample (spec), the dataset action plus noise of
    the samples' spread (null control), or pi(s) noised to k* and denoised (projection reading)"""
    proj_step: int = 2
    """STUDY: k*, the step the actor's action is noised to by eq. (3) (--adpo-candidate proj)"""
    hidden_dim: int = 256
    """width of every hidden layer"""
    num_layers: int = 3
    """number of hidden layers of every network"""
    adpo: bool = True
    """ADPO (eq. 12); --no-adpo: imitate the dataset action, the TD3+BC backbone (no diffusion)"""
    pad: bool = True
    """PAD weights 1[A > 0] (eq. 10); --no-pad: the diffusion model learns every action alike"""
    freeze_pad: bool = False
    """keep the diffusion model fixed and skip the PAD step (with a pretrained --pad-checkpoint)"""

    # Evaluation
    legacy_inertia: bool = True
    """evaluate with D4RL's original link masses (MuJoCo 2.x capsule inertia), see the README"""
    eval_freq: int = 5000
    """evaluate the actor every this many gradient steps (0: only at the end)"""
    eval_episodes: int = 10
    """number of evaluation episodes, run side by side"""

    # Run management (where a run writes, how it resumes or starts, how fast it runs): RunArgs,
    # below the plumbing banner. The command line is RunArgs; check_args checks every range.


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------
def mlp(in_dim: int, out_dim: int, hidden_dim: int, num_layers: int, activation) -> nn.Sequential:
    """`num_layers` hidden layers of `hidden_dim` units, then a linear output."""
    layers, dim = [], in_dim
    for _ in range(num_layers):
        layers += [nn.Linear(dim, hidden_dim), activation()]
        dim = hidden_dim
    return nn.Sequential(*layers, nn.Linear(dim, out_dim))


class Actor(nn.Module):
    """Deterministic policy pi_phi(s) in [-1, 1] (eq. 13): the deployed policy."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, num_layers: int):
        super().__init__()
        self.net = mlp(obs_dim, act_dim, hidden_dim, num_layers, nn.ReLU)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(s))


class VectorizedLinear(nn.Module):
    """`ensemble_size` independent linear layers applied in one batched matmul."""

    def __init__(self, in_dim: int, out_dim: int, ensemble_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(ensemble_size, in_dim, out_dim))
        self.bias = nn.Parameter(torch.empty(ensemble_size, 1, out_dim))
        with torch.no_grad():  # the same initialisation as nn.Linear, member by member
            for w, b in zip(self.weight, self.bias):
                nn.init.kaiming_uniform_(w.T, a=math.sqrt(5))
                nn.init.uniform_(b, -1 / math.sqrt(in_dim), 1 / math.sqrt(in_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)  # (E, B, in) @ (E, in, out) + (E, 1, out)


class TwinCritic(nn.Module):
    """Q_theta1 and Q_theta2 (eq. 1) as one ensemble of two MLPs, evaluated in a single call."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, num_layers: int, num_critics=2):
        super().__init__()
        dims = [obs_dim + act_dim] + [hidden_dim] * num_layers
        layers = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [VectorizedLinear(d_in, d_out, num_critics), nn.ReLU()]
        self.net = nn.Sequential(*layers, VectorizedLinear(hidden_dim, 1, num_critics))
        self.num_critics = num_critics

    def forward(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Q-values of every member, shape (num_critics, batch)."""
        x = torch.cat([s, a], dim=-1).expand(self.num_critics, -1, -1)
        return self.net(x).squeeze(-1)


class ValueNet(nn.Module):
    """State value V_psi(s): an expectile of Q over dataset actions (eq. 2)."""

    def __init__(self, obs_dim: int, hidden_dim: int, num_layers: int):
        super().__init__()
        self.net = mlp(obs_dim, 1, hidden_dim, num_layers, nn.ReLU)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.net(s).squeeze(-1)


class SinusoidalEmbedding(nn.Module):
    """Sinusoidal embedding of the diffusion step index k."""

    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        freqs = torch.exp(torch.arange(half) * -(math.log(10000.0) / (half - 1)))
        self.register_buffer("freqs", freqs)

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        x = k.float().unsqueeze(-1) * self.freqs
        return torch.cat([x.sin(), x.cos()], dim=-1)


class NoiseNet(nn.Module):
    """eps_omega(a_k, k, s): predicts the noise in a noised action (Diffusion-QL's MLP).

    It takes the step as its embedding time_mlp(k), which a sampler computes once for all K steps.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, num_layers: int, t_dim=16):
        super().__init__()
        layers = [nn.Linear(t_dim, 2 * t_dim), nn.Mish(), nn.Linear(2 * t_dim, t_dim)]
        self.time_mlp = nn.Sequential(SinusoidalEmbedding(t_dim), *layers)
        self.net = mlp(act_dim + t_dim + obs_dim, act_dim, hidden_dim, num_layers, nn.Mish)

    def forward(self, a_k: torch.Tensor, k_emb: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([a_k, k_emb, s], dim=-1))


# ----------------------------------------------------------------------------------------------
# The diffusion behaviour model (PAD's backbone)
# ----------------------------------------------------------------------------------------------
def vp_beta_schedule(num_steps: int, beta_min: float, beta_max: float) -> torch.Tensor:
    """Variance-preserving betas beta_1..beta_K (Diffusion-QL's discretisation), float64."""
    k = torch.arange(1, num_steps + 1, dtype=torch.float64)
    exponent = beta_min / num_steps + (beta_max - beta_min) * (2 * k - 1) / (2 * num_steps**2)
    return 1 - torch.exp(-exponent)


class Diffusion(nn.Module):
    """The PAD behaviour model pi_omega(a|s): a conditional DDPM over actions (eq. 3-10)."""

    def __init__(self, obs_dim: int, act_dim: int, num_steps: int, beta_min: float, beta_max: float,
                 hidden_dim: int, num_layers: int):
        super().__init__()
        self.eps_model = NoiseNet(obs_dim, act_dim, hidden_dim, num_layers)
        self.num_steps, self.act_dim = num_steps, act_dim
        # Indexed by k = 0..K; k = 0 means "no noise" (alpha_bar_0 = 1). Computed in float64.
        betas = vp_beta_schedule(num_steps, beta_min, beta_max)
        betas = torch.cat([torch.zeros(1, dtype=torch.float64), betas])
        alphas = 1 - betas
        alpha_bar = torch.cumprod(alphas, dim=0)
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        one_minus = (1 - alpha_bar).clamp(min=1e-20)  # only k = 0 is clamped, and it is never used
        # eq. (3), (5): the forward process, at a step k drawn per sample: tensors (not saved)
        self.register_buffer("sqrt_alpha_bar", alpha_bar.sqrt().float(), False)
        self.register_buffer("sqrt_one_minus_alpha_bar", (1 - alpha_bar).sqrt().float(), False)
        # eq. (7), (8): the reverse process, step by step: float32 values as plain numbers
        self.sqrt_recip_alpha_bar = (1 / alpha_bar).sqrt().float().tolist()  # eq. (7)
        self.sqrt_recipm1_alpha_bar = (1 / alpha_bar - 1).sqrt().float().tolist()  # eq. (7)
        self.posterior_coef_a0 = (betas * alpha_bar_prev.sqrt() / one_minus).float().tolist()  # (8)
        self.posterior_coef_ak = ((1 - alpha_bar_prev) * alphas.sqrt() / one_minus).float().tolist()
        self.posterior_std = (betas * (1 - alpha_bar_prev) / one_minus).sqrt().float().tolist()

    def loss(self, s: torch.Tensor, a: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Weighted denoising loss, eq. (9)-(10): mean_b w_b ||eps - eps_omega(a_k, k, s)||^2."""
        k = torch.randint(1, self.num_steps + 1, (len(a),), device=a.device)  # k ~ U{1..K}
        eps = torch.randn_like(a)
        # eq. (3), (5)
        a_k = self.sqrt_alpha_bar[k, None] * a + self.sqrt_one_minus_alpha_bar[k, None] * eps
        eps_pred = self.eps_model(a_k, self.eps_model.time_mlp(k), s)
        return (weights[:, None] * (eps - eps_pred) ** 2).mean()

    @torch.no_grad()
    def sample(self, s: torch.Tensor, start=None, start_step=None) -> torch.Tensor:
        """DDPM ancestral sampling a_K -> a_0 (eq. 4, 7, 8), noise drawn up front; in [-1, 1].
        STUDY: with `start`, the chain begins at a_k* = eq. (3) applied to `start` at k* = start_step."""
        K, n = self.num_steps, len(s)
        noise = torch.randn(K + 1, n, self.act_dim, device=s.device).unbind(0)
        k_emb = self.eps_model.time_mlp(torch.arange(K + 1, device=s.device))  # each step's, once
        k_emb = k_emb[:, None].expand(-1, n, -1).unbind(0)
        a = noise[K]  # a_K ~ N(0, I)
        if start is not None:  # eq. (3) at k*: a_k* = sqrt(alpha_bar) a + sqrt(1 - alpha_bar) eps
            K = start_step
            a = self.sqrt_alpha_bar[K] * start + self.sqrt_one_minus_alpha_bar[K] * noise[K]
        for k in range(K, 0, -1):
            eps = self.eps_model(a, k_emb[k], s)
            # eq. (7): the clean action the noise prediction implies, clipped to the action box
            a0_hat = self.sqrt_recip_alpha_bar[k] * a - self.sqrt_recipm1_alpha_bar[k] * eps
            a0_hat = a0_hat.clamp(-1, 1)
            a = self.posterior_coef_a0[k] * a0_hat + self.posterior_coef_ak[k] * a  # eq. (8)
            if k > 1:  # posterior_std[1] = 0: no noise on the last step
                a = a + self.posterior_std[k] * noise[k - 1]
        return a.clamp(-1, 1)


# ----------------------------------------------------------------------------------------------
# DIVO: the losses of one training iteration
# ----------------------------------------------------------------------------------------------
def expectile_loss(u: torch.Tensor, expectile: float) -> torch.Tensor:
    """Asymmetric squared loss of eq. (2): mean |tau - 1(u < 0)| u^2."""
    return (torch.abs(expectile - (u < 0).float()) * u**2).mean()


def adpo_target(a, adv, candidates, cand_adv, penalty):
    """Eq. (12): per state, the sample of largest advantage minus penalty replaces the dataset
    action where that is at least the dataset action's advantage (ties go to the sample).

    a: (B, A) dataset actions, adv: (B,) their advantages; candidates: (N, B, A), cand_adv and
    penalty: (N, B) (penalty 0 is the paper's contest; --adpo-margin makes it positive).
    Returns the targets (B, A), where a sample won (B,) and the targets' advantages (B,).
    """
    score, best = (cand_adv - penalty).max(dim=0)
    winner = candidates.gather(0, best[None, :, None].expand(1, *a.shape))[0]
    generated = score >= adv
    target = torch.where(generated[:, None], winner, a)
    return target, generated, torch.where(generated, cand_adv.gather(0, best[None])[0], adv)


def adam(module: nn.Module, lr: float, capturable: bool) -> torch.optim.Adam:
    """Adam, fused (one kernel a step); `capturable` keeps its step count on the GPU, for graphs."""
    return torch.optim.Adam(module.parameters(), lr=lr, fused=True, capturable=capturable)


class DIVO:
    """DIVO's networks and optimisers, and one iteration: critic -> value -> PAD -> ADPO + actor."""

    def __init__(self, obs_dim: int, act_dim: int, args: Args, device: torch.device):
        h, n = args.hidden_dim, args.num_layers
        self.args = args
        capturable = device.type == "cuda"  # Adam state on the GPU, so an iteration can be graphed
        self.actor = Actor(obs_dim, act_dim, h, n).to(device)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic = TwinCritic(obs_dim, act_dim, h, n).to(device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_optimizer = adam(self.actor, args.actor_lr, capturable)
        self.critic_optimizer = adam(self.critic, args.critic_lr, capturable)
        # With --no-adpo, V_psi and the diffusion model could not reach the actor: not built.
        if args.adpo:
            self.value = ValueNet(obs_dim, h, n).to(device)
            K, b_min, b_max = args.diffusion_steps, args.beta_min, args.beta_max
            self.diffusion = Diffusion(obs_dim, act_dim, K, b_min, b_max, h, n).to(device)
            self.diffusion.requires_grad_(not args.freeze_pad)
            self.value_optimizer = adam(self.value, args.value_lr, capturable)
            self.diffusion_optimizer = adam(self.diffusion, args.diffusion_lr, capturable)
        self.online_params = [*self.actor.parameters(), *self.critic.parameters()]
        self.target_params = [*self.actor_target.parameters(), *self.critic_target.parameters()]

    def update_critic(self, s, a, r, s_next, not_done) -> dict[str, torch.Tensor]:
        """TD3 critic step, eq. (1), with target policy smoothing."""
        args = self.args
        with torch.no_grad():
            noise = torch.randn_like(a) * args.policy_noise
            noise = noise.clamp(-args.noise_clip, args.noise_clip)
            a_next = (self.actor_target(s_next) + noise).clamp(-1, 1)
            q_next = self.critic_target(s_next, a_next).min(dim=0).values  # min_i Q_theta'_i
            y = r + args.gamma * not_done * q_next
        q = self.critic(s, a)
        qf_loss = ((q - y) ** 2).mean(dim=1).sum()  # both critics' mean squared TD errors, summed
        self.critic_optimizer.zero_grad(set_to_none=True)
        qf_loss.backward()
        self.critic_optimizer.step()
        return {"losses/qf_loss": qf_loss.detach(), "losses/qf1_values": q[0].mean().detach()}

    def update_value(self, s, a):
        """Expectile value step, eq. (2). Returns A(s, a) = min_i Q'_i(s, a) - V(s) and V(s), both
        with V before the step, the twin target values Q'_i(s, a) (2, B) and the loss."""
        with torch.no_grad():
            q_data = self.critic_target(s, a)
        v = self.value(s)
        u = q_data.min(dim=0).values - v
        value_loss = expectile_loss(u, self.args.expectile)
        self.value_optimizer.zero_grad(set_to_none=True)
        value_loss.backward()
        self.value_optimizer.step()
        return u.detach(), v.detach(), q_data, {"losses/value_loss": value_loss.detach()}

    def update_pad(self, s, a, adv) -> dict[str, torch.Tensor]:
        """PAD step, eq. (9)-(10): diffusion loss weighted by w = zeta * 1[A(s, a) > 0]."""
        positive = (adv > 0).float()
        # --no-pad: plain diffusion behaviour cloning, every action weighted alike
        weights = positive if self.args.pad else torch.ones_like(positive)
        pad_loss = self.diffusion.loss(s, a, self.args.pad_strength * weights)
        self.diffusion_optimizer.zero_grad(set_to_none=True)
        pad_loss.backward()
        self.diffusion_optimizer.step()
        return {"losses/pad_loss": pad_loss.detach(), "pad/positive_fraction": positive.mean()}

    @torch.no_grad()
    def adpo_candidates(self, s, v, q_data, a):
        """Eq. (12)'s contestants: N samples of pi_omega per state (N, B, A), their advantages
        (N, B), and their penalties (N, B): kappa x the twin target critics' disagreement
        |Q'_1 - Q'_2|, averaged over the sample and the dataset action (q_data, (2, B))."""
        n, b = self.args.num_candidates, len(s)
        s_n = s.repeat(n, 1)  # the N samples of state i are rows i, B + i, 2B + i, ...
        candidates = self.diffusion.sample(s_n)
        if self.args.adpo_candidate == "null":  # STUDY: a + noise of the samples' per-dim RMS spread
            a_n = a.repeat(n, 1)
            spread = (candidates - a_n).pow(2).mean(dim=0).sqrt()
            candidates = (a_n + spread * torch.randn_like(a_n)).clamp(-1, 1)
        elif self.args.adpo_candidate == "proj":  # STUDY: pi(s) noised to k* and denoised back
            start = self.actor(s_n)
            candidates = self.diffusion.sample(s_n, start=start, start_step=self.args.proj_step)
        q = self.critic_target(s_n, candidates).view(2, n, b)
        q_min = q.min(dim=0).values
        # |Q'_1 - Q'_2| of the sample plus that of the dataset action, halved
        twice = q.max(dim=0).values - q_min + q_data.max(dim=0).values - q_data.min(dim=0).values
        return candidates.view(n, b, -1), q_min - v, self.args.adpo_margin / 2 * twice

    def update_actor(self, s, a_bar) -> dict[str, torch.Tensor]:
        """Actor step, eq. (13): -lambda Q_theta1(s, pi(s)) + ||pi(s) - a_bar||^2; then Polyak."""
        self.critic.requires_grad_(False)  # the actor's loss trains the actor only
        pi = self.actor(s)
        q = self.critic(s, pi)[0]
        lmbda = self.args.alpha / q.abs().mean().detach()
        bc_loss = ((pi - a_bar) ** 2).mean()
        actor_loss = -lmbda * q.mean() + bc_loss
        self.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_optimizer.step()
        self.critic.requires_grad_(True)
        with torch.no_grad():  # theta' <- tau theta + (1 - tau) theta', critics and actor
            torch._foreach_lerp_(self.target_params, self.online_params, self.args.tau)
        return {"losses/actor_loss": actor_loss.detach(), "losses/bc_loss": bc_loss.detach()}

    def update(self, batch: tuple, actor_step: bool) -> dict[str, torch.Tensor]:
        """One iteration on one batch (the actor too on actor steps); metrics stay on the device."""
        s, a, r, s_next, not_done = batch
        metrics = self.update_critic(s, a, r, s_next, not_done)
        if self.args.adpo:
            adv, v, q_data, value_metrics = self.update_value(s, a)
            metrics.update(value_metrics)
            if not self.args.freeze_pad:
                metrics.update(self.update_pad(s, a, adv))
        if actor_step:
            a_bar = a  # the TD3+BC backbone's target (--no-adpo)
            if self.args.adpo:  # ADPO, eq. (12)
                a_bar, generated, _ = adpo_target(a, adv, *self.adpo_candidates(s, v, q_data, a))
                metrics["adpo/generated_fraction"] = generated.float().mean()
            metrics.update(self.update_actor(s, a_bar))
        return metrics


# ----------------------------------------------------------------------------------------------
# Data: D4RL's transitions, state normalisation, batches, scores
# ----------------------------------------------------------------------------------------------
def qlearning_dataset(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """D4RL's `qlearning_dataset`: last row dropped, next state = next row, timeout rows skipped."""
    keep = np.flatnonzero(~data["timeouts"][:-1])
    return {
        "observations": data["observations"][keep],
        "actions": data["actions"][keep],
        "next_observations": data["observations"][keep + 1],
        "rewards": data["rewards"][keep],
        "terminals": data["terminals"][keep],
    }


def normalize_states(states: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """The dataset's per-dimension standardisation, for training and evaluation [TD3+BC]."""
    return (states - mean) / std


def to_device(transitions: dict, rows: np.ndarray, mean, std, device) -> dict[str, torch.Tensor]:
    """The transitions `rows` on the device, states normalised: batches are drawn there."""
    t = {key: value[rows] for key, value in transitions.items()}
    arrays = {
        "observations": normalize_states(t["observations"], mean, std),
        "actions": t["actions"],
        "rewards": t["rewards"],
        "next_observations": normalize_states(t["next_observations"], mean, std),
        "not_done": (1.0 - t["terminals"]).astype(np.float32),
    }
    return {key: torch.tensor(value, device=device) for key, value in arrays.items()}


def sample_batch(data: dict[str, torch.Tensor], batch_size: int) -> tuple[torch.Tensor, ...]:
    """Uniform batch of (s, a, r, s', 1 - d), sampled on the data's device."""
    idx = torch.randint(len(data["rewards"]), (batch_size,), device=data["rewards"].device)
    keys = ("observations", "actions", "rewards", "next_observations", "not_done")
    return tuple(data[key][idx] for key in keys)


def normalized_score(robot: str, returns: np.ndarray) -> np.ndarray:
    """D4RL normalised score: 100 * (return - random) / (expert - random)."""
    low, high = REF_SCORES[robot]
    return 100.0 * (np.asarray(returns) - low) / (high - low)


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(actor: nn.Module, envs: list, obs_mean, obs_std, seed: int) -> np.ndarray:
    """One episode per env, side by side, with the deterministic actor; the episode returns."""
    device = next(actor.parameters()).device
    obs = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(envs)])
    returns, alive = np.zeros(len(envs)), np.ones(len(envs), dtype=bool)
    while alive.any():
        idx = np.flatnonzero(alive)
        states = normalize_states(obs[idx], obs_mean, obs_std)
        states = torch.as_tensor(states, dtype=torch.float32, device=device)
        actions = actor(states).cpu().numpy()
        for i, action in zip(idx, actions):
            obs[i], reward, terminated, truncated, _ = envs[i].step(action)
            returns[i] += reward
            alive[i] = not (terminated or truncated)
    return returns


# ==============================================================================================
# Plumbing: from here to the main block, infrastructure that a reader learning DIVO may skip.
# Run management and argument checks, downloads and file checks, fingerprints, checkpoints and resume, MuJoCo
# fixes, CUDA graphs, and the diagnostics of ADPO and PAD.
# ==============================================================================================
@dataclass
class RunArgs(Args):
    """The command line: DIVO's arguments (Args, above) and those that manage a run."""

    run_name: Optional[str] = None
    """the run's new folder under runs/ (default {env_id}__{exp_name}__{seed}__{unix time})"""
    log_freq: int = 1000
    """log losses and diagnostics and print a progress line every this many gradient steps"""
    checkpoint_freq: int = 50_000
    """write `runs/{run_name}/checkpoint.pt` every this many steps and at the end (0: never)"""
    resume: Optional[str] = None
    """continue the run of this checkpoint (arguments not given on the command line come from it)"""
    pad_checkpoint: Optional[str] = None
    """start the diffusion model, critics and value net from a `pad_pretrain.py` checkpoint"""
    holdout: int = 0
    """transitions held out for the PAD sample-quality diagnostic (0: use 2,000 training ones)"""
    compile: bool = False
    """compile the update functions with torch.compile"""
    cudagraphs: bool = False
    """replay each training iteration as a captured CUDA graph (needs a GPU; README: Speed)"""

    def __post_init__(self):
        check_args(self)  # every range and combination, against ARG_RANGES below


class InputError(SystemExit):
    """Bad input from the user: exits with one message that says what is wrong and what to do."""

    def __init__(self, message: str):
        super().__init__(f"error: {message}")


# The range of every numeric argument, checked once when the arguments are built ("[" closed, "(" open).
ARG_RANGES = {
    "seed": "[0, 4294967295]", "total_timesteps": "[1, inf)", "batch_size": "[1, inf)", "actor_lr": "(0, inf)",
    "critic_lr": "(0, inf)", "value_lr": "(0, inf)", "diffusion_lr": "(0, inf)", "gamma": "[0, 1)", "tau": "(0, 1]",
    "policy_noise": "[0, inf)", "noise_clip": "[0, inf)", "policy_freq": "[1, inf)", "alpha": "[0, inf)",
    "expectile": "(0, 1)", "diffusion_steps": "[1, inf)", "beta_min": "(0, inf)", "beta_max": "(0, inf)",
    "pad_strength": "(0, inf)", "num_candidates": "[1, inf)", "hidden_dim": "[1, inf)", "num_layers": "[1, inf)",
    "adpo_margin": "[0, inf)", "proj_step": "[1, inf)", "eval_freq": "[0, inf)", "eval_episodes": "[1, inf)", "log_freq": "[1, inf)",
    "checkpoint_freq": "[0, inf)", "holdout": "[0, inf)",
}
# Arguments that only act through the diffusion model or V_psi: --no-adpo refuses them.
ADPO_ONLY_ARGS = ("value_lr", "diffusion_lr", "expectile", "diffusion_steps", "beta_min", "beta_max", "pad_strength",
                  "num_candidates", "adpo_margin", "adpo_candidate", "proj_step", "pad_checkpoint", "freeze_pad", "pad")


def run_mode(args) -> str:
    """The algorithm a run trains, as args.json, scores.json and the report name it."""
    return "td3bc" if not args.adpo else "divo" if args.pad else "divo-no-pad"


def task_name(args) -> str:
    """The data a run learns from: the D4RL id, or the name of a local file."""
    return os.path.splitext(os.path.basename(args.dataset_path))[0] if args.dataset_path else args.env_id


def check_env_id(env_id: str) -> Optional[str]:
    """Return the robot name of a D4RL locomotion id (None for a Minari id), or stop with the valid ids."""
    if is_minari_id(env_id):
        if parse_minari_id(env_id)[0] == "antmaze":
            raise InputError(f"{env_id} is an AntMaze dataset: run divo_antmaze.py --env-id {env_id}")
        return None
    if env_id.startswith("antmaze-"):
        raise InputError(f"{env_id} is an AntMaze dataset: run divo_antmaze.py --env-id {env_id}")
    if env_id not in ENV_IDS:
        close = difflib.get_close_matches(env_id, ENV_IDS, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise InputError(f"unknown --env-id {env_id!r}; {hint}valid ids: {', '.join(ENV_IDS)}, or a Minari "
                         "dataset id such as mujoco/hopper/medium-v0")
    return env_id.split("-")[0]


def flag(name: str, value=None) -> str:
    """The command-line spelling of an argument (`--no-x` for a boolean x that is off)."""
    return ("--no-" if value is False else "--") + name.replace("_", "-")


def check_args(args) -> None:
    """Refuse out-of-range or contradictory arguments before anything runs (ranges: ARG_RANGES)."""
    check_env_id(args.env_id)
    for name, interval in ARG_RANGES.items():
        value = getattr(args, name)
        low, high = (float(bound) for bound in interval[1:-1].split(","))
        above = low <= value if interval[0] == "[" else low < value
        below = value <= high if interval[-1] == "]" else value < high
        if not (above and below):  # also refuses NaN
            raise InputError(f"{flag(name)} {value} is out of range: it must lie in {interval}")
    defaults = {f.name: f.default for f in fields(args)}
    no_effect = [flag(n, getattr(args, n)) for n in ADPO_ONLY_ARGS if getattr(args, n) != defaults[n]]
    problems = {
        "--beta-max must be larger than --beta-min": args.beta_max <= args.beta_min,
        "--proj-step must be at most --diffusion-steps": args.proj_step > args.diffusion_steps,
        "--holdout must be 0 (diagnostics on training transitions) or at least 10": 0 < args.holdout < 10,
        "--freeze-pad keeps a pretrained diffusion model fixed: pass --pad-checkpoint too": args.freeze_pad
        and not args.pad_checkpoint,
        "--no-pad trains the diffusion model with uniform weights; --freeze-pad would not train it": args.freeze_pad
        and not args.pad,
        f"--no-adpo trains no diffusion model and no value net; these would have no effect: {', '.join(no_effect)}":
        not args.adpo and bool(no_effect),
        "--cudagraphs needs a CUDA GPU (and --cuda)": args.cudagraphs and not (args.cuda and torch.cuda.is_available()),
        f"--run-name {args.run_name!r} must be a plain folder name of at most {MAX_NAME} bytes": args.run_name
        is not None and not is_folder_name(args.run_name, MAX_NAME),
        f"--exp-name {args.exp_name!r} must be a plain folder name of at most {MAX_EXP_NAME} bytes (the run's folder "
        "is named after it)": not is_folder_name(args.exp_name, MAX_EXP_NAME),
        f"--beta-min {args.beta_min} and --beta-max {args.beta_max} give a noise schedule over {args.diffusion_steps} "
        "steps whose coefficients are not finite in float32 (alpha_bar_K underflows): lower --beta-max":
        not schedule_is_finite(args.diffusion_steps, args.beta_min, args.beta_max),
        "--dataset-path reads a D4RL-format file; a Minari id reads Minari's store: give one of them": bool(
            args.dataset_path) and is_minari_id(args.env_id),
    }
    for message, refused in problems.items():
        if refused:
            raise InputError(message)


MAX_NAME = 200  # bytes of --run-name (a file name has at most 255)
MAX_EXP_NAME = 150  # bytes of --exp-name: the default run name adds up to ~60


def is_folder_name(name: str, limit: int) -> bool:
    """Whether `name` can name one folder: no path in it, not `.` or `..`, at most `limit` bytes."""
    return os.path.basename(name) == name and name not in ("", ".", "..") and "\0" not in name \
        and len(os.fsencode(name)) <= limit


def schedule_is_finite(num_steps: int, beta_min: float, beta_max: float) -> bool:
    """Whether the diffusion model's schedule (eq. 3-8) is finite in float32, with alpha_bar_K > 0."""
    with torch.random.fork_rng(devices=[]):  # building the model draws its initial weights
        d = Diffusion(1, 1, num_steps, beta_min, beta_max, 1, 1)
    sampler = [d.sqrt_recip_alpha_bar, d.sqrt_recipm1_alpha_bar, d.posterior_coef_a0, d.posterior_coef_ak, d.posterior_std]
    values = torch.cat([d.sqrt_alpha_bar, d.sqrt_one_minus_alpha_bar, torch.tensor(sampler).flatten()])
    return bool(values.isfinite().all()) and bool(d.sqrt_alpha_bar[-1] > 0)


def parse_args(kind: str) -> tuple[RunArgs, Optional[dict]]:
    """The command line; with --resume, the run's arguments under those given, and its checkpoint (None: restart it).

    A resumed run's folder is locked first, so that nothing is read, kept or removed while another process writes it.
    """
    argv = sys.argv[1:]
    for i, arg in enumerate(argv):  # our message for a wrong id (the nearest id, the other script) before tyro's
        name, has_value, value = arg.partition("=")
        if name in ("--env-id", "--env_id") and (has_value or i + 1 < len(argv)):
            check_env_id(value if has_value else argv[i + 1])
    args = tyro.cli(RunArgs)
    if args.resume is None:
        if args.run_name and os.path.exists(os.path.join("runs", args.run_name)):
            raise InputError(f"runs/{args.run_name} exists: choose another --run-name, or continue that run with "
                             f"--resume runs/{args.run_name}/{CHECKPOINT}")
        return args, None
    folder = os.path.dirname(args.resume) or "."  # "." when resumed from inside the run's folder
    resume = os.path.join(folder, os.path.basename(args.resume))
    if not os.path.isfile(resume) and not os.path.isfile(os.path.join(folder, "args.json")):
        raise InputError(f"no checkpoint at {resume}, and no args.json beside it (if that folder is of a run that "
                         "stopped before it began, remove it and start the run again)")
    lock_run(folder)  # held until this process ends
    checkpoint, saved = resume_point(resume, kind)
    values = {f.name: saved[f.name] for f in fields(RunArgs) if f.name in saved}
    values["run_name"] = values.get("run_name") or os.path.basename(os.path.abspath(folder))
    # --cudagraphs depends on this machine: it is checked once the command line (e.g. --no-cudagraphs) applies
    saved = RunArgs(**{**values, "resume": resume, "cudagraphs": False})
    saved.cudagraphs = values.get("cudagraphs", False)
    args = replace(tyro.cli(RunArgs, default=saved), resume=resume)
    names = [f.name for f in fields(RunArgs) if f.name not in RESUME_FREE_ARGS]
    refuse_mismatch(resume, {n: getattr(args, n) for n in names}, {n: getattr(saved, n) for n in names},
                    f"resume with `--resume {resume}` and the original arguments, or start a new run without --resume")
    done = checkpoint["step"] if checkpoint else 0
    if done > args.total_timesteps or done == args.total_timesteps and os.path.exists(os.path.join(folder, FINISHED)):
        state = "finished" if done == args.total_timesteps else f"at step {done:,}, beyond --total-timesteps"
        raise InputError(f"{resume} is {state} ({done:,} of {args.total_timesteps:,} steps; its results are in "
                         f"{folder}). To train it longer, pass --total-timesteps larger than {done:,}")
    if checkpoint is None:
        print(f"{folder} has no {CHECKPOINT}: the run stopped before its first one, and starts again from step 0")
    return args, checkpoint


def resume_point(path: str, kind: str) -> tuple[Optional[dict], dict]:
    """--resume PATH: its checkpoint and that checkpoint's arguments; for a run that stopped before its first
    checkpoint (an args.json, no checkpoint, no results), None and the arguments of its args.json."""
    folder, args_path = os.path.dirname(path), os.path.join(os.path.dirname(path), "args.json")
    if os.path.basename(path) != CHECKPOINT or os.path.exists(path) or os.path.exists(os.path.join(folder, FINISHED)):
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


def clear_for_resume(resume: str) -> None:
    """Before a resumed run writes: remove a partial checkpoint, or, when the run stopped before its first checkpoint
    (it starts again from step 0), that attempt's files."""
    folder = os.path.dirname(resume)
    if os.path.exists(resume):  # the atomic rename keeps the checkpoint itself whole
        stale = {f"{resume}.tmp": "a partial checkpoint left by an interrupted save"}
    else:  # TensorBoard events, a partial checkpoint; args.json is written again
        stale = {os.path.join(folder, name): "left by the attempt that stopped before its first checkpoint"
                 for name in sorted(os.listdir(folder)) if name not in (LOCK, "args.json")}
    for path, why in stale.items():
        remove(path, why)


def remove(path: str, why: str) -> None:
    """Remove the file `path` if it is there, and say so."""
    if os.path.isfile(path):
        os.remove(path)
        print(f"removed {path}, {why}")


# Arguments that may differ between a checkpoint and the command that resumes it.
RESUME_FREE_ARGS = {"resume", "cuda", "track", "wandb_project_name", "wandb_entity", "total_timesteps",
                    "dataset_path", "log_freq", "eval_freq", "checkpoint_freq", "save_model", "compile", "cudagraphs"}


def refuse_mismatch(path: str, ours: dict, theirs: dict, fix: str, same_data: bool = True) -> None:
    """Stop with one message if a checkpoint was made with other values of `ours` or on other data."""
    differences = [f"{flag(name)} {value!r} here, {theirs.get(name)!r} in the checkpoint"
                   for name, value in ours.items() if theirs.get(name) != value]
    if not same_data:
        differences.insert(0, "it was trained on another dataset than this one")
    if differences:
        raise InputError(f"{path} does not match this run: {'; '.join(differences)}. To fix: {fix}")


D4RL_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2"
HDF5_COLUMNS = {"observations": np.float32, "actions": np.float32, "rewards": np.float32, "terminals": bool,
                "timeouts": bool}


def dataset_url(env_id: str) -> str:
    """D4RL's download address of a locomotion dataset."""
    env, level = env_id[: -len("-v2")].split("-", 1)
    return f"{D4RL_URL}/{env}_{level.replace('-', '_')}-v2.hdf5"


def default_dataset_path(env_id: str) -> str:
    """Where D4RL caches a dataset: $D4RL_DATASET_DIR or ~/.d4rl/datasets, file named as in the URL."""
    cache = os.environ.get("D4RL_DATASET_DIR", os.path.expanduser(os.path.join("~", ".d4rl", "datasets")))
    return os.path.join(cache, os.path.basename(dataset_url(env_id)))


def check_writable(folder: str, fix: str) -> None:
    """Stop with `fix` unless files can be made in `folder` (or, if it does not exist yet, where it would be made)."""
    existing = os.path.abspath(folder)
    while not os.path.isdir(existing):  # nothing is created here: the nearest existing folder is tried
        if os.path.exists(existing):
            raise InputError(f"cannot write to {folder}: {existing} is a file, not a folder; {fix}")
        existing = os.path.dirname(existing)
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise InputError(f"cannot write to {folder} ({e.strerror or e}): {fix}") from e


def download(url: str, path: str, timeout: float = 60.0) -> None:
    """Download `url` to `path`; the file appears only once complete and readable as HDF5."""
    folder = os.path.dirname(os.path.abspath(path))
    check_writable(folder, "set D4RL_DATASET_DIR to a folder you can write to, or pass --dataset-path FILE")
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".")
    print(f"downloading {url}\n         to {path}", flush=True)
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as response:
            total, done, shown = int(response.headers.get("Content-Length") or 0), 0, 0.0
            while chunk := response.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                if total and done / total >= shown + 0.1:
                    shown = done / total
                    print(f"  {done / 2**20:7.1f} / {total / 2**20:.1f} MiB", flush=True)
            if total and done != total:
                raise http.client.IncompleteRead(b"", total - done)
        with h5py.File(tmp, "r"):
            pass
        os.replace(tmp, path)
    except (OSError, http.client.HTTPException) as e:
        raise InputError(
            f"could not download {url} ({type(e).__name__}: {e}); nothing was written to {path}. The D4RL "
            f"server has been unreachable at times: try again later, or get the file another way and pass "
            f"--dataset-path FILE (or put it at {path})") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_d4rl_file(path: str, obs_dim: int, act_dim: int) -> dict[str, np.ndarray]:
    """Read a D4RL-format HDF5 file and refuse anything else: keys, types, shapes, 0/1 flags, finite values."""
    if os.path.isdir(path):
        raise InputError(f"{path} is a directory; pass the D4RL-format HDF5 file itself")
    if not os.path.isfile(path):
        raise InputError(f"no dataset file at {path}: check --dataset-path, or leave it out to download the dataset")
    fix = ("delete it and run again to download it anew" if os.path.basename(path) in {
        os.path.basename(dataset_url(env_id)) for env_id in ENV_IDS} else "re-create or re-download it")
    try:
        with h5py.File(path, "r") as f:
            missing = [key for key in HDF5_COLUMNS if key not in f]
            if missing:
                raise InputError(f"{path} lacks the D4RL keys {missing} (it has {sorted(f.keys())}); "
                                 f"a D4RL v2 file has {list(HDF5_COLUMNS)}")
            for key in HDF5_COLUMNS:
                if not isinstance(f[key], h5py.Dataset) or f[key].dtype.kind not in "biuf":
                    found = "a group" if isinstance(f[key], h5py.Group) else f"of type {f[key].dtype}"
                    raise InputError(f"{path}: {key!r} is {found}, not an array of numbers; is it a D4RL file?")
            data = {key: f[key][()] for key in HDF5_COLUMNS}
    except BlockingIOError as e:  # HDF5's own file lock
        raise InputError(f"{path} is open for writing in another process (HDF5 file lock): wait until it is closed, "
                         "then run again") from e
    except OSError as e:
        raise InputError(f"cannot read {path} as HDF5 ({e}): the file is partial or corrupt; {fix}") from e
    n = len(data["observations"]) if data["observations"].ndim else 0
    shapes = {"observations": (n, obs_dim), "actions": (n, act_dim), "rewards": (n,), "terminals": (n,), "timeouts": (n,)}
    for key, shape in shapes.items():
        if data[key].shape == shape + (1,):  # old files store rewards, terminals and timeouts as (N, 1)
            data[key] = data[key][..., 0]
        if data[key].shape != shape:
            raise InputError(f"{path}: {key!r} has shape {data[key].shape}, expected {shape} for this --env-id "
                             f"(observation size {obs_dim}, action size {act_dim}); is it a dataset of another env?")
    if n < 2:
        raise InputError(f"{path} holds {n} row(s); a dataset needs at least two")
    for key in ("terminals", "timeouts"):
        bad = ~np.isin(data[key], (0, 1))  # NaN and 0.5 are not flags
        if bad.any():
            row = int(np.argmax(bad))
            raise InputError(f"{path}: {key!r} must hold only 0/1 (or booleans); row {row} holds {data[key][row].item()} "
                             f"({int(bad.sum())} such row(s)): {fix}")
    data = {key: data[key].astype(dtype) for key, dtype in HDF5_COLUMNS.items()}  # medium-replay files are float64
    for key in ("observations", "actions", "rewards"):
        bad = ~np.isfinite(data[key].reshape(n, -1)).all(axis=1)
        if bad.any():
            raise InputError(f"{path}: {int(bad.sum())} row(s) of {key!r} hold NaN or inf (first at row "
                             f"{int(np.argmax(bad))}); the file is corrupt: {fix}, or drop those rows")
    if not (~data["timeouts"][:-1]).any():
        raise InputError(f"{path} yields no transitions: every row but the last is a timeout (D4RL's "
                         f"qlearning_dataset skips those); is the timeouts column right?")
    return data


def read_dataset(args: RunArgs, obs_dim: int, act_dim: int, minari_dataset=None) -> tuple[dict[str, np.ndarray], str]:
    """The dataset's arrays (downloaded into D4RL's cache first if needed, then checked) and its path; those of a Minari
    dataset as D4RL-format rows."""
    if minari_dataset is not None:
        return minari_rows(minari_dataset, obs_dim, act_dim), minari_dataset.spec.data_path
    path = args.dataset_path or default_dataset_path(args.env_id)
    if not args.dataset_path and not os.path.isfile(path):
        download(dataset_url(args.env_id), path)
    return load_d4rl_file(path, obs_dim, act_dim), path


def dataset_fingerprint(data: dict[str, np.ndarray]) -> str:
    """SHA-1 of the dataset's arrays, stored in checkpoints to refuse a resume on other data."""
    sha = hashlib.sha1()
    for key in HDF5_COLUMNS:
        sha.update(np.ascontiguousarray(data[key]).tobytes())
    return sha.hexdigest()


MIN_TRANSITIONS = 20  # the diagnostics compare half of the states with their 10 nearest neighbours in the other half


def check_transitions(observations: np.ndarray, path: str) -> None:
    """Refuse too few transitions, or observations whose float32 mean or std (the normalisation) is not finite."""
    if len(observations) < MIN_TRANSITIONS:
        raise InputError(f"{path} yields {len(observations)} transition(s) (D4RL's qlearning_dataset); training needs "
                         f"at least {MIN_TRANSITIONS}")
    with np.errstate(over="ignore", invalid="ignore"):  # the run's own float32 statistics, here without warnings
        bad = np.flatnonzero(~np.isfinite(observations.std(axis=0)))
    if len(bad):
        dim, largest = int(bad[0]), np.abs(observations[:, bad[0]]).max()
        raise InputError(f"{path}: observation dimension {dim} holds values up to {largest:.3g}, too large for its "
                         f"standard deviation in float32 (the state normalisation); rescale it or drop those rows")


def split_holdout(num_transitions: int, holdout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows to train on and rows for the PAD diagnostic: `holdout` held out, or 2,000 training rows if 0."""
    order = np.random.default_rng(seed).permutation(num_transitions)  # its own generator: training's is untouched
    if holdout == 0:
        return np.arange(num_transitions), np.sort(order[:2000])
    if holdout > num_transitions // 2:
        raise InputError(f"--holdout {holdout} would hold out more than half of the {num_transitions:,} transitions")
    return np.sort(order[holdout:]), np.sort(order[:holdout])


def restore_legacy_inertia(model: mujoco.MjModel, data: mujoco.MjData, xml_path: str) -> None:
    """Give `model` the masses MuJoCo 2.x computed: each capsule as a cylinder extended by r/2 per end."""
    spec = mujoco.MjSpec.from_file(xml_path)
    for geom in spec.geoms:
        if geom.type != mujoco.mjtGeom.mjGEOM_CAPSULE:
            continue
        radius = geom.size[0]
        if np.isnan(geom.fromto[0]):  # capsule given by half-length
            geom.size = [radius, geom.size[1] + radius / 2, 0.0]
        else:  # capsule given by its two end points
            p0, p1 = np.array(geom.fromto[:3]), np.array(geom.fromto[3:])
            axis = (p1 - p0) / np.linalg.norm(p1 - p0)
            geom.fromto = np.concatenate([p0 - axis * radius / 2, p1 + axis * radius / 2])
        geom.type = mujoco.mjtGeom.mjGEOM_CYLINDER
    legacy = spec.compile()
    for name in ("body_mass", "body_inertia", "body_ipos", "body_iquat"):
        getattr(model, name)[:] = getattr(legacy, name)
    mujoco.mj_setConst(model, data)


def make_eval_env(robot: str, legacy_inertia: bool) -> gym.Env:
    """One D4RL-faithful evaluation env (1000-step limit, D4RL observation and reward)."""
    with warnings.catch_warnings():  # v4 is deliberate: v5 changed Hopper's reward and Walker2d's friction
        warnings.filterwarnings("ignore", message=".*is out of date.*")
        env = gym.make(GYM_IDS[robot])
    if legacy_inertia:
        restore_legacy_inertia(env.unwrapped.model, env.unwrapped.data, env.unwrapped.fullpath)
    return env


# ----------------------------------------------------------------------------------------------
# Minari datasets (README: Minari): Farama's maintained successor of D4RL, read with the minari package
# ----------------------------------------------------------------------------------------------
def is_minari_id(env_id: str) -> bool:
    """Whether --env-id names a Minari dataset (namespace/name-vN, e.g. mujoco/hopper/medium-v0), not a D4RL one."""
    return "/" in env_id


def parse_minari_id(env_id: str) -> tuple[str, str]:
    """The domain ("antmaze" where a part of the namespace is antmaze, else "locomotion") and name of a Minari id."""
    from minari.dataset.minari_dataset import parse_dataset_id

    try:
        namespace, name, _ = parse_dataset_id(env_id)
    except (ValueError, TypeError):  # TypeError: an id without -vN
        raise InputError(f"--env-id {env_id!r} is not a Minari dataset id: write namespace/name-vN, e.g. "
                         "mujoco/hopper/medium-v0 or D4RL/antmaze/umaze-v1") from None
    return ("antmaze" if "antmaze" in (namespace or "").split("/") else "locomotion"), name


def load_minari_dataset(env_id: str):
    """A Minari dataset from Minari's local store ($MINARI_DATASETS_PATH, else ~/.minari/datasets); one not there
    is downloaded by Minari first, and a failed download leaves nothing behind."""
    import minari
    from minari.storage import get_dataset_path

    folder = get_dataset_path(env_id)
    if not os.path.isdir(os.path.join(folder, "data")):  # minari.load_dataset's test of a local copy
        existed = os.path.exists(folder)
        try:
            minari.download_dataset(env_id)
        except Exception as e:  # no huggingface_hub, no network, an id the remote lacks, ...: each says why
            if not existed:
                shutil.rmtree(folder, ignore_errors=True)
            raise InputError(
                f"the Minari dataset {env_id} is not in Minari's local store {get_dataset_path()} and Minari could not "
                f"download it ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}); nothing was written. "
                f"Where there is a network, run `pip install \"minari[hf]\" && minari download {env_id}` and copy the "
                f"dataset's folder to {folder}, or point MINARI_DATASETS_PATH at a store that holds it") from e
    try:
        return minari.load_dataset(env_id)
    except Exception as e:  # a partial copy, another Minari version's format, ...
        raise InputError(f"cannot read the Minari dataset at {folder} ({type(e).__name__}: {e}); delete that "
                         "folder to download it anew") from e


def flatten_observations(space, observations) -> np.ndarray:
    """One row per step: a Box space's values, or a Dict space's parts side by side in gymnasium's flatten order (its
    sorted keys; AntMaze: achieved_goal = x, y; desired_goal = the goal's x, y; observation = qpos[2:15], qvel)."""
    if isinstance(observations, dict):
        return np.concatenate([flatten_observations(space[key], observations[key]) for key in space.spaces], axis=1)
    return np.reshape(observations, (len(observations), -1))


def minari_rows(dataset, obs_dim: int, act_dim: int) -> dict[str, np.ndarray]:
    """A Minari dataset's episodes as checked D4RL-format rows: each episode's steps, then its final observation in a
    row marked timeout. D4RL's qlearning_dataset then makes every step a transition to its true next state, the last
    step of each episode included, terminal where Minari's `terminations` says so (README: Minari)."""
    from gymnasium import spaces

    where, space = f"the Minari dataset {dataset.spec.dataset_id}", dataset.observation_space
    boxes = list(space.spaces.values()) if isinstance(space, spaces.Dict) else [space]
    if not all(isinstance(box, spaces.Box) for box in [*boxes, dataset.action_space]):
        raise InputError(f"{where} has observations {space} and actions {dataset.action_space}; DIVO needs "
                         "continuous ones (Box spaces, or for observations a Dict of them)")
    rows = {key: [] for key in HDF5_COLUMNS}
    for episode in dataset.iterate_episodes():
        steps = len(episode)  # its observations hold one more: the final one
        actions = np.reshape(episode.actions, (steps, -1))
        rows["observations"].append(flatten_observations(space, episode.observations))
        rows["actions"].append(np.concatenate([actions, np.zeros_like(actions[:1])]))
        rows["rewards"].append(np.append(episode.rewards, 0.0))
        rows["terminals"].append(np.append(episode.terminations, False))
        rows["timeouts"].append(np.arange(steps + 1) == steps)
    if not rows["rewards"]:
        raise InputError(f"{where} holds no episodes")
    data = {key: np.concatenate(parts).astype(HDF5_COLUMNS[key]) for key, parts in rows.items()}
    for key, size in (("observations", obs_dim), ("actions", act_dim)):
        if data[key].shape[1] != size:
            raise InputError(f"{where} has {data[key].shape[1]} numbers in its {key}, its evaluation env {size}: "
                             "is its metadata's env the one its data come from?")
    for key in ("observations", "actions", "rewards"):
        bad = ~np.isfinite(data[key].reshape(len(data[key]), -1)).all(axis=1)
        if bad.any():
            episode = int(data["timeouts"][:np.argmax(bad)].sum())
            raise InputError(f"{where}: {int(bad.sum())} step(s) of {key!r} hold NaN or inf (first in episode "
                             f"{episode}); the dataset is corrupt: download it anew")
    return data


def minari_summary(dataset, data: dict, transitions: dict, eval_env=None) -> str:
    """A few lines about a Minari dataset: where it is, its episodes and their returns, rewards, terminals, actions."""
    ends = np.flatnonzero(data["timeouts"])  # the rows of the episodes' final observations
    starts = np.concatenate([[0], ends[:-1] + 1])
    returns, r, a = np.add.reduceat(data["rewards"], starts), transitions["rewards"], transitions["actions"]
    terminated, outside = int(data["terminals"][ends - 1].sum()), (np.abs(a) > 1).any(axis=1).mean()
    envs = f"data from {dataset.env_spec.id if dataset.env_spec else 'an env the metadata does not name'}" + (
        f", evaluation in {eval_env.spec.id} ({eval_env.spec.max_episode_steps} steps)" if eval_env else "")
    return "\n".join([
        f"dataset    {dataset.spec.dataset_id} (Minari, {dataset.spec.data_path}): {len(ends):,} episodes, "
        f"{len(r):,} steps, each a transition (the last step of an episode too)",
        f"episodes   {terminated:,} terminated, {len(ends) - terminated:,} truncated, mean length "
        f"{np.mean(ends - starts):.0f}; return min {returns.min():.1f}  mean {returns.mean():.1f}  max {returns.max():.1f}",
        f"rewards    min {r.min():.3f}  mean {r.mean():.3f}  max {r.max():.3f}; terminals "
        f"{transitions['terminals'].mean():.4%} of transitions",
        f"actions    |a| max {np.abs(a).max():.4f}"
        + (f" ({outside:.2%} of steps outside [-1, 1], clipped)" if outside else ""),
        f"envs       {envs}",
    ])


def make_minari_env(dataset, **kwargs) -> gym.Env:
    """The evaluation env a Minari dataset records (its eval env spec, else its data env's), made with `kwargs`, its
    observations flattened as the dataset's are."""
    try:
        env = dataset.recover_environment(eval_env=True, **kwargs)
    except Exception as e:  # no env spec in the metadata, a package the env needs, ...
        raise InputError(f"cannot make the evaluation env of the Minari dataset {dataset.spec.dataset_id} "
                         f"({type(e).__name__}: {e})") from e
    return gym.wrappers.FlattenObservation(env) if isinstance(env.observation_space, gym.spaces.Dict) else env


def minari_scorer(dataset) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    """A Minari dataset's metric and how returns become it: 100 x Minari's normalised score (D4RL's formula with the
    dataset's ref_min_score and ref_max_score), or the return itself where its metadata has no reference returns."""
    import minari

    low, high = (dataset.storage.metadata.get(name) for name in ("ref_min_score", "ref_max_score"))
    if low is None or high is None:
        print("score      the return: the dataset's metadata has no ref_min_score / ref_max_score to normalise it")
        return "return", lambda returns: np.asarray(returns, dtype=np.float64)
    print(f"score      normalised with the dataset's reference returns {low:.1f} (random) and {high:.1f} (expert)")
    return "normalized_score", lambda returns: 100.0 * minari.get_normalized_score(dataset, np.asarray(returns))


# How a run's metric is logged to TensorBoard and printed.
METRIC_LABELS = {"normalized_score": ("charts/d4rl_normalized_score", "normalised score"),
                 "return": ("charts/return", "return")}


def score_fields(metric: str, scores: np.ndarray, returns: np.ndarray) -> dict:
    """scores.json's fields of the last policy: its normalised scores, or where there are none its returns, marked
    "metric": "return" for tools/report.py."""
    if metric == "return":
        return {"metric": "return", "return_mean": returns.mean(), "return_std": returns.std(), "returns": returns.tolist()}
    return {"normalized_score_mean": scores.mean(), "normalized_score_std": scores.std(),
            "normalized_scores": scores.tolist(), "returns": returns.tolist()}


CHECKPOINT = "checkpoint.pt"  # the file name of a run's checkpoint in its folder
FINISHED = "scores.json"  # the file a run writes last: its presence means every file of the run is final
LOCK = "lock"  # the file a run's writer holds locked, naming the process


def lock_run(folder: str) -> None:
    """Lock the run `folder` for this process's whole life (the kernel frees it however the process ends), or stop."""
    try:
        fd = os.open(os.path.join(folder, LOCK), os.O_RDWR | os.O_CREAT, 0o644)  # never closed: the lock lasts
    except OSError as e:
        raise InputError(f"cannot write to {folder} ({e.strerror}): run where the run's folder can be written") from e
    if fcntl is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise InputError(f"{folder} is in use by {holder}, which holds {os.path.join(folder, LOCK)}: a run has one "
                         "writer at a time; wait until that process ends, or stop it first") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode())


def write_atomically(path: str, data: bytes) -> None:
    """Write `data` to `path` by renaming a complete copy: a crash never leaves a broken file in place of a good one,
    and a write that fails (a full disk) leaves nothing behind and stops with one line."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise InputError(f"could not write {path} ({e.strerror or e}); nothing half-written was left. Free some disk "
                         f"space, then continue with --resume {os.path.join(os.path.dirname(path), CHECKPOINT)}") from e


def save_checkpoint(path: str, payload: dict) -> None:
    """torch.save, atomically (write_atomically). A run's checkpoint first removes the run's finished file: that file
    describes an earlier checkpoint (a run extended with --resume), and is written again after the last one."""
    if os.path.basename(path) == CHECKPOINT:
        remove(os.path.join(os.path.dirname(path), FINISHED), "the results of an earlier step: the run trains on")
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_atomically(path, buffer.getvalue())


def load_checkpoint(path: str, kind: str) -> dict:
    """Read a checkpoint written by `kind` (a script name), or stop with what is wrong."""
    if not os.path.isfile(path):
        raise InputError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise InputError(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0]}); it is "
                         "partial or not a checkpoint of this project") from e
    found = payload.get("kind") if isinstance(payload, dict) else None
    if found != kind:
        raise InputError(f"{path} is a checkpoint of {found or 'something else'}, not of {kind}.py")
    return payload


def load_pretrained_pad(agent: DIVO, args: RunArgs, fingerprint: str) -> None:
    """--pad-checkpoint: start the diffusion model, critics and value net from a pad_pretrain.py checkpoint."""
    pad = load_checkpoint(args.pad_checkpoint, "pad_pretrain")
    names = ("diffusion_steps", "beta_min", "beta_max", "hidden_dim", "num_layers")
    names += ("gamma", "expectile") if args.freeze_pad else ()  # a frozen model keeps the advantages it learnt from
    refuse_mismatch(args.pad_checkpoint, {"reward_transform": "none", **{n: getattr(args, n) for n in names}},
                    pad["args"], "pretrain with the same values (locomotion learns from r: --reward-transform none) "
                    "on the dataset you train on", same_data=pad["dataset_sha1"] == fingerprint)
    for name in ("diffusion", "critic", "critic_target", "value"):
        getattr(agent, name).load_state_dict(pad[name])
    print(f"loaded the PAD model, critics and value net of {args.pad_checkpoint}"
          + (" (diffusion model frozen)" if args.freeze_pad else ""))


def restore_run(agent: DIVO, args: RunArgs, checkpoint: Optional[dict], fingerprint: str) -> tuple[int, list]:
    """The step and evaluation history to start from: a resumed run's (networks, optimisers, RNG), or a new run's."""
    if checkpoint is None:
        if args.pad_checkpoint:
            load_pretrained_pad(agent, args, fingerprint)
        return 0, []
    refuse_mismatch(args.resume, {}, {}, "resume on the dataset it was trained on",
                    same_data=checkpoint["dataset_sha1"] == fingerprint)
    load_agent_state(agent, checkpoint["agent"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if torch.cuda.is_available() and args.cuda and checkpoint["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"])
    print(f"resumed {args.run_name} at step {checkpoint['step']:,}")
    # a run stopped while writing its final files evaluates its last step again
    return checkpoint["step"], [e for e in checkpoint["evaluations"] if e["step"] < args.total_timesteps]


def make_run_dir(args: RunArgs) -> tuple[RunArgs, str]:
    """The run's folder, locked, and its name in `args`: a new one under runs/ (a new run never writes into an
    existing folder), or with --resume the run's own (locked by parse_args), cleared of what is no longer valid."""
    if args.resume:
        clear_for_resume(args.resume)
        return args, os.path.dirname(args.resume)
    base = args.run_name or f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    for attempt in range(1000):  # runs started in the same second get -1, -2, ...
        name = base if attempt == 0 else f"{base}-{attempt}"
        try:
            os.makedirs(os.path.join("runs", name))
        except FileExistsError:
            if args.run_name:
                raise InputError(f"runs/{name} exists: choose another --run-name, or continue that run with "
                                 f"--resume runs/{name}/{CHECKPOINT}") from None
            continue
        lock_run(os.path.join("runs", name))
        return replace(args, run_name=name), os.path.join("runs", name)
    raise InputError(f"could not create a new folder runs/{base}-N: remove old runs or pass --run-name")


def write_json(path: str, content: dict) -> None:
    """Strict JSON (NaN and inf refused, so every file parses anywhere), written atomically."""
    write_atomically(path, json.dumps(content, indent=2, allow_nan=False).encode())


def check_finite(step: int, metrics: dict[str, torch.Tensor], agent, last_checkpoint: str) -> dict[str, float]:
    """The metrics as numbers (the loop's one host sync); stop with a message if a metric or a weight is NaN/inf."""
    weights = {name: torch.stack([p.isfinite().all() for p in module.parameters()]).all().float()
               for name, module in networks(agent).items()}
    values = dict(zip([*metrics, *weights], torch.stack([*metrics.values(), *weights.values()]).tolist()))
    bad = [f"{name} = {values[name]}" for name in metrics if not math.isfinite(values[name])]
    bad += [f"the {name} network's weights" for name in weights if values[name] != 1.0]
    if bad:
        raise diverged(step, bad, last_checkpoint)
    return {name: values[name] for name in metrics}


def log_scalars(writer: SummaryWriter, step: int, values: dict[str, float], last_checkpoint: str) -> None:
    """Write `values` to TensorBoard; stop as check_finite does if one (a diagnostic, a score) is NaN or inf."""
    bad = [f"{name} = {value}" for name, value in values.items() if not math.isfinite(value)]
    if bad:
        raise diverged(step, bad, last_checkpoint)
    for name, value in values.items():
        writer.add_scalar(name, value, step)


def diverged(step: int, bad: list[str], last_checkpoint: str) -> InputError:
    """The message that stops a run whose metrics, diagnostics or weights are not finite."""
    return InputError(f"training diverged by step {step:,}: {', '.join(bad)} not finite. Nothing after the last good "
                      f"checkpoint was saved ({last_checkpoint}). Check the rewards' scale, or lower the learning "
                      f"rates or --alpha")


class StopSignal:
    """SIGINT / SIGTERM end the loop after the current iteration, with a checkpoint; a second one stops at once."""

    def __init__(self):
        self.signum = None
        signal.signal(signal.SIGINT, self.request)
        signal.signal(signal.SIGTERM, self.request)

    def request(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print("\nstopping after this step with a checkpoint (signal again to stop at once)", flush=True)


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


def progress_line(done: int, total: int, sps: float, evaluations: list[dict]) -> str:
    """[ 12.0%] step 120,000/1,000,000 | 1,234 steps/s | score 45.6 @ 115,000 | ETA 11m53s"""
    score = f"{evaluations[-1]['score']:.1f} @ {evaluations[-1]['step']:,}" if evaluations else "-"
    eta = int((total - done) / sps)
    eta = (f"{eta // 3600}h" if eta >= 3600 else "") + f"{eta % 3600 // 60:02d}m{eta % 60:02d}s"
    return f"[{done / total:6.1%}] step {done:,}/{total:,} | {sps:,.0f} steps/s | score {score} | ETA {eta}"


def networks(agent) -> dict[str, nn.Module]:
    """The agent's networks (online and target), by attribute name."""
    return {name: part for name, part in vars(agent).items() if isinstance(part, nn.Module)}


def optimizers(agent) -> dict[str, torch.optim.Optimizer]:
    """The agent's optimisers, by attribute name."""
    return {name: part for name, part in vars(agent).items() if isinstance(part, torch.optim.Optimizer)}


def agent_state(agent) -> dict:
    """What a checkpoint keeps of the agent: every network's and optimiser's state, by name."""
    return {name: part.state_dict() for name, part in {**networks(agent), **optimizers(agent)}.items()}


def load_agent_state(agent, state: dict) -> None:
    """Restore what agent_state saved, or stop if it was saved by a version with other networks."""
    for name, part in {**networks(agent), **optimizers(agent)}.items():
        try:
            part.load_state_dict(state[name])
        except (KeyError, RuntimeError, ValueError) as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise InputError(f"the checkpoint's {name} does not fit this script's ({type(e).__name__}: {first}); "
                             f"was it written by another version? Use that version, or start a new run") from e


def compile_updates(agent) -> None:
    """--compile: replace each update function of the agent by its torch.compile'd version."""
    names = ("update_critic", "update_value", "update_pad", "adpo_candidates", "update_actor")
    for name in names if agent.args.adpo else ("update_critic", "update_actor"):
        setattr(agent, name, torch.compile(getattr(agent, name)))


def dataset_summary(path: str, data: dict, transitions: dict, robot: str) -> str:
    """A few lines about the data: size, episodes and their returns, rewards, terminals, actions."""
    n = len(data["rewards"])
    ends = np.flatnonzero(data["terminals"] | data["timeouts"])
    if len(ends) == 0 or ends[-1] != n - 1:  # a trailing unfinished episode counts too
        ends = np.append(ends, n - 1)
    starts = np.concatenate([[0], ends[:-1] + 1])
    scores = normalized_score(robot, np.add.reduceat(data["rewards"], starts))
    r, outside = transitions["rewards"], (np.abs(data["actions"]) > 1).any(axis=1).mean()
    return "\n".join([
        f"dataset    {path}: {n:,} rows -> {len(r):,} transitions (D4RL's qlearning_dataset)",
        f"episodes   {len(scores):,}, mean length {np.mean(ends - starts + 1):.0f}, "
        f"normalised return min {scores.min():.1f}  mean {scores.mean():.1f}  "
        f"max {scores.max():.1f}",
        f"rewards    min {r.min():.3f}  mean {r.mean():.3f}  max {r.max():.3f}; terminals "
        f"{transitions['terminals'].mean():.4%} of transitions",
        f"actions    |a| max {np.abs(data['actions']).max():.4f}"
        + (f" ({outside:.2%} of rows outside [-1, 1], clipped)" if outside else ""),
    ])


# ----------------------------------------------------------------------------------------------
# Diagnostics: does ADPO help? At the logging sync, on fixed data, with training's RNG untouched
# ----------------------------------------------------------------------------------------------
def rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square over all entries: a distance between actions in action units."""
    return x.pow(2).mean().sqrt()


def wasserstein_per_dim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1-D Wasserstein-1 distance of each column between two equally sized samples."""
    return (x.sort(dim=0).values - y.sort(dim=0).values).abs().mean(dim=0)


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Squared maximum mean discrepancy with a Gaussian kernel (biased estimate)."""
    def kernel(p, q):
        return torch.exp(-torch.cdist(p, q) ** 2 / (2 * bandwidth**2)).mean()
    return kernel(x, x) + kernel(y, y) - 2 * kernel(x, y)


@torch.no_grad()
def sample_distances(diffusion: Diffusion, s, a, bandwidth: float) -> dict[str, float]:
    """One model sample per held-out state against that state's dataset action.

    `wasserstein`: mean over action dimensions of the per-dimension W1 between sampled and
    dataset actions; `mmd`: MMD^2 between the joint (s, a_sampled) and (s, a_data) sets, which
    also sees whether a sample fits its own state.
    """
    sampled = diffusion.sample(s)
    return {"wasserstein": wasserstein_per_dim(sampled, a).mean().item(),
            "mmd": mmd_rbf(torch.cat([s, sampled], 1), torch.cat([s, a], 1), bandwidth).item()}


@torch.no_grad()
def nearby_data_check(agent: DIVO, s, actions, s_ref, a_ref, q_ref, neighbours: int):
    """Per state: Q'(s, action) minus the best Q' of the dataset actions at the `neighbours`
    nearest dataset states, and the RMS distance from the action to the closest of those actions.

    A generated action that the critic rates far above everything the data did nearby, while
    lying far from those actions, is a sign that ADPO exploits the critic's extrapolation.
    """
    # (B, neighbours): the nearest reference states, Euclidean in normalised state space
    nearest = torch.cdist(s, s_ref).topk(neighbours, largest=False).indices
    q_margin = agent.critic_target(s, actions).min(dim=0).values - q_ref[nearest].max(dim=1).values
    action_gap = (a_ref[nearest] - actions[:, None]).pow(2).mean(dim=-1).sqrt().min(dim=1).values
    return q_margin, action_gap


class Diagnostics:
    """Whether ADPO's targets exploit critic errors; how well PAD's model fits the positive data."""

    def __init__(self, data: dict, heldout: dict, seed: int, probe=256, reference=10_000, k=10):
        rows = torch.randperm(len(data["rewards"]), generator=torch.Generator().manual_seed(seed))
        rows, probe = rows.to(data["rewards"].device), min(probe, len(rows) // 2)
        probe_rows, reference_rows = rows[:probe], rows[probe:probe + reference]
        self.probe = data["observations"][probe_rows], data["actions"][probe_rows]
        self.reference = data["observations"][reference_rows], data["actions"][reference_rows]
        self.neighbours = min(k, len(reference_rows))
        self.heldout = heldout["observations"], heldout["actions"]
        joint = torch.cat(self.heldout, 1)
        # the MMD kernel's bandwidth: the median distance between held-out pairs
        self.bandwidth = torch.cdist(joint, joint).median().clamp(min=1e-6).item()

    @torch.no_grad()
    def contest(self, agent: DIVO) -> dict[str, float]:
        """ADPO's contest (eq. 12) on the probe states: what the targets gain, how far they and the
        actor are from the data, whether both twin critics back the winners, and how the winners
        compare with the data at nearby states."""
        (s, a), (s_ref, a_ref) = self.probe, self.reference
        with torch.random.fork_rng(devices=[s.device] if s.device.type == "cuda" else []):
            v, q_data = agent.value(s), agent.critic_target(s, a)
            adv = q_data.min(dim=0).values - v
            candidates, cand_adv, penalty = agent.adpo_candidates(s, v, q_data, a)
        target, generated, target_adv = adpo_target(a, adv, candidates, cand_adv, penalty)
        pi = agent.actor(s)
        both_back = (agent.critic_target(s, target) >= q_data).all(dim=0)  # Q'_1 and Q'_2 agree
        row = {
            "adpo/advantage_gain": (target_adv - adv).mean(),  # A(s, a_bar) - A(s, a), >= 0
            "adpo/candidate_advantage_gain": (cand_adv - adv).mean(),  # A(s, a_hat) - A(s, a)
            "adpo/candidate_distance": rms(candidates - a),
            "adpo/actor_target_distance": rms(pi - target),
            "adpo/actor_data_distance": rms(pi - a),
            "adpo/twin_disagreement": (q_data[0] - q_data[1]).abs().mean(),  # on dataset actions
            "adpo/winners_backed_by_both": (both_back & generated).float().sum() / generated.sum().clamp(min=1),
        }
        q_ref, k = agent.critic_target(s_ref, a_ref).min(dim=0).values, self.neighbours
        margin, gap = nearby_data_check(agent, s, a, s_ref, a_ref, q_ref, k)
        row["adpo/data_q_margin"], row["adpo/data_action_gap"] = margin.mean(), gap.mean()
        if generated.any():  # the generated actions that won eq. (12), against the same nearby data
            s_won, a_won = s[generated], target[generated]
            margin, gap = nearby_data_check(agent, s_won, a_won, s_ref, a_ref, q_ref, k)
            row["adpo/winner_q_margin"], row["adpo/winner_action_gap"] = margin.mean(), gap.mean()
        return {name: value.item() for name, value in row.items()}

    @torch.no_grad()
    def sample_quality(self, agent: DIVO) -> dict[str, float]:
        """Distance between the diffusion model's samples and the held-out positive actions."""
        s, a = self.heldout
        positive = agent.critic_target(s, a).min(dim=0).values - agent.value(s) > 0
        s_pos, a_pos = (s[positive], a[positive]) if positive.sum() >= 10 else (s, a)
        with torch.random.fork_rng(devices=[s.device] if s.device.type == "cuda" else []):
            distances = sample_distances(agent.diffusion, s_pos, a_pos, self.bandwidth)
        return {"pad/heldout_positive_fraction": positive.float().mean().item(),
                **{f"pad/sample_{name}": value for name, value in distances.items()}}


if __name__ == "__main__":
    args, resumed = parse_args("divo_continuous")  # with --resume: the checkpoint's arguments, and the checkpoint
    robot = check_env_id(args.env_id)  # None for a Minari dataset id
    check_writable(os.path.dirname(args.resume) if resumed else "runs", "run where the run's folder can be written")

    # seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # data and env (a Minari id: its dataset, and the evaluation env and reference returns it records; README: Minari)
    dataset = None if robot else load_minari_dataset(args.env_id)
    envs = [make_minari_env(dataset) if dataset else make_eval_env(robot, args.legacy_inertia)
            for _ in range(args.eval_episodes)]
    obs_dim, act_dim = envs[0].observation_space.shape[0], envs[0].action_space.shape[0]
    raw, path = read_dataset(args, obs_dim, act_dim, dataset)
    fingerprint = dataset_fingerprint(raw)
    transitions = qlearning_dataset(raw)
    print(minari_summary(dataset, raw, transitions, envs[0]) if dataset else dataset_summary(path, raw, transitions, robot))
    metric, score = minari_scorer(dataset) if dataset else ("normalized_score", lambda r: normalized_score(robot, r))
    chart, metric_words = METRIC_LABELS[metric]
    transitions["actions"] = np.clip(transitions["actions"], -1.0, 1.0)  # the actor and the sampler act in [-1, 1]
    check_transitions(transitions["observations"], path)  # enough of them, with finite statistics
    obs_mean = transitions["observations"].mean(axis=0)
    obs_std = transitions["observations"].std(axis=0) + 1e-3
    train_rows, heldout_rows = split_holdout(len(transitions["rewards"]), args.holdout, args.seed)
    data = to_device(transitions, train_rows, obs_mean, obs_std, device)

    # networks and optimisers
    agent = DIVO(obs_dim, act_dim, args, device)
    start_step, evaluations = restore_run(agent, args, resumed, fingerprint)  # a resumed run, or --pad-checkpoint
    if args.compile:
        compile_updates(agent)

    def train_step(actor_step: bool) -> dict[str, torch.Tensor]:
        """One training iteration: a batch drawn on the device, then DIVO's update of eq. (1)-(13)."""
        batch = sample_batch(data, args.batch_size)
        return agent.update(batch, actor_step)

    if args.cudagraphs:  # the same step, captured once as a CUDA graph per value of actor_step, then replayed
        train_step = GraphedTrainStep(train_step, lambda: training_state(agent), device)
    heldout = to_device(transitions, heldout_rows, obs_mean, obs_std, device)
    diagnostics = Diagnostics(data, heldout, args.seed) if args.adpo else None

    # tracking
    args, run_dir = make_run_dir(args)  # a new folder, or the resumed run's own
    labels = {"script": "divo_continuous", "mode": run_mode(args), "task": task_name(args)}  # for tools/report.py
    write_json(os.path.join(run_dir, "args.json"), {**asdict(args), **labels})  # at once: --resume needs it
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=args.run_name, id=args.run_name, resume="allow", save_code=True)
    writer = SummaryWriter(run_dir, purge_step=start_step if resumed else None)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n%s" % "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    run_info = {"kind": "divo_continuous", "args": asdict(args), **labels,
                "env_id": args.env_id, "obs_dim": obs_dim, "act_dim": act_dim, "dataset_sha1": fingerprint,
                "num_transitions": len(data["rewards"]), "obs_mean": torch.tensor(obs_mean), "obs_std": torch.tensor(obs_std)}
    checkpoint_path = os.path.join(run_dir, CHECKPOINT)
    last_checkpoint = f"{checkpoint_path} (step {start_step:,})" if resumed else "none yet"

    def checkpoint(step: int) -> str:
        """Everything needed to continue the run exactly: networks, optimisers, step, RNG, statistics."""
        check_finite(step, metrics, agent, last_checkpoint)  # a diverged run never overwrites a good checkpoint
        save_checkpoint(checkpoint_path, {**run_info, "step": step, "agent": agent_state(agent), "evaluations": evaluations,
                                          "rng": {"torch": torch.get_rng_state(),
                                                  "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}})
        return f"{checkpoint_path} (step {step:,})"

    def run_evaluation(step: int) -> np.ndarray:
        """Evaluate the actor, log it with the diagnostics, and remember it in the run's history."""
        check_finite(step, metrics, agent, last_checkpoint)
        start = time.time()
        agent.actor.eval()
        returns = evaluate(agent.actor, envs, obs_mean, obs_std, seed=args.seed + 10_000)
        agent.actor.train()
        scores = score(returns)
        logged = {chart: scores.mean(), "eval/return_mean": returns.mean(),
                  f"eval/{metric}_std": scores.std(), "eval/seconds": time.time() - start}
        log_scalars(writer, step, {**logged, **(diagnostics.sample_quality(agent) if diagnostics else {})}, last_checkpoint)
        evaluations.append({"step": step, "score": float(scores.mean()), "score_std": float(scores.std()),
                            "diagnostics": dict(last_logged)})  # STUDY: the mechanism next to the score
        print(f"eval   step {step:,}: {metric_words} {scores.mean():.1f} +- {scores.std():.1f} "
              f"(return {returns.mean():.1f}, {len(returns)} episodes, {time.time() - start:.1f}s)", flush=True)
        return returns

    stop = StopSignal()
    print(f"training {args.run_name} ({labels['mode']}) on {device} for {args.total_timesteps:,} gradient steps; "
          f"logs in {run_dir}", flush=True)
    metrics, last_time, last_step, last_logged = {}, time.time(), start_step, {}
    for step in range(start_step, args.total_timesteps):
        if stop.signum is not None:
            last_checkpoint = checkpoint(step)
            print(f"stopped at step {step:,}; resume with: python {os.path.basename(__file__)} --resume {checkpoint_path}")
            raise SystemExit(128 + stop.signum)
        # the latest value of each metric (actor metrics come from the last actor step)
        metrics.update(train_step(step % args.policy_freq == 0))  # the actor every policy_freq-th step
        done = step + 1

        if done % args.log_freq == 0:
            logged = check_finite(done, metrics, agent, last_checkpoint)  # host sync, with the diagnostics below
            sps = (done - last_step) / (time.time() - last_time)
            last_time, last_step = time.time(), done
            contest = diagnostics.contest(agent) if diagnostics else {}
            log_scalars(writer, done, {**logged, "charts/SPS": sps, **contest}, last_checkpoint)
            last_logged = {k: v for k, v in {**logged, **contest}.items() if k.startswith(("adpo/", "pad/", "losses/"))}
            print(progress_line(done, args.total_timesteps, sps, evaluations), flush=True)
        if args.eval_freq and done % args.eval_freq == 0 and done < args.total_timesteps:
            run_evaluation(done)
        if args.checkpoint_freq and done % args.checkpoint_freq == 0 and done < args.total_timesteps:
            last_checkpoint = checkpoint(done)

    # final evaluation of the last policy, checkpoint, model; then scores.json, written last: it marks a finished run
    returns = run_evaluation(args.total_timesteps)
    scores = score(returns)
    if args.checkpoint_freq:
        print(f"checkpoint: {checkpoint(args.total_timesteps)}")
    if args.save_model:
        model_path = os.path.join(run_dir, f"{args.exp_name}.cleanrl_model")
        save_checkpoint(model_path, {**run_info, "actor": agent.actor.state_dict()})
        print(f"model saved to {model_path}")
    write_json(os.path.join(run_dir, FINISHED), {
        **labels, "env_id": args.env_id, "run_name": args.run_name, "exp_name": args.exp_name, "seed": args.seed,
        "step": args.total_timesteps, **score_fields(metric, scores, returns), "evaluations": evaluations})
    print(f"final {metric_words} of the last policy: {scores.mean():.1f} +- {scores.std():.1f} "
          f"({len(scores)} episodes); per-episode scores in {os.path.join(run_dir, FINISHED)}")
    for env in envs:
        env.close()
    writer.close()
    if args.track:
        wandb.finish()
