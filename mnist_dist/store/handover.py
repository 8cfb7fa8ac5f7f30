"""A member that moves from one pack to another at a band (sweep/barrier.py balances the packs):
what the giving pack hands over, in the member's own run dir.

    RUN_DIR/handover/band-0003.safetensors   its weights after epoch 3 (MnistModel's layout)
    RUN_DIR/handover/band-0003.json          who gave it to whom, its history, tracker run and config

The json is written last, atomically: once it is there the weights are whole. A member's whole state
at an epoch's end is these: plain SGD keeps no state (an optimizer that does keeps its members:
Engine.can_move), and its data order is a function of its seed and the epoch. The files stay, so
that a rerun after a kill finds the same move again: the giver knows the member is no longer its
own, the receiver takes it from here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mnist_dist.errors import BandTimeout
from mnist_dist.store.atomic import write_atomic


def folder(run_dir: Path) -> Path:
    return run_dir / "handover"


def _paths(run_dir: Path, band: int) -> tuple[Path, Path]:
    base = folder(run_dir) / f"band-{band:04d}"
    return base.with_suffix(".safetensors"), base.with_suffix(".json")


def write(run_dir: Path, band: int, weights: dict[str, Any], record: dict[str, Any]) -> None:
    """Hand the member over: its weights after `band`, then `record` (the json that completes it)."""
    from safetensors.torch import save_file

    tensors, meta = _paths(run_dir, band)
    folder(run_dir).mkdir(mode=0o700, exist_ok=True)
    tmp = tensors.with_suffix(f".tmp-{os.getpid()}")
    save_file({k: v.detach().contiguous().clone() for k, v in weights.items()}, str(tmp))
    tmp.replace(tensors)
    write_atomic(meta, json.dumps({**record, "band": band}, indent=1) + "\n")


def record(run_dir: Path, band: int) -> dict[str, Any] | None:
    """The record of the member's handover at `band`, if there is one."""
    try:
        return json.loads(_paths(run_dir, band)[1].read_text())
    except (OSError, ValueError):
        return None


def read(run_dir: Path, band: int, giver: Path, to: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(record, weights) of the member's handover at `band` by the pack in `giver` to the one in `to`,
    or None while there is none (another is an earlier run's, before the packs were planned anew)."""
    from safetensors.torch import load_file

    found = record(run_dir, band)
    if found is None or (found.get("from"), found.get("to")) != (str(giver), str(to)):
        return None
    return found, load_file(str(_paths(run_dir, band)[0]))


def wait(
    run_dir: Path, band: int, giver: Path, to: Path, timeout: float, gone: Callable[[], bool]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The handover at `band` by `giver` to `to`, once it is there; BandTimeout after `timeout`
    seconds, or once the giver is `gone` (ended) without it: it resumes from its checkpoint and gives
    it then."""
    deadline = time.monotonic() + timeout
    while True:
        found = read(run_dir, band, giver, to)
        if found is not None:
            return found
        ended = gone()
        if ended or time.monotonic() > deadline:
            found = read(run_dir, band, giver, to)  # written just before it ended
            if found is not None:
                return found
            why = "ended without handing it over" if ended else f"did not hand it over in {timeout:g} s"
            raise BandTimeout(f"member {run_dir.name} at band {band}: its pack {why}; run the sweep again")
        time.sleep(0.02)


def _records(run_dir: Path) -> list[dict[str, Any]]:
    """The records of every handover of the member, band by band (unreadable ones left out)."""
    out = []
    for meta in sorted(folder(run_dir).glob("band-*.json")):
        with contextlib.suppress(OSError, ValueError):
            out.append(json.loads(meta.read_text()))
    return out


def given_by(run_dir: Path, home: Path, after_epoch: int) -> dict[str, Any] | None:
    """The handover of this member by the pack in `home` at a band after `after_epoch`: the member
    moved on from that pack after its checkpoint was saved."""
    found = (r for r in _records(run_dir) if r.get("from") == str(home) and r.get("band", 0) > after_epoch)
    return next(found, None)


def clear(run_dir: Path) -> None:
    """The member starts over: the moves it made between packs before are void."""
    shutil.rmtree(folder(run_dir), ignore_errors=True)


def owner(run_dir: Path) -> str | None:
    """The home of the pack the member moved to last, or None if it never moved: the pack that
    trains it on (its checkpoint holds it, or it takes it from here again)."""
    found = moves(run_dir)
    return found[-1]["to"] if found else None


def moves(run_dir: Path) -> list[dict[str, Any]]:
    """Each move of the member between packs, in order: after_epoch, from, to (for run.json)."""
    return [{"after_epoch": r["band"], "from": r["from"], "to": r["to"]} for r in _records(run_dir)]
