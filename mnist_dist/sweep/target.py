"""A sweep's `metric.target`: "the sweep will finish once any run achieves this value" (W&B's schema).
As W&B does it: members already training go on to their end, no new member starts (no pack that has
not started, no next bayes round), and a rerun of a finished sweep trains nothing more.

A member achieves the target when the metric after one of its epochs so far (done or still
training) is at least the target for `goal: maximize`, at most for `minimize`: the value bayes
conditions on too (the engine takes each run's best). W&B's documentation does not say which value
its server compares, nor with > or >=. The engine does not hold this rule (W&B's server applies it,
in code that is not public), so it is here; it reads the members' run dirs only, so every runner of a
sweep, the tasks of its array and `sweep status` see the same.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mnist_dist.errors import UserError
from mnist_dist.sweep.layout import SweepDir
from mnist_dist.sweep.state import recorded_state

SIGNS = {"maximize": ">=", "minimize": "<="}  # what achieving the target means


def curve(run_dir: Path, metric: str, done_only: bool = True) -> list[float]:
    """The metric after each trained epoch (epoch 0's evaluation left out): of a finished member, or
    (done_only=False) of any member as far as it got; empty for one that failed."""
    from mnist_dist.store.outputs import read_entries

    state = recorded_state(run_dir)
    if state == "failed" or (done_only and state != "done"):
        return []
    try:
        entries = read_entries(run_dir) or []
    except UserError:  # a damaged metrics.jsonl: no value to judge by
        return []
    values = []
    for entry in entries:
        if entry.get("phase") is not None:
            with contextlib.suppress(TypeError, ValueError):  # a damaged value: no value
                values.append(float(entry[metric]))
    return values


@dataclass(frozen=True)
class Reached:
    member: str
    value: float
    metric: str
    goal: str
    target: float

    def says(self) -> str:
        return (
            f"target {self.metric} {SIGNS[self.goal]} {self.target:g} reached by member {self.member} "
            f"({self.value:.4f})"
        )

    def __str__(self) -> str:
        return f"{self.says()}: no new members start"


def achieves(value: float, goal: str, target: float) -> bool:
    return math.isfinite(value) and (value >= target if goal == "maximize" else value <= target)


def reached(root: Path, manifest: dict[str, Any] | None = None) -> Reached | None:
    """The first member (in the manifest's order) with an epoch that achieves the sweep's target, and
    its best value; None when the sweep has no target or no member achieved it."""
    from mnist_dist.sweep.spec import read_manifest

    manifest = manifest or read_manifest(root)
    metric = manifest.get("metric") or {}
    target = metric.get("target")
    if target is None:
        return None
    for m in manifest["members"]:
        values = curve(SweepDir(root).member(m["id"]), metric["name"], done_only=False)
        hits = [v for v in values if achieves(v, metric["goal"], target)]
        if hits:
            best = max(hits) if metric["goal"] == "maximize" else min(hits)
            return Reached(m["id"], best, metric["name"], metric["goal"], float(target))
    return None
