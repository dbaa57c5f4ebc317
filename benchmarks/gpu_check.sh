#!/usr/bin/env bash
# The end-to-end check on one GPU (benchmarks/README.md, "Pretraining end to end"): for ViT-B/16 at batch 256 and
# ViT-H/14 at batch 128 (bf16, official masks, predictor 384 x 12) on a folder of generated 500 x 375 JPEGs, the bare
# step, pretrain(), IJepaTrainer and the data loader alone side by side, host syncs per step and the device's busy
# share; with the official code's bare step when $IJEPA_OFFICIAL_ROOT names a facebookresearch/ijepa checkout.
# About 4-5 minutes in all. Run from anywhere:
#
#   bash benchmarks/gpu_check.sh                 # results (logs, one JSON line per model) in benchmarks/results/
#   RESULTS=/tmp/out WORKERS=12 bash benchmarks/gpu_check.sh
#
# An offline machine without the package's dependencies: put wheels (Python 3.12, manylinux) of what is missing
# (transformers >= setup.cfg's minimum, datasets, dill, multiprocess, xxhash) in .whl/ at the repository root.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-benchmarks/results}
WORK=${WORK:-$(mktemp -d)}
WORKERS=${WORKERS:-$(( $(nproc) - 2 ))}
mkdir -p "$RESULTS"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, accelerate, datasets; print('torch', torch.__version__, '| transformers', \
transformers.__version__, '| accelerate', accelerate.__version__, '| datasets', datasets.__version__)" || exit 1
for case in vit_base_patch16_224:256 ijepa_vith14_in1k:128; do
  model=${case%%:*}; batch=${case##*:}; SECONDS=0
  echo "== $model, batch $batch, $WORKERS workers"
  timeout 240 python3 benchmarks/bench_end_to_end.py --device cuda --model "$model" --batch "$batch" \
    --num-workers "$WORKERS" --images 8192 --trainer --work-dir "$WORK" > "$RESULTS/end_to_end_$model.log" 2>&1
  echo "rc $? in ${SECONDS}s"
  grep -A12 "^$model, batch" "$RESULTS/end_to_end_$model.log" || tail -20 "$RESULTS/end_to_end_$model.log"
  tail -n 1 "$RESULTS/end_to_end_$model.log" >> "$RESULTS/end_to_end_gpu.jsonl"
done
