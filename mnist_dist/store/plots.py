"""The tutorial's two figures: validation loss and accuracy over the history, phase boundaries marked."""

from __future__ import annotations

import itertools
import json
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


def _figure(size: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _log_scale(key: str, values: list[float]) -> bool:
    positive = [v for v in values if v > 0]
    return len(positive) == len(values) and (key.endswith("lr") or max(positive) > 10 * min(positive))


def sweep_curves(
    path: Path, table: list[dict[str, Any]], histories: dict[str, list[dict[str, Any]]], swept: list[str]
) -> Path:
    """Every member's val_acc and val_loss over epochs, one line each, coloured by the first swept key
    (a colour bar for numbers, a legend otherwise), phase boundaries dashed."""
    from matplotlib import colormaps, colors

    fig = _figure((11, 4.2))
    acc_ax, loss_ax = fig.subplots(1, 2)
    key = swept[0] if swept else None
    values = [r.get(key) for r in table] if key else []
    numeric = bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    cmap = colormaps["viridis"]
    if numeric:
        log = _log_scale(key or "", [float(v) for v in values])
        norm = (colors.LogNorm if log else colors.Normalize)(
            min(values), max(values) if max(values) > min(values) else min(values) + 1
        )
        colour = {r["id"]: cmap(norm(r[key])) for r in table}
    else:
        labels = sorted({json.dumps(r.get(key)) for r in table})  # no key swept: one colour
        colour = {
            r["id"]: cmap(labels.index(json.dumps(r.get(key))) / max(1, len(labels) - 1)) for r in table
        }
    boundaries: set[int] = set()
    for row in table:
        history = histories.get(row["id"]) or []
        epochs = [e["epoch"] for e in history]
        acc_ax.plot(epochs, [e["val_acc"] for e in history], color=colour[row["id"]], linewidth=1, alpha=0.8)
        loss_ax.plot(
            epochs, [e["val_loss"] for e in history], color=colour[row["id"]], linewidth=1, alpha=0.8
        )
        boundaries |= {
            a["epoch"]
            for a, b in itertools.pairwise(history)
            if a.get("phase") is not None and b.get("phase") != a.get("phase")
        }
    for ax, label in ((acc_ax, "val_acc"), (loss_ax, "val_loss")):
        for b in sorted(boundaries):
            ax.axvline(b, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
    loss_ax.set_yscale("log")
    acc_ax.set_title(f"{len(table)} members, colour: {key}" if key else f"{len(table)} members")
    if numeric:
        from matplotlib.cm import ScalarMappable

        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=[acc_ax, loss_ax], label=key)
    elif key:
        from matplotlib.lines import Line2D

        handles = [
            Line2D([], [], color=cmap(i / max(1, len(labels) - 1)), label=v) for i, v in enumerate(labels)
        ]
        acc_ax.legend(handles=handles, title=key, fontsize=7)
    fig.savefig(path)
    return path


def sweep_finals(path: Path, table: list[dict[str, Any]], key: str) -> Path:
    """Final val_acc against one numeric swept key: each finished member a dot, the mean over members
    with that value (the seeds) with a std error bar."""
    import statistics

    done = [r for r in table if r["status"] == "done" and r["final_val_acc"] is not None]
    fig = _figure((6, 4))
    ax = fig.add_subplot()
    by_value: dict[float, list[float]] = {}
    for r in done:
        by_value.setdefault(r[key], []).append(r["final_val_acc"])
    xs = sorted(by_value)
    ax.scatter([r[key] for r in done], [r["final_val_acc"] for r in done], s=10, color="grey", alpha=0.6)
    means = [statistics.fmean(by_value[x]) for x in xs]
    stds = [statistics.stdev(by_value[x]) if len(by_value[x]) > 1 else 0.0 for x in xs]
    ax.errorbar(
        xs, means, yerr=stds, fmt="-o", capsize=3, label="mean ± std of the members at each value (seeds)"
    )
    if xs and _log_scale(key, [float(x) for x in xs]):
        ax.set_xscale("log")
    ax.set_xlabel(key)
    ax.set_ylabel("final val_acc")
    ax.legend(fontsize=7)
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.13, top=0.95)
    fig.savefig(path)
    return path
