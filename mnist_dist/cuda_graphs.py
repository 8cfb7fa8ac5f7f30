"""The CUDA-graph training step: one full-batch step (gather, forward, backward, SGD update, loss sum)
captured once as a CUDA graph and replayed.

For a model this small a step is a few dozen tiny kernels, and launching them one by one from Python
costs more than running them; a replay launches them all at once. The members' lrs are baked into
the graph, so each phase (and each freeze of a member) captures its own, and a checkpoint load (new
weights and optimizer state) captures again.
Applies to one process on a GPU at full precision without accumulation; the short last batch of an
epoch runs eagerly. Tested on a CPU with `capture` replaced (tests/test_cuda_graphs.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

# One step of the engine: the batch's rows ([groups, batch]) -> its losses per member (detached), after
# the SGD update.
Step = Callable[[torch.Tensor], torch.Tensor]


def applies(cfg: Any, device: torch.device, world: int) -> bool:
    """One process on a GPU, full precision, no accumulation: a full step is then one graph."""
    return (
        cfg.cuda_graphs == "auto"
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
    with torch.cuda.graph(graph):
        step()
    return graph.replay


class CapturedStep:
    """A step captured for one set of lrs; `replay(rows)` trains on those rows, `take_loss_sum()`
    returns each member's summed losses of the replays since the last call."""

    def __init__(
        self,
        step: Step,
        rows_shape: tuple[int, int],
        members: int,
        lrs: tuple[float, ...],
        params: Iterable[torch.nn.Parameter],
        zero_grad: Callable[[], None],
        device: torch.device,
    ) -> None:
        self.lrs = lrs
        self.rows = torch.zeros(rows_shape, dtype=torch.long, device=device)
        # float64, as the eager path sums its step losses, so both give the same train_loss.
        self.loss_sum = torch.zeros(members, dtype=torch.float64, device=device)

        def one_step() -> None:
            self.loss_sum += step(self.rows).double()

        # The warm-up trains, so put the weights back afterwards, also when capture fails and the
        # engine falls back to eager steps.
        params = list(params)
        saved = [p.detach().clone() for p in params]
        try:
            self._replay = capture(one_step, zero_grad)
        finally:
            with torch.no_grad():
                for p, v in zip(params, saved, strict=True):
                    p.copy_(v)
            self.loss_sum.zero_()

    def replay(self, rows: torch.Tensor) -> None:
        self.rows.copy_(rows)
        self._replay()

    def take_loss_sum(self) -> torch.Tensor:
        total = self.loss_sum.clone()
        self.loss_sum.zero_()
        return total


class StepGraphs:
    """The captured step for the current lrs: captured on first use, again for new lrs or after
    `reset()`; after a capture this stack cannot do, eager steps for good (the same numbers)."""

    def __init__(self, enabled: bool, log: Callable[[str], None]) -> None:
        self.enabled, self.log = enabled, log
        self.current: CapturedStep | None = None

    def reset(self) -> None:
        self.current = None

    def for_lr(self, lrs: tuple[float, ...], make: Callable[[], CapturedStep]) -> CapturedStep | None:
        if not self.enabled:
            return None
        if self.current is None or self.current.lrs != lrs:
            try:
                self.current = make()
            except RuntimeError as e:
                self.log(f"warning: CUDA graph capture failed ({str(e).splitlines()[0]}); running eagerly")
                self.enabled = False
                return None
        return self.current
