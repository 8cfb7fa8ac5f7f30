"""Early termination inside packs: W&B's hyperband rule, by W&B's engine (`sweeps.stop_runs`), at the
epochs that are its bands.

What the rule sees is what W&B would see from these runs: each member's metric as logged every epoch,
epoch 0's evaluation included, so the engine's band b (0.2.0 takes the value at index b of the
history) is the value after training epoch b. Every member of the sweep with a history counts: this
pack's, the other packs' (their values at the band, from the band files of the barrier), finished
and terminated ones (their run dirs). Each history is cut at the band's epoch, so a decision is the
same whenever it is taken: a member of another pack that is further on adds nothing to it.

`strict` (W&B's current key; 0.2.0, the pinned engine, ignores it): false, the default of W&B's docs,
stops a member whose best value so far is worse than the band's threshold (the engine's own rule);
true compares the value at the band itself with the engine's threshold, as wandb/sweeps main does.

Decisions are taken per pack at each band it reaches: only its own members are `running` to the
engine. Locally the packs of one wave meet at every band first (barrier.py), so every decision rests
on the same values whatever the timing, and a rerun takes the same decisions.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

MAX_BANDS = 100  # as many as 0.2.0 makes for min_iter


def bands(early_terminate: dict[str, Any]) -> list[int]:
    """The epochs at which hyperband judges, as the engine computes them (its code, restated so that a
    sweep can be checked without training): min_iter * eta^k, or max_iter / eta^k for k = 1..s."""
    eta = early_terminate.get("eta", 3)
    if "max_iter" in early_terminate:
        out, band = [], float(early_terminate["max_iter"])
        for _ in range(early_terminate.get("s", 0)):
            band /= eta
            if band < 1:
                break
            out.append(int(band))
        return sorted(out)
    band, out = early_terminate.get("min_iter", 1), []
    for _ in range(MAX_BANDS):
        out.append(int(band))
        band *= eta
    return out


def reachable(early_terminate: dict[str, Any], epochs: int) -> list[int]:
    """The bands a member of `epochs` training epochs reaches before its last epoch (a band at the last
    epoch stops nothing: the member is done there)."""
    return sorted({b for b in bands(early_terminate) if 1 <= b < epochs})


@dataclass(frozen=True)
class Decision:
    """A member stopped at `band` (an epoch): its `value` (the best so far, or with strict the value at
    the band) is worse than `threshold`, from `values`: every member's value at that band, best first."""

    band: int
    threshold: float
    value: float
    values: tuple[float, ...]

    def record(self) -> dict[str, Any]:
        """What run.json and the W&B summary say of it: the decision and the values it used."""
        return {
            "rule": "hyperband",
            "band": self.band,
            "epoch": self.band,
            "value": self.value,
            "threshold": self.threshold,
            "members_at_band": len(self.values),
            "values_at_band": list(self.values),
        }


def decide(
    early_terminate: dict[str, Any],
    metric: dict[str, Any],
    band: int,
    running: dict[str, list[float]],
    others: Iterable[list[float]],
) -> dict[str, Decision]:
    """Which of the `running` members (id: the metric at epochs 0, 1, ...) stop at `band`, judged with
    every history in `others` (the sweep's other members), all cut after epoch `band`."""
    from mnist_dist.sweep.engine import load_engine

    load_engine()
    from sweeps import RunState, SweepRun, stop_runs

    name, maximize = metric["name"], metric.get("goal", "maximize") == "maximize"
    cut = band + 1

    def run(run_name: str, values: list[float], state: Any) -> Any:
        history = [{name: v} for v in values[:cut]]
        return SweepRun(name=run_name, state=state, sampledHistory=history)

    runs = [run(mid, values, RunState.running) for mid, values in running.items()]
    runs += [run(f"other-{i}", values, RunState.finished) for i, values in enumerate(others)]
    config = {
        "method": "grid",
        "metric": {"name": name, "goal": metric.get("goal", "maximize")},
        "early_terminate": {k: v for k, v in early_terminate.items() if k != "strict"},
        "parameters": {"x": {"value": 0}},
    }
    with _quiet():
        stopped = {r.name for r in stop_runs(config, runs)}
    sign = -1.0 if maximize else 1.0
    at_band = tuple(
        sorted((r.history[band][name] for r in runs if len(r.history) > band), key=lambda v: sign * v)
    )
    out = {}
    for r in runs:
        if r.state != RunState.running or len(r.history) <= band:
            continue
        info = r.early_terminate_info or {}
        threshold = dict(zip(info.get("bands", []), info.get("thresholds", []), strict=False)).get(band)
        if threshold is None:
            continue
        mine = [sign * h[name] for h in r.history]  # the engine's way: smaller is better
        value = mine[band] if early_terminate.get("strict") else min(mine)
        stop = value > threshold if early_terminate.get("strict") else r.name in stopped
        if stop:
            out[r.name] = Decision(band, sign * float(threshold), sign * float(value), at_band)
    return out


@contextlib.contextmanager
def _quiet() -> Any:
    """The engine without its import warnings and log lines."""
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.getLogger().setLevel(quiet)
