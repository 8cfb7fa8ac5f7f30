"""Trackers: a real W&B offline run read back from its file; TensorBoard; tracking never fails a run."""

from __future__ import annotations

from pathlib import Path

from mnist_dist import tracking, wandb_file

from conftest import ROOT, env_with, load_json, ok, run_cli


def test_wandb_offline_run_is_written_and_read_back(tmp_path: Path, mnist_dir: Path):
    out = tmp_path / "wb"
    env = env_with(MNIST_DIST_DATA_DIR=str(mnist_dir))
    ok(run_cli("train", "-c", ROOT / "configs/seed.yaml", "--tracker", "wandb", "--output-dir", out, env=env))
    info = load_json(out / "run.json")["tracking"]
    assert info["tracker"] == "wandb" and info["mode"] == "offline"  # no API key here -> offline
    files = wandb_file.wandb_run_files(out)
    assert len(files) == 1 and files[0].parent.name.startswith("offline-run-")
    assert Path(info["dir"]) == files[0].parent

    run = wandb_file.read_wandb_run(files[0])
    assert run["id"] == info["run_id"]
    rows = run["history"]
    assert len(rows) == 11
    assert [r["epoch"] for r in rows] == list(range(11)) == [r["_step"] for r in rows]
    history = load_json(out / "history.json")
    for row, entry in zip(rows, history, strict=True):
        assert (
            abs(row["val_acc"] - entry["val_acc"]) < 1e-12 and abs(row["val_loss"] - entry["val_loss"]) < 1e-9
        )
        assert row.get("lr") == entry["lr"] and row.get("phase") == entry["phase"]
    config = {
        k: (v.get("value") if isinstance(v, dict) and "value" in v else v) for k, v in run["config"].items()
    }
    assert config["batch_size"] == 128 and config["phases"] == [
        {"epochs": 5, "lr": 0.5},
        {"epochs": 5, "lr": 0.1},
    ]


def test_wandb_online_without_key_falls_back_to_offline(tmp_path: Path, mnist_dir: Path):
    out = tmp_path / "wb"
    env = env_with(MNIST_DIST_DATA_DIR=str(mnist_dir), WANDB_DIR=str(tmp_path), HOME=str(tmp_path))
    proc = ok(
        run_cli(
            "train",
            "-c",
            ROOT / "configs/smoke.yaml",
            "--tracker",
            "wandb",
            "--set",
            "wandb.mode=online",
            "--output-dir",
            out,
            env=env,
            timeout=300,
        )
    )
    info = load_json(out / "run.json")["tracking"]
    assert info["mode"] == "offline", proc.stdout
    assert "warning: wandb tracker (online) did not start" in proc.stdout
    assert len(load_json(out / "history.json")) == 3


def test_tensorboard_tracker_writes_events(tmp_path: Path, mnist_dir: Path):
    out = tmp_path / "tb"
    env = env_with(MNIST_DIST_DATA_DIR=str(mnist_dir))
    ok(
        run_cli(
            "train",
            "-c",
            ROOT / "configs/smoke.yaml",
            "--tracker",
            "tensorboard",
            "--output-dir",
            out,
            env=env,
        )
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for folder in {p.parent for p in (out / "tensorboard").rglob("events.out.tfevents.*")}:
        acc = EventAccumulator(str(folder))
        acc.Reload()
        scalars.update({tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]})
    history = load_json(out / "history.json")
    assert [step for step, _ in scalars["val_acc"]] == [0, 1, 2]
    assert [round(v, 4) for _, v in scalars["val_acc"]] == [round(e["val_acc"], 4) for e in history]


def test_wandb_mode_decision(monkeypatch, tmp_path: Path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert tracking.wandb_mode("auto") == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    assert tracking.wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert tracking.wandb_mode("auto") == "offline"
    assert tracking.wandb_mode("online") == "online"
