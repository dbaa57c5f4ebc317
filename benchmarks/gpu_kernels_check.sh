#!/usr/bin/env bash
# The training step's kernels on one GPU (benchmarks/README.md, "GPU"): MFU of the bare bf16 step (official recipe
# and masks, predictor 384 x 12) for ViT-B/16 at batch 256 and ViT-H/14 at batch 128, the bf16-vs-fp32 agreement,
# the busiest kernels of the ViT-B/16 step, ViT-B/16 stepped with cut, padded and packed contexts (per real
# context token, packed checked against padded), and for both models the lever of a bf16 copy of the target
# encoder refreshed after the EMA (forward saved against refresh added). At most about 6 minutes. Run from anywhere:
#
#   bash benchmarks/gpu_kernels_check.sh            # JSON and tables in benchmarks/results/
#   RESULTS=/tmp/out bash benchmarks/gpu_kernels_check.sh
#   COMPILE=1 bash benchmarks/gpu_kernels_check.sh  # also torch.compile (whole model, then per block) against eager
#                                                   # for ViT-B/16 (minutes more: run with a longer limit)
#   COMPILE=vith bash benchmarks/gpu_kernels_check.sh  # instead, ViT-H/14 compiled per block at batch 128: the issue's
#                                                      # 2-minute compile limit (minutes more)

set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
compile=(); limit=190; compile_h=(); limit_h=170
case "${COMPILE:-0}" in
  0) ;;
  1) compile=(--compile-models vit_base_patch16_224 --compile-batch 256 --compile-scopes model,blocks); limit=560 ;;
  vith) compile_h=(--compile-models ijepa_vith14_in1k --compile-batch 128 --compile-scopes blocks); limit_h=560 ;;
  *) echo "COMPILE must be 0, 1 (ViT-B/16, whole model and per block) or vith (ViT-H/14, per block)"; exit 2 ;;
esac
SECONDS=0
echo "== ViT-B/16, batch 256: MFU, agreement, profile, cut / padded / packed contexts, bf16 target copy"
timeout $limit python3 benchmarks/bench_gpu.py --models vit_base_patch16_224 --min-batch 256 --max-batch 256 \
  --steps 10 --agreement-models vit_base_patch16_224 --profile-model vit_base_patch16_224 \
  --context-lengths-model vit_base_patch16_224 --context-lengths-batch 256 \
  --target-copy-models vit_base_patch16_224 "${compile[@]}" \
  --output "$RESULTS/gpu_kernels_vitb16.json" > "$RESULTS/gpu_kernels_vitb16.log" 2>&1
echo "rc $? in ${SECONDS}s"; tail -n 45 "$RESULTS/gpu_kernels_vitb16.log"
SECONDS=0
echo "== ViT-H/14, batch 128: MFU, bf16 target copy"
timeout $limit_h python3 benchmarks/bench_gpu.py --models ijepa_vith14_in1k --min-batch 128 --max-batch 128 \
  --steps 5 --agreement-models '' --profile-model '' --context-lengths-model '' \
  --target-copy-models ijepa_vith14_in1k "${compile_h[@]}" \
  --output "$RESULTS/gpu_kernels_vith14.json" > "$RESULTS/gpu_kernels_vith14.log" 2>&1
echo "rc $? in ${SECONDS}s"; tail -n 12 "$RESULTS/gpu_kernels_vith14.log"
