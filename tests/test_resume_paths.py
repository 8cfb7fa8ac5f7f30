"""`--resume PATH` in its three forms (a checkpoint folder, a run directory, a corrupt checkpoint), a
missing or unreadable progress.json, and the preemption drill with W&B offline. Real `mnist-dist train`
processes on the smoke config (2 epochs); a resumed run must end where an uninterrupted one ends."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mnist_dist.track import wandb_file

from conftest import ROOT, load_json, ok, run_cli, run_history

SMOKE = ["-c", str(ROOT / "configs/smoke.yaml")]  # tracker none
EPOCH_1 = "epoch-0001"
STEP_50 = "epoch-0001-step-000050"  # stopped in epoch 2 before step 50


def assert_exact(run_dir: Path, reference: Path) -> None:
    """Same history (all but wall-clock seconds) and bit-identical weights."""
    assert run_history(run_dir) == run_history(reference)
    a, b = load_file(str(run_dir / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a), "weights differ"


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root (root included) with its mode, mtime and content hash: any write shows."""
    found = {}
    for p in sorted([root, *root.rglob("*")]):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
        found[str(p.relative_to(root))] = (st.st_mode, st.st_mtime_ns, digest)
    return found


def flip_a_byte(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))


def damage_progress(checkpoint: Path, damage: str) -> None:
    progress = checkpoint / "progress.json"
    if damage == "missing":
        progress.unlink()
    else:  # cut in half: not JSON any more
        text = progress.read_text()
        progress.write_text(text[: len(text) // 2])


def one_error_line(proc) -> str:
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Epoch [" not in proc.stdout, "nothing is trained"
    return proc.stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, data_env: dict) -> Path:
    """The smoke config uninterrupted."""
    out = tmp_path_factory.mktemp("reference") / "smoke"
    ok(run_cli("train", *SMOKE, "--output-dir", out, env=data_env))
    return out


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory, data_env: dict) -> Path:
    """The smoke config stopped in epoch 2 before step 50 (checkpoints epoch-0001 and
    epoch-0001-step-000050). Shared: tests that write copy it first."""
    out = tmp_path_factory.mktemp("stopped") / "smoke"
    proc = run_cli("train", *SMOKE, "--output-dir", out, "--simulate-preemption-at", "2:50", env=data_env)
    assert proc.returncode == 75, proc.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [EPOCH_1, STEP_50]
    return out


def copy_of(run_dir: Path, to: Path) -> Path:
    shutil.copytree(run_dir, to, symlinks=True)
    return to


def test_resume_from_a_named_older_checkpoint_starts_exactly_there(
    stopped: Path, reference: Path, tmp_path: Path, data_env: dict
):
    out = copy_of(stopped, tmp_path / "back")
    older = out / "checkpoints" / EPOCH_1  # not the newest: epoch-0001-step-000050 is
    proc = ok(run_cli("train", *SMOKE, "--output-dir", out, "--resume", older, env=data_env))
    assert f"resuming from {older} at the end of epoch 1\n" in proc.stdout
    assert "Epoch [1]," not in proc.stdout and "Epoch [2]," in proc.stdout
    assert load_json(out / "run.json")["resumed_from"] == str(older)
    metrics = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in metrics] == [0, 1, 2], "metrics from that point on"
    assert_exact(out, reference)


def test_resume_from_a_run_directory_takes_its_newest_checkpoint(
    stopped: Path, reference: Path, tmp_path: Path, data_env: dict
):
    before = snapshot(stopped)
    out = tmp_path / "elsewhere"
    proc = ok(run_cli("train", *SMOKE, "--output-dir", out, "--resume", stopped, env=data_env))
    newest = stopped / "checkpoints" / STEP_50
    assert f"resuming from {newest} at epoch 2, step 50\n" in proc.stdout
    assert "Epoch [1]," not in proc.stdout
    assert load_json(out / "run.json")["resumed_from"] == str(newest)
    assert_exact(out, reference)
    assert snapshot(stopped) == before, "the run resumed from is only read"


def test_resume_from_a_corrupt_checkpoint_is_exit_2_and_writes_nothing(
    stopped: Path, tmp_path: Path, data_env: dict
):
    src = copy_of(stopped, tmp_path / "src")
    bad = src / "checkpoints" / STEP_50
    names = sorted(load_json(bad / "progress.json")["files"])
    assert "model.safetensors" in names
    for name in names:  # each sealed file altered in turn, resumed into its own run dir
        original = (bad / name).read_bytes()
        flip_a_byte(bad / name)
        before = snapshot(src)
        proc = run_cli("train", *SMOKE, "--output-dir", src, "--resume", bad, env=data_env)
        line = one_error_line(proc)
        assert str(bad) in line and "corrupt" in line and name in line, line
        assert snapshot(src) == before, f"{name}: a refused resume writes nothing"
        (bad / name).write_bytes(original)
    flip_a_byte(bad / "model.safetensors")
    before = snapshot(src)
    fresh = tmp_path / "fresh" / "run"
    proc = run_cli("train", *SMOKE, "--output-dir", fresh, "--resume", bad, env=data_env)
    line = one_error_line(proc)
    assert str(bad) in line and "corrupt" in line, line
    assert not (tmp_path / "fresh").exists(), "a refused resume creates no output dir"
    assert snapshot(src) == before


@pytest.mark.parametrize("damage", ["missing", "unreadable"])
def test_a_damaged_progress_file_is_skipped_by_resume_auto(
    stopped: Path, reference: Path, tmp_path: Path, data_env: dict, damage: str
):
    out = copy_of(stopped, tmp_path / "run")
    newest, previous = out / "checkpoints" / STEP_50, out / "checkpoints" / EPOCH_1
    damage_progress(newest, damage)
    proc = ok(run_cli("train", *SMOKE, "--output-dir", out, "--resume", "auto", env=data_env))
    warnings = [line for line in proc.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, proc.stdout
    assert str(newest) in warnings[0] and "progress.json" in warnings[0], warnings
    assert f"resuming from {previous} at the end of epoch 1\n" in proc.stdout
    assert_exact(out, reference)


@pytest.mark.parametrize("damage", ["missing", "unreadable"])
def test_a_damaged_progress_file_named_by_resume_path_is_exit_2(
    stopped: Path, tmp_path: Path, data_env: dict, damage: str
):
    src = copy_of(stopped, tmp_path / "src")
    bad = src / "checkpoints" / STEP_50
    damage_progress(bad, damage)
    before = snapshot(src)
    proc = run_cli("train", *SMOKE, "--output-dir", src, "--resume", bad, env=data_env)
    line = one_error_line(proc)
    assert str(bad) in line, line
    if damage == "unreadable":
        assert "progress.json" in line, line
    assert snapshot(src) == before, "a refused resume writes nothing"


def test_a_checkpoint_without_progress_file_is_named_as_such(stopped: Path, tmp_path: Path, data_env: dict):
    src = copy_of(stopped, tmp_path / "src")
    bad = src / "checkpoints" / STEP_50
    damage_progress(bad, "missing")
    line = one_error_line(run_cli("train", *SMOKE, "--output-dir", src, "--resume", bad, env=data_env))
    assert f"checkpoint {bad} has no readable progress.json" in line, line


def test_an_altered_progress_file_is_refused(stopped: Path, tmp_path: Path):
    from mnist_dist.errors import UserError
    from mnist_dist.store import checkpoint

    src = copy_of(stopped, tmp_path / "src")
    progress = src / "checkpoints" / STEP_50 / "progress.json"
    progress.write_text(progress.read_text().replace('"step": 50', '"step": 60', 1))
    with pytest.raises(UserError, match="corrupt"):
        checkpoint.read(progress.parent)


def test_preemption_drill_with_wandb_offline_keeps_one_run_and_each_epoch_once(
    reference: Path, tmp_path: Path, data_env: dict
):
    assert "WANDB_API_KEY" not in data_env and "WANDB_MODE" not in data_env
    out = tmp_path / "wb"
    cmd = ["train", *SMOKE, "--tracker", "wandb", "--set", "wandb.mode=offline", "--output-dir", out]
    proc = run_cli(*cmd, "--simulate-preemption-at", "2:50", env=data_env)
    assert proc.returncode == 75, proc.stderr
    first = load_json(out / "run.json")["tracking"]
    assert first["tracker"] == "wandb" and first["mode"] == "offline" and first["run_id"]
    proc = ok(run_cli(*cmd, env=data_env))
    assert f"resuming from {out / 'checkpoints' / STEP_50} at epoch 2, step 50\n" in proc.stdout
    tracking = load_json(out / "run.json")["tracking"]
    assert tracking["mode"] == "offline" and tracking["run_id"] == first["run_id"], "the same W&B run"

    files = wandb_file.wandb_run_files(out)  # one per segment, oldest first
    runs = [wandb_file.read_wandb_run(f) for f in files]
    assert files and {f.stem for f in files} == {f"run-{first['run_id']}"}
    assert {r["id"] for r in runs} == {first["run_id"]}, "one W&B run id"
    rows = [row for r in runs for row in r["history"]]
    history = load_json(out / "history.json")
    assert [row["epoch"] for row in rows] == [e["epoch"] for e in history] == [0, 1, 2], "each epoch once"
    for row, entry in zip(rows, history, strict=True):
        assert abs(row["val_acc"] - entry["val_acc"]) < 1e-12, (row, entry)
        assert abs(row["val_loss"] - entry["val_loss"]) < 1e-9, (row, entry)
        assert row.get("lr") == entry["lr"] and row.get("phase") == entry["phase"]
    assert_exact(out, reference)
