#!/usr/bin/env bash
# The paper's adaptation experiment on embedded data: LeNets pretrained on `digits`
# (8×8, resized to 28×28) adapted to MNIST-5k with 100 distilled images, against the
# same pool adapted with the four real-image baselines (same budget, same evaluation).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/adaptation}
.venv/bin/ddray pretrain --dataset digits --image-size 28 --nets 10 --epochs 5 --out "$OUT/pool-digits" \
    --no-tracking --no-progress
"$PY" experiments/mnist5k_table.py --modes random-pretrained --pretrained "$OUT/pool-digits" \
    --iterations "${ITERATIONS:-300}" --out "$OUT"
