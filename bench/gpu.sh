#!/usr/bin/env bash
# What a lent GPU runs, as one command that ends within --budget seconds (default 480), so that one
# device call of 9 minutes holds it with the bundle's install (bench/gpu_bundle.sh says how):
#   bash bench/gpu.sh OUT_DIR [--rehearse] [--budget SECONDS]
# Stages in order of value. Each runs under `timeout -k` and writes its own files into OUT_DIR as it
# goes (a stage cut off keeps what it measured); a stage that cannot end before the deadline is not
# started. OUT_DIR/stages.txt says what each stage did, in seconds:
#   a. smoke, ~2 min (gpu.txt, smoke.json): nvidia-smi (bounded), torch and the GPU, four seed runs of
#      --phases 1x0.5,1x0.1: CUDA graphs (failed unless run.json says the step captured and replayed),
#      eager, fp16 and bf16; graphs against eager; tiny.yaml's 4 members packed in fp16
#      (bench/gpu_smoke.py).
#   b. packed, ~3.5 min (sweep.json, SWEEP.md): 1,024 members (configs/sweeps/gpu-1024.yaml, 32 lrs x
#      32 seeds) as one pack on the GPU against one member alone, --phases 2x0.5,1x0.1 (bench/sweep.py).
#   c. single runs, ~3 min (results.json, RESULTS.md): mnist-dist, the bare loop and Lightning,
#      alternating, then the tutorial if time is left (bench/run.py).
# --rehearse: the same stages in the same order on this CPU, sized down (tiny.yaml for b, 2 epochs,
# no fp16), with wandb and submitit hidden as on the lent machine (tests/test_bench.py runs it).
# The exit status is the number of stages that failed or did not start.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash bench/gpu.sh OUT_DIR [--rehearse] [--budget SECONDS]}
shift
rehearse="" budget=480
while [ $# -gt 0 ]; do
  case $1 in
    --rehearse) rehearse=1 ;;
    --budget) budget=$2; shift ;;
    *) echo "bench/gpu.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
py=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
data=${MNIST_DIST_DATA_DIR:-data}
device=$([ -n "$rehearse" ] && echo cpu || echo cuda)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out"
: >"$out/stages.txt"
deadline=$(( $(date +%s) + budget ))
bad=0
stage() {  # stage NAME SECONDS CMD...: CMD under `timeout -k` when it can end before the deadline
  local name=$1 limit=$2 rc start left
  shift 2
  start=$(date +%s)
  left=$((deadline - start))
  if [ "$limit" -gt "$left" ]; then
    echo "$name: not started: $left s left of the budget, it needs $limit" | tee -a "$out/stages.txt"
    bad=$((bad + 1))
    return 1
  fi
  echo "== $name (at most $limit s)"
  timeout -k 10 "$limit" "$@"
  rc=$?
  if [ "$rc" -eq 0 ]; then
    echo "$name: ok in $(( $(date +%s) - start )) s" >>"$out/stages.txt"
  else
    echo "$name: failed, exit $rc after $(( $(date +%s) - start )) s (124: its time limit)" | tee -a "$out/stages.txt"
    bad=$((bad + 1))
  fi
  return "$rc"
}

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
  echo "rehearsal on the CPU: no GPU" >"$out/gpu.txt"
else
  timeout -k 5 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    | tee "$out/gpu.txt"
  # sweep run finds GPUs without torch (CUDA_VISIBLE_DEVICES, /proc/driver/nvidia/gpus): were neither
  # there, it would start one pack process per CPU, all on GPU 0, instead of one pack of 1,024.
  export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
fi
timeout -k 5 60 "$py" -m mnist_dist.cli data prepare --data-dir "$data" || { echo "no MNIST in $data" >&2; exit 3; }

if [ -n "$rehearse" ]; then
  stage "a. smoke" 150 "$py" bench/gpu_smoke.py --device cpu --data-dir "$data" --out "$out"
  stage "b. packed" 150 "$py" bench/sweep.py --device cpu --quick --only packed,one --data-dir "$data" \
    --out "$out"
  stage "c. single runs" 150 "$py" bench/run.py --device cpu --quick --no-two-processes --no-shared-cores \
    --only "mnist-dist,bare loop" --budget 130 --data-dir "$data" --out "$out"
else
  stage "a. smoke" 130 "$py" bench/gpu_smoke.py --device cuda --data-dir "$data" --out "$out"
  stage "b. packed" 200 "$py" bench/sweep.py --device cuda --spec configs/sweeps/gpu-1024.yaml \
    --phases 2x0.5,1x0.1 --max-pack 1024 --reps 1 --only packed,one --data-dir "$data" --out "$out"
  left=$((deadline - $(date +%s) - 5))
  stage "c. single runs" "$left" "$py" bench/run.py --device cuda --reps 3 --seeds 1 --no-two-processes \
    --no-shared-cores --only "mnist-dist,bare loop,lightning" --if-time tutorial --budget $((left - 15)) \
    --data-dir "$data" --out "$out"
fi
echo "$bad stage(s) failed or not started"
cat "$out/stages.txt"
exit "$bad"
