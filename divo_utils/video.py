"""--capture-video: the final policy's first evaluation episode filmed as MP4 under runs/{run_name}/videos/, as
CleanRL's scripts do. MuJoCo renders offscreen (EGL, or OSMesa in software; docs/envs.md), and the episode is run by
the script's own `evaluate` in an env of its own, so the evaluation's scores are what they are without it."""

import os

import gymnasium as gym

from divo_utils import InputError

SIZE = 480  # width and height of a frame, in pixels


def check_video() -> None:
    """Before anything runs: MP4s can be written and MuJoCo can render offscreen; else one line naming the fix. On a
    machine without a display MuJoCo is pointed at EGL unless MUJOCO_GL says otherwise (this must happen before
    MuJoCo is first imported: the scripts import it only when they build their envs, after the arguments)."""
    if "MUJOCO_GL" not in os.environ and not os.environ.get("DISPLAY"):
        os.environ["MUJOCO_GL"] = "egl"
    try:
        import moviepy  # noqa: F401  (gymnasium's RecordVideo writes the MP4 with it)
    except ImportError:
        raise InputError("--capture-video writes MP4 files with moviepy: pip install -r requirements.txt (or "
                         "pip install moviepy)") from None
    backend = os.environ.get("MUJOCO_GL", "glfw")
    try:
        import mujoco  # reads MUJOCO_GL on its first import

        context = mujoco.GLContext(64, 64)
        context.make_current()
        context.free()
    except Exception as e:  # no library, no device, no display: each backend fails its own way
        first = (str(e).strip().splitlines() or [""])[0]
        raise InputError(f"--capture-video: MuJoCo cannot render offscreen with MUJOCO_GL={backend} "
                         f"({type(e).__name__}: {first}). On a machine without a display install EGL "
                         "(apt-get install libegl1) and set MUJOCO_GL=egl, or OSMesa (apt-get install libosmesa6) and "
                         "set MUJOCO_GL=osmesa") from e


class EpisodeVideo(gym.wrappers.RecordVideo):
    """gymnasium's RecordVideo, writing each episode's MP4 as soon as the episode ends (RecordVideo waits for the
    next reset or close), so that the video is on disk before the run writes its last file."""

    def step(self, action):
        result = super().step(action)
        if self.recording and (result[2] or result[3]):  # terminated or truncated
            self.stop_recording()
        return result


def filmed(env: gym.Env, folder: str, name: str) -> gym.Env:
    """`env` (made with render_mode="rgb_array") writing every episode to folder/{name}-episode-{i}.mp4."""
    return EpisodeVideo(env, folder, episode_trigger=lambda episode: True, name_prefix=name, disable_logger=True)
