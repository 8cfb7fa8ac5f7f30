"""The linear layer of a pack: y[i] = x[i] @ w[i].T + b[i] for every member i, with its own backward.

Why its own backward: a member must compute the same bits in a pack of any size as alone, on any
CPU. A batched matmul (torch.baddbmm) gives each member the product of its own matrices, but its
backward computes the weight gradient as a different gemm (other operand order and transposition)
from F.linear's, and whether the two round alike depends on the BLAS kernel the CPU is dispatched to:
equal on an Intel Xeon's AVX-512 path, not on an AMD EPYC's, nor on MKL's AVX2 path on the same
Intel machine (tests/test_member_linear.py runs each path it can).

So, by construction rather than by a kernel's dispatch, each member's forward and gradients are the
very calls that F.linear and autograd's addmm backward make for one 2-D input, one member at a time:

    forward        torch.addmm(b, x, w.t())          (F.linear's call for a 2-D input)
    weight grad    torch.mm(gy.t(), x)               (mm_mat2_backward of the transposed weight)
    bias grad      gy.sum(0)                         (sum_to of the broadcast bias)
    input grad     torch.mm(gy, w)                   (mm_mat1_backward)

with every operand and result starting on a 64-byte boundary, as a tensor of its own would (a BLAS
may take another path for misaligned data). A pack of one (a single run) runs the same code, so it
is F.linear's arithmetic, and a member of any pack is that run's.

`batched=True` computes all members with one batched matmul per product instead (baddbmm/bmm): fewer
kernel launches, which a GPU needs for packs of hundreds, and no promise of the same bits (a GPU's
products are not bitwise a lone run's anyway).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

ALIGNMENT = 64  # bytes: torch's CPU allocator aligns every tensor so; MKL's reproducibility asks it


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` (contiguous), or a copy of it that starts on an ALIGNMENT boundary."""
    return t if t.data_ptr() % ALIGNMENT == 0 else t.clone()


def _into(out: torch.Tensor, op: Callable[..., torch.Tensor], *args: Any) -> None:
    """out = op(*args), computed in place when `out` is aligned, else into a fresh tensor and copied."""
    if out.data_ptr() % ALIGNMENT == 0:
        op(*args, out=out)
    else:
        out.copy_(op(*args))


class MemberLinear(torch.autograd.Function):
    """x: [B, in] (one input for every member) or [k, B, in]; w: [k, out, in]; b: [k, out] ->
    y: [k, B, out]."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, batched: bool) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.batched = batched
        k, shared = w.shape[0], x.dim() == 2
        if batched:
            xs = x.expand(k, *x.shape) if shared else x
            return torch.baddbmm(b.unsqueeze(1), xs, w.transpose(1, 2))
        y = x.new_empty(k, x.shape[-2], w.shape[1])
        for i in range(k):
            _into(y[i], torch.addmm, b[i], x if shared else _aligned(x[i]), _aligned(w[i]).t())
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w = ctx.saved_tensors
        k, shared = w.shape[0], x.dim() == 2
        want_x = ctx.needs_input_grad[0]
        gy = gy.contiguous()
        if ctx.batched:
            xs = x.expand(k, *x.shape) if shared else x
            gx = torch.bmm(gy, w) if want_x else None
            gw, gb = torch.bmm(gy.transpose(1, 2), xs), gy.sum(1)
        else:
            gw, gb = torch.empty_like(w), w.new_empty(k, w.shape[1])
            gx = w.new_empty(k, x.shape[-2], x.shape[-1]) if want_x else None
            for i in range(k):
                g = _aligned(gy[i])
                _into(gw[i], torch.mm, g.t(), x if shared else _aligned(x[i]))
                _into(gb[i], torch.sum, g, 0)
                if gx is not None:
                    _into(gx[i], torch.mm, g, _aligned(w[i]))
        if gx is not None and shared:  # one input seen by every member: its gradients add up
            gx = gx.sum(0)
        return gx, gw, gb, None


def member_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, batched: bool = False) -> torch.Tensor:
    """Each member's F.linear(x[i], w[i], b[i]), stacked: [k, B, out]."""
    return MemberLinear.apply(x, w, b, batched)
