"""tools/benchmark.py as a user runs it: every mode it can run here, the backbone beside DIVO, the parts."""

import os
import re
import sys

import pytest

from conftest import ROOT, run_script, write_d4rl_file

sys.path.insert(0, os.path.join(ROOT, "tools"))
import benchmark  # noqa: E402


def test_benchmark_prints_steps_per_second_per_mode_and_the_parts(tmp_path):
    env = {"D4RL_DATASET_DIR": str(tmp_path / "empty-cache")}
    out = run_script("tools/benchmark.py", "--env-id", "walker2d-medium-v2", "--hidden-dim", "16", "--num-layers", "1",
                     "--steps", "10", "--warmup", "2", "--modes", "eager", "cudagraphs", "compile+cudagraphs",
                     "--no-cuda", cwd=tmp_path, env=env).stdout
    assert "divo_continuous, walker2d-medium-v2 shapes (observation 17, action 6)" in out
    assert "1,000,000 random transitions (no dataset at" in out
    eager = re.search(r"eager\s+([\d,]+)\s+([\d.]+)\s+([\d,]+)\s+([\d.]+)\s+([\d.]+)x", out)
    assert eager and float(eager[1].replace(",", "")) > 0
    assert float(eager[2]) >= 0 and float(eager[5]) > 1.0  # DIVO costs more than its backbone
    assert re.search(r"\n  cudagraphs\s+needs a CUDA GPU", out)
    assert re.search(r"compile\+cudagraphs\s+needs a CUDA GPU", out)
    for part in ("critic, eq. (1)", "value, eq. (2)", "PAD, eq. (9)-(10)", "ADPO sampling, eq. (12)",
                 "actor + targets, eq. (13)"):
        assert re.search(re.escape(part) + r"\s+\d+\.\d{3} ms", out), part
    assert not (tmp_path / "runs").exists() and not (tmp_path / "empty-cache").exists()


def test_benchmark_of_pad_pretraining_on_antmaze_shapes(tmp_path):
    out = run_script("tools/benchmark.py", "--env-id", "antmaze-umaze-v2", "--script", "pad_pretrain", "--hidden-dim", "16",
                     "--num-layers", "1", "--steps", "5", "--warmup", "1", "--modes", "eager", "--no-cuda", cwd=tmp_path,
                     env={"D4RL_DATASET_DIR": str(tmp_path / "none")}).stdout
    assert "pad_pretrain, antmaze-umaze-v2 shapes (observation 29, action 8)" in out
    assert re.search(r"eager\s+[\d,]+\s+[\d.]+\n", out) and "backbone" not in out


@pytest.mark.parametrize("args, message", [
    ({"dataset_path": "hoper-medium-v2.hdf5"}, "--dataset-path hoper-medium-v2.hdf5: no such file"),
    ({"env_id": "Hopper-Medium-v2"}, "unknown --env-id 'Hopper-Medium-v2'; did you mean hopper-medium-v2?"),
    ({"env_id": "AntMaze-umaze-v2"}, "did you mean antmaze-umaze-v2?"),
    ({"steps": 0}, "--steps must be at least 1"),
    ({"hidden_dim": 0}, "--hidden-dim 0 is out of range"),
    ({"runs_per_gpu": [2, 0]}, "--runs-per-gpu takes counts of at least 1, got 2 0"),
])
def test_bad_arguments_are_one_error_line_before_any_work(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "none"))
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(benchmark.Args(cuda=False, **args))
    assert str(exit_info.value.code).startswith("error: ") and message in str(exit_info.value.code)
    assert "benchmark:" not in capsys.readouterr().out and os.listdir(tmp_path) == []


def test_benchmark_on_a_minari_dataset_and_a_minari_id_not_in_the_store(tmp_path):
    """A Minari id: its dataset's shapes and rows from Minari's store (never downloaded: one line when not there)."""
    from test_adpo_contest import hopper_minari_store

    store = tmp_path / "store"
    hopper_minari_store(store, "test/hopper/random-v0")
    env = {"MINARI_DATASETS_PATH": str(store), "HF_HUB_OFFLINE": "1"}
    out = run_script("tools/benchmark.py", "--env-id", "test/hopper/random-v0", "--hidden-dim", "16", "--num-layers",
                     "1", "--steps", "5", "--warmup", "1", "--modes", "eager", "--no-parts", "--no-cuda", cwd=tmp_path,
                     env=env).stdout
    assert "divo_continuous, test/hopper/random-v0 shapes (observation 11, action 3)" in out
    assert "data: the Minari dataset test/hopper/random-v0 (" in out and re.search(r"eager\s+[\d,]+\s+[\d.]+\s+[\d,]+", out)
    for env_id in ("mujoco/hopper/medium-v0", "D4RL/antmaze/umaze-v1"):  # divo_continuous's id, divo_antmaze's
        refused = run_script("tools/benchmark.py", "--env-id", env_id, "--no-cuda", cwd=tmp_path, env=env, check=False)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
        assert refused.stderr.startswith(f"error: the Minari dataset {env_id} is not in Minari's local store {store}")
        assert len(refused.stderr.strip().splitlines()) == 1
    assert sorted(os.listdir(store)) == ["test"] and sorted(os.listdir(tmp_path)) == ["store"]


def test_packed_copies_report_aggregate_rates_and_the_grid_cost(tmp_path):
    """--runs-per-gpu: K processes side by side (on the CPU here); the grid's cost follows from the two rates."""
    write_d4rl_file(tmp_path / "small.hdf5")  # not a million random transitions in every process
    out = run_script("tools/benchmark.py", "--env-id", "hopper-medium-v2", "--dataset-path", tmp_path / "small.hdf5",
                     "--hidden-dim", "16", "--num-layers", "1", "--steps", "20", "--warmup", "2", "--modes", "eager",
                     "--no-parts", "--runs-per-gpu", "2", "--no-cuda", cwd=tmp_path).stdout
    rows = re.findall(r"\n  eager\s+(\d)\s+([\d,]+)\s+([\d,]+)\s+([\d.]+)", out)
    assert [int(k) for k, *_ in rows] == [2], out
    for _, divo, backbone, hours in rows:
        divo, backbone = float(divo.replace(",", "")), float(backbone.replace(",", ""))
        assert divo > 0 and backbone > 0
        # 75 runs of each algorithm x 1M steps at the printed (rounded) rates
        assert float(hours) == pytest.approx(75e6 * (1 / divo + 1 / backbone) / 3600, rel=0.05)


def test_rates_keep_three_significant_digits():
    assert [benchmark.rate(x) for x in (1.437, 31.24, 1234.6)] == ["1.44", "31.2", "1,235"]


def test_cuda_graphs_alone_without_a_gpu_is_refused_not_silently_skipped(tmp_path):
    proc = run_script("tools/benchmark.py", "--env-id", "hopper-medium-v2", "--no-cuda", "--modes", "cudagraphs",
                      cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "needs a CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr
