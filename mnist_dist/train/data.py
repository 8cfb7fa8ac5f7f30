"""MNIST in memory: uint8 tensors on the training device, the seeded train/validation split, and
global batches cut into each process's share. A batch is an index slice converted to float on the fly:
no per-sample PIL/ToTensor work, no worker processes. The files themselves are datafiles.py's.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mnist_dist.store.datafiles import FILES, IdxFile


@dataclass
class MnistSplit:
    images: torch.Tensor  # uint8 [n, 784]
    labels: torch.Tensor  # int64 [n]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, index: torch.Tensor) -> MnistSplit:
        return MnistSplit(self.images[index], self.labels[index])

    def to(self, device: Any) -> MnistSplit:
        return MnistSplit(self.images.to(device), self.labels.to(device))


def _read_idx(path: Path, spec: IdxFile) -> torch.Tensor:
    header = 16 if spec.magic == 0x0803 else 8
    array = np.fromfile(path, dtype=np.uint8, offset=header)
    return torch.from_numpy(array.reshape(spec.count, -1) if spec.magic == 0x0803 else array)


def load(root: Path, train: bool = True) -> MnistSplit:
    """MNIST's 60,000 training images (train=True) or the 10,000 test images, from verified files."""
    kind = "train" if train else "test"
    images = _read_idx(root / FILES[f"{kind}_images"].name, FILES[f"{kind}_images"])
    labels = _read_idx(root / FILES[f"{kind}_labels"].name, FILES[f"{kind}_labels"]).long()
    return MnistSplit(images, labels)


def random_split(full: MnistSplit, val_size: int, seed: int) -> tuple[MnistSplit, MnistSplit]:
    """(train, validation) as torch.utils.data.random_split would cut them with a seeded generator."""
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed))
    n_train = len(full) - val_size
    return full.take(order[:n_train]), full.take(order[n_train:])


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed seed per (seed, epoch): every process draws the same permutation for an epoch."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)


def share(n: int, rank: int, world: int) -> tuple[int, int]:
    """This process's contiguous part [start, stop) of a global batch of n samples."""
    return n * rank // world, n * (rank + 1) // world


class ShardedBatches:
    """Global batches of one split, each cut into this process's contiguous share.

    Every process draws the same seeded permutation per epoch, so the same `batch_size` samples form
    each global step whatever the number of processes: histories do not depend on the topology. The
    last, short batch is split as evenly as possible and never padded. Yields (images float [b, 784]
    = pixel/255, labels, global batch length).

    A pack's groups (members with one seed each) each draw their own permutation from their seed:
    with several `seeds`, a shuffled batch is a list of images and a list of labels, one per group.
    """

    def __init__(
        self,
        split: MnistSplit,
        batch_size: int,
        *,
        rank: int = 0,
        world: int = 1,
        shuffle: bool = False,
        seeds: tuple[int, ...] = (0,),
    ) -> None:
        self.split, self.batch_size, self.rank, self.world = split, batch_size, rank, world
        self.shuffle, self.seeds, self.epoch = shuffle, tuple(seeds), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.split) // self.batch_size)

    def global_sizes(self) -> list[int]:
        n, b = len(self.split), self.batch_size
        return [min(b, n - start) for start in range(0, n, b)]

    def loss_weights(self, grad_accum: int) -> list[float]:
        """Per step, the factor on this process's mean loss that makes the gradient averaged across
        processes the exact mean over the samples of the optimizer step (world x share / samples in
        the `grad_accum` global batches it accumulates), short batch or full. Equal shares and no
        accumulation give 1."""
        sizes, k = self.global_sizes(), grad_accum
        window = [sum(sizes[i - i % k : i - i % k + k]) for i in range(len(sizes))]
        shares = (share(n, self.rank, self.world) for n in sizes)
        return [self.world * (stop - start) / w for (start, stop), w in zip(shares, window, strict=True)]

    def samples_per_process(self) -> int:
        return sum(
            stop - start for start, stop in (share(s, self.rank, self.world) for s in self.global_sizes())
        )

    def _order(self) -> torch.Tensor | None:
        """[groups, samples]: each seed's permutation of the split for this epoch."""
        if not self.shuffle:
            return None
        orders = []
        for seed in self.seeds:
            g = torch.Generator().manual_seed(epoch_seed(seed, self.epoch))
            orders.append(torch.randperm(len(self.split), generator=g))
        # Drawn on the CPU for the same numbers on every device, moved once per epoch.
        return torch.stack(orders).to(self.split.labels.device)

    def indices(self) -> Iterator[tuple[torch.Tensor | slice, int]]:
        """(this process's rows of each global batch, [groups, rows] when shuffled; the global
        batch's length), for one epoch."""
        order = self._order()
        for base, size in zip(range(0, len(self.split), self.batch_size), self.global_sizes(), strict=True):
            start, stop = share(size, self.rank, self.world)
            rows = slice(base + start, base + stop) if order is None else order[:, base + start : base + stop]
            yield rows, size

    def batch(self, rows: torch.Tensor | slice) -> tuple[Any, Any]:
        """(images, labels) of the rows: tensors, or with several groups a list of each."""
        images, labels = self.split.images, self.split.labels
        if isinstance(rows, slice):
            return images[rows].float().div_(255), labels[rows]
        # index_select, not images[rows]: advanced indexing costs more per call on a CPU (OPTIMISATION.md).
        if rows.shape[0] == 1:
            return images.index_select(0, rows[0]).float().div_(255), labels.index_select(0, rows[0])
        xs = [images.index_select(0, r).float().div_(255) for r in rows]
        ys = [labels.index_select(0, r) for r in rows]
        return xs, ys

    def __iter__(self) -> Iterator[tuple[Any, Any, int]]:
        for rows, size in self.indices():
            yield (*self.batch(rows), size)


def epoch_steps(train: ShardedBatches, epoch: int, progress: str, is_main: bool) -> Any:
    """The epoch's (rows, size) steps, behind a progress bar on the main process when asked for."""
    steps = train.indices()
    if not ({"on": True, "off": False, "auto": sys.stdout.isatty()}[progress] and is_main):
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, total=len(train), desc=f"epoch {epoch}", leave=False, mininterval=0.5)
