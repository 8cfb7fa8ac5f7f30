"""Nothing lost: kill -9 and resume, the preemption drill, corrupt and mismatched checkpoints,
divergence, directory modes and secrets. Every resumed run must end exactly where an uninterrupted
run with the same seed ends: same history (all but wall-clock seconds), bit-identical weights."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import ROOT, SHORT_PHASES, accelerate_launch, env_with, load_json, ok, run_cli, run_history
from test_train import TWO_GLOO, assert_same_history

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


# A writer slowed down at the moment every process has written its part of the epoch-5 checkpoint and
# the main process is about to seal it: the kill lands in the middle of a real save.
SLOW_SAVE = """
import pathlib, sys, time
from mnist_dist.store import checkpoint
seal = checkpoint.seal
def slow(tmp, progress):
    if progress.epochs_done == 5:
        pathlib.Path(sys.argv[1]).write_text(str(tmp))
        time.sleep(600)
    seal(tmp, progress)
checkpoint.seal = slow
from mnist_dist.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_kill_9_during_a_real_save_leaves_nothing_resume_would_take(
    seed_run: Path, tmp_path: Path, data_env: dict
):
    out, saving = tmp_path / "midsave", tmp_path / "saving"
    cmd = [sys.executable, "-c", SLOW_SAVE, str(saving), "train", *SEED, "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=data_env, cwd=ROOT)
    deadline = time.monotonic() + 300
    while not saving.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the save was never reached"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # before any assertion: a failing test leaves no sleeper behind
    proc.wait()
    half = Path(saving.read_text())
    assert half.name == ".tmp-epoch-0005" and (half / "model.safetensors").is_file()
    assert not (half / "progress.json").exists(), "killed before the seal"
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == [".tmp-epoch-0005", "epoch-0003", "epoch-0004"], "only the temporary folder is new"
    newest = out / "checkpoints" / "epoch-0004"
    proc = ok(run_cli("train", *SEED, "--output-dir", out, env=data_env))
    assert f"resuming from {newest} at the end of epoch 4" in proc.stdout, proc.stdout
    assert "trying the previous checkpoint" not in proc.stdout, "nothing half-written was even considered"
    assert "warning: taking over the lock" in proc.stdout  # the killed run's, whose pid is gone
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
    assert len(load_json(out / "checkpoints/epoch-0002/progress.json")["members"][0]["history"]) == 3


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
    from mnist_dist.config import TrainConfig
    from mnist_dist.store.checkpoint import Progress, ResumePoint
    from mnist_dist.train.schedule import Stretch, remaining

    cfg = TrainConfig()  # 5 epochs at 0.5, then 5 at 0.1
    assert remaining([cfg], Progress(epochs_done=0)) == [Stretch(0, (0.5,), 1, 5), Stretch(1, (0.1,), 6, 5)]
    # Stopped in epoch 3 before step 150: epoch 3 resumes there, the next phase starts fresh.
    assert remaining([cfg], Progress(epochs_done=2, step=150, loss_sums=[12.5])) == [
        Stretch(0, (0.5,), 3, 3, ResumePoint(150, (12.5,))),
        Stretch(1, (0.1,), 6, 5),
    ]
    assert remaining([cfg], Progress(epochs_done=5, step=7, loss_sums=[1.0])) == [
        Stretch(1, (0.1,), 6, 5, ResumePoint(7, (1.0,)))
    ]
    assert remaining([cfg], Progress(epochs_done=10)) == []
    # A pack: one lr per member in each phase.
    fast = cfg.model_copy(update={"phases": [p.model_copy(update={"lr": 1.0}) for p in cfg.phases]})
    assert remaining([cfg, fast], Progress(epochs_done=9)) == [Stretch(1, (0.1, 1.0), 10, 1)]


def test_a_loaded_checkpoint_puts_the_members_lrs_back_on_this_device(tmp_path: Path):
    """The optimizer's groups carry each member's lr as a tensor; a checkpoint brings the saving
    device's tensors, and the next fit sets this device's again (a CPU checkpoint resumed on a GPU)."""
    import torch

    from mnist_dist.config import TrainConfig
    from mnist_dist.store.checkpoint import Progress, folder
    from mnist_dist.train.engine import Engine
    from mnist_dist.train.model import MnistPack

    engine = Engine(
        TrainConfig(device="cpu", tracker="none"), tmp_path, lambda: MnistPack.seeded([1, 1, 2], 32)
    )
    try:
        assert [g["lr"].tolist() for g in engine.optimizer.param_groups] == [[0.5, 0.5], [0.5]]
        engine.save_checkpoint(Progress(epochs_done=1), keep=1)
        engine.set_lrs([0.1, 0.2, 0.3])
        engine.load_checkpoint(folder(tmp_path) / "epoch-0001")
        engine.set_lrs([0.1, 0.2, 0.3])
        groups = engine.optimizer.param_groups
        assert torch.equal(torch.cat([g["lr"] for g in groups]), torch.tensor([0.1, 0.2, 0.3]))  # float32
        assert all(g["lr"].device == engine.device for g in groups)
    finally:
        engine.close()


SHORT = [*SEED, "--phases", SHORT_PHASES]


def _train_on(processes: int, out: Path, env: dict, *extra: str) -> subprocess.CompletedProcess:
    if processes == 1:
        return run_cli("train", *SHORT, "--output-dir", out, *extra, env=env)
    return accelerate_launch(*TWO_GLOO, *SHORT, "--output-dir", out, *extra, env=env)


@pytest.mark.parametrize(("first", "then"), [(1, 2), (2, 1)], ids=["1-then-2", "2-then-1"])
def test_a_checkpoint_of_n_processes_resumes_on_m(
    short_run: Path, tmp_path: Path, data_env: dict, first: int, then: int
):
    """Resuming across topologies is a feature: the global batch, the data order and the loss scale do
    not depend on the number of processes, so neither does the checkpoint (README: Resume)."""
    out = tmp_path / "run"
    stop = _train_on(first, out, data_env, "--simulate-preemption-at", "2:100")
    lines = stop.stderr.strip().splitlines()
    if first == 1:
        assert stop.returncode == 75 and len(lines) == 1
    else:  # the launcher turns every non-zero exit into 1, with its own banner after our one line
        assert stop.returncode == 1
        ours = [line for line in lines if line.startswith("error: ")]
        assert ours == [
            "error: stopped in epoch 2 before step 100: checkpoint saved; run the same command again to "
            "resume (the launcher reports it as exit 1, ChildFailedError)"
        ], stop.stderr[-3000:]
        assert "ChildFailedError" in stop.stderr  # the launcher's banner, documented in the README
    resumed = ok(_train_on(then, out, data_env))
    assert "at epoch 2, step 100" in resumed.stdout
    history, reference = load_json(out / "history.json"), load_json(short_run / "history.json")
    assert_same_history(history, reference)
    for a, b in zip(history[1:], reference[1:], strict=True):  # the stopped epoch's mean loss too
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-6, (a["epoch"], a["train_loss"], b["train_loss"])
    segments = load_json(out / "run.json")["segments"]
    assert [s["world_size"] for s in segments] == [first, then]
    assert segments[1]["from"] == {"epochs_done": 1, "step": 100}
