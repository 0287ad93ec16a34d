#!/usr/bin/env bash
# GPU readiness in one command (see bench/gpu_check.py): CUDA tests, the core on the GPU at K = 1, 8, 32
# eager and compiled, a 2-worker run sharing one GPU, short DC/DM/MTT runs; writes runs/gpu-check/gpu_check.md.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python3}" "$here/gpu_check.py" "$@"
