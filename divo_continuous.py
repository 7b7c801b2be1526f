"""DIVO on D4RL MuJoCo locomotion: a TD3+BC actor guided by a value-conditioned diffusion model.

Paper: Ma et al., "Diffusion Policies with Value-Conditional Optimization for Offline
Reinforcement Learning" (arXiv 2511.08922, IROS 2025). A DDPM behaviour model is trained on the
dataset with binary advantage weights (PAD, eq. 9-10); on every actor step it proposes actions,
and the deterministic actor is pulled toward whichever of {dataset action, generated actions} has
the larger advantage (ADPO, eq. 12-13). Equation numbers: the README's "The algorithm" table.
All of DIVO is in this file; the infrastructure around a run (arguments and resume, run folders,
checkpoints, D4RL and Minari loading, evaluation envs, CUDA graphs, diagnostics) is imported from
`divo_utils/`: copying the script into another project means copying that folder too.

Run:
    python divo_continuous.py --env-id halfcheetah-medium-expert-v2 --cuda
    python divo_continuous.py --env-id hopper-medium-v2 --no-adpo   # the TD3+BC backbone alone
    python divo_continuous.py --resume runs/<run_name>/checkpoint.pt
"""

import copy
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
from torch.utils.tensorboard import SummaryWriter

from divo_utils import DIVO_FILES, robot_of, run_mode
from divo_utils.args import check_common, check_env_id, check_schedule, check_switches
from divo_utils.data import check_transitions, load_task, score_fields, split_holdout
from divo_utils.diagnostics import Diagnostics
from divo_utils.resume import parse_args, restore_run
from divo_utils.runs import Run, StopSignal, agent_state, markdown_table, pick_device
from divo_utils.speed import adam, speed_up

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
    capture_video: bool = False
    """whether to film the final policy (one evaluation episode) to `runs/{run_name}/videos`"""
    video_each_eval: bool = False
    """with --capture-video: film the policy at every evaluation too (videos/step-{step}-*.mp4)"""

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
    """evaluate with D4RL's original link masses (MuJoCo 2.x capsule inertia), see docs/envs.md"""
    eval_freq: int = 5000
    """evaluate the actor every this many gradient steps (0: only at the end)"""
    eval_episodes: int = 10
    """number of evaluation episodes, run side by side"""

    # Run management (where a run writes, how it resumes or starts, how fast it runs)
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
    """replay each training iteration as a captured CUDA graph (needs a GPU; docs/speed.md)"""

    def __post_init__(self):
        check_env_id(self.env_id, ("locomotion",), {"antmaze": "divo_antmaze.py"})
        check_common(self, self.capture_video)  # ranges, names, device, data
        check_schedule(self, vp_beta_schedule(self.diffusion_steps, self.beta_min, self.beta_max))
        check_switches(self)  # what --no-adpo, --no-pad and --freeze-pad refuse


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
        sqrt_one_minus_alpha_bar = (1 - alpha_bar).sqrt().float()
        self.register_buffer("sqrt_alpha_bar", alpha_bar.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_one_minus_alpha_bar", sqrt_one_minus_alpha_bar, persistent=False)
        # eq. (7), (8): the reverse process, step by step. Python floats (float32's values): a step
        # scales by a number, with no tensor read, and a CUDA graph keeps them as constants
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
    def sample(self, s: torch.Tensor) -> torch.Tensor:
        """DDPM ancestral sampling a_K -> a_0 (eq. 4, 7, 8), noise drawn up front; in [-1, 1]."""
        K, n = self.num_steps, len(s)
        # all the noise in one draw: row K is a_K, row k - 1 the noise of step k; row 0 is never
        # used (drawn so that the random stream, and so every run, stays what it was)
        noise = torch.randn(K + 1, n, self.act_dim, device=s.device).unbind(0)
        k_emb = self.eps_model.time_mlp(torch.arange(K + 1, device=s.device))  # each step's, once
        k_emb = k_emb[:, None].expand(-1, n, -1).unbind(0)
        a = noise[K]  # a_K ~ N(0, I)
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


def adpo_target(a, adv, candidates, cand_adv):
    """Eq. (12): per state, the sample of largest advantage replaces the dataset action where its
    advantage is at least the dataset action's (ties go to the sample).

    a: (B, A) dataset actions, adv: (B,) their advantages; candidates: (N, B, A), cand_adv: (N, B).
    Returns the targets (B, A), where a sample won (B,) and the targets' advantages (B,).
    """
    score, best = cand_adv.max(dim=0)  # per state: the best sample's advantage and its index
    winner = candidates[best, torch.arange(len(a), device=a.device)]  # (B, A)
    generated = score >= adv
    target = torch.where(generated[:, None], winner, a)
    return target, generated, torch.where(generated, score, adv)


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
        with V before the step, and the loss."""
        with torch.no_grad():
            q_data = self.critic_target(s, a)
        v = self.value(s)
        u = q_data.min(dim=0).values - v
        value_loss = expectile_loss(u, self.args.expectile)
        self.value_optimizer.zero_grad(set_to_none=True)
        value_loss.backward()
        self.value_optimizer.step()
        return u.detach(), v.detach(), {"losses/value_loss": value_loss.detach()}

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
    def adpo_candidates(self, s, v):
        """Eq. (12)'s contestants: N samples of pi_omega per state (N, B, A) and their advantages
        A(s, a_hat) = min_i Q'_i(s, a_hat) - V(s) (N, B)."""
        n, b = self.args.num_candidates, len(s)
        s_n = s.repeat(n, 1)  # the N samples of state i are rows i, B + i, 2B + i, ...
        candidates = self.diffusion.sample(s_n)
        q = self.critic_target(s_n, candidates).view(-1, n, b)  # (critics, N, B)
        q_min = q.min(dim=0).values
        return candidates.view(n, b, -1), q_min - v

    @torch.no_grad()
    def adpo(self, s, a, adv, v):
        """Eq. (12) at states s: the contestants and their advantages, then the targets, where a
        sample won and the targets' advantages (adpo_target)."""
        candidates, cand_adv = self.adpo_candidates(s, v)
        return candidates, cand_adv, *adpo_target(a, adv, candidates, cand_adv)

    def update_actor(self, s, a_bar) -> dict[str, torch.Tensor]:
        """Actor step, eq. (13): -lambda Q_theta1(s, pi(s)) + ||pi(s) - a_bar||^2; then Polyak."""
        # the actor's loss trains the actor only: no gradients for the critic's weights (saves
        # their backward kernels; the critic's optimiser clears its gradients anyway)
        self.critic.requires_grad_(False)
        pi = self.actor(s)
        q = self.critic(s, pi)[0]
        lmbda = self.args.alpha / q.abs().mean().detach()
        bc_loss = ((pi - a_bar) ** 2).mean()
        actor_loss = -lmbda * q.mean() + bc_loss
        self.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_optimizer.step()
        self.critic.requires_grad_(True)
        with torch.no_grad():  # theta' <- tau theta + (1 - tau) theta', critics and actor:
            # one fused kernel over every parameter, not one per tensor (as LeanRL's TD3)
            torch._foreach_lerp_(self.target_params, self.online_params, self.args.tau)
        return {"losses/actor_loss": actor_loss.detach(), "losses/bc_loss": bc_loss.detach()}

    def update(self, batch: tuple, actor_step: bool) -> dict[str, torch.Tensor]:
        """One iteration on one batch (the actor too on actor steps); metrics stay on the device."""
        s, a, r, s_next, not_done = batch
        metrics = self.update_critic(s, a, r, s_next, not_done)
        if self.args.adpo:
            adv, v, value_metrics = self.update_value(s, a)
            metrics.update(value_metrics)
            if not self.args.freeze_pad:
                metrics.update(self.update_pad(s, a, adv))
        if actor_step:
            a_bar = a  # the TD3+BC backbone's target (--no-adpo)
            if self.args.adpo:  # ADPO, eq. (12)
                _, _, a_bar, generated, _ = self.adpo(s, a, adv, v)
                metrics["adpo/generated_fraction"] = generated.float().mean()
            metrics.update(self.update_actor(s, a_bar))
        return metrics


# ----------------------------------------------------------------------------------------------
# Data: D4RL's transitions, state normalisation, batches, scores
# ----------------------------------------------------------------------------------------------
def qlearning_dataset(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """D4RL's `qlearning_dataset`: last row dropped, next state = next row, timeout rows skipped."""
    keep = np.flatnonzero(~data["timeouts"][:-1])
    return {"observations": data["observations"][keep], "actions": data["actions"][keep],
            "next_observations": data["observations"][keep + 1], "rewards": data["rewards"][keep],
            "terminals": data["terminals"][keep]}


def normalize_states(states: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """The dataset's per-dimension standardisation, for training and evaluation [TD3+BC]."""
    return (states - mean) / std


def to_device(transitions: dict, rows: np.ndarray, mean, std, device) -> dict[str, torch.Tensor]:
    """The transitions `rows` on the device, states normalised: batches are drawn there."""
    t = {key: value[rows] for key, value in transitions.items()}
    arrays = {"observations": normalize_states(t["observations"], mean, std),
              "actions": t["actions"], "rewards": t["rewards"],
              "next_observations": normalize_states(t["next_observations"], mean, std),
              "not_done": (1.0 - t["terminals"]).astype(np.float32)}
    return {key: torch.tensor(value, device=device) for key, value in arrays.items()}


def prepare_data(transitions: dict, args, device, path: str) -> tuple[dict, dict, np.ndarray, ...]:
    """On the device: the training rows and PAD's diagnostic rows (--holdout), actions clipped to
    [-1, 1], states normalised by the dataset's mean and std + 1e-3 [TD3+BC]; and mean and std."""
    transitions["actions"] = np.clip(transitions["actions"], -1.0, 1.0)
    check_transitions(transitions["observations"], path)  # enough, with finite statistics
    obs_mean = transitions["observations"].mean(axis=0)
    obs_std = transitions["observations"].std(axis=0) + 1e-3
    train_rows, heldout_rows = split_holdout(len(transitions["rewards"]), args.holdout, args.seed)
    data = to_device(transitions, train_rows, obs_mean, obs_std, device)
    return data, to_device(transitions, heldout_rows, obs_mean, obs_std, device), obs_mean, obs_std


def sample_batch(data: dict[str, torch.Tensor], batch_size: int) -> tuple[torch.Tensor, ...]:
    """Uniform batch of (s, a, r, s', 1 - d), sampled on the data's device."""
    idx = torch.randint(len(data["rewards"]), (batch_size,), device=data["rewards"].device)
    keys = ("observations", "actions", "rewards", "next_observations", "not_done")
    return tuple(data[key][idx] for key in keys)


REF_SCORES = {"halfcheetah": (-280.178953, 12135.0), "hopper": (-20.272305, 3234.3),  # D4RL's
              "walker2d": (1.629008, 4592.3)}  # reference returns (random, expert), its infos.py


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


def evaluation(run, writer, step: int, agent, task, obs_mean, obs_std, diagnostics,
               evaluations: list) -> tuple[np.ndarray, np.ndarray]:
    """Evaluate the actor on the task's envs, log it with PAD's sample quality, keep it in
    `evaluations` and print it; with --capture-video, film episode 0 again. Returns and scores."""
    args, start = run.args, time.time()
    returns = evaluate(agent.actor, task.envs, obs_mean, obs_std, args.seed + 10_000)
    scores = task.score(returns)
    if task.metric == "normalized_score":
        scalars = {"charts/d4rl_normalized_score": scores.mean(),
                   "eval/normalized_score_std": scores.std()}
    else:  # a Minari dataset without reference returns
        scalars = {"charts/return": scores.mean(), "eval/return_std": scores.std()}
    seconds = time.time() - start
    scalars.update({"eval/return_mean": returns.mean(), "eval/seconds": seconds,
                    **(diagnostics.sample_quality(agent) if diagnostics else {})})
    run.log_evaluation(writer, step, scalars, evaluations, task.metric_words, scores, returns,
                       seconds)
    if args.capture_video and (args.video_each_eval or step == args.total_timesteps):
        try:  # checked before training; a failure now must not cost the run its results
            film = task.video_env(run.dir, writer, step, final=step == args.total_timesteps)
            evaluate(agent.actor, [film], obs_mean, obs_std, args.seed + 10_000)  # episode 0 again
        except Exception as e:
            print(f"warning: no video at step {step:,} ({type(e).__name__}: {e}); the run goes on")
    return returns, scores


if __name__ == "__main__":
    args, checkpoint = parse_args(Args, "divo_continuous", DIVO_FILES)  # --resume: the run's args

    # seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = pick_device(args.cuda)  # the GPU; without one, the CPU and a line saying so

    # data and env: a D4RL file or a Minari dataset, checked, and its evaluation envs (docs/data.md)
    task = load_task(args.env_id, args.dataset_path, args.eval_episodes, args.legacy_inertia,
                     REF_SCORES.get(robot_of(args.env_id)))  # a Minari id: its metadata's
    transitions = qlearning_dataset(task.rows)
    print(task.summary(transitions))
    data, heldout, obs_mean, obs_std = prepare_data(transitions, args, device, task.path)

    # networks and optimisers
    agent = DIVO(task.obs_dim, task.act_dim, args, device)
    start_step, evaluations, started_from = restore_run(agent, args, checkpoint, task.fingerprint,
                                                        pad_script="pad_pretrain")

    def train_step(actor_step: bool) -> dict[str, torch.Tensor]:
        """One training iteration: a batch drawn on the device, then DIVO's update, eq. (1)-(13)."""
        batch = sample_batch(data, args.batch_size)
        return agent.update(batch, actor_step)

    train_step = speed_up(train_step, agent, args, device)  # --compile, --cudagraphs: docs/speed.md
    diagnostics = Diagnostics(data, heldout, args.seed) if args.adpo else None

    # tracking: the run's folder (new, or the resumed run's), TensorBoard, W&B
    run = Run(args, "divo_continuous", DIVO_FILES, run_mode(vars(args)), start_step,
              started_from)  # locked; args.json written at once
    args = run.args
    run.describe(task, obs_mean, obs_std, len(data["rewards"]), device)  # what checkpoints record
    if args.track:
        import wandb
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=args.run_name, id=args.run_name, resume="allow",
                   save_code=True)  # videos: see divo_utils/video.py
    writer = SummaryWriter(run.dir, purge_step=start_step if checkpoint else None)
    writer.add_text("hyperparameters", markdown_table(vars(args)))

    def save(step: int, metrics: dict) -> str:
        """Everything needed to continue the run exactly: networks, optimisers, step, RNG, data."""
        state = {"agent": agent_state(agent), "evaluations": evaluations}
        return run.save(step, metrics, agent, state)

    stop = StopSignal()
    print(f"training {args.run_name} ({run.labels['mode']}) on {device} for "
          f"{args.total_timesteps:,} gradient steps; logs in {run.dir}", flush=True)
    metrics, last_time, last_step = {}, time.time(), start_step
    for step in range(start_step, args.total_timesteps):
        if stop.signum is not None:  # SIGINT or SIGTERM: a checkpoint, then exit
            stop.exit(step, save(step, metrics), __file__, run.checkpoint_path)
        metrics.update(train_step(step % args.policy_freq == 0))  # the actor: every policy_freq-th
        global_step = step + 1  # the steps done
        if run.log_due(global_step):  # every --log-freq steps, and once early
            logged = run.sync_or_stop(global_step, metrics, agent)  # the loop's host sync
            sps = (global_step - last_step) / (time.time() - last_time)
            last_time, last_step = time.time(), global_step
            contest = diagnostics.contest(agent) if diagnostics else {}
            run.log(writer, global_step, {**logged, "charts/SPS": sps, **contest})
            run.report_progress(global_step, sps, evaluations)  # a line, and progress.json
        last = global_step == args.total_timesteps  # evaluated and saved after the loop
        if args.eval_freq and global_step % args.eval_freq == 0 and not last:
            run.sync_or_stop(global_step, metrics, agent)  # a diverged run is not evaluated
            evaluation(run, writer, global_step, agent, task, obs_mean, obs_std, diagnostics,
                       evaluations)
        if args.checkpoint_freq and global_step % args.checkpoint_freq == 0 and not last:
            save(global_step, metrics)

    # the last policy: evaluation, checkpoint, model; scores.json last (it marks a finished run)
    run.sync_or_stop(args.total_timesteps, metrics, agent)
    returns, scores = evaluation(run, writer, args.total_timesteps, agent, task, obs_mean, obs_std,
                                 diagnostics, evaluations)
    if args.checkpoint_freq or checkpoint:  # resumed: its checkpoint must agree with scores.json
        print(f"checkpoint: {save(args.total_timesteps, metrics)}")
    if args.save_model:
        run.save_model({"actor": agent.actor.state_dict()})
    run.finish({**run.labels, "env_id": args.env_id, "run_name": args.run_name,
                "exp_name": args.exp_name, "seed": args.seed, "step": args.total_timesteps,
                **score_fields(task.metric, scores, returns), "evaluations": evaluations})
    print(f"final {task.metric_words} of the last policy: {scores.mean():.1f} +- "
          f"{scores.std():.1f} ({len(scores)} episodes); per-episode scores in {run.finished_path}")
    task.close()
    writer.close()
    if args.track:
        wandb.finish()
