"""Nothing lost: kill -9 and resume, the preemption drill, corrupt and mismatched checkpoints,
divergence, directory modes and secrets. Every resumed run must end exactly where an uninterrupted
run with the same seed ends: same history (all but wall-clock seconds), bit-identical weights."""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import ROOT, env_with, load_json, ok, run_cli, run_history

SEED = ["--config", str(ROOT / "configs/seed.yaml"), "--tracker", "none"]


def assert_identical(run_dir: Path, reference: Path) -> None:
    assert run_history(run_dir) == run_history(reference)
    a, b = load_file(str(run_dir / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a), "weights differ"


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_preemption_drill_saves_exits_and_resumes_exactly(seed_run: Path, tmp_path: Path, data_env: dict):
    out = tmp_path / "drill"
    proc = run_cli("train", *SEED, "--output-dir", out, "--simulate-preemption-at", "3:150", env=data_env)
    assert proc.returncode == 75
    assert proc.stderr.strip() == (
        "error: stopped in epoch 3 before step 150: checkpoint saved; run the same command again to resume"
    )
    assert load_json(out / "run.json")["status"] == "preempted"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0002", "epoch-0002-step-000150"]
    proc = ok(run_cli("train", *SEED, "--output-dir", out, env=data_env))
    assert "resuming from " in proc.stdout and "at epoch 3, step 150" in proc.stdout
    assert "Epoch [1]," not in proc.stdout  # done before the stop: not trained again
    assert_identical(out, seed_run)
    run = load_json(out / "run.json")
    assert run["status"] == "completed" and run["resumed_from"].endswith("epoch-0002-step-000150")
    metrics = (out / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 11, "no epoch twice in the metrics file"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0009", "epoch-0010"]  # keep 2


def _kill_when(cmd_env: dict, out: Path, lines: int) -> None:
    """Start training, kill -9 it once metrics.jsonl has `lines` entries (mid-training)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mnist_dist.cli", "train", *SEED, "--output-dir", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=cmd_env,
        cwd=ROOT,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= lines):
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.05)  # into the next epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("lines", [3, 6])
def test_kill_9_mid_epoch_then_resume_is_exact(seed_run: Path, tmp_path: Path, data_env: dict, lines: int):
    out = tmp_path / "killed"
    _kill_when(data_env, out, lines)
    assert not (out / "history.json").exists()
    ok(run_cli("train", *SEED, "--output-dir", out, env=data_env))
    assert_identical(out, seed_run)


def test_kill_mid_save_leaves_nothing_resume_would_take(seed_run: Path, tmp_path: Path, data_env: dict):
    out = tmp_path / "midsave"
    _kill_when(data_env, out, 5)
    newest = sorted((out / "checkpoints").glob("epoch-*"))[-1]
    # What a kill during the next save leaves: a temporary folder with part of the files, no seal.
    half = out / "checkpoints" / ".tmp-epoch-0099"
    half.mkdir()
    shutil.copy(newest / "model.safetensors", half / "model.safetensors")
    proc = ok(run_cli("train", *SEED, "--output-dir", out, env=data_env))
    assert f"resuming from {newest}" in proc.stdout
    assert not half.exists(), "temporary folders are cleared"
    assert_identical(out, seed_run)


def test_corrupt_newest_checkpoint_is_skipped_for_the_previous(
    seed_run: Path, tmp_path: Path, data_env: dict
):
    out = tmp_path / "corrupt"
    assert (
        run_cli(
            "train", *SEED, "--output-dir", out, "--simulate-preemption-at", "4:10", env=data_env
        ).returncode
        == 75
    )
    newest = out / "checkpoints" / "epoch-0003-step-000010"
    weights = bytearray((newest / "model.safetensors").read_bytes())
    weights[-5] ^= 0xFF
    (newest / "model.safetensors").write_bytes(bytes(weights))
    proc = ok(run_cli("train", *SEED, "--output-dir", out, env=data_env))
    assert f"warning: checkpoint {newest} is corrupt: model.safetensors is missing or altered" in proc.stdout
    assert "at the end of epoch 3" in proc.stdout
    assert_identical(out, seed_run)


def test_checkpoint_of_another_config_is_refused_unless_forced(tmp_path: Path, data_env: dict):
    out = tmp_path / "mismatch"
    assert (
        run_cli("train", *SEED, "--output-dir", out, "--simulate-preemption-at", "2", env=data_env).returncode
        == 75
    )
    before = tree_digest(out / "checkpoints")
    proc = run_cli("train", *SEED, "--output-dir", out, "--seed", "7", "--batch-size", "64", env=data_env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "was written by a different config (seed, batch_size changed)" in proc.stderr
    assert "--resume never" in proc.stderr and "--force" in proc.stderr
    assert tree_digest(out / "checkpoints") == before, "a refused resume touches nothing"
    proc = ok(
        run_cli(
            "train",
            *SEED,
            "--output-dir",
            out,
            "--seed",
            "7",
            "--force",
            "--phases",
            "1x0.5,1x0.1",
            env=data_env,
        )
    )
    assert "resuming from" in proc.stdout


def test_resume_never_starts_over_and_bad_resume_paths_exit_2(tmp_path: Path, data_env: dict):
    out = tmp_path / "never"
    smoke = ["-c", ROOT / "configs/smoke.yaml"]
    assert (
        run_cli(
            "train", *smoke, "--output-dir", out, "--simulate-preemption-at", "2:5", env=data_env
        ).returncode
        == 75
    )
    proc = ok(run_cli("train", *smoke, "--output-dir", out, "--resume", "never", env=data_env))
    assert "resuming" not in proc.stdout and "Epoch [1]," in proc.stdout
    history = load_json(out / "history.json")
    proc = ok(run_cli("train", *smoke, "--output-dir", out, env=data_env))  # finished: trains nothing
    assert "all 2 epochs were trained already: nothing to train" in proc.stdout
    assert "Epoch [" not in proc.stdout and load_json(out / "history.json") == history
    proc = run_cli("train", *smoke, "--output-dir", out, "--resume", tmp_path / "nowhere", env=data_env)
    assert proc.returncode == 2 and "no such checkpoint folder" in proc.stderr
    proc = run_cli("train", *smoke, "--output-dir", out, "--simulate-preemption-at", "x", env=data_env)
    assert proc.returncode == 2 and "write EPOCH or EPOCH:STEP" in proc.stderr


def test_divergence_keeps_the_last_good_checkpoint(tmp_path: Path, data_env: dict):
    out = tmp_path / "nan"
    proc = run_cli("train", *SEED, "--phases", "2x0.5,1x1e38", "--output-dir", out, env=data_env)
    assert proc.returncode == 1 and "in phase 2, epoch 3, lr 1e+38" in proc.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0001", "epoch-0002"]
    assert load_json(out / "run.json")["status"] == "failed"
    assert len(load_json(out / "checkpoints/epoch-0002/progress.json")["history"]) == 3


def test_run_directories_are_private_and_hold_no_secrets(tmp_path: Path, mnist_dir: Path):
    secrets = {
        "WANDB_API_KEY": "wandbkey-0123456789abcdef0123456789abcdef01234567",
        "MY_SERVICE_TOKEN": "tok-9f8e7d6c5b4a",
        "AWS_SECRET": "aws-secret-77ab",
    }
    env = env_with(MNIST_DIST_DATA_DIR=str(mnist_dir), **secrets)
    out = tmp_path / "private"
    proc = ok(
        run_cli(
            "train",
            "-c",
            ROOT / "configs/smoke.yaml",
            "--tracker",
            "wandb",
            "--set",
            "wandb.mode=offline",
            "--output-dir",
            out,
            env=env,
        )
    )
    assert (out.stat().st_mode & 0o777) == 0o700
    assert ((out / "checkpoints").stat().st_mode & 0o077) == 0, "checkpoints: owner only"
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and any(p.parent.name.startswith("epoch-") for p in files)
    for p in files:
        blob = p.read_bytes()
        for name, value in secrets.items():
            assert value.encode() not in blob, f"{name} leaked into {p}"
    for value in secrets.values():
        assert value not in proc.stdout + proc.stderr


def test_remaining_starts_at_the_first_epoch_not_done():
    from mnist_dist.checkpoint import Progress
    from mnist_dist.config import TrainConfig
    from mnist_dist.run import Stretch, remaining
    from mnist_dist.stopping import ResumePoint

    cfg = TrainConfig()  # 5 epochs at 0.5, then 5 at 0.1
    assert remaining(cfg, Progress(epochs_done=0)) == [Stretch(0, 0.5, 1, 5), Stretch(1, 0.1, 6, 5)]
    # Stopped in epoch 3 before step 150: epoch 3 resumes there, the next phase starts fresh.
    assert remaining(cfg, Progress(epochs_done=2, step=150, loss_sum=12.5)) == [
        Stretch(0, 0.5, 3, 3, ResumePoint(150, 12.5)),
        Stretch(1, 0.1, 6, 5),
    ]
    assert remaining(cfg, Progress(epochs_done=5, step=7, loss_sum=1.0)) == [
        Stretch(1, 0.1, 6, 5, ResumePoint(7, 1.0))
    ]
    assert remaining(cfg, Progress(epochs_done=10)) == []


def test_a_loaded_checkpoint_keeps_this_devices_optimizer_kernels(tmp_path: Path):
    """The optimizer's saved groups carry `foreach` (kernels chosen for the device that saved them);
    after a load the engine sets this device's choice again, e.g. a CPU checkpoint resumed on a GPU."""
    from mnist_dist.checkpoint import Progress, folder
    from mnist_dist.config import TrainConfig
    from mnist_dist.engine import Engine
    from mnist_dist.model import MnistModel

    engine = Engine(TrainConfig(device="cpu", tracker="none"), tmp_path, MnistModel)
    try:
        assert engine.optimizer.param_groups[0]["foreach"] is False
        engine.optimizer.param_groups[0]["foreach"] = None  # as a checkpoint from elsewhere has it
        engine.save_checkpoint(Progress(epochs_done=1), keep=1)
        engine.load_checkpoint(folder(tmp_path) / "epoch-0001")
        assert engine.optimizer.param_groups[0]["foreach"] is False
    finally:
        engine.close()
