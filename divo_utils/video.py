"""--capture-video: the final policy's first evaluation episode (with --video-each-eval, every evaluation's) filmed
as MP4 under runs/{run_name}/videos/, as CleanRL's scripts do, and shown in TensorBoard and on W&B. MuJoCo renders
offscreen (EGL, or OSMesa in software; docs/envs.md), and the episode is run by the script's own `evaluate` in an env
of its own, so the evaluation's scores are what they are without it."""

import io
import os
import sys
import warnings

import gymnasium as gym
import numpy as np

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
    """gymnasium's RecordVideo for one episode: the moment it ends its MP4 is written (RecordVideo would wait for the
    next reset or close), shown in TensorBoard (`writer`, at training step `step`) and on W&B when the run is tracked,
    and the env (its renderer) is closed."""

    def __init__(self, env: gym.Env, folder: str, name: str, writer=None, step: int = 0):
        with warnings.catch_warnings():  # each video is named after its step: another video there is no conflict
            warnings.filterwarnings("ignore", message=".*Overwriting existing videos")
            super().__init__(env, folder, episode_trigger=lambda episode: True, name_prefix=name, disable_logger=True)
        self.writer, self.logged_step = writer, step

    def step(self, action):
        result = super().step(action)
        if self.recording and (result[2] or result[3]):  # terminated or truncated
            frames, path = self.recorded_frames, os.path.join(self.video_folder, f"{self._video_name}.mp4")
            self.stop_recording()
            if self.writer is not None:
                self.writer._get_file_writer().add_summary(tensorboard_gif(frames, self.frames_per_sec),
                                                           self.logged_step)
            wandb = sys.modules.get("wandb")  # imported by the script with --track
            if wandb is not None and wandb.run is not None:
                wandb.log({"videos/policy": wandb.Video(path, format="mp4")})
            self.close()
        return result


def tensorboard_gif(frames: list[np.ndarray], fps: float, pixel_stride: int = 3, frame_stride: int = 2):
    """An episode's frames as TensorBoard's video summary: an animated GIF (TensorBoard shows videos as images), a
    third of the width and height and every second frame, at the episode's own speed. SummaryWriter.add_video makes
    the same summary, but only with moviepy 1 (it imports moviepy.editor, which moviepy 2 removed)."""
    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    shots = [Image.fromarray(frame[::pixel_stride, ::pixel_stride]) for frame in frames[::frame_stride]]
    gif = io.BytesIO()
    shots[0].save(gif, format="GIF", save_all=True, append_images=shots[1:], loop=0,
                  duration=round(1000 * frame_stride / fps))
    image = Summary.Image(height=shots[0].height, width=shots[0].width, colorspace=3,
                          encoded_image_string=gif.getvalue())
    return Summary(value=[Summary.Value(tag="videos/policy", image=image)])


def filmed(env: gym.Env, folder: str, name: str, writer=None, step: int = 0) -> gym.Env:
    """`env` (made with render_mode="rgb_array") filming its one episode to folder/{name}-episode-0.mp4 (and to
    TensorBoard's `writer` at `step`)."""
    return EpisodeVideo(env, folder, name, writer, step)
