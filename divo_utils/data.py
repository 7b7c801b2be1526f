"""The data: D4RL files (downloaded into D4RL's cache, then checked) and Minari datasets, behind one call.

`load_task` gives a script everything it learns from and is evaluated in: the dataset's rows in D4RL's layout (a
Minari dataset's episodes become such rows), their path and fingerprint, the sizes, the evaluation envs and how a
return becomes the run's score. What the rows mean (D4RL's qlearning_dataset, the normalisation) is DIVO's data
semantics and stays in the scripts.
"""

import hashlib
import http.client
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from typing import Callable, Optional

import gymnasium as gym
import h5py
import numpy as np

from divo_utils import (ANTMAZE_IDS, GYM_IDS, LOCOMOTION_IDS, MAZES, MIN_TRANSITIONS, InputError, domain_of,
                        is_minari_id, maze_of, robot_of)
from divo_utils.files import check_writable
from divo_utils.video import SIZE, filmed

D4RL_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl"
ANTMAZE_FILES = {
    "umaze": "Ant_maze_u-maze_noisy_multistart_False_multigoal_False_sparse_fixed.hdf5",
    "umaze-diverse": "Ant_maze_u-maze_noisy_multistart_True_multigoal_True_sparse_fixed.hdf5",
    "medium-play": "Ant_maze_big-maze_noisy_multistart_True_multigoal_False_sparse_fixed.hdf5",
    "medium-diverse": "Ant_maze_big-maze_noisy_multistart_True_multigoal_True_sparse_fixed.hdf5",
    "large-play": "Ant_maze_hardest-maze_noisy_multistart_True_multigoal_False_sparse_fixed.hdf5",
    "large-diverse": "Ant_maze_hardest-maze_noisy_multistart_True_multigoal_True_sparse_fixed.hdf5",
}
HDF5_COLUMNS = {"observations": np.float32, "actions": np.float32, "rewards": np.float32, "terminals": bool,
                "timeouts": bool}
# The reward learned from (--reward-transform), as the messages say it
REWARD_LABELS = {"minus-one": "r - 1 (--reward-transform minus-one)", "none": "r (--reward-transform none)"}
# Observation and action sizes of D4RL's datasets
D4RL_DIMS = {"halfcheetah": (17, 6), "hopper": (11, 3), "walker2d": (17, 6), "antmaze": (29, 8)}



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


def recorded_for(env: str) -> Optional[str]:
    """The robot or maze of a D4RL-format file's own `env` attribute (halfcheetah-medium-v2 or HalfCheetah-v4:
    halfcheetah; antmaze-umaze-diverse-v2: umaze), None where it names neither."""
    words = env.lower().split("-")
    if words[0] == "antmaze" and len(words) > 1:
        return words[1] if words[1] in MAZES else None
    return words[0] if words[0] in GYM_IDS else None


def load_d4rl_file(path: str, obs_dim: int, act_dim: int, name: Optional[str] = None) -> dict[str, np.ndarray]:
    """Read a D4RL-format HDF5 file and refuse anything else: keys, types, shapes, 0/1 flags, finite values, and a
    file whose `env` attribute records another robot or maze than `name` (sizes alone do not tell HalfCheetah's
    data from Walker2d's, or one maze's from another's)."""
    if os.path.isdir(path):
        raise InputError(f"{path} is a directory; pass the D4RL-format HDF5 file itself")
    if not os.path.isfile(path):
        raise InputError(f"no dataset file at {path}: check --dataset-path, or leave it out to download the dataset")
    fix = ("delete it and run again to download it anew" if os.path.basename(path) in {
        os.path.basename(dataset_url(env_id)) for env_id in LOCOMOTION_IDS + ANTMAZE_IDS} else "re-create or re-download it")
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
            env = f.attrs.get("env", "")
            env = env.decode(errors="replace") if isinstance(env, bytes) else str(env)
    except BlockingIOError as e:  # HDF5's own file lock
        raise InputError(f"{path} is open for writing in another process (HDF5 file lock): wait until it is closed, "
                         "then run again") from e
    except OSError as e:
        raise InputError(f"cannot read {path} as HDF5 ({e}): the file is partial or corrupt; {fix}") from e
    recorded = recorded_for(env)
    if name and recorded and recorded != name:
        raise InputError(f"{path} records itself as {env} (its `env` attribute), data of {recorded}, not of {name} "
                         "as --env-id says: pass the --env-id of that file, or the dataset of this one")
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
    for key in ("observations", "actions", "rewards"):  # finite in the file, yet too large for float32
        big = np.isfinite(data[key]) & (np.abs(data[key]) > np.finfo(np.float32).max)
        if big.any():
            first = int(np.argmax(big.reshape(-1)))
            raise InputError(f"{path}: {int(big.sum())} value(s) of {key!r} are too large for float32, which training "
                             f"uses (first at row {first // (big.size // n)}: {data[key].reshape(-1)[first]:.3g}); "
                             "rescale or drop those rows")
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


def dataset_fingerprint(data: dict[str, np.ndarray]) -> str:
    """SHA-1 of the dataset's arrays, stored in checkpoints to refuse a resume on other data."""
    sha = hashlib.sha1()
    for key in HDF5_COLUMNS:
        sha.update(np.ascontiguousarray(data[key]).tobytes())
    return sha.hexdigest()


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


# --------------------------------------------------------------------------------------------------------------
# Minari datasets (docs/data.md): Farama's maintained successor of D4RL, read with the minari package
# --------------------------------------------------------------------------------------------------------------


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
    step of each episode included, terminal where Minari's `terminations` says so (docs/data.md)."""
    from gymnasium import spaces

    where, space = f"the Minari dataset {dataset.spec.dataset_id}", dataset.observation_space
    boxes = list(space.spaces.values()) if isinstance(space, spaces.Dict) else [space]
    if not all(isinstance(box, spaces.Box) for box in [*boxes, dataset.action_space]):
        raise InputError(f"{where} has observations {space} and actions {dataset.action_space}; DIVO needs "
                         "continuous ones (Box spaces, or for observations a Dict of them)")
    rows = {key: [] for key in HDF5_COLUMNS}
    try:
        for episode in dataset.iterate_episodes():
            steps = len(episode)  # its observations hold one more: the final one
            actions = np.reshape(episode.actions, (steps, -1))
            rows["observations"].append(flatten_observations(space, episode.observations))
            rows["actions"].append(np.concatenate([actions, np.zeros_like(actions[:1])]))
            rows["rewards"].append(np.append(episode.rewards, 0.0))
            rows["terminals"].append(np.append(episode.terminations, False))
            rows["timeouts"].append(np.arange(steps + 1) == steps)
    except (OSError, KeyError, ValueError, TypeError) as e:  # a truncated or damaged file: h5py's errors vary
        first = (str(e).strip().splitlines() or [""])[0]
        raise InputError(f"cannot read the episodes of {where} at {dataset.spec.data_path} ({type(e).__name__}: "
                         f"{first}): the dataset is partial or corrupt; delete its folder to download it anew") from e
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


def minari_dims(dataset) -> tuple[int, int]:
    """Observation and action sizes of a Minari dataset, its observations flattened (gymnasium's flatdim)."""
    from gymnasium.spaces import flatdim

    return flatdim(dataset.observation_space), flatdim(dataset.action_space)


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


def minari_scorer(dataset) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    """A Minari dataset's metric and how returns become it: 100 x Minari's normalised score (D4RL's formula with the
    dataset's ref_min_score and ref_max_score), or the return itself where its metadata has no reference returns."""
    import minari

    low, high = (dataset.storage.metadata.get(name) for name in ("ref_min_score", "ref_max_score"))
    if low is None or high is None:
        print("score      the return: the dataset's metadata has no ref_min_score / ref_max_score to normalise it")
        return "return", lambda returns: np.asarray(returns, dtype=np.float64)
    if not (np.isfinite(low) and np.isfinite(high) and high != low):  # the score would divide by zero, or be NaN
        print(f"score      the return: the dataset's reference returns ref_min_score {low} and ref_max_score {high} "
              "cannot normalise it (they must be finite and differ)")
        return "return", lambda returns: np.asarray(returns, dtype=np.float64)
    print(f"score      normalised with the dataset's reference returns {low:.1f} (random) and {high:.1f} (expert)")
    return "normalized_score", lambda returns: 100.0 * minari.get_normalized_score(dataset, np.asarray(returns))


METRIC_WORDS = {"normalized_score": "normalised score", "return": "return"}  # a metric, as the messages say it


def score_fields(metric: str, scores: np.ndarray, returns: np.ndarray) -> dict:
    """scores.json's fields of the last policy: its normalised scores, or where there are none its returns, marked
    "metric": "return" for tools/report.py."""
    if metric == "return":
        return {"metric": "return", "return_mean": returns.mean(), "return_std": returns.std(), "returns": returns.tolist()}
    return {"normalized_score_mean": scores.mean(), "normalized_score_std": scores.std(),
            "normalized_scores": scores.tolist(), "returns": returns.tolist()}


# ----------------------------------------------------------------------------------------------------------------------
# One call: the data and envs of a run
# ----------------------------------------------------------------------------------------------------------------------
def read_dataset(env_id: str, dataset_path: Optional[str], obs_dim: int, act_dim: int,
                 minari_dataset=None) -> tuple[dict[str, np.ndarray], str]:
    """The dataset's arrays (downloaded into D4RL's cache first if needed, then checked) and its path; those of a Minari
    dataset as D4RL-format rows."""
    if minari_dataset is not None:
        return minari_rows(minari_dataset, obs_dim, act_dim), minari_dataset.spec.data_path
    path = dataset_path or default_dataset_path(env_id)
    if not dataset_path and not os.path.isfile(path):
        download(dataset_url(env_id), path)
    name = maze_of(env_id) if domain_of(env_id) == "antmaze" else robot_of(env_id)
    return load_d4rl_file(path, obs_dim, act_dim, name), path


def episode_bounds(data: dict) -> tuple[np.ndarray, np.ndarray]:
    """First and last row of each episode (ended by a terminal or a timeout; a trailing unfinished one counts too)."""
    n = len(data["rewards"])
    ends = np.flatnonzero(data["terminals"] | data["timeouts"])
    if len(ends) == 0 or ends[-1] != n - 1:
        ends = np.append(ends, n - 1)
    return np.concatenate([[0], ends[:-1] + 1]), ends


def dataset_summary(path: str, data: dict, transitions: dict, domain: str, score=None) -> str:
    """A few lines about a D4RL-format file: size, episodes (on AntMaze: the goal rows; with `score`: their
    returns normalised, else their returns), rewards, terminals, actions."""
    n, r = len(data["rewards"]), transitions["rewards"]
    starts, ends = episode_bounds(data)
    returns = np.add.reduceat(data["rewards"], starts)
    if domain == "antmaze":  # AntMaze episodes end by timeout; its terminals mark goal states
        goal = data["rewards"] > 0
        episodes = (f"episodes   {np.flatnonzero(data['timeouts']).size + (not data['timeouts'][-1]):,} (split by "
                    f"timeouts); {int(goal.sum()):,} rows ({goal.mean():.3%}) have the goal reward")
    elif score is not None:
        scores = score(returns)
        episodes = (f"episodes   {len(scores):,}, mean length {np.mean(ends - starts + 1):.0f}, normalised return "
                    f"min {scores.min():.1f}  mean {scores.mean():.1f}  max {scores.max():.1f}")
    else:
        episodes = (f"episodes   {len(returns):,}, mean length {np.mean(ends - starts + 1):.0f}, return "
                    f"min {returns.min():.1f}  mean {returns.mean():.1f}  max {returns.max():.1f}")
    outside = (np.abs(data["actions"]) > 1).any(axis=1).mean()
    return "\n".join([
        f"dataset    {path}: {n:,} rows -> {len(r):,} transitions (D4RL's qlearning_dataset)",
        episodes,
        f"rewards    min {r.min():.3f}  mean {r.mean():.3f}  max {r.max():.3f} (as in the file); terminals "
        f"{transitions['terminals'].mean():.4%} of transitions",
        f"actions    |a| max {np.abs(data['actions']).max():.4f}"
        + (f" ({outside:.2%} of rows outside [-1, 1], clipped)" if outside else ""),
    ])


def d4rl_score(returns: np.ndarray, reference_returns: tuple[float, float]) -> np.ndarray:
    """D4RL's normalised score: 100 * (return - random) / (expert - random), of the (random, expert) returns."""
    low, high = reference_returns
    return 100.0 * (np.asarray(returns) - low) / (high - low)


@dataclass
class Task:
    """What a run learns from and is evaluated in (load_task)."""

    rows: dict  # the dataset in D4RL's layout: observations, actions, rewards, terminals, timeouts
    path: str  # the file (or Minari's folder) the rows come from
    fingerprint: str  # SHA-1 of the rows: a checkpoint refuses to resume on other data
    obs_dim: int
    act_dim: int
    domain: str  # "locomotion" or "antmaze"
    envs: list  # the evaluation envs, one per episode run side by side (none for pretraining)
    metric: str  # "normalized_score", or "return" for a Minari dataset without reference returns
    score: Optional[Callable[[np.ndarray], np.ndarray]]  # episode returns -> the metric (None for pretraining)
    minari: object = None  # the Minari dataset, or None for a D4RL file
    horizon: int = 0  # the evaluation episodes' length (AntMaze)
    name: str = ""  # the robot (locomotion) or maze (AntMaze) of a D4RL task
    legacy_inertia: bool = False  # D4RL's link masses in the evaluation envs

    @property
    def metric_words(self) -> str:
        """The metric as the messages name it."""
        return METRIC_WORDS[self.metric]

    def summary(self, transitions: dict) -> str:
        """A few lines about the data, given its transitions (the script's qlearning_dataset of `rows`)."""
        if self.minari is not None:
            env = self.envs[0] if self.envs and self.domain == "locomotion" else None
            return minari_summary(self.minari, self.rows, transitions, env)
        return dataset_summary(self.path, self.rows, transitions, self.domain, self.score)

    def video_env(self, run_dir: str, writer, step: int, final: bool) -> gym.Env:
        """An evaluation env like the others that films its episode into `run_dir`/videos as final-episode-0.mp4
        or step-{step}-episode-0.mp4 (--capture-video; AntMaze: a top view of the maze, the ant and the goal), and
        into TensorBoard's `writer` at `step`."""
        from divo_utils import envs as eval_envs  # imports MuJoCo: only once --capture-video has set MUJOCO_GL

        render = {"render_mode": "rgb_array", "width": SIZE, "height": SIZE}
        if self.minari is not None:
            env = eval_envs.make_minari_env(self.minari, **render)
        elif self.domain == "antmaze":
            env = eval_envs.D4RLAntMaze(self.name, self.horizon, self.legacy_inertia, **render)
        else:
            env = eval_envs.make_eval_env(self.name, self.legacy_inertia, **render)
        return filmed(env, os.path.join(run_dir, "videos"), "final" if final else f"step-{step}", writer, step)

    def close(self) -> None:
        """Close the evaluation envs."""
        for env in self.envs:
            env.close()


def load_task(env_id: str, dataset_path: Optional[str], eval_episodes: int = 0, legacy_inertia: bool = True,
              reference_returns: Optional[tuple[float, float]] = None) -> Task:
    """The data (a D4RL file at `dataset_path`, or downloaded first if none, or a Minari dataset) and `eval_episodes`
    evaluation envs (none for pretraining) of `env_id`; `reference_returns` (random, expert) turn a D4RL task's
    returns into its normalised score (d4rl_score; a Minari dataset's come from its metadata). Every check of the
    data (keys, shapes, flags, finite values, a sparse reward on AntMaze) happens here, before any run folder exists."""
    from divo_utils import envs as eval_envs  # imports MuJoCo: only once --capture-video has set MUJOCO_GL

    minari = load_minari_dataset(env_id) if is_minari_id(env_id) else None
    domain, envs, horizon = domain_of(env_id), [], 0
    name = maze_of(env_id) if domain == "antmaze" else robot_of(env_id)
    if domain == "locomotion" and eval_episodes:  # the envs first: a Minari dataset's sizes are its env's
        envs = [eval_envs.make_minari_env(minari) if minari else eval_envs.make_eval_env(name, legacy_inertia)
                for _ in range(eval_episodes)]
        obs_dim, act_dim = envs[0].observation_space.shape[0], envs[0].action_space.shape[0]
    else:
        obs_dim, act_dim = minari_dims(minari) if minari else D4RL_DIMS["antmaze" if domain == "antmaze" else name]
    rows, path = read_dataset(env_id, dataset_path, obs_dim, act_dim, minari)
    if domain == "antmaze" and not (rows["rewards"] > 0).any():
        raise InputError(f"{path} has no goal rewards (no reward > 0): not a sparse AntMaze dataset; check the file")
    metric, score = "normalized_score", None
    if reference_returns is not None:
        def score(returns):
            return d4rl_score(returns, reference_returns)
    if minari and domain == "locomotion" and eval_episodes:
        metric, score = minari_scorer(minari)
    if domain == "antmaze" and eval_episodes:  # the mazes once the data are known to be good: each takes a while
        horizon = eval_envs.antmaze_horizon(name)
        if minari:
            envs = eval_envs.make_minari_mazes(minari, eval_episodes)
            horizon = envs[0].spec.max_episode_steps
        else:
            envs = [eval_envs.D4RLAntMaze(name, horizon, legacy_inertia) for _ in range(eval_episodes)]
    return Task(rows, path, dataset_fingerprint(rows), obs_dim, act_dim, domain, envs, metric, score, minari,
                horizon, name, legacy_inertia)
