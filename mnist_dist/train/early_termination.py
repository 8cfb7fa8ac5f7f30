"""What a sweep's early termination does to a pack (sweep/barrier.py decides, with W&B's hyperband
rule, when the packs of a wave meet at a band): the members it stops end there and leave the model,
so the survivors' steps cost only theirs; then the survivors are balanced between the wave's packs,
a member moving from one to another with its weights, history and tracker run handed over in its
run dir (store/handover.py), so that the packs go on evenly. Each member is computed as before
(model.MnistPack.relayout): bitwise its own run, whichever pack it trains in.

A pack's checkpoint holds the members it trains at that point, those that joined with their
configs; a rerun after a kill finds the same moves again (the band files and handovers stay).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from mnist_dist.config import TrainConfig
from mnist_dist.store import checkpoint, handover
from mnist_dist.store.ownership import RunLock
from mnist_dist.train import data
from mnist_dist.train.engine import Engine
from mnist_dist.train.member import Member, pack_sizes


class Judge(Protocol):
    """A sweep's early termination (sweep/barrier.Judge: W&B's hyperband rule, the packs of a wave
    meeting at each band)."""

    def __call__(self, epoch: int, histories: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
        """Asked after each epoch with the live members' histories (by member id): those to stop,
        each with the decision run.json records."""

    def balance(self, band: int, kept: list[tuple[str, Path]], movable: bool) -> list[dict[str, str]]:
        """After the decision: the members (id, run_dir) to move `from` one pack's home `to` another's,
        so that the wave's packs go on evenly; `kept`, this pack's members that go on."""

    def receive(self, move: dict[str, str], band: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """A member that moves into this pack: (its handover record, its weights)."""


class EarlyTermination:
    """RunState's part for early termination: stopping members, moving them between packs."""

    cfgs: list[TrainConfig]
    engine: Engine
    home: Path
    members: list[Member]
    live: list[Member]
    judge: Judge | None
    locks: dict[Path, RunLock]
    taken: list[RunLock]
    train: data.ShardedBatches | None
    pack: dict[str, Any]
    elapsed: Callable[[], float]  # seconds of training so far (RunState's)

    def _restore_members(self, progress: checkpoint.Progress) -> dict[int, dict[str, Any]]:
        """Each member where the checkpoint left it, and those that joined this pack at a band before
        it (built from their configs, their locks taken over). Returns those this pack handed over
        at a band after the checkpoint (by id(member): the handover's record): they are the receiving
        pack's now, and leave once the checkpoint is loaded (`_hand_on`)."""
        parts, engine, handed = progress.members, self.engine, {}
        for member, part in zip(self.members, parts[: len(self.cfgs)], strict=True):
            member.restore(part)
        for part in parts[len(self.cfgs) :]:
            self.members.append(Member(TrainConfig.model_validate(part["config"]), engine))
            self.members[-1].restore(part)
        for member in self.members:
            given = (
                None if member.moved else handover.given_by(member.run_dir, self.home, progress.epochs_done)
            )
            if given is not None:
                handed[id(member)] = given
            elif member.joined and member.in_model:
                self.taken.append(RunLock(member.run_dir, log=engine.print).take_over(None))
        return handed

    def _hand_on(self, handed: dict[int, dict[str, Any]]) -> None:
        """The members `_restore_members` found handed over after the checkpoint leave the model."""
        gone = [i for i, m in enumerate(self.live) if id(m) in handed]
        for i in gone:
            given = handed[id(self.live[i])]
            self.live[i].move({"after_epoch": given["band"], "to": given["to"]})
        if gone:
            self._leave(gone)

    def _relayout(self) -> None:
        """The model as the checkpoint's: without the members that left it before, with those that
        joined (their weights come with the checkpoint); where it cannot shrink, those stopped are
        frozen in it."""
        if self.engine.can_shrink:
            template = self.engine.state_dict(0)
            self._rearrange([m for m in self.members if m.in_model], {id(m): template for m in self.members})
            return
        gone = [i for i, m in enumerate(self.live) if m.terminated is not None]
        if gone:
            self.engine.freeze(gone)

    def _judged(
        self, epoch: int, entries: list[tuple[Member, dict[str, Any]]]
    ) -> list[tuple[Member, dict[str, Any]]]:
        """The entries of the members that go on: those the judge (early termination) stops end now,
        before the checkpoint that no longer holds them, and leave the model."""
        if self.judge is None or not entries:
            return entries
        decided = self.judge(epoch, {m.id: [*m.history, e] for m, e in entries})
        if not decided:
            return entries
        for member, _ in entries:
            member.terminated = decided.get(member.id, member.terminated)
        self.pack["sizes"] = pack_sizes(self.members, self.home, len(self.cfgs))
        gone, facts = [], self.engine.end_facts()
        for member, entry in entries:
            if member.id in decided:
                member.record(entry)
                i = self.live.index(member)
                member.info.update(facts[i])
                member.terminate(decided[member.id], self.engine.state_dict(i), self.elapsed())
                gone.append(i)
        ids = " ".join(self.live[i].id for i in gone)
        self.engine.print(f"{self.home.name}: early termination after epoch {epoch} stopped {ids}")
        self._leave(gone)
        return [(m, e) for m, e in entries if m.id not in decided]

    def _leave(self, gone: list[int]) -> None:
        """Members (engine positions) leave the model: out of it when the engine can shrink, else
        frozen (their lr 0, out of the loss), as failed members are."""
        if not self.engine.can_shrink:
            self.engine.freeze(gone)
            return
        self._rearrange([m for i, m in enumerate(self.live) if i not in set(gone)], {})

    def _rearrange(self, live: list[Member], joining: dict[int, dict[str, Any]]) -> None:
        """The model becomes `live`, in this order: the members in it now keep their weights, those
        not in it join with their weights in `joining` (by id(member))."""
        if [id(m) for m in live] == [id(m) for m in self.live]:
            return
        at = {id(m): i for i, m in enumerate(self.live)}
        order = [at[id(m)] if id(m) in at else joining[id(m)] for m in live]
        batches = [self.train] if self.train is not None else []
        optimizers = [m.cfg.optimizer.model_dump() for m in live]
        self.engine.rearrange(order, [m.cfg.seed for m in live], optimizers, *batches)
        self.live = live

    def _balanced(
        self, epoch: int, phase: int, entries: list[tuple[Member, dict[str, Any]]]
    ) -> list[tuple[Member, dict[str, Any]]]:
        """At a band, after the decision: members move between the wave's packs so that they go on
        evenly (the judge's balance). Those this pack gives end here (their entry recorded, then
        handed over in their run dir); those it takes join the model at this phase's lr. All before
        the checkpoint, which then holds the members this pack trains on."""
        if self.judge is None or not entries:  # a pack with no one left to train ends (its peers see it)
            return entries
        movable = self.engine.can_move and self.home not in {m.run_dir for m in self.members}
        moves = self.judge.balance(epoch, [(m.id, m.run_dir) for m, _ in entries], movable)
        home = str(self.home)
        gives = {mv["id"]: mv["to"] for mv in moves if mv["from"] == home}
        takes = [mv for mv in moves if mv["to"] == home]
        if not gives and not takes:
            return entries
        for member, entry in entries:
            if member.id in gives:
                member.record(entry)
                self._give(member, epoch, gives[member.id])
        joining = {}
        for move in takes:
            member = next((m for m in self.members if m.id == move["id"]), None)
            if member is not None and member.in_model:  # resumed with it: it joined before the checkpoint
                continue
            if handover.given_by(Path(move["run_dir"]), self.home, epoch):  # it moved on from here later
                continue
            member, joining[id(member)] = self._take(move, epoch, member)
        self._rearrange([m for m in self.members if m.in_model], joining)
        self.engine.set_lrs([m.cfg.phases[phase].lr for m in self.live])
        self.pack["sizes"] = pack_sizes(self.members, self.home, len(self.cfgs))
        ours = [mv for mv in moves if home in (mv["from"], mv["to"])]
        said = ", ".join(f"{mv['id']} from {Path(mv['from']).name} to {Path(mv['to']).name}" for mv in ours)
        here = len(self.live)
        self.engine.print(f"{self.home.name}: after epoch {epoch} moved {said} ({here} members here now)")
        return [(m, e) for m, e in entries if m.id not in gives]

    def _give(self, member: Member, epoch: int, to: str) -> None:
        """Hand `member` over to the pack in `to`: its lock stops being refreshed here, its weights
        and record go to its run dir."""
        lock = self.locks.get(member.run_dir) or next(
            (k for k in self.taken if k.run_dir == member.run_dir), None
        )
        if lock is not None:
            lock.hand_over()
        member.tracker.close()  # its last records written before the receiver resumes its run
        record = {
            "id": member.id,
            "from": str(self.home),
            "to": to,
            "history": member.history,
            "tracker_run_id": member.tracker_run_id,
            "config": member.cfg.model_dump(mode="json"),
            "info": member.info,
            "giver_pid": os.getpid(),
        }
        handover.write(member.run_dir, epoch, self.engine.state_dict(self.live.index(member)), record)
        member.move({"after_epoch": epoch, "to": to})

    def _take(self, move: dict[str, str], epoch: int, member: Member | None) -> tuple[Member, dict[str, Any]]:
        """The member that `move`s here (a Member of its own, or `member`: one that left earlier and
        comes back), once its giver handed it over: its lock taken over, its run dir and tracker
        written from here on. Returns it and its weights."""
        record, weights = self.judge.receive(move, epoch)  # type: ignore[union-attr]
        cfg = TrainConfig.model_validate(record["config"])
        if member is None:
            member = Member(cfg, self.engine)
            self.members.append(member)
        self.taken.append(RunLock(member.run_dir, log=self.engine.print).take_over(record.get("giver_pid")))
        joined = {"after_epoch": epoch, "from": move["from"]}
        record = {**record, "info": {**record["info"], "pack": self.pack}}
        member.arrive(record, joined, self.engine.tracker(cfg, member.run_dir))
        return member, weights
