#!/usr/bin/env bash
# Sets up a Python environment for ijepa-hf and prints its python path on the last line.
# - Inside an active virtualenv/conda env, installs there; otherwise creates ./.venv.
# - Keeps an already importable torch (CPU or CUDA) untouched; installs torch==2.13.0 only when none is present.
# - `setup.sh` installs what the package runs; `setup.sh test` adds the test extra (pytest, DeepSpeed,
#   transformers' structural linter), which scripts/test.sh and .ci/run ask for: the main job does not install the
#   test tools into the user's environment.
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
EXTRA=${1:-}
case "$EXTRA" in
  "") SPEC="."; CHECK="import ijepa_hf"; MARKER=.venv/.ijepa_hf_installed ;;
  test) SPEC=".[test]"; CHECK="import ijepa_hf, pytest, mlinter"; MARKER=.venv/.ijepa_hf_installed_test ;;
  *) echo "[setup] unknown extra '$EXTRA': give nothing (the package) or 'test'" >&2; exit 2 ;;
esac
if ! "$PY" -c "$CHECK" >/dev/null 2>&1 || [ setup.cfg -nt "$MARKER" ]; then
  echo "[setup] installing ijepa-hf${EXTRA:+ with its $EXTRA extra} and its dependencies" >&2
  "$PY" -m pip install -q -e "$SPEC" >&2
  touch "$MARKER" 2>/dev/null || true
fi
echo "$PY"
