"""One member of a run (a single run: its only member; a pack's: each): its config, history,
run.json's facts and status, run directory's writer and tracker, and what a checkpoint keeps of it.

Each member's run directory ends up as a single run's would: config.yaml, metrics.jsonl,
history.json, run.json (with the pack it trained in), plots, its own model.safetensors and tracker
run, whether it trained to the end, failed, was stopped by early termination or moved between packs
at a band (early_termination.py).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from mnist_dist.config import TrainConfig
from mnist_dist.store import handover, provenance
from mnist_dist.store.checkpoint import MemberPart, member_id
from mnist_dist.store.faults import WriteFault
from mnist_dist.store.outputs import NullRunDir, RunDir
from mnist_dist.train.engine import Engine

TERMINATED = "terminated"  # run.json's status of a member that early termination stopped


class Member:
    """One member's run: its config, run directory, history, run.json facts and tracker."""

    def __init__(self, cfg: TrainConfig, engine: Engine) -> None:
        self.cfg, self.run_dir, self.id = cfg, cfg.run_dir(), member_id(cfg)
        self.out = RunDir(self.run_dir) if engine.is_main else NullRunDir(self.run_dir)
        self.info: dict[str, Any] = {"name": cfg.name, "status": "running", "start_time": provenance.now()}
        self.tracker = engine.tracker(cfg, self.run_dir)
        self.history: list[dict[str, Any]] = []
        self.failure: str | None = None
        self.terminated: dict[str, Any] | None = None  # early termination's decision
        self.moved: dict[str, Any] | None = None  # it goes on in another pack: after_epoch, to
        self.joined: dict[str, Any] | None = None  # it came from another pack: after_epoch, from
        self.tracker_run_id: str | None = None

    @property
    def trains(self) -> bool:
        """Still training here: neither failed nor terminated nor moved to another pack."""
        return self.failure is None and self.terminated is None and self.moved is None

    @property
    def in_model(self) -> bool:
        """In the engine's model: training, or failed (frozen in it)."""
        return self.terminated is None and self.moved is None

    def restore(self, part: MemberPart) -> None:
        """Where a checkpoint left it: history, tracker run, failure (its run.json says so)."""
        self.history, self.tracker_run_id = list(part["history"]), part["tracker_run_id"]
        self.failure, self.terminated = part["failure"], part.get("terminated")
        self.joined = part.get("joined")
        if part.get("moved"):
            self.move(part["moved"])
        if self.failure is not None:
            self.info["status"] = "failed"
        if self.terminated is not None:
            self.info.update(status=TERMINATED, early_terminate=self.terminated)

    def part(self, pending: list[dict[str, Any]]) -> MemberPart:
        """What a checkpoint keeps of it (with `pending`, this epoch's entry not yet recorded)."""
        history = self.history + pending
        part = MemberPart(
            id=self.id,
            history=history,
            tracker_run_id=self.tracker_run_id,
            failure=self.failure,
            terminated=self.terminated,
            moved=self.moved,
            joined=self.joined,
        )
        if self.joined:
            part["config"] = self.cfg.model_dump(mode="json")
        return part

    def move(self, moved: dict[str, Any]) -> None:
        """It goes on in another pack (`moved`: after_epoch, to), which writes its run dir and tracks
        it from now on; this process writes nothing of it any more."""
        self.moved = moved
        self.tracker.close()
        self.out = NullRunDir(self.run_dir)
        self.info["status"] = "moved"

    def arrive(self, record: dict[str, Any], joined: dict[str, Any], tracker: Any) -> None:
        """It came from another pack (its handover `record`): this process writes its run dir and
        tracks it (the same tracker run, as after a resume) from now on."""
        self.moved, self.joined = None, joined
        self.history, self.tracker_run_id = list(record["history"]), record["tracker_run_id"]
        self.info = {**record["info"], "status": "running"}
        self.out, self.tracker = RunDir(self.run_dir), tracker
        self.out.create(self.history)
        tracking = self.tracker.start(self.tracker_run_id)
        self.tracker_run_id = tracking.get("run_id")
        for entry in self.history:  # what the tracker may have missed: none, unless it just started
            self.tracker.log(entry)

    def record(self, entry: dict[str, Any]) -> None:
        """A history entry made known: appended to metrics.jsonl, logged."""
        self.history.append(entry)
        self.out.append_metrics(entry)
        self.tracker.log(entry)

    def fail(self, why: str) -> None:
        """Its loss stopped being finite: the run ends here, as `failed`, with why."""
        self.failure = why
        self.end("failed", error=f"FloatingPointError: {why}")

    def terminate(self, decision: dict[str, Any], weights: dict[str, Any], seconds: float) -> None:
        """Early termination stopped it after its last recorded epoch: its run ends here with what a
        finished run has (history, weights), run.json and the tracker's summary saying so. Its plots
        wait for the pack's end (RunState.finish): drawing them here would stall the survivors."""
        self.terminated = decision
        self.out.write_history(self.history)
        self.out.save_weights(weights, self.cfg)
        self.tracker.summarize({"early_terminate": decision, "state": TERMINATED})
        self.tracker.close()
        self.info["train_seconds"] = seconds
        self.end(TERMINATED, early_terminate=decision)

    def note_moves(self) -> None:
        """run.json's `moves`: each move between packs at a band (from the handovers in its run dir)."""
        moves = handover.moves(self.run_dir)
        if moves:
            self.info["moves"] = moves

    def end(self, status: str, **facts: Any) -> None:
        self.info.update(status=status, end_time=provenance.now(), **facts)
        self.tracker.end(status)
        self.note_moves()
        if (self.run_dir / "config.yaml").exists():
            with contextlib.suppress(WriteFault):  # the disk that failed may refuse this too
                self.out.write_run_info(self.info)


def pack_sizes(members: list[Member], home: Path, start: int) -> list[dict[str, int]]:
    """A pack's size (in `home`; its first `start` members its own from the start) from its start and
    after each band that changed it: members stopped, moved on, or joined (for run.json)."""
    moves = {id(m): handover.moves(m.run_dir) for m in members}

    def here(index: int, member: Member, band: int) -> bool:
        inside = index < start
        for move in moves[id(member)]:
            if move["after_epoch"] <= band:
                inside = move["to"] == str(home)
        return inside and not (member.terminated and member.terminated["epoch"] <= band)

    bands = {m.terminated["epoch"] for m in members if m.terminated}
    bands |= {move["after_epoch"] for found in moves.values() for move in found}
    return [
        {"after_epoch": b, "members": sum(here(i, m, b) for i, m in enumerate(members))}
        for b in [0, *sorted(bands - {0})]
    ]
