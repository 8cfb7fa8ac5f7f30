"""A sweep: one config run many times over swept keys (lrs, schedules, seeds...), each run an ordinary
run directory, compared in one table.

    SWEEP_DIR/sweep.json          the spec, every member's id and swept values, the array job if any
    SWEEP_DIR/members/<id>/       each member's run dir: history.json, run.json, checkpoints, plots...
    SWEEP_DIR/results.{json,csv}  `mnist-dist sweep results`, with curves.png and final-<key>.png

The spec is W&B's sweep configuration, read by W&B's own sweep engine (engine.py), so a W&B sweep file
runs unchanged: `method` grid, random or bayes (in rounds: rounds.py), `parameters` with every
distribution and parameter key of W&B's schema (the implicit ones included; nested `parameters:` are
dotted config keys), `metric` (its `target` finishes the sweep: target.py), `run_cap` (`count`), and
`program`, `command`, `project`, `entity`, `description`, `controller`, which are noted and ignored;
`early_terminate` (W&B's hyperband) stops members inside their packs (hyperband.py). Ours: `name` and
`base`.
Keys are the dotted config keys `--set` takes. A member's id is a hash of its whole config, so running
or submitting the same sweep again skips finished members and resumes interrupted ones.
No torch here: the CLI validates every member before anything runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mnist_dist.config import NAME_PATTERN, TrainConfig, build_config, raw_config, set_key
from mnist_dist.errors import UserError
from mnist_dist.sweep import engine
from mnist_dist.sweep.engine import Parameter
from mnist_dist.sweep.layout import SweepDir
from mnist_dist.yamlfile import parse_yaml

SPEC_KEYS = {"name", "method", "base", "parameters", "metric", "run_cap", "count", "early_terminate"}
NOTED = {"program", "command", "project", "entity", "description", "controller", "apiVersion", "kind"}
METRICS = {"val_acc": "maximize", "val_loss": "minimize", "train_loss": "minimize"}
CONFIRM_ABOVE = 1000


@dataclass
class Spec:
    name: str
    method: str
    parameters: dict[str, Parameter]
    metric: str = "val_acc"
    goal: str = "maximize"
    target: float | None = None
    impute: str | None = None  # bayes: the value of a failed member (the engine's default: worst)
    count: int | None = None
    early_terminate: dict[str, Any] | None = None  # W&B's hyperband (hyperband.py)
    base: Path | None = None
    path: Path = Path("sweep.yaml")
    notes: list[str] = field(default_factory=list)

    @property
    def recorded_metric(self) -> dict[str, Any]:
        """The metric as sweep.json records it (what status, results and target.reached read)."""
        return {"name": self.metric, "goal": self.goal, "target": self.target}

    @property
    def engine_metric(self) -> dict[str, Any]:
        """The metric as the engine's config writes it."""
        metric = {"name": self.metric, "goal": self.goal}
        return {**metric, "impute": self.impute} if self.impute else metric

    @property
    def swept(self) -> list[str]:
        """The keys that take more than one value, in the spec's order."""
        return [k for k, p in self.parameters.items() if p.swept]


@dataclass
class Member:
    id: str
    params: dict[str, Any]
    cfg: TrainConfig

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir()


def _fail(path: Path, what: str) -> UserError:
    return UserError(f"sweep file {path}: {what}")


def read_spec(path: Path) -> Spec:
    """The validated spec; UserError naming the file and the key for anything it cannot run."""
    if not path.is_file():
        raise UserError(f"sweep file {path} not found; see configs/sweeps/ for examples")
    try:
        raw = parse_yaml(path.read_text())
    except Exception as e:  # YAMLError, UnicodeDecodeError, OSError
        raise _fail(path, f"not readable YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise _fail(path, f"expected a mapping of keys at the top level, got {type(raw).__name__}")
    unknown = sorted(set(raw) - SPEC_KEYS - NOTED)
    if unknown:
        raise _fail(path, f"unknown key '{unknown[0]}'; allowed: {', '.join(sorted(SPEC_KEYS | NOTED))}")
    name = raw.get("name", re.sub(r"[^A-Za-z0-9._-]", "-", path.stem))
    if not isinstance(name, str) or not re.match(NAME_PATTERN, name):
        raise _fail(path, f"name {name!r}: use letters, digits and . _ - (up to 64)")
    method = raw.get("method", "grid")
    parameters = _parameters(path, raw.get("parameters"))
    objection = engine.check_file(raw)
    if objection:
        raise _fail(path, f"{objection} (W&B's sweep schema)")
    if method not in ("grid", "random", "bayes"):
        raise _fail(path, f"method {method!r}: use grid, random or bayes")
    if method == "bayes":
        _check_bayes(path, raw, parameters)
    spec = Spec(name, method, parameters, path=path)
    spec.metric, spec.goal, spec.target = _metric(path, raw.get("metric"))
    if isinstance(raw.get("metric"), dict):
        spec.impute = raw["metric"].get("impute")
        if "goal" not in raw["metric"] and spec.goal != "minimize":  # W&B's default differs
            spec.notes.append(
                f"metric goal not given: {spec.goal} {spec.metric} here (W&B's default is minimize)"
            )
    spec.count = _count(path, raw, method)
    if raw.get("base") is not None:
        spec.base = _base(path, raw["base"])
    spec.notes += [f"'{k}' is W&B's; noted and not used here" for k in sorted(NOTED & set(raw))]
    if raw.get("early_terminate") is not None:
        spec.early_terminate = _early_terminate(path, raw["early_terminate"], spec.metric)
    return spec


def _early_terminate(path: Path, early: dict[str, Any], metric: str) -> dict[str, Any]:
    """W&B's hyperband as the engine fills it in (eta 3); its schema checked the keys already."""
    if metric == "train_loss":
        raise _fail(
            path,
            "early_terminate with metric train_loss: it is not logged at epoch 0, so W&B's bands would "
            "fall an epoch later than for val_acc; use metric val_acc or val_loss",
        )
    return {"eta": 3, **early}


def check_bands(spec: Spec, epochs: int) -> list[int]:
    """The bands the members reach (hyperband.reachable); UserError when none is, so that nothing
    could ever stop."""
    from mnist_dist.sweep.hyperband import bands, reachable

    if spec.early_terminate is None:
        return []
    every = bands(spec.early_terminate)
    if not every:
        raise _fail(
            spec.path,
            "early_terminate: max_iter / eta^k is below 1 for every k up to s, so hyperband has no band; "
            "raise max_iter or lower eta",
        )
    found = reachable(spec.early_terminate, epochs)
    if not found:
        first = ", ".join(str(b) for b in every[:3])
        raise _fail(
            spec.path,
            f"early_terminate: its bands ({first}, ...) are not before the members' last epoch "
            f"({epochs}), so it would stop nothing; lower min_iter (or max_iter), or train more epochs",
        )
    return found


def _check_bayes(path: Path, raw: dict[str, Any], parameters: dict[str, Parameter]) -> None:
    if not isinstance(raw.get("metric"), dict):
        raise _fail(
            path, "method bayes needs a metric to learn from: e.g. metric: {name: val_acc, goal: maximize}"
        )
    if not any(p.swept for p in parameters.values()):
        raise _fail(path, "method bayes needs a parameter that takes more than one value")
    for p in parameters.values():
        if "probabilities" in p.config:
            raise _fail(
                path,
                f"parameter '{p.key}': bayes cannot take probabilities (W&B's engine 0.2.0 fails on "
                "them); drop them or use method random",
            )


def _parameters(path: Path, params: Any) -> dict[str, Parameter]:
    if not isinstance(params, dict) or not params:
        raise _fail(
            path, "'parameters' must map config keys to {values: [...]}, {value: x} or a distribution"
        )
    try:
        return {p.key: p for p in engine.parameters(params)}
    except ValueError as e:
        raise _fail(path, str(e)) from None


def _metric(path: Path, metric: Any) -> tuple[str, str, float | None]:
    if metric is None:
        return "val_acc", "maximize", None
    if not isinstance(metric, dict) or metric.get("name") not in METRICS:
        raise _fail(
            path, f"metric {metric!r}: write {{name: val_acc, goal: maximize}} (or val_loss, train_loss)"
        )
    goal = metric.get("goal", METRICS[metric["name"]])
    if goal not in ("maximize", "minimize"):
        raise _fail(path, f"metric goal {goal!r}: use maximize or minimize")
    target = metric.get("target")  # a number: the engine's schema checked it
    return metric["name"], goal, None if target is None else float(target)


def _count(path: Path, raw: dict[str, Any], method: str) -> int | None:
    count = raw.get("run_cap", raw.get("count"))
    if count is None:
        if method in ("random", "bayes"):
            raise _fail(path, f"method {method} needs run_cap (or count): how many members to draw")
        return None
    if type(count) is not int or not 1 <= count <= 1_000_000:
        raise _fail(path, f"run_cap {count!r}: a whole number of members from 1 to 1,000,000")
    return count


def _base(path: Path, base: Any) -> Path:
    if not isinstance(base, str):
        raise _fail(path, f"base {base!r}: the path of a config file")
    for candidate in (Path(base), path.parent / base):
        if candidate.is_file():
            return candidate
    raise _fail(path, f"base config {base} not found (relative to here or to the sweep file)")


def combinations(spec: Spec) -> list[dict[str, Any]]:
    """Every member's swept values: the grid's product, or `count` draws (the same each time). A
    bayes sweep's members are proposed round by round (rounds.py), not here."""
    params = list(spec.parameters.values())
    if spec.method == "bayes":
        return []
    if spec.method == "grid":
        try:
            grid = engine.grid(params)
        except ValueError as e:
            raise _fail(spec.path, str(e)) from None
        return grid[: spec.count] if spec.count else grid
    return [engine.draw(params, spec.name, i) for i in range(spec.count or 0)]


def sweep_dir(spec: Spec, output_dir: str | None) -> Path:
    return Path(output_dir) if output_dir else Path("runs") / "sweeps" / spec.name


def member_id(cfg: TrainConfig) -> str:
    """A stable short hash of everything in the member's config but where it is written."""
    what = cfg.model_dump(mode="json", exclude={"name", "output_dir", "sweep"})
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:10]


def members(
    spec: Spec,
    root: Path,
    overrides: dict[str, Any],
    sets: list[str] | None,
    confirm: bool = False,
    combos: list[dict[str, Any]] | None = None,
) -> list[Member]:
    """Every member with its full, validated config (base, then TRAIN OPTIONS, then its swept values):
    those of `combos` (a bayes sweep's proposals), else the spec's combinations."""
    combos = combinations(spec) if combos is None else combos
    if len(combos) > CONFIRM_ABOVE and not confirm:
        raise UserError(f"sweep {spec.name} has {len(combos):,} members; pass --yes to run that many")
    base = raw_config(spec.base, overrides, sets)
    # `threads: auto` (the default, and seed.yaml's) is one CPU thread in a sweep: a sweep uses the
    # cores through processes (packs.py), one per CPU, and one thread makes a member's numbers the
    # same in a pack of any size and equal to `mnist-dist train --config members/<id>/config.yaml`.
    # A number of threads set in the base, the options or the parameters is kept.
    if base.get("threads", "auto") == "auto":
        base["threads"] = 1
    out, seen = [], set()
    for index, params in enumerate(combos, 1):
        raw = json.loads(json.dumps(base))
        described = ", ".join(f"{k}={v}" for k, v in params.items())
        origin = f"sweep file {spec.path}: member {index} ({described})"
        for key, value in params.items():
            set_key(raw, key, value, f"{origin}: key '{key}'")
        cfg = build_config(raw, origin)
        mid = member_id(cfg)
        if mid in seen:
            continue  # a random draw or a grid that repeats a config: one run
        seen.add(mid)
        swept = {k: v for k, v in params.items() if k in spec.swept} or params
        update = {
            "name": f"{spec.name}-{mid}"[-64:].lstrip("-._") or mid,
            "output_dir": str(SweepDir(root).member(mid)),
            "sweep": {"name": spec.name, "member": mid, "params": swept},
        }
        out.append(Member(mid, params, TrainConfig.model_validate({**cfg.model_dump(mode="json"), **update})))
    return out


@dataclass
class Builder:
    """The members of given swept values (a bayes sweep's proposals; None: the spec's combinations),
    as `members` builds them from the spec, the options and `--set`s: plain data, so the workers of an
    adaptive sweep on SLURM build members as the CLI does."""

    spec: Spec
    root: Path
    overrides: dict[str, Any]
    sets: list[str] | None = None
    confirm: bool = False

    def __call__(self, combos: list[dict[str, Any]] | None = None) -> list[Member]:
        return members(self.spec, self.root, self.overrides, self.sets, self.confirm, combos)


def write_manifest(root: Path, spec: Spec, found: list[Member], **extra: Any) -> None:
    """sweep.json: what `status` and `results` read (no need of the spec file afterwards)."""
    from mnist_dist.store.atomic import write_atomic
    from mnist_dist.store.ownership import private_dir

    private_dir(root, "sweep dir")
    old = read_manifest(root) if SweepDir(root).manifest.is_file() else {}
    manifest = {
        "name": spec.name,
        "method": spec.method,
        "metric": spec.recorded_metric,
        **({"early_terminate": spec.early_terminate} if spec.early_terminate else {}),
        "swept": spec.swept,
        "spec": str(spec.path),
        "members": [{"id": m.id, "params": m.params} for m in found],
        **{k: v for k, v in old.items() if k in ("jobs",)},
        **extra,
    }
    write_atomic(SweepDir(root).manifest, json.dumps(manifest, indent=1) + "\n")
    if found and "tensorboard" in found[0].cfg.trackers:  # TensorBoard's HParams dashboard of the sweep
        from mnist_dist.track.tensorboard import write_hparams_config

        swept = {k: spec.parameters[k].config for k in spec.swept}
        with contextlib.suppress(ImportError):  # no tensorboard: each member's tracker says so
            write_hparams_config(root, swept, [m.cfg.seed for m in found])


def read_manifest(root: Path) -> dict[str, Any]:
    path = SweepDir(root).manifest
    if not path.is_file():
        raise UserError(
            f"{root} is not a sweep dir (no {SweepDir.MANIFEST}); pass the dir `mnist-dist sweep run` wrote"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable ({e}); run the sweep again to rewrite it") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("members"), list):
        raise UserError(f"{path} is not a sweep manifest; run the sweep again to rewrite it")
    return manifest
