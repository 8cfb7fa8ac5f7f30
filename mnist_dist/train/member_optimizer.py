"""The optimizer of a pack, one set of hyperparameters per member: torch.optim's SGD (momentum,
Nesterov, weight decay), Adam and AdamW, over parameters whose first dimension holds the members'
rows, k equal blocks (model.py). A single run is a pack of one.

Each hyperparameter is a tensor with one value per member, broadcast over the member's rows, and the
update is the sequence of operations torch.optim's single-tensor step makes (foreach off), each
rounded once: multiplies, adds, divides and square roots of whole tensors, which give an element the
same bits wherever it sits in a tensor; members whose settings differ, and members a step leaves
alone (frozen, or whose gradients were not finite), are selected with torch.where, not multiplied by
0 (the rules: member_steps.py). So a member's weights and state are the same bits in a pack of any
size. torch.optim's own kernels take its scalar hyperparameters in
fused forms (`add(x, alpha=a)`, `lerp`, `addcmul`), which on AVX2/AVX-512 kernels compute a multiply-add
with one rounding in their vector loop and two in the scalar tail: torch.optim itself gives an element
different bits by where it falls, so a pack cannot use it. On ATen's DEFAULT kernels
(ATEN_CPU_CAPABILITY=default), where nothing fuses, a run here is torch.optim's to the bit
(tests/test_optimizers.py); on the others it differs from torch.optim in the last bits, as torch.optim
differs from itself.

The tutorial's plain SGD (no momentum, no weight decay) takes the shortest path (`p -= grad * lr`).
A frozen member (its loss went non-finite) has lr 0 and its state stays as it was. The lrs, and every tensor a
step reads, are updated in place: a captured CUDA-graph step reads them by address (plain SGD and
SGD with momentum; Adam computes its bias corrections on the host each step, so it runs eagerly).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from mnist_dist.config import OptimizerConfig
from mnist_dist.train.member_steps import HYPER, adam, adam_scalars, fresh, hyper, kinds, sgd

PLAIN: dict[str, Any] = OptimizerConfig().model_dump()  # the tutorial's SGD; settings are such dumps


class MemberOptimizer(torch.optim.Optimizer):
    """`groups`: lists of parameters whose dimension 0 holds the members' rows (a single run's: its
    own parameters), `lrs`: each group's lrs, one per member; `settings`: each member's optimizer
    (config.OptimizerConfig's dump), over all groups in order, all of one `name`; None: plain SGD."""

    def __init__(
        self,
        groups: Iterable[list[torch.nn.Parameter]],
        lrs: Iterable[torch.Tensor],
        settings: list[dict[str, Any]] | None = None,
    ) -> None:
        groups, lrs = [list(g) for g in groups], [torch.as_tensor(lr).reshape(-1) for lr in lrs]
        self.host_lrs = [float(x) for lr in lrs for x in lr.tolist()]  # as configured: Adam's step uses them
        settings = list(settings) if settings is not None else [PLAIN] * len(self.host_lrs)
        names = {s["name"] for s in settings}
        if len(names) > 1:
            raise ValueError(f"one optimizer per pack, not {sorted(names)}")
        self.name = names.pop() if names else "sgd"
        self.settings = settings
        super().__init__(self._param_groups(groups, lrs, [None] * len(self.settings)), {})
        self._stack_state([None] * len(self.settings))
        self._shape()

    # torch.optim.Optimizer wraps these in torch._disable_dynamo, whose first call imports
    # torch._dynamo: seconds of every run's start-up (bench/results/SUITE.md), for an optimizer that
    # is never compiled. The methods themselves, unwrapped:
    add_param_group = torch.optim.Optimizer.add_param_group.__wrapped__  # type: ignore[attr-defined]
    state_dict = torch.optim.Optimizer.state_dict.__wrapped__  # type: ignore[attr-defined]

    @property
    def settings(self) -> list[dict[str, Any]]:
        return self._settings

    @settings.setter
    def settings(self, settings: list[dict[str, Any]]) -> None:
        self._settings = settings
        # Whether it keeps a state per parameter (momentum buffers, Adam's moments): a member's state
        # is then more than its weights (early_termination.py moves only stateless members).
        self.stateful = self.name != "sgd" or any(s["momentum"] > 0 for s in settings)
        # The tutorial's SGD for every member: no momentum, no weight decay.
        self.plain = not self.stateful and not any(s["weight_decay"] for s in settings)

    def _param_groups(
        self, groups: list[list[torch.nn.Parameter]], lrs: list[torch.Tensor], carried: list[Any]
    ) -> list[dict[str, Any]]:
        """Each group with its members' lrs, hyperparameters and step counts (`carried`: each
        member's member_state(), or None for a fresh one)."""
        param_groups, start = [], 0
        for params, lr in zip(groups, lrs, strict=True):
            k = lr.numel()
            group = {"params": params, "lr": lr, **hyper(self.settings[start : start + k])}
            group["step"] = torch.tensor([m["step"] if m else 0.0 for m in carried[start : start + k]])
            param_groups.append(group)
            start += k
        return param_groups

    def _stack_state(self, carried: list[dict[Any, Any] | None]) -> None:
        """Each member's state (`carried`, or zeros for a fresh one) stacked into its parameters'."""
        if not self.stateful:
            return
        start = 0
        for group in self.param_groups:
            k = group["lr"].numel()
            mine = carried[start : start + k]
            for i, p in enumerate(group["params"]):
                self.state[p] = {
                    name: torch.cat(
                        [m[i][name].to(p.device) if m else fresh(p, k, name) for m in mine]
                    ).view_as(p)
                    for name in self._buffers()
                }
            start += k

    def _buffers(self) -> tuple[str, ...]:
        return ("momentum_buffer",) if self.name == "sgd" else ("exp_avg", "exp_avg_sq")

    def set_lrs(self, lrs: list[float], alive: torch.Tensor | None = None) -> None:
        """lrs: one per member, over all groups in order; `alive` (1 or 0 per member): 0 makes a
        member's lr 0 (frozen)."""
        self.host_lrs = [float(x) for x in lrs]
        if any(g["lr"].device != g["params"][0].device for g in self.param_groups):
            self._shape()  # the parameters were moved after this optimizer was made
        device = self.param_groups[0]["params"][0].device
        values = torch.tensor(self.host_lrs, dtype=torch.float32, device=device)
        if alive is not None:
            values = values * alive  # lrs are finite: x 1 or x 0 exactly
        start = 0
        for group in self.param_groups:
            size = group["lr"].numel()
            group["lr"].copy_(values[start : start + size])
            start += size
        for p, rows, first, k in self._params:
            rows.copy_(values[first : first + k].repeat_interleave(p.shape[0] // k).view_as(rows))
        self._derive()

    def _derive(self) -> None:
        """What follows from the lrs: who is alive (lr 0: frozen), and AdamW's decoupled decay
        `1 - lr * weight_decay`, computed as torch computes it."""
        self._alive = [lr != 0 for g in self.param_groups for lr in g["lr"].tolist()]
        for start, group in zip(self._starts, self.param_groups, strict=True):
            k = group["lr"].numel()
            lrs, settings = self.host_lrs[start : start + k], self.settings[start : start + k]
            decay = [1 - lr * s["weight_decay"] for lr, s in zip(lrs, settings, strict=True)]
            group["decay"].copy_(torch.tensor(decay, dtype=torch.float32))

    def _shape(self) -> None:
        # Each group's tensors float32 on its parameters' device (a checkpoint loads them onto the
        # CPU), and each parameter's lr per row, shaped to broadcast over it: made once per change,
        # not once a step.
        self._params, self._starts, first = [], [], 0
        self._scratch: dict[torch.Tensor, list[torch.Tensor]] = {}
        for group in self.param_groups:
            device = group["params"][0].device
            for key in ("lr", "step", *HYPER):
                group[key] = torch.as_tensor(group[key], dtype=torch.float32, device=device).reshape(-1)
            lr = group["lr"]
            group["decay"] = torch.ones_like(lr)
            for p in group["params"]:
                rows = lr.repeat_interleave(p.shape[0] // lr.numel()).view(-1, *(1,) * (p.dim() - 1))
                self._params.append((p, rows, first, lr.numel()))
            self._starts.append(first)
            first += lr.numel()
        sizes = [g["lr"].numel() for g in self.param_groups]
        self._kinds = [kinds(self.settings[a : a + n]) for a, n in zip(self._starts, sizes, strict=True)]
        self._derive()

    def tensors(self) -> list[torch.Tensor]:
        """What a step changes besides the weights: the step counts and each parameter's state."""
        steps = [group["step"] for group in self.param_groups]
        return steps + [t for state in self.state.values() for t in state.values()]

    def member_state(self, index: int) -> dict[Any, Any]:
        """Member `index`'s step count, lr (0 if frozen) and lr as set, and its state rows (per
        parameter of its group, by position)."""
        for start, group in zip(self._starts, self.param_groups, strict=True):
            k = group["lr"].numel()
            if index < start + k:
                at = index - start
                state: dict[Any, Any] = {"step": float(group["step"][at]), "lr": float(group["lr"][at])}
                state["host_lr"] = self.host_lrs[index]
                for i, p in enumerate(group["params"]):
                    if p in self.state:
                        state[i] = {n: t.view(k, -1)[at : at + 1].clone() for n, t in self.state[p].items()}
                return state
        raise IndexError(index)

    def regroup(
        self,
        groups: list[list[torch.nn.Parameter]],
        sizes: list[int],
        settings: list[dict[str, Any]],
        carried: list[dict[Any, Any] | None],
    ) -> None:
        """The pack's members changed (MnistPack.relayout): these are its groups' parameters now, of
        `sizes` members each, with each member's settings and what it carries (`carried`: its
        member_state() where it was, in this optimizer or another's, or None for one that joins with
        a fresh state and lr 0 until the next set_lrs; only a stateless optimizer's members move
        between packs)."""
        self.settings = list(settings)
        self.host_lrs = [m["host_lr"] if m else 0.0 for m in carried]
        lrs = list(torch.tensor([m["lr"] if m else 0.0 for m in carried], dtype=torch.float32).split(sizes))
        self.state.clear()
        self.param_groups = self._param_groups(groups, lrs, carried)
        self._stack_state(carried)
        self._shape()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A checkpoint from before the optimizer section holds each group's lrs only: the rest is
        # plain SGD's, as this optimizer's own (the config's fingerprint says it is the same).
        before = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        torch.optim.Optimizer.load_state_dict.__wrapped__(self, state_dict)  # type: ignore[attr-defined]
        for group, own in zip(self.param_groups, before, strict=True):
            for key, value in own.items():
                group.setdefault(key, value)
        self._shape()

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
        their weights and state this step, as torch skips the whole step for them."""
        if self.plain:
            for p, rows, first, k in self._params:
                if p.grad is None:
                    continue
                step = p.grad * rows
                if finite is not None:
                    keep = finite[first : first + k].view(k, 1)
                    step = torch.where(keep, step.view(k, -1), 0.0).view_as(p)
                p.sub_(step)
            return
        for start, group, needs in zip(self._starts, self.param_groups, self._kinds, strict=True):
            k, end = group["lr"].numel(), start + group["lr"].numel()
            active = group["lr"] != 0  # frozen members have lr 0
            if finite is not None:
                active = active & finite[start:end]
            # Every member steps (none frozen, no scaler): no member needs selecting out.
            rows = None if finite is None and all(self._alive[start:end]) else active.view(k, 1)
            h = {key: group[key].view(k, 1) for key in ("lr", "decay", *HYPER)}
            scalars = {}
            if self.name != "sgd":
                on = active.tolist() if finite is not None else self._alive[start:end]
                lrs = [
                    lr * alive
                    for lr, alive in zip(self.host_lrs[start:end], self._alive[start:end], strict=True)
                ]
                scalars = adam_scalars(
                    self.settings[start:end], lrs, group["step"].tolist(), on, active.device
                )
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, view, state = p.grad.view(k, -1), p.view(k, -1), self.state[p]
                if self.name == "sgd":
                    sgd(view, g, state, h, needs, rows, self._work(p, k, 2))
                else:
                    adam(view, g, state, h, scalars, needs, self.name == "adamw", rows, self._work(p, k, 3))
            group["step"].add_(active.to(group["step"].dtype))

    def _work(self, p: torch.Tensor, k: int, n: int) -> list[torch.Tensor]:
        """n scratch tensors of p's [k, rows] shape, kept between steps: a step's intermediate
        results written into them instead of new tensors (a new tensor of a pack's size is fresh
        memory each step on a CPU, which costs more than the operation that fills it)."""
        found = self._scratch.get(p)
        if found is None or len(found) < n:
            found = self._scratch[p] = [torch.empty_like(p).view(k, -1) for _ in range(n)]
        return found

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
