#!/usr/bin/env bash
# Build .gpu/ for a lent GPU machine, which has torch but no package index: the wheels of everything
# mnist-dist needs there, for that machine's Python, and MNIST gzipped. Left out: torch and what torch
# itself needs (but typing-extensions: pydantic needs a newer one than a torch image may carry), numpy
# and matplotlib with theirs (every torch image of this workplace has them, /work/.library/device/
# KINDS.md, and they are 40 of the 52 MB: a device call carries 64 MiB in all), and wandb (the GPU runs
# use --tracker none).
#   bash bench/gpu_bundle.sh [--python-version 3.12]     (the lent machine's: 3.12)
#   bash bench/gpu_bundle.sh --check                     install it (for this Python) into a fresh venv
#                                                        of torch, numpy and matplotlib; import what runs
# Then rehearse on this CPU (`bash bench/gpu.sh /tmp/r --rehearse`) and make the device call with
# carry [".gpu"] and timeout_s 560 (README, "The first GPU session"):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit
#   export PYTHONPATH=/tmp/site:$PWD MNIST_DIST_DATA_DIR=/tmp/data PYTHONUNBUFFERED=1
#   mkdir -p /tmp/data/MNIST/raw; for f in .gpu/mnist/*.gz; do gunzip -c $f > /tmp/data/MNIST/raw/$(basename $f .gz); done
#   set -o pipefail; bash bench/gpu.sh $OUT 2>&1 | tee $OUT/log.txt
# The call sends the working tree too (64 MiB in all): the script says the bundle's size.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
data=${MNIST_DIST_DATA_DIR:-data}
version=3.12 check=""
while [ $# -gt 0 ]; do
  case $1 in
    --python-version) version=$2; shift ;;
    --check) check=1; version=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])') ;;
    *) echo "bench/gpu_bundle.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
dest=.gpu
[ -n "$check" ] && dest=$(mktemp -d)
mkdir -p "$dest/whl" "$dest/mnist"
# The packages: mnist-dist's dependencies, all the way down, as installed here, less torch's own.
"$py" - >"$dest/requirements.txt" <<'PY'
import importlib.metadata as md
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canon

def closure(roots, skip=frozenset()):
    found, todo = {}, list(roots)
    while todo:
        name = canon(todo.pop())
        if name in found or name in skip:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        found[name] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return found

base = set(closure(["torch", "numpy", "matplotlib"])) - {"typing-extensions"}
bundle = closure(["mnist-dist"], skip=base | {"wandb", "torchvision"})
bundle.pop("mnist-dist", None)
print("\n".join(f"{name}=={version}" for name, version in sorted(bundle.items())))
PY
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$dest/whl" -r "$dest/requirements.txt"
"$py" -m mnist_dist.cli data prepare --data-dir "$data" >/dev/null
for f in "$data"/MNIST/raw/*-ubyte; do gzip -c "$f" >"$dest/mnist/$(basename "$f").gz"; done
echo "$(wc -l <"$dest/requirements.txt") packages, $(du -sh "$dest" | cut -f1) in $dest"
[ -z "$check" ] && exit 0

# The check: a venv with only torch, numpy and matplotlib (and theirs, linked from this venv: what the
# lent image has), the bundle on top.
base=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
venv=$(mktemp -d)/venv
"$(command -v python3)" -m venv --without-pip "$venv"
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$py" - "$base" "$site" <<'PY'
import importlib.metadata as md, sys
from pathlib import Path
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canon

base, site = Path(sys.argv[1]), Path(sys.argv[2])
found, todo = set(), ["torch", "numpy", "matplotlib"]
while todo:  # these and their dependencies but typing-extensions, linked from this venv
    name = canon(todo.pop())
    if name in found or name == "typing-extensions":
        continue
    found.add(name)
    dist = md.distribution(name)
    for f in dist.files or []:
        top = Path(str(f)).parts[0]
        if not (site / top).exists() and (base / top).exists():
            (site / top).symlink_to(base / top)
    reqs = [Requirement(r) for r in dist.requires or []]
    todo += [r.name for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]
PY
"$py" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$dest/site" "$dest"/whl/*.whl
PYTHONPATH="$dest/site:$PWD" "$venv/bin/python" - <<'PY'
import importlib.util, sys
import mnist_dist.cli, typer, pydantic, submitit, accelerate, matplotlib, safetensors, yaml  # noqa
assert importlib.util.find_spec("wandb") is None
print("the bundle over a Python of torch, numpy and matplotlib imports mnist_dist.cli, typer, pydantic,"
      f" submitit, accelerate (pydantic {pydantic.VERSION}, python {sys.version.split()[0]})")
PY
PYTHONPATH="$dest/site:$PWD" "$venv/bin/python" -m mnist_dist.cli --help >/dev/null
PYTHONPATH="$dest/site:$PWD" "$venv/bin/python" -m mnist_dist.cli train --phases 1x0.5 --tracker none \
  --progress off --device cpu --data-dir "$data" --output-dir "$dest/run" >/dev/null
test -s "$dest/run/loss.png" && echo "and trains the seed run's first epoch with it"
rm -rf "$dest" "$(dirname "$venv")"
