"""DIVO on D4RL MuJoCo locomotion: a one-step TD3+BC actor guided by a value-conditioned diffusion model.

Paper: Ma et al., "Diffusion Policies with Value-Conditional Optimization for Offline Reinforcement
Learning" (arXiv 2511.08922, IROS 2025). A DDPM behaviour model is trained on the dataset with binary
advantage weights (PAD, eq. 9-10); on every actor step it proposes actions, and the deterministic
actor is pulled toward whichever of {dataset action, generated actions} has the larger advantage
(ADPO, eq. 12-13). Equation numbers are those of the README's "The algorithm" table.

Run:
    python divo_continuous.py --env-id halfcheetah-medium-expert-v2 --cuda
    python divo_continuous.py --env-id hopper-medium-v2 --dataset-path my_hopper.hdf5
    python divo_continuous.py --resume runs/<run_name>/checkpoint.pt
    python divo_continuous.py --env-id hopper-medium-v2 --benchmark-steps 10000   # speed only
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
import warnings
from dataclasses import asdict, dataclass, fields, replace
from typing import Optional

import gymnasium as gym
import h5py
import mujoco
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
    save_model: bool = False
    """whether to save the final actor (with its observation normalisation) to `runs/{run_name}`"""

    # Algorithm specific arguments
    env_id: str = "halfcheetah-medium-expert-v2"
    """the D4RL dataset id; it also names the evaluation env and the score normalisation"""
    dataset_path: Optional[str] = None
    """a local D4RL-format HDF5 file to train on instead of the downloaded dataset"""
    legacy_inertia: bool = True
    """evaluate with D4RL's original link masses (MuJoCo 2.x capsule inertia), see the README"""
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
    eval_freq: int = 5000
    """evaluate the actor every this many gradient steps (0: only at the end)"""
    eval_episodes: int = 10
    """number of evaluation episodes, run side by side"""
    log_freq: int = 1000
    """log losses and print a progress line every this many gradient steps"""
    checkpoint_freq: int = 50_000
    """write `runs/{run_name}/checkpoint.pt` every this many gradient steps and at the end (0: never)"""
    resume: Optional[str] = None
    """continue the run of this checkpoint (arguments not given on the command line come from it)"""
    pad_checkpoint: Optional[str] = None
    """start the diffusion model, critics and value net from a `pad_pretrain.py` checkpoint"""
    freeze_pad: bool = False
    """with --pad-checkpoint: keep the pretrained diffusion model fixed and skip the PAD step"""
    compile: bool = False
    """compile the update functions with torch.compile"""
    benchmark_steps: int = 0
    """if > 0: run this many gradient steps without evaluation, print the speed per part, and exit"""


# Arguments that may differ between a checkpoint and the command that resumes it.
RESUME_FREE_ARGS = {"resume", "cuda", "track", "wandb_project_name", "wandb_entity", "total_timesteps",
                    "dataset_path", "log_freq", "eval_freq", "checkpoint_freq", "save_model", "compile"}


class InputError(SystemExit):
    """Bad input from the user: exits with one message that says what is wrong and what to do."""

    def __init__(self, message: str):
        super().__init__(f"error: {message}")


# ----------------------------------------------------------------------------------------------
# Data: D4RL files read with h5py (the `d4rl` package cannot be installed any more, see the README)
# ----------------------------------------------------------------------------------------------
D4RL_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2"
GYM_IDS = {"halfcheetah": "HalfCheetah-v4", "hopper": "Hopper-v4", "walker2d": "Walker2d-v4"}
REF_SCORES = {"halfcheetah": (-280.178953, 12135.0), "hopper": (-20.272305, 3234.3), "walker2d": (1.629008, 4592.3)}
LEVELS = ("random", "medium", "medium-replay", "medium-expert", "expert", "full-replay")
ENV_IDS = tuple(f"{env}-{level}-v2" for env in GYM_IDS for level in LEVELS)
HDF5_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")


def check_env_id(env_id: str) -> str:
    """Return the robot name of a D4RL locomotion id, or stop with the valid ids."""
    if env_id not in ENV_IDS:
        close = difflib.get_close_matches(env_id, ENV_IDS, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise InputError(f"unknown --env-id {env_id!r}; {hint}valid ids: {', '.join(ENV_IDS)}")
    return env_id.split("-")[0]


def dataset_url(env_id: str) -> str:
    """D4RL's download address of a locomotion dataset."""
    env, level = env_id[: -len("-v2")].split("-", 1)
    return f"{D4RL_URL}/{env}_{level.replace('-', '_')}-v2.hdf5"


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


def normalized_score(robot: str, returns: np.ndarray) -> np.ndarray:
    """D4RL normalised score: 100 * (return - random) / (expert - random)."""
    low, high = REF_SCORES[robot]
    return 100.0 * (np.asarray(returns) - low) / (high - low)


def dataset_summary(path: str, data: dict[str, np.ndarray], transitions: dict[str, np.ndarray], robot: str) -> str:
    """One screen about the data: size, episodes, returns, rewards, terminals."""
    n = len(data["rewards"])
    ends = np.flatnonzero(data["terminals"] | data["timeouts"])
    if len(ends) == 0 or ends[-1] != n - 1:  # a trailing unfinished episode counts too
        ends = np.append(ends, n - 1)
    starts = np.concatenate([[0], ends[:-1] + 1])
    returns = np.add.reduceat(data["rewards"], starts)
    scores = normalized_score(robot, returns)
    outside = (np.abs(data["actions"]) > 1).any(axis=1).mean()
    return "\n".join([
        f"dataset      {path}",
        f"rows         {n:,} -> {len(transitions['rewards']):,} transitions "
        f"(qlearning_dataset: last row and {int(data['timeouts'][:-1].sum()):,} timeout rows dropped)",
        f"episodes     {len(returns):,}, length {np.mean(ends - starts + 1):.0f} on average",
        f"returns      min {returns.min():.1f}  mean {returns.mean():.1f}  max {returns.max():.1f}  "
        f"(normalised {scores.min():.1f} / {scores.mean():.1f} / {scores.max():.1f})",
        f"rewards      min {transitions['rewards'].min():.3f}  mean {transitions['rewards'].mean():.3f}  "
        f"max {transitions['rewards'].max():.3f}",
        f"terminals    {transitions['terminals'].mean():.4%} of transitions",
        f"actions      |a| max {np.abs(data['actions']).max():.4f}"
        + (f", {outside:.2%} of rows outside [-1, 1] (clipped for training)" if outside else ""),
    ])


def dataset_fingerprint(data: dict[str, np.ndarray]) -> str:
    """SHA-1 of the dataset's arrays, stored in checkpoints to refuse a resume on other data."""
    sha = hashlib.sha1()
    for key in HDF5_KEYS:
        sha.update(np.ascontiguousarray(data[key]).tobytes())
    return sha.hexdigest()


def sample_batch(data: dict[str, torch.Tensor], batch_size: int) -> tuple[torch.Tensor, ...]:
    """Uniform batch of (s, a, r, s', 1 - d), sampled on the data's device."""
    idx = torch.randint(len(data["rewards"]), (batch_size,), device=data["rewards"].device)
    return tuple(data[key][idx] for key in ("observations", "actions", "rewards", "next_observations", "not_done"))


# ----------------------------------------------------------------------------------------------
# Evaluation env: gymnasium *-v4 with D4RL's link masses restored
# ----------------------------------------------------------------------------------------------
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


@torch.no_grad()
def evaluate(actor: nn.Module, envs: list[gym.Env], obs_mean: np.ndarray, obs_std: np.ndarray, seed: int) -> np.ndarray:
    """Run one episode per env side by side with the deterministic actor; return the episode returns."""
    device = next(actor.parameters()).device
    obs = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(envs)])
    returns, alive = np.zeros(len(envs)), np.ones(len(envs), dtype=bool)
    while alive.any():
        idx = np.flatnonzero(alive)
        states = torch.as_tensor((obs[idx] - obs_mean) / obs_std, dtype=torch.float32, device=device)
        actions = actor(states).cpu().numpy()
        for i, action in zip(idx, actions):
            obs[i], reward, terminated, truncated, _ = envs[i].step(action)
            returns[i] += reward
            alive[i] = not (terminated or truncated)
    return returns


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------
def mlp(in_dim: int, out_dim: int, hidden_dim: int, num_layers: int, activation: type[nn.Module]) -> nn.Sequential:
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


# ----------------------------------------------------------------------------------------------
# DIVO: the losses of one training iteration
# ----------------------------------------------------------------------------------------------
def expectile_loss(u: torch.Tensor, expectile: float) -> torch.Tensor:
    """Asymmetric squared loss of eq. (2): mean |tau - 1(u < 0)| u^2."""
    return (torch.abs(expectile - (u < 0).float()) * u**2).mean()


def adpo_target(
    a: torch.Tensor, adv: torch.Tensor, candidates: torch.Tensor, cand_adv: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (12): per state, the action of largest advantage among {a, a_hat_1..N}; ties go to a generated one.

    a: (B, A) dataset actions, adv: (B,) their advantages; candidates: (N, B, A), cand_adv: (N, B).
    Returns the target actions (B, A) and a (B,) bool mask of where a generated action won.
    """
    best_adv, best = cand_adv.max(dim=0)
    best_candidate = candidates.gather(0, best[None, :, None].expand(1, *a.shape))[0]
    generated = best_adv >= adv
    return torch.where(generated[:, None], best_candidate, a), generated


class DIVO:
    """Networks, optimisers and the update of one iteration (critic -> value -> PAD -> actor)."""

    def __init__(self, obs_dim: int, act_dim: int, args: Args, device: torch.device):
        h, n = args.hidden_dim, args.num_layers
        self.args = args
        self.actor = Actor(obs_dim, act_dim, h, n).to(device)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic = TwinCritic(obs_dim, act_dim, h, n).to(device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.value = ValueNet(obs_dim, h, n).to(device)
        self.diffusion = Diffusion(obs_dim, act_dim, args.diffusion_steps, args.beta_min, args.beta_max, h, n).to(device)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=args.actor_lr)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=args.critic_lr)
        self.value_optimizer = torch.optim.Adam(self.value.parameters(), lr=args.value_lr)
        self.diffusion_optimizer = torch.optim.Adam(self.diffusion.parameters(), lr=args.diffusion_lr)
        self.online_params = list(self.actor.parameters()) + list(self.critic.parameters())
        self.target_params = list(self.actor_target.parameters()) + list(self.critic_target.parameters())

    def update_critic(self, s, a, r, s_next, not_done) -> dict[str, torch.Tensor]:
        """TD3 critic step, eq. (1), with target policy smoothing."""
        args = self.args
        with torch.no_grad():
            noise = (torch.randn_like(a) * args.policy_noise).clamp(-args.noise_clip, args.noise_clip)
            a_next = (self.actor_target(s_next) + noise).clamp(-1, 1)
            y = r + args.gamma * not_done * self.critic_target(s_next, a_next).min(dim=0).values
        q = self.critic(s, a)
        qf_loss = ((q - y) ** 2).mean(dim=1).sum()  # sum over the two critics of the mean squared TD error
        self.critic_optimizer.zero_grad(set_to_none=True)
        qf_loss.backward()
        self.critic_optimizer.step()
        return {"losses/qf_loss": qf_loss.detach(), "losses/qf1_values": q[0].mean().detach()}

    def update_value(self, s, a) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Expectile value step, eq. (2); returns V(s) and the advantage A(s, a) = min_i Q'_i(s, a) - V(s)."""
        with torch.no_grad():
            q = self.critic_target(s, a).min(dim=0).values
        v = self.value(s)
        u = q - v
        value_loss = expectile_loss(u, self.args.expectile)
        self.value_optimizer.zero_grad(set_to_none=True)
        value_loss.backward()
        self.value_optimizer.step()
        return v.detach(), u.detach(), {"losses/value_loss": value_loss.detach()}

    def update_pad(self, s, a, adv) -> dict[str, torch.Tensor]:
        """PAD step, eq. (9)-(10): diffusion loss weighted by w = zeta * 1[A(s, a) > 0]."""
        positive = (adv > 0).float()
        pad_loss = self.diffusion.loss(s, a, self.args.pad_strength * positive)
        self.diffusion_optimizer.zero_grad(set_to_none=True)
        pad_loss.backward()
        self.diffusion_optimizer.step()
        return {"losses/pad_loss": pad_loss.detach(), "pad/positive_fraction": positive.mean()}

    @torch.no_grad()
    def select_target(self, s, a, v, adv) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """ADPO, eq. (12): N diffusion samples per state compete with the dataset action on A(s, .)."""
        n, (b, act_dim) = self.args.num_candidates, a.shape
        s_rep = s.repeat(n, 1)
        candidates = self.diffusion.sample(s_rep)
        cand_adv = (self.critic_target(s_rep, candidates).min(dim=0).values - v.repeat(n)).view(n, b)
        target, generated = adpo_target(a, adv, candidates.view(n, b, act_dim), cand_adv)
        return target, {"adpo/generated_fraction": generated.float().mean()}

    def update_actor(self, s, a_bar) -> dict[str, torch.Tensor]:
        """Actor step, eq. (13): -lambda Q_theta1(s, pi(s)) + ||pi(s) - a_bar||^2, then Polyak updates."""
        pi = self.actor(s)
        q = self.critic(s, pi)[0]
        lmbda = self.args.alpha / q.abs().mean().detach()
        bc_loss = ((pi - a_bar) ** 2).mean()
        actor_loss = -lmbda * q.mean() + bc_loss
        self.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_optimizer.step()
        with torch.no_grad():  # theta' <- tau theta + (1 - tau) theta', for the critics and the actor
            torch._foreach_lerp_(self.target_params, self.online_params, self.args.tau)
        return {"losses/actor_loss": actor_loss.detach(), "losses/bc_loss": bc_loss.detach()}

    def update(self, batch: tuple[torch.Tensor, ...], update_actor: bool) -> dict[str, torch.Tensor]:
        """One DIVO iteration on one batch; returns the metrics as device tensors (no host sync)."""
        s, a, r, s_next, not_done = batch
        metrics = self.update_critic(s, a, r, s_next, not_done)
        v, adv, value_metrics = self.update_value(s, a)
        metrics.update(value_metrics)
        if not self.args.freeze_pad:
            metrics.update(self.update_pad(s, a, adv))
        if update_actor:
            a_bar, adpo_metrics = self.select_target(s, a, v, adv)
            metrics.update(adpo_metrics)
            metrics.update(self.update_actor(s, a_bar))
        return metrics

    def compile(self, backend: str = "inductor") -> None:
        """Replace each update function by its torch.compile'd version."""
        for name in ("update_critic", "update_value", "update_pad", "select_target", "update_actor"):
            setattr(self, name, torch.compile(getattr(self, name), backend=backend))

    def modules(self) -> dict[str, nn.Module]:
        return {"actor": self.actor, "actor_target": self.actor_target, "critic": self.critic,
                "critic_target": self.critic_target, "value": self.value, "diffusion": self.diffusion}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"actor_optimizer": self.actor_optimizer, "critic_optimizer": self.critic_optimizer,
                "value_optimizer": self.value_optimizer, "diffusion_optimizer": self.diffusion_optimizer}

    def state_dict(self) -> dict:
        return {name: part.state_dict() for name, part in {**self.modules(), **self.optimizers()}.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, part in {**self.modules(), **self.optimizers()}.items():
            part.load_state_dict(state[name])


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


def check_dataset_match(payload: dict, path: str, fingerprint: str, obs_dim: int, what: str) -> None:
    """Refuse a checkpoint trained on other data than the dataset loaded now."""
    if payload["obs_dim"] != obs_dim or payload["dataset_sha1"] != fingerprint:
        raise InputError(f"{path} was trained on another dataset ({payload['env_id']}, observation size "
                         f"{payload['obs_dim']}, {payload['num_transitions']:,} transitions) than this one; "
                         f"{what}")


def pad_compatibility(payload: dict, path: str, args: Args, fingerprint: str, obs_dim: int) -> None:
    """Refuse a pad_pretrain checkpoint of other data, other rewards, another size or another schedule."""
    check_dataset_match(payload, path, fingerprint, obs_dim, "pretrain on the dataset you train on")
    theirs = payload["args"]
    if theirs["reward_transform"] != "none":
        raise InputError(f"{path} was pretrained on rewards r - 1; locomotion uses r: pretrain with --reward-transform none")
    for name in ("diffusion_steps", "beta_min", "beta_max", "hidden_dim", "num_layers"):
        if theirs[name] != getattr(args, name):
            raise InputError(f"{path} was pretrained with --{name.replace('_', '-')} {theirs[name]}, this run "
                             f"uses {getattr(args, name)}; pass the same value or pretrain again")


def resume_args(path: str) -> tuple[Args, dict]:
    """Arguments of a resumed run: the checkpoint's, overridden by those given on the command line."""
    payload = load_checkpoint(path, "divo_continuous")
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


def benchmark(agent: DIVO, data: dict[str, torch.Tensor], args: Args, device: torch.device) -> None:
    """Gradient steps per second of the whole iteration, and the time of each part of it."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    warmup = min(500, max(args.benchmark_steps // 5, 2 * args.policy_freq))
    for step in range(warmup):
        agent.update(sample_batch(data, args.batch_size), step % args.policy_freq == 0)
    sync()
    start = time.perf_counter()
    for step in range(args.benchmark_steps):
        agent.update(sample_batch(data, args.batch_size), step % args.policy_freq == 0)
    sync()
    sps = args.benchmark_steps / (time.perf_counter() - start)

    s, a, r, s_next, not_done = sample_batch(data, args.batch_size)
    v, adv, _ = agent.update_value(s, a)
    a_bar, _ = agent.select_target(s, a, v, adv)
    parts = {
        "critic, eq. (1)": (1, lambda: agent.update_critic(s, a, r, s_next, not_done)),
        "value, eq. (2)": (1, lambda: agent.update_value(s, a)),
        "PAD, eq. (9)-(10)": (1, lambda: agent.update_pad(s, a, adv)),
        "ADPO sampling, eq. (12)": (1 / args.policy_freq, lambda: agent.select_target(s, a, v, adv)),
        "actor + targets, eq. (13)": (1 / args.policy_freq, lambda: agent.update_actor(s, a_bar)),
    }
    if args.freeze_pad:  # a frozen diffusion model has no PAD step
        del parts["PAD, eq. (9)-(10)"]
    repeats = max(50, args.benchmark_steps // 10)
    per_step = {}
    for name, (share, part) in parts.items():
        for _ in range(10):
            part()
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            part()
        sync()
        per_step[name] = share * (time.perf_counter() - start) / repeats * 1e3
    backbone = per_step["critic, eq. (1)"] + per_step["actor + targets, eq. (13)"]
    print(f"\nbenchmark: {args.env_id}, device {device}, compile {args.compile}, batch {args.batch_size}, "
          f"K {args.diffusion_steps}, N {args.num_candidates}, freeze_pad {args.freeze_pad}")
    print(f"  full iteration: {sps:,.0f} gradient steps/s over {args.benchmark_steps:,} steps")
    print("  per gradient step (actor-step parts divided by policy_freq, each part timed alone):")
    for name, ms in per_step.items():
        print(f"    {name:<28} {ms:8.3f} ms")
    print(f"  DIVO / TD3+BC backbone (critic + actor alone): {sum(per_step.values()) / backbone:.2f}x")


if __name__ == "__main__":
    args = tyro.cli(Args)
    payload = None
    if args.resume:
        args, payload = resume_args(args.resume)
    robot = check_env_id(args.env_id)
    if args.freeze_pad and not args.pad_checkpoint:
        raise InputError("--freeze-pad keeps a pretrained diffusion model fixed: pass --pad-checkpoint too")
    run_name = payload["run_name"] if payload else f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.dirname(args.resume) if payload else os.path.join("runs", run_name)

    # seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # data and env
    envs = [make_eval_env(robot, args.legacy_inertia) for _ in range(args.eval_episodes)]
    obs_dim, act_dim = envs[0].observation_space.shape[0], envs[0].action_space.shape[0]
    path = args.dataset_path or default_dataset_path(args.env_id)
    if args.benchmark_steps and not os.path.isfile(path):
        print(f"benchmark: no dataset at {path}, using 1,000,000 random transitions of the right shape")
        n = 1_000_000
        raw = {"observations": np.random.randn(n, obs_dim).astype(np.float32),
               "actions": np.random.uniform(-1, 1, (n, act_dim)).astype(np.float32),
               "rewards": np.random.randn(n).astype(np.float32), "terminals": np.random.rand(n) < 1e-3,
               "timeouts": np.arange(n) % 1000 == 999}
    else:
        if not os.path.isfile(path) and not args.dataset_path:
            download(dataset_url(args.env_id), path)
        raw = load_d4rl_file(path, obs_dim, act_dim)
    fingerprint = dataset_fingerprint(raw)
    dataset = qlearning_dataset(raw)
    print(dataset_summary(path, raw, dataset, robot))
    dataset["actions"] = np.clip(dataset["actions"], -1.0, 1.0)  # the actor and the sampler act in [-1, 1]
    if payload:
        check_dataset_match(payload, args.resume, fingerprint, obs_dim, "resume on the dataset it was trained on")
    obs_mean = dataset["observations"].mean(axis=0)
    obs_std = dataset["observations"].std(axis=0) + 1e-3
    data = {
        "observations": torch.tensor((dataset["observations"] - obs_mean) / obs_std, device=device),
        "actions": torch.tensor(dataset["actions"], device=device),
        "rewards": torch.tensor(dataset["rewards"], device=device),
        "next_observations": torch.tensor((dataset["next_observations"] - obs_mean) / obs_std, device=device),
        "not_done": torch.tensor(1.0 - dataset["terminals"], dtype=torch.float32, device=device),
    }

    # networks and optimisers
    agent = DIVO(obs_dim, act_dim, args, device)
    if args.pad_checkpoint and not payload:  # a resumed run has the PAD model in its own checkpoint
        pad = load_checkpoint(args.pad_checkpoint, "pad_pretrain")
        pad_compatibility(pad, args.pad_checkpoint, args, fingerprint, obs_dim)
        agent.diffusion.load_state_dict(pad["diffusion"])
        agent.critic.load_state_dict(pad["critic"])
        agent.critic_target.load_state_dict(pad["critic_target"])
        agent.value.load_state_dict(pad["value"])
        print(f"loaded the PAD model, critics and value net of {args.pad_checkpoint}"
              + (" (diffusion model frozen)" if args.freeze_pad else ""))
    if args.freeze_pad:
        agent.diffusion.requires_grad_(False)
    start_step, evaluations = 0, []
    if payload:
        agent.load_state_dict(payload["agent"])
        start_step, evaluations = payload["step"], payload["evaluations"]
        torch.set_rng_state(payload["rng"]["torch"])
        if device.type == "cuda" and payload["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(payload["rng"]["cuda"])
        print(f"resumed {run_name} at step {start_step:,}")
    if args.compile:
        agent.compile()

    if args.benchmark_steps:
        benchmark(agent, data, args, device)
        raise SystemExit(0)

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
        """Everything needed to continue the run exactly: networks, optimisers, step, RNG, statistics."""
        path = os.path.join(run_dir, "checkpoint.pt")
        save_checkpoint(path, {
            "kind": "divo_continuous", "args": asdict(args), "run_name": run_name, "step": step,
            "env_id": args.env_id, "obs_dim": obs_dim, "act_dim": act_dim, "dataset_sha1": fingerprint,
            "num_transitions": len(dataset["rewards"]), "obs_mean": torch.tensor(obs_mean), "obs_std": torch.tensor(obs_std),
            "agent": agent.state_dict(), "evaluations": evaluations,
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None},
        })
        return path

    def run_evaluation(step: int) -> np.ndarray:
        """Evaluate the actor, log it, and remember it in the run's history."""
        start = time.time()
        agent.actor.eval()
        returns = evaluate(agent.actor, envs, obs_mean, obs_std, seed=args.seed + 10_000)
        agent.actor.train()
        scores = normalized_score(robot, returns)
        writer.add_scalar("charts/d4rl_normalized_score", scores.mean(), step)
        writer.add_scalar("eval/return_mean", returns.mean(), step)
        writer.add_scalar("eval/normalized_score_std", scores.std(), step)
        writer.add_scalar("eval/seconds", time.time() - start, step)
        evaluations.append({"step": step, "score": float(scores.mean()), "score_std": float(scores.std())})
        print(f"eval   step {step:,}: normalised score {scores.mean():.1f} +- {scores.std():.1f} "
              f"(return {returns.mean():.1f}, {len(returns)} episodes, {time.time() - start:.1f}s)", flush=True)
        return returns

    # SIGINT / SIGTERM stop the loop at the end of the current iteration, with a checkpoint
    stop_signal = []

    def request_stop(signum, frame):
        if stop_signal:  # a second signal stops at once
            raise KeyboardInterrupt
        stop_signal.append(signum)
        print("\nstopping after this step with a checkpoint (signal again to stop at once)", flush=True)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    print(f"training {run_name} on {device} for {args.total_timesteps:,} gradient steps; logs in {run_dir}", flush=True)
    metrics, last_time, last_step = {}, time.time(), start_step
    for step in range(start_step, args.total_timesteps):
        if stop_signal:
            path = checkpoint(step)
            print(f"stopped at step {step:,}; resume with: python {os.path.basename(__file__)} --resume {path}")
            raise SystemExit(128 + stop_signal[0])
        # the latest value of each metric (actor metrics come from the last actor step)
        metrics.update(agent.update(sample_batch(data, args.batch_size), update_actor=step % args.policy_freq == 0))
        done = step + 1

        if done % args.log_freq == 0:
            for name, value in metrics.items():  # the only host sync of the loop, once per log_freq steps
                writer.add_scalar(name, value.item(), done)
            sps = (done - last_step) / (time.time() - last_time)
            last_time, last_step = time.time(), done
            writer.add_scalar("charts/SPS", sps, done)
            score = f"{evaluations[-1]['score']:.1f} @ {evaluations[-1]['step']:,}" if evaluations else "-"
            print(f"[{done / args.total_timesteps:6.1%}] step {done:,}/{args.total_timesteps:,} | {sps:,.0f} steps/s | "
                  f"score {score} | ETA {format_duration((args.total_timesteps - done) / sps)}", flush=True)
        if args.eval_freq and done % args.eval_freq == 0 and done < args.total_timesteps:
            run_evaluation(done)
        if args.checkpoint_freq and done % args.checkpoint_freq == 0 and done < args.total_timesteps:
            checkpoint(done)

    # final evaluation of the last policy, scores and checkpoint
    returns = run_evaluation(args.total_timesteps)
    scores = normalized_score(robot, returns)
    result = {"env_id": args.env_id, "run_name": run_name, "step": args.total_timesteps, "seed": args.seed,
              "normalized_score_mean": float(scores.mean()), "normalized_score_std": float(scores.std()),
              "normalized_scores": scores.tolist(), "returns": returns.tolist(), "evaluations": evaluations}
    with open(os.path.join(run_dir, "scores.json"), "w") as f:
        json.dump(result, f, indent=2)
    if args.checkpoint_freq:
        print(f"checkpoint: {checkpoint(args.total_timesteps)}")
    if args.save_model:
        model_path = os.path.join(run_dir, f"{args.exp_name}.cleanrl_model")
        torch.save({"actor": agent.actor.state_dict(), "obs_mean": torch.tensor(obs_mean),
                    "obs_std": torch.tensor(obs_std), "args": asdict(args)}, model_path)
        print(f"model saved to {model_path}")
    print(f"final normalised score of the last policy: {scores.mean():.1f} +- {scores.std():.1f} "
          f"({len(scores)} episodes); per-episode scores in {os.path.join(run_dir, 'scores.json')}")
    for env in envs:
        env.close()
    writer.close()
    if args.track:
        wandb.finish()
