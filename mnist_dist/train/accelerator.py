"""The Accelerator of a run, made once per process: the launcher's environment put right first, and
the device and precision the config asks for checked.

The only module that imports Accelerate (its version aside, read for run.json): the engine gets
what it uses of Accelerate from here.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, gather_object, set_seed

from mnist_dist.config import TrainConfig
from mnist_dist.errors import UserError

__all__ = ["Accelerator", "DistributedType", "gather_object", "make_accelerator", "set_seed"]

# What torchrun, `accelerate launch --multi_gpu` and submitit export for torch.distributed.
_WORLD_ENV = (
    "RANK",
    "LOCAL_RANK",
    "GROUP_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def _no_world_of_one() -> None:
    """A world of one process needs no process group: without this, Accelerate builds a gloo (or
    NCCL) group of one and wraps the model in DDP: a collective per step for nothing to share."""
    if os.environ.get("WORLD_SIZE", "").strip() == "1":
        for name in _WORLD_ENV:
            os.environ.pop(name, None)


def make_accelerator(cfg: TrainConfig, run_dir: Path) -> Accelerator:
    """The Accelerator for this config; device and precision are checked here and nowhere else."""
    _no_world_of_one()
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was asked for but no GPU is visible; use --device auto or cpu")
    if cfg.precision == "fp16" and not torch.cuda.is_available():
        raise UserError("precision 'fp16' needs a GPU (no fp16 autocast on CPU); use --precision bf16 or no")
    log_with = [] if cfg.tracker == "none" else [cfg.tracker]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Accelerator(
            # Without cpu=True, a CPU-only `accelerate launch --multi_gpu` run would report 1 process.
            cpu=cfg.device == "cpu" or not torch.cuda.is_available(),
            mixed_precision=cfg.precision,
            log_with=log_with,
            project_config=ProjectConfiguration(
                project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")
            ),
        )
