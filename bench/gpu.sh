#!/usr/bin/env bash
# The benchmark on one GPU, in under 5 minutes:
#   bash bench/gpu.sh [OUT_DIR]          (MNIST in $MNIST_DIST_DATA_DIR or ./data; PYTHON to pick the interpreter)
# 1. the seed run with CUDA graphs and without (same history?), 2. bf16 and fp16 runs,
# 3. bench/run.py --device cuda: mnist-dist, the bare loop, Lightning and the tutorial, alternating.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results-gpu}
py=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
data=${MNIST_DIST_DATA_DIR:-data}
tmp=$(mktemp -d)
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
"$py" -m mnist_dist.cli data prepare --data-dir "$data"
train() { "$py" -m mnist_dist.cli train --tracker none --progress off --device cuda --data-dir "$data" "$@"; }

train --output-dir "$tmp/graphs" | tail -2
train --set cuda_graphs=off --output-dir "$tmp/eager" | tail -2
train --precision bf16 --output-dir "$tmp/bf16" | tail -1
train --precision fp16 --output-dir "$tmp/fp16" | tail -1
"$py" - "$tmp" "$out/graphs.json" <<'PY'
import json, sys
from pathlib import Path
tmp, dest = Path(sys.argv[1]), Path(sys.argv[2])
runs = {n: (json.loads((tmp / n / "history.json").read_text()), json.loads((tmp / n / "run.json").read_text()))
        for n in ("graphs", "eager", "bf16", "fp16")}
g, e = runs["graphs"][0], runs["eager"][0]
result = {n: {"train_seconds": r["train_seconds"], "final_val_acc": h[-1]["val_acc"], "device": r["device_name"],
              "precision": r["precision"]} for n, (h, r) in runs.items()}
result["graphs_vs_eager_max_diff"] = max(abs(a[k] - b[k]) for a, b in zip(g, e) for k in ("val_loss", "val_acc"))
dest.write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps(result, indent=2))
PY
"$py" bench/run.py --device cuda --reps 3 --seeds 3 --no-two-processes \
    --only "mnist-dist,bare loop,lightning,tutorial" --data-dir "$data" --out "$out"
