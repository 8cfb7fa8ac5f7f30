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
        self._rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._row_lr: dict[int, torch.Tensor] = {}
        self._shape_lrs()

    def set_lrs(self, lrs: torch.Tensor) -> None:
        """lrs: one per member, over all groups in order."""
        if any(g["lr"].device != g["params"][0].device for g in self.param_groups):
            self._shape_lrs()  # the parameters were moved after this optimizer was made
        start = 0
        for group in self.param_groups:
            size = group["lr"].numel()
            group["lr"].copy_(lrs[start : start + size])
            start += size
        for p, rows, lr in self._rows:
            rows.copy_(lr.repeat_interleave(p.shape[0] // lr.numel()).view_as(rows))

    def _shape_lrs(self) -> None:
        # Each group's lrs a float32 tensor on its parameters' device (a checkpoint loads them onto
        # the CPU; torch.optim.SGD's older ones held a float), and each parameter's lr per row, shaped
        # to broadcast over it: made once per change, not once a step.
        for group in self.param_groups:
            device = group["params"][0].device
            group["lr"] = torch.as_tensor(group["lr"], dtype=torch.float32, device=device).reshape(-1)
        self._rows = []
        for group in self.param_groups:
            lr = group["lr"]
            for p in group["params"]:
                rows = lr.repeat_interleave(p.shape[0] // lr.numel()).view(-1, *(1,) * (p.dim() - 1))
                self._rows.append((p, rows, lr))
        self._pairs = [(p, rows) for p, rows, _ in self._rows]
        self._row_lr = {id(p): rows for p, rows, _ in self._rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._shape_lrs()

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        self.update()

    def clear(self) -> None:
        """zero_grad(set_to_none=True) without its profiler record: what the engine calls."""
        for p, _ in self._pairs:
            p.grad = None

    @torch.no_grad()
    def update(self, finite: torch.Tensor | None = None) -> None:
        """The step itself, without torch.optim's per-call hooks and profiler record (a tenth of a
        small model's step on a CPU): what the engine calls. `finite` (one per member, from a grad
        scaler): members whose gradients were not finite keep their weights this step."""
        if finite is None:
            for p, lr in self._pairs:
                if p.grad is not None:
                    p.sub_(p.grad * lr)
            return
        keep = iter(self._by_group(finite))
        for group in self.param_groups:
            k, ok = group["lr"].numel(), next(keep).view(-1, 1)
            for p in group["params"]:
                if p.grad is not None:
                    step = (p.grad * self._row_lr[id(p)]).view(k, -1)
                    p.view(k, -1).sub_(torch.where(ok, step, 0.0))

    @torch.no_grad()
    def unscale_(self, inv_scale: torch.Tensor) -> torch.Tensor:
        """Each member's gradients times its `inv_scale` (one per member); returns which members'
        gradients are all finite."""
        finite = []
        for group, inv in zip(self.param_groups, self._by_group(inv_scale), strict=True):
            k = inv.numel()
            ok = torch.ones(k, dtype=torch.bool, device=inv.device)
            for p in group["params"]:
                if p.grad is not None:
                    grad = p.grad.view(k, -1)
                    grad.mul_(inv.view(k, 1))
                    ok &= torch.isfinite(grad).all(dim=1)
            finite.append(ok)
        return torch.cat(finite)

    def _by_group(self, per_member: torch.Tensor) -> list[torch.Tensor]:
        """A tensor of one value per member, cut into each group's part."""
        return list(per_member.split([g["lr"].numel() for g in self.param_groups]))
