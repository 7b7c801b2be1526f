"""Pretrain DIVO's PAD behaviour model once, in-sample, and reuse it across DIVO runs.

PAD (eq. 9-10 of DIVO, arXiv 2511.08922) trains a diffusion model on the dataset actions whose
advantage is positive. Advantages need value functions, so this script learns them in-sample as IQL
does, with no actor: Q from r + gamma (1 - d) V(s'), V as an expectile of the target critics
(eq. 2), and the binary-weighted diffusion loss on the same batch. The checkpoint it writes starts
`divo_continuous.py` or `divo_antmaze.py` (`--pad-checkpoint`, optionally `--freeze-pad`), so that
sweeps over alpha or seeds share one behaviour model. No env is needed, and there is no policy to
film: --capture-video belongs to the DIVO scripts.

This file holds the pretraining; what a run needs around it (arguments and resume, run folders,
checkpoints, D4RL and Minari loading, CUDA graphs, diagnostics) is imported from `divo_utils/`: to
copy the script into another project, copy that folder with it.

Run:
    python pad_pretrain.py --env-id hopper-medium-v2
    python divo_continuous.py --env-id hopper-medium-v2 --pad-checkpoint runs/RUN/pad_checkpoint.pt
"""

import copy
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
from torch.utils.tensorboard import SummaryWriter

from divo_utils import PAD_FILES
from divo_utils.args import check_common, check_env_id, check_schedule
from divo_utils.data import REWARD_LABELS, check_transitions, load_task, split_holdout
from divo_utils.diagnostics import before_after, diagnose, median_distance, plot_samples
from divo_utils.resume import parse_args, restore_run
from divo_utils.runs import Run, StopSignal, agent_state, markdown_table, pick_device
from divo_utils.speed import adam, speed_up

# Domain defaults (README: arguments that matter).
DOMAIN_DEFAULTS = {
    "locomotion": {"gamma": 0.99, "critic_lr": 3e-4, "expectile": 0.7, "reward_transform": "none"},
    "antmaze": {"gamma": 0.995, "critic_lr": 1e-4, "expectile": 0.9,
                "reward_transform": "minus-one"},
}


@dataclass
class Args:
    """Pretrain PAD's behaviour model (no policy to film: --capture-video is the DIVO scripts')."""

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

    # Algorithm specific arguments
    env_id: str = "hopper-medium-v2"
    """a D4RL dataset id (locomotion or AntMaze), or a Minari one; it picks the domain's defaults"""
    dataset_path: Optional[str] = None
    """a local D4RL-format HDF5 file to train on instead of the downloaded dataset"""
    total_timesteps: int = 1_000_000
    """total gradient steps (as many as a DIVO run gives its behaviour model)"""
    batch_size: int = 256
    """the batch size of every update"""
    critic_lr: Optional[float] = None
    """the learning rate of the twin critics (default: 3e-4 locomotion, 1e-4 AntMaze)"""
    value_lr: float = 3e-4
    """the learning rate of the value network V_psi"""
    diffusion_lr: float = 3e-4
    """the learning rate of the diffusion noise network eps_omega"""
    gamma: Optional[float] = None
    """the discount factor gamma (default: 0.99 locomotion, 0.995 AntMaze)"""
    tau: float = 0.005
    """target smoothing coefficient (Polyak) of the target critics"""
    expectile: Optional[float] = None
    """expectile tau of the value loss, eq. (2) (default: 0.7 locomotion, 0.9 AntMaze)"""
    reward_transform: Optional[Literal["none", "minus-one"]] = None
    """the reward learned from: `none` (r) or `minus-one` (r - 1); default: by domain"""
    diffusion_steps: int = 5
    """number of DDPM steps K"""
    beta_min: float = 0.1
    """b_min of the variance-preserving noise schedule"""
    beta_max: float = 10.0
    """b_max of the variance-preserving noise schedule"""
    pad_strength: float = 1.0
    """zeta of eq. (10), the strength of the PAD guidance"""
    hidden_dim: int = 256
    """width of every hidden layer"""
    num_layers: int = 3
    """number of hidden layers of every network"""

    # Run management (where a run writes, how it resumes, how fast it runs)
    run_name: Optional[str] = None
    """the run's new folder under runs/ (default {env_id}__{exp_name}__{seed}__{unix time})"""
    holdout: int = 2000
    """transitions held out for the diagnostics (0: use 2,000 training transitions)"""
    diag_freq: int = 50_000
    """compute the sample-to-data distances every this many steps (0: only before and after)"""
    log_freq: int = 1000
    """log losses and print a progress line every this many gradient steps"""
    checkpoint_freq: int = 50_000
    """write `runs/{run_name}/pad_checkpoint.pt` every this many steps (0: only at the end)"""
    resume: Optional[str] = None
    """continue the run of this checkpoint (arguments not given on the command line come from it)"""
    compile: bool = False
    """compile the update function with torch.compile"""
    cudagraphs: bool = False
    """replay each training iteration as a captured CUDA graph (needs a GPU; docs/speed.md)"""

    def __post_init__(self):
        domain = check_env_id(self.env_id, ("locomotion", "antmaze"), {})
        for name, value in DOMAIN_DEFAULTS[domain].items():  # the domain's defaults
            if getattr(self, name) is None:
                setattr(self, name, value)
        check_common(self, capture_video=False)  # ranges, names, device, data
        check_schedule(self, vp_beta_schedule(self.diffusion_steps, self.beta_min, self.beta_max))


# ----------------------------------------------------------------------------------------------
# Networks (the same as in divo_continuous.py / divo_antmaze.py, so their checkpoints load there)
# ----------------------------------------------------------------------------------------------
def mlp(in_dim: int, out_dim: int, hidden_dim: int, num_layers: int, activation) -> nn.Sequential:
    """`num_layers` hidden layers of `hidden_dim` units, then a linear output."""
    layers, dim = [], in_dim
    for _ in range(num_layers):
        layers += [nn.Linear(dim, hidden_dim), activation()]
        dim = hidden_dim
    return nn.Sequential(*layers, nn.Linear(dim, out_dim))

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
# In-sample pretraining: value -> critic -> PAD -> target critics, on one batch
# ----------------------------------------------------------------------------------------------
def expectile_loss(u: torch.Tensor, expectile: float) -> torch.Tensor:
    """Asymmetric squared loss of eq. (2): mean |tau - 1(u < 0)| u^2."""
    return (torch.abs(expectile - (u < 0).float()) * u**2).mean()


class PADPretrainer:
    """Critics, value net and diffusion model with their optimisers; one in-sample iteration."""

    def __init__(self, obs_dim: int, act_dim: int, args: Args, device: torch.device):
        h, n = args.hidden_dim, args.num_layers
        self.args = args
        self.critic = TwinCritic(obs_dim, act_dim, h, n).to(device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.value = ValueNet(obs_dim, h, n).to(device)
        K, b_min, b_max = args.diffusion_steps, args.beta_min, args.beta_max
        self.diffusion = Diffusion(obs_dim, act_dim, K, b_min, b_max, h, n).to(device)
        capturable = device.type == "cuda"  # Adam state on the GPU, so an iteration can be graphed
        self.critic_optimizer = adam(self.critic, args.critic_lr, capturable)
        self.value_optimizer = adam(self.value, args.value_lr, capturable)
        self.diffusion_optimizer = adam(self.diffusion, args.diffusion_lr, capturable)

    def target_q(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """min_i Q_theta'_i(s, a): the pessimistic value of eq. (2), as in DIVO."""
        return self.critic_target(s, a).min(dim=0).values

    @torch.no_grad()
    def advantage(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """A(s, a) = min_i Q'_i(s, a) - V(s), as PAD weighs it."""
        return self.target_q(s, a) - self.value(s)

    def update(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        """One iteration; returns the metrics as device tensors (no host sync)."""
        s, a, r, s_next, not_done = batch
        args = self.args
        # Value, eq. (2): V is the expectile of min_i Q'_i(s, a) over dataset actions [IQL]
        with torch.no_grad():
            q_target = self.target_q(s, a)
        u = q_target - self.value(s)
        value_loss = expectile_loss(u, args.expectile)
        self.value_optimizer.zero_grad(set_to_none=True)
        value_loss.backward()
        self.value_optimizer.step()
        # Critic: in-sample target y = r + gamma (1 - d) V(s') [IQL], no actor
        with torch.no_grad():
            y = r + args.gamma * not_done * self.value(s_next)
        q = self.critic(s, a)
        qf_loss = ((q - y) ** 2).mean(dim=1).sum()
        self.critic_optimizer.zero_grad(set_to_none=True)
        qf_loss.backward()
        self.critic_optimizer.step()
        # PAD, eq. (9)-(10): w = zeta * 1[A(s, a) > 0], A = min_i Q'_i(s, a) - V(s) before V's step
        positive = (u.detach() > 0).float()
        pad_loss = self.diffusion.loss(s, a, args.pad_strength * positive)
        self.diffusion_optimizer.zero_grad(set_to_none=True)
        pad_loss.backward()
        self.diffusion_optimizer.step()
        with torch.no_grad():  # theta' <- tau theta + (1 - tau) theta', one fused kernel (LeanRL's)
            targets, online = list(self.critic_target.parameters()), list(self.critic.parameters())
            torch._foreach_lerp_(targets, online, args.tau)
        return {"losses/qf_loss": qf_loss.detach(), "losses/qf1_values": q[0].mean().detach(),
                "losses/value_loss": value_loss.detach(), "losses/pad_loss": pad_loss.detach(),
                "pad/positive_fraction": positive.mean()}


# ----------------------------------------------------------------------------------------------
# Data: D4RL's transitions, state normalisation, batches
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


def transform_rewards(rewards: np.ndarray, transform: str) -> np.ndarray:
    """The rewards learned from: r, or r - 1 (0 at the goal, -1 elsewhere) for AntMaze [IQL]."""
    return rewards - 1.0 if transform == "minus-one" else rewards


if __name__ == "__main__":
    args, checkpoint = parse_args(Args, "pad_pretrain", PAD_FILES)  # --resume: the run's args

    # seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = pick_device(args.cuda)  # the GPU; without one, the CPU and a line saying so

    # data: a D4RL file or a Minari dataset, checked (no env needed; docs/data.md)
    task = load_task(args.env_id, args.dataset_path)
    transitions = qlearning_dataset(task.rows)
    print(task.summary(transitions))
    transitions["rewards"] = transform_rewards(transitions["rewards"], args.reward_transform)
    data, heldout, obs_mean, obs_std = prepare_data(transitions, args, device, task.path)
    s_ho, a_ho = heldout["observations"], heldout["actions"]
    bandwidth = median_distance(torch.cat([s_ho, a_ho], 1))  # the MMD kernel's bandwidth
    print(f"reward     {REWARD_LABELS[args.reward_transform]}; "
          f"{len(data['rewards']):,} transitions to train on, diagnostics on {len(s_ho):,} "
          + ("held-out ones" if args.holdout else "training ones (--holdout 0)"))

    # networks and optimisers
    pretrainer = PADPretrainer(task.obs_dim, task.act_dim, args, device)
    initial_diffusion = copy.deepcopy(pretrainer.diffusion)  # the untrained model: "before"
    start_step, history, _ = restore_run(pretrainer, args, checkpoint, task.fingerprint,
                                         "diagnostics",
                                         initial_diffusion=initial_diffusion)

    def train_step() -> dict[str, torch.Tensor]:
        """One pretraining iteration: a batch drawn on the device, then the in-sample update."""
        return pretrainer.update(sample_batch(data, args.batch_size))

    train_step = speed_up(train_step, pretrainer, args, device)  # --compile, --cudagraphs

    # tracking: the run's folder (new, or the resumed run's), TensorBoard, W&B
    run = Run(args, "pad_pretrain", PAD_FILES, None, start_step)  # locked; args.json
    args = run.args
    run.describe(task, obs_mean, obs_std, len(data["rewards"]), device)  # what checkpoints record
    if args.track:
        import wandb
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=args.run_name, id=args.run_name, resume="allow",
                   save_code=True)
    writer = SummaryWriter(run.dir, purge_step=start_step if checkpoint else None)
    writer.add_text("hyperparameters", markdown_table(vars(args)))

    def save(step: int, metrics: dict) -> str:
        """What the DIVO scripts start from, plus what this script needs to continue exactly."""
        state = {**agent_state(pretrainer), "diagnostics": history,
                 "initial_diffusion": initial_diffusion.state_dict()}
        return run.save(step, metrics, pretrainer, state)

    def log_diagnostics(step: int, models: dict[str, Diffusion]) -> dict[str, float]:
        """Each model's sample-to-data distances on held-out positive-advantage data, logged."""
        row = {"step": step, **diagnose(pretrainer, models, s_ho, a_ho, bandwidth)}
        run.log(writer, step, {f"diag/{k}": value for k, value in row.items() if k != "step"})
        history.append(row)
        print("diag   " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v:,}"
                                    for k, v in row.items()))
        return row

    stop = StopSignal()
    print(f"pretraining {args.run_name} on {device} for {args.total_timesteps:,} steps; logs in "
          f"{run.dir}", flush=True)
    if not checkpoint:
        log_diagnostics(0, {"model": pretrainer.diffusion})
    metrics, last_time, last_step = {}, time.time(), start_step
    for step in range(start_step, args.total_timesteps):
        if stop.signum is not None:  # SIGINT or SIGTERM: a checkpoint, then exit
            stop.exit(step, save(step, metrics), __file__, run.checkpoint_path)
        metrics = train_step()
        global_step = step + 1  # the steps done
        if run.log_due(global_step):  # every --log-freq steps, and once early
            logged = run.sync_or_stop(global_step, metrics, pretrainer)  # the loop's only host sync
            sps = (global_step - last_step) / (time.time() - last_time)
            last_time, last_step = time.time(), global_step
            run.log(writer, global_step, {**logged, "charts/SPS": sps})
            run.report_progress(global_step, sps, [], f" | pad_loss {logged['losses/pad_loss']:.4f}"
                                f" | positive {logged['pad/positive_fraction']:.2f}")
        last = global_step == args.total_timesteps  # diagnosed and saved after the loop
        if args.diag_freq and global_step % args.diag_freq == 0 and not last:
            log_diagnostics(global_step, {"model": pretrainer.diffusion})
        if args.checkpoint_freq and global_step % args.checkpoint_freq == 0 and not last:
            save(global_step, metrics)

    # the untrained and trained models on the final labels; pad_diagnostics.json last (finished)
    models = {"model": pretrainer.diffusion, "initial": initial_diffusion}
    final = log_diagnostics(args.total_timesteps, models)
    path = save(args.total_timesteps, metrics)
    plot_samples({"before": initial_diffusion, "after": pretrainer.diffusion}, s_ho, a_ho,
                 data["observations"], data["actions"], os.path.join(run.dir, "pad_samples.png"))
    run.finish({"env_id": args.env_id, "run_name": args.run_name,
                "heldout_transitions": len(s_ho), "heldout": bool(args.holdout),
                "mmd_bandwidth": bandwidth, "final": final, "history": history})
    print(before_after(final, "held-out" if args.holdout else "training"))
    print(f"checkpoint: {path}\nuse it with: --pad-checkpoint {run.checkpoint_path} [--freeze-pad]")
    writer.close()
    if args.track:
        wandb.finish()
