"""What a run carries between its steps, for each of its members (a single run: one member): the
history, run.json's facts and status, the run directory's writer and the tracker; and for the run,
the progress a checkpoint saves.

A member whose training loss stops being finite is frozen (engine.freeze) and recorded as failed in
its run.json, as its own run would have ended; the others go on unchanged. Each member's run
directory ends up as a single run's would: config.yaml, metrics.jsonl, history.json, run.json (with
the pack it trained in), plots, its own model.safetensors and tracker run.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mnist_dist.config import TrainConfig
from mnist_dist.errors import UserError
from mnist_dist.store import checkpoint, provenance
from mnist_dist.store.checkpoint import MemberPart, ResumePoint, member_id
from mnist_dist.store.faults import WriteFault
from mnist_dist.store.outputs import NullRunDir, RunDir, history_entry, plot_all
from mnist_dist.store.ownership import private_dir
from mnist_dist.track.trackers import run_id
from mnist_dist.train import data
from mnist_dist.train.console import Console
from mnist_dist.train.engine import Engine, EpochResult
from mnist_dist.train.schedule import Stretch, remaining
from mnist_dist.train.stopping import Preempted
from mnist_dist.train.threads import usable_cpus

TERMINATED = "terminated"  # run.json's status of a member that early termination stopped
# Asked after each epoch with the live members' histories (by member id): those to stop, each with
# the decision run.json records (sweep/barrier.Judge: W&B's hyperband rule).
Judge = Callable[[int, dict[str, list[dict[str, Any]]]], dict[str, dict[str, Any]]]


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
        self.tracker_run_id: str | None = None

    @property
    def trains(self) -> bool:
        """Still training: neither failed nor terminated."""
        return self.failure is None and self.terminated is None

    def restore(self, part: MemberPart) -> None:
        """Where a checkpoint left it: history, tracker run, failure (its run.json says so)."""
        self.history, self.tracker_run_id = list(part["history"]), part["tracker_run_id"]
        self.failure, self.terminated = part["failure"], part.get("terminated")
        if self.failure is not None:
            self.info["status"] = "failed"
        if self.terminated is not None:
            self.info.update(status=TERMINATED, early_terminate=self.terminated)

    def part(self, pending: list[dict[str, Any]]) -> MemberPart:
        """What a checkpoint keeps of it (with `pending`, this epoch's entry not yet recorded)."""
        history = self.history + pending
        return MemberPart(
            id=self.id,
            history=history,
            tracker_run_id=self.tracker_run_id,
            failure=self.failure,
            terminated=self.terminated,
        )

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

    def end(self, status: str, **facts: Any) -> None:
        self.info.update(status=status, end_time=provenance.now(), **facts)
        if (self.run_dir / "config.yaml").exists():
            with contextlib.suppress(WriteFault):  # the disk that failed may refuse this too
                self.out.write_run_info(self.info)


class RunState:
    """The run's members and the progress its checkpoints save (in `home`: a single run's run dir,
    a pack's pack dir)."""

    def __init__(self, cfgs: list[TrainConfig], engine: Engine, home: Path) -> None:
        self.cfgs, self.engine, self.home = cfgs, engine, home
        self.members = [Member(cfg, engine) for cfg in cfgs]
        self.live = list(self.members)  # those in the engine's model, in its order
        self.judge: Judge | None = None
        self.train: data.ShardedBatches | None = None  # the training batches, once made
        self.pack: dict[str, Any] = {}  # what each member's run.json says of the pack
        self.console = Console(engine.print, home, cfgs)
        self.progress = checkpoint.Progress(epochs_done=0)
        self.started = False
        self._clock = time.perf_counter()

    @property
    def nothing_left(self) -> bool:
        """Every member failed or was terminated: nothing left to train."""
        return all(not m.trains for m in self.live)

    def begin(self, resume: str, force: bool) -> list[Stretch]:
        """Find the starting point, set up the run directories; return what is left to train."""
        engine = self.engine
        resume_from, self.progress = checkpoint.starting_point(
            self.cfgs, self.home, resume, force, engine.is_main, engine.print
        )
        if engine.is_main and self.home not in [m.run_dir for m in self.members]:
            private_dir(self.home, "pack dir")
        for member, part in zip(self.members, self.progress.members, strict=True):
            member.restore(part)
            member.out.create(member.history)
            member.out.write_config(member.cfg)
        self.started = bool(self.members[0].history)
        self.console.config()
        gone = [i for i, m in enumerate(self.live) if m.terminated is not None]
        if gone:  # they left the model before this checkpoint was saved
            self._leave(gone)
        todo = remaining(self.cfgs, self.progress)
        if resume_from is not None:
            self._resume(resume_from, done=not todo)
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
            "sizes": pack_sizes(self.members),
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
        if self.nothing_left:
            return
        self.progress.train_seconds = time.perf_counter() - self._clock
        every, epoch = self.cfgs[0].checkpoint.every_epochs, result.epoch
        if every and (epoch % every == 0 or epoch == self.cfgs[0].total_epochs):
            self.save(epoch, pending={id(m): [e] for m, e in entries})
        for member, entry in entries:
            member.record(entry)
        self._epoch_said(epoch)

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
        self.pack["sizes"] = pack_sizes(self.members)
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
        self.engine.drop(gone, *([self.train] if self.train is not None else []))
        self.live = [m for i, m in enumerate(self.live) if i not in set(gone)]

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
            member.out.write_run_info(member.info)
        self.console.done(seconds, [m.history for _, m in finished if m.history])
        return [m.history for m in self.members], [m.failure for m in self.members]

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
        """Ctrl-C (`interrupted`), a fault of the machine (`fault`: a full disk, an I/O error; the
        members are not to blame and resume) or any other error (`failed`) in run.json, once the run
        directory has its config; a no-op after a stop that was saved (status `preempted`)."""
        if isinstance(e, UserError):  # bad input changes nothing
            return
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        if isinstance(e, WriteFault):
            status = "fault"
        for member in self.members:
            if member.info["status"] == "running":
                member.end(status, error=f"{type(e).__name__}: {e}")

    def close(self) -> None:
        for member in self.members:
            member.tracker.close()


def pack_sizes(members: list[Member]) -> list[dict[str, int]]:
    """A pack's size from its start and after each band that stopped members (for run.json)."""
    bands = sorted({m.terminated["epoch"] for m in members if m.terminated})
    left = [sum(1 for m in members if not (m.terminated and m.terminated["epoch"] <= b)) for b in bands]
    sizes = [{"after_epoch": 0, "members": len(members)}]
    return sizes + [{"after_epoch": b, "members": k} for b, k in zip(bands, left, strict=True)]
