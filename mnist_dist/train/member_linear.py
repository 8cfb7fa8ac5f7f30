"""The linear layer of a pack: each member i's F.linear(x_i, w_i, b_i), the members' weights stacked
row-wise: w [k * out, in] with member i's rows at i * out, b [k * out]; activations [k * B, features],
member-major (member i's rows at i * B). A pack of one is then nn.Linear's own layout.

A member must compute the same bits in a pack of any size as alone, on any CPU. A batched matmul
(torch.baddbmm) gives each member the product of its own matrices, but its backward computes the
weight gradient as another gemm (other operand order and transposition) than F.linear's, and whether
the two round alike depends on the kernel the CPU's BLAS takes: equal on an Intel Xeon's AVX-512
path, not on an AMD EPYC's, nor on MKL's AVX2 path of the same Xeon (tests/test_member_linear.py runs
each path it can).

So a member makes, one member at a time, the very calls F.linear and autograd's addmm backward make
for one run alone (torch/csrc/autograd/FunctionsManual.cpp, mm_mat1_backward, mm_mat2_backward):

    forward        torch.addmm(b, x, w.t())     F.linear's call for a 2-D input
    weight grad    torch.mm(gy.t(), x)          mm_mat2_backward of the transposed weight
    bias grad      gy.sum(0)                    sum_to of the broadcast bias
    input grad     torch.mm(gy, w)              mm_mat1_backward

with every operand starting on a 64-byte boundary, as a tensor of its own does (a BLAS may take
another path for misaligned data). A pack of one calls F.linear itself, with autograd's own backward
(a Python backward would slow every single run: bench/results/SINGLE.md); that MemberLinear's
backward is autograd's is what the kernel test checks, for every shape the engine uses.

`batched=True` computes all members with one batched matmul per product instead (baddbmm/bmm): a
GPU needs that for packs of hundreds (one kernel, not hundreds), and its products are not bitwise a
lone run's anyway.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

ALIGNMENT = 64  # bytes: torch's CPU allocator aligns every tensor so; MKL's reproducibility asks it


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` (contiguous), or a copy of it that starts on an ALIGNMENT boundary."""
    return t if t.data_ptr() % ALIGNMENT == 0 else t.clone()


def member_linear(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, members: int, shared: bool, batched: bool = False
) -> torch.Tensor:
    """[members * B, out]: each member's F.linear of its rows of x, or of all of x when `shared` (one
    input batch for every member)."""
    if members == 1:
        return F.linear(x, w, b)
    return MemberLinear.apply(x, w, b, members, shared, batched)


class MemberLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, k: int, shared: bool, batched: bool
    ) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.k, ctx.shared, ctx.batched = k, shared, batched
        ws, bs = w.view(k, -1, w.shape[1]), b.view(k, -1)
        if batched:
            xs = x.expand(k, *x.shape) if shared else x.view(k, -1, x.shape[1])
            return torch.baddbmm(bs.unsqueeze(1), xs, ws.transpose(1, 2)).view(-1, ws.shape[1])
        return torch.cat(
            [torch.addmm(bs[i], xi, _aligned(ws[i]).t()) for i, xi in enumerate(_inputs(x, k, shared))]
        )

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w = ctx.saved_tensors
        # Under autocast (bf16, fp16) the forward multiplied copies of x and w in gy's dtype, as the
        # backward of F.linear's addmm does; its weight and bias gradients are cast back by autograd.
        x, w = x.to(gy.dtype), w.to(gy.dtype)
        k, shared = ctx.k, ctx.shared
        ws = w.view(k, -1, w.shape[1])
        gys = gy.contiguous().view(k, -1, ws.shape[1])
        want_x = ctx.needs_input_grad[0]
        if ctx.batched:
            xs = x.expand(k, *x.shape) if shared else x.view(k, -1, x.shape[1])
            gw, gb = torch.bmm(gys.transpose(1, 2), xs).view_as(w), gys.sum(1).view(-1)
            gx = torch.bmm(gys, ws) if want_x else None
        else:
            gs = [_aligned(g) for g in gys]
            gw = torch.cat([torch.mm(g.t(), xi) for g, xi in zip(gs, _inputs(x, k, shared), strict=True)])
            gb = torch.cat([g.sum(0) for g in gs])
            gx = torch.stack([torch.mm(g, _aligned(ws[i])) for i, g in enumerate(gs)]) if want_x else None
        if gx is not None:  # one input seen by every member: its gradients add up
            gx = gx.sum(0) if shared else gx.view(-1, x.shape[1])
        return gx, gw, gb, None, None, None


def _inputs(x: torch.Tensor, k: int, shared: bool) -> list[torch.Tensor]:
    """Each member's input rows, aligned."""
    return [_aligned(x)] * k if shared else [_aligned(xi) for xi in x.view(k, -1, x.shape[1])]
