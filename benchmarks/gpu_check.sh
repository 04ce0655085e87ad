#!/usr/bin/env bash
# The GPU check with its set-up: bash benchmarks/gpu_check.sh [--quick] [gpu_check.py options]
# (what `make gpu-check` runs). In order:
#   1. no NVIDIA GPU (nvidia-smi missing or listing none): one line, exit 2, nothing set up;
#   2. a Python with torch (CUDA), transformers, peft and pytest, the first of:
#      $GPU_CHECK_PYTHON; $VENV set up by `make setup`; python3 as it is (src/ on PYTHONPATH,
#      nothing installed: an image that ships them, offline); else `make setup` (TORCH_SPEC is
#      `torch` where nvidia-smi exists; pip gives up quickly when offline);
#   3. benchmarks/gpu_check.py under that Python, within 8 minutes counted from step 1.
set -uo pipefail
cd "$(dirname "$0")/.."
export GPU_CHECK_T0="${GPU_CHECK_T0:-$(date +%s)}"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
  echo "gpu-check: no CUDA device (nvidia-smi missing or lists no GPU); nothing set up or run"
  exit 2
fi

has_all() {  # has_all PYTHON: torch sees CUDA and the packages the parts import are there
  "$1" -c 'import importlib.util as u, sys
if any(u.find_spec(m) is None for m in ("transformers", "peft", "pytest", "hypothesis")):
    sys.exit(1)
import torch
sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1
}

PY="${GPU_CHECK_PYTHON:-}"
if [ -z "$PY" ] && [ -f "$VENV/.runlora-installed" ] && has_all "$VENV/bin/python"; then
  PY="$VENV/bin/python"
fi
if [ -z "$PY" ] && has_all "$PYTHON"; then
  PY="$PYTHON"
  echo "gpu-check: using $PYTHON as it is (torch with CUDA, transformers, peft, pytest found)"
fi
if [ -z "$PY" ]; then
  echo "gpu-check: setting up $VENV (make setup)"
  if PIP_DEFAULT_TIMEOUT=15 PIP_RETRIES=1 make --no-print-directory setup \
       PYTHON="$PYTHON" VENV="$VENV"; then
    PY="$VENV/bin/python"
  elif "$PYTHON" -c 'import torch' >/dev/null 2>&1; then
    PY="$PYTHON"
    echo "gpu-check: make setup failed; running under $PYTHON as it is (parts that need a" \
         "missing package will fail and be recorded)"
  else
    echo "gpu-check: set-up failed and $PYTHON has no torch; see the output above"
    exit 1
  fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" benchmarks/gpu_check.py --python "$PY" "$@"
