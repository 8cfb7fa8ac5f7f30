"""Checkpoints under RUN_DIR/checkpoints: written atomically, verified before use, kept to the last K.

A checkpoint is the folder Accelerate's save_state writes (weights as safetensors, optimizer and
per-process RNG states, loaded back with weights_only=True) plus progress.json: where training stands
(epoch, step within it) and, for each member of the run (a single run: one), its history, tracker
run id, failure and config; the fingerprint and the SHA-256 of every file. It is written under a
temporary name and renamed into place, so a kill during a save never leaves a folder that resume
would take. A single run's checkpoints are in its run dir, a pack's in its pack dir.
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
from typing import Any, NotRequired, TypedDict

from mnist_dist.config import TrainConfig
from mnist_dist.errors import UserError
from mnist_dist.store import faults

PROGRESS = "progress.json"
SELF_HASH = "progress_sha256"
NAME = re.compile(r"^epoch-(\d{4})(?:-step-(\d{6}))?$")


@dataclass(frozen=True)
class ResumePoint:
    """Where an epoch is entered: before `step`, with `loss_sums` each member's sum of the per-step
    training losses before it (so the epoch's train_loss comes out as if never interrupted); empty
    at the start of an epoch."""

    step: int = 0
    loss_sums: tuple[float, ...] = ()


class MemberPart(TypedDict):
    """What a checkpoint keeps of each member's run beside its weights."""

    id: str
    history: list[dict[str, Any]]
    tracker_run_id: str | None
    failure: str | None  # why its loss stopped being finite; None while it trains
    terminated: NotRequired[dict[str, Any] | None]  # early termination's decision: it left the pack
    moved: NotRequired[dict[str, Any] | None]  # it went on in another pack: after_epoch, to
    joined: NotRequired[dict[str, Any] | None]  # it came from another pack: after_epoch, from
    config: NotRequired[dict[str, Any]]  # a member that joined: its config (the pack's own are in configs)


@dataclass
class Progress:
    """Where training stands: `epochs_done` whole epochs, then `step` steps into the next one, whose
    step losses so far sum to `loss_sums` (one per member; the two are the next epoch's ResumePoint)."""

    epochs_done: int
    step: int = 0
    loss_sums: list[float] = field(default_factory=list)
    members: list[MemberPart] = field(default_factory=list)
    configs: list[dict[str, Any]] = field(default_factory=list)  # each member's, as saved with the run
    fingerprint: str = ""
    train_seconds: float = 0.0  # training time spent before this checkpoint
    segments: list[dict[str, Any]] = field(default_factory=list)  # the runs that trained so far
    files: dict[str, str] = field(default_factory=dict)

    @property
    def resume_at(self) -> ResumePoint:
        return ResumePoint(self.step, tuple(self.loss_sums))

    def stand_at(self, epochs_done: int, at: ResumePoint = ResumePoint()) -> None:
        self.epochs_done, self.step, self.loss_sums = epochs_done, at.step, list(at.loss_sums)

    @property
    def name(self) -> str:
        base = f"epoch-{self.epochs_done:04d}"
        return f"{base}-step-{self.step:06d}" if self.step else base


class OlderCheckpoint(UserError):
    """A checkpoint in the layout before every run had one (a single run's history at the top)."""


_OLDER_KEYS = {"history", "tracker_run_id", "loss_sum", "step_losses_sum", "config"}


def fingerprint(cfgs: list[TrainConfig]) -> str:
    """The run's: what decides its numbers, member by member."""
    return hashlib.sha256(" ".join(cfg.fingerprint() for cfg in cfgs).encode()).hexdigest()


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


def save(
    run_dir: Path,
    progress: Progress,
    keep: int,
    is_main: bool,
    write_states: Callable[[Path], None],
    barrier: Callable[[], None],
) -> None:
    """Every process writes its states (`write_states`) into a temporary folder; the main process
    seals it and renames it into place. A kill leaves no folder a resume would take; a full disk is
    one WriteFault, and no half checkpoint is left behind."""
    tmp = temporary(run_dir, progress)
    try:
        with faults.writing(tmp):
            if is_main:
                folder(run_dir).mkdir(mode=0o700, exist_ok=True)  # owner only
                clear_temporaries(run_dir)
                tmp.mkdir(mode=0o700)
            barrier()
            write_states(tmp)
            barrier()
            if is_main:
                seal(tmp, progress)
                publish(tmp, run_dir, progress, keep)
    except BaseException:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()


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
        older = isinstance(fields, dict) and bool(_OLDER_KEYS & fields.keys())
        sealed = None if older else fields.pop(SELF_HASH, None)
        progress = None if older else Progress(**fields)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise UserError(f"checkpoint {path} has no readable {PROGRESS} ({e})") from None
    if progress is None:
        raise OlderCheckpoint(
            f"checkpoint {path} was written by an older mnist-dist, whose checkpoints this one does not "
            "read; train into a new --output-dir, or use --resume never to start over"
        )
    if sealed is None:
        raise UserError(f"checkpoint {path} is corrupt: {PROGRESS} is not sealed")
    if sealed != _digest(fields):
        raise UserError(f"checkpoint {path} is corrupt: {PROGRESS} is altered")
    if not progress.files:
        raise UserError(f"checkpoint {path} lists no files")
    for name, digest in progress.files.items():
        file = path / name
        if not file.is_file() or _sha256(file) != digest:
            raise UserError(f"checkpoint {path} is corrupt: {name} is missing or altered")
    return progress


def check_matches(progress: Progress, cfgs: list[TrainConfig], path: Path) -> None:
    """UserError unless the checkpoint was written by configs that decide the same numbers."""
    if progress.fingerprint == fingerprint(cfgs):
        return
    if [m["id"] for m in progress.members] != [member_id(cfg) for cfg in cfgs]:
        raise UserError(
            f"checkpoint {path} was written for other members "
            f"({', '.join(m['id'] for m in progress.members)}); train into a new --output-dir, or "
            f"remove {path.parent} to start these over"
        )
    keys = ["seed", "phases", "batch_size", "val_batch_size", "grad_accum", "precision", "model", "data"]
    news = [cfg.model_dump(mode="json") for cfg in cfgs]
    pairs = list(zip(progress.configs, news, strict=False))
    changed = [k for k in keys if any(old.get(k) != new.get(k) for old, new in pairs)]
    raise UserError(
        f"checkpoint {path} was written by a different config ({', '.join(changed or ['(settings)'])} "
        "changed); train into a new --output-dir, use --resume never to start over, or --force to "
        "resume anyway"
    )


def member_id(cfg: TrainConfig) -> str:
    """A member's name in checkpoints and packs: its sweep member id, or the run's name."""
    return cfg.sweep.member if cfg.sweep else cfg.name


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
        except OlderCheckpoint:
            raise
        except UserError as e:
            log(f"warning: {e}; trying the previous checkpoint")
    return None


def starting_point(
    cfgs: list[TrainConfig], run_dir: Path, resume: str, force: bool, is_main: bool, log: Callable[..., None]
) -> tuple[Path | None, Progress]:
    """The checkpoint to resume from (None: start over) and the progress the run (its checkpoints in
    `run_dir`) starts with."""
    members = [MemberPart(id=member_id(c), history=[], tracker_run_id=None, failure=None) for c in cfgs]
    configs = [cfg.model_dump(mode="json") for cfg in cfgs]
    progress = Progress(epochs_done=0, members=members, configs=configs, fingerprint=fingerprint(cfgs))
    if resume == "never" and is_main:
        shutil.rmtree(folder(run_dir), ignore_errors=True)
    chosen = choose(run_dir, resume, log=log)
    if chosen is None:
        return None, progress
    path, found = chosen
    if not force:
        check_matches(found, cfgs, path)
    # Its position, histories, time and run ids; the fingerprint and configs of this run (they
    # differ only under --force).
    return path, dataclasses.replace(found, fingerprint=progress.fingerprint, configs=configs)
