"""The training options shared by `train`, `submit` and `sweep run/submit`: defined once, each mapped
to its config key, and turned into the validated config (or the plain overrides a sweep builds on)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any

import typer

from mnist_dist.datafiles import SOURCES

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
    "tracker": (Annotated[str | None, Opt(help="wandb | tensorboard | none.")], "tracker"),
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


def training_options(fn: Any) -> Any:
    """Give a command the training options (its own parameters first, then these, as keywords)."""
    sig = inspect.signature(fn, eval_str=True)
    own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
        for name, (annotation, _) in TRAINING_OPTIONS.items()
    ]
    fn.__signature__ = sig.replace(parameters=own + extra)
    return fn


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

    return load_config(opts.get("config"), option_overrides(opts), opts.get("set_"))
