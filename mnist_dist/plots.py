"""The tutorial's two figures: validation loss and accuracy over the history, phase boundaries marked."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any


def plot_history(history: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Write loss.png and accuracy.png into out_dir; return their paths."""
    # Figure + the Agg canvas, not pyplot: no global state, no display, a lighter import.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [e["epoch"] for e in history]
    # A phase starts after the epoch before its first one: draw the boundary there.
    boundaries = [
        prev["epoch"]
        for prev, cur in itertools.pairwise(history)
        if prev.get("phase") is not None and cur.get("phase") != prev.get("phase")
    ]
    paths = []
    for key, label, filename in (("val_loss", "loss", "loss.png"), ("val_acc", "accuracy", "accuracy.png")):
        fig = Figure(figsize=(6, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.plot(epochs, [e[key] for e in history], "-x")
        for i, b in enumerate(boundaries):
            ax.axvline(
                b, color="grey", linestyle="--", linewidth=1, label="phase boundary" if i == 0 else None
            )
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(f"{label.capitalize()} vs. No. of epochs")
        if boundaries:
            ax.legend()
        fig.subplots_adjust(left=0.13, right=0.97, bottom=0.12, top=0.92)  # not tight_layout: 2nd layout pass
        path = out_dir / filename
        fig.savefig(path)
        paths.append(path)
    return paths
