"""What a run prints as it goes (main process only): the resolved config, where it trains, each epoch
and the end. A run of one member prints the tutorial's line for every epoch; a run of many prints one
line an epoch for all of them (64 members' lines each epoch would bury everything else)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from mnist_dist.config import TrainConfig
from mnist_dist.store.outputs import format_entry


class Console:
    def __init__(self, say: Callable[..., None], home: Path, cfgs: list[TrainConfig]) -> None:
        self.say, self.home, self.cfgs = say, home, cfgs
        self.each = len(cfgs) == 1  # the tutorial's own lines: one member's

    def config(self) -> None:
        cfg, n = self.cfgs[0], len(self.cfgs)
        title = cfg.name if self.each else f"pack of {n} members, the first {cfg.name}"
        self.say(f"mnist-dist {title}: resolved config\n{cfg.to_yaml().rstrip()}")

    def where(self, facts: dict[str, Any]) -> None:
        threads = facts["threads"]
        place = f"run dir {self.home}" if self.each else f"{len(self.cfgs)} members, pack dir {self.home}"
        self.say(
            f"{facts['world_size']} process(es) on {facts['device']}, precision {facts['precision']}, "
            f"{threads['count']} CPU thread(s) each ({threads['source']}), {place}"
        )

    def epoch(self, epoch: int, histories: list[list[dict[str, Any]]], failed: int) -> None:
        """After epoch `epoch` (0: the evaluation before training): the histories of the live members."""
        live = [h[-1] for h in histories if h and h[-1]["epoch"] == epoch]
        if not live:
            return
        if self.each:
            self.say(format_entry(live[0], len(self.cfgs[0].phases)))
            return
        accs = [e["val_acc"] for e in live]
        span = f"val_acc {min(accs):.4f} .. {max(accs):.4f}"
        self.say(
            f"{self.home.name}: Epoch [{epoch}], {len(live)} members, {span}"
            + (f", {failed} failed" if failed else "")
            + (f"  ({live[0]['seconds']:.2f}s)" if epoch else "  (before training)")
        )

    def done(self, seconds: float, finished: list[list[dict[str, Any]]]) -> None:
        if not finished:
            return
        if self.each:
            acc = finished[0][-1]["val_acc"]
            self.say(f"done in {seconds:.2f}s of training; final val_acc {acc:.4f}; run dir {self.home}")
        else:
            n = len(self.cfgs)
            self.say(f"{self.home.name}: done in {seconds:.2f}s of training: {len(finished)} of {n} members")
