"""Bayes against random, side by side in one run: the same space (both phases' lrs, log-uniform), the
same seed, run_cap 32 each, the seed config's phases, every member trained by `mnist-dist sweep run`
(packs). Reported: the best final val_acc among the first 8, 16 and 32 members of each (in the order
they were proposed), and the seed noise of each method's best config (its lrs trained again with 4
other seeds: mean ± std of the final val_acc). Writes ADAPTIVE.md and adaptive.json.

    python bench/adaptive.py                  # run_cap 32, rounds of 8 for bayes
    python bench/adaptive.py --run-cap 8 --round-size 4 --phases 1x0.5,1x0.1 --out /tmp/a   # a try
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SPACE = """
name: {name}
method: {method}
run_cap: {run_cap}
base: {base}
metric: {{name: val_acc, goal: maximize}}
parameters:
  phases.0.lr: {{distribution: log_uniform_values, min: 0.02, max: 2.0}}
  phases.1.lr: {{distribution: log_uniform_values, min: 0.01, max: 0.5}}
  seed: {{value: 0}}
"""
NOISE = """
name: {name}
method: grid
base: {base}
metric: {{name: val_acc, goal: maximize}}
parameters:
  phases.0.lr: {{value: {lr0}}}
  phases.1.lr: {{value: {lr1}}}
  seed: {{values: [1, 2, 3, 4]}}
"""


def sweep(spec_text: str, where: Path, args: argparse.Namespace, *extra: str) -> float:
    """`mnist-dist sweep run` of the spec into `where`; its wall seconds."""
    spec = where.with_suffix(".yaml")
    spec.write_text(spec_text)
    command = [sys.executable, "-m", "mnist_dist.cli", "sweep", "run", str(spec), "--tracker", "none"]
    command += ["--output-dir", str(where), "--data-dir", str(args.data_dir), *extra]
    if args.phases:
        command += ["--phases", args.phases]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    return time.perf_counter() - start


def finals(where: Path) -> list[tuple[dict[str, Any], float]]:
    """(swept values, final val_acc) of each member, in the order they were proposed."""
    out = []
    for member in json.loads((where / "sweep.json").read_text())["members"]:
        history = json.loads((where / "members" / member["id"] / "history.json").read_text())
        out.append((member["params"], history[-1]["val_acc"]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-cap", type=int, default=32)
    p.add_argument("--round-size", type=int, default=8)
    p.add_argument("--phases", default="", help="override the phases (default: the seed config's)")
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("MNIST_DIST_DATA_DIR", "data")))
    p.add_argument("--out", type=Path, default=ROOT / "bench/results")
    args = p.parse_args()
    base = ROOT / "configs/seed.yaml"
    results: dict[str, Any] = {"run_cap": args.run_cap, "round_size": args.round_size, "phases": args.phases}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("random", "bayes"):
            where = Path(tmp) / method
            text = SPACE.format(name="adaptive", method=method, run_cap=args.run_cap, base=base)
            extra = ["--round-size", str(args.round_size)] if method == "bayes" else []
            seconds = sweep(text, where, args, *extra)
            found = finals(where)
            marks = [n for n in (8, 16, 32) if n <= len(found)] or [len(found)]
            best = {n: max(acc for _, acc in found[:n]) for n in marks}
            params, acc = max(found, key=lambda f: f[1])
            noise_text = NOISE.format(
                name=f"noise-{method}", base=base, lr0=params["phases.0.lr"], lr1=params["phases.1.lr"]
            )
            sweep(noise_text, Path(tmp) / f"noise-{method}", args)
            seeds = [a for _, a in finals(Path(tmp) / f"noise-{method}")] + [acc]
            results[method] = {
                "best_after": best,
                "best_params": params,
                "wall_seconds": round(seconds, 1),
                "best_over_5_seeds": {"mean": statistics.fmean(seeds), "std": statistics.stdev(seeds)},
            }
            print(method, json.dumps(results[method]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "adaptive.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "ADAPTIVE.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict[str, Any]) -> str:
    from mnist_dist.store import provenance

    c = provenance.cpu()
    marks = list(results["random"]["best_after"])
    lines = [
        "# Bayes against random (bench/adaptive.py)",
        "",
        f"{c['model']} ({c['vendor']}, {c['capability']}, BLAS {c['blas']}), {os.cpu_count()} cores; run_cap "
        f"{results['run_cap']}, bayes in rounds of {results['round_size']}, phases "
        f"{results['phases'] or 'of the seed config'}, seed 0, both lrs log-uniform (0.02-2.0, 0.01-0.5)",
        "",
        "| method | "
        + " | ".join(f"best final val_acc after {n}" for n in marks)
        + " | best config over 5 seeds (mean ± std) | wall s |",
        "|---|" + "---|" * (len(marks) + 2),
    ]
    for method in ("random", "bayes"):
        r = results[method]
        noise = r["best_over_5_seeds"]
        lines.append(
            f"| {method} | "
            + " | ".join(f"{r['best_after'][n]:.4f}" for n in marks)
            + f" | {noise['mean']:.4f} ± {noise['std']:.4f} | {r['wall_seconds']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
