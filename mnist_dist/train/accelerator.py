"""The Accelerator of a run, made once per process: the launcher's environment put right first,
Accelerate's questions about compiled and sharded models answered without importing the parts of
torch that hold the answers, and the device and precision the config asks for checked.

The only module that imports Accelerate (its version aside, read for run.json): the engine gets
what it uses of Accelerate from here.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, gather_object, set_seed

from mnist_dist.config import TrainConfig
from mnist_dist.errors import UserError

if TYPE_CHECKING:
    from mnist_dist.train.member_scaler import MemberGradScaler

__all__ = [
    "Accelerator",
    "DistributedType",
    "gather_object",
    "make_accelerator",
    "set_seed",
    "step_functions",
    "unwrap",
]

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


# What each of Accelerate's questions below needs imported before its answer can be yes.
_ANSWERED_BY = {
    "is_compiled_module": ("torch._dynamo",),
    "has_compiled_regions": ("torch._dynamo",),
    "model_has_dtensor": ("torch.distributed.tensor", "torch.distributed._tensor"),
}


def _no_needless_imports() -> None:
    """Accelerate asks whether a model was compiled (`torch._dynamo...`) or holds DTensors (`from
    torch.distributed.tensor import DTensor`) when it prepares or saves one, and each question
    imports a large part of torch (torch._dynamo pulls in FSDP and sympy too): seconds of every
    process's start-up (bench/results/SUITE.md) in a project that never compiles or shards. A module
    can only be compiled, or hold a DTensor, once that part of torch is imported: ask sys.modules
    first, the same answers without the imports (tests/test_train.py checks they stay out)."""
    import accelerate.accelerator
    from accelerate.utils import other

    for module in (other, accelerate.accelerator):
        for name, needed in _ANSWERED_BY.items():
            asks = getattr(module, name, None)
            if asks is None or hasattr(asks, "__wrapped__"):
                continue

            @functools.wraps(asks)
            def sooner(model: torch.nn.Module, asks: Any = asks, needed: tuple = needed) -> bool:
                return any(part in sys.modules for part in needed) and asks(model)

            setattr(module, name, sooner)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP's wrapper (with several processes), else `model`. Not
    Accelerator.unwrap_model, which imports FSDP's package to ask whether it is one of its."""
    ddp = torch.nn.parallel.DistributedDataParallel
    return model.module if isinstance(model, ddp) else model


def make_accelerator(cfg: TrainConfig, run_dir: Path) -> Accelerator:
    """The Accelerator for this config; device and precision are checked here and nowhere else."""
    _no_world_of_one()
    _no_needless_imports()
    # What the first backward with a gradient tensor imports (torch/autograd/__init__.py, _make_grads:
    # sympy, most of a second), imported here, before the training clock, not in epoch 1.
    importlib.import_module("torch.fx.experimental.symbolic_shapes")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was asked for but no GPU is visible; use --device auto or cpu")
    if cfg.precision == "fp16" and not torch.cuda.is_available():
        raise UserError("precision 'fp16' needs a GPU (no fp16 autocast on CPU); use --precision bf16 or no")
    log_with = ["wandb"] if "wandb" in cfg.trackers else []  # TensorBoard is written by track/tensorboard.py
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Accelerator(
            # Without cpu=True, a CPU-only `accelerate launch --multi_gpu` run would report 1 process.
            cpu=cfg.device == "cpu" or not torch.cuda.is_available(),
            mixed_precision=cfg.precision,
            log_with=log_with,
            project_config=ProjectConfiguration(project_dir=str(run_dir)),
        )


def step_functions(accelerator: Accelerator, optimizer: Any, scaler: MemberGradScaler | None) -> tuple:
    """(optimizer step, zero_grad, backward(loss, gradient)) for the prepared optimizer.

    Accelerate's optimizer wrapper and backward add per-call work that costs more than this model's
    whole step on a CPU (bench/results/OPTIMISATION.md), and do nothing else here without a grad
    scaler of Accelerate's (fp16's is the engine's own, per member). So call what they wrap:
    MemberOptimizer's step and zero_grad, without torch.optim's hooks and profiler records. XLA keeps
    Accelerate's.
    """
    if accelerator.distributed_type == DistributedType.XLA:
        return optimizer.step, functools.partial(optimizer.zero_grad, set_to_none=True), accelerator.backward
    inner = optimizer.optimizer
    if scaler is None:
        return inner.update, inner.clear, torch.Tensor.backward

    def scaled_backward(loss: torch.Tensor, gradient: torch.Tensor) -> None:
        loss.backward(gradient=scaler.loss_gradient(gradient))

    return functools.partial(scaler.step, inner), inner.clear, scaled_backward
