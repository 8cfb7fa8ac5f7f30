#!/usr/bin/env bash
# The benchmark on one GPU, in about 5 minutes, and the packed-members stage, up to 5 more:
#   bash bench/gpu.sh [OUT_DIR]              (MNIST in $MNIST_DIST_DATA_DIR or ./data; PYTHON picks the interpreter)
#   bash bench/gpu.sh OUT_DIR --packed       only stage 4 (a second device call when one call's limit is short)
#   bash bench/gpu.sh OUT_DIR --rehearse     the same stages on this CPU, short (no fp16), with wandb and
#                                            submitit hidden as on the lent machine: checks the plumbing
#                                            before device time is spent on it (tests/test_bench.py)
# 1. the seed run with CUDA graphs and without (same history?), 2. bf16 and fp16 runs,
# 3. bench/run.py --device cuda: mnist-dist, the bare loop, Lightning and the tutorial, alternating,
# 4. packed members: 1,024 (32 lrs x 32 seeds) as one pack on the GPU against one member alone
#    (bench/sweep.py; the rehearsal: tiny.yaml's 4 members on the CPU).
# Device time is scarce, so a stage that fails is logged to OUT_DIR/failures.txt and the next one runs;
# the exit status is the number of failed stages.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results-gpu}
rehearse=$([ "${2:-}" = "--rehearse" ] && echo 1 || echo "")
packed_only=$([ "${2:-}" = "--packed" ] && echo 1 || echo "")
py=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
data=${MNIST_DIST_DATA_DIR:-data}
device=$([ -n "$rehearse" ] && echo cpu || echo cuda)
phases=$([ -n "$rehearse" ] && echo 1x0.5,1x0.1 || echo 5x0.5,5x0.1)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out"
: >"$out/failures.txt"
failed=0
stage() {  # stage NAME SECONDS CMD...: run CMD under a time limit; on failure, note it and go on
  local name=$1 limit=$2 rc
  shift 2
  echo "== $name"
  timeout "$limit" "$@"
  rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "stage '$name' failed: exit $rc" | tee -a "$out/failures.txt"
    failed=$((failed + 1))
  fi
  return "$rc"
}
train=("$py" -m mnist_dist.cli train --tracker none --progress off --device "$device" --phases "$phases"
  --data-dir "$data")

if [ -n "$rehearse" ]; then
  # The lent machine's image has no wandb or submitit: hide them here too, as a site dir without them.
  "$py" - "$tmp" <<'PY'
import sys, sysconfig
from pathlib import Path

tmp, site = Path(sys.argv[1]), sysconfig.get_paths()["purelib"]
(tmp / "site").mkdir()
for entry in Path(site).iterdir():
    if not entry.name.startswith(("wandb", "submitit")):
        (tmp / "site" / entry.name).symlink_to(entry)
(tmp / "sitecustomize.py").write_text(
    f"import sys\nsys.path[:] = [p.replace({site!r}, {str(tmp / 'site')!r}) for p in sys.path]\n"
)
PY
  export PYTHONPATH="$tmp${PYTHONPATH:+:$PYTHONPATH}"
  "$py" -c 'import importlib.util as u; assert not u.find_spec("wandb") and not u.find_spec("submitit")'
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
fi
stage "data" 60 "$py" -m mnist_dist.cli data prepare --data-dir "$data" || exit 1
if [ -n "$packed_only" ]; then
  stage "packed members" 400 "$py" bench/sweep.py --device cuda --spec configs/sweeps/gpu-1024.yaml \
    --max-pack 1024 --reps 1 --only packed,one --data-dir "$data" --out "$out"
  exit $?
fi
runs=(graphs eager bf16)
stage "seed run, CUDA graphs" 60 "${train[@]}" --output-dir "$tmp/graphs"
stage "seed run, eager" 60 "${train[@]}" --set cuda_graphs=off --output-dir "$tmp/eager"
stage "seed run, bf16" 60 "${train[@]}" --precision bf16 --output-dir "$tmp/bf16"
if [ -z "$rehearse" ]; then  # fp16 autocast needs a GPU
  runs+=(fp16)
  stage "seed run, fp16" 60 "${train[@]}" --precision fp16 --output-dir "$tmp/fp16"
fi
stage "compare runs" 30 "$py" - "$tmp" "$out/graphs.json" "${runs[@]}" <<'PY'
import json, sys
from pathlib import Path

tmp, dest, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
result = {}
for n in names:
    try:
        h = json.loads((tmp / n / "history.json").read_text())
        r = json.loads((tmp / n / "run.json").read_text())
    except OSError as e:
        result[n] = {"error": str(e)}
        continue
    result[n] = {"train_seconds": r["train_seconds"], "final_val_acc": h[-1]["val_acc"],
                 "device": r["device_name"], "precision": r["precision"], "history": h}
if "history" in result.get("graphs", {}) and "history" in result.get("eager", {}):
    g, e = result["graphs"]["history"], result["eager"]["history"]
    for k in ("val_loss", "val_acc", "train_loss"):
        pairs = [(a[k], b[k]) for a, b in zip(g, e, strict=True) if a[k] is not None]  # epoch 0: no train_loss
        result[f"graphs_vs_eager_max_diff_{k}"] = max(abs(a - b) for a, b in pairs)
dest.write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps({k: ({kk: vv for kk, vv in v.items() if kk != "history"} if isinstance(v, dict) else v)
                  for k, v in result.items()}, indent=2))
sys.exit(any("error" in v for v in result.values() if isinstance(v, dict)))
PY
if [ -n "$rehearse" ]; then
  # The contenders' plumbing (bench/run.py --quick, in the tests) is not what is rehearsed here.
  stage "benchmark" 300 "$py" bench/run.py --device "$device" --quick --no-two-processes --no-shared-cores \
    --only "mnist-dist,bare loop" --data-dir "$data" --out "$out"
else
  stage "benchmark" 330 "$py" bench/run.py --device cuda --reps 3 --seeds 3 --no-two-processes \
    --only "mnist-dist,bare loop,lightning,tutorial" --data-dir "$data" --out "$out"
fi
if [ -n "$rehearse" ]; then
  stage "packed members" 120 "$py" bench/sweep.py --device cpu --quick --only packed,one --data-dir "$data" \
    --out "$out"
else
  stage "packed members" 300 "$py" bench/sweep.py --device cuda --spec configs/sweeps/gpu-1024.yaml \
    --max-pack 1024 --reps 1 --only packed,one --data-dir "$data" --out "$out"
fi
echo "$failed stage(s) failed"
exit "$failed"
