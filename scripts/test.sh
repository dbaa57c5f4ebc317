#!/usr/bin/env bash
# Sets up and runs the test suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup.sh test | tail -n 1)
exec "$PY" -m pytest -q "$@"
