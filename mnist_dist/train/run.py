"""One training run, as `mnist-dist train` and every task of a SLURM job run it, and a pack of runs
(a sweep's members trained together as one stacked model):

    history = [engine.evaluate(val)] + [engine.fit(phase) ... for each phase]

`run_pack()` below reads top to bottom: the starting point (a fresh start, or the newest sound
checkpoint), what is left to train, the phase loop with its checkpoint cadence, and the outputs. A
single run is a pack of one (`run()`); `evaluate_weights` scores saved weights on the test set.
The steps themselves (`loss.backward(); optimizer.step()`) are in `Engine.fit` ->
`Engine._train_epoch`; what each member's run directory gets is in run_state.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mnist_dist.config import TrainConfig
from mnist_dist.errors import UserError
from mnist_dist.store.outputs import check_output_dir
from mnist_dist.store.ownership import RunLock, claim
from mnist_dist.train.early_termination import Judge
from mnist_dist.train.engine import Engine
from mnist_dist.train.model import MnistPack
from mnist_dist.train.run_state import RunState
from mnist_dist.train.stopping import StopFlag


def run(
    cfg: TrainConfig,
    resume: str = "auto",
    force: bool = False,
    stop: StopFlag | None = None,
    lock: RunLock | None = None,
) -> list[dict[str, Any]]:
    """Train as the config says, write the run directory (main process) and return the history: a
    run of one member, its checkpoints in its run directory.

    resume: `auto` continues from the newest sound checkpoint in the run directory, `never` starts
    over (deleting the old checkpoints), a path resumes from that checkpoint. A checkpoint of a
    different config is refused unless `force`. Raises Preempted after saving when `stop` is set,
    FloatingPointError when the training loss is not finite. `lock`: the run directory's lock when
    the caller took it already (one process); else the main process takes it here.
    """
    histories, failures = run_pack([cfg], cfg.run_dir(), resume, force, stop, [lock] if lock else None)
    if failures[0] is not None:
        raise FloatingPointError(failures[0])
    return histories[0]


def run_pack(
    cfgs: list[TrainConfig],
    home: Path,
    resume: str = "auto",
    force: bool = False,
    stop: StopFlag | None = None,
    locks: list[RunLock | None] | None = None,
    judge: Judge | None = None,
) -> tuple[list[list[dict[str, Any]]], list[str | None]]:
    """Train the members `cfgs` as one stacked model; return each member's history and failure (None,
    or why its loss stopped being finite). Each member's run directory is written as its own run
    would write it; the run's checkpoints go to `home`. `judge` (a sweep's early termination) is
    asked after every epoch which members stop there: they end and leave the model."""
    for cfg in cfgs:
        check_output_dir(cfg.run_dir())
    seeds = [cfg.seed for cfg in cfgs]
    optimizers = [cfg.optimizer.model_dump() for cfg in cfgs]
    hidden = cfgs[0].model.hidden_size
    engine = Engine(cfgs[0], home, lambda: MnistPack.seeded(seeds, hidden), stop, optimizers)
    try:
        taken = [] if locks else own(engine, [cfg.run_dir() for cfg in cfgs])
    except BaseException:
        engine.close()
        raise
    state = RunState(cfgs, engine, home)
    state.judge = judge
    state.locks = {lock.run_dir: lock for lock in locks or [] if lock is not None}
    try:
        todo = state.begin(resume, force)
        if not state.live:  # each member moved on to another pack (or ended) after the checkpoint
            return state.finish()
        train, val = state.batches()
        state.start_tracking(train)
        if not state.started:  # epoch 0: the evaluation before training
            state.evaluated(engine.evaluate(val))
        for stretch in todo:
            fit = engine.fit(
                stretch.epochs,
                state.lrs(stretch),
                train,
                val,
                first_epoch=stretch.first_epoch,
                resume_at=stretch.resume_at,
            )
            for result in fit:
                state.epoch_done(stretch.phase, result)
                if state.nothing_left:  # every member failed or was stopped
                    return state.finish()
        return state.finish()
    except BaseException as e:
        state.ended(e)  # a requested stop saves a checkpoint; anything else is recorded in run.json
        raise
    finally:
        state.close()
        engine.close()
        for lock in taken:
            lock.release()


def own(engine: Engine, run_dirs: list[Path]) -> list[RunLock]:
    """The main process takes each run directory's lock (ownership.py); every process learns whether
    it did, so that a refused run ends everywhere at once, with exit code 2."""
    locks: list[RunLock] = []
    refusal = None
    if engine.is_main:
        try:
            locks = claim(run_dirs, log=engine.print)
        except UserError as e:
            refusal = e
    if engine.any_process(refusal is not None):
        where = run_dirs[0] if len(run_dirs) == 1 else "a member's run dir"
        raise refusal or UserError(f"{where} is being written by another run (the main process names it)")
    return locks


def evaluate_weights(cfg: TrainConfig, state_dict: dict[str, Any], train: bool = False) -> dict[str, float]:
    """Loss and accuracy of saved weights on the MNIST test set (train=False), in this one process."""

    def saved_model() -> MnistPack:
        return MnistPack.from_state_dict(state_dict, cfg.model.hidden_size)

    engine = Engine(cfg.model_copy(update={"tracker": "none"}), Path("."), saved_model)
    try:
        metrics = engine.evaluate(engine.batches(engine.load_data(train=train), cfg.val_batch_size))[0]
    finally:
        engine.close()
    return {"loss": metrics["val_loss"], "acc": metrics["val_acc"], "n_samples": metrics["n_val_samples"]}
