"""Checkpoints under RUN_DIR/checkpoints: written atomically, verified before use, kept to the last K.

A checkpoint is the folder Accelerate's save_state writes (weights as safetensors, optimizer and
per-process RNG states, loaded back with weights_only=True) plus progress.json: where training stands
(epoch, step within it), the history so far, the tracker's run id, the config and its fingerprint,
and the SHA-256 of every file. It is written under a temporary name and renamed into place, so a
kill during a save never leaves a folder that resume would take. A pack's checkpoint (in its pack
dir) holds every member's weights and, in `members`, each member's history, tracker run id and
failure.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mnist_dist.config import TrainConfig
from mnist_dist.errors import UserError
from mnist_dist.stopping import ResumePoint

PROGRESS = "progress.json"
SELF_HASH = "progress_sha256"
NAME = re.compile(r"^epoch-(\d{4})(?:-step-(\d{6}))?$")


@dataclass
class Progress:
    """Where training stands: `epochs_done` whole epochs, then `step` steps into the next one, whose
    step losses so far sum to `loss_sum` (the two are the next epoch's ResumePoint)."""

    epochs_done: int
    step: int = 0
    loss_sum: float | list[float] = 0.0  # a pack: one per member
    history: list[dict[str, Any]] = field(default_factory=list)
    tracker_run_id: str | None = None
    fingerprint: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    train_seconds: float = 0.0  # training time spent before this checkpoint
    segments: list[dict[str, Any]] = field(default_factory=list)  # the runs that trained so far
    members: list[dict[str, Any]] = field(
        default_factory=list
    )  # a pack's: id, history, tracker_run_id, failure
    files: dict[str, str] = field(default_factory=dict)

    @property
    def resume_at(self) -> ResumePoint:
        return ResumePoint(self.step, self.loss_sum)

    def stand_at(self, epochs_done: int, at: ResumePoint = ResumePoint()) -> None:
        self.epochs_done, self.step, self.loss_sum = epochs_done, at.step, at.loss_sum

    @property
    def name(self) -> str:
        base = f"epoch-{self.epochs_done:04d}"
        return f"{base}-step-{self.step:06d}" if self.step else base


def folder(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def seal(tmp: Path, progress: Progress) -> None:
    """Record every file's hash in progress.json (main process, after every process has written)."""
    progress.files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name != PROGRESS}
    fields = asdict(progress)
    # progress.json seals itself too: an edited position or history is refused like an altered file.
    fields[SELF_HASH] = _digest(fields)
    (tmp / PROGRESS).write_text(json.dumps(fields, indent=1) + "\n")


def _digest(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def publish(tmp: Path, run_dir: Path, progress: Progress, keep: int) -> Path:
    """Rename the sealed temporary folder into place, then drop all but the newest `keep`."""
    target = folder(run_dir) / progress.name
    if target.exists():  # the same point written again (a resumed run passing it): replace
        shutil.rmtree(target)
    tmp.rename(target)
    for old in candidates(run_dir)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def temporary(run_dir: Path, progress: Progress) -> Path:
    return folder(run_dir) / f".tmp-{progress.name}"


def clear_temporaries(run_dir: Path) -> None:
    for tmp in folder(run_dir).glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def candidates(run_dir: Path) -> list[Path]:
    """Published checkpoints, newest first."""
    found = []
    for p in folder(run_dir).glob("epoch-*"):
        m = NAME.match(p.name)
        if m and p.is_dir():
            found.append(((int(m.group(1)), int(m.group(2) or 0)), p))
    return [p for _, p in sorted(found, reverse=True)]


def newest_sound(run_dir: Path) -> Path | None:
    """The checkpoint a resume would take now, or None."""
    for path in candidates(run_dir):
        try:
            read(path)
        except UserError:
            continue
        return path
    return None


def read(path: Path) -> Progress:
    """The progress of a checkpoint whose files all match their recorded hashes; else UserError."""
    meta = path / PROGRESS
    try:
        fields = json.loads(meta.read_text())
        sealed = fields.pop(SELF_HASH, None)  # None: written before 2026-11-28, not self-sealed
        altered = sealed is not None and sealed != _digest(fields)
        if "step_losses_sum" in fields:  # what checkpoints written before 2026-11-28 call it
            fields["loss_sum"] = fields.pop("step_losses_sum")
        progress = Progress(**fields)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise UserError(f"checkpoint {path} has no readable {PROGRESS} ({e})") from None
    if altered:
        raise UserError(f"checkpoint {path} is corrupt: {PROGRESS} is altered")
    if not progress.files:
        raise UserError(f"checkpoint {path} lists no files")
    for name, digest in progress.files.items():
        file = path / name
        if not file.is_file() or _sha256(file) != digest:
            raise UserError(f"checkpoint {path} is corrupt: {name} is missing or altered")
    return progress


def member_parts(progress: Progress, members: int) -> list[dict[str, Any]]:
    """Each member's history, tracker run id and failure: a single run's are the top-level fields."""
    if members > 1:
        return progress.members or [{"history": []} for _ in range(members)]
    return [{"history": progress.history, "tracker_run_id": progress.tracker_run_id}]


def set_member_parts(progress: Progress, parts: list[dict[str, Any]]) -> None:
    if len(parts) > 1:
        progress.members = parts
    else:
        progress.history, progress.tracker_run_id = parts[0]["history"], parts[0]["tracker_run_id"]


def check_matches(progress: Progress, cfgs: list[TrainConfig], fingerprint: str, path: Path) -> None:
    """UserError unless the checkpoint was written by configs that decide the same numbers."""
    if progress.fingerprint == fingerprint:
        return
    if len(cfgs) > 1:
        raise UserError(
            f"pack checkpoint {path} was written for other members; remove the pack dir {path.parent.parent} "
            "to start these members over"
        )
    cfg = cfgs[0]
    try:  # a checkpoint written when the fingerprint covered more keys (checkpoint cadence, requeues)
        if TrainConfig.model_validate(progress.config).fingerprint() == cfg.fingerprint():
            return
    except ValueError:
        pass
    old, new = progress.config, cfg.model_dump(mode="json")
    keys = ["seed", "phases", "batch_size", "val_batch_size", "grad_accum", "precision", "model", "data"]
    changed = [k for k in keys if old.get(k) != new.get(k)] or ["(settings)"]
    raise UserError(
        f"checkpoint {path} was written by a different config ({', '.join(changed)} changed); "
        "train into a new --output-dir, use --resume never to start over, or --force to resume anyway"
    )


def choose(run_dir: Path, resume: str, log: Any = print) -> tuple[Path, Progress] | None:
    """The checkpoint to resume from: `never` none, `auto` the newest sound one, else the given path.

    A corrupt newest checkpoint is skipped with a warning; an explicitly named one is an error.
    """
    if resume == "never":
        return None
    if resume != "auto":
        path = Path(resume)
        if folder(path).is_dir():  # a run directory: its newest checkpoint
            found = candidates(path)
            if not found:
                raise UserError(f"--resume {resume}: no checkpoint in {folder(path)}")
            path = found[0]
        if not path.is_dir():
            raise UserError(f"--resume {resume}: no such checkpoint folder")
        return path, read(path)
    for path in candidates(run_dir):
        try:
            return path, read(path)
        except UserError as e:
            log(f"warning: {e}; trying the previous checkpoint")
    return None


def starting_point(
    cfgs: list[TrainConfig],
    fingerprint: str,
    run_dir: Path,
    resume: str,
    force: bool,
    is_main: bool,
    log: Callable[..., None],
) -> tuple[Path | None, Progress]:
    """The checkpoint to resume from (None: start over) and the progress the run (a single run, or
    a pack whose checkpoints are in `run_dir`) starts with."""
    config = cfgs[0].model_dump(mode="json") if len(cfgs) == 1 else {"members": [c.name for c in cfgs]}
    progress = Progress(epochs_done=0, fingerprint=fingerprint, config=config)
    if resume == "never" and is_main:
        shutil.rmtree(folder(run_dir), ignore_errors=True)
    chosen = choose(run_dir, resume, log=log)
    if chosen is None:
        return None, progress
    path, found = chosen
    if not force:
        check_matches(found, cfgs, fingerprint, path)
    # Its position, history, time and run id; the fingerprint and config of this run (they differ
    # only under --force).
    return path, dataclasses.replace(found, fingerprint=progress.fingerprint, config=progress.config)
