"""Pretrain DIVO's PAD behaviour model once, in-sample, and reuse it across DIVO runs.

PAD (eq. 9-10 of DIVO, arXiv 2511.08922) trains a diffusion model on the dataset actions whose advantage
is positive. Advantages need value functions, so this script learns them in-sample as IQL does, with no
actor: Q from r + gamma (1 - d) V(s'), V as an expectile of the target critics (eq. 2), and the binary-
weighted diffusion loss on the same batch. The checkpoint it writes starts `divo_continuous.py` or
`divo_antmaze.py` (`--pad-checkpoint`, optionally `--freeze-pad`), so that sweeps over alpha or seeds
share one behaviour model. No env is needed.

Run:
    python pad_pretrain.py --env-id hopper-medium-v2
    python divo_continuous.py --env-id hopper-medium-v2 --pad-checkpoint runs/<run_name>/pad_checkpoint.pt
"""

import copy
import difflib
import hashlib
import http.client
import json
import math
import os
import random
import signal
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, fields, replace
from typing import Literal, Optional

import h5py
import numpy as np
import torch
import torch.nn as nn
import tyro
from torch.utils.tensorboard import SummaryWriter


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

    # Algorithm specific arguments
    env_id: str = "hopper-medium-v2"
    """the D4RL dataset id (locomotion or AntMaze); it picks the domain's defaults"""
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
    """reward used for learning: `none` (r) or `minus-one` (r - 1) (default: none locomotion, minus-one AntMaze)"""
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
    holdout: int = 2000
    """transitions held out of training, on which the diagnostics compare samples with data"""
    diag_freq: int = 50_000
    """compute the sample-to-data distances every this many gradient steps (0: only before and after)"""
    log_freq: int = 1000
    """log losses and print a progress line every this many gradient steps"""
    checkpoint_freq: int = 50_000
    """write `runs/{run_name}/pad_checkpoint.pt` every this many gradient steps (0: only at the end)"""
    resume: Optional[str] = None
    """continue the run of this checkpoint (arguments not given on the command line come from it)"""


# Arguments that may differ between a checkpoint and the command that resumes it.
RESUME_FREE_ARGS = {"resume", "cuda", "track", "wandb_project_name", "wandb_entity", "total_timesteps",
                    "dataset_path", "log_freq", "diag_freq", "checkpoint_freq"}
# Domain defaults (README: arguments that matter).
DOMAIN_DEFAULTS = {
    "locomotion": {"gamma": 0.99, "critic_lr": 3e-4, "expectile": 0.7, "reward_transform": "none"},
    "antmaze": {"gamma": 0.995, "critic_lr": 1e-4, "expectile": 0.9, "reward_transform": "minus-one"},
}


class InputError(SystemExit):
    """Bad input from the user: exits with one message that says what is wrong and what to do."""

    def __init__(self, message: str):
        super().__init__(f"error: {message}")


# ----------------------------------------------------------------------------------------------
# Data: D4RL files read with h5py (the `d4rl` package cannot be installed any more, see the README)
# ----------------------------------------------------------------------------------------------
D4RL_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl"
LOCOMOTION_DIMS = {"halfcheetah": (17, 6), "hopper": (11, 3), "walker2d": (17, 6)}
LEVELS = ("random", "medium", "medium-replay", "medium-expert", "expert", "full-replay")
ANTMAZE_FILES = {
    "umaze": "Ant_maze_u-maze_noisy_multistart_False_multigoal_False_sparse_fixed.hdf5",
    "umaze-diverse": "Ant_maze_u-maze_noisy_multistart_True_multigoal_True_sparse_fixed.hdf5",
    "medium-play": "Ant_maze_big-maze_noisy_multistart_True_multigoal_False_sparse_fixed.hdf5",
    "medium-diverse": "Ant_maze_big-maze_noisy_multistart_True_multigoal_True_sparse_fixed.hdf5",
    "large-play": "Ant_maze_hardest-maze_noisy_multistart_True_multigoal_False_sparse_fixed.hdf5",
    "large-diverse": "Ant_maze_hardest-maze_noisy_multistart_True_multigoal_True_sparse_fixed.hdf5",
}
ENV_IDS = tuple(f"{env}-{level}-v2" for env in LOCOMOTION_DIMS for level in LEVELS) + tuple(
    f"antmaze-{task}-v2" for task in ANTMAZE_FILES)
HDF5_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")


def check_env_id(env_id: str) -> str:
    """Return the domain ("locomotion" or "antmaze") of a D4RL id, or stop with the valid ids."""
    if env_id not in ENV_IDS:
        close = difflib.get_close_matches(env_id, ENV_IDS, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise InputError(f"unknown --env-id {env_id!r}; {hint}valid ids: {', '.join(ENV_IDS)}")
    return "antmaze" if env_id.startswith("antmaze-") else "locomotion"


def dataset_dims(env_id: str) -> tuple[int, int]:
    """Observation and action sizes of a D4RL dataset."""
    return (29, 8) if env_id.startswith("antmaze-") else LOCOMOTION_DIMS[env_id.split("-")[0]]


def dataset_url(env_id: str) -> str:
    """D4RL's download address of a dataset."""
    name = env_id[: -len("-v2")]
    if name.startswith("antmaze-"):
        return f"{D4RL_URL}/ant_maze_v2/{ANTMAZE_FILES[name[len('antmaze-'):]]}"
    env, level = name.split("-", 1)
    return f"{D4RL_URL}/gym_mujoco_v2/{env}_{level.replace('-', '_')}-v2.hdf5"


def default_dataset_path(env_id: str) -> str:
    """Where D4RL caches a dataset: $D4RL_DATASET_DIR or ~/.d4rl/datasets, file named as in the URL."""
    cache = os.environ.get("D4RL_DATASET_DIR", os.path.expanduser(os.path.join("~", ".d4rl", "datasets")))
    return os.path.join(cache, os.path.basename(dataset_url(env_id)))


def download(url: str, path: str, timeout: float = 60.0) -> None:
    """Download `url` to `path`; the file appears only once complete and readable as HDF5."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=os.path.basename(path) + ".")
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
    """Read and check a D4RL-format HDF5 file: keys, shapes against the env, finite values."""
    if not os.path.isfile(path):
        raise InputError(f"no dataset file at {path}: check --dataset-path, or leave it out to download the dataset")
    fix = ("delete it and run again to download it anew" if os.path.basename(path) in {
        os.path.basename(dataset_url(env_id)) for env_id in ENV_IDS} else "re-create or re-download it")
    try:
        with h5py.File(path, "r") as f:
            missing = [key for key in HDF5_KEYS if key not in f]
            if missing:
                raise InputError(f"{path} lacks the D4RL keys {missing} (it has {sorted(f.keys())}); "
                                 f"a D4RL v2 file has {list(HDF5_KEYS)}")
            data = {key: f[key][()] for key in HDF5_KEYS}
    except OSError as e:
        raise InputError(f"cannot read {path} as HDF5 ({e}): the file is partial or corrupt; {fix}") from e
    for key in ("rewards", "terminals", "timeouts"):  # old files store these as (N, 1)
        if data[key].ndim == 2 and data[key].shape[1] == 1:
            data[key] = data[key][:, 0]
    for key, dtype in (("observations", np.float32), ("actions", np.float32), ("rewards", np.float32),
                       ("terminals", bool), ("timeouts", bool)):  # medium-replay files are float64
        data[key] = data[key].astype(dtype)
    n = len(data["observations"])
    expected = {"observations": (n, obs_dim), "actions": (n, act_dim), "rewards": (n,), "terminals": (n,), "timeouts": (n,)}
    for key, shape in expected.items():
        if data[key].shape != shape:
            raise InputError(f"{path}: {key!r} has shape {data[key].shape}, expected {shape} for this --env-id "
                             f"(observation size {obs_dim}, action size {act_dim}); is it a dataset of another env?")
    if n < 2:
        raise InputError(f"{path} holds {n} row(s); a dataset needs at least two")
    for key in ("observations", "actions", "rewards"):
        bad = ~np.isfinite(data[key].reshape(n, -1)).all(axis=1)
        if bad.any():
            raise InputError(f"{path}: {int(bad.sum())} row(s) of {key!r} hold NaN or inf (first at row "
                             f"{int(np.argmax(bad))}); the file is corrupt: {fix}, or drop those rows")
    return data


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


def dataset_summary(path: str, data: dict[str, np.ndarray], transitions: dict[str, np.ndarray]) -> str:
    """One screen about the data: size, episodes, returns, rewards, terminals."""
    n = len(data["rewards"])
    ends = np.flatnonzero(data["terminals"] | data["timeouts"])
    if len(ends) == 0 or ends[-1] != n - 1:  # a trailing unfinished episode counts too
        ends = np.append(ends, n - 1)
    starts = np.concatenate([[0], ends[:-1] + 1])
    returns = np.add.reduceat(data["rewards"], starts)
    return "\n".join([
        f"dataset      {path}",
        f"rows         {n:,} -> {len(transitions['rewards']):,} transitions "
        f"(qlearning_dataset: last row and {int(data['timeouts'][:-1].sum()):,} timeout rows dropped)",
        f"episodes     {len(returns):,}, length {np.mean(ends - starts + 1):.0f} on average",
        f"returns      min {returns.min():.1f}  mean {returns.mean():.1f}  max {returns.max():.1f}",
        f"rewards      min {transitions['rewards'].min():.3f}  mean {transitions['rewards'].mean():.3f}  "
        f"max {transitions['rewards'].max():.3f}",
        f"terminals    {transitions['terminals'].mean():.4%} of transitions",
    ])


def transform_rewards(rewards: np.ndarray, transform: str) -> np.ndarray:
    """The rewards the agent learns from: r, or r - 1 (0 at the goal, -1 elsewhere) for AntMaze [IQL]."""
    return rewards - 1.0 if transform == "minus-one" else rewards


def dataset_fingerprint(data: dict[str, np.ndarray]) -> str:
    """SHA-1 of the dataset's arrays, stored in checkpoints to refuse a checkpoint of other data."""
    sha = hashlib.sha1()
    for key in HDF5_KEYS:
        sha.update(np.ascontiguousarray(data[key]).tobytes())
    return sha.hexdigest()


def sample_batch(data: dict[str, torch.Tensor], batch_size: int) -> tuple[torch.Tensor, ...]:
    """Uniform batch of (s, a, r, s', 1 - d), sampled on the data's device."""
    idx = torch.randint(len(data["rewards"]), (batch_size,), device=data["rewards"].device)
    return tuple(data[key][idx] for key in ("observations", "actions", "rewards", "next_observations", "not_done"))


# ----------------------------------------------------------------------------------------------
# Networks (the same as in divo_continuous.py / divo_antmaze.py, so their checkpoints load there)
# ----------------------------------------------------------------------------------------------
def mlp(in_dim: int, out_dim: int, hidden_dim: int, num_layers: int, activation: type[nn.Module]) -> nn.Sequential:
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
    """Q_theta1 and Q_theta2 as one ensemble of two MLPs, evaluated in a single call."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, num_layers: int, num_critics: int = 2):
        super().__init__()
        dims = [obs_dim + act_dim] + [hidden_dim] * num_layers
        layers = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [VectorizedLinear(d_in, d_out, num_critics), nn.ReLU()]
        self.net = nn.Sequential(*layers, VectorizedLinear(hidden_dim, 1, num_critics))
        self.num_critics = num_critics

    def forward(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Q-values of every member, shape (num_critics, batch)."""
        x = torch.cat([s, a], dim=-1).unsqueeze(0).expand(self.num_critics, -1, -1)
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
        self.register_buffer("freqs", torch.exp(torch.arange(half) * -(math.log(10000.0) / (half - 1))))

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        x = k.float().unsqueeze(-1) * self.freqs
        return torch.cat([x.sin(), x.cos()], dim=-1)


class NoiseNet(nn.Module):
    """eps_omega(a_k, k, s): predicts the noise in a noised action (Diffusion-QL's MLP)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int, num_layers: int, t_dim: int = 16):
        super().__init__()
        self.time_mlp = nn.Sequential(SinusoidalEmbedding(t_dim), nn.Linear(t_dim, 2 * t_dim), nn.Mish(),
                                      nn.Linear(2 * t_dim, t_dim))
        self.net = mlp(act_dim + t_dim + obs_dim, act_dim, hidden_dim, num_layers, nn.Mish)

    def forward(self, a_k: torch.Tensor, k: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([a_k, self.time_mlp(k), s], dim=-1))


def vp_beta_schedule(num_steps: int, beta_min: float, beta_max: float) -> torch.Tensor:
    """Variance-preserving betas beta_1..beta_K (Diffusion-QL's discretisation), float64."""
    k = torch.arange(1, num_steps + 1, dtype=torch.float64)
    return 1 - torch.exp(-beta_min / num_steps - (beta_max - beta_min) * (2 * k - 1) / (2 * num_steps**2))


class Diffusion(nn.Module):
    """The PAD behaviour model pi_omega(a|s): a conditional DDPM over actions (eq. 3-10)."""

    def __init__(self, obs_dim: int, act_dim: int, num_steps: int, beta_min: float, beta_max: float,
                 hidden_dim: int, num_layers: int):
        super().__init__()
        self.eps_model = NoiseNet(obs_dim, act_dim, hidden_dim, num_layers)
        self.num_steps, self.act_dim = num_steps, act_dim
        # Every schedule tensor is indexed by k = 0..K, with k = 0 meaning "no noise" (alpha_bar_0 = 1).
        betas = torch.cat([torch.zeros(1, dtype=torch.float64), vp_beta_schedule(num_steps, beta_min, beta_max)])
        alphas = 1 - betas
        alpha_bar = torch.cumprod(alphas, dim=0)
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        one_minus = (1 - alpha_bar).clamp(min=1e-20)  # only k = 0 is clamped, and it is never used
        buffers = {
            "alpha_bar": alpha_bar,
            "sqrt_alpha_bar": alpha_bar.sqrt(),                              # eq. (3), (5)
            "sqrt_one_minus_alpha_bar": (1 - alpha_bar).sqrt(),              # eq. (3), (5)
            "sqrt_recip_alpha_bar": (1 / alpha_bar).sqrt(),                  # eq. (7)
            "sqrt_recipm1_alpha_bar": (1 / alpha_bar - 1).sqrt(),            # eq. (7)
            "posterior_coef_a0": betas * alpha_bar_prev.sqrt() / one_minus,  # eq. (8)
            "posterior_coef_ak": (1 - alpha_bar_prev) * alphas.sqrt() / one_minus,
            "posterior_std": (betas * (1 - alpha_bar_prev) / one_minus).sqrt(),  # 0 at k = 1
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.float())

    def loss(self, s: torch.Tensor, a: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Weighted denoising loss, eq. (9)-(10): mean_b w_b ||eps_b - eps_omega(a_k, k, s)||^2 / act_dim."""
        k = torch.randint(1, self.num_steps + 1, (len(a),), device=a.device)  # k ~ U{1..K}
        eps = torch.randn_like(a)
        a_k = self.sqrt_alpha_bar[k, None] * a + self.sqrt_one_minus_alpha_bar[k, None] * eps  # eq. (3), (5)
        return (weights[:, None] * (eps - self.eps_model(a_k, k, s)) ** 2).mean()

    @torch.no_grad()
    def sample(self, s: torch.Tensor) -> torch.Tensor:
        """DDPM ancestral sampling a_K -> a_0 (eq. 4, 7, 8), all noise drawn up front; actions in [-1, 1]."""
        noise = torch.randn(self.num_steps + 1, len(s), self.act_dim, device=s.device)
        a = noise[self.num_steps]  # a_K ~ N(0, I)
        for k in range(self.num_steps, 0, -1):
            k_batch = torch.full((len(s),), k, device=s.device)
            a0_hat = (self.sqrt_recip_alpha_bar[k] * a - self.sqrt_recipm1_alpha_bar[k] * self.eps_model(a, k_batch, s)
                      ).clamp(-1, 1)  # eq. (7)
            mean = self.posterior_coef_a0[k] * a0_hat + self.posterior_coef_ak[k] * a  # eq. (8)
            a = mean + self.posterior_std[k] * noise[k - 1]  # posterior_std[1] = 0: no noise on the last step
        return a.clamp(-1, 1)


def expectile_loss(u: torch.Tensor, expectile: float) -> torch.Tensor:
    """Asymmetric squared loss of eq. (2): mean |tau - 1(u < 0)| u^2."""
    return (torch.abs(expectile - (u < 0).float()) * u**2).mean()


# ----------------------------------------------------------------------------------------------
# In-sample pretraining: value -> critic -> PAD -> target critics, on one batch
# ----------------------------------------------------------------------------------------------
class PADPretrainer:
    """Critics, value net and diffusion model with their optimisers; one in-sample iteration per update."""

    def __init__(self, obs_dim: int, act_dim: int, args: Args, device: torch.device):
        h, n = args.hidden_dim, args.num_layers
        self.args = args
        self.critic = TwinCritic(obs_dim, act_dim, h, n).to(device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.value = ValueNet(obs_dim, h, n).to(device)
        self.diffusion = Diffusion(obs_dim, act_dim, args.diffusion_steps, args.beta_min, args.beta_max, h, n).to(device)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=args.critic_lr)
        self.value_optimizer = torch.optim.Adam(self.value.parameters(), lr=args.value_lr)
        self.diffusion_optimizer = torch.optim.Adam(self.diffusion.parameters(), lr=args.diffusion_lr)

    def update(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        """One iteration; returns the metrics as device tensors (no host sync)."""
        s, a, r, s_next, not_done = batch
        args = self.args
        # Value, eq. (2): V is the expectile of min_i Q'_i(s, a) over dataset actions [IQL]
        with torch.no_grad():
            q_target = self.critic_target(s, a).min(dim=0).values
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
        # PAD, eq. (9)-(10): w = zeta * 1[A(s, a) > 0] with A = min_i Q'_i(s, a) - V(s)
        positive = (u.detach() > 0).float()
        pad_loss = self.diffusion.loss(s, a, args.pad_strength * positive)
        self.diffusion_optimizer.zero_grad(set_to_none=True)
        pad_loss.backward()
        self.diffusion_optimizer.step()
        with torch.no_grad():  # theta' <- tau theta + (1 - tau) theta'
            torch._foreach_lerp_(list(self.critic_target.parameters()), list(self.critic.parameters()), args.tau)
        return {"losses/qf_loss": qf_loss.detach(), "losses/qf1_values": q[0].mean().detach(),
                "losses/value_loss": value_loss.detach(), "losses/pad_loss": pad_loss.detach(),
                "pad/positive_fraction": positive.mean()}

    @torch.no_grad()
    def advantage(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """A(s, a) = min_i Q'_i(s, a) - V(s), as PAD weighs it."""
        return self.critic_target(s, a).min(dim=0).values - self.value(s)

    def modules(self) -> dict[str, nn.Module]:
        return {"critic": self.critic, "critic_target": self.critic_target, "value": self.value, "diffusion": self.diffusion}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"critic_optimizer": self.critic_optimizer, "value_optimizer": self.value_optimizer,
                "diffusion_optimizer": self.diffusion_optimizer}


# ----------------------------------------------------------------------------------------------
# Diagnostics: how close the model's samples are to the positive-advantage data on held-out states
# ----------------------------------------------------------------------------------------------
def wasserstein_per_dim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1-D Wasserstein-1 distance of each column between two equally sized samples."""
    return (x.sort(dim=0).values - y.sort(dim=0).values).abs().mean(dim=0)


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Squared maximum mean discrepancy with a Gaussian kernel (biased estimate)."""
    def kernel(p, q):
        return torch.exp(-torch.cdist(p, q) ** 2 / (2 * bandwidth**2)).mean()
    return kernel(x, x) + kernel(y, y) - 2 * kernel(x, y)


@torch.no_grad()
def sample_distances(diffusion: Diffusion, s: torch.Tensor, a: torch.Tensor, bandwidth: float) -> dict[str, float]:
    """One model sample per held-out state against that state's dataset action.

    `wasserstein`: mean over action dimensions of the per-dimension W1 between sampled and dataset actions;
    `mmd`: MMD^2 between the joint (s, a_sampled) and (s, a_data) sets, which also sees whether the sample
    fits its own state.
    """
    sampled = diffusion.sample(s)
    return {"wasserstein": wasserstein_per_dim(sampled, a).mean().item(),
            "mmd": mmd_rbf(torch.cat([s, sampled], 1), torch.cat([s, a], 1), bandwidth).item()}


@torch.no_grad()
def plot_samples(models: dict[str, Diffusion], states: torch.Tensor, actions: torch.Tensor,
                 train_states: torch.Tensor, train_actions: torch.Tensor, path: str, neighbours: int = 50,
                 num_samples: int = 300) -> None:
    """PNG: for a few held-out states, model samples against the dataset actions of the nearest states."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(models), len(states), figsize=(3.2 * len(states), 3.2 * len(models)), squeeze=False)
    nearest = torch.cdist(states, train_states).topk(neighbours, largest=False).indices
    for row, (label, model) in enumerate(models.items()):
        for col in range(len(states)):
            ax = axes[row, col]
            sampled = model.sample(states[col].expand(num_samples, -1)).cpu()
            near = train_actions[nearest[col]].cpu()
            ax.scatter(sampled[:, 0], sampled[:, 1], s=6, alpha=0.5, label="model samples")
            ax.scatter(near[:, 0], near[:, 1], s=10, alpha=0.7, label=f"data, {neighbours} nearest states")
            ax.scatter(actions[col, 0].cpu(), actions[col, 1].cpu(), marker="*", s=150, c="k", label="data, this state")
            ax.set(xlim=(-1.05, 1.05), ylim=(-1.05, 1.05), title=f"{label}: state {col}")
            ax.set_xlabel("action[0]")
            ax.set_ylabel("action[1]")
    axes[0, 0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
def save_checkpoint(path: str, payload: dict) -> None:
    """Write atomically: a crash while saving never leaves a broken file in place of a good one."""
    tmp = f"{path}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, kind: str) -> dict:
    """Read a checkpoint written by `kind` (a script name), or stop with what is wrong."""
    if not os.path.isfile(path):
        raise InputError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise InputError(f"cannot read checkpoint {path} ({type(e).__name__}: {e}); it is partial or not a "
                         f"checkpoint of this project") from e
    found = payload.get("kind") if isinstance(payload, dict) else None
    if found != kind:
        raise InputError(f"{path} is a checkpoint of {found or 'something else'}, not of {kind}.py")
    return payload


def resume_args(path: str) -> tuple[Args, dict]:
    """Arguments of a resumed run: the checkpoint's, overridden by those given on the command line."""
    payload = load_checkpoint(path, "pad_pretrain")
    saved = Args(**{f.name: payload["args"][f.name] for f in fields(Args) if f.name in payload["args"]})
    args = tyro.cli(Args, default=replace(saved, resume=path))
    changed = [f"--{name.replace('_', '-')} {getattr(args, name)!r} (checkpoint: {getattr(saved, name)!r})"
               for name in (f.name for f in fields(Args)) if name not in RESUME_FREE_ARGS
               and getattr(args, name) != getattr(saved, name)]
    if changed:
        raise InputError(f"{path} belongs to another run than this command: {'; '.join(changed)}. Resume with "
                         f"`--resume {path}` and the original arguments, or start a new run without --resume")
    return args, payload


def format_duration(seconds: float) -> str:
    """1h02m03s style."""
    seconds = int(seconds)
    return (f"{seconds // 3600}h" if seconds >= 3600 else "") + f"{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


if __name__ == "__main__":
    args = tyro.cli(Args)
    payload = None
    if args.resume:
        args, payload = resume_args(args.resume)
    domain = check_env_id(args.env_id)
    args = replace(args, **{k: v for k, v in DOMAIN_DEFAULTS[domain].items() if getattr(args, k) is None})
    run_name = payload["run_name"] if payload else f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.dirname(args.resume) if payload else os.path.join("runs", run_name)

    # seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # data (no env needed)
    obs_dim, act_dim = dataset_dims(args.env_id)
    path = args.dataset_path or default_dataset_path(args.env_id)
    if not os.path.isfile(path) and not args.dataset_path:
        download(dataset_url(args.env_id), path)
    raw = load_d4rl_file(path, obs_dim, act_dim)
    fingerprint = dataset_fingerprint(raw)
    dataset = qlearning_dataset(raw)
    print(dataset_summary(path, raw, dataset))
    if domain == "antmaze" and not (raw["rewards"] > 0).any():
        raise InputError(f"{path} has no goal rewards (no reward > 0): not a sparse AntMaze dataset")
    if payload and (payload["dataset_sha1"] != fingerprint):
        raise InputError(f"{args.resume} was trained on another dataset than {path}; resume on the same data")
    dataset["actions"] = np.clip(dataset["actions"], -1.0, 1.0)  # the actor and the sampler act in [-1, 1]
    dataset["rewards"] = transform_rewards(dataset["rewards"], args.reward_transform)
    reward = "r - 1" if args.reward_transform == "minus-one" else "r"
    print(f"reward       {reward} (--reward-transform {args.reward_transform})")
    obs_mean = dataset["observations"].mean(axis=0)
    obs_std = dataset["observations"].std(axis=0) + 1e-3
    num_holdout = min(args.holdout, len(dataset["rewards"]) // 10)
    order = np.random.default_rng(args.seed).permutation(len(dataset["rewards"]))
    split = {"train": np.sort(order[num_holdout:]), "holdout": np.sort(order[:num_holdout])}
    data, heldout = ({
        "observations": torch.tensor((dataset["observations"][idx] - obs_mean) / obs_std, device=device),
        "actions": torch.tensor(dataset["actions"][idx], device=device),
        "rewards": torch.tensor(dataset["rewards"][idx], device=device),
        "next_observations": torch.tensor((dataset["next_observations"][idx] - obs_mean) / obs_std, device=device),
        "not_done": torch.tensor(1.0 - dataset["terminals"][idx], dtype=torch.float32, device=device),
    } for idx in (split["train"], split["holdout"]))
    print(f"split        {len(split['train']):,} transitions to train on, {num_holdout:,} held out for diagnostics")

    # networks and optimisers
    pretrainer = PADPretrainer(obs_dim, act_dim, args, device)
    initial_diffusion = copy.deepcopy(pretrainer.diffusion)  # the untrained model, for "before" diagnostics
    start_step, diagnostics = 0, []
    if payload:
        for name, part in {**pretrainer.modules(), **pretrainer.optimizers()}.items():
            part.load_state_dict(payload[name])
        initial_diffusion.load_state_dict(payload["initial_diffusion"])
        start_step, diagnostics = payload["step"], payload["diagnostics"]
        torch.set_rng_state(payload["rng"]["torch"])
        if device.type == "cuda" and payload["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(payload["rng"]["cuda"])
        print(f"resumed {run_name} at step {start_step:,}")
    s_ho, a_ho = heldout["observations"], heldout["actions"]
    bandwidth = torch.cdist(torch.cat([s_ho, a_ho], 1), torch.cat([s_ho, a_ho], 1)).median().item()

    # tracking
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=run_name, id=run_name, resume="allow", save_code=True)
    writer = SummaryWriter(run_dir, purge_step=start_step if payload else None)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n%s" % "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump(asdict(args), f, indent=2)

    def checkpoint(step: int) -> str:
        """What the DIVO scripts start from, plus what this script needs to continue exactly."""
        path = os.path.join(run_dir, "pad_checkpoint.pt")
        save_checkpoint(path, {
            "kind": "pad_pretrain", "args": asdict(args), "run_name": run_name, "step": step,
            "env_id": args.env_id, "obs_dim": obs_dim, "act_dim": act_dim, "dataset_sha1": fingerprint,
            "num_transitions": len(dataset["rewards"]), "obs_mean": torch.tensor(obs_mean), "obs_std": torch.tensor(obs_std),
            **{name: part.state_dict() for name, part in {**pretrainer.modules(), **pretrainer.optimizers()}.items()},
            "initial_diffusion": initial_diffusion.state_dict(), "diagnostics": diagnostics,
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None},
        })
        return path

    def diagnose(step: int, models: dict[str, Diffusion]) -> dict[str, float]:
        """Distances of each model's samples to the held-out positive-advantage data, logged."""
        positive = pretrainer.advantage(s_ho, a_ho) > 0
        row = {"step": step, "positive_fraction": positive.float().mean().item()}
        s_pos, a_pos = (s_ho[positive], a_ho[positive]) if positive.sum() >= 10 else (s_ho, a_ho)
        for label, model in models.items():
            for name, value in sample_distances(model, s_pos, a_pos, bandwidth).items():
                row[f"{label}_{name}"] = value
                writer.add_scalar(f"diag/{label}_{name}", value, step)
        writer.add_scalar("diag/heldout_positive_fraction", row["positive_fraction"], step)
        diagnostics.append(row)
        shown = (f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v:,}" for k, v in row.items())
        print("diag   " + ", ".join(shown), flush=True)
        return row

    stop_signal = []

    def request_stop(signum, frame):
        if stop_signal:  # a second signal stops at once
            raise KeyboardInterrupt
        stop_signal.append(signum)
        print("\nstopping after this step with a checkpoint (signal again to stop at once)", flush=True)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    print(f"pretraining {run_name} on {device} for {args.total_timesteps:,} gradient steps; logs in {run_dir}", flush=True)
    if not payload:
        diagnose(0, {"model": pretrainer.diffusion})
    metrics, last_time, last_step = {}, time.time(), start_step
    for step in range(start_step, args.total_timesteps):
        if stop_signal:
            path = checkpoint(step)
            print(f"stopped at step {step:,}; resume with: python {os.path.basename(__file__)} --resume {path}")
            raise SystemExit(128 + stop_signal[0])
        metrics = pretrainer.update(sample_batch(data, args.batch_size))
        done = step + 1
        if done % args.log_freq == 0:
            for name, value in metrics.items():  # the only host sync of the loop, once per log_freq steps
                writer.add_scalar(name, value.item(), done)
            sps = (done - last_step) / (time.time() - last_time)
            last_time, last_step = time.time(), done
            writer.add_scalar("charts/SPS", sps, done)
            print(f"[{done / args.total_timesteps:6.1%}] step {done:,}/{args.total_timesteps:,} | {sps:,.0f} steps/s | "
                  f"pad_loss {metrics['losses/pad_loss'].item():.4f} | "
                  f"positive {metrics['pad/positive_fraction'].item():.2f} | "
                  f"ETA {format_duration((args.total_timesteps - done) / sps)}", flush=True)
        if args.diag_freq and done % args.diag_freq == 0 and done < args.total_timesteps:
            diagnose(done, {"model": pretrainer.diffusion})
        if args.checkpoint_freq and done % args.checkpoint_freq == 0 and done < args.total_timesteps:
            checkpoint(done)

    # before / after: the untrained and the trained model against the final advantage labels
    final = diagnose(args.total_timesteps, {"model": pretrainer.diffusion, "initial": initial_diffusion})
    with open(os.path.join(run_dir, "pad_diagnostics.json"), "w") as f:
        json.dump({"env_id": args.env_id, "run_name": run_name, "heldout_transitions": num_holdout,
                   "mmd_bandwidth": bandwidth, "final": final, "history": diagnostics}, f, indent=2)
    show = torch.arange(4) * max(1, len(s_ho) // 4)
    plot_samples({"before": initial_diffusion, "after": pretrainer.diffusion}, s_ho[show], a_ho[show],
                 data["observations"], data["actions"], os.path.join(run_dir, "pad_samples.png"))
    path = checkpoint(args.total_timesteps)
    print(f"sample-to-data distance on held-out positive-advantage states: Wasserstein "
          f"{final['initial_wasserstein']:.4f} before -> {final['model_wasserstein']:.4f} after, MMD^2 "
          f"{final['initial_mmd']:.4f} -> {final['model_mmd']:.4f}")
    print(f"checkpoint: {path}\nuse it with: --pad-checkpoint {path} [--freeze-pad]")
    writer.close()
    if args.track:
        wandb.finish()
