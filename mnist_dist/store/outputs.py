"""The run directory (config.yaml, metrics.jsonl, history.json, run.json, model.safetensors, plots) and
the history entry it holds, one per epoch.

Only the main process writes: it gets a RunDir, every other process a NullRunDir that does nothing.
Files are written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mnist_dist.config import TrainConfig
from mnist_dist.errors import UserError
from mnist_dist.store.atomic import atomic_path, write_atomic
from mnist_dist.store.faults import writing
from mnist_dist.store.ownership import private_dir

WEIGHTS = "model.safetensors"
HISTORY, METRICS, RUN_INFO = "history.json", "metrics.jsonl", "run.json"


def check_output_dir(path: Path) -> None:
    """UserError unless path is (or can be made) a writable directory. Safe to call on every process."""
    if path.exists() and not path.is_dir():
        raise UserError(f"output dir {path} exists and is not a directory; pass another --output-dir")
    parent = next(p for p in (path, *path.parents) if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(
            f"output dir {path} is not writable ({parent} is not a writable directory); "
            "pass another --output-dir"
        )


def history_entry(
    phase: int | None, epoch: int, lr: float | None, metrics: dict[str, Any], train_loss: Any, seconds: float
) -> dict[str, Any]:
    """One row of the history: epoch 0 (phase, lr and train_loss None) is the evaluation before training."""
    return {
        "phase": phase,
        "epoch": epoch,
        "lr": lr,
        **metrics,
        "train_loss": train_loss,
        "seconds": seconds,
    }


def format_entry(entry: dict[str, Any], phases: int) -> str:
    """The tutorial's line, with phase and lr: `Epoch [4], val_loss: 0.1391, val_acc: 0.9578 ...`."""
    line = f"Epoch [{entry['epoch']}], val_loss: {entry['val_loss']:.4f}, val_acc: {entry['val_acc']:.4f}"
    if entry["phase"] is None:
        return line + "  (before training)"
    return line + f"  (phase {entry['phase'] + 1}/{phases}, lr {entry['lr']:g}, {entry['seconds']:.2f}s)"


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = path

    def create(self, history: list[dict[str, Any]] | None = None) -> None:
        """Make the folder; metrics.jsonl starts over, or from the history of a resumed checkpoint."""
        # 0700: run folders hold pickles that cluster jobs execute, and W&B run files.
        private_dir(self.path, "output dir")
        write_atomic(self.path / METRICS, "".join(json.dumps(e) + "\n" for e in history or []))

    def write_config(self, cfg: TrainConfig) -> None:
        write_atomic(self.path / "config.yaml", cfg.to_yaml())

    def append_metrics(self, entry: dict[str, Any]) -> None:
        path = self.path / METRICS
        with writing(path), path.open("a") as f:  # a torn last line is rewritten from the history on resume
            f.write(json.dumps(entry) + "\n")

    def write_history(self, history: list[dict[str, Any]]) -> None:
        write_atomic(self.path / HISTORY, json.dumps(history, indent=2) + "\n")

    def write_run_info(self, info: dict[str, Any]) -> None:
        write_atomic(self.path / RUN_INFO, json.dumps(info, indent=2) + "\n")

    def save_weights(self, state_dict: dict[str, Any], cfg: TrainConfig) -> None:
        from safetensors.torch import save_file

        with atomic_path(self.path / WEIGHTS) as tmp:
            # The config travels inside the weights, so a weights file explains itself.
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
                str(tmp),
                metadata={"config": json.dumps(cfg.model_dump(mode="json"))},
            )

    def plot(self, history: list[dict[str, Any]]) -> list[Path]:
        from mnist_dist.store.plots import plot_history

        with writing(self.path / "loss.png"):
            return plot_history(history, self.path)


class NullRunDir(RunDir):
    """What processes other than the main one get: every write is a no-op."""

    def create(self, history: list[dict[str, Any]] | None = None) -> None: ...
    def write_config(self, cfg: TrainConfig) -> None: ...
    def append_metrics(self, entry: dict[str, Any]) -> None: ...
    def write_history(self, history: list[dict[str, Any]]) -> None: ...
    def write_run_info(self, info: dict[str, Any]) -> None: ...
    def save_weights(self, state_dict: dict[str, Any], cfg: TrainConfig) -> None: ...
    def plot(self, history: list[dict[str, Any]]) -> list[Path]:
        return []


def plot_all(runs: list[tuple[RunDir, list[dict[str, Any]]]], cpus: int) -> None:
    """Each run's loss and accuracy figures. A pack of hundreds on a machine of many `cpus` draws
    them in parallel processes (matplotlib draws one figure at a time, and 1,024 members one after
    another would take minutes of a GPU's time); a few, or few CPUs, one after another here."""
    live = [(out, history) for out, history in runs if not isinstance(out, NullRunDir)]
    workers = min(cpus - 1, len(live) // 8)
    if workers < 2:
        for out, history in live:
            out.plot(history)
        return
    import concurrent.futures
    import multiprocessing

    from mnist_dist.store.plots import plot_history

    # spawn, not fork: this process holds torch's threads (and maybe a CUDA context).
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        drawn = [(out, pool.submit(plot_history, history, out.path)) for out, history in live]
        for out, future in drawn:
            with writing(out.path / "loss.png"):
                future.result()


def read_run(path: Path) -> tuple[TrainConfig, list[dict[str, Any]]]:
    """(config, history) of a finished run directory, or UserError saying what is missing."""
    from mnist_dist.config import build_config
    from mnist_dist.yamlfile import read_yaml

    if not path.is_dir():
        raise UserError(f"run dir {path} does not exist; pass the --output-dir of a training run")
    cfg = build_config(read_yaml(path / "config.yaml"), str(path / "config.yaml"))
    history_path = path / HISTORY
    if not history_path.is_file():
        raise UserError(f"{history_path} is missing; the run has not finished")
    return cfg, read_history(history_path)


def read_history(path: Path) -> list[dict[str, Any]]:
    """A history.json: a list of entries with epoch, val_loss and val_acc; else UserError."""
    try:
        history = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path} cannot be read ({e})") from None
    keys = {"epoch", "val_loss", "val_acc"}
    if not isinstance(history, list) or not all(isinstance(e, dict) and keys <= e.keys() for e in history):
        raise UserError(f"{path} is not a history (a list of entries with epoch, val_loss, val_acc)")
    return history


def read_entries(run_dir: Path) -> list[dict[str, Any]] | None:
    """The per-epoch entries of a run: history.json when finished, metrics.jsonl while it runs (or
    after it stopped); None when it has neither."""
    if (run_dir / HISTORY).is_file():
        return read_history(run_dir / HISTORY)
    if (run_dir / METRICS).is_file():
        return _read_metrics(run_dir / METRICS)
    return None


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """The entries of metrics.jsonl; a torn last line (being written, or cut by a crash) is left out."""
    lines = path.read_text(errors="replace").splitlines()
    entries = []
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if isinstance(entry, dict) and "epoch" in entry:
            entries.append(entry)
        elif number < len(lines) or not entries:
            raise UserError(f"{path} line {number} is not a history entry; the file is damaged")
    return entries


def read_status(run_dir: Path) -> str | None:
    """run.json's status (running, completed, failed, preempted, interrupted, fault), None if unreadable."""
    try:
        status = json.loads((run_dir / RUN_INFO).read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None
    return status if isinstance(status, str) else None
