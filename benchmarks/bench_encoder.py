"""Feature extraction: ijepa_hf's encoder vs transformers' stock IJepaModel on identical weights.

Measures images/s (timed repetitions interleaved between the models, so a busy machine slows both alike) and the
peak resident memory of a fresh process loading and running each configuration, in fp32 and under bf16 autocast; then the
context-masked forward (the I-JEPA context encoder on K of N patches) against the full forward.

    python benchmarks/bench_encoder.py                       # ViT-S/16 at 224 px, batch 32, 2 threads
    python benchmarks/bench_encoder.py --size vit_tiny --batch-size 64 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch
from peak_memory import peak_rss_bytes  # benchmarks/peak_memory.py, beside this script


def build(kind: str, size: str, image_size: int, patch_size: int):
    """Both models with the same random weights (ours converted to the stock layout)."""
    from ijepa_hf import IJepaEncoderConfig, IJepaEncoderModel
    from ijepa_hf.conversion import encoder_to_transformers

    torch.manual_seed(0)
    ours = IJepaEncoderModel(IJepaEncoderConfig.from_preset(size, image_size=image_size, patch_size=patch_size)).eval()
    if kind == "ours":
        return ours
    stock = encoder_to_transformers(ours).eval()
    stock.config._attn_implementation = "sdpa"
    return stock


def features(model, pixels: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Average-pooled features (the I-JEPA evaluation output) for either model."""
    if context_mask is not None:
        return model(pixels, context_mask=context_mask).pooler_output
    return model(pixels).last_hidden_state.mean(1)


def time_calls(fn, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def peak_memory_child(args: argparse.Namespace, model_dir: str, kind: str, precision: str) -> float:
    """Peak RSS (MiB) of a fresh process that loads one saved model and runs it: isolates each configuration."""
    command = [sys.executable, __file__, "--child", kind, "--child-dir", model_dir, "--child-precision", precision,
               "--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_mib"]


def run_child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if args.child == "ours":
        from ijepa_hf import IJepaEncoderModel as model_class
    else:
        from transformers import IJepaModel as model_class
    model = model_class.from_pretrained(args.child_dir).eval()
    pixels = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.child_precision == "bf16"):
        features(model, pixels)
    print(json.dumps({"peak_rss_mib": peak_rss_bytes() / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="vit_small")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per model and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (best round is reported)")
    parser.add_argument("--context-fraction", type=float, default=0.3,
                        help="share of patches kept by the context mask (the official masks keep ~30%%)")
    parser.add_argument("--child", choices=("ours", "stock"), help=argparse.SUPPRESS)
    parser.add_argument("--child-precision", choices=("fp32", "bf16"), help=argparse.SUPPRESS)
    parser.add_argument("--child-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return

    torch.set_num_threads(args.threads)
    ours = build("ours", args.size, args.image_size, args.patch_size)
    stock = build("stock", args.size, args.image_size, args.patch_size)
    saved = {kind: tempfile.mkdtemp(prefix=f"bench-{kind}-") for kind in ("ours", "stock")}
    ours.save_pretrained(saved["ours"])
    stock.save_pretrained(saved["stock"])
    pixels = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    num_patches = (args.image_size // args.patch_size) ** 2
    keep = int(num_patches * args.context_fraction)
    generator = torch.Generator().manual_seed(0)
    context_mask = torch.stack([torch.randperm(num_patches, generator=generator)[:keep].sort().values
                                for _ in range(args.batch_size)])

    print(f"# Encoder feature extraction: {args.size}/{args.patch_size} at {args.image_size} px, batch "
          f"{args.batch_size}")
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs; torch "
          f"{torch.__version__}; threads {torch.get_num_threads()}")
    print()
    print("| precision | model | images/s | peak RSS (MiB) | max abs diff vs ours |")
    print("|---|---|---:|---:|---:|")
    rows = {}
    for precision in ("fp32", "bf16"):
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
        with torch.no_grad(), autocast:
            reference = features(ours, pixels)
            diff = (features(stock, pixels) - reference).abs().max().item()
            best = {"ours": float("inf"), "stock": float("inf"), "masked": float("inf")}
            for _ in range(args.rounds):
                best["ours"] = min(best["ours"], time_calls(lambda: features(ours, pixels), args.repeats))
                best["stock"] = min(best["stock"], time_calls(lambda: features(stock, pixels), args.repeats))
                best["masked"] = min(best["masked"], time_calls(lambda: features(ours, pixels, context_mask), args.repeats))
        rows[precision] = best
        for kind, label in (("stock", "transformers IJepaModel (sdpa)"), ("ours", "ijepa_hf IJepaEncoderModel")):
            memory = peak_memory_child(args, saved[kind], kind, precision)
            difference = "0" if kind == "ours" else f"{diff:.1e}"
            print(f"| {precision} | {label} | {args.batch_size / best[kind]:.1f} | {memory:.0f} | {difference} |")
    print()
    print(f"Speed-up of ijepa_hf over the stock model: fp32 {rows['fp32']['stock'] / rows['fp32']['ours']:.2f}x, "
          f"bf16 {rows['bf16']['stock'] / rows['bf16']['ours']:.2f}x")
    print()
    print(f"## Context-masked forward ({keep} of {num_patches} patches) vs full forward, ijepa_hf")
    print()
    print("| precision | full images/s | masked images/s | speed-up |")
    print("|---|---:|---:|---:|")
    for precision, best in rows.items():
        print(f"| {precision} | {args.batch_size / best['ours']:.1f} | {args.batch_size / best['masked']:.1f} | "
              f"{best['ours'] / best['masked']:.2f}x |")


if __name__ == "__main__":
    main()
