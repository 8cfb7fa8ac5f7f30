"""SGD with one learning rate per pack member: the tutorial's optimizer (no momentum, no weight
decay) over parameters whose first dimension holds the members' rows, k equal blocks (model.py).

Each parameter group holds `lr`, a tensor with one value per member of the group's parameters, and
the update is `p -= grad * lr[member of the row]`: a multiply, then a subtract, each rounded exactly
once, so a member's new weights are the same bits in a pack of any size (torch.optim.SGD's fused
multiply-add would be too, but it takes one lr per tensor). A frozen member (its loss went
non-finite) has lr 0. The lrs, and each parameter's lr per row, are updated in place: a captured
CUDA-graph step reads them by address.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


class MemberSGD(torch.optim.Optimizer):
    """`groups`: lists of parameters whose dimension 0 holds the members' rows (a single run's: its
    own parameters), `lrs`: each group's lrs, one per member."""

    def __init__(self, groups: Iterable[list[torch.nn.Parameter]], lrs: Iterable[torch.Tensor]) -> None:
        param_groups = [{"params": params, "lr": lr} for params, lr in zip(groups, lrs, strict=True)]
        super().__init__(param_groups, {})
        # Per parameter: (it, its lr per row, its members' first index over all groups, their count).
        self._params: list[tuple[torch.Tensor, torch.Tensor, int, int]] = []
        self._shape_lrs()

    # torch.optim.Optimizer wraps these in torch._disable_dynamo, whose first call imports
    # torch._dynamo: seconds of every run's start-up (bench/results/SUITE.md), for an optimizer that
    # is never compiled. The methods themselves, unwrapped:
    add_param_group = torch.optim.Optimizer.add_param_group.__wrapped__  # type: ignore[attr-defined]
    state_dict = torch.optim.Optimizer.state_dict.__wrapped__  # type: ignore[attr-defined]

    def set_lrs(self, lrs: torch.Tensor) -> None:
        """lrs: one per member, over all groups in order."""
        if any(g["lr"].device != g["params"][0].device for g in self.param_groups):
            self._shape_lrs()  # the parameters were moved after this optimizer was made
        start = 0
        for group in self.param_groups:
            size = group["lr"].numel()
            group["lr"].copy_(lrs[start : start + size])
            start += size
        for p, rows, first, k in self._params:
            rows.copy_(lrs[first : first + k].repeat_interleave(p.shape[0] // k).view_as(rows))

    def _shape_lrs(self) -> None:
        # Each group's lrs a float32 tensor on its parameters' device (a checkpoint loads them onto
        # the CPU), and each parameter's lr per row, shaped to broadcast over it: made once per
        # change, not once a step.
        self._params, first = [], 0
        for group in self.param_groups:
            device = group["params"][0].device
            lr = group["lr"] = torch.as_tensor(group["lr"], dtype=torch.float32, device=device).reshape(-1)
            for p in group["params"]:
                rows = lr.repeat_interleave(p.shape[0] // lr.numel()).view(-1, *(1,) * (p.dim() - 1))
                self._params.append((p, rows, first, lr.numel()))
            first += lr.numel()

    def regroup(self, groups: list[list[torch.nn.Parameter]], lrs: list[torch.Tensor]) -> None:
        """The pack's members changed (MnistPack.relayout): these are its groups' parameters now,
        with each group's lrs. Plain SGD keeps no state per parameter, so nothing else moves."""
        self.param_groups = [{"params": list(ps), "lr": lr} for ps, lr in zip(groups, lrs, strict=True)]
        self.state.clear()
        self._shape_lrs()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.optim.Optimizer.load_state_dict.__wrapped__(self, state_dict)  # type: ignore[attr-defined]
        self._shape_lrs()

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        self.update()

    def clear(self) -> None:
        """zero_grad(set_to_none=True) without its profiler record: what the engine calls."""
        for p, *_ in self._params:
            p.grad = None

    @torch.no_grad()
    def update(self, finite: torch.Tensor | None = None) -> None:
        """The step itself, without torch.optim's per-call hooks and profiler record (a cost the size
        of a small model's step on a CPU: bench/results/OPTIMISATION.md): what the engine calls.
        `finite` (one per member, from a grad scaler): members whose gradients were not finite keep
        their weights this step."""
        for p, rows, first, k in self._params:
            if p.grad is None:
                continue
            step = p.grad * rows
            if finite is not None:
                keep = finite[first : first + k].view(k, 1)
                step = torch.where(keep, step.view(k, -1), 0.0).view_as(p)
            p.sub_(step)

    @torch.no_grad()
    def unscale_(self, inv_scale: torch.Tensor) -> torch.Tensor:
        """Each member's gradients times its `inv_scale` (one per member); returns which members'
        gradients are all finite."""
        finite = torch.ones_like(inv_scale, dtype=torch.bool)
        for p, _, first, k in self._params:
            if p.grad is not None:
                grad = p.grad.view(k, -1)
                grad.mul_(inv_scale[first : first + k].view(k, 1))
                finite[first : first + k] &= torch.isfinite(grad).all(dim=1)
        return finite
