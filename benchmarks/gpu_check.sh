#!/usr/bin/env bash
# The end-to-end check on one GPU (benchmarks/README.md, "Pretraining end to end"): for ViT-B/16 at batch 256 and
# ViT-H/14 at batch 128 (bf16, official masks, predictor 384 x 12) on a folder of generated 500 x 375 JPEGs, the bare
# step, pretrain(), IJepaTrainer and the data loader alone side by side, host syncs per step and the device's busy
# share; with the official code's bare step when $IJEPA_OFFICIAL_ROOT names a facebookresearch/ijepa checkout.
# About 4-5 minutes in all. Run from anywhere:
#
#   bash benchmarks/gpu_check.sh                 # results (logs, one JSON line per model) in benchmarks/results/
#   RESULTS=/tmp/out WORKERS=12 bash benchmarks/gpu_check.sh

set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
WORK=${WORK:-$(mktemp -d)}
WORKERS=${WORKERS:-$(( $(nproc) - 2 ))}
for case in vit_base_patch16_224:256 ijepa_vith14_in1k:128; do
  model=${case%%:*}; batch=${case##*:}; SECONDS=0
  echo "== $model, batch $batch, $WORKERS workers"
  timeout 240 python3 benchmarks/bench_end_to_end.py --device cuda --model "$model" --batch "$batch" \
    --num-workers "$WORKERS" --images 8192 --trainer --work-dir "$WORK" > "$RESULTS/end_to_end_$model.log" 2>&1
  echo "rc $? in ${SECONDS}s"
  grep -A12 "^$model, batch" "$RESULTS/end_to_end_$model.log" || tail -20 "$RESULTS/end_to_end_$model.log"
  tail -n 1 "$RESULTS/end_to_end_$model.log" >> "$RESULTS/end_to_end_gpu.jsonl"
done
