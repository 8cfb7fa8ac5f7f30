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
    def __init__(self, groups: Iterable[list[torch.nn.Parameter]], lrs: Iterable[torch.Tensor]) -> None:
        param_groups = [{"params": params, "lr": lr} for params, lr in zip(groups, lrs, strict=True)]
        super().__init__(param_groups, {})

    def set_lrs(self, lrs: torch.Tensor) -> None:
        """lrs: one per member, over all groups in order."""
        start = 0
        for group in self.param_groups:
            size = group["params"][0].shape[0]
            group["lr"] = lrs[start : start + size].clone()
            start += size

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            lr = group["lr"]
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(p.grad * lr.view(-1, *(1,) * (p.dim() - 1)))
