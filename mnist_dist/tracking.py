"""Experiment trackers (W&B, TensorBoard): how to start them, and reading a W&B offline run back.

The engine hands these settings to Accelerate's trackers (`log_with`); nothing here imports Accelerate.
Tracking never fails a run: when W&B cannot go online the run is written offline under the run
directory (`wandb sync RUN_DIR/wandb/offline-run-*` uploads it later).
"""

from __future__ import annotations

import netrc
import os
import struct
from pathlib import Path
from typing import Any

from mnist_dist.config import TrainConfig


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


def last_logged_epoch(run_dir: Path, run_id: str | None) -> int:
    """The last epoch an earlier offline W&B run with this id logged (-1: none): on resume, entries
    up to it are not logged again, so a run has each epoch once."""
    last = -1
    for path in wandb_run_files(run_dir):
        if run_id and path.stem == f"run-{run_id}":
            try:
                rows = read_wandb_run(path)["history"]
            except (ValueError, OSError):
                continue
            last = max([last, *(int(r["epoch"]) for r in rows if "epoch" in r)])
    return last


def tracker_config(cfg: TrainConfig) -> dict[str, Any]:
    # TensorBoard's hparams take only scalars; W&B shows nested sections.
    return cfg.flat() if cfg.tracker == "tensorboard" else cfg.model_dump(mode="json")


def entry_metrics(entry: dict[str, Any]) -> dict[str, Any]:
    """What one history entry sends to the tracker: numbers only, epoch as the x-axis."""
    keys = ("epoch", "phase", "lr", "val_loss", "val_acc", "train_loss", "seconds")
    return {k: entry[k] for k in keys if entry.get(k) is not None}


# --- reading a W&B run file back ------------------------------------------------------------------
# A .wandb file is W&B's transaction log: a 7-byte header (":W&B", magic 0xBEE1, version), then
# LevelDB-log records in 32 KiB blocks, each a serialized wandb_internal_pb2.Record.

_HEADER = 7
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(path: Path) -> list[bytes]:
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    out, pending, pos = [], b"", _HEADER
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if crc == 0 and length == 0 and kind == 0:
            break
        chunk = data[pos + 7 : pos + 7 + length]
        # The CRC32C is not checked (no stdlib implementation); a short record ends the scan.
        if len(chunk) < length:
            break
        pos += 7 + length
        if kind == _FULL:
            out.append(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            out.append(pending + chunk)
            pending = b""
    return out


def wandb_run_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("wandb/*run-*/run-*.wandb"))


def read_wandb_run(path: Path) -> dict[str, Any]:
    """{"id", "config", "history": [rows]} from a .wandb file, read with W&B's own protobuf types."""
    import json

    from wandb.proto import wandb_internal_pb2 as pb

    run: dict[str, Any] = {"id": None, "name": None, "config": {}, "history": []}
    for blob in _records(path):
        rec = pb.Record()
        rec.ParseFromString(blob)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run["id"] = rec.run.run_id
            run["name"] = rec.run.display_name
            run["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            run["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            run["history"].append(row)
    return run
