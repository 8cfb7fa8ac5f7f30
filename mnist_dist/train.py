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

import datetime as dt
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mnist_dist.config import TrainConfig
from mnist_dist.outputs import NullRunDir, RunDir, check_output_dir


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


def run(cfg: TrainConfig) -> list[dict[str, Any]]:
    """Train as the config says, write the run directory (main process) and return the history."""
    from mnist_dist import data
    from mnist_dist.engine import Engine
    from mnist_dist.model import MnistModel

    run_dir = cfg.run_dir()
    check_output_dir(run_dir)
    engine = Engine(cfg, run_dir)
    out = RunDir(run_dir) if engine.is_main else NullRunDir(run_dir)
    info: dict[str, Any] = {"name": cfg.name, "status": "running", "start_time": _now()}
    try:
        out.create()
        engine.print(f"mnist-dist {cfg.name}: resolved config\n{cfg.to_yaml().rstrip()}")
        out.write_config(cfg)

        full = engine.load_data(train=True)
        train_split, val_split = data.random_split(full, cfg.data.val_size, cfg.data.split_seed)
        train_batches, val_batches = engine.loaders(train_split, val_split)
        engine.prepare(MnistModel(cfg.model.hidden_size), cfg.phases[0].lr)

        info.update(engine.facts(train_batches), versions=_versions(), git_commit=_git_commit())
        info["tracking"] = engine.start_tracking()
        engine.print(
            f"{info['world_size']} process(es) on {info['device']}, precision {info['precision']}, "
            f"run dir {run_dir}"
        )

        def record(entry: dict[str, Any]) -> None:
            engine.print(format_entry(entry, len(cfg.phases)))
            out.append_metrics(entry)
            engine.log(entry)

        start = time.perf_counter()
        history = [
            {
                "phase": None,
                "epoch": 0,
                "lr": None,
                **engine.evaluate(val_batches),
                "train_loss": None,
                "seconds": round(time.perf_counter() - start, 4),
            }
        ]
        record(history[0])
        epoch = 1
        for index, phase in enumerate(cfg.phases):
            history += engine.fit(
                phase.epochs,
                phase.lr,
                train_batches,
                val_batches,
                phase=index,
                first_epoch=epoch,
                on_epoch=record,
            )
            epoch += phase.epochs
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
        info.update(status="failed", end_time=_now(), error=f"{type(e).__name__}: {e}")
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
