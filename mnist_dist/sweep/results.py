"""A sweep's members compared: one row per member (swept values, status, final and best val_acc,
final val_loss, epochs done) sorted by the sweep's metric, and, when `seed` is swept, one row per
setting of the other keys with mean ± std over the seeds. Written as results.json and results.csv,
and drawn: every member's curves in one figure, final val_acc against each numeric swept key.
Reads files only (never a lock): it works while the sweep runs.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path
from typing import Any

from mnist_dist.sweep.layout import SweepDir
from mnist_dist.sweep.spec import read_manifest
from mnist_dist.sweep.state import member_state
from mnist_dist.sweep.target import SIGNS, Reached, reached


def _history(run_dir: Path) -> list[dict[str, Any]]:
    from mnist_dist.errors import UserError
    from mnist_dist.slurm.jobs import history

    try:
        return history(str(run_dir)) if run_dir.is_dir() else []
    except UserError:
        return []


def rows(root: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(manifest, one row per member, best first by the sweep's metric; unfinished ones last)."""
    manifest = read_manifest(root)
    metric, goal = manifest["metric"]["name"], manifest["metric"]["goal"]
    out = []
    for m in manifest["members"]:
        run_dir = SweepDir(root).member(m["id"])
        history = _history(run_dir)
        trained = [e for e in history if e.get("phase") is not None]
        last = history[-1] if history else {}
        row = {
            "id": m["id"],
            **m["params"],
            "status": member_state(run_dir),
            "epochs_done": len(trained),
            "final_val_acc": last.get("val_acc"),
            "best_val_acc": max((e["val_acc"] for e in history), default=None),
            "best_val_loss": min((e["val_loss"] for e in history), default=None),
            "final_val_loss": last.get("val_loss"),
            "final_train_loss": last.get("train_loss"),
        }
        row["metric"] = row["final_train_loss" if metric == "train_loss" else f"final_{metric}"]
        out.append(row)
    sign = -1 if goal == "maximize" else 1

    def order(row: dict[str, Any]) -> tuple[int, float]:
        """Finished members by their final metric, then terminated ones by their best so far, then
        the rest."""
        value = row["metric"] if row["status"] == "done" else row.get(f"best_{metric}")
        finite = value is not None and math.isfinite(value)
        tier = {"done": 0, "terminated": 1}.get(row["status"]) if finite else None
        return (tier, sign * value) if tier is not None else (2, 0.0)

    out.sort(key=order)
    if out and order(out[0])[0] == 0:
        out[0]["best"] = True
    return manifest, out


def seed_groups(manifest: dict[str, Any], table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """With `seed` swept: per setting of the other swept keys, mean ± std of the final val_acc and of
    the metric over the finished seeds, and their count."""
    if "seed" not in manifest["swept"]:
        return []
    keys = [k for k in manifest["swept"] if k != "seed"]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in table:
        groups.setdefault(tuple(json.dumps(row.get(k)) for k in keys), []).append(row)
    out = []
    for members in groups.values():
        done = [r for r in members if r["status"] == "done" and r["final_val_acc"] is not None]
        accs, metrics = [r["final_val_acc"] for r in done], [r["metric"] for r in done]
        out.append(
            {
                **{k: members[0].get(k) for k in keys},
                "seeds": len(done),
                "val_acc_mean": statistics.fmean(accs) if accs else None,
                "val_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0 if accs else None,
                "metric_mean": statistics.fmean(metrics) if metrics else None,
                "metric_std": statistics.stdev(metrics) if len(metrics) > 1 else 0.0 if metrics else None,
            }
        )
    goal = -1 if manifest["metric"]["goal"] == "maximize" else 1
    out.sort(key=lambda g: (g["metric_mean"] is None, goal * (g["metric_mean"] or 0.0)))
    return out


def progress(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """How far the sweep's plan got: its method; a bayes sweep's rounds, proposals and run_cap; with a
    `metric.target`, the member that reached it (or None)."""
    info: dict[str, Any] = {"method": manifest.get("method", "grid")}
    if "proposals" in manifest:  # bayes: rounds of proposals
        info.update(rounds=len(manifest.get("rounds", [])), proposed=len(manifest["proposals"]))
        info["run_cap"] = manifest.get("run_cap")
    if (manifest.get("metric") or {}).get("target") is not None:
        why = reached(root, manifest)
        info["target_reached"] = None if why is None else {"member": why.member, "value": why.value}
    return info


def describe(info: dict[str, Any], metric: dict[str, Any]) -> str:
    """The progress in words, e.g. "bayes: 3 round(s), 12 of 12 proposed; target val_acc >= 0.95
    reached by member 0123456789 (0.9512)"; empty for a plain grid."""
    parts = []
    if "rounds" in info:
        parts.append(
            f"{info['method']}: {info['rounds']} round(s), {info['proposed']} of {info['run_cap']} proposed"
        )
    if "target_reached" in info:
        hit = info["target_reached"]
        name, goal, target = metric["name"], metric["goal"], metric["target"]
        if hit:
            parts.append(Reached(hit["member"], hit["value"], name, goal, float(target)).says())
        else:
            parts.append(f"target {name} {SIGNS[goal]} {target:g} not reached")
    return "; ".join(parts)


def write(root: Path) -> dict[str, Any]:
    """results.json, results.csv and the plots; returns what results.json holds."""
    from mnist_dist.store.atomic import write_atomic

    manifest, table = rows(root)
    results = {
        "sweep": manifest["name"],
        "metric": manifest["metric"],
        **progress(root, manifest),
        "swept": manifest["swept"],
        "members": table,
        "seed_groups": seed_groups(manifest, table),
    }
    as_json, as_csv = SweepDir(root).results
    write_atomic(as_json, json.dumps(results, indent=1) + "\n")
    write_atomic(as_csv, _csv(table))
    results["plots"] = [str(p) for p in plot(root, manifest, table)]
    return results


def _csv(table: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for row in table for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(table)
    return buffer.getvalue()


def format_table(results: dict[str, Any]) -> str:
    """The printed table: members best first (the best marked *), then the seed groups."""
    swept, metric = results["swept"], results["metric"]["name"]
    header = ["", "id", *swept, "status", "epochs", "final val_acc", "best val_acc", "final val_loss"]
    lines = [header]
    for r in results["members"]:
        lines.append(
            [
                "*" if r.get("best") else "",
                r["id"],
                *(_fmt(r.get(k)) for k in swept),
                r["status"],
                str(r["epochs_done"]),
                _fmt(r["final_val_acc"]),
                _fmt(r["best_val_acc"]),
                _fmt(r["final_val_loss"]),
            ]
        )
    text = _columns(lines) + f"\n(sorted by final {metric}, {results['metric']['goal']}; * best)\n"
    how = describe(results, results["metric"])
    text += f"{how}\n" if how else ""
    groups = results["seed_groups"]
    if groups:
        keys = [k for k in swept if k != "seed"]
        extra = [] if metric == "val_acc" else [f"{metric} mean ± std"]
        lines = [[*keys, "seeds", "val_acc mean ± std", *extra]]
        for g in groups:
            acc = f"{_fmt(g['val_acc_mean'])} ± {_fmt(g['val_acc_std'])}"
            more = [f"{_fmt(g['metric_mean'])} ± {_fmt(g['metric_std'])}"] if extra else []
            lines.append([*(_fmt(g[k]) for k in keys), str(g["seeds"]), acc, *more])
        text += "\nover seeds:\n" + _columns(lines) + "\n"
    return text


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _columns(lines: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def plot(root: Path, manifest: dict[str, Any], table: list[dict[str, Any]]) -> list[Path]:
    """curves.png: every member's val_acc and val_loss over epochs, coloured by the first swept key,
    phase boundaries marked; final-<key>.png: final val_acc against each numeric swept key, mean and
    std over seeds as error bars, log x for learning rates and other keys spanning > 10x."""
    from mnist_dist.store.plots import sweep_curves, sweep_finals

    histories = {r["id"]: _history(SweepDir(root).member(r["id"])) for r in table}
    paths = [sweep_curves(root / "curves.png", table, histories, manifest["swept"])]
    for key in manifest["swept"]:
        values = [r.get(key) for r in table]
        if key != "seed" and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            name = "final-" + key.replace(".", "_") + ".png"
            paths.append(sweep_finals(root / name, table, key))
    return paths
