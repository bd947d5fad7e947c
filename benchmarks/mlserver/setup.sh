#!/usr/bin/env bash
# Creates .venv-mlserver/ (beside the project's .venv/) with Seldon MLServer and the pins verified to install
# together on Python 3.11. MLServer needs its own venv: it pins uvloop 0.21 and protobuf < 7, Ferry does not.
# Usage: bash benchmarks/mlserver/setup.sh [VENV_DIR]   (idempotent: an existing venv with the pins is kept)
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${1:-.venv-mlserver}"
PYTHON="${PYTHON:-python3.11}"
PINS=(
  "mlserver==1.7.1"
  "uvloop==0.21.0"
  "onnxruntime==1.32.0"
  "numpy==2.4.6"
  "grpcio==1.85.3"
  "protobuf==6.33.6"
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
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PINS[@]}"
"$VENV/bin/python" -c "import mlserver, onnxruntime, uvloop; print('$VENV: mlserver', mlserver.__version__, \
'onnxruntime', onnxruntime.__version__, 'uvloop', uvloop.__version__)"
