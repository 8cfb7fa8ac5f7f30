"""SGD with one learning rate per pack member: the tutorial's optimizer (no momentum, no weight
decay) over parameters whose first dimension is the member.

Each parameter group holds `lr`, a tensor with one value per member of the group's parameters, and
the update is `p -= grad * lr[member]`: a multiply, then a subtract, each rounded exactly once, so a
member's new weights are the same bits in a pack of any size (torch.optim.SGD's fused multiply-add
would be too, but it takes one lr per tensor). A frozen member (its loss went non-finite) has lr 0.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


class MemberSGD(torch.optim.Optimizer):
    """`groups`: lists of parameters whose dimension 0 is the member (a single run's: its own
    parameters), `lrs`: each group's lrs, one per member."""

    def __init__(self, groups: Iterable[list[torch.nn.Parameter]], lrs: Iterable[torch.Tensor]) -> None:
        param_groups = [{"params": params, "lr": lr} for params, lr in zip(groups, lrs, strict=True)]
        super().__init__(param_groups, {})
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._shape_lrs()

    def set_lrs(self, lrs: torch.Tensor) -> None:
        """lrs: one per member, over all groups in order."""
        start = 0
        for group in self.param_groups:
            size = group["lr"].numel()
            group["lr"] = lrs[start : start + size].clone()
            start += size
        self._shape_lrs()

    def _shape_lrs(self) -> None:
        # Each parameter with its lrs shaped to broadcast over it, once per change, not once a step.
        self._pairs = [
            (p, group["lr"].view(-1, *(1,) * (p.dim() - 1)))
            for group in self.param_groups
            for p in group["params"]
        ]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # torch.optim.SGD's, in a single run's older checkpoints
            if not isinstance(group["lr"], torch.Tensor):
                group["lr"] = torch.tensor([group["lr"]], dtype=torch.float32)
        self._shape_lrs()

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        self.update()

    def clear(self) -> None:
        """zero_grad(set_to_none=True) without its profiler record: what the engine calls."""
        for p, _ in self._pairs:
            p.grad = None

    @torch.no_grad()
    def update(self) -> None:
        """The step itself, without torch.optim's per-call hooks and profiler record (a tenth of a
        small model's step on a CPU): what the engine calls when no grad scaler is in between."""
        for p, lr in self._pairs:
            if p.grad is not None:
                p.sub_(p.grad * lr)
