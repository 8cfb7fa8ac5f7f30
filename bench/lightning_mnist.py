"""PyTorch Lightning's Trainer on the same model, as a Lightning user would write it: a TensorDataset
of float tensors, DataLoaders, a LightningModule, MultiStepLR for the second phase, validation every
epoch (plus one before training). Logger, checkpoints and progress bar off, for a fair race.

    python bench/lightning_mnist.py --data-dir data
"""

from __future__ import annotations

import time

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split

from common import parse_args, read_idx, report


class LitMnist(L.LightningModule):
    def __init__(self, phases: list[tuple[int, float]]) -> None:
        super().__init__()
        self.phases = phases
        self.model = nn.Sequential(nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
        self.history: list[dict] = []
        self._sums = torch.zeros(3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def on_validation_epoch_start(self):
        self._sums = torch.zeros(3, device=self.device)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        out = self.model(x)
        self._sums += torch.stack(
            [
                F.cross_entropy(out, y, reduction="sum"),
                (out.argmax(1) == y).sum(),
                torch.tensor(len(y), device=self.device),
            ]
        )

    def on_validation_epoch_end(self):
        loss, correct, n = self._sums.tolist()
        if not self.trainer.sanity_checking:
            self.history.append({"val_loss": loss / n, "val_acc": correct / n})

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.phases[0][1])
        milestones, total = [], 0
        for epochs, _ in self.phases[:-1]:
            total += epochs
            milestones.append(total)
        gamma = self.phases[1][1] / self.phases[0][1] if len(self.phases) > 1 else 1.0
        return [opt], [torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=gamma)]


def main() -> None:
    args = parse_args()
    images = torch.from_numpy(read_idx(args.data_dir, "train-images-idx3-ubyte", 16).reshape(60_000, 784))
    labels = torch.from_numpy(read_idx(args.data_dir, "train-labels-idx1-ubyte", 8)).long()
    dataset = TensorDataset(images.float() / 255, labels)
    train_ds, val_ds = random_split(dataset, [50_000, 10_000], generator=torch.Generator().manual_seed(42))
    L.seed_everything(args.seed, verbose=False)
    module = LitMnist(args.phases)
    trainer = L.Trainer(
        max_epochs=sum(e for e, _ in args.phases),
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    train_dl = DataLoader(train_ds, batch_size=128, shuffle=True)
    val_dl = DataLoader(val_ds, batch_size=256)
    start = time.perf_counter()
    trainer.validate(module, val_dl, verbose=False)
    trainer.fit(module, train_dl, val_dl)
    report(time.perf_counter() - start, module.history)


if __name__ == "__main__":
    main()
