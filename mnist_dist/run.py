"""One training run, as `mnist-dist train` and every task of a SLURM job run it:

    history = [engine.evaluate(val)] + [engine.fit(phase) ... for each phase]

`run()` below reads top to bottom: the starting point (a fresh start, or the newest sound checkpoint),
what is left to train, the phase loop with its checkpoint cadence, and the outputs. The steps
themselves (`loss.backward(); optimizer.step()`) are in `Engine.fit` -> `Engine._train_epoch`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any

from mnist_dist import checkpoint, data, provenance
from mnist_dist.config import TrainConfig
from mnist_dist.engine import Engine, EpochResult
from mnist_dist.errors import UserError
from mnist_dist.faults import WriteFault
from mnist_dist.model import MnistModel
from mnist_dist.outputs import NullRunDir, RunDir, check_output_dir, format_entry, history_entry
from mnist_dist.ownership import RunLock
from mnist_dist.stopping import Preempted, ResumePoint, StopFlag
from mnist_dist.tracking import run_id


@dataclasses.dataclass(frozen=True)
class Stretch:
    """Epochs still to train in one phase: `epochs` from `first_epoch`, the first of them entered at
    `resume_at`."""

    phase: int
    lr: float
    first_epoch: int
    epochs: int
    resume_at: ResumePoint = dataclasses.field(default_factory=ResumePoint)


def remaining(cfg: TrainConfig, progress: checkpoint.Progress) -> list[Stretch]:
    """What is left to train: from the first epoch not done (part-way through it after a mid-epoch
    stop) to the end of the last phase. Empty when the run is complete."""
    stretches, epoch, next_epoch = [], 1, progress.epochs_done + 1
    for index, phase in enumerate(cfg.phases):
        last = epoch + phase.epochs - 1
        first = max(epoch, next_epoch)
        if first <= last:
            at = progress.resume_at if first == next_epoch else ResumePoint()
            stretches.append(Stretch(index, phase.lr, first, last - first + 1, at))
        epoch = last + 1
    return stretches


def run(
    cfg: TrainConfig,
    resume: str = "auto",
    force: bool = False,
    stop: StopFlag | None = None,
    lock: RunLock | None = None,
) -> list[dict[str, Any]]:
    """Train as the config says, write the run directory (main process) and return the history.

    resume: `auto` continues from the newest sound checkpoint in the run directory, `never` starts
    over (deleting the old checkpoints), a path resumes from that checkpoint. A checkpoint of a
    different config is refused unless `force`. Raises Preempted after saving when `stop` is set.
    `lock`: the run directory's lock when the caller took it already (one process); else the main
    process takes it here and releases it at the end.
    """
    run_dir = cfg.run_dir()
    check_output_dir(run_dir)
    engine = Engine(cfg, run_dir, lambda: MnistModel(cfg.model.hidden_size), stop)
    try:
        taken = None if lock else own(engine, run_dir)  # before any write: one writer per run dir
    except BaseException:
        engine.close()
        raise
    state = RunState(cfg, engine)
    try:
        todo = state.begin(resume, force)
        train, val = state.batches()
        state.start_tracking(train)
        if not state.history:  # epoch 0: the evaluation before training
            state.history.append(history_entry(None, 0, None, engine.evaluate(val), None, state.elapsed()))
            state.record(state.history[0])
        for stretch in todo:
            fit = engine.fit(
                stretch.epochs,
                stretch.lr,
                train,
                val,
                phase=stretch.phase,
                first_epoch=stretch.first_epoch,
                resume_at=stretch.resume_at,
            )
            for result in fit:
                state.epoch_done(stretch, result)
        return state.finish()
    except BaseException as e:
        state.ended(e)  # a requested stop saves a checkpoint; anything else is recorded in run.json
        raise
    finally:
        state.tracker.close()
        engine.close()
        if taken is not None:
            taken.release()


def own(engine: Engine, run_dir: Path) -> RunLock | None:
    """The main process takes the run directory's lock (ownership.py); every process learns whether
    it did, so that a refused run ends everywhere at once, with exit code 2."""
    lock, refusal = None, None
    if engine.is_main:
        try:
            lock = RunLock(run_dir, log=engine.print).acquire()
        except UserError as e:
            refusal = e
    if engine.any_process(refusal is not None):
        raise refusal or UserError(f"{run_dir} is being written by another run (the main process names it)")
    return lock


class RunState:
    """What a run carries between its steps: the history, the progress a checkpoint saves, run.json's
    facts and status, the run directory's writer and the tracker."""

    def __init__(self, cfg: TrainConfig, engine: Engine) -> None:
        self.cfg, self.engine, self.run_dir = cfg, engine, cfg.run_dir()
        self.out = RunDir(self.run_dir) if engine.is_main else NullRunDir(self.run_dir)
        self.info: dict[str, Any] = {"name": cfg.name, "status": "running", "start_time": provenance.now()}
        self.tracker = engine.tracker()
        self.history: list[dict[str, Any]] = []
        self.progress = checkpoint.Progress(epochs_done=0)
        self._clock = time.perf_counter()

    def begin(self, resume: str, force: bool) -> list[Stretch]:
        """Find the starting point, set up the run directory; return what is left to train."""
        cfg, engine = self.cfg, self.engine
        resume_from, self.progress = checkpoint.starting_point(
            cfg, self.run_dir, resume, force, engine.is_main, engine.print
        )
        self.history = list(self.progress.history)
        self.out.create(self.history)
        engine.print(f"mnist-dist {cfg.name}: resolved config\n{cfg.to_yaml().rstrip()}")
        self.out.write_config(cfg)
        todo = remaining(cfg, self.progress)
        if resume_from is not None:
            self._resume(resume_from, done=not todo)
        return todo

    def _resume(self, path: Path, done: bool) -> None:
        self.engine.load_checkpoint(path)
        p = self.progress
        where = f"epoch {p.epochs_done + 1}, step {p.step}" if p.step else f"the end of epoch {p.epochs_done}"
        self.engine.print(f"resuming from {path} at {where}")
        self.info["resumed_from"] = str(path)
        if done:
            self.engine.print(
                f"all {self.cfg.total_epochs} epochs were trained already: nothing to train, outputs are "
                "written again from the checkpoint (--resume never trains from scratch)"
            )

    def batches(self) -> tuple[data.ShardedBatches, data.ShardedBatches]:
        """The seeded 50,000/10,000 split of MNIST's training images, as this process's batches."""
        cfg, engine = self.cfg, self.engine
        train, val = data.random_split(engine.load_data(train=True), cfg.data.val_size, cfg.data.split_seed)
        return engine.batches(train, cfg.batch_size, shuffle=True), engine.batches(val, cfg.val_batch_size)

    def start_tracking(self, train: data.ShardedBatches) -> None:
        """Provenance into run.json, the tracker started (the same W&B run as before a resume)."""
        info, progress = self.info, self.progress
        info.update(self.engine.facts(train), versions=provenance.versions())
        info["git_commit"] = provenance.git_commit()
        info["tracking"] = self.tracker.start(progress.tracker_run_id or run_id(self.cfg))
        progress.tracker_run_id = info["tracking"].get("run_id")
        # Each process (or SLURM job) that trained this run, in order: a checkpoint of N processes
        # resumes on M, and run.json says who trained what.
        segment = {k: info[k] for k in ("world_size", "hosts", "start_time")}
        segment["from"] = {"epochs_done": progress.epochs_done, "step": progress.step}
        progress.segments = info["segments"] = [*progress.segments, segment]
        threads = info["threads"]
        self.engine.print(
            f"{info['world_size']} process(es) on {info['device']}, precision {info['precision']}, "
            f"{threads['count']} CPU thread(s) each ({threads['source']}), run dir {self.run_dir}"
        )
        for entry in self.history:  # what the tracker may have missed before the interruption
            self.tracker.log(entry)
        self._clock = time.perf_counter() - progress.train_seconds

    def elapsed(self) -> float:
        """Seconds of training, counting those before a resume."""
        return round(time.perf_counter() - self._clock, 4)

    def record(self, entry: dict[str, Any]) -> None:
        """A history entry made known: printed, appended to metrics.jsonl, logged to the tracker."""
        self.engine.print(format_entry(entry, len(self.cfg.phases)))
        self.out.append_metrics(entry)
        self.tracker.log(entry)

    def epoch_done(self, stretch: Stretch, result: EpochResult) -> None:
        """The epoch's history entry, and a checkpoint when the cadence (or the last epoch) says so."""
        entry = history_entry(
            stretch.phase, result.epoch, stretch.lr, result.metrics, result.train_loss, result.seconds
        )
        self.history.append(entry)  # before the checkpoint, which holds the history
        self.progress.train_seconds = time.perf_counter() - self._clock
        every = self.cfg.checkpoint.every_epochs
        if every and (entry["epoch"] % every == 0 or entry["epoch"] == self.cfg.total_epochs):
            self.save(entry["epoch"])
        self.record(entry)

    def save(self, epochs_done: int, at: ResumePoint = ResumePoint()) -> None:
        self.progress.stand_at(epochs_done, at)
        self.progress.history = self.history
        self.engine.save_checkpoint(self.progress, self.cfg.checkpoint.keep)

    def finish(self) -> list[dict[str, Any]]:
        """The finished run's files: history, weights, plots, run.json."""
        self.info["train_seconds"] = self.elapsed()
        self.out.write_history(self.history)
        self.out.save_weights(self.engine.state_dict(), self.cfg)
        self.out.plot(self.history)
        self.info.update(status="completed", end_time=provenance.now())
        self.out.write_run_info(self.info)
        self.engine.print(
            f"done in {self.info['train_seconds']:.2f}s of training; final val_acc "
            f"{self.history[-1]['val_acc']:.4f}; run dir {self.run_dir}"
        )
        return self.history

    def ended(self, e: BaseException) -> None:
        """The run ends by an exception: Preempted saves and says so; a failure in that save, or any
        other exception, is recorded as the end of the run."""
        try:
            if isinstance(e, Preempted):
                self.stopped(e)
        except BaseException as err:
            self.failed(err)
            raise
        self.failed(e)
        if isinstance(e, WriteFault):
            e.last_checkpoint = checkpoint.newest_sound(self.run_dir)

    def stopped(self, p: Preempted) -> None:
        """A requested stop: save where training stands, mid-epoch, and say so in run.json."""
        self.progress.train_seconds = time.perf_counter() - self._clock
        self.save(p.epoch - 1, p.at)
        self.engine.print(
            f"stopped on request in epoch {p.epoch} before step {p.at.step}; checkpoint saved in "
            f"{checkpoint.folder(self.run_dir) / self.progress.name}"
        )
        stopped_at = {"epoch": p.epoch, "step": p.at.step}
        self.info.update(status="preempted", end_time=provenance.now(), stopped_at=stopped_at)
        self.out.write_run_info(self.info)

    def failed(self, e: BaseException) -> None:
        """Ctrl-C (`interrupted`) or any other error (`failed`) in run.json, once the run directory
        has its config; a no-op after a stop that was saved (status `preempted`)."""
        if self.info["status"] != "running" or isinstance(e, UserError):  # bad input changes nothing
            return
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        self.info.update(status=status, end_time=provenance.now(), error=f"{type(e).__name__}: {e}")
        if (self.run_dir / "config.yaml").exists():
            with contextlib.suppress(WriteFault):  # the disk that failed may refuse this too
                self.out.write_run_info(self.info)
