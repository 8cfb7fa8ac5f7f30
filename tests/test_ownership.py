"""One writer per run directory (the lock), private folders (0700), and faults of the machine (a full
disk) ending in one line, exit 1, and a resume that ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, accelerate_launch, launcher, load_json, mount_tmpfs, ok, run_cli
from test_resume import SEED, assert_identical
from test_train import TWO_GLOO

SMOKE = ["-c", str(ROOT / "configs/smoke.yaml")]


def _train(out: Path, env: dict, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mnist_dist.cli", "train", *SEED, "--output-dir", str(out), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_a_second_writer_exits_2_at_once_and_the_first_run_is_whole(tmp_path: Path, data_env: dict):
    out = tmp_path / "shared"
    first = _train(out, data_env)
    try:
        _wait_for(out / "writer.lock", first)
        holder = load_json(out / "writer.lock")
        second = run_cli("train", *SEED, "--output-dir", out, env=data_env)
        refused_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    except BaseException:
        first.kill()
        raise
    assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
    assert second.returncode == 2, second.stderr
    assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
    assert f"is being written by another run: pid {first.pid} on " in second.stderr
    assert "pass another --output-dir" in second.stderr
    _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    # Refused at once, not after waiting for the lock: while the first run was still training (a time
    # limit here would hold or not with the machine's load).
    assert refused_at <= load_json(out / "run.json")["end_time"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 11
    assert not (out / "writer.lock").exists(), "released at the end"


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path: Path, data_env: dict):
    out = tmp_path / "killed"
    proc = _train(out, data_env, *SMOKE)
    _wait_for(out / "writer.lock", proc)
    proc.kill()
    proc.wait()
    assert (out / "writer.lock").exists(), "kill -9 leaves the lock behind"
    again = ok(run_cli("train", *SMOKE, "--output-dir", out, env=data_env))
    assert f"warning: taking over the lock of {out} from pid {proc.pid}" in again.stdout
    assert "has ended" in again.stdout and not (out / "writer.lock").exists()


def test_a_lock_is_refused_while_fresh_and_taken_over_once_not_refreshed(tmp_path: Path, monkeypatch):
    """A holder on another host cannot be asked whether it lives: only its refreshes tell."""
    from mnist_dist.errors import UserError
    from mnist_dist.store import ownership

    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    other = {"host": "node-elsewhere", "pid": 4242, "slurm_job_id": "77", "start_time": "t", "token": "x"}
    (run_dir / ownership.LOCK).write_text(json.dumps(other))
    monkeypatch.setenv(ownership.STALE_ENV, "30")
    with pytest.raises(UserError, match=r"pid 4242 on node-elsewhere \(Slurm job 77\)"):
        ownership.RunLock(run_dir).acquire()
    old = time.time() - 60
    os.utime(run_dir / ownership.LOCK, (old, old))
    said: list[str] = []
    lock = ownership.RunLock(run_dir, log=said.append).acquire()
    assert said and "not refreshed for 60 s (the limit is 30 s" in said[0]
    assert lock.held() and ownership.holder(run_dir)["pid"] == os.getpid()
    lock.release()
    assert not (run_dir / ownership.LOCK).exists() and ownership.holder(run_dir) is None


def test_the_lock_is_refreshed_while_the_run_lives(tmp_path: Path, monkeypatch):
    from mnist_dist.store import ownership

    monkeypatch.setenv(ownership.STALE_ENV, "0.5")  # refresh every 0.1 s
    lock = ownership.RunLock(tmp_path / "run").acquire()
    try:
        first = (tmp_path / "run" / ownership.LOCK).stat().st_mtime
        time.sleep(1.0)
        assert (tmp_path / "run" / ownership.LOCK).stat().st_mtime > first
        assert ownership.holder(tmp_path / "run") is not None, "refreshed: never stale while held"
    finally:
        lock.release()


def _open_dir(path: Path) -> Path:
    path.mkdir()
    path.chmod(0o777)
    return path


def test_an_existing_world_writable_run_dir_is_tightened_to_0700(tmp_path: Path, data_env: dict):
    out = _open_dir(tmp_path / "group-folder")
    ok(run_cli("train", *SMOKE, "--output-dir", out, env=data_env))
    assert out.stat().st_mode & 0o777 == 0o700


def _foreign(path: Path) -> Path:
    if os.getuid() != 0:
        pytest.skip("making a folder owned by another user needs root (CI runs as root)")
    os.chown(path, 65534, 65534)
    return path


def test_a_writable_run_dir_of_another_user_is_refused(tmp_path: Path, data_env: dict):
    out = _foreign(_open_dir(tmp_path / "theirs"))
    proc = run_cli("train", *SMOKE, "--output-dir", out, env=data_env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "is writable by others (mode 777) and owned by uid 65534" in proc.stderr
    assert list(out.iterdir()) == [] and out.stat().st_mode & 0o777 == 0o777


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A 300 KiB tmpfs: room for the run's files and two checkpoints, not a third."""
    mount = tmp_path / "disk"
    mount_tmpfs(mount, "300k")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_is_one_line_exit_1_and_the_run_resumes_exactly(
    seed_run: Path, tiny_disk: Path, data_env: dict
):
    out = tiny_disk / "run"
    proc = run_cli("train", *SEED, "--output-dir", out, env=data_env)
    assert proc.returncode == 1, proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and "Traceback" not in proc.stderr + proc.stdout
    assert line.startswith(f"error: cannot write {out}/checkpoints/.tmp-epoch-0003: No space left on device")
    assert f"the last sound checkpoint is {out}/checkpoints/epoch-0002" in line
    assert line.endswith("fix that and run the same command again to resume")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0001", "epoch-0002"]
    assert not list(out.rglob(".*tmp*")), "temporary files are removed"
    run = load_json(out / "run.json")
    assert run["status"] == "fault" and "No space left on device" in run["error"], (
        "the machine failed, not the run"
    )
    assert not (out / "writer.lock").exists()
    debug = run_cli("train", *SEED, "--output-dir", out, "--debug", env=data_env)
    assert debug.returncode == 1 and "Traceback" in debug.stderr  # --debug shows where
    subprocess.run(["mount", "-o", "remount,size=4m", str(tiny_disk)], check=True)
    resumed = ok(run_cli("train", *SEED, "--output-dir", out, env=data_env))
    assert f"resuming from {out}/checkpoints/epoch-0002" in resumed.stdout
    assert_identical(out, seed_run)


def test_under_a_launcher_the_main_process_holds_the_lock_for_all(tmp_path: Path, data_env: dict):
    """accelerate launch: rank 0 takes the lock after the process group exists; a second writer of
    either kind is refused, a launched one on every rank (they agree through one all-reduce)."""
    out = tmp_path / "launched"
    long_run = [*SEED, "--phases", "50x0.5", "--output-dir", str(out)]  # stopped by the test, not run out
    holder_proc = subprocess.Popen(
        launcher(*TWO_GLOO, *long_run),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=data_env,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        _wait_for(out / "writer.lock", holder_proc)
        holder = load_json(out / "writer.lock")
        assert holder["pid"] != holder_proc.pid, "a worker holds it (rank 0), not the launcher"
        single = run_cli("train", *SMOKE, "--output-dir", out, env=data_env)
        assert single.returncode == 2 and f"another run: pid {holder['pid']} on " in single.stderr
        launched = accelerate_launch(*TWO_GLOO, *SMOKE, "--output-dir", out, env=data_env)
        assert launched.returncode == 1, launched.stderr[-2000:]  # the launcher's exit for any failure
        assert f"another run: pid {holder['pid']} on " in launched.stderr
        assert holder_proc.poll() is None, "the holder trains on"
        assert load_json(out / "writer.lock")["pid"] == holder["pid"]
    finally:
        os.killpg(holder_proc.pid, signal.SIGKILL)
        holder_proc.wait()
