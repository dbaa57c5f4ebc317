#!/usr/bin/env bash
# The main job: set up, pretrain a small I-JEPA on the embedded procedural data (a few CPU minutes), then probe it.
# Extra arguments go to examples/pretrain.py (e.g. --output_dir, --max_train_steps, --dataset_name).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup.sh | tail -n 1)
exec "$PY" examples/pretrain.py "$@"
