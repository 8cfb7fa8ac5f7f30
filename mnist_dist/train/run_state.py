"""What a run carries between its steps: its members (member.py; a single run: one member) and
the progress a checkpoint saves.

A member whose training loss stops being finite is frozen (engine.freeze) and recorded as failed in
its run.json, as its own run would have ended; the others go on unchanged. With a sweep's early
termination, members stop and move between packs at its bands (early_termination.py).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from mnist_dist.config import TrainConfig
from mnist_dist.errors import BandTimeout, UserError
from mnist_dist.store import checkpoint, provenance
from mnist_dist.store.checkpoint import ResumePoint
from mnist_dist.store.faults import WriteFault
from mnist_dist.store.outputs import history_entry, plot_all
from mnist_dist.store.ownership import RunLock, private_dir
from mnist_dist.track.trackers import run_id
from mnist_dist.train import data
from mnist_dist.train.console import Console
from mnist_dist.train.early_termination import EarlyTermination, Judge
from mnist_dist.train.engine import Engine, EpochResult
from mnist_dist.train.member import Member, pack_sizes
from mnist_dist.train.schedule import Stretch, remaining
from mnist_dist.train.stopping import Preempted
from mnist_dist.train.threads import usable_cpus


class RunState(EarlyTermination):
    """The run's members and the progress its checkpoints save (in `home`: a single run's run dir,
    a pack's pack dir)."""

    def __init__(self, cfgs: list[TrainConfig], engine: Engine, home: Path) -> None:
        self.cfgs, self.engine, self.home = cfgs, engine, home
        self.members = [Member(cfg, engine) for cfg in cfgs]  # then those that joined, in order
        self.live = list(self.members)  # those in the engine's model, in its order (the members')
        self.judge: Judge | None = None
        self.locks: dict[Path, RunLock] = {}  # the members' locks its caller holds, by run dir
        self.taken: list[RunLock] = []  # those of the members that joined
        self.train: data.ShardedBatches | None = None  # the training batches, once made
        self.pack: dict[str, Any] = {}  # what each member's run.json says of the pack
        self.console = Console(engine.print, home, cfgs)
        self.progress = checkpoint.Progress(epochs_done=0)
        self.started = False
        self._clock = time.perf_counter()

    @property
    def nothing_left(self) -> bool:
        """Every member failed, was terminated or moved on: nothing left to train here."""
        return all(not m.trains for m in self.live)

    def begin(self, resume: str, force: bool) -> list[Stretch]:
        """Find the starting point, set up the run directories; return what is left to train."""
        engine = self.engine
        resume_from, self.progress = checkpoint.starting_point(
            self.cfgs, self.home, resume, force, engine.is_main, engine.print
        )
        if engine.is_main and self.home not in [m.run_dir for m in self.members]:
            private_dir(self.home, "pack dir")
        handed = self._restore_members(self.progress)
        for member in self.members:
            if member.moved is None and id(member) not in handed:
                member.out.create(member.history)
                member.out.write_config(member.cfg)
        self.started = bool(self.members[0].history)
        self.console.config()
        self._relayout()
        todo = remaining(self.cfgs, self.progress)
        if resume_from is not None:
            self._resume(resume_from, done=not todo)
        self._hand_on(handed)
        return todo

    def _resume(self, path: Path, done: bool) -> None:
        self.engine.load_checkpoint(path)
        frozen = [i for i, m in enumerate(self.live) if not m.trains]
        if frozen:
            self.engine.freeze(frozen)
        p = self.progress
        where = f"epoch {p.epochs_done + 1}, step {p.step}" if p.step else f"the end of epoch {p.epochs_done}"
        self.engine.print(f"resuming from {path} at {where}")
        for member in self.members:
            member.info["resumed_from"] = str(path)
        if done:
            self.engine.print(
                f"all {self.cfgs[0].total_epochs} epochs were trained already: nothing to train, outputs are "
                "written again from the checkpoint (--resume never trains from scratch)"
            )

    def batches(self) -> tuple[data.ShardedBatches, data.ShardedBatches]:
        """The seeded 50,000/10,000 split of MNIST's training images, as this process's batches."""
        cfg, engine = self.cfgs[0], self.engine
        train, val = data.random_split(engine.load_data(train=True), cfg.data.val_size, cfg.data.split_seed)
        self.train = engine.batches(train, cfg.batch_size, shuffle=True)
        return self.train, engine.batches(val, cfg.val_batch_size)

    def start_tracking(self, train: data.ShardedBatches) -> None:
        """Provenance into each run.json, the trackers started (the same W&B runs as before a resume)."""
        facts = {**self.engine.facts(train), "versions": provenance.versions()}
        facts["git_commit"] = provenance.git_commit()
        # Each process (or SLURM job) that trained this run, in order: a checkpoint of N processes
        # resumes on M, and run.json says who trained what.
        start = self.members[0].info["start_time"]
        segment = {"world_size": facts["world_size"], "hosts": facts["hosts"], "start_time": start}
        segment["from"] = {"epochs_done": self.progress.epochs_done, "step": self.progress.step}
        self.progress.segments = [*self.progress.segments, segment]
        ids = [m.id for m in self.members]
        self.pack = {
            "dir": str(self.home),
            "size": len(ids),
            "members": ids,
            "sizes": pack_sizes(self.members, self.home, len(self.cfgs)),
        }
        for member in self.members:
            trained_in = {"pack": self.pack} if member.run_dir != self.home else {}
            member.info.update(facts, segments=self.progress.segments, **trained_in)
            if member.trains:
                tracking = member.tracker.start(member.tracker_run_id or run_id(member.cfg))
                member.info["tracking"] = tracking
                member.tracker_run_id = tracking.get("run_id")
                for entry in member.history:  # what the tracker may have missed before the interruption
                    member.tracker.log(entry)
        self.console.where(facts)
        self._clock = time.perf_counter() - self.progress.train_seconds

    def elapsed(self) -> float:
        """Seconds of training, counting those before a resume."""
        return round(time.perf_counter() - self._clock, 4)

    def evaluated(self, metrics: list[dict[str, Any]]) -> None:
        """Epoch 0: the evaluation before training."""
        for member, m in zip(self.live, metrics, strict=True):
            member.record(history_entry(None, 0, None, m, None, self.elapsed()))
        self._epoch_said(0)

    def epoch_done(self, phase: int, result: EpochResult) -> None:
        """Each live member's history entry (or its failure); the members that early termination
        stops here end and leave the model; then a checkpoint when the cadence (or the last epoch) says
        so. Once no member is left to train there is nothing left to save."""
        entries: list[tuple[Member, dict[str, Any]]] = []
        failed = []
        for i, member in enumerate(self.live):
            if not member.trains:
                continue
            loss, lr = result.train_loss[i], member.cfg.phases[phase].lr
            if not math.isfinite(loss):
                why = f"training loss is {loss} in phase {phase + 1}, epoch {result.epoch}, lr {lr:g}"
                member.fail(why)
                failed.append(i)
                continue
            entries.append(
                (member, history_entry(phase, result.epoch, lr, result.metrics[i], loss, result.seconds))
            )
        if failed:
            self.engine.freeze(failed)
        entries = self._judged(result.epoch, entries)
        entries = self._balanced(result.epoch, phase, entries)
        if self.nothing_left:
            return
        self.progress.train_seconds = time.perf_counter() - self._clock
        every, epoch = self.cfgs[0].checkpoint.every_epochs, result.epoch
        if every and (epoch % every == 0 or epoch == self.cfgs[0].total_epochs):
            self.save(epoch, pending={id(m): [e] for m, e in entries})
        for member, entry in entries:
            member.record(entry)
        self._epoch_said(epoch)

    def lrs(self, stretch: Stretch) -> list[float]:
        """The lr of each member in the model, in its order, for this stretch's phase."""
        return [m.cfg.phases[stretch.phase].lr for m in self.live]

    def _epoch_said(self, epoch: int) -> None:
        live = [m.history for m in self.live if m.trains]
        self.console.epoch(epoch, live, sum(m.failure is not None for m in self.members))

    def save(self, epochs_done: int, at: ResumePoint = ResumePoint(), pending: dict | None = None) -> None:
        """A checkpoint of the whole run: its position and every member's part (with `pending`, by
        id(member), this epoch's entries not yet recorded)."""
        self.progress.stand_at(epochs_done, at)
        self.progress.members = [m.part((pending or {}).get(id(m), [])) for m in self.members]
        self.engine.save_checkpoint(self.progress, self.cfgs[0].checkpoint.keep)

    def _note_end_facts(self) -> None:
        for member, facts in zip(self.live, self.engine.end_facts(), strict=True):
            member.info.update(facts)

    def finish(self) -> tuple[list[list[dict[str, Any]]], list[str | None]]:
        """The finished runs' files: history, weights, plots, run.json; failed members keep theirs."""
        seconds = self.elapsed()
        self._note_end_facts()
        finished = [(i, m) for i, m in enumerate(self.live) if m.trains]
        for i, member in finished:
            member.info["train_seconds"] = seconds
            member.out.write_history(member.history)
            member.out.save_weights(self.engine.state_dict(i), member.cfg)
        unplotted = [m for m in self.members if m.terminated and not (m.run_dir / "loss.png").exists()]
        drawn = [member for _, member in finished] + unplotted
        plot_all([(member.out, member.history) for member in drawn], usable_cpus())
        for _, member in finished:
            member.info.update(status="completed", end_time=provenance.now())
            member.tracker.end("completed")
            member.note_moves()
            member.out.write_run_info(member.info)
        self.console.done(seconds, [m.history for _, m in finished if m.history])
        ours = self.members[: len(self.cfgs)]  # those that joined report to their own packs' callers
        return [m.history for m in ours], [m.failure for m in ours]

    def ended(self, e: BaseException) -> None:
        """The run ends by an exception: Preempted saves and says so; a failure in that save, or any
        other exception, is recorded as the end of each member's run."""
        self._note_end_facts()
        try:
            if isinstance(e, Preempted):
                self.stopped(e)
        except BaseException as err:
            self.failed(err)
            raise
        self.failed(e)
        if isinstance(e, WriteFault):
            e.last_checkpoint = checkpoint.newest_sound(self.home)

    def stopped(self, p: Preempted) -> None:
        """A requested stop: save where training stands, mid-epoch, and say so in run.json."""
        self.progress.train_seconds = time.perf_counter() - self._clock
        self.save(p.epoch - 1, p.at)
        self.engine.print(
            f"stopped on request in epoch {p.epoch} before step {p.at.step}; checkpoint saved in "
            f"{checkpoint.folder(self.home) / self.progress.name}"
        )
        for member in self.members:
            if member.info["status"] == "running":
                member.end("preempted", stopped_at={"epoch": p.epoch, "step": p.at.step})

    def failed(self, e: BaseException) -> None:
        """Ctrl-C (`interrupted`), a fault of the machine or of the sweep's other processes (`fault`: a
        full disk, an I/O error, packs that did not meet at a band; the members are not to blame and
        resume) or any other error (`failed`) in run.json, once the run directory has its config; a
        no-op after a stop that was saved (status `preempted`)."""
        if isinstance(e, UserError):  # bad input changes nothing
            return
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        if isinstance(e, (WriteFault, BandTimeout)):
            status = "fault"
        for member in self.members:
            if member.info["status"] == "running":
                member.end(status, error=f"{type(e).__name__}: {e}")

    def close(self) -> None:
        for member in self.members:
            member.tracker.close()
        for lock in self.taken:
            lock.release()
