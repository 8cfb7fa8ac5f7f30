"""Which members of a sweep train together as one stacked model (a pack), and how many fit.

The rule: members pack together when their configs differ only in `seed`, in the lr of each phase
and in their optimizer's hyperparameters (momentum, Nesterov, weight decay, betas, eps; not in the
optimizer itself: SGD, Adam or AdamW): the same model size, batch sizes, accumulation, validation
split, data, number of epochs in each phase, precision, device, threads, checkpoint cadence, tracker
settings. Within a pack,
members of one seed are adjacent, so they share one gathered batch per step (model.MnistPack).

Sizes: a pack holds at most `--max-pack` members, and at most what half of this machine's available
memory holds (member_bytes: weights, gradients, update and checkpoint copies, the optimizer's state
and scratch, one batch's activations; about 0.7 MB for the seed config, 1.2 MB with momentum, 1.6 MB
with Adam), and never more than MAX_PACK. A sweep's members are split into as
many packs as it has worker processes (locally: one per usable CPU; on SLURM: one per array task),
each pack one process with one thread, no communication: how a sweep is packed never changes a
member's numbers (one thread makes a member's arithmetic the same in a pack of any size).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from mnist_dist.config import TrainConfig

MAX_PACK = 1024


class HasConfig(Protocol):
    id: str
    cfg: TrainConfig


def key(cfg: TrainConfig) -> str:
    """What members of one pack share: the config but for where it goes, its seed, its lrs and its
    optimizer's hyperparameters (the optimizer itself, by name, they share)."""
    what = cfg.model_dump(mode="json", exclude={"name", "output_dir", "sweep", "seed", "optimizer"})
    what["phases"] = [p["epochs"] for p in what["phases"]]
    what["optimizer"] = cfg.optimizer.name
    return json.dumps(what, sort_keys=True)


def member_bytes(cfg: TrainConfig) -> int:
    """Memory one member adds to a pack (float32): weights, gradient, update, two checkpoint copies,
    the optimizer's state (with its two checkpoint copies) and scratch (train/member_optimizer.py),
    and the activations of one training and one validation batch."""
    h = cfg.model.hidden_size
    params = 784 * h + h + h * 10 + 10
    activations = cfg.batch_size * (3 * h + 40) + cfg.val_batch_size * (2 * h + 30)
    opt = cfg.optimizer
    state = 2 if opt.name != "sgd" else 1 if opt.momentum else 0
    scratch = 3 if opt.name != "sgd" else 2 if opt.momentum or opt.weight_decay else 0
    return 4 * ((5 + 3 * state + scratch) * params + activations)


def available_bytes() -> int | None:
    """MemAvailable of this machine (Linux), or None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def size_cap(cfg: TrainConfig, max_pack: int | None, available: int | None = None) -> int:
    """The most members one pack takes: --max-pack, half the available memory, MAX_PACK."""
    cap = min(max_pack or MAX_PACK, MAX_PACK)
    free = available if available is not None else available_bytes()
    if free is not None:
        cap = min(cap, max(1, free // 2 // member_bytes(cfg)))
    return cap


def plan(members: Sequence[HasConfig], workers: int = 1, max_pack: int | None = None) -> list[list[Any]]:
    """The packs of `members`: compatible members together, each pack at most the size cap, and at
    least `workers` packs when there are that many members, as even as possible."""
    groups: dict[str, list[HasConfig]] = {}
    for member in members:
        groups.setdefault(key(member.cfg), []).append(member)
    packs = []
    for group in groups.values():
        group.sort(key=lambda m: (m.cfg.seed, m.id))  # one seed's members adjacent: one batch for them
        cap = size_cap(group[0].cfg, max_pack)
        count = max(math.ceil(len(group) / cap), min(workers, len(group)))
        base, extra = divmod(len(group), count)
        start = 0
        for i in range(count):
            size = base + (i < extra)
            packs.append(group[start : start + size])
            start += size
    return packs
