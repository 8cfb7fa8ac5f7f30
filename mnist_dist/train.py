"""Train the tutorial's MNIST model: history = [evaluate()] + fit(phase) for each phase of the config.

One process, CPU or the GPU (Accelerate picks CUDA when there is one):

    python -m mnist_dist.train --config configs/seed.yaml --output-dir runs/seed
    mnist-dist train                                   # the same, on the embedded defaults

Several processes on one machine (2 gloo processes on a CPU-only machine, one per GPU otherwise):

    accelerate launch --config_file launch/cpu-2proc.yaml -m mnist_dist.train --output-dir runs/cpu2
    accelerate launch --multi_gpu --num_processes 2 -m mnist_dist.train --output-dir runs/cpu2
    accelerate launch --config_file launch/multi-gpu.yaml -m mnist_dist.train --output-dir runs/gpus

Two nodes, 8 GPUs each (run on every node, with its --machine_rank):

    accelerate launch --config_file launch/multi-node.yaml --machine_rank 0 \\
        --main_process_ip HEAD_NODE -m mnist_dist.train --output-dir /shared/runs/nodes

`batch_size` is the global batch: with N processes each takes a contiguous 1/N of every batch, so the
history is the same for any N (within float rounding).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mnist_dist.config import TrainConfig
from mnist_dist.outputs import NullRunDir, RunDir, check_output_dir
from mnist_dist.tracking import job_run_id as tracking_job_id

if TYPE_CHECKING:
    from mnist_dist.checkpoint import Progress
    from mnist_dist.engine import Engine, StopFlag


def format_entry(entry: dict[str, Any], phases: int) -> str:
    """The tutorial's line, with phase and lr: `Epoch [4], val_loss: 0.1391, val_acc: 0.9578 ...`."""
    line = f"Epoch [{entry['epoch']}], val_loss: {entry['val_loss']:.4f}, val_acc: {entry['val_acc']:.4f}"
    if entry["phase"] is None:
        return line + "  (before training)"
    return line + f"  (phase {entry['phase'] + 1}/{phases}, lr {entry['lr']:g}, {entry['seconds']:.2f}s)"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _versions() -> dict[str, str]:
    import accelerate
    import torch

    import mnist_dist

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "mnist_dist": mnist_dist.__version__,
    }


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclasses.dataclass(frozen=True)
class Stretch:
    """Epochs still to train in one phase: `epochs` from `first_epoch`, the first of them entered at
    step `resume_at[0]` with `resume_at[1]` as the sum of the step losses before it."""

    phase: int
    lr: float
    first_epoch: int
    epochs: int
    resume_at: tuple[int, float] = (0, 0.0)


def remaining(cfg: TrainConfig, progress: Progress) -> list[Stretch]:
    """What is left to train: from the first epoch not done (part-way through it after a mid-epoch
    stop) to the end of the last phase. Empty when the run is complete."""
    stretches, epoch, next_epoch = [], 1, progress.epochs_done + 1
    for index, phase in enumerate(cfg.phases):
        last = epoch + phase.epochs - 1
        first = max(epoch, next_epoch)
        if first <= last:
            at = (progress.step, progress.step_losses_sum) if first == next_epoch else (0, 0.0)
            stretches.append(Stretch(index, phase.lr, first, last - first + 1, at))
        epoch = last + 1
    return stretches


def _starting_point(
    cfg: TrainConfig, run_dir: Path, resume: str, force: bool, engine: Engine
) -> tuple[Path | None, Progress]:
    """The checkpoint to resume from (None: start over) and the progress this run starts with."""
    from mnist_dist import checkpoint

    progress = checkpoint.Progress(
        epochs_done=0, fingerprint=cfg.fingerprint(), config=cfg.model_dump(mode="json")
    )
    if resume == "never" and engine.is_main:
        shutil.rmtree(checkpoint.folder(run_dir), ignore_errors=True)
    chosen = checkpoint.choose(run_dir, resume, log=engine.print)
    if chosen is None:
        return None, progress
    path, found = chosen
    if not force:
        checkpoint.check_matches(found, cfg, path)
    # Its position, history, time and run id; the fingerprint and config of this run (they differ
    # only under --force).
    return path, dataclasses.replace(found, fingerprint=progress.fingerprint, config=progress.config)


def run(
    cfg: TrainConfig,
    resume: str = "auto",
    force: bool = False,
    stop: StopFlag | None = None,
) -> list[dict[str, Any]]:
    """Train as the config says, write the run directory (main process) and return the history.

    resume: `auto` continues from the newest sound checkpoint in the run directory, `never` starts
    over (deleting the old checkpoints), a path resumes from that checkpoint. A checkpoint of a
    different config is refused unless `force`. Raises Preempted after saving when `stop` is set.
    """
    from mnist_dist import checkpoint, data
    from mnist_dist.engine import Engine, Preempted
    from mnist_dist.model import MnistModel

    run_dir = cfg.run_dir()
    check_output_dir(run_dir)
    engine = Engine(cfg, run_dir)
    if stop is not None:
        engine.stop = stop
    out = RunDir(run_dir) if engine.is_main else NullRunDir(run_dir)
    info: dict[str, Any] = {"name": cfg.name, "status": "running", "start_time": _now()}
    try:
        resume_from, progress = _starting_point(cfg, run_dir, resume, force, engine)
        history = list(progress.history)
        out.create(history)
        engine.print(f"mnist-dist {cfg.name}: resolved config\n{cfg.to_yaml().rstrip()}")
        out.write_config(cfg)

        full = engine.load_data(train=True)
        train_split, val_split = data.random_split(full, cfg.data.val_size, cfg.data.split_seed)
        train_batches, val_batches = engine.loaders(train_split, val_split)
        engine.prepare(MnistModel(cfg.model.hidden_size), cfg.phases[0].lr)
        todo = remaining(cfg, progress)
        if resume_from is not None:
            engine.load_checkpoint(resume_from)
            where = (
                f"epoch {progress.epochs_done + 1}, step {progress.step}"
                if progress.step
                else (f"the end of epoch {progress.epochs_done}")
            )
            engine.print(f"resuming from {resume_from} at {where}")
            info["resumed_from"] = str(resume_from)
            if not todo:
                engine.print(
                    f"all {cfg.total_epochs} epochs were trained already: nothing to train, outputs are "
                    "written again from the checkpoint (--resume never trains from scratch)"
                )

        info.update(engine.facts(train_batches), versions=_versions(), git_commit=_git_commit())
        info["tracking"] = engine.start_tracking(progress.tracker_run_id or tracking_job_id())
        progress.tracker_run_id = info["tracking"].get("run_id")
        engine.print(
            f"{info['world_size']} process(es) on {info['device']}, precision {info['precision']}, "
            f"run dir {run_dir}"
        )
        for entry in history:  # what the tracker may have missed before the interruption
            engine.log(entry)

        def record(entry: dict[str, Any]) -> None:
            engine.print(format_entry(entry, len(cfg.phases)))
            out.append_metrics(entry)
            engine.log(entry)

        def save(epochs_done: int, step: int = 0, losses_sum: float = 0.0) -> None:
            progress.epochs_done, progress.step, progress.step_losses_sum = epochs_done, step, losses_sum
            progress.history = history
            engine.save_checkpoint(run_dir, progress, cfg.checkpoint.keep)

        start = time.perf_counter() - progress.train_seconds
        if not history:
            history.append(
                {
                    "phase": None,
                    "epoch": 0,
                    "lr": None,
                    **engine.evaluate(val_batches),
                    "train_loss": None,
                    "seconds": round(time.perf_counter() - start, 4),
                }
            )
            record(history[0])
        try:
            for stretch in todo:
                fit = engine.fit(
                    stretch.epochs,
                    stretch.lr,
                    train_batches,
                    val_batches,
                    phase=stretch.phase,
                    first_epoch=stretch.first_epoch,
                    resume_at=stretch.resume_at,
                )
                for entry in fit:
                    history.append(entry)
                    progress.train_seconds = time.perf_counter() - start
                    every = cfg.checkpoint.every_epochs
                    if every and (entry["epoch"] % every == 0 or entry["epoch"] == cfg.total_epochs):
                        save(entry["epoch"])
                    record(entry)
        except Preempted as p:
            progress.train_seconds = time.perf_counter() - start
            save(p.epoch - 1, p.step, p.losses_sum)
            engine.print(
                f"stopped on request in epoch {p.epoch} before step {p.step}; checkpoint saved in "
                f"{checkpoint.folder(run_dir) / progress.name}"
            )
            info.update(status="preempted", end_time=_now(), stopped_at={"epoch": p.epoch, "step": p.step})
            out.write_run_info(info)
            raise
        info["train_seconds"] = round(time.perf_counter() - start, 4)

        out.write_history(history)
        out.save_weights(engine.state_dict(), cfg)
        out.plot(history)
        info.update(status="completed", end_time=_now())
        out.write_run_info(info)
        engine.print(
            f"done in {info['train_seconds']:.2f}s of training; final val_acc "
            f"{history[-1]['val_acc']:.4f}; run dir {run_dir}"
        )
        return history
    except BaseException as e:
        if info["status"] == "running":
            status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            info.update(status=status, end_time=_now(), error=f"{type(e).__name__}: {e}")
            if (run_dir / "config.yaml").exists():
                out.write_run_info(info)
        raise
    finally:
        engine.close()


def main(argv: list[str] | None = None) -> int:
    """`python -m mnist_dist.train ARGS` = `mnist-dist train ARGS` (one set of options, in cli.py)."""
    from mnist_dist.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
