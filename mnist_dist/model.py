"""The tutorial's model: Linear(784 -> hidden) -> ReLU -> Linear(hidden -> 10), cross-entropy loss.

Pure nn: no devices, ranks, precision or trackers. The engine calls the (possibly wrapped) module for
the logits, then these steps for the loss, so distributed wrappers see every forward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SIZE = 28 * 28
NUM_CLASSES = 10


def accuracy(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Share of argmax predictions equal to the label (the tutorial's accuracy)."""
    return (outputs.argmax(dim=1) == labels).float().mean()


class MnistModel(nn.Module):
    def __init__(self, hidden_size: int = 32) -> None:
        super().__init__()
        self.linear1 = nn.Linear(INPUT_SIZE, hidden_size)
        self.linear2 = nn.Linear(hidden_size, NUM_CLASSES)

    def forward(self, xb: torch.Tensor) -> torch.Tensor:
        xb = xb.reshape(-1, INPUT_SIZE)
        return self.linear2(F.relu(self.linear1(xb)))

    @staticmethod
    def training_step(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the batch, as in the tutorial."""
        return F.cross_entropy(outputs.float(), labels)

    @staticmethod
    def validation_step(outputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, number correct): sums, so the mean over all samples is exact for any sharding."""
        loss = F.cross_entropy(outputs.float(), labels, reduction="sum")
        correct = (outputs.argmax(dim=1) == labels).sum()
        return loss, correct
