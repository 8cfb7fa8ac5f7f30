"""A sweep's pack dirs, known here only: where a pack's checkpoints go, the members.json its pack
process trains, and which packs go on as they were after a stop (resumable).

SWEEP_DIR/packs/pack-<digest>/members.json   the configs of the pack's members (layout.py)
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from mnist_dist.config import TrainConfig
from mnist_dist.errors import UserError
from mnist_dist.store import handover
from mnist_dist.sweep.layout import SweepDir
from mnist_dist.sweep.spec import Member


def home(cfgs: list[TrainConfig], pack_dir: Path | None) -> Path:
    """Where a pack's checkpoints go: its pack dir; a pack of one's in its member's run dir, as its own
    run's (so `mnist-dist train` of the member's config resumes it)."""
    return cfgs[0].run_dir() if len(cfgs) == 1 or pack_dir is None else pack_dir


def pack_home(group: list[Member]) -> Path:
    """Where `group`'s checkpoints (and band files) go, before its pack dir is written."""
    if len(group) == 1:
        return group[0].run_dir
    return SweepDir.of_member(group[0].run_dir).pack(m.id for m in group)


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


def resumable(members: Iterable[Member], todo: list[Member]) -> list[list[Member]]:
    """The sweep's packs that have a checkpoint and members still to train, with all their members
    (those that failed in them come back frozen from the checkpoint): the same members find it again.
    And those that a member still to train moved to last at a band (barrier.py), checkpoint or not:
    they train it on (from their checkpoint, or from the handover in its run dir)."""
    from mnist_dist.store.checkpoint import candidates

    by_id = {m.id: m for m in members}
    owners = {owner(m) for m in todo} - {None}
    left = {m.id for m in todo}
    found = []
    sweeps = {SweepDir.of_member(m.run_dir) for m in todo}
    for where in sorted(p for sweep in sweeps for p in sweep.pack_dirs()):
        try:
            ids = [c.sweep.member if c.sweep else "" for c in read_pack(where)]
        except UserError:
            continue
        if len(ids) < 2 or not set(ids) <= by_id.keys():
            continue
        if (left & set(ids) and candidates(where)) or str(where) in owners:
            found.append([by_id[i] for i in ids])
            left -= set(ids)
    return found


def owner(member: Member) -> str | None:
    return handover.owner(member.run_dir)


def joined(planned: list[list[Member]], todo: list[Member]) -> set[str]:
    """The members of `todo` that moved at a band into one of the `planned` packs: those train them."""
    homes = {str(pack_home(group)) for group in planned}
    return {m.id for m in todo if owner(m) in homes}
