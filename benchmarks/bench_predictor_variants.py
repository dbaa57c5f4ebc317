"""Ways to run the predictor's blocks on CPU, timed side by side: what was tried to speed up the bf16 training step.

The harness is the predictor stack of the default training step (6 blocks of width 384 on 64 sequences of 95 tokens:
4 target blocks x 16 images, 60 context + 35 target tokens) in bf16 autocast, forward + backward, median of 7.

    python benchmarks/bench_predictor_variants.py                  # eager, chunked, compiled block / MLP
    python benchmarks/bench_predictor_variants.py --max-autotune   # + inductor max-autotune (slow to compile)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from ijepa_hf import IJepaPretrainingConfig
from ijepa_hf.modeling_ijepa_hf import IJepaBlock
from ijepa_hf.training import keep_freed_memory_for_reuse


def make_blocks(depth: int) -> nn.ModuleList:
    config = IJepaPretrainingConfig.from_preset(
        "vit_tiny_patch16_224", predictor={"hidden_size": 384, "num_hidden_layers": depth}
    ).predictor_config
    torch.manual_seed(0)
    return nn.ModuleList(IJepaBlock(config) for _ in range(depth))


def step_function(blocks: nn.ModuleList, inputs: torch.Tensor, chunks: int) -> Callable[[], None]:
    def step() -> None:
        for chunk in inputs.split(inputs.shape[0] // chunks):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                hidden = chunk
                for block in blocks:
                    hidden = block(hidden)[0]
            hidden.float().square().mean().backward()

    return step


def median_seconds(step: Callable[[], None], repeats: int = 7, warmup: int = 3) -> tuple[float, float]:
    """(median step seconds, seconds spent in the warm-up, which includes any compilation)."""
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    warmup_seconds = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2], warmup_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=95)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-autotune", action="store_true", help="also inductor max-autotune (C++ GEMM templates)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory_for_reuse()
    inputs = torch.randn(args.sequences, args.tokens, 384, requires_grad=True)

    variants: list[tuple[str, int, Callable[[nn.ModuleList], None] | None]] = [
        ("eager", 1, None),
        ("eager, 2 chunks of sequences", 2, None),
        ("eager, 4 chunks", 4, None),
        ("eager, 8 chunks", 8, None),
        ("torch.compile of each block", 1, lambda blocks: [setattr(b, "forward", torch.compile(b.forward, dynamic=False))
                                                           for b in blocks]),
        ("torch.compile of each MLP", 1, lambda blocks: [setattr(b, "mlp", torch.compile(b.mlp, dynamic=False))
                                                         for b in blocks]),
    ]
    if args.max_autotune:
        def max_autotune(blocks: nn.ModuleList) -> None:
            import torch._inductor.config as inductor_config

            inductor_config.max_autotune = True
            inductor_config.max_autotune_gemm_backends = "CPP,ATEN"
            for block in blocks:
                block.forward = torch.compile(block.forward, dynamic=False)

        variants.append(("torch.compile max-autotune of each block", 1, max_autotune))

    print(f"{args.depth} predictor blocks, [{args.sequences}, {args.tokens}, 384], bf16 autocast, forward + backward, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print()
    print("| variant | s (median of 7) | warm-up s (incl. compile) |")
    print("|---|---:|---:|")
    for name, chunks, prepare in variants:
        torch._dynamo.reset()
        blocks = make_blocks(args.depth)
        if prepare is not None:
            prepare(blocks)
        seconds, warmup = median_seconds(step_function(blocks, inputs, chunks))
        print(f"| {name} | {seconds:.3f} | {warmup:.1f} |", flush=True)


if __name__ == "__main__":
    main()
