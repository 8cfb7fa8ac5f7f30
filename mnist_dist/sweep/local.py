"""Training a sweep's members on this machine (`mnist-dist sweep run`) and in each task of a
`sweep submit` job array.

`pack="auto"` (the default) trains compatible members together as packs (packs.py): one stacked model
per process, each member still its own run (run.run_pack). With several workers (locally: one per
usable CPU, or one per GPU when the members train on GPUs) the packs run as separate processes at
once (pack_process.py), each with one thread (or its own GPU) and no communication.
`pack="off"` trains the members one after another in this process, each exactly as `mnist-dist train`
runs it.

Finished (and failed) members are skipped, so running the same sweep again trains only what is left;
a member whose loss stops being finite is recorded as failed in its run.json and the others go on.
A requested stop (SIGUSR2/SIGTERM, the drill) ends every pack after it saved its checkpoint; so does a
full disk (it is the other members' disk too).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mnist_dist.config import TrainConfig
from mnist_dist.errors import ExitCode, UserError
from mnist_dist.sweep import packing as packs
from mnist_dist.sweep.layout import SweepDir
from mnist_dist.sweep.spec import Member, member_state
from mnist_dist.train.stopping import StopFlag


class PacksStopped(Exception):
    """A stop reached the pack processes; each saved its checkpoint."""

    def __init__(self, count: int) -> None:
        super().__init__(f"stopped on request ({count} pack process(es) saved their checkpoints)")


class PackProcessFailed(Exception):
    """A pack process ended with an error (its own lines say which); `code` is its exit code."""

    def __init__(self, code: int, pack: Path) -> None:
        super().__init__(f"the pack in {pack} ended with exit code {code} (its lines above say why)")
        self.code = code


def run_members(
    members: Iterable[Member],
    stop: StopFlag | None = None,
    log: Callable[[str], Any] = print,
    retry_failed: bool = False,
    pack: str = "auto",
    max_pack: int | None = None,
    workers: int = 1,
    gpus: list[str] | None = None,
) -> dict[str, int]:
    """Train what is left of `members`, in packs of up to `max_pack` by `workers` processes at once
    (with `gpus`, one GPU each); return how many were trained, skipped, failed or in use."""
    members = list(members)
    counts = {"trained": 0, "skipped": 0, "failed": 0, "in use": 0}
    todo = []
    for member in members:
        state = member_state(member.run_dir)
        if state == "done" or (state == "failed" and not retry_failed):
            counts["skipped"] += 1
        elif state == "running":
            counts["in use"] += 1
            log(f"member {member.id}: being trained elsewhere; skipped")
        else:
            todo.append(member)
    if pack == "off":
        planned = [[m] for m in todo]
    else:  # packs that were stopped part-way go on as they were; the other members are planned anew
        planned = [] if retry_failed else resumable(members, todo)  # a retry starts failed members anew
        started = {m.id for group in planned for m in group}
        planned += packs.plan([m for m in todo if m.id not in started], workers, max_pack)
    if len(planned) > 1 and workers > 1 and pack != "off":
        _in_processes(planned, workers, stop, log, gpus or [])
    else:
        for group in planned:
            _train(group, stop, log)
    for member in todo:
        state = member_state(member.run_dir)
        counts[{"done": "trained", "failed": "failed", "running": "in use"}.get(state, "failed")] += 1
    return counts


def resumable(members: Iterable[Member], todo: list[Member]) -> list[list[Member]]:
    """The sweep's packs that have a checkpoint and members still to train, with all their members
    (those that failed in them come back frozen from the checkpoint): the same members find it again."""
    from mnist_dist.store.checkpoint import candidates

    by_id = {m.id: m for m in members}
    left = {m.id for m in todo}
    found = []
    sweeps = {SweepDir.of_member(m.run_dir) for m in todo}
    for where in sorted(p for sweep in sweeps for p in sweep.pack_dirs()):
        try:
            ids = [c.sweep.member if c.sweep else "" for c in read_pack(where)]
        except UserError:
            continue
        if len(ids) > 1 and set(ids) <= by_id.keys() and left & set(ids) and candidates(where):
            found.append([by_id[i] for i in ids])
            left -= set(ids)
    return found


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


def _train(group: list[Member], stop: StopFlag | None, log: Callable[[str], Any]) -> None:
    """One pack in this process."""
    from mnist_dist.train.run import run_pack  # torch: once the members are known good

    one = len(group) == 1
    log(
        f"member {group[0].id}: {_describe(group[0].params)}"
        if one
        else f"pack of {len(group)}: " + " ".join(m.id for m in group)
    )
    cfgs = [m.cfg for m in group]
    try:
        _, failures = run_pack(cfgs, home(cfgs, None if one else write_pack(group)), stop=stop)
    except UserError as e:  # another writer took it between the check and the run, a bad checkpoint
        log(f"{' '.join(m.id for m in group)}: {e}")
        return
    for member, why in zip(group, failures, strict=True):
        if why is not None:
            log(f"member {member.id} failed: training diverged: {why}")


def home(cfgs: list[TrainConfig], pack_dir: Path | None) -> Path:
    """Where a pack's checkpoints go: its pack dir; a pack of one's in its member's run dir, as its own
    run's (so `mnist-dist train` of the member's config resumes it)."""
    return cfgs[0].run_dir() if len(cfgs) == 1 or pack_dir is None else pack_dir


def write_pack(group: list[Member]) -> Path:
    """The pack's dir, with members.json: the configs its pack process trains."""
    from mnist_dist.store.atomic import write_atomic
    from mnist_dist.store.ownership import private_dir

    where = SweepDir.of_member(group[0].run_dir).pack(m.id for m in group)
    private_dir(where.parent, "sweep dir")
    private_dir(where, "pack dir")
    configs = [m.cfg.model_dump(mode="json") for m in group]
    write_atomic(where / SweepDir.PACK_MEMBERS, json.dumps(configs, indent=1) + "\n")
    return where


def read_pack(where: Path) -> list[TrainConfig]:
    try:
        raw = json.loads((where / SweepDir.PACK_MEMBERS).read_text())
        return [TrainConfig.model_validate(c) for c in raw]
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{where} is not a pack dir ({SweepDir.PACK_MEMBERS}: {e})".splitlines()[0]) from None


def _in_processes(
    planned: list[list[Member]], workers: int, stop: StopFlag | None, log: Callable, gpus: list[str]
) -> None:
    """The packs as `workers` processes at a time (each on its own GPU when there are `gpus`); a stop
    is passed on to them (SIGUSR2)."""
    waiting = [write_pack(group) for group in planned]
    running: dict[Path, tuple[subprocess.Popen, int]] = {}
    free = list(range(workers))
    stopped, failure = 0, None
    while waiting or running:
        asked = stop is not None and stop.requested
        while waiting and len(running) < workers and not asked and failure is None:
            where, slot = waiting.pop(0), free.pop(0)
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpus[slot]} if gpus else None
            on = f" on GPU {gpus[slot]}" if gpus else ""
            log(f"pack {where.name}: {len(read_pack(where))} members, a process of its own{on}")
            command = [sys.executable, "-m", "mnist_dist.sweep.pack_process", str(where)]
            running[where] = (subprocess.Popen(command, env=env), slot)
        for where, (proc, slot) in list(running.items()):
            if asked:
                proc.send_signal(signal.SIGUSR2)
            code = proc.poll()
            if code is None:
                continue
            del running[where]
            free.append(slot)
            if code == ExitCode.STOPPED:
                stopped += 1
            elif code == ExitCode.INTERRUPTED:
                raise KeyboardInterrupt
            elif code != 0 and failure is None:
                failure = PackProcessFailed(code, where)
        if asked and not running:
            break
        time.sleep(0.1)
    if failure is not None:
        raise failure
    if stopped or (stop is not None and stop.requested):
        raise PacksStopped(stopped)


def _describe(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())
