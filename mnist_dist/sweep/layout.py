"""The sweep directory, known here only:

SWEEP_DIR/sweep.json                  the manifest: the spec, each member's id and swept values
SWEEP_DIR/members/<id>/               each member's run dir: history.json, run.json, checkpoints...
SWEEP_DIR/packs/pack-<digest>/        a pack's members.json (their configs) and its checkpoints
SWEEP_DIR/results.json, results.csv   the table of the members (sweep results)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SweepDir:
    root: Path

    MANIFEST = "sweep.json"
    PACK_MEMBERS = "members.json"

    @classmethod
    def of_member(cls, run_dir: Path) -> SweepDir:
        """The sweep a member's run dir (SWEEP_DIR/members/<id>) belongs to."""
        return cls(run_dir.parent.parent)

    @property
    def manifest(self) -> Path:
        return self.root / self.MANIFEST

    @property
    def members(self) -> Path:
        return self.root / "members"

    def member(self, member_id: str) -> Path:
        return self.members / member_id

    @property
    def packs(self) -> Path:
        return self.root / "packs"

    def pack(self, member_ids: Iterable[str]) -> Path:
        """A pack's dir, named by its members: the same members find their checkpoints again."""
        digest = hashlib.sha256(" ".join(member_ids).encode()).hexdigest()[:10]
        return self.packs / f"pack-{digest}"

    def pack_dirs(self) -> list[Path]:
        return sorted(self.packs.glob("pack-*"))

    @property
    def results(self) -> tuple[Path, Path]:
        """results.json and results.csv."""
        return self.root / "results.json", self.root / "results.csv"
