"""The practical floor: the same model, seeded split, batches and phases as mnist-dist, written as a
plain PyTorch loop over tensors resident in memory (converted to float once). No DataLoader, no
framework, no tracker, no files.

    python bench/bare_loop.py --data-dir data
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from common import parse_args, read_idx, report


def main() -> None:
    args = parse_args()
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    images = torch.from_numpy(read_idx(args.data_dir, "train-images-idx3-ubyte", 16).reshape(60_000, 784))
    labels = torch.from_numpy(read_idx(args.data_dir, "train-labels-idx1-ubyte", 8)).long()
    order = torch.randperm(60_000, generator=torch.Generator().manual_seed(42))
    x = (images.float() / 255).to(device)
    y = labels.to(device)
    train_idx, val_idx = order[:50_000].to(device), order[50_000:].to(device)
    x_train, y_train, x_val, y_val = x[train_idx], y[train_idx], x[val_idx], y[val_idx]

    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.phases[0][1])

    @torch.no_grad()
    def evaluate() -> dict:
        loss = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        for i in range(0, 10_000, 256):
            out = model(x_val[i : i + 256])
            loss += F.cross_entropy(out, y_val[i : i + 256], reduction="sum")
            correct += (out.argmax(1) == y_val[i : i + 256]).sum()
        return {"val_loss": loss.item() / 10_000, "val_acc": correct.item() / 10_000}

    start = time.perf_counter()
    history = [evaluate()]
    for epochs, lr in args.phases:
        for group in opt.param_groups:
            group["lr"] = lr
        for _ in range(epochs):
            perm = torch.randperm(50_000, device=device)
            for i in range(0, 50_000, 128):
                idx = perm[i : i + 128]
                loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
                loss.backward()
                opt.step()
                opt.zero_grad()
            history.append(evaluate())
    report(time.perf_counter() - start, history)


if __name__ == "__main__":
    main()
