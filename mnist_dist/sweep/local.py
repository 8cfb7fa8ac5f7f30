"""Training a sweep's members on this machine (`mnist-dist sweep run`) and in each task of a
`sweep submit` job array.

`pack="auto"` (the default) trains compatible members together as packs (packing.py): one stacked
model per process, each member still its own run (run.run_pack). With several workers (locally: one
per usable CPU, or one per GPU when the members train on GPUs) the packs run as separate processes at
once (pack_process.py), each with one thread (or its own GPU) and no communication.
`pack="off"` trains the members one after another in this process, each exactly as `mnist-dist train`
runs it.

Every pack's members are claimed (state.py) at the moment it starts, so finished members are
skipped, a second runner of the same sweep trains what nobody holds, and running the same sweep again
trains only what is left. A member whose loss stops being finite is recorded as failed in its
run.json and the others go on.

Stops and faults: a requested stop (SIGUSR2, SIGTERM, Ctrl-C) is passed on once to every pack
process, each saves its checkpoint and ends with 75; a full disk ends the packs that hit it (their
members `stopped`, by a fault, and resumed by the same command). A pack process runs in a session of
its own (a terminal's Ctrl-C reaches the runner only, which passes it on) and ends, saving, when its
runner dies: no pack trains on as an orphan of a killed `sweep run`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mnist_dist.config import TrainConfig
from mnist_dist.errors import ExitCode, UserError
from mnist_dist.sweep import packing as packs
from mnist_dist.sweep.layout import SweepDir
from mnist_dist.sweep.pack_dirs import home, joined, owner, pack_home, resumable, write_pack
from mnist_dist.sweep.spec import Member
from mnist_dist.sweep.state import NO_RETRY, Retry, claim, member_state, recorded_state, to_train
from mnist_dist.train.stopping import StopFlag

TERMINATED = "terminated"  # state.py's name of a member early termination stopped

COUNTS = ("trained", "skipped", "failed", "terminated", "stopped", "in use", "not started")
RELAYED = {signal.SIGUSR2, signal.SIGTERM, signal.SIGINT}  # blocked in a pack process until it handles them
CLAIMED_BY = "MNIST_DIST_CLAIMED_BY"  # a pack process's environment: the pid of the runner that claimed it


class PacksStopped(Exception):
    """A stop reached the pack processes; each saved its checkpoint. `interrupted`: by Ctrl-C."""

    def __init__(self, count: int, interrupted: bool = False) -> None:
        super().__init__(f"stopped on request ({count} pack process(es) saved their checkpoints)")
        self.interrupted = interrupted


class PackProcessFailed(Exception):
    """A pack process ended with an error (its own lines say which) or was killed; `exit_code` is the
    runner's: the process's own, or 1 (a fault) when a signal killed it."""

    def __init__(self, code: int, pack: Path) -> None:
        if code < 0:
            why = f"was killed by {signal.Signals(-code).name}; its members resume from its last checkpoint"
        else:
            why = f"ended with exit code {code} (its lines above say why)"
        super().__init__(f"the pack process of {pack} {why}")
        self.exit_code = code if code > 0 else ExitCode.FAULT


Queue = deque[list[Member]]


def run_members(
    members: Iterable[Member],
    stop: StopFlag | None = None,
    log: Callable[[str], Any] = print,
    retry: Retry = NO_RETRY,
    pack: str = "auto",
    max_pack: int | None = None,
    workers: int = 1,
    gpus: list[str] | None = None,
) -> dict[str, int]:
    """Train what is left of `members`, in packs of up to `max_pack` by `workers` processes at once
    (with `gpus`, one GPU each); return how many this runner trained, skipped (done, failed or
    terminated, unless `retry` names that state), failed, terminated (early termination stopped them)
    or stopped, and how many were in use (held, or trained meanwhile, by another runner)."""
    members = list(members)
    counts = dict.fromkeys(COUNTS, 0)
    todo = []
    for member in members:
        state = member_state(member.run_dir)
        if state == "running":
            log(f"member {member.id}: being trained elsewhere; skipped")
        elif to_train(state, retry):
            todo.append(member)
        else:
            counts["skipped"] += 1
    queue: Queue = deque(_plan(members, todo, pack, max_pack, workers, bool(retry)))
    moved_in = joined(list(queue), todo)
    gate = Gate(members, log, early=TERMINATED not in retry)
    if len(queue) > 1 and workers > 1 and pack != "off":
        ran = _in_processes(queue, workers, stop, log, gpus or [], retry, gate)
    else:
        ran = _in_this_process(queue, stop, log, retry, gate)
    if ran:  # the packs they moved into trained them
        ran |= moved_in
    counts["in use"] = len(members) - counts["skipped"] - len(todo)  # held when this runner began
    left = {m.id for group in queue for m in group}  # not started: the target was reached
    for member in todo:
        if member.id in ran:
            state = recorded_state(member.run_dir)
            counts[{"done": "trained", "failed": "failed", TERMINATED: TERMINATED}.get(state, "stopped")] += 1
        else:
            counts["not started" if member.id in left else "in use"] += 1
    return counts


class Gate:
    """Whether another pack may start: not once a member reached the sweep's `metric.target`
    (target.py; read from the sweep dir, so the tasks of an array and other runners agree). And
    whether the packs start in waves: with early termination (`early`, unless this runner retries
    terminated members), the next packs start once the running ones have all ended, so each band's
    decision sees the same values whatever the timing (barrier.py)."""

    def __init__(self, members: list[Member], log: Callable[[str], Any], early: bool = True) -> None:
        from mnist_dist.sweep.spec import read_manifest

        root = SweepDir.of_member(members[0].run_dir).root if members else None
        self.manifest = read_manifest(root) if root and SweepDir(root).manifest.is_file() else {}
        self.root, self.log, self.closed = root, log, False
        self.waves = early and bool(self.manifest.get("early_terminate"))

    def open(self) -> bool:
        if not self.closed and self.root and (self.manifest.get("metric") or {}).get("target") is not None:
            from mnist_dist.sweep.target import reached

            why = reached(self.root, self.manifest)
            if why is not None:
                self.log(str(why))
                self.closed = True
        return not self.closed


def _plan(
    members: list[Member], todo: list[Member], pack: str, max_pack: int | None, workers: int, retry: bool
) -> list[list[Member]]:
    from mnist_dist.store import handover

    # Packs that were stopped part-way go on as they were, with the members that moved into them at
    # a band (barrier.py); the other members are planned anew, and start over: a move they made
    # between packs before is void.
    planned = [] if retry or pack == "off" else resumable(members, todo)  # a retry starts failed members anew
    started = {m.id for group in planned for m in group} | joined(planned, todo)
    anew = [m for m in todo if m.id not in started]
    for member in anew:
        handover.clear(member.run_dir)
    return planned + ([[m] for m in anew] if pack == "off" else packs.plan(anew, workers, max_pack))


def _take(group: list[Member], queue: Queue, retry: Retry, log: Callable[[str], Any]) -> list:
    """The locks of `group` (state.claim; not of those that moved on to another pack at a band: that
    one trains them); when another runner holds or finished some of its members, none, and the
    members still free go back to the queue as a pack of their own."""
    home = str(pack_home(group))
    locks, rest = claim([m for m in group if owner(m) in (None, home)], retry, log)
    if not locks:
        if len(rest) < len(group):
            log(f"{len(group) - len(rest)} of {len(group)} member(s) taken by another run; skipped")
        if rest:
            queue.append(rest)
    return locks


def local_workers(cfg: TrainConfig) -> tuple[int, list[str]]:
    """(packs at once on this machine, the GPU of each slot): one per GPU when the members train on
    GPUs (device auto or cuda, and GPUs visible), else one per usable CPU and no GPUs. The GPUs are
    found without importing torch: this parent only starts the pack processes, and torch would add
    half a GiB to it for the whole sweep."""
    from mnist_dist.train.threads import usable_cpus

    if cfg.device != "cpu":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            gpus = [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
        else:
            driver = Path("/proc/driver/nvidia/gpus")
            gpus = [str(i) for i in range(len(list(driver.iterdir())))] if driver.is_dir() else []
        if gpus:
            return len(gpus), gpus
    return usable_cpus(), []


def _in_this_process(
    queue: Queue, stop: StopFlag | None, log: Callable[[str], Any], retry: Retry, gate: Gate
) -> set[str]:
    """The packs one after another in this process; the ids of the members this runner trained."""
    ran: set[str] = set()
    while queue and gate.open():
        group = queue.popleft()
        locks = _take(group, queue, retry, log)
        if not locks:
            continue
        ran |= {m.id for m in group}
        try:
            _train(group, stop, log, locks, gate.waves)
        finally:
            for lock in locks:
                lock.release()
    return ran


def _train(
    group: list[Member], stop: StopFlag | None, log: Callable[[str], Any], locks: list, early: bool
) -> None:
    """One pack in this process, its members' locks claimed; with `early`, the sweep's early
    termination judges it (a wave of its own: the packs before it have ended)."""
    from mnist_dist.sweep.barrier import Judge
    from mnist_dist.train.run import run_pack  # torch: once the members are known good

    one = len(group) == 1
    log(
        f"member {group[0].id}: {_describe(group[0].params)}"
        if one
        else f"pack of {len(group)}: " + " ".join(m.id for m in group)
    )
    cfgs = [m.cfg for m in group]
    where = home(cfgs, None if one else write_pack(group))
    judge = Judge.for_pack(where, cfgs[0], peers=[]) if early else None
    try:
        _, failures = run_pack(cfgs, where, stop=stop, locks=locks, judge=judge)
    except UserError as e:  # a checkpoint it cannot use: the member's line says why, the others go on
        log(f"{' '.join(m.id for m in group)}: {e}")
        return
    for member, why in zip(group, failures, strict=True):
        if why is not None:
            log(f"member {member.id} failed: training diverged: {why}")


def _in_processes(
    queue: Queue,
    workers: int,
    stop: StopFlag | None,
    log: Callable,
    gpus: list[str],
    retry: Retry,
    gate: Gate,
) -> set[str]:
    """The packs as `workers` processes at a time (each on its own GPU when there are `gpus`), in
    waves when the gate says so; a stop is passed on to each once (SIGUSR2). Returns the ids of the
    members this runner trained."""
    from mnist_dist.sweep.barrier import clear_ended, mark_ended

    running: dict[subprocess.Popen, tuple[Path, int, list]] = {}
    homes: dict[subprocess.Popen, Path] = {}
    free, ran = list(range(workers)), set()
    relayed, stopped, failure = False, 0, None
    try:
        while (queue and not gate.closed and failure is None) or running:
            asked = stop is not None and stop.requested
            room = 0 if asked or failure is not None or (gate.waves and running) else workers - len(running)
            wave = _next_wave(queue, room, gate, retry, log)
            peers = [pack_home(group) for group, _ in wave] if gate.waves else None
            for where in peers or []:
                clear_ended(where)
            for group, locks in wave:
                slot = free.pop(0)
                proc, where = _start(group, locks, gpus[slot] if gpus else None, log, peers)
                running[proc] = (where, slot, locks)
                homes[proc] = pack_home(group)
                ran |= {m.id for m in group}
            if asked and not relayed:
                for proc in running:
                    proc.send_signal(signal.SIGUSR2)
                relayed = True
            for proc, (where, slot, locks) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                del running[proc]
                free.append(slot)
                if gate.waves:  # its peers wait for it no more (it may have been killed)
                    mark_ended(homes.pop(proc))
                for lock in locks:  # those its process never adopted (it ended before it could)
                    lock.release()
                if code == ExitCode.STOPPED:
                    stopped += 1
                elif code != 0 and failure is None:
                    failure = PackProcessFailed(code, where)
            if asked and not running:  # the packs not started yet stay as they are
                break
            time.sleep(0.1)
    finally:  # only when this process itself fails (a second Ctrl-C): the packs end with it
        for proc, (_, _, locks) in running.items():
            proc.kill()
            proc.wait()
            for lock in locks:
                lock.release()
    if failure is not None:
        raise failure
    if stopped or (stop is not None and stop.requested):
        raise PacksStopped(stopped, interrupted=stop is not None and stop.interrupted)
    return ran


def _next_wave(queue: Queue, room: int, gate: Gate, retry: Retry, log: Callable) -> list[tuple[list, list]]:
    """Up to `room` packs to start now, each with its members' locks: with waves, none while a wave
    runs (`room` 0), so that a wave starts once the last one has ended."""
    wave: list[tuple[list, list]] = []
    while queue and len(wave) < room and gate.open():
        group = queue.popleft()
        locks = _take(group, queue, retry, log)
        if locks:
            wave.append((group, locks))
    return wave


def _start(
    group: list[Member], locks: list, gpu: str | None, log: Callable, peers: list[Path] | None
) -> tuple[subprocess.Popen, Path]:
    """A pack process for `group`, whose locks this runner holds and hands over: in a session of its
    own, told who claimed it (CLAIMED_BY) and, with early termination, the homes of its wave
    (`peers`), the stop signals blocked until it handles them."""
    from mnist_dist.sweep.barrier import PEERS

    try:
        where = write_pack(group)
        env = {k: v for k, v in os.environ.items() if k != PEERS}
        env[CLAIMED_BY] = str(os.getpid())
        if peers is not None:
            env[PEERS] = os.pathsep.join(map(str, peers))
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        log(f"pack {where.name}: {len(group)} members, a process of its own{f' on GPU {gpu}' if gpu else ''}")
        command = [sys.executable, "-m", "mnist_dist.sweep.pack_process", str(where)]
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, RELAYED)  # inherited by the child
        try:
            proc = subprocess.Popen(command, env=env, start_new_session=True)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    for lock in locks:
        lock.hand_over()
    return proc, where


def _describe(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())
