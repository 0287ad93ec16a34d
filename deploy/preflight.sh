#!/usr/bin/env bash
# Says what the current kube context lacks for a ddray overlay, one line per
# problem, before anything hangs: KubeRay's CRDs and operator version, the
# Secrets, storage classes, GPU nodes or a node autoscaler, and whether the
# images can be pulled. Exit status 0: no problem; 1: problems; 2: it could not run.
#
#   deploy/preflight.sh                          # k8s/overlays/gpu, rendered with `kubectl kustomize`
#   deploy/preflight.sh k8s/overlays/cpu-dev
#   kustomize build k8s/overlays/gpu | deploy/preflight.sh -f -
#   deploy/preflight.sh --help
#
# The checks are in deploy/preflight.py (Python 3 with PyYAML: ddray's .venv is
# used when there is one; $PYTHON picks another interpreter, $KUBECTL another kubectl).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${PYTHON:-}
if [[ -z "$python" ]]; then
    if [[ -x "$here/../.venv/bin/python" ]]; then python="$here/../.venv/bin/python"; else python=python3; fi
fi
exec "$python" "$here/preflight.py" "$@"
