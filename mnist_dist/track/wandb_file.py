"""Reading a W&B run back from its `.wandb` file, without W&B's service: the tests check what was
logged, and a resumed run learns which epochs its W&B run already has.

A .wandb file is W&B's transaction log: a 7-byte header (":W&B", magic 0xBEE1, version), then
LevelDB-log records in 32 KiB blocks, each a serialized wandb_internal_pb2.Record.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

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
    """The .wandb files of a run dir, or of every member of a sweep dir."""
    return sorted(
        [*run_dir.glob("wandb/*run-*/run-*.wandb"), *run_dir.glob("members/*/wandb/*run-*/run-*.wandb")]
    )


def read_wandb_run(path: Path) -> dict[str, Any]:
    """{"id", "config", "history": [rows]} from a .wandb file, read with W&B's own protobuf types."""
    from wandb.proto import wandb_internal_pb2 as pb

    run: dict[str, Any] = {
        "id": None,
        "name": None,
        "group": None,
        "job_type": None,
        "config": {},
        "history": [],
        "metrics": {},  # define_metric: name -> {"step_metric", "summary": [max, min, last...]}
        "summary": {},
    }
    for blob in _records(path):
        rec = pb.Record()
        rec.ParseFromString(blob)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run["id"] = rec.run.run_id
            run["name"] = rec.run.display_name
            run["group"], run["job_type"] = rec.run.run_group or None, rec.run.job_type or None
            run["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            run["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "metric":
            summary = [f.name for f, on in rec.metric.summary.ListFields() if on]
            run["metrics"][rec.metric.name] = {"step_metric": rec.metric.step_metric, "summary": summary}
        elif kind == "summary":
            for i in rec.summary.update:
                run["summary"][i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
        elif kind == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            run["history"].append(row)
    return run


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
