"""Trackers: a real W&B offline run read back from its file; TensorBoard; tracking never fails a run;
W&B's mode decided in seconds on a node without a route to it."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

from mnist_dist.config import TrainConfig
from mnist_dist.store.provenance import host
from mnist_dist.track import trackers as tracking
from mnist_dist.track import wandb_file

from conftest import ROOT, env_with, f32, load_json, ok, run_cli


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
    # epoch is the x-axis, and the summary holds the best epoch's val_acc and val_loss (define_metric).
    assert run["metrics"]["val_acc"] == {"step_metric": "epoch", "summary": ["max", "last"]}
    assert run["metrics"]["val_loss"] == {"step_metric": "epoch", "summary": ["min", "last"]}
    assert run["summary"]["val_acc"] == {
        "max": max(e["val_acc"] for e in history),
        "last": history[-1]["val_acc"],
    }
    assert run["summary"]["val_loss"]["min"] == min(e["val_loss"] for e in history)
    assert run["group"] is None and run["job_type"] is None, "a single run is in no sweep's group"


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
    """Each history entry's scalars and the best so far, in the run's TensorBoard run (named after the
    run), beside its HParams session; nothing in a sub-run of its own."""
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
    history = load_json(out / "history.json")
    folders = {p.parent for p in (out / "tensorboard").rglob("events.out.tfevents.*")}
    assert folders == {out / "tensorboard" / load_json(out / "run.json")["name"]}
    scalars = tensorboard_scalars(next(iter(folders)))
    assert [step for step, _ in scalars["val_acc"]] == [0, 1, 2]
    assert [v for _, v in scalars["val_acc"]] == [f32(e["val_acc"]) for e in history]
    best = [max(e["val_acc"] for e in history[: i + 1]) for i in range(len(history))]
    assert [v for _, v in scalars["best_val_acc"]] == [f32(v) for v in best]


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_a_run_that_starts_again_writes_its_tensorboard_run_anew_from_its_history(tmp_path: Path):
    """A resume after a kill (the last record cut short, epoch 2 trained again to other values, as
    off a CPU) or a retry: the files hold each epoch once, as the history now has it, and one end."""
    from mnist_dist.track.tensorboard import END_SUFFIX, TensorBoardRun

    cfg = TrainConfig(tracker="tensorboard")

    def entry(epoch: int, acc: float) -> dict:
        return {"epoch": epoch, "val_acc": acc, "val_loss": 1.0 - acc}

    first = TensorBoardRun(cfg, tmp_path)
    for e, acc in enumerate([0.1, 0.8, 0.85]):
        first.log(entry(e, acc), e)
    first.end("failed")
    (events,) = [p for p in first.dir.glob("events.out.tfevents.*") if not p.name.endswith(END_SUFFIX)]
    events.write_bytes(events.read_bytes()[:-5])  # epoch 2's record, cut short by a kill
    again = TensorBoardRun(cfg, tmp_path)
    assert not list(again.dir.glob(f"*{END_SUFFIX}")), "the end of the earlier try is gone"
    history = [
        entry(0, 0.1),
        entry(1, 0.8),
        entry(2, 0.75),
        entry(3, 0.9),
    ]  # the checkpoint's 0-1, then trained
    for e in history:
        again.log(e, e["epoch"])
    again.end("completed")
    scalars = tensorboard_scalars(again.dir)
    assert scalars["val_acc"] == [(e["epoch"], f32(e["val_acc"])) for e in history]
    assert [v for _, v in scalars["best_val_acc"]] == [f32(v) for v in (0.1, 0.8, 0.8, 0.9)]
    assert len(list(again.dir.glob(f"*{END_SUFFIX}"))) == 1


def test_tensorboard_names_tell_runs_apart():
    """Distinct swept values make distinct TensorBoard runs and Trial IDs (values percent-encoded
    where they hold a separator or a character a folder name cannot); two single runs of one name in
    two folders are two Trial IDs, not one row."""
    from mnist_dist.track.tensorboard import label, trial_id

    def member(value: object) -> TrainConfig:
        sweep = {"name": "s", "member": "abcdef0123", "params": {"optimizer.name": value, "seed": 1}}
        return TrainConfig(sweep=sweep)

    labels = [label(member(v)) for v in ("a b", "a/b", "a_b", "x,seed=2", [128, 64])]
    assert len(set(labels)) == 5 and all("/" not in name for name in labels)
    assert label(member("sgd")) == "optimizer.name=sgd,seed=1"
    assert trial_id(member("sgd"), Path("/r/m")) == "optimizer.name=sgd,seed=1 abcdef0123"
    single = TrainConfig()
    assert label(single) == "seed" and trial_id(single, Path("/a/seed")) != trial_id(single, Path("/b/seed"))


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


def closed_port() -> int:
    """A loopback port nothing listens on: a connection there is refused at once, as on a node whose
    firewall rejects W&B (no traffic leaves the machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_key_without_a_route_to_wandb_goes_offline_at_once(tmp_path: Path, mnist_dir: Path):
    """A key and no mode forced: W&B alone would try to go online and wait out its init timeout (a
    minute and more). The check decides at once, the run says so in one line and logs offline; sync
    makes the same check and ends with one line instead of hanging."""
    port = closed_port()
    env = env_with(
        MNIST_DIST_DATA_DIR=str(mnist_dir),
        HOME=str(tmp_path),
        WANDB_API_KEY="0123456789abcdef" * 2 + "01234567",  # 40 characters, the form of a real key
        WANDB_BASE_URL=f"http://127.0.0.1:{port}",
    )
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "WANDB_HTTPS_PROXY"):
        env.pop(name, None)
    out = tmp_path / "run"
    cmd = ("train", "-c", ROOT / "configs/smoke.yaml", "--tracker", "wandb", "--output-dir", out)
    proc = ok(run_cli(*cmd, env=env, timeout=120))
    said = [line for line in proc.stdout.splitlines() if line.startswith("W&B: ")]
    assert said == [
        f"W&B: 127.0.0.1:{port} unreachable from {host()} (Connection refused); logging "
        f"offline to {out / 'wandb'} (upload later: mnist-dist sync {out})"
    ]
    assert "did not start" not in proc.stdout, "no online attempt was made"
    info = load_json(out / "run.json")["tracking"]
    assert info["mode"] == "offline" and info["mode_reason"] == f"127.0.0.1:{port}: Connection refused"
    assert info["check_seconds"] < tracking.CHECK_SECONDS
    files = wandb_file.wandb_run_files(out)
    assert len(files) == 1 and len(wandb_file.read_wandb_run(files[0])["history"]) == 3

    proc = run_cli("sync", out, env=env, timeout=60)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"error: W&B: 127.0.0.1:{port} unreachable from ")
    assert f"run `mnist-dist sync {out}` on a node with network" in proc.stderr


def listening_port() -> tuple[socket.socket, int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    return server, server.getsockname()[1]


def no_proxy(monkeypatch) -> None:
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "WANDB_HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)


def test_a_key_and_a_reachable_server_go_online(monkeypatch):
    no_proxy(monkeypatch)
    server, port = listening_port()
    with server:
        monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
        monkeypatch.delenv("WANDB_MODE", raising=False)
        mode, record, reach = tracking.start_mode("auto")
    assert (mode, reach) == ("online", None)
    assert record["mode_reason"] == f"127.0.0.1:{port}: reachable"
    assert 0 <= record["check_seconds"] < tracking.CHECK_SECONDS, "answered, not timed out"


def test_a_forced_mode_skips_the_check(monkeypatch):
    def checked(*_):
        raise AssertionError("the check ran for a forced mode")

    monkeypatch.setattr(tracking, "wandb_reachable", checked)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert tracking.start_mode("online") == ("online", {"mode_reason": "wandb.mode"}, None)
    assert tracking.start_mode("offline") == ("offline", {"mode_reason": "wandb.mode"}, None)
    monkeypatch.setenv("WANDB_MODE", "online")
    assert tracking.start_mode("auto") == ("online", {"mode_reason": "WANDB_MODE"}, None)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.start_mode("auto") == ("disabled", {"mode_reason": "WANDB_MODE"}, None)


async def _no_answer(host: str, port: int) -> None:
    await asyncio.sleep(10)  # a black-holed route: the handshake never completes


async def _hung_lookup(host: str, port: int) -> None:
    time.sleep(10)  # a DNS lookup that hangs: nothing inside the loop can cancel it


@pytest.mark.parametrize("stall", [_no_answer, _hung_lookup])
def test_the_check_is_bounded_when_nothing_answers(monkeypatch, stall):
    monkeypatch.setattr(tracking, "_open", stall)
    reach = tracking.wandb_reachable.__wrapped__("https://wandb.example", timeout=0.3)
    assert (reach.ok, reach.target, reach.why) == (False, "wandb.example:443", "no answer within 0.3 s")
    assert reach.seconds < 5, "given up on after its timeout, not after the stall (10 s)"


def test_the_check_goes_through_the_https_proxy(monkeypatch):
    no_proxy(monkeypatch)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert tracking._proxy("https://api.wandb.ai") == "http://127.0.0.1:3128"
    monkeypatch.setenv("NO_PROXY", "api.wandb.ai")
    assert tracking._proxy("https://api.wandb.ai") is None
    monkeypatch.setenv("WANDB_HTTPS_PROXY", "http://127.0.0.1:8888")  # W&B's own wins
    assert tracking._proxy("https://api.wandb.ai") == "http://127.0.0.1:8888"


def test_the_server_comes_from_wandb_login_host_and_its_key_from_netrc(monkeypatch, tmp_path: Path):
    """`wandb login --host` writes base_url into W&B's settings file and host:port into ~/.netrc."""
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path))
    assert tracking.wandb_base_url() == "https://api.wandb.ai"
    (tmp_path / "settings").write_text("[default]\nbase_url = http://wandb.corp:8080/\n")
    assert tracking.wandb_base_url() == "http://wandb.corp:8080"
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    (tmp_path / "netrc").write_text("machine wandb.corp:8080\n  login user\n  password abc\n")
    assert tracking.wandb_credentials()


def test_the_offline_line_is_said_once_per_process(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(tracking, "_told", set())
    said: list[str] = []
    reach = tracking.Reach(False, "h:443", "Connection refused", 0.01)
    for run in ("a", "b"):  # two runs in one process, e.g. a sweep's members
        tracking.Tracker(TrainConfig(), tmp_path / run, None, said.append)._say_offline(reach)
    assert len(said) == 1 and said[0].startswith("W&B: h:443 unreachable from ")
