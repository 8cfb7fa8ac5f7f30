"""TensorBoard for a run: its scalars and its HParams session in one TensorBoard run, so that
TensorBoard's HParams dashboard (table, parallel coordinates, scatter matrix) compares runs, a sweep's
members above all, by what they tried and how they did, offline and without an account.

    RUN_DIR/tensorboard/<label>/events.out.tfevents.*              scalars, and the session's hparams
    RUN_DIR/tensorboard/<label>/events.out.tfevents.*.session-end  how the run ended
    SWEEP_DIR/events.out.tfevents.0.hparams-config                 the sweep's hparams and metrics

<label> names the TensorBoard run by what it is: a sweep member's swept values (`phases.0.lr=0.5,seed=1`),
else the run's name. Hparams: a member's swept keys and its seed; a single run's main keys. Metrics:
val_acc and val_loss, and the best of each so far, every epoch; the table shows each one's last value.

The session's status is TensorBoard's: a finished run is Success, a failed one (its loss diverged)
Failure; one that early termination stopped, or one interrupted that will resume, is Unknown (there is
no other status; its `epoch` column says where it stopped). TensorBoard keeps the first status a run
records, so the end is written once, in a file of its own, which a retried run removes first.

Why not Accelerate's TensorBoard tracker: it names the TensorBoard run after the W&B project and writes
the hparams (every config key, nearly all constant) with no metric into a timestamped run of their own,
apart from the scalars: the HParams dashboard then lists constants with nothing to compare.
Only the `tensorboard` package is used (no TensorFlow, no torch).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

from mnist_dist.config import TrainConfig

METRICS = ("val_acc", "val_loss", "best_val_acc", "best_val_loss", "epoch")
END_SUFFIX = ".session-end"
CONFIG_FILE = "events.out.tfevents.0.hparams-config"
# run.json's status of a run that ended -> TensorBoard's; a stopped run (to be resumed) has no end.
STATUS = {"completed": "STATUS_SUCCESS", "failed": "STATUS_FAILURE", "terminated": "STATUS_UNKNOWN"}
Scalar = bool | int | float | str


def hparam_value(value: Any) -> Scalar:
    """A value TensorBoard's hparams take: a bool, number or string (lists and sections as JSON)."""
    return value if isinstance(value, (bool, int, float, str)) else json.dumps(value, sort_keys=True)


def hparams(cfg: TrainConfig) -> dict[str, Scalar]:
    """A sweep member's swept keys and its seed; a single run's main keys."""
    if cfg.sweep is not None:
        return {**{k: hparam_value(v) for k, v in cfg.sweep.params.items()}, "seed": cfg.seed}
    phases = ",".join(f"{p.epochs}x{p.lr:g}" for p in cfg.phases)
    return {
        "seed": cfg.seed,
        "phases": phases,
        "batch_size": cfg.batch_size,
        "optimizer": cfg.optimizer.name,
        "precision": cfg.precision,
    }


def label(cfg: TrainConfig) -> str:
    """The TensorBoard run's name (a folder): a member's swept values, else the run's name."""
    if cfg.sweep is None or not cfg.sweep.params:
        return cfg.name
    text = ",".join(f"{k}={hparam_value(v)}" for k, v in cfg.sweep.params.items())
    text = re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)
    return text if len(text) <= 120 else f"{text[:109]}-{cfg.sweep.member}"[:120]


def _plugin_summary(tag: str, data: Any) -> Any:
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.hparams import metadata

    summary = summary_pb2.Summary()
    summary.value.add(tag=tag, metadata=metadata.create_summary_metadata(data), tensor=metadata.NULL_TENSOR)
    return summary


def _event(summary: Any, step: int = 0) -> Any:
    from tensorboard.compat.proto import event_pb2

    return event_pb2.Event(wall_time=time.time(), step=step, summary=summary)


class EventFile:
    """One event file, each event written and flushed at once. (TensorBoard's EventFileWriter keeps a
    thread per file, that is one per member in a pack of up to 1,024 members.)"""

    _made = itertools.count()

    def __init__(self, folder: Path, suffix: str = "", name: str | None = None) -> None:
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        folder.mkdir(parents=True, exist_ok=True)
        stamp = f"{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(self._made)}"
        self.path = folder / (name or f"events.out.tfevents.{stamp}{suffix}")
        self.records = RecordWriter(open(self.path, "wb"))  # noqa: SIM115 (closed by close())
        self.add(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def add(self, event: Any) -> None:
        self.records.write(event.SerializeToString())
        self.records.flush()

    def close(self) -> None:
        self.records.close()


def last_step(folder: Path) -> int:
    """The last epoch a TensorBoard run's files have scalars of (-1: none); a file cut short by a kill
    is read up to where it ends."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    last = -1
    for path in sorted(folder.glob("events.out.tfevents.*")):
        with contextlib.suppress(Exception):
            for event in EventFileLoader(str(path)).Load():
                if any(v.tag == "val_acc" for v in event.summary.value):
                    last = max(last, event.step)
    return last


class TensorBoardRun:
    """One run's TensorBoard run: started with its HParams session, each history entry's scalars and
    the best so far, flushed every epoch (a board open on a running sweep sees them), ended once."""

    def __init__(self, cfg: TrainConfig, run_dir: Path) -> None:
        self.cfg, self.dir = cfg, run_dir / "tensorboard" / label(cfg)
        self.best: dict[str, float] = {}
        self.logged_through = last_step(self.dir)  # a resumed run logs each epoch once
        for stale in self.dir.glob(f"*{END_SUFFIX}"):  # a retried run ends again
            stale.unlink()
        self.events = EventFile(self.dir)
        self.events.add(_event(self.session_start()))

    def session_start(self) -> Any:
        from tensorboard.plugins.hparams import summary_v2

        return summary_v2.hparams_pb(hparams(self.cfg), trial_id=label(self.cfg))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        from tensorboard.compat.proto import summary_pb2

        for name, better in (("val_acc", max), ("val_loss", min)):
            value = metrics.get(name)
            if value is not None and math.isfinite(value):
                self.best[name] = better(self.best.get(name, value), value)
        if step <= self.logged_through:
            return
        self.logged_through = step
        values = {**metrics, **{f"best_{k}": v for k, v in self.best.items()}}
        summary = summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()]
        )
        self.events.add(_event(summary, step))

    def end(self, status: str) -> None:
        """The session's end (status: run.json's), in a file of its own; none for a run that stopped
        to be resumed (preempted, interrupted, a fault)."""
        if status not in STATUS:
            return
        from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

        info = plugin_data_pb2.SessionEndInfo(
            status=api_pb2.Status.Value(STATUS[status]), end_time_secs=time.time()
        )
        data = plugin_data_pb2.HParamsPluginData(session_end_info=info)
        end = EventFile(self.dir, suffix=END_SUFFIX)
        end.add(_event(_plugin_summary("_hparams_/session_end_info", data)))
        end.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.events.close()


def domain(parameter: dict[str, Any]) -> Any:
    """The HParams domain of a sweep parameter (W&B's form): Discrete for `values`, an interval for
    distributions bounded in the values' own units, None for the rest (normal, log_uniform...)."""
    from tensorboard.plugins.hparams import summary_v2

    values = parameter.get("values")
    if isinstance(values, list) and values:
        shown = [hparam_value(v) for v in values]
        kinds = {type(v) if not isinstance(v, int) or isinstance(v, bool) else float for v in shown}
        if len(kinds) == 1:
            return summary_v2.Discrete([float(v) if kinds == {float} else v for v in shown])
        return None
    low, high = parameter.get("min"), parameter.get("max")
    bounded = (
        "uniform",
        "q_uniform",
        "int_uniform",
        "log_uniform_values",
        "q_log_uniform_values",
        "inv_log_uniform_values",
    )
    if parameter.get("distribution") in bounded and isinstance(low, (int, float)):
        if parameter["distribution"] == "int_uniform":
            return summary_v2.IntInterval(int(low), int(high))
        return summary_v2.RealInterval(float(low), float(high))
    return None


def write_hparams_config(root: Path, parameters: dict[str, dict[str, Any]], seeds: list[int]) -> None:
    """SWEEP_DIR's hparams_config: the swept keys with their domains, seed, and the metrics."""
    from tensorboard.plugins.hparams import summary_v2

    seed = parameters.get("seed") or {"values": sorted(set(seeds))}
    hparam_list = [summary_v2.HParam(k, domain(p)) for k, p in {**parameters, "seed": seed}.items()]
    config = summary_v2.hparams_config_pb(hparam_list, [summary_v2.Metric(m) for m in METRICS])
    written = EventFile(root, name=f".hparams-config.{os.getpid()}.tmp")
    written.add(_event(config))
    written.close()
    os.replace(written.path, root / CONFIG_FILE)
