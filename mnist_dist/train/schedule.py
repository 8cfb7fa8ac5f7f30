"""The phases as stretches of epochs: what is left to train from where a checkpoint stands."""

from __future__ import annotations

import dataclasses

from mnist_dist.config import TrainConfig
from mnist_dist.store import checkpoint
from mnist_dist.store.checkpoint import ResumePoint


@dataclasses.dataclass(frozen=True)
class Stretch:
    """Epochs still to train in one phase: `epochs` from `first_epoch` at `lrs` (one per member), the
    first of them entered at `resume_at`."""

    phase: int
    lrs: tuple[float, ...]
    first_epoch: int
    epochs: int
    resume_at: ResumePoint = dataclasses.field(default_factory=ResumePoint)


def remaining(cfgs: list[TrainConfig], progress: checkpoint.Progress) -> list[Stretch]:
    """What is left to train: from the first epoch not done (part-way through it after a mid-epoch
    stop) to the end of the last phase. Empty when the run is complete. The members of a pack have
    the same epochs in every phase (packs.py)."""
    stretches, epoch, next_epoch = [], 1, progress.epochs_done + 1
    for index, phase in enumerate(cfgs[0].phases):
        last = epoch + phase.epochs - 1
        first = max(epoch, next_epoch)
        if first <= last:
            at = progress.resume_at if first == next_epoch else ResumePoint()
            lrs = tuple(cfg.phases[index].lr for cfg in cfgs)
            stretches.append(Stretch(index, lrs, first, last - first + 1, at))
        epoch = last + 1
    return stretches
