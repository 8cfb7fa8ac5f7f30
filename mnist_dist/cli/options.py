"""The training options shared by `train`, `submit` and `sweep run/submit`: defined once, each mapped
to its config key, and turned into the validated config (or the plain overrides a sweep builds on)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any

import typer

from mnist_dist.store.datafiles import SOURCES

Opt = typer.Option


# The training options, defined once for `train` and `submit`: name -> (annotation, config key).
TRAINING_OPTIONS: dict[str, tuple[Any, str | None]] = {
    "config": (
        Annotated[Path | None, Opt("--config", "-c", help="YAML config (default: the seed config).")],
        None,
    ),
    "output_dir": (Annotated[str | None, Opt(help="Run directory (default: runs/<name>).")], "output_dir"),
    "name": (Annotated[str | None, Opt(help="Run name.")], "name"),
    "seed": (Annotated[int | None, Opt(help="Training seed (init, shuffling).")], "seed"),
    "phases": (Annotated[str | None, Opt(help="Phases as EPOCHSxLR,... e.g. 5x0.5,5x0.1.")], "phases"),
    "batch_size": (
        Annotated[int | None, Opt(help="Global training batch (split across processes).")],
        "batch_size",
    ),
    "val_batch_size": (Annotated[int | None, Opt(help="Global validation batch.")], "val_batch_size"),
    "grad_accum": (Annotated[int | None, Opt(help="Micro-batches per optimizer step.")], "grad_accum"),
    "precision": (Annotated[str | None, Opt(help="no | bf16 | fp16.")], "precision"),
    "device": (Annotated[str | None, Opt(help="auto | cpu | cuda.")], "device"),
    "tracker": (
        Annotated[str | None, Opt(help="wandb | tensorboard | both: wandb,tensorboard | none.")],
        "tracker",
    ),
    "data_dir": (
        Annotated[str | None, Opt(help="MNIST data dir (default: $MNIST_DIST_DATA_DIR or ./data).")],
        "data.dir",
    ),
    "source": (Annotated[str | None, Opt(help=" | ".join(SOURCES) + ".")], "data.source"),
    "val_size": (Annotated[int | None, Opt(help="Validation images out of the 60,000.")], "data.val_size"),
    "progress": (Annotated[str | None, Opt(help="auto | on | off (auto: only on a terminal).")], "progress"),
    "threads": (
        Annotated[str | None, Opt(help="CPU threads per process: auto (what was allocated) or N.")],
        "threads",
    ),
    "wandb_project": (Annotated[str | None, Opt(help="W&B project.")], "wandb.project"),
    "set_": (
        Annotated[
            list[str] | None, Opt("--set", help="Any config key: --set data.split_seed=1 (repeatable).")
        ],
        None,
    ),
}


def _with_keywords(fn: Any, options: dict[str, tuple[Any, Any]], keep_rest: bool) -> Any:
    """`fn`'s signature with `options` (name -> (annotation, default)) as keywords after its own
    parameters; its **rest kept last when `keep_rest` (another decorator adds more), else dropped."""
    sig = inspect.signature(fn, eval_str=True)
    own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    rest = [p for p in sig.parameters.values() if keep_rest and p.kind is inspect.Parameter.VAR_KEYWORD]
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        for name, (annotation, default) in options.items()
    ]
    fn.__signature__ = sig.replace(parameters=own + extra + rest)
    return fn


def training_options(fn: Any) -> Any:
    """Give a command the training options (its own parameters first, then these, as keywords)."""
    return _with_keywords(fn, {name: (a, None) for name, (a, _) in TRAINING_OPTIONS.items()}, keep_rest=False)


def option_overrides(opts: dict[str, Any]) -> dict[str, Any]:
    """The named training options as dotted config keys (None: not given)."""
    from mnist_dist.config import parse_phases

    overrides = {key: opts.get(name) for name, (_, key) in TRAINING_OPTIONS.items() if key}
    if overrides["phases"]:
        overrides["phases"] = parse_phases(overrides["phases"])
    if overrides["threads"] and overrides["threads"].strip().isdigit():
        overrides["threads"] = int(overrides["threads"])
    return overrides


def config_from_options(opts: dict[str, Any]) -> Any:
    """The validated TrainConfig: --config (or the defaults), the named options, then --set."""
    from mnist_dist.config import load_config

    cfg = load_config(opts.get("config"), option_overrides(opts), opts.get("set_"))
    check_trackers(cfg)
    return cfg


def check_trackers(cfg: Any) -> None:
    """UserError when a tracker asked for is not installed (TensorBoard is optional), before anything
    trains: else each member of each pack would say so in a warning."""
    if "tensorboard" in cfg.trackers:
        from mnist_dist.track import tensorboard

        tensorboard.require(f"tracker {cfg.tracker!r}: ", ", or use --tracker wandb or none")


# The Slurm options `submit` and `sweep submit` share: name -> annotation (default None or False).
SLURM_OPTIONS: dict[str, Any] = {
    "partition": Annotated[str | None, Opt(help="Slurm partition (default: the cluster's default).")],
    "gpus_per_node": Annotated[int | None, Opt(help="GPUs per node (a sweep: per task; 0: CPU-only).")],
    "cpus_per_task": Annotated[
        int | None, Opt(help="CPUs per process, its threads follow them (default: 1 on CPU, 2 per GPU).")
    ],
    "mem": Annotated[str | None, Opt(help="Memory per node (a sweep: per task), e.g. 16G.")],
    "time": Annotated[str | None, Opt("--time", help="Time limit: minutes or HH:MM:SS (default 60).")],
    "account": Annotated[str | None, Opt(help="Slurm account.")],
    "qos": Annotated[str | None, Opt(help="Slurm QOS.")],
    "constraint": Annotated[str | None, Opt(help="Node features, e.g. a100.")],
    "job_name": Annotated[str | None, Opt(help="Job name (default: mnist-dist, a sweep's name).")],
    "allow_local": Annotated[
        bool, Opt(help="Allow a node-local output dir (/tmp...): one-machine clusters.")
    ],
}


def slurm_options(fn: Any) -> Any:
    """Give a command the Slurm options (after its own parameters), collected by `slurm_options_from`."""
    defaults = {name: (a, False if name == "allow_local" else None) for name, a in SLURM_OPTIONS.items()}
    return _with_keywords(fn, defaults, keep_rest=True)


def slurm_options_from(opts: dict[str, Any], job_name: str, **more: Any) -> Any:
    """The SlurmOptions of a command's options (taken out of `opts`), `job_name` the default name."""
    from mnist_dist.slurm.submit import SlurmOptions

    given = {name: opts.pop(name, None) for name in SLURM_OPTIONS}
    given["job_name"] = job_name if given["job_name"] is None else given["job_name"]
    return SlurmOptions(**{k: v for k, v in given.items() if v is not None}, **more)
