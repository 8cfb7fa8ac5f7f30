"""fp16's loss scaling with one scale per pack member: torch.amp.GradScaler's rule, member by member.

With one GradScaler for a pack, an inf in one member's gradients skips the step of every member and
halves everyone's scale, and a frozen member whose weights went NaN makes every later step of the
whole pack a skipped one, silently. Here each member has its own scale and growth tracker: its loss's
gradient is multiplied by its scale, its gradients are unscaled by its own, and a member whose
gradients are not finite skips its own step and backs off its own scale, while the others step as
they would alone (a pack of one is GradScaler's run). Nothing asks the host (GradScaler's step does,
to decide whether to step): it all stays on the device. Its state is checkpointed with the run.
"""

from __future__ import annotations

from typing import Any

import torch

from mnist_dist.train.member_optimizer import MemberOptimizer


class MemberGradScaler:
    @classmethod
    def in_place_of(cls, accelerator: Any, optimizer: Any, members: int) -> MemberGradScaler | None:
        """fp16: the GradScaler Accelerate made, as one scale per member; Accelerate's own put aside
        (so its optimizer wrapper and backward do not scale a second time), ours checkpointed in its
        place. None without fp16."""
        theirs = accelerator.scaler
        if theirs is None:
            return None
        ours = cls.like(theirs, members, accelerator.device)
        accelerator.scaler = optimizer.scaler = None
        accelerator.register_for_checkpointing(ours)
        return ours

    def __init__(
        self,
        members: int,
        device: torch.device,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ) -> None:
        self.growth_factor, self.backoff_factor, self.growth_interval = (
            growth_factor,
            backoff_factor,
            growth_interval,
        )
        self.scale = torch.full((members,), init_scale, dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros(members, dtype=torch.int32, device=device)
        self.skipped = torch.zeros(members, dtype=torch.int64, device=device)

    @classmethod
    def like(cls, scaler: Any, members: int, device: torch.device) -> MemberGradScaler:
        """Per member, the settings of the GradScaler Accelerate made for fp16."""
        return cls(
            members,
            device,
            scaler.get_scale(),
            scaler.get_growth_factor(),
            scaler.get_backoff_factor(),
            scaler.get_growth_interval(),
        )

    def loss_gradient(self, gradient: torch.Tensor) -> torch.Tensor:
        """The losses' gradient for backward: each member's scaled by its scale."""
        return gradient * self.scale

    @torch.no_grad()
    def step(self, optimizer: MemberOptimizer) -> None:
        """Unscale each member's gradients, step the members whose gradients are finite, update the
        scales (GradScaler.update's rule, per member)."""
        inv_scale = self.scale.double().reciprocal().float()  # as GradScaler unscales
        finite = optimizer.unscale_(inv_scale)
        optimizer.update(finite)
        found_inf = ~finite
        self.skipped += found_inf
        tracked = self.growth_tracker + 1
        grow = ~found_inf & (tracked == self.growth_interval)
        grown = self.scale * self.growth_factor
        self.scale.copy_(
            torch.where(
                found_inf,
                self.scale * self.backoff_factor,
                torch.where(grow & torch.isfinite(grown), grown, self.scale),
            )
        )
        self.growth_tracker.copy_(torch.where(found_inf | grow, 0, tracked))

    def report(self) -> list[dict[str, Any]]:
        """Per member, for run.json: its scale, growth tracker and the steps it skipped."""
        rows = zip(self.scale.tolist(), self.growth_tracker.tolist(), self.skipped.tolist(), strict=True)
        return [{"scale": s, "growth_tracker": g, "skipped_steps": n} for s, g, n in rows]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"scale": self.scale, "growth_tracker": self.growth_tracker, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            getattr(self, name).copy_(value)
