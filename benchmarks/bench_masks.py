"""Throughput of the I-JEPA multi-block mask sampler (masks only, no images).

Usage::

    python benchmarks/bench_masks.py                 # 1 thread, batch 256
    python benchmarks/bench_masks.py --threads 0     # keep torch's default thread count

Prints a markdown table of batches/s for ``mask_mode="fixed"`` and ``mask_mode="official"`` at 224 px with
patch 16 and 14, and the ratio against the official collator's ~33 batches/s at batch 256, 224/16
(the figure given in the project reference for this kind of machine; it is NOT re-measured here,
because the official code is not a dependency of this project).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

try:
    from ijepa_hf.masking import IJepaMaskCollator
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ijepa_hf.masking import IJepaMaskCollator

from machine import cpu_description  # noqa: E402  (benchmarks/machine.py, beside this script)

OFFICIAL_BATCHES_PER_S = 33.0  # official MaskCollator, batch 256, 224/16, 1 thread (reference figure)


def bench(mode: str, patch: int, batch_size: int, min_seconds: float, image_size: int = 224) -> float:
    collator = IJepaMaskCollator(image_size, patch, mask_mode=mode)
    for i in range(10):  # warm-up (allocator, first-call overheads)
        collator.sample_masks(batch_size, i)
    n, start = 0, time.perf_counter()
    while True:
        for _ in range(20):
            collator.sample_masks(batch_size, 10 + n)
            n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = leave torch's default)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum timing per row")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"machine: {cpu_description()}, {platform.system()} {platform.machine()}")
    print(f"masks only, batch {args.batch_size}, 224 px; the official figure ({OFFICIAL_BATCHES_PER_S:.0f} "
          f"batches/s at 224/16) is taken from the project reference, not measured in this run.\n")
    print("| mode | image/patch | grid | batches/s | masks (images)/s | vs official 33/s |")
    print("|---|---|---|---:|---:|---:|")
    for patch in (16, 14):
        for mode in ("fixed", "official"):
            rate = bench(mode, patch, args.batch_size, args.seconds)
            ratio = f"{rate / OFFICIAL_BATCHES_PER_S:.1f}x" if patch == 16 else "n/a"
            grid = 224 // patch
            print(f"| {mode} | 224/{patch} | {grid}x{grid} | {rate:.0f} | {rate * args.batch_size:,.0f} | {ratio} |")


if __name__ == "__main__":
    main()
