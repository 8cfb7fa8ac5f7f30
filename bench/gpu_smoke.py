"""Stage a of bench/gpu.sh: does the GPU path work, and does the CUDA-graph step really capture?

    python bench/gpu_smoke.py --out OUT [--device cuda|cpu] [--data-dir D]

The GPU as torch sees it, then four seed runs of --phases 1x0.5,1x0.1, one after another: CUDA graphs
(the default), eager (`cuda_graphs=off`), fp16 and bf16 (on a CPU: no fp16, and no graphs to capture);
then configs/sweeps/tiny.yaml's 4 members packed in mixed precision (fp16, on a CPU bf16): the
batched kernels under autocast and one loss scale per member.
smoke.json is written after each run, so a stage cut off keeps what it measured. It fails (exit 1)
when a run fails, or when the graphs run did not capture and replay (run.json's `cuda_graphs`: a
capture that silently failed runs eagerly, bit-identical to the eager run, and would read as a pass).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    "graphs": [],
    "eager": ["--set", "cuda_graphs=off"],
    "fp16": ["--precision", "fp16"],
    "bf16": ["--precision", "bf16"],
}


def gpu() -> dict[str, Any]:
    import torch

    found: dict[str, Any] = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        found["name"] = torch.cuda.get_device_name(0)
        found["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    return found


def train(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    out = tmp / name
    cmd = [sys.executable, "-m", "mnist_dist.cli", "train", "--tracker", "none", "--progress", "off"]
    cmd += ["--device", args.device, "--phases", "1x0.5,1x0.1", "--data-dir", str(args.data_dir)]
    start = time.perf_counter()
    proc = subprocess.run(
        [*cmd, "--output-dir", str(out), *RUNS[name]], capture_output=True, text=True, cwd=ROOT, timeout=150
    )
    row: dict[str, Any] = {"wall_seconds": round(time.perf_counter() - start, 2), "exit": proc.returncode}
    if proc.returncode != 0:
        return {**row, "error": (proc.stderr or proc.stdout)[-1500:]}
    run = json.loads((out / "run.json").read_text())
    history = json.loads((out / "history.json").read_text())
    return {
        **row,
        "train_seconds": run["train_seconds"],
        "device": run["device_name"],
        "precision": run["precision"],
        "cuda_graphs": run["cuda_graphs"],
        "grad_scaler": run.get("grad_scaler"),
        "final_val_acc": history[-1]["val_acc"],
        "warnings": [line for line in proc.stdout.splitlines() if line.startswith("warning")],
        "history": history,
    }


def pack_run(precision: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """tiny.yaml's members as packs at `precision`: each member's status, and its loss scale."""
    out = tmp / f"pack-{precision}"
    cmd = [sys.executable, "-m", "mnist_dist.cli", "sweep", "run", str(ROOT / "configs/sweeps/tiny.yaml")]
    cmd += ["--phases", "1x0.5,1x0.1", "--precision", precision, "--device", args.device, "--tracker", "none"]
    cmd += ["--progress", "off", "--data-dir", str(args.data_dir), "--output-dir", str(out)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=150)
    row: dict[str, Any] = {"wall_seconds": round(time.perf_counter() - start, 2), "exit": proc.returncode}
    if proc.returncode != 0:
        return {**row, "error": (proc.stderr or proc.stdout)[-1500:]}
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("members/*/run.json"))]
    row["members"] = [
        {"status": r["status"], "pack": r.get("pack", {}).get("size"), "grad_scaler": r.get("grad_scaler")}
        for r in runs
    ]
    if len(runs) != 4 or any(r["status"] != "completed" for r in runs):
        row["exit"] = 1
    return row


def compare(result: dict[str, Any]) -> None:
    """Graphs against eager: the largest difference of each history column."""
    g, e = result["runs"].get("graphs", {}).get("history"), result["runs"].get("eager", {}).get("history")
    if g and e:
        for k in ("val_loss", "val_acc", "train_loss"):
            pairs = [(a[k], b[k]) for a, b in zip(g, e, strict=True) if a[k] is not None]
            result[f"graphs_vs_eager_max_diff_{k}"] = max(abs(a - b) for a, b in pairs)


def problems(result: dict[str, Any], device: str) -> list[str]:
    found = [f"{n}: exit {r['exit']}" for n, r in result["runs"].items() if r["exit"] != 0]
    graphs = result["runs"].get("graphs", {}).get("cuda_graphs")
    captured = bool(graphs) and graphs["applies"] and graphs["captures"] >= 1 and graphs["replays"] > 0
    if device == "cuda" and graphs is not None and not (captured and not graphs["failure"]):
        found.append(f"graphs: the CUDA-graph step did not capture and replay: {graphs}")
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("MNIST_DIST_DATA_DIR", "data")))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names = [n for n in RUNS if not (n == "fp16" and args.device == "cpu")]  # fp16 autocast needs a GPU
    result: dict[str, Any] = {"gpu": gpu(), "runs": {}}
    tmp = Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
    packed = "pack fp16" if args.device == "cuda" else "pack bf16"
    for name in [*names, packed]:
        print(f"-- {name}", flush=True)
        result["runs"][name] = (
            pack_run(name.split()[1], args, tmp) if name == packed else train(name, args, tmp)
        )
        compare(result)
        result["problems"] = problems(result, args.device)
        (args.out / "smoke.json").write_text(json.dumps(result, indent=1) + "\n")
        row = {k: v for k, v in result["runs"][name].items() if k != "history"}
        print(json.dumps(row), flush=True)
    print("\n".join(result["problems"]) or "smoke: every run ok", flush=True)
    sys.exit(1 if result["problems"] else 0)


if __name__ == "__main__":
    main()
