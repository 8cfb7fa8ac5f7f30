#!/usr/bin/env bash
# Build .gpu/ for a lent GPU machine that has torch but no package index: the pydantic wheels mnist-dist
# needs there (Python 3.12, x86-64) and MNIST gzipped. First rehearse on this CPU
# (`bash bench/gpu.sh /tmp/r --rehearse`), then call the device tool with carry [".gpu"], timeout_s 560:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit
#   export PYTHONPATH=/tmp/site:$PWD MNIST_DIST_DATA_DIR=/tmp/data PYTHONUNBUFFERED=1
#   mkdir -p /tmp/data/MNIST/raw; for f in .gpu/mnist/*.gz; do gunzip -c $f > /tmp/data/MNIST/raw/$(basename $f .gz); done
#   set -o pipefail; timeout 540 bash bench/gpu.sh $OUT 2>&1 | tee $OUT/log.txt
# Then copy $OUT into bench/results-gpu/ and put the table in the README. The packed-members stage
# (1,024 members on the GPU) may not fit in the same call: `timeout 540 bash bench/gpu.sh $OUT --packed`
# in a second call runs it alone (sweep.json, SWEEP.md).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
data=${MNIST_DIST_DATA_DIR:-data}
mkdir -p .gpu/whl .gpu/mnist
core=$("$py" -c 'import pydantic_core; print(pydantic_core.__version__)')
pyd=$("$py" -c 'import pydantic; print(pydantic.VERSION)')
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/whl "pydantic==$pyd" "pydantic-core==$core" annotated-types typing-inspection
"$py" -m mnist_dist.cli data prepare --data-dir "$data"
for f in "$data"/MNIST/raw/*-ubyte; do gzip -c "$f" > ".gpu/mnist/$(basename "$f").gz"; done
du -sh .gpu
