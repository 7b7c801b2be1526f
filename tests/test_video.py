"""--capture-video: the final policy (with --video-each-eval every evaluation's) filmed as MP4, shown in TensorBoard and
on W&B, the evaluation's scores unchanged by it, the AntMaze top view, and a machine that cannot render refused before
any run folder exists."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, refused, run_script, write_d4rl_file

TINY = ["--hidden-dim", "16", "--num-layers", "1", "--batch-size", "32", "--log-freq", "10", "--no-cuda",
        "--total-timesteps", "20", "--eval-freq", "0", "--seed", "3"]


def can_render() -> str:
    """Why this machine cannot film (an empty string where it can), asked the way the scripts ask."""
    code = "from divo_utils.video import check_video; check_video()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    return (proc.stderr.strip().splitlines() or ["?"])[-1] if proc.returncode else ""


needs_renderer = pytest.mark.skipif(bool(can_render()), reason=f"no offscreen rendering here: {can_render()}")


def frames(path) -> list:
    from moviepy import VideoFileClip

    clip = VideoFileClip(str(path))
    try:
        return list(clip.iter_frames())
    finally:
        clip.close()


def results(run) -> dict:
    scores = json.loads((run / "scores.json").read_text())
    return {key: value for key, value in scores.items() if key != "run_name"}


def tensorboard_videos(run) -> list:
    """The videos of a run's TensorBoard file: (step, GIF bytes, width, height) for each."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"images": 0})
    events.Reload()
    if "videos/policy" not in events.Tags()["images"]:
        return []
    return [(e.step, e.encoded_image_string, e.width, e.height) for e in events.Images("videos/policy")]


@needs_renderer
def test_the_policy_is_filmed_logged_and_the_scores_do_not_change(tmp_path, monkeypatch):
    """--capture-video --video-each-eval: an MP4 per evaluation (the final one named so), each in TensorBoard as a
    GIF at its step and on W&B (offline mode: no account, no network); the scores are those of a run without it."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    write_d4rl_file(tmp_path / "data.hdf5", episode_lengths=(60, 60))
    common = ["--env-id", "hopper-medium-v2", "--dataset-path", "data.hdf5", "--eval-episodes", "2",
              "--no-legacy-inertia", *TINY, "--eval-freq", "10"]
    run_script("divo_continuous.py", *common, "--run-name", "plain", cwd=tmp_path)
    run_script("divo_continuous.py", *common, "--run-name", "filmed", "--capture-video", "--video-each-eval",
               "--track", cwd=tmp_path)
    assert results(tmp_path / "runs/filmed") == results(tmp_path / "runs/plain")  # recording changes nothing
    videos = sorted((tmp_path / "runs/filmed/videos").iterdir())
    assert [video.name for video in videos] == ["final-episode-0.mp4", "step-10-episode-0.mp4"]
    for video in videos:
        shot = frames(video)
        assert video.stat().st_size > 1000 and len(shot) >= 2 and shot[0].shape == (480, 480, 3)
        assert np.abs(shot[0].astype(int) - shot[-1].astype(int)).mean() > 1.0  # the hopper moved (or fell)
    logged = tensorboard_videos(tmp_path / "runs/filmed")
    assert [step for step, *_ in logged] == [10, 20]
    assert all(gif.startswith(b"GIF89a") and (width, height) == (160, 160) for _, gif, width, height in logged)
    (offline,) = (tmp_path / "wandb").glob("offline-run-*-filmed")
    assert len(list((offline / "files" / "media" / "videos").rglob("*.mp4"))) == 2
    assert not (tmp_path / "runs/plain/videos").exists() and not tensorboard_videos(tmp_path / "runs/plain")


@needs_renderer
def test_the_antmaze_video_is_a_top_view_of_the_maze_the_ant_and_the_goal(tmp_path):
    """D4RL's AntMaze filmed as the script films it (Task.video_env's env and wrapper), a short episode in-process:
    rendering 700 frames of a whole umaze episode in software takes minutes."""
    script = (
        "import sys, numpy as np; from divo_utils.video import check_video, filmed; check_video()\n"
        "from divo_utils.envs import D4RLAntMaze  # MuJoCo after check_video: it picks the offscreen backend\n"
        "env = filmed(D4RLAntMaze('umaze', 15, True, render_mode='rgb_array'), sys.argv[1], "
        "'final'); env.reset(seed=0); done = False\n"
        "while not done: done = any(env.step(np.ones(8, np.float32))[2:4])\n"
        "env.close()")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "videos")], cwd=ROOT, check=True, timeout=300)
    shot = frames(tmp_path / "videos/final-episode-0.mp4")
    assert len(shot) == 16 and shot[0].shape == (480, 480, 3)  # the reset's frame and 15 steps
    # the whole maze from above: its walls and floor squares, not one colour; the red goal marker is in view
    assert shot[0].std() > 20.0
    red = (shot[0][..., 0] > 150) & (shot[0][..., 1] < 60) & (shot[0][..., 2] < 60)
    assert red.sum() > 50
    assert np.abs(shot[0].astype(int) - shot[-1].astype(int)).max() > 50  # the ant moved


def test_a_machine_that_cannot_render_is_refused_before_any_run_folder(tmp_path):
    write_d4rl_file(tmp_path / "data.hdf5", episode_lengths=(60, 60))
    proc = run_script("divo_continuous.py", "--env-id", "hopper-medium-v2", "--dataset-path", "data.hdf5", *TINY,
                      "--capture-video", cwd=tmp_path, check=False, env={"MUJOCO_GL": "no-such-backend"})
    assert refused(proc, "--capture-video: MuJoCo cannot render offscreen with MUJOCO_GL=no-such-backend"), proc.stderr
    assert "apt-get install libegl1" in proc.stderr and not (tmp_path / "runs").exists()


def test_pretraining_has_no_policy_to_film_and_says_so():
    help_text = subprocess.run([sys.executable, os.path.join(ROOT, "pad_pretrain.py"), "--help"], capture_output=True,
                               text=True, timeout=120).stdout
    assert "no policy to film" in help_text and "--capture-video" in help_text
    assert "--capture-video" in subprocess.run([sys.executable, os.path.join(ROOT, "divo_antmaze.py"), "--help"],
                                               capture_output=True, text=True, timeout=120).stdout


def test_a_filming_failure_after_training_keeps_the_run(tmp_path, monkeypatch):
    """Filming that passed the check before training but fails on the final episode (a display gone, ffmpeg
    removed): one warning line, and the run still writes its checkpoint and scores.json."""
    import divo_continuous as dc
    import divo_utils.args
    import divo_utils.data
    from conftest import run_main

    def broken_camera(self, *args, **kwargs):
        raise OSError("ffmpeg is gone")

    monkeypatch.setattr(divo_utils.args, "check_video", lambda: None)  # the check before training passes
    monkeypatch.setattr(divo_utils.data.Task, "video_env", broken_camera)
    monkeypatch.chdir(tmp_path)
    write_d4rl_file(tmp_path / "data.hdf5", episode_lengths=(60, 60))
    run_main(dc, ["--env-id", "hopper-medium-v2", "--dataset-path", "data.hdf5", "--eval-episodes", "2",
                  "--no-legacy-inertia", *TINY, "--capture-video", "--run-name", "v"], monkeypatch)
    scores = json.loads((tmp_path / "runs/v/scores.json").read_text())
    assert scores["step"] == 20 and (tmp_path / "runs/v/checkpoint.pt").exists()
