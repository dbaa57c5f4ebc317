#!/usr/bin/env bash
# The test suite against both ends of the transformers range that setup.cfg allows: its lower bound and the newest
# release pip finds (a fresh install gets that one). Each end gets its own virtualenv, .venv-transformers-<version>/
# (ignored by git); extra arguments go to pytest. About twice the time of scripts/test.sh; not run by CI.
set -euo pipefail
cd "$(dirname "$0")/.."
oldest=$(sed -n 's/^ *transformers>=\([0-9.]*\).*/\1/p' setup.cfg)
newest=$(python3 -m pip index versions transformers 2>/dev/null | sed -n 's/^transformers (\(.*\))$/\1/p')
for version in $(printf '%s\n' "$oldest" "$newest" | sort -u); do
  venv=.venv-transformers-$version
  echo "== transformers $version ($venv)"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -c "import torch" 2>/dev/null || "$venv/bin/python" -m pip install -q torch==2.13.0
  "$venv/bin/python" -m pip install -q -e ".[test]" "transformers==$version"
  "$venv/bin/python" -m pytest -q "$@"
done
