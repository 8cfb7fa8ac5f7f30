"""The CUDA-graph training step: one full-batch step (gather, forward, backward, SGD update, loss sum)
captured once as a CUDA graph and replayed.

For a model this small a step is a few dozen tiny kernels, and launching them one by one from Python
costs more than running them; a replay launches them all at once. A graph replays kernels on the
buffers it was captured with, by address, and runs none of the step's Python: so the step has no host
sync (CUDA refuses one during capture: no `.item()`, no `bool()` of a tensor), the members' lrs and
which members are alive are tensors the engine updates in place, and a graph is reused only while
those tensors are the ones it was captured with (a checkpoint load brings new ones: capture again).
Applies to one process on a GPU at full precision without accumulation; the short last batch of an
epoch runs eagerly. Whether it captured and how often it replayed goes into run.json (`cuda_graphs`).
Tested on a CPU with `capture` replaced by a stand-in that refuses host syncs and buffers the graph
does not know (tests/test_cuda_graphs.py); bench/gpu.sh checks the real one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

# One step of the engine: the batch's rows ([groups, batch]) -> its losses per member (detached), after
# the optimizer's update.
Step = Callable[[torch.Tensor], torch.Tensor]


def applies(cfg: Any, device: torch.device, world: int) -> bool:
    """One process on a GPU, full precision, no accumulation, SGD (Adam computes its bias corrections
    on the host each step: member_optimizer.py): a full step is then one graph."""
    return (
        cfg.cuda_graphs == "auto"
        and cfg.optimizer.name == "sgd"
        and device.type == "cuda"
        and world == 1
        and cfg.precision == "no"
        and cfg.grad_accum == 1
    )


def capture(step: Callable[[], None], zero_grad: Callable[[], None]) -> Callable[[], None]:
    """Warm `step` up on a side stream (capture requires it), capture one call of it as a CUDA graph
    and return the graph's replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            zero_grad()
            step()
    torch.cuda.current_stream().wait_stream(side)
    # Grads set to None, so backward allocates them in the graph's pool and each replay overwrites them.
    zero_grad()
    graph = torch.cuda.CUDAGraph()
    current = torch.cuda.current_stream()
    try:
        with torch.cuda.graph(graph):
            step()
    finally:  # a capture that fails in capture_end leaves its own stream current
        torch.cuda.set_stream(current)
    return graph.replay


class CapturedStep:
    """A step captured with `buffers` (the tensors it reads by address that the engine may replace:
    the optimizer's lrs and hyperparameters); `replay(rows)` trains on those rows, `take_loss_sum()`
    returns each member's summed losses of the replays since the last call."""

    def __init__(
        self,
        step: Step,
        rows_shape: tuple[int, int],
        members: int,
        buffers: list[torch.Tensor],
        restored: Iterable[torch.Tensor],
        zero_grad: Callable[[], None],
        device: torch.device,
    ) -> None:
        self.buffers = list(buffers)
        self.replays = 0
        self.rows = torch.zeros(rows_shape, dtype=torch.long, device=device)
        # float64, as the eager path sums its step losses, so both give the same train_loss.
        self.loss_sum = torch.zeros(members, dtype=torch.float64, device=device)

        def one_step() -> None:
            self.loss_sum += step(self.rows).double()

        # The warm-up trains, so put the weights and the optimizer's state (`restored`) back
        # afterwards, also when capture fails and the engine falls back to eager steps.
        params = list(restored)
        saved = [p.detach().clone() for p in params]
        try:
            self._replay = capture(one_step, zero_grad)
        finally:
            with torch.no_grad():
                for p, v in zip(params, saved, strict=True):
                    p.copy_(v)
            self.loss_sum.zero_()

    def reads(self, buffers: list[torch.Tensor]) -> bool:
        """Whether `buffers` are the very tensors this graph was captured with."""
        return len(buffers) == len(self.buffers) and all(
            a is b for a, b in zip(buffers, self.buffers, strict=True)
        )

    def replay(self, rows: torch.Tensor) -> None:
        self.rows.copy_(rows)
        self._replay()
        self.replays += 1

    def take_loss_sum(self) -> torch.Tensor:
        total = self.loss_sum.clone()
        self.loss_sum.zero_()
        return total


class StepGraphs:
    """The captured step for the live buffers: captured on first use, again when the buffers were
    replaced or after `reset()`; after a capture this stack cannot do, eager steps for good (the same
    numbers), and `report()` says so."""

    def __init__(self, enabled: bool, log: Callable[[str], None]) -> None:
        self.applies = self.enabled = enabled
        self.log = log
        self.current: CapturedStep | None = None
        self.captures, self._replays, self.failure = 0, 0, None

    def reset(self) -> None:
        if self.current is not None:
            self._replays += self.current.replays
        self.current = None

    def step_for(self, buffers: list[torch.Tensor], make: Callable[[], CapturedStep]) -> CapturedStep | None:
        if not self.enabled:
            return None
        if self.current is None or not self.current.reads(buffers):
            self.reset()
            try:
                self.current = make()
            except RuntimeError as e:
                self.failure = str(e).splitlines()[0] if str(e) else type(e).__name__
                self.log(f"warning: CUDA graph capture failed ({self.failure}); running eagerly")
                self.enabled = False
                return None
            self.captures += 1
        return self.current

    def report(self) -> dict[str, Any]:
        """For run.json: whether graphs applied, how many captures and replays, why they stopped."""
        replays = self._replays + (self.current.replays if self.current else 0)
        return {
            "applies": self.applies,
            "captures": self.captures,
            "replays": replays,
            "failure": self.failure,
        }
