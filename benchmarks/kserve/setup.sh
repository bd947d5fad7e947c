#!/usr/bin/env bash
# Adds onnxruntime to .venv-kserve/ (the venv `make kserve-deps` makes for KServe's REST client test), so that the
# same venv can also run KServe's Python model server (kserve.ModelServer) on the example ONNX models for
# benchmarks/bench_rest_peers.py. KServe needs its own venv: it pins protobuf < 7, Ferry does not.
# Usage: bash benchmarks/kserve/setup.sh [VENV_DIR]   (idempotent: an existing venv with the pins is kept)
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${1:-.venv-kserve}"
PYTHON="${PYTHON:-python3.11}"
PINS=(
  "kserve==0.21.0"
  "onnxruntime==1.32.0"
)
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "${PINS[@]}" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    sys.exit(0 if all(version(p.split("==")[0]) == p.split("==")[1] for p in sys.argv[1:]) else 1)
except PackageNotFoundError:
    sys.exit(1)
PY
then
  echo "$VENV: already has ${PINS[*]}"
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PINS[@]}"
"$VENV/bin/python" -c "import importlib.metadata as m; print('$VENV:', ', '.join(p + ' ' + m.version(p) for p in \
('kserve', 'onnxruntime', 'uvloop', 'numpy')))"
