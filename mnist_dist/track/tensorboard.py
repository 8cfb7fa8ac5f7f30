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
Failure, one that early termination stopped Unknown (TensorBoard has no status for it; its `epoch`
column says where it stopped). A run still training, or stopped to be resumed, has no end yet, and
so is Unknown too: TensorBoard keeps the first status a run records, so a Running written at the start
would stay. The end is written once, in a file of its own. Each time a run starts (a resume, a
requeue, a move to another pack, a retry) its TensorBoard run is written anew from its history.

Why not Accelerate's TensorBoard tracker: it names the TensorBoard run after the W&B project and writes
the hparams (every config key, nearly all constant) with no metric into a timestamped run of their own,
apart from the scalars: the HParams dashboard then lists constants with nothing to compare.
Only the `tensorboard` package is used (no TensorFlow, no torch).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import itertools
import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from mnist_dist.config import TrainConfig
from mnist_dist.errors import UserError
from mnist_dist.store.atomic import write_atomic

METRICS = ("val_acc", "val_loss", "best_val_acc", "best_val_loss", "epoch")
END_SUFFIX = ".session-end"
CONFIG_FILE = "events.out.tfevents.0.hparams-config"
# run.json's status of a run that ended -> TensorBoard's; a stopped run (to be resumed) has no end.
STATUS = {"completed": "STATUS_SUCCESS", "failed": "STATUS_FAILURE", "terminated": "STATUS_UNKNOWN"}
Scalar = bool | int | float | str
INSTALL = "pip install 'mnist-dist[tensorboard]' (bash launch/setup.sh installs it)"
SAFE = "._+-"  # kept as they are in a label's keys and values; the rest percent-encoded


def require(what: str, otherwise: str = "") -> None:
    """UserError naming `what` when the tensorboard package is not installed (it is optional)."""
    if importlib.util.find_spec("tensorboard") is None:
        raise UserError(f"{what}TensorBoard is not installed; {INSTALL}{otherwise}")


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
    """The TensorBoard run's name (a folder): a member's swept values (`phases.0.lr=0.5,seed=1`; in a
    value, what is not a letter, digit or `._+-` percent-encoded, so that distinct values stay
    distinct), else the run's name."""
    if cfg.sweep is None or not cfg.sweep.params:
        return cfg.name
    text = ",".join(
        f"{quote(k, safe=SAFE)}={quote(str(hparam_value(v)), safe=SAFE)}" for k, v in cfg.sweep.params.items()
    )
    return text if len(text) <= 120 else f"{text[:109]}-{cfg.sweep.member}"


def trial_id(cfg: TrainConfig, run_dir: Path) -> str:
    """The session's group, the HParams table's Trial ID: its label and what tells it from any other
    run with that label (a member's id; a single run's folder, by a digest of its path). TensorBoard
    makes one row of the sessions of one group."""
    if cfg.sweep is not None:
        return f"{label(cfg)} {cfg.sweep.member}"
    digest = hashlib.sha256(str(run_dir.absolute()).encode()).hexdigest()[:8]
    return f"{label(cfg)} {digest}"


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
    """One event file, each event appended at once, the file open only while it is written: a pack of
    1,024 members keeps no file open for them (TensorBoard's EventFileWriter keeps a file and a
    thread per writer)."""

    _made = itertools.count()

    def __init__(self, folder: Path, suffix: str = "") -> None:
        folder.mkdir(parents=True, exist_ok=True)
        stamp = f"{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(self._made)}"
        self.path = folder / f"events.out.tfevents.{stamp}{suffix}"
        self.path.write_bytes(records(_version()))

    def add(self, event: Any) -> None:
        with self.path.open("ab") as f:
            f.write(records(event))


def _version() -> Any:
    from tensorboard.compat.proto import event_pb2

    return event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")


def records(*events: Any) -> bytes:
    """The events in TensorBoard's record format (length, CRCs, data)."""
    from tensorboard.summary.writer.record_writer import RecordWriter

    out = io.BytesIO()
    writer = RecordWriter(out)
    for event in events:
        writer.write(event.SerializeToString())
    return out.getvalue()


class TensorBoardRun:
    """One run's TensorBoard run: started with its HParams session, each history entry's scalars and
    the best so far, flushed every epoch (a board open on a running sweep sees them), ended once."""

    def __init__(self, cfg: TrainConfig, run_dir: Path) -> None:
        """The TensorBoard run starts anew each time its run starts (a resume, a requeue, a move to
        another pack, a retry), an earlier try's files removed: the run then logs its history from
        epoch 0, so the files hold each epoch once, as history.json has it."""
        self.cfg, self.run_dir, self.dir = cfg, run_dir, run_dir / "tensorboard" / label(cfg)
        self.best: dict[str, float] = {}
        for stale in self.dir.glob("events.out.tfevents.*"):
            stale.unlink()
        self.events = EventFile(self.dir)
        self.events.add(_event(self.session_start()))

    def session_start(self) -> Any:
        from tensorboard.plugins.hparams import summary_v2

        return summary_v2.hparams_pb(hparams(self.cfg), trial_id=trial_id(self.cfg, self.run_dir))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        from tensorboard.compat.proto import summary_pb2

        for name, better in (("val_acc", max), ("val_loss", min)):
            value = metrics.get(name)
            if value is not None and math.isfinite(value):
                self.best[name] = better(self.best.get(name, value), value)
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
        EventFile(self.dir, suffix=END_SUFFIX).add(
            _event(_plugin_summary("_hparams_/session_end_info", data))
        )


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
    write_atomic(root / CONFIG_FILE, records(_version(), _event(config)))
