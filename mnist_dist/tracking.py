"""Experiment tracking (W&B, TensorBoard): the settings, and the Tracker a run logs its history to.

The trackers are Accelerate's (`log_with`): the engine builds the Accelerator and hands it to
`Tracker`, which only calls its tracker methods; nothing here imports Accelerate. Tracking never fails
a run: when W&B cannot go online the run is written offline under the run directory (`wandb sync
RUN_DIR/wandb/offline-run-*` uploads it later), and if that fails too the run goes on untracked.
Processes other than the main one get a NullTracker.
"""

from __future__ import annotations

import contextlib
import netrc
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mnist_dist.config import TrainConfig
from mnist_dist.wandb_file import last_logged_epoch


def wandb_credentials() -> bool:
    """True when W&B has an API key: $WANDB_API_KEY or a ~/.netrc entry (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        hosts = netrc.netrc(os.environ.get("NETRC")).hosts
    except (OSError, netrc.NetrcParseError):
        return False
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    return base in hosts


def wandb_mode(configured: str) -> str:
    """online/offline: the config's choice, else $WANDB_MODE, else online only with credentials."""
    if configured != "auto":
        return configured
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("online", "offline", "disabled"):
        return env
    return "online" if wandb_credentials() else "offline"


def init_kwargs(cfg: TrainConfig, run_dir: Path, mode: str, run_id: str | None = None) -> dict[str, Any]:
    """Accelerate's init_trackers(init_kwargs=...) for the configured tracker."""
    if cfg.tracker == "wandb":
        job = os.environ.get("SLURM_JOB_ID")
        kwargs: dict[str, Any] = {
            "dir": str(run_dir),
            # One W&B run per Slurm job, named after it, so a dashboard row leads back to the job.
            "name": f"{cfg.name}-{job}" if job else cfg.name,
            "mode": mode,
            "entity": cfg.wandb.entity,
            # Our own lines are the log; W&B capturing the console would only copy them.
            "settings": {"console": "off", "init_timeout": 60},
        }
        if run_id:
            kwargs.update(id=run_id, resume="allow")
        return {"wandb": kwargs}
    return {}


def job_run_id() -> str | None:
    """In a Slurm job, a W&B run id that every requeue of the job gets again: one run per job."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    return f"{os.environ.get('SLURM_CLUSTER_NAME', 'slurm')}-{job}"


def tracker_config(cfg: TrainConfig) -> dict[str, Any]:
    # TensorBoard's hparams take only scalars; W&B shows nested sections.
    return cfg.flat() if cfg.tracker == "tensorboard" else cfg.model_dump(mode="json")


def entry_metrics(entry: dict[str, Any]) -> dict[str, Any]:
    """What one history entry sends to the tracker: numbers only, epoch as the x-axis."""
    keys = ("epoch", "phase", "lr", "val_loss", "val_acc", "train_loss", "seconds")
    return {k: entry[k] for k in keys if entry.get(k) is not None}


class Tracker:
    """The main process's tracker: started with an offline fallback, each history entry logged once
    (a resumed run skips the epochs its W&B run already has), finished on every exit path."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, accelerator: Any, log: Callable[[str], None]) -> None:
        self.cfg, self.run_dir, self.accelerator, self.warn = cfg, run_dir, accelerator, log
        self.logged_through = -1  # the last epoch the tracker has

    def start(self, run_id: str | None = None) -> dict[str, Any]:
        """Start the configured tracker; return what run.json records of it. Never raises."""
        cfg = self.cfg
        if cfg.tracker == "none":
            return {"tracker": "none"}
        mode = wandb_mode(cfg.wandb.mode) if cfg.tracker == "wandb" else "local"
        for attempt in (mode, "offline") if mode == "online" else (mode,):
            try:
                self.accelerator.trackers = []
                self.accelerator.init_trackers(
                    cfg.wandb.project,
                    config=tracker_config(cfg),
                    init_kwargs=init_kwargs(cfg, self.run_dir, attempt, run_id),
                )
                info = self._info(attempt)
                self.logged_through = self._last_logged_epoch(info.get("run_id"))
                return info
            except Exception as e:
                self.warn(f"warning: {cfg.tracker} tracker ({attempt}) did not start: {e}".splitlines()[0])
        self.accelerator.trackers = []
        self.accelerator.log_with = []
        return {"tracker": "none", "tracker_failed": cfg.tracker}

    def _info(self, mode: str) -> dict[str, Any]:
        if self.cfg.tracker != "wandb":
            return {"tracker": self.cfg.tracker, "dir": str(self.run_dir / "tensorboard")}
        run = self.accelerator.get_tracker("wandb", unwrap=True)
        return {"tracker": "wandb", "mode": mode, "run_id": run.id, "dir": str(Path(run.dir).parent)}

    def _last_logged_epoch(self, run_id: str | None) -> int:
        """The last epoch this W&B run already has (resumed runs): from its earlier offline files, or
        from the summary an online run resumes with."""
        if self.cfg.tracker != "wandb" or run_id is None:
            return -1
        last = last_logged_epoch(self.run_dir, run_id)
        run = self.accelerator.get_tracker("wandb", unwrap=True)
        with contextlib.suppress(Exception):
            last = max(last, int(run.summary.get("epoch", -1)))
        return last

    def log(self, entry: dict[str, Any]) -> None:
        """Send a history entry, once: epochs the run already has (before a resume) are skipped."""
        if not self.accelerator.trackers or entry["epoch"] <= self.logged_through:
            return
        try:
            self.accelerator.log(entry_metrics(entry), step=entry["epoch"])
            self.logged_through = entry["epoch"]
        except Exception as e:
            self.warn(f"warning: tracker log failed: {e}".splitlines()[0])

    def close(self) -> None:
        """Finish every started tracker (W&B writes its last records here)."""
        for tracker in self.accelerator.trackers:
            with contextlib.suppress(Exception):
                tracker.finish()
        self.accelerator.trackers = []


class NullTracker:
    """What processes other than the main one get: nothing is started or logged."""

    def start(self, run_id: str | None = None) -> dict[str, Any]:
        return {"tracker": None}

    def log(self, entry: dict[str, Any]) -> None: ...

    def close(self) -> None: ...
