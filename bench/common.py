"""What the reference contenders share with mnist-dist, written out plainly (no mnist_dist import, so a
reference cannot inherit a speed-up or a bug from the code it is compared with)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", required=True, help="holds MNIST/raw (torchvision layout)")
    p.add_argument("--phases", default="5x0.5,5x0.1")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    args.phases = [(int(e), float(lr)) for e, lr in (part.split("x") for part in args.phases.split(","))]
    return args


def read_idx(data_dir: str, name: str, header: int) -> np.ndarray:
    return np.fromfile(Path(data_dir) / "MNIST" / "raw" / name, dtype=np.uint8, offset=header)


def report(train_seconds: float, history: list[dict], **extra: object) -> None:
    """One JSON line on stdout: what the benchmark reads back."""
    print(
        json.dumps(
            {
                "train_seconds": train_seconds,
                "val_acc": history[-1]["val_acc"],
                "val_loss": history[-1]["val_loss"],
                "entries": len(history),
                **extra,
            }
        ),
        flush=True,
    )
    sys.stdout.flush()
