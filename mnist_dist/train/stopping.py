"""Stopping at a step boundary and entering an epoch mid-way: the stop flag that signals set, the
exception that carries where training stopped, and the resume point that names where it goes on.

A signal handler only sets the flag (saving from inside a handler could interrupt a half-done step);
the engine polls it between steps, all processes agree and raise Preempted at the same step, and the
run saves a checkpoint of that point before it ends. Used by `mnist-dist train` (Ctrl-C aside) and by
every task of a SLURM job.
"""

from __future__ import annotations

import signal
from typing import Any

from mnist_dist.store.checkpoint import ResumePoint


class Preempted(Exception):
    """Training stopped at a step boundary because a stop was requested (SIGUSR2/SIGTERM, drill)."""

    def __init__(self, epoch: int, at: ResumePoint) -> None:
        super().__init__(f"stopped in epoch {epoch} before step {at.step}")
        self.epoch, self.at = epoch, at


class StopFlag:
    """Set from a signal handler, or at a chosen (epoch, step) for the preemption drill. With several
    processes the engine all-reduces it every `every` steps, so all of them stop at the same step."""

    def __init__(self, every: int, at: tuple[int, int] | None = None) -> None:
        self.every = every
        self.requested = False
        self.interrupted = False  # the stop came from Ctrl-C (SIGINT)
        self.at = at

    def request(self, *_: Any) -> None:
        self.requested = True

    def interrupt(self, *_: Any) -> None:
        """Ctrl-C: the first is a stop (a checkpoint is saved), a second one ends at once."""
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = self.requested = True

    def poll(self, epoch: int, step: int) -> bool:
        if self.at is not None and (epoch, step) >= self.at:
            self.requested = True
        return self.requested


def stop_on_signals(stop: StopFlag, ctrl_c: bool = False) -> Any:
    """Route SIGUSR2 (Slurm's warning before the time limit, and preemption) and SIGTERM to the flag,
    and with `ctrl_c` SIGINT too (StopFlag.interrupt: a sweep's packs save on the first Ctrl-C);
    return the SIGUSR2 handler that was installed before (submitit's requeue, in a SLURM task)."""
    previous = signal.getsignal(signal.SIGUSR2)
    signal.signal(signal.SIGUSR2, stop.request)
    signal.signal(signal.SIGTERM, stop.request)
    if ctrl_c:
        signal.signal(signal.SIGINT, stop.interrupt)
    return previous
