"""A bayes sweep in rounds of packs. One proposal at a time would leave packs empty, so each round asks
W&B's engine (engine.propose) for `round_size` members, each asked for with the round's earlier
proposals given as running runs (as W&B's controller does), trains the round as packs (local.py),
and the next round conditions on everything finished. `run_cap` bounds the total.

The proposals are kept in sweep.json in order, so a rerun (after a stop, a fault, a kill) trains the
round in progress and goes on from there; and since a proposal is a function of the finished
members' numbers (the same on a CPU, to the bit) and of a seed from the sweep's name and the
proposal's index, the same file proposes the same members in any directory.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mnist_dist.sweep import engine
from mnist_dist.sweep.layout import SweepDir
from mnist_dist.sweep.spec import Member, Spec, read_manifest, write_manifest
from mnist_dist.sweep.state import FINAL, member_state
from mnist_dist.sweep.target import curve, reached

Build = Callable[[list[dict[str, Any]]], list[Member]]
Train = Callable[[list[Member]], dict[str, int]]


def default_round_size(spec: Spec, workers: int) -> int:
    """About four rounds, and at least one member per worker in each."""
    return max(workers, math.ceil((spec.count or 1) / 4))


def next_round(
    spec: Spec, found: list[Member], proposals: list[dict[str, Any]], size: int
) -> list[dict[str, Any]]:
    """The next `size` proposals (fewer at the run cap), given the finished members."""
    params = list(spec.parameters.values())
    # a terminated member counts with its curve so far (as W&B gives a stopped run's history)
    finished = [(m.params, curve(m.run_dir, spec.metric, done_only=False)) for m in found]
    out: list[dict[str, Any]] = []
    for _ in range(max(0, min(size, (spec.count or 0) - len(proposals)))):
        index = len(proposals) + len(out)
        out.append(engine.propose(params, spec.engine_metric, finished, out, spec.name, index))
    return out


def run_rounds(
    spec: Spec, root: Path, build: Build, train: Train, size: int, log: Callable[[str], Any] = print
) -> tuple[list[Member], dict[str, int]]:
    """Train the sweep round by round until run_cap members were proposed and trained; returns the
    members and what this runner did (summed over the rounds)."""
    manifest = read_manifest(root) if SweepDir(root).manifest.is_file() else {}
    proposals: list[dict[str, Any]] = list(manifest.get("proposals", []))
    rounds: list[int] = list(manifest.get("rounds", []))
    totals: Counter[str] = Counter()
    while True:
        found = build(proposals)
        write_manifest(root, spec, found, proposals=proposals, rounds=rounds, run_cap=spec.count)
        left = [m for m in found if member_state(m.run_dir) not in FINAL]
        if left:
            log(f"round {len(rounds)}: {len(left)} member(s) to train")
            totals.update(train(left))
            if any(member_state(m.run_dir) not in FINAL for m in left):
                break  # held elsewhere or stopped: the next run goes on from here
            continue
        finish = reached(root)
        if finish is not None:
            log(str(finish))
            break
        new = next_round(spec, found, proposals, size)
        if not new:
            break
        proposals += new
        rounds.append(len(new))
    return found, dict(totals)
