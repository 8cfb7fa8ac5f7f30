"""The tutorial's model: Linear(784 -> hidden) -> ReLU -> Linear(hidden -> 10), cross-entropy loss,
and the same model stacked N times (a pack: the members of a sweep trained as one module).

Pure nn: no devices, ranks, precision or trackers. The engine calls the (possibly wrapped) module for
the logits, then these steps for the loss, so distributed wrappers see every forward pass.

Every run trains an MnistPack; a single run is a pack of one, through the same code. MnistModel is
the member's own form: how its weights are initialised (a member of seed s starts exactly where a
run of seed s starts) and the layout of model.safetensors (nn.Linear's keys, loadable without this
package).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mnist_dist.train.member_linear import member_linear

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


_KEYS = {"w1": "linear1.weight", "b1": "linear1.bias", "w2": "linear2.weight", "b2": "linear2.bias"}


class _Group(nn.Module):
    """Members that see the same input batch (the same seed, so the same data order), their weights
    stacked row-wise in nn.Linear's layout: w [k * out, in], b [k * out] per layer (member_linear.py);
    a group of one holds exactly nn.Linear's tensors."""

    def __init__(self, states: list[dict[str, torch.Tensor]]) -> None:
        """`states`: the members' weights, as MnistModel's state dicts."""
        super().__init__()
        self.size = len(states)
        for name, key in _KEYS.items():
            setattr(self, name, nn.Parameter(torch.cat([s[key].detach() for s in states])))

    def forward(self, xb: torch.Tensor, batched: bool) -> torch.Tensor:
        """Logits [k * B, 10], member-major."""
        k = self.size
        hidden = F.relu(member_linear(xb.reshape(-1, INPUT_SIZE), self.w1, self.b1, k, True, batched))
        return member_linear(hidden, self.w2, self.b2, k, False, batched)

    def member(self, at: int) -> dict[str, torch.Tensor]:
        """Member `at`'s weights, as MnistModel's state dict."""
        k = self.size
        params = {key: getattr(self, name) for name, key in _KEYS.items()}
        return {key: p.view(k, -1, *p.shape[1:])[at] for key, p in params.items()}


class MnistPack(nn.Module):
    """N members of MnistModel, each with its own weights; consecutive members with the same seed
    form a group that shares one input batch. A single run is a pack of one.

    A member's arithmetic is the same whatever else is in the pack: member_linear makes each
    member's products with the calls F.linear would make for it alone, and every other op is
    elementwise or reduces within one member (a row of the loss, a member's sum). On a CPU with one
    thread this makes a member bitwise its pack of one, and a pack of one F.linear's own run
    (tests/test_member_linear.py). `batched` (set by the engine on a GPU) trades that for one batched
    matmul per product over each group.
    """

    def __init__(self, members: list[MnistModel], seeds: list[int]) -> None:
        super().__init__()
        self.batched = False
        self.relayout([m.state_dict() for m in members], seeds)

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
        """The parameters of each group: dimension 0 is k equal blocks of rows, member i's the i-th."""
        return [list(group.parameters()) for group in self.groups]

    def forward(self, xb: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Logits [N * B, 10], member-major (member i's batch at rows i * B): `xb` one batch for every
        member, or one batch per group. A pack of one's are its MnistModel's."""
        inputs = xb if isinstance(xb, list) else [xb] * len(self.groups)
        outs = [group(x, self.batched) for group, x in zip(self.groups, inputs, strict=True)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def member_labels(self, yb: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """[N * B] labels, member-major: one [B] for every member, or one per group."""
        if not isinstance(yb, list):
            return yb.expand(len(self), yb.shape[-1]).reshape(-1)
        parts = [y.expand(size, y.shape[-1]).reshape(-1) for y, size in zip(yb, self.sizes, strict=True)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _losses(self, outputs: torch.Tensor, yb: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """[N, B] cross-entropy of every sample for every member: row by row."""
        flat = F.cross_entropy(outputs.float(), self.member_labels(yb), reduction="none")
        return flat.view(len(self), -1)

    def training_step(self, outputs: torch.Tensor, yb: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Each member's mean cross-entropy over its batch, as in the tutorial: [N]."""
        return self._losses(outputs, yb).mean(dim=1)

    def validation_step(
        self, outputs: torch.Tensor, yb: torch.Tensor | list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per member (summed loss, number correct), [N] each: sums, so the mean over all samples is
        exact for any sharding."""
        correct = (outputs.argmax(dim=1) == self.member_labels(yb)).view(len(self), -1).sum(dim=1)
        return self._losses(outputs, yb).sum(dim=1), correct

    def relayout(self, states: list[dict[str, torch.Tensor]], seeds: list[int]) -> None:
        """The pack becomes the members with these weights (MnistModel's state dicts) and seeds, in
        this order, each run of equal consecutive seeds one group: members leave it (so its steps
        cost only the others') or join it (from another pack). Each member is computed as before,
        with its own products (member_linear.py): which group it is in changes none of its bits.
        New Parameters, not resized in place: autograd keeps each leaf's shape in its gradient
        accumulator, which outlives a step while anything holds that step's graph."""
        self.seeds = list(seeds)
        self.group_seeds, self.sizes = _runs(self.seeds)
        groups, start = [], 0
        for size in self.sizes:
            groups.append(_Group(states[start : start + size]))
            start += size
        self.groups = nn.ModuleList(groups)

    def keep(self, members: list[int]) -> None:
        """Only `members` (indices over the pack, in order) stay; the others leave the model."""
        self.relayout([self.member_state_dict(i) for i in members], [self.seeds[i] for i in members])

    def member_state_dict(self, index: int) -> dict[str, torch.Tensor]:
        """Member `index`'s weights as MnistModel's state dict (nn.Linear layout)."""
        group, at = self._locate(index)
        return group.member(at)

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
