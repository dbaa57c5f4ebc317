"""What cutting every context to the batch's shortest costs the task, and what keeping each image's own costs in time.

Two tables:

1. Masks only (cheap, any batch size): context patches each image keeps with ``context_lengths="shortest"`` (the
   official collator: every context cut to the shortest of the global batch) and with ``"per_image"`` (nothing cut;
   rows padded to the longest), mean and minimum over images, and the padded length ``"per_image"`` computes on,
   for ViT-B/16 at 224 px (14 x 14 patches) and both mask modes, at several global batch sizes.
2. Training step on CPU: s/step of the whole step (target encoder, context encoder, predictor, smooth-L1, backward,
   AdamW with the official groups, EMA) for both settings on the same mask draws (same targets; the contexts differ
   only by the cut), the two settings back to back on every draw, so that a busy machine slows both alike; and the
   matrix-product FLOPs of one step (``torch.utils.flop_counter``, on the untimed warm-up draw), which do not
   depend on the machine.

    python benchmarks/bench_context_lengths.py                          # defaults below, a few minutes on 2 cores
    python benchmarks/bench_context_lengths.py --step-batch-sizes 16 --precisions bf16,fp32
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from statistics import median

import torch
from torch.utils.flop_counter import FlopCounterMode

try:
    from ijepa_hf import IJepaForPreTraining, IJepaMaskCollator, IJepaPretrainingConfig
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ijepa_hf import IJepaForPreTraining, IJepaMaskCollator, IJepaPretrainingConfig
from ijepa_hf.training import build_optimizer, keep_freed_memory_for_reuse
from machine import cpu_description  # benchmarks/machine.py, beside this script

SETTINGS = ("shortest", "per_image")


def context_stats(collator: IJepaMaskCollator, batch_size: int, batch_indices: range) -> dict[str, float]:
    """Mean and min context patches kept per image, and the mean padded row length, over the given batches."""
    kept, lowest, padded = [], [], []
    for index in batch_indices:
        masks = collator.sample_batch(batch_size, index)
        lengths = masks.get("context_lengths")
        if lengths is None:
            lengths = torch.full((batch_size,), masks["context_mask"].shape[1])
        kept.append(lengths.double().mean().item())
        lowest.append(int(lengths.min()))
        padded.append(masks["context_mask"].shape[1])
    return {"mean": sum(kept) / len(kept), "min": min(lowest), "padded": sum(padded) / len(padded)}


def mask_table(batch_sizes: list[int], batches: int) -> None:
    print(f"\n### Context patches kept per image, ViT-B/16 at 224 px (196 patches), {batches} global batches per row\n")
    print("| mask_mode | global batch | shortest: kept (= computed) mean / min | per_image: kept mean / min | "
          "per_image: padded length computed |")
    print("|---|---:|---:|---:|---:|")
    for mode in ("fixed", "official"):
        for batch_size in batch_sizes:
            cut = context_stats(IJepaMaskCollator(224, 16, mask_mode=mode), batch_size, range(batches))
            own = context_stats(IJepaMaskCollator(224, 16, mask_mode=mode, context_lengths="per_image"), batch_size,
                                range(batches))
            print(f"| {mode} | {batch_size} | {cut['mean']:.1f} / {cut['min']} | {own['mean']:.1f} / {own['min']} | "
                  f"{own['padded']:.1f} |")


def make_model(args: argparse.Namespace, context_lengths: str) -> IJepaForPreTraining:
    config = IJepaPretrainingConfig.from_preset(
        f"{args.size}_patch16_224", predictor={"hidden_size": 384, "num_hidden_layers": args.predictor_depth},
        mask_mode=args.mask_mode, context_lengths=context_lengths)
    torch.manual_seed(0)
    return IJepaForPreTraining(config).train()


def train_step(model: IJepaForPreTraining, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
               precision: str) -> float:
    """One whole training step; returns its wall time in seconds."""
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.update_target_encoder(0.996)
    return time.perf_counter() - start


def step_table(args: argparse.Namespace) -> None:
    print(f"\n### Training step, {args.size}/16 at 224 px, predictor 384 x {args.predictor_depth}, mask_mode="
          f"{args.mask_mode}; {args.steps} mask draws per row, each timed with both settings back to back\n")
    print("| precision | batch | context_lengths | kept per image: mean / min | computed per image (padded) | "
          "matmul GFLOP/step (ratio) | s/step: median (min) | per_image / shortest, same draw: median (range) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for precision in args.precisions:
        for batch_size in args.step_batch_sizes:
            runs = {}
            for setting in SETTINGS:
                model = make_model(args, setting)  # the same weights for both (same seed)
                optimizer = build_optimizer(model,
                                            lr=1e-4, weight_decay=0.04)
                runs[setting] = (model, optimizer, IJepaMaskCollator.from_config(model.config, seed=0))
            pixels = torch.randn(batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0))
            indices = range(1, args.steps + 1)  # draw 0 warms both up, untimed (its FLOPs are counted)
            stats = {s: context_stats(runs[s][2], batch_size, indices) for s in SETTINGS}
            times: dict[str, list[float]] = {s: [] for s in SETTINGS}
            flops: dict[str, list[float]] = {s: [] for s in SETTINGS}
            for index in [0, *indices]:
                # Both settings on the same draw (same targets, contexts differ only by the cut), in alternating
                # order, so that a load change on the shared machine hits both alike.
                order = SETTINGS if index % 2 else SETTINGS[::-1]
                for setting in order:
                    model, optimizer, collator = runs[setting]
                    batch = {"pixel_values": pixels, **collator.sample_batch(batch_size, index)}
                    if index == 0:  # the untimed warm-up draw: count its matrix-product FLOPs (machine-independent)
                        with FlopCounterMode(display=False) as counter:
                            train_step(model, optimizer, batch, precision)
                        flops[setting].append(counter.get_total_flops() / 1e9)
                    else:
                        times[setting].append(train_step(model, optimizer, batch, precision))
            ratios = [b / a for a, b in zip(times["shortest"], times["per_image"])]
            for setting in SETTINGS:
                s, t = stats[setting], times[setting]
                spread = f"{median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
                ratio = "1.00x" if setting == "shortest" else spread
                gflop = flops[setting][0]
                print(f"| {precision} | {batch_size} | {setting} | {s['mean']:.1f} / {s['min']} | {s['padded']:.1f} | "
                      f"{gflop:.0f} ({gflop / flops['shortest'][0]:.2f}x) | {median(t):.2f} ({min(t):.2f}) | {ratio} |",
                      flush=True)
            del runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mask-batch-sizes", default="16,128,1024", help="global batch sizes of the masks table")
    parser.add_argument("--mask-batches", type=int, default=20, help="mask batches averaged per row")
    parser.add_argument("--step-batch-sizes", default="16,64", help="batch sizes of the step table ('' to skip)")
    parser.add_argument("--precisions", default="bf16", help="comma-separated: bf16 (autocast), fp32")
    parser.add_argument("--size", default="vit_tiny", help="encoder size of the step table")
    parser.add_argument("--predictor-depth", type=int, default=6)
    parser.add_argument("--mask-mode", default="fixed", choices=("fixed", "official"))
    parser.add_argument("--steps", type=int, default=6, help="timed mask draws per row (each with both settings)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    args.step_batch_sizes = [int(b) for b in args.step_batch_sizes.split(",") if b]
    args.precisions = [p for p in args.precisions.split(",") if p]
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    keep_freed_memory_for_reuse()
    print(f"machine: {cpu_description()}, {platform.system()} {platform.machine()}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    start = time.perf_counter()
    mask_table([int(b) for b in args.mask_batch_sizes.split(",") if b], args.mask_batches)
    if args.step_batch_sizes:
        step_table(args)
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
