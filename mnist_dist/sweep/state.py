"""What each member of a sweep is, and claiming the members of a pack before it trains.

A member is one of STATES, read from its run dir (never from a process's memory, so every runner and
`sweep status` see the same):

- pending: never started.
- running: a live run holds its lock (ownership.py), here or on another host.
- done: its run completed (run.json `completed`, history.json written).
- failed: the member itself failed: its loss stopped being finite, or its run raised an error.
  `--retry-failed` trains it again.
- terminated: early termination (the sweep's `early_terminate`, W&B's hyperband) stopped it at a
  band: its run dir holds what a finished run's does, up to that epoch (run.json `terminated`, with
  the decision). `--retry-terminated` trains it again, to the end.
- stopped: it will resume from its checkpoint: a requested stop (SIGTERM, SIGUSR2, Ctrl-C,
  preemption; run.json `preempted`/`interrupted`), a fault of the machine (a full disk, an I/O error)
  or of the sweep's other processes (packs that did not meet at a band; run.json `fault` with the
  cause) or a process that died (run.json still `running`, its lock stale).
  The same command resumes it.

The claim: a runner takes the run dir locks of all of a pack's members at once, or of none, at the
moment the pack starts. Then looking again at the members' states is safe (nobody else writes them),
so a member that another runner finished meanwhile is not trained twice. Two `sweep run`s of one
sweep, or the tasks of an array, share its members this way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

STATES = ("pending", "running", "done", "failed", "terminated", "stopped")
FINAL = ("done", "failed", "terminated")  # recorded ends: no run trains them unless retried


Retry = frozenset[str]  # the recorded ends a runner trains again: {"failed"}, {"terminated"}, both
NO_RETRY: Retry = frozenset()


class HasRunDir(Protocol):
    id: str
    run_dir: Path


def recorded_state(run_dir: Path) -> str:
    """The state run_dir's files record, whoever holds its lock: pending, done, failed, terminated or
    stopped."""
    from mnist_dist.store.outputs import HISTORY, read_status

    status = read_status(run_dir)
    if status is None:
        return "pending"
    if status == "completed" and (run_dir / HISTORY).is_file():
        return "done"
    return status if status in ("failed", "terminated") else "stopped"


def member_state(run_dir: Path) -> str:
    """One of STATES: done, failed or terminated once recorded (such a member's pack may still hold
    its lock while the others train), else `running` while a live run holds the lock, else what the
    files say."""
    from mnist_dist.store.ownership import holder

    recorded = recorded_state(run_dir)
    if recorded in FINAL or holder(run_dir) is None:
        return recorded
    return "running"


def to_train(state: str, retry: Retry) -> bool:
    """Whether a runner trains a member in this state (done ones never; failed or terminated ones
    when `retry` names their state)."""
    return state in ("pending", "stopped") or state in retry


def claim(group: Sequence[HasRunDir], retry: Retry, log: Callable[[str], Any] = print) -> tuple[list, list]:
    """Claim a pack's members: (their locks, []) when this runner holds all of them and none was
    finished meanwhile; else ([], the members still free to train, to be planned again)."""
    from mnist_dist.store.ownership import Held
    from mnist_dist.store.ownership import claim as claim_dirs

    try:
        locks = claim_dirs([m.run_dir for m in group], log)
    except Held:  # another runner holds some: the rest are planned again
        return [], [m for m in group if to_train(member_state(m.run_dir), retry)]
    finished = [m for m in group if recorded_state(m.run_dir) == "done"]
    if not finished:
        return locks, []
    for lock in locks:
        lock.release()
    return [], [m for m in group if m not in finished and to_train(recorded_state(m.run_dir), retry)]
