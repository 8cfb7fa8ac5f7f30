"""The update rules of MemberOptimizer (member_optimizer.py): torch.optim's single-tensor steps of
SGD (momentum, Nesterov, weight decay), Adam and AdamW for the [k, n] rows of a group's k members,
each hyperparameter one value per member ([k, 1]). Every operation rounds once, whatever an element's
position; members are selected with torch.where only where they differ (`kinds`, known from their
configs) or where one does not step (frozen, or skipped by a grad scaler), and intermediates go into
scratch tensors kept between steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

HYPER = ("momentum", "nesterov", "weight_decay", "one_minus_beta1", "beta2", "one_minus_beta2", "eps")


def hyper(settings: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """A group's hyperparameters, one value per member, each computed as torch.optim computes it (in
    double: `1 - beta1`) and rounded to float32 as its kernels take a scalar."""
    betas = [s["betas"] for s in settings]
    values = {
        "momentum": [s["momentum"] for s in settings],
        "nesterov": [float(s["nesterov"]) for s in settings],
        "weight_decay": [s["weight_decay"] for s in settings],
        "one_minus_beta1": [1 - b[0] for b in betas],
        "beta2": [b[1] for b in betas],
        "one_minus_beta2": [1 - b[1] for b in betas],
        "eps": [s["eps"] for s in settings],
    }
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()}


def adam_scalars(
    settings: list[dict[str, Any]], lrs: list[float], steps: list[float], on: list[bool], device: torch.device
) -> dict[str, torch.Tensor]:
    """Per member (its settings, lr as set, 0 if frozen, step count so far, whether it steps now),
    what torch's Adam computes in Python each step from the step count t, in double and rounded to
    float32 as its kernels take it: -lr / (1 - beta1^t) and sqrt(1 - beta2^t)."""
    neg_step, bc2_sqrt = [], []
    for s, lr, done, now in zip(settings, lrs, steps, on, strict=True):
        beta1, beta2 = s["betas"]
        t = done + 1.0 if now else max(done, 1.0)
        neg_step.append(-(lr / (1 - beta1**t)))
        bc2_sqrt.append((1 - beta2**t) ** 0.5)
    k = len(settings)
    return {
        "neg_step": torch.tensor(neg_step, dtype=torch.float32, device=device).view(k, 1),
        "bc2_sqrt": torch.tensor(bc2_sqrt, dtype=torch.float32, device=device).view(k, 1),
    }


def fresh(p: torch.Tensor, k: int, name: str) -> torch.Tensor:
    """A new member's state row. Adam's moments start at 0, as torch's. torch's SGD makes the first
    step's buffer the gradient itself, then `buf * momentum + grad`: a buffer of -0.0 makes the first
    step that too, exactly (-0 times any momentum is -0, and -0 + x is x for every x), so no step is
    a special case."""
    return torch.full_like(p.view(k, -1)[:1], -0.0 if name == "momentum_buffer" else 0.0)


def kinds(settings: list[dict[str, Any]]) -> dict[str, str]:
    """For each choice a member's hyperparameters make, whether it is true of none, all or some
    (`mixed`, selected per member by torch.where) of a group's members: known from the configs, so
    a step computes only what some member needs, and selects only where members differ."""

    def kind(values: list[bool]) -> str:
        return "all" if all(values) else "mixed" if any(values) else "none"

    return {
        "weight_decay": kind([bool(s["weight_decay"]) for s in settings]),
        "momentum": kind([bool(s["momentum"]) for s in settings]),
        "nesterov": kind([bool(s["nesterov"]) for s in settings]),
        # torch's lerp takes `start + w * (end - start)` for weights w below 0.5, else the other form;
        # it compares the weight as its kernel takes it, rounded to float32 (1 - beta1 just below 0.5
        # in double can be 0.5 in float32).
        "small": kind([abs(_float32(1 - s["betas"][0])) < 0.5 for s in settings]),
    }


def _float32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


def _pick(
    kind: str,
    cond: Callable[[], torch.Tensor],
    yes: Callable[[], torch.Tensor],
    no: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """yes() for the members where cond(), no() for the others: `kind` says which exist."""
    if kind == "all":
        return yes()
    if kind == "none":
        return no()
    return torch.where(cond(), yes(), no())


def sgd(
    p: torch.Tensor,
    g: torch.Tensor,
    state: dict[str, torch.Tensor],
    h: dict[str, torch.Tensor],
    kinds: dict[str, str],
    active: torch.Tensor | None,
    work: list[torch.Tensor],
) -> None:
    """torch.optim.SGD's _single_tensor_sgd (dampening 0, maximize off) for [k, n] rows of k members;
    `active`: the members that step (None: every one); `work`: 2 scratch tensors of p's shape."""
    m, wd, grad = h["momentum"], h["weight_decay"], g
    # grad.add(param, alpha=weight_decay)
    decayed = lambda: torch.mul(p, wd, out=work[0]).add_(grad)  # noqa: E731
    g = _pick(kinds["weight_decay"], lambda: wd != 0, decayed, lambda: grad)
    if state:  # some member has momentum: buf.mul_(momentum).add_(grad)
        buf = state["momentum_buffer"].view_as(p)
        if active is None:
            buf.mul_(m).add_(g)
        else:
            buf.copy_(torch.where(active, buf * m + g, buf))
        # grad.add(buf, alpha=momentum) with Nesterov, else buf
        nesterov = lambda: torch.mul(buf, m, out=work[1]).add_(g)  # noqa: E731
        d = _pick(kinds["nesterov"], lambda: h["nesterov"] != 0, nesterov, lambda: buf)
        plain = g
        g = _pick(kinds["momentum"], lambda: m != 0, lambda: d, lambda: plain)
    step = torch.mul(g, h["lr"], out=work[0] if g is not work[0] else work[1])  # param.add_(grad, alpha=-lr)
    p.sub_(step if active is None else torch.where(active, step, 0.0))


def adam(
    p: torch.Tensor,
    g: torch.Tensor,
    state: dict[str, torch.Tensor],
    h: dict[str, torch.Tensor],
    adam: dict[str, torch.Tensor],
    kinds: dict[str, str],
    decoupled: bool,
    active: torch.Tensor | None,
    work: list[torch.Tensor],
) -> None:
    """torch.optim.Adam's / AdamW's _single_tensor_adam (amsgrad, maximize off) for [k, n] rows; in
    place where every member steps (the same operations, fewer passes over memory); `work`: 3
    scratch tensors of p's shape."""
    wd, w, grad = h["weight_decay"], h["one_minus_beta1"], g

    def kept(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        return new if active is None else torch.where(active, new, old)

    if decoupled and kinds["weight_decay"] != "none":  # param.mul_(1 - lr * weight_decay)
        p.copy_(kept(_pick(kinds["weight_decay"], lambda: wd != 0, lambda: p * h["decay"], lambda: p), p))
    elif not decoupled:  # grad.add(param, alpha=weight_decay)
        decayed = lambda: torch.mul(p, wd, out=work[2]).add_(grad)  # noqa: E731
        g = _pick(kinds["weight_decay"], lambda: wd != 0, decayed, lambda: grad)
    exp_avg, exp_avg_sq = state["exp_avg"].view_as(p), state["exp_avg_sq"].view_as(p)
    # exp_avg.lerp_(grad, 1 - beta1): torch's lerp takes one of two forms by the weight's size.
    diff = torch.sub(g, exp_avg, out=work[0])
    if active is None and kinds["small"] == "all":
        exp_avg.add_(diff.mul_(w))
    else:
        small, large = (lambda: exp_avg + w * diff), (lambda: g - diff * (1 - w))
        exp_avg.copy_(kept(_pick(kinds["small"], lambda: w.abs() < 0.5, small, large), exp_avg))
    # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    square = torch.mul(g, h["one_minus_beta2"], out=work[1]).mul_(g)
    if active is None:
        exp_avg_sq.mul_(h["beta2"]).add_(square)
    else:
        exp_avg_sq.copy_(torch.where(active, exp_avg_sq * h["beta2"] + square, exp_avg_sq))
    # denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    # param.addcdiv_(exp_avg, denom, value=-step_size)
    denom = torch.sqrt(exp_avg_sq, out=work[1]).div_(adam["bc2_sqrt"]).add_(h["eps"])
    update = torch.mul(exp_avg, adam["neg_step"], out=work[0]).div_(denom)
    if active is None:
        p.add_(update)
    else:
        p.copy_(torch.where(active, p + update, p))
