"""Diagnostics, computed at the logging sync on fixed data with training's random stream untouched: does ADPO's
contest exploit the critics' errors (Diagnostics.contest), and how well does PAD's model fit the positive-advantage
data (Diagnostics.sample_quality; pretraining: diagnose, plot_samples)."""

import os

import torch
import torch.nn as nn


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
def sample_distances(diffusion: nn.Module, s, a, bandwidth: float) -> dict[str, float]:
    """One model sample per held-out state against that state's dataset action.

    `wasserstein`: mean over action dimensions of the per-dimension W1 between sampled and
    dataset actions; `mmd`: MMD^2 between the joint (s, a_sampled) and (s, a_data) sets, which
    also sees whether a sample fits its own state.
    """
    sampled = diffusion.sample(s)
    return {"wasserstein": wasserstein_per_dim(sampled, a).mean().item(),
            "mmd": mmd_rbf(torch.cat([s, sampled], 1), torch.cat([s, a], 1), bandwidth).item()}


@torch.no_grad()
def median_distance(x: torch.Tensor) -> float:
    """The median distance between the rows of `x`: the MMD kernel's bandwidth (at least 1e-6)."""
    return torch.cdist(x, x).median().clamp(min=1e-6).item()


@torch.no_grad()
def nearby_data_check(agent, s, actions, s_ref, a_ref, q_ref, neighbours: int):
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
        self.bandwidth = median_distance(torch.cat(self.heldout, 1))  # the MMD kernel's

    @torch.no_grad()
    def contest(self, agent) -> dict[str, float]:
        """ADPO's contest (eq. 12) on the probe states: what the targets gain, how far they and the
        actor are from the data, whether both twin critics back the winners, and how the winners
        compare with the data at nearby states."""
        (s, a), (s_ref, a_ref) = self.probe, self.reference
        with torch.random.fork_rng(devices=[s.device] if s.device.type == "cuda" else []):
            v, q_data = agent.value(s), agent.critic_target(s, a)
            adv = q_data.min(dim=0).values - v
            candidates, cand_adv, target, generated, target_adv = agent.adpo(s, a, adv, v)  # eq. (12)
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
    def sample_quality(self, agent) -> dict[str, float]:
        """Distance between the diffusion model's samples and the held-out positive actions."""
        s, a = self.heldout
        positive = agent.critic_target(s, a).min(dim=0).values - agent.value(s) > 0
        s_pos, a_pos = (s[positive], a[positive]) if positive.sum() >= 10 else (s, a)
        with torch.random.fork_rng(devices=[s.device] if s.device.type == "cuda" else []):
            distances = sample_distances(agent.diffusion, s_pos, a_pos, self.bandwidth)
        return {"pad/heldout_positive_fraction": positive.float().mean().item(),
                **{f"pad/sample_{name}": value for name, value in distances.items()}}


@torch.no_grad()
def diagnose(pretrainer, models: dict, s, a, bandwidth: float) -> dict[str, float]:
    """Each model's sample-to-data distances on the held-out transitions with A > 0 now."""
    positive = pretrainer.advantage(s, a) > 0
    row = {"positive_fraction": positive.float().mean().item()}
    s_pos, a_pos = (s[positive], a[positive]) if positive.sum() >= 10 else (s, a)
    # samples draw random numbers: fork the RNG so that training's stream is untouched
    with torch.random.fork_rng(devices=[s.device] if s.device.type == "cuda" else []):
        for label, model in models.items():
            distances = sample_distances(model, s_pos, a_pos, bandwidth)
            row.update({f"{label}_{name}": value for name, value in distances.items()})
    return row


def before_after(final: dict, where: str) -> str:
    """One line: the untrained ("initial") and the trained model's distances to the data."""
    return (f"sample-to-data distance on {where} positive-advantage states: Wasserstein "
            f"{final['initial_wasserstein']:.4f} before -> {final['model_wasserstein']:.4f} after, MMD^2 "
            f"{final['initial_mmd']:.4f} -> {final['model_mmd']:.4f}")


def plot_samples(models: dict, states, actions, train_states, train_actions, path: str, **kwargs) -> None:
    """PNG at `path`: for 4 states spread over `states`, each model's samples against the dataset actions
    of the nearest training states. The figure is a bonus: a failure to draw it is a warning."""
    show = torch.arange(min(4, len(states))) * max(1, len(states) // 4)
    try:
        draw_samples(models, states[show], actions[show], train_states, train_actions, path, **kwargs)
    except Exception as e:  # matplotlib has many ways to fail on odd data
        print(f"warning: could not draw {os.path.basename(path)} ({type(e).__name__}: {e})")


@torch.no_grad()
def draw_samples(models: dict, states, actions, train_states, train_actions, path: str,
                 neighbours=50, num_samples=300) -> None:
    """PNG: for a few held-out states, samples against the dataset actions of the nearest states."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    size = (3.2 * len(states), 3.2 * len(models))
    fig, axes = plt.subplots(len(models), len(states), figsize=size, squeeze=False)
    nearest = torch.cdist(states, train_states).topk(neighbours, largest=False).indices
    for row, (label, model) in enumerate(models.items()):
        for col in range(len(states)):
            ax = axes[row, col]
            sampled = model.sample(states[col].expand(num_samples, -1)).cpu()
            near = train_actions[nearest[col]].cpu()
            ax.scatter(sampled[:, 0], sampled[:, 1], s=6, alpha=0.5, label="model samples")
            ax.scatter(near[:, 0], near[:, 1], s=10, alpha=0.7, label=f"data, {neighbours} nearest states")
            here = actions[col].cpu()
            ax.scatter(here[0], here[1], marker="*", s=150, c="k", label="data, this state")
            ax.set(xlim=(-1.05, 1.05), ylim=(-1.05, 1.05), title=f"{label}: state {col}")
            ax.set_xlabel("action[0]")
            ax.set_ylabel("action[1]")
    axes[0, 0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
