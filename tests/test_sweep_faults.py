"""Sweeps keep their promises under faults, on real processes: a full disk stops packs (members
`stopped`, not `failed`) and the same command resumes them; SIGTERM and Ctrl-C reach each pack process
once and each saves; a killed `sweep run` leaves no pack process behind; a pack process that dies is
named and its members resume; two runners of one sweep share its members. Every rerun ends each
member bitwise equal to the uninterrupted sweep (conftest.local_sweep)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (
    SWEEP_PHASES,
    load_json,
    mount_tmpfs,
    ok,
    pack_processes,
    run_cli,
    run_history,
    start_cli,
    sweep_file,
)


def _args(spec: Path, root: Path, *extra: str) -> list[str]:
    return ["sweep", "run", str(spec), *SWEEP_PHASES, "--tracker", "none", "--output-dir", str(root), *extra]


def _start(spec: Path, root: Path, env: dict, *extra: str) -> subprocess.Popen:
    """`sweep run` as a terminal starts it: a process group of its own."""
    return start_cli(*_args(spec, root, *extra), env=env)


def _until(check, proc: subprocess.Popen | None = None, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert proc is None or proc.poll() is None, "the sweep ended before the moment the test waits for"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    return found


def _first_checkpoint(root: Path, proc: subprocess.Popen) -> Path:
    """The pack dir (a pack of one's: its member's run dir) that saved its first epoch first: both
    pack processes are training then."""

    def saved() -> list[Path]:
        return [
            *root.glob("packs/*/checkpoints/epoch-0001/progress.json"),
            *root.glob("members/*/checkpoints/epoch-0001/progress.json"),
        ]

    return _until(saved, proc)[0].parents[2]


def _members(root: Path) -> list[str]:
    return [m["id"] for m in load_json(root / "sweep.json")["members"]]


def _assert_bitwise(root: Path, reference: Path) -> None:
    for member in _members(reference):
        assert run_history(root / "members" / member) == run_history(reference / "members" / member), member
        epochs = [json.loads(line)["epoch"] for line in (root / "members" / member / "metrics.jsonl").open()]
        assert epochs == [0, 1, 2], f"{member}: every epoch logged once: {epochs}"


def _counts(stdout: str) -> dict[str, int]:
    line = stdout.strip().splitlines()[-1]
    return {what: int(n) for n, what in re.findall(r"(\d+) (trained|skipped|failed|stopped|in use)", line)}


def _statuses(root: Path) -> list[str]:
    return [load_json(root / "members" / m / "run.json")["status"] for m in _members(root)]


def test_a_full_disk_stops_the_packs_and_the_same_command_resumes_them(
    local_sweep: tuple[Path, subprocess.CompletedProcess], tmp_path: Path, data_env: dict
):
    """Each pack's checkpoints on a disk of its own (300 KiB: its first checkpoint fits, 225 KiB, not
    the second), whatever the order the packs reach their epochs in."""
    reference, _ = local_sweep
    root, spec = tmp_path / "tiny", sweep_file(tmp_path)
    disks = [root / "packs" / p.name / "checkpoints" for p in sorted((reference / "packs").iterdir())]
    for disk in disks:  # the same members make the same packs: their dirs are named by the members
        disk.parent.mkdir(parents=True)
        mount_tmpfs(disk, "300k")
    try:
        proc = run_cli(*_args(spec, root), env=data_env)
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout
        for disk in disks:
            assert f"error: cannot write {disk}/.tmp-epoch-0002: No space left on device" in proc.stderr
        assert (
            proc.stderr.strip()
            .splitlines()[-1]
            .endswith(
                "ended with exit code 1 (its lines above say why); run the same command again to resume"
            )
        )
        status = json.loads(ok(run_cli("sweep", "status", root, "--json", env=data_env)).stdout)
        assert status["counts"]["stopped"] == 4 and status["counts"]["failed"] == 0, status
        for member in _members(root):
            run = load_json(root / "members" / member / "run.json")
            assert run["status"] == "fault" and "No space left on device" in run["error"], (
                "not the member's failure"
            )
        for disk in disks:
            subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
        again = ok(run_cli(*_args(spec, root), env=data_env))
        for disk in disks:
            assert f"resuming from {disk}/epoch-0001" in again.stdout, "resumed, not restarted"
        assert _counts(again.stdout) == {"trained": 4, "skipped": 0, "failed": 0, "stopped": 0, "in use": 0}
        _assert_bitwise(root, reference)
    finally:
        for disk in disks:
            subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.parametrize(
    ("sig", "code", "said", "extra"),
    [
        (signal.SIGTERM, 75, "stopped on request (2 pack process(es) saved", []),
        (signal.SIGINT, 130, "interrupted", ["--max-pack", "1"]),  # 4 packs of one: 2 not started yet
    ],
    ids=["SIGTERM", "Ctrl-C with packs waiting"],
)
def test_a_stop_reaches_every_pack_once_each_saves_and_the_rerun_is_bitwise(
    local_sweep: tuple[Path, subprocess.CompletedProcess],
    tmp_path: Path,
    data_env: dict,
    sig: signal.Signals,
    code: int,
    said: str,
    extra: list[str],
):
    reference, _ = local_sweep
    root, spec = tmp_path / "tiny", sweep_file(tmp_path)
    proc = _start(spec, root, data_env, *extra)
    _first_checkpoint(root, proc)
    assert len(pack_processes(root)) == 2
    os.killpg(
        proc.pid, sig
    )  # as a terminal's Ctrl-C or a scheduler: the pack processes have sessions of their own
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1].startswith(f"error: {said}")
    assert "killed by" not in err and "Traceback" not in err
    started = [m for m in _members(root) if (root / "members" / m / "run.json").exists()]
    assert len(started) == (2 if extra else 4), "the packs not started yet stay pending"
    assert {load_json(root / "members" / m / "run.json")["status"] for m in started} == {"preempted"}
    assert not list(root.glob("members/*/history.json")), "training was interrupted"
    assert not pack_processes(root)
    again = ok(run_cli(*_args(spec, root, *extra), env=data_env))
    assert again.stdout.count("resuming from") == 2
    _assert_bitwise(root, reference)


@pytest.mark.parametrize(
    "killed", ["process group", "sweep run alone", "one pack process", "one pack process, packs waiting"]
)
def test_a_kill_leaves_no_pack_process_and_the_rerun_trains_the_rest(
    local_sweep: tuple[Path, subprocess.CompletedProcess], tmp_path: Path, data_env: dict, killed: str
):
    reference, _ = local_sweep
    root, spec = tmp_path / "tiny", sweep_file(tmp_path)
    waiting = ["--max-pack", "1"] if killed.endswith("packs waiting") else []  # 4 packs of one, 2 at once
    proc = _start(spec, root, data_env, *waiting)
    saved = _first_checkpoint(root, proc)
    assert len(pack_processes(root)) == 2
    if killed.startswith("one pack process"):  # without waiting packs: the one with a checkpoint
        os.kill(pack_processes(root if waiting else saved)[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)  # no new pack starts; the runner ends once the other did
        assert proc.returncode == 1 and "was killed by SIGKILL; its members resume" in err, err
    else:  # the OOM killer, a crashed login shell: nothing of the runner runs on
        if killed == "process group":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
        _until(lambda: not pack_processes(root), timeout=5)  # each ends itself, saving
        assert not list(root.glob("members/*/history.json")), "training was interrupted"
    again = ok(run_cli(*_args(spec, root, *waiting), env=data_env))
    assert "resuming from" in again.stdout or waiting  # (a pack of one killed before its first save)
    assert _counts(again.stdout)["failed"] == 0 and _counts(again.stdout)["in use"] == 0
    _assert_bitwise(root, reference)


def test_two_runners_share_a_sweep_and_train_each_member_once(
    local_sweep: tuple[Path, subprocess.CompletedProcess], tmp_path: Path, data_env: dict
):
    """Packs of one (--max-pack 1), 2 at a time: the second runner starts once the first holds two
    members, and takes the two nobody holds."""
    reference, _ = local_sweep
    root, spec = tmp_path / "tiny", sweep_file(tmp_path)
    first = _start(spec, root, data_env, "--max-pack", "1")
    _until(lambda: len(list(root.glob("members/*/writer.lock"))) == 2, first)
    second = _start(spec, root, data_env, "--max-pack", "1")
    outs = [p.communicate(timeout=300) for p in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], [err for _, err in outs]
    counts = [_counts(out) for out, _ in outs]
    assert counts[0]["trained"] + counts[1]["trained"] == 4, counts
    assert counts[1]["trained"] >= 1, "the second runner trained what nobody held"
    assert all(c["failed"] == 0 and c["stopped"] == 0 for c in counts)
    _assert_bitwise(root, reference)
    for member in _members(root):
        assert load_json(root / "members" / member / "run.json").get("pack", {}).get("size", 1) == 1
