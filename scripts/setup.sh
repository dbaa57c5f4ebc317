#!/usr/bin/env bash
# Sets up a Python environment for ijepa-hf and prints its python path on the last line.
# - Inside an active virtualenv/conda env, installs there; otherwise creates ./.venv.
# - Keeps an already importable torch (CPU or CUDA) untouched; installs torch==2.13.0 only when none is present.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${VIRTUAL_ENV:-}" ] || [ -n "${CONDA_PREFIX:-}" ]; then
  PY=python
else
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  PY=.venv/bin/python
fi
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch==2.13.0" >&2
  "$PY" -m pip install -q torch==2.13.0 >&2
fi
if ! "$PY" -c "import ijepa_hf, pytest" >/dev/null 2>&1 || [ setup.cfg -nt .venv/.ijepa_hf_installed ]; then
  echo "[setup] installing ijepa-hf and its dependencies" >&2
  "$PY" -m pip install -q -e ".[test]" >&2
  touch .venv/.ijepa_hf_installed 2>/dev/null || true
fi
echo "$PY"
