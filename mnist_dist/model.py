"""The tutorial's model: Linear(784 -> hidden) -> ReLU -> Linear(hidden -> 10), cross-entropy loss,
and the same model stacked N times (a pack: the members of a sweep trained as one module).

Pure nn: no devices, ranks, precision or trackers. The engine calls the (possibly wrapped) module for
the logits, then these steps for the loss, so distributed wrappers see every forward pass.

Every run trains an MnistPack; a single run is a pack of one, which is an MnistModel itself (its
nn.Linear layers, its state dict keys: the checkpoints of single runs are what they always were).
MnistModel is also the member's own form: how its weights are initialised (a member of seed s starts
exactly where a run of seed s starts) and the layout of model.safetensors (nn.Linear's keys, loadable
without this package).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SIZE = 28 * 28
NUM_CLASSES = 10


class MnistModel(nn.Module):
    def __init__(self, hidden_size: int = 32) -> None:
        super().__init__()
        self.linear1 = nn.Linear(INPUT_SIZE, hidden_size)
        self.linear2 = nn.Linear(hidden_size, NUM_CLASSES)

    def forward(self, xb: torch.Tensor) -> torch.Tensor:
        xb = xb.reshape(-1, INPUT_SIZE)
        return self.linear2(F.relu(self.linear1(xb)))


class _Group(nn.Module):
    """Members that see the same input batch (the same seed, so the same data order): one batched
    matmul per layer over them, the input broadcast (a stride-0 view, not a copy)."""

    def __init__(self, members: list[MnistModel]) -> None:
        super().__init__()
        # nn.Linear's [out, in] weights stacked, [k, 1, out] biases: x @ w.T + b for every member at
        # once is torch.baddbmm(b, x, w.transpose(1, 2)), per member the gemm F.linear calls, with the
        # same transposed operand. Stored [k, in, out] it is 20 % faster, but the gemm then differs from
        # F.linear's in the last bit for batches of fewer than 16 rows (a 2-process share of the last
        # validation batch).
        self.w1 = nn.Parameter(torch.stack([m.linear1.weight.detach() for m in members]))
        self.b1 = nn.Parameter(torch.stack([m.linear1.bias.detach()[None] for m in members]))
        self.w2 = nn.Parameter(torch.stack([m.linear2.weight.detach() for m in members]))
        self.b2 = nn.Parameter(torch.stack([m.linear2.bias.detach()[None] for m in members]))

    def forward(self, xb: torch.Tensor) -> torch.Tensor:
        xb = xb.reshape(-1, INPUT_SIZE)
        xs = xb.expand(self.w1.shape[0], *xb.shape)
        hidden = F.relu(torch.baddbmm(self.b1, xs, self.w1.transpose(1, 2)))
        return torch.baddbmm(self.b2, hidden, self.w2.transpose(1, 2))


class MnistPack(nn.Module):
    """N members of MnistModel, each with its own weights; consecutive members with the same seed
    form a group that shares one input batch.

    A member's arithmetic is the same whatever else is in the pack: a batched matmul computes each
    member's product with the same single-matrix kernel, and every other op is elementwise or reduces
    within one member. On a CPU with one thread this makes a member bitwise equal to its pack of one
    (tests/test_packs.py); with more threads a batched matmul splits its work differently.
    """

    def __init__(self, members: list[MnistModel], seeds: list[int]) -> None:
        super().__init__()
        self.seeds = list(seeds)
        self.group_seeds, self.sizes = _runs(self.seeds)
        self.single = len(members) == 1
        if self.single:  # MnistModel's own layers, so its state dict is a single run's as it always was
            self.linear1, self.linear2 = members[0].linear1, members[0].linear2
        groups, start = [], 0
        for size in [] if self.single else self.sizes:
            groups.append(_Group(members[start : start + size]))
            start += size
        self.groups = nn.ModuleList(groups)

    @classmethod
    def seeded(cls, seeds: list[int], hidden_size: int) -> MnistPack:
        """Member i initialised as a run of seed seeds[i] initialises its MnistModel."""
        members = []
        for seed in seeds:
            torch.manual_seed(seed)
            members.append(MnistModel(hidden_size))
        return cls(members, seeds)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], hidden_size: int) -> MnistPack:
        """A pack of one holding saved MnistModel weights (model.safetensors)."""
        member = MnistModel(hidden_size)
        member.load_state_dict(state)
        return cls([member], [0])

    def __len__(self) -> int:
        return len(self.seeds)

    def member_parameters(self) -> list[list[nn.Parameter]]:
        """The parameters of each group (dimension 0 the member; a single run's: its own)."""
        if self.single:
            return [[*self.linear1.parameters(), *self.linear2.parameters()]]
        return [list(group.parameters()) for group in self.groups]

    def forward(self, xb: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Logits [N, B, 10]: `xb` one batch for every member, or one batch per group. A single run's
        are [B, 10], and its steps below return 0-d values: fewer autograd nodes, the same numbers."""
        if self.single:  # F.linear: per member the gemm of a group's batched matmul
            assert not isinstance(xb, list)
            return self.linear2(F.relu(self.linear1(xb.reshape(-1, INPUT_SIZE))))
        inputs = xb if isinstance(xb, list) else [xb] * len(self.groups)
        outs = [group(x) for group, x in zip(self.groups, inputs, strict=True)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def member_labels(self, yb: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """[N, B] labels: one [B] for every member, or one per group."""
        if not isinstance(yb, list):
            return yb.expand(len(self), yb.shape[-1])
        parts = [y.expand(size, y.shape[-1]) for y, size in zip(yb, self.sizes, strict=True)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _losses(self, outputs: torch.Tensor, yb: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        labels = self.member_labels(yb)
        flat = F.cross_entropy(outputs.reshape(-1, NUM_CLASSES).float(), labels.reshape(-1), reduction="none")
        return flat.view(labels.shape)

    def training_step(self, outputs: torch.Tensor, yb: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Each member's mean cross-entropy over its batch, as in the tutorial: [N] (0-d: single)."""
        if self.single:  # the same reduction of the same row as a member's in a pack
            return F.cross_entropy(outputs.float(), yb, reduction="none").mean()
        return self._losses(outputs, yb).mean(dim=1)

    def validation_step(
        self, outputs: torch.Tensor, yb: torch.Tensor | list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per member (summed loss, number correct), [N] each (0-d: single): sums, so the mean over
        all samples is exact for any sharding."""
        if self.single:
            loss = F.cross_entropy(outputs.float(), yb, reduction="none").sum()
            return loss, (outputs.argmax(dim=1) == yb).sum()
        correct = (outputs.argmax(dim=2) == self.member_labels(yb)).sum(dim=1)
        return self._losses(outputs, yb).sum(dim=1), correct

    def member_state_dict(self, index: int) -> dict[str, torch.Tensor]:
        """Member `index`'s weights as MnistModel's state dict (nn.Linear layout)."""
        if self.single:
            return {k: v for k, v in self.state_dict().items() if k.startswith("linear")}
        group, at = self._locate(index)
        return {
            "linear1.weight": group.w1[at],
            "linear1.bias": group.b1[at, 0],
            "linear2.weight": group.w2[at],
            "linear2.bias": group.b2[at, 0],
        }

    def _locate(self, index: int) -> tuple[_Group, int]:
        for group, size in zip(self.groups, self.sizes, strict=True):
            if index < size:
                return group, index
            index -= size
        raise IndexError(index)


def _runs(seeds: list[int]) -> tuple[list[int], list[int]]:
    """(seed, length) of each run of equal consecutive seeds."""
    values: list[int] = []
    sizes: list[int] = []
    for seed in seeds:
        if values and values[-1] == seed:
            sizes[-1] += 1
        else:
            values.append(seed)
            sizes.append(1)
    return values, sizes
