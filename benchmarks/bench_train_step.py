"""One I-JEPA training step on CPU: throughput, achieved GFLOP/s against the measured matmul ceiling, peak memory,
and the split between target encoder, context encoder and predictor.

The step is the whole official step: target encoder on the full image (no grad) + LayerNorm + gather, context
encoder on the context patches, predictor (one sequence per target block), smooth-L1 loss, backward, AdamW with the
official parameter groups, EMA update. Default sizes are the official step's measured in the reference: ViT-Ti/16
at 224 px, predictor width 384 depth 6, official masks, batch 16, 2 threads.

Beside it, in the same run and on the same mask batch, the official step rebuilt op for op (``official_step.py``,
checked against the official code's golden vectors): the speed-up against it does not move with the host's speed,
which the issue's fixed official figures (also printed) cannot follow.

    python benchmarks/bench_train_step.py                      # fp32 and bf16, tuned and default allocator
    python benchmarks/bench_train_step.py --scaling            # + step time vs batch size and image size
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from statistics import median

import torch
from torch.utils.flop_counter import FlopCounterMode

from ijepa_hf import IJepaMaskCollator, IJepaPretrainingConfig, IJepaForPreTraining
from ijepa_hf.training import build_optimizer, keep_freed_memory_for_reuse
from official_step import OfficialStep  # benchmarks/official_step.py, beside this script
from peak_memory import peak_rss_bytes  # benchmarks/peak_memory.py, beside this script

# The official code on this machine (the figures, measured once): seconds per step and peak RSS at the default
# sizes.
OFFICIAL = {"fp32": dict(seconds=2.58, rss_gb=2.1), "bf16": dict(seconds=0.81, rss_gb=1.8)}
ALLOCATORS = ("tuned", "default")
PRECISIONS = ("fp32", "bf16")


@dataclass
class Setup:
    model: IJepaForPreTraining
    optimizer: torch.optim.Optimizer
    batch: dict[str, torch.Tensor]


def make_config(args: argparse.Namespace, image_size: int) -> IJepaPretrainingConfig:
    return IJepaPretrainingConfig.from_preset(
        f"{args.size}_patch{args.patch_size}_224",
        encoder={"image_size": image_size},
        predictor={"image_size": image_size, "hidden_size": args.predictor_width, "num_hidden_layers": args.predictor_depth},
    )


def make_setup(args: argparse.Namespace, batch_size: int, image_size: int) -> Setup:
    torch.manual_seed(0)
    config = make_config(args, image_size)
    model = IJepaForPreTraining(config).train()
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    optimizer = build_optimizer({"encoder": model.context_encoder, "predictor": model.predictor})
    return Setup(model, optimizer, typical_batch(config, args.mask_mode, batch_size, image_size))


def typical_batch(config: IJepaPretrainingConfig, mask_mode: str, batch_size: int, image_size: int) -> dict:
    """A mask batch whose sizes are the sampler's averages, so that one batch stands for a typical step.

    Step time follows the context length and the target-block length, which vary from batch to batch (the official
    sampler's batch-min truncation most of all); the official step was measured at the averages of its sampler
    (B=16: ~60 context and ~33 target patches per block at 224/16). The first of 64 seeds whose draw is closest to
    the averages of those 64 draws is used.
    """
    images = [{"pixel_values": torch.randn(3, image_size, image_size)} for _ in range(batch_size)]
    try:
        IJepaMaskCollator.from_config(config, mode=mask_mode, min_keep=10)
        min_keep = 10
    except ValueError:  # the official min_keep is infeasible on small grids (e.g. 8x8: smallest target block 3x3)
        min_keep = 3
    draws = [IJepaMaskCollator.from_config(config, mode=mask_mode, min_keep=min_keep, seed=seed)(images)
             for seed in range(64)]
    lengths = torch.tensor([[d["context_mask"].shape[1], d["target_masks"].shape[-1]] for d in draws], dtype=torch.float)
    distance = ((lengths - lengths.mean(0)) / lengths.mean(0)).abs().sum(1)
    return draws[int(distance.argmin())]


def synchronize(device: torch.device) -> None:
    """Waits for queued GPU work, so that wall-clock timers measure it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(setup: Setup, precision: str) -> torch.Tensor:
    """One full step on the device that holds the batch (bench_gpu.py runs the same step on a GPU)."""
    with torch.autocast(setup.batch["pixel_values"].device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = setup.model(**setup.batch).loss
    loss.backward()
    setup.optimizer.step()
    setup.optimizer.zero_grad(set_to_none=True)
    setup.model.update_target_encoder(0.996)
    return loss


def seconds_per_step(setup: Setup, precision: str, steps: int, warmup: int = 2) -> float:
    return median_seconds(lambda: train_step(setup, precision), steps, warmup, setup.batch["pixel_values"].device)


def median_seconds(step: Callable[[], object], steps: int, warmup: int, device: torch.device | str = "cpu") -> float:
    device = torch.device(device)
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return median(times)  # robust to a noisy neighbour


@dataclass
class OfficialSetup:
    """The rebuilt official step with the same mask batch in the official layout (a list of [B, K] per mask)."""

    step: OfficialStep
    pixels: torch.Tensor
    context_mask: torch.Tensor
    target_masks: list[torch.Tensor]

    def run(self, precision: str) -> float:
        return self.step.step(self.pixels, self.context_mask, self.target_masks, autocast=precision == "bf16")

    def flops(self) -> float:
        with FlopCounterMode(display=False) as counter:
            self.step.loss(self.pixels, self.context_mask, self.target_masks).backward()
        self.step.optimizer.zero_grad()
        return counter.get_total_flops()


def make_official_setup(args: argparse.Namespace, batch_size: int, image_size: int) -> OfficialSetup:
    config = make_config(args, image_size)
    batch = typical_batch(config, args.mask_mode, batch_size, image_size)
    torch.manual_seed(0)
    encoder, predictor = config.encoder_config, config.predictor_config
    step = OfficialStep.build(image_size, encoder.patch_size, encoder.hidden_size, encoder.num_hidden_layers,
                              encoder.num_attention_heads, predictor.hidden_size, predictor.num_hidden_layers)
    return OfficialSetup(step, batch["pixel_values"], batch["context_mask"], list(batch["target_masks"].unbind(1)))


def step_flops(setup: Setup, precision: str = "fp32") -> float:
    """Matmul FLOPs of one forward + backward (multiply-add = 2), as counted by torch: the same count in either
    precision; bf16 needs less memory for the largest batches on a GPU."""
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(setup.batch["pixel_values"].device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = setup.model(**setup.batch).loss
        loss.backward()
    setup.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def split(setup: Setup, precision: str, repeats: int = 3) -> dict[str, float]:
    """Seconds spent in target encoder (forward), context encoder and predictor (forward + backward)."""
    model, batch = setup.model, setup.batch
    device = batch["pixel_values"].device
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")  # noqa: E731
    results: dict[str, list[float]] = {"target encoder": [], "context encoder": [], "predictor + loss": []}
    from ijepa_hf.modeling_ijepa_hf import _stack_target_masks

    def timed(work):
        synchronize(device)
        start = time.perf_counter()
        value = work()
        synchronize(device)
        return value, time.perf_counter() - start

    def predictor_step():
        with autocast():
            predictions = model.predictor(context_leaf, batch["context_mask"], target_masks).predictions
            loss = model.loss_fn(predictions, targets)
        loss.backward()

    target_masks = _stack_target_masks(batch["target_masks"])
    for _ in range(repeats):
        with autocast():
            (targets, _), seconds = timed(lambda: model.compute_targets(batch["pixel_values"], target_masks))
            results["target encoder"].append(seconds)
            context, forward_context = timed(lambda: model.context_encoder(
                batch["pixel_values"], context_mask=batch["context_mask"]).last_hidden_state)
        context_leaf = context.detach().requires_grad_(True)
        results["predictor + loss"].append(timed(predictor_step)[1])
        results["context encoder"].append(forward_context + timed(lambda: context.backward(context_leaf.grad))[1])
        setup.optimizer.zero_grad(set_to_none=True)
    return {name: median(values) for name, values in results.items()}


def matmul_ceiling(precision: str, size: int = 1536, repeats: int = 20, device: torch.device | str = "cpu") -> float:
    """GFLOP/s of a plain square matrix product (at this thread count on CPU): the practical ceiling."""
    device = torch.device(device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def measure_in_child(args: argparse.Namespace, precision: str, allocator: str, code: str = "ijepa_hf") -> dict:
    """Seconds per step, peak RSS and the split (``code="official"``: the rebuilt official step's seconds, peak RSS
    and FLOPs), in a fresh process: each configuration starts from the same empty heap, and the peak belongs to that
    configuration alone."""
    command = [sys.executable, __file__, "--child", precision, "--allocator", allocator, "--code", code, "--size", args.size,
               "--patch-size", str(args.patch_size), "--batch-size", str(args.batch_size),
               "--image-size", str(args.image_size), "--predictor-width", str(args.predictor_width),
               "--predictor-depth", str(args.predictor_depth), "--threads", str(args.threads),
               "--mask-mode", args.mask_mode, "--steps", str(args.steps)]
    if args.gradient_checkpointing:
        command.append("--gradient-checkpointing")
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(text)


def _subset_of(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    """An argparse type: a non-empty comma-separated subset of ``choices``."""
    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        if not names or set(names) - set(choices):
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(choices)}, got {text!r}")
        return names

    return parse


def child(args: argparse.Namespace) -> None:
    if args.allocator == "tuned":
        keep_freed_memory_for_reuse()
    if args.code == "official":
        official = make_official_setup(args, args.batch_size, args.image_size)
        seconds = median_seconds(lambda: official.run(args.child), args.steps, warmup=2)
        print(json.dumps({"seconds": seconds, "peak_rss_gb": peak_rss_bytes() / 2**30, "flops": official.flops()}))
        return
    setup = make_setup(args, args.batch_size, args.image_size)
    seconds = seconds_per_step(setup, args.child, args.steps)
    parts = split(setup, args.child)
    print(json.dumps({"seconds": seconds, "split": parts, "peak_rss_gb": peak_rss_bytes() / 2**30}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="vit_tiny")
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--predictor-width", type=int, default=384)
    parser.add_argument("--predictor-depth", type=int, default=6)
    parser.add_argument("--mask-mode", default="official", choices=("official", "fixed"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=_positive, default=3,
                        help="fresh processes per row, interleaved with the rebuilt official step's")
    parser.add_argument("--precisions", type=_subset_of(PRECISIONS), default=list(PRECISIONS))
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--allocators", type=_subset_of(ALLOCATORS), default=list(ALLOCATORS),
                        help="'tuned': glibc malloc keeps freed memory, as ijepa_hf's training loops set it on CPU "
                             "(ijepa_hf.training.keep_freed_memory_for_reuse); 'default': glibc's defaults")
    parser.add_argument("--scaling", action="store_true", help="also time batch 8-64 and image 96-224 (bf16)")
    parser.add_argument("--scaling-only", action="store_true", help="only the scaling table")
    parser.add_argument("--child", choices=("fp32", "bf16"), help=argparse.SUPPRESS)
    parser.add_argument("--allocator", choices=ALLOCATORS, default="tuned", help=argparse.SUPPRESS)
    parser.add_argument("--code", choices=("ijepa_hf", "official"), default="ijepa_hf", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        child(args)
        return

    if args.scaling_only:
        scaling_table(args)
        return
    setup = make_setup(args, args.batch_size, args.image_size)
    flops = step_flops(setup)
    context_len = setup.batch["context_mask"].shape[1]
    target_len = setup.batch["target_masks"].shape[-1]
    print(f"# I-JEPA training step: {args.size}/{args.patch_size} at {args.image_size} px, batch {args.batch_size}, "
          f"predictor {args.predictor_width}x{args.predictor_depth}, {args.mask_mode} masks "
          f"(context {context_len}, 4 targets of {target_len} patches)")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}; threads "
          f"{torch.get_num_threads()}; {flops / 1e9:.1f} matmul GFLOP per step (forward + backward); each row is the "
          f"median over {args.rounds} rounds of fresh processes (median of {args.steps} steps each), the rounds "
          "interleaving the rebuilt official step and ours so that both see the same host")
    print()
    print("| code | precision | allocator | s/step | images/s | GFLOP/s | matmul ceiling GFLOP/s | of ceiling | "
          "peak RSS GB | speed-up vs official rebuilt, same rounds: median (range) | official, issue's figure: "
          "s/step (RSS GB) | speed-up vs the issue's figure |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|")
    splits = {}
    at_official_sizes = all(getattr(args, name) == parser.get_default(name) for name in (
        "size", "patch_size", "image_size", "batch_size", "predictor_width", "predictor_depth", "mask_mode", "threads"))
    for precision in args.precisions:
        ceiling = matmul_ceiling(precision)
        published = OFFICIAL[precision] if at_official_sizes else None
        rows = {("official (rebuilt)", "default"): [], **{("ijepa_hf", allocator): [] for allocator in args.allocators}}
        for _ in range(args.rounds):
            for code, allocator in rows:
                rows[code, allocator].append(measure_in_child(args, precision, allocator, code=code.split()[0]))
        official_seconds = [result["seconds"] for result in rows["official (rebuilt)", "default"]]
        for (code, allocator), results in rows.items():
            seconds = median([result["seconds"] for result in results])
            ratios = [official / result["seconds"] for official, result in zip(official_seconds, results)]
            achieved = (results[0]["flops"] if "flops" in results[0] else flops) / seconds / 1e9
            print(f"| {code} | {precision} | {allocator} | {seconds:.3f} | {args.batch_size / seconds:.1f} | "
                  f"{achieved:.0f} | {ceiling:.0f} | {achieved / ceiling:.0%} | "
                  f"{max(result['peak_rss_gb'] for result in results):.2f} | "
                  f"{median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | "
                  + (f"{published['seconds']} ({published['rss_gb']}) | {published['seconds'] / seconds:.2f}x |"
                     if published else "– | – |"))
            if code == "ijepa_hf":
                splits[precision, allocator] = {name: median([result["split"][name] for result in results])
                                                for name in results[0]["split"]}
    print()
    print(f"The rebuilt official step does {rows['official (rebuilt)', 'default'][0]['flops'] / 1e9:.1f} matmul "
          "GFLOP per step (its predictor's last block keeps the context rows). Peak RSS: the largest of the rounds. "
          "The issue's figures were measured once with the official code on this machine, at the default sizes "
          "only; the host's speed has drifted between sessions since.")
    print()
    print("| precision | allocator | target encoder (fwd) s | context encoder (fwd+bwd) s | predictor + loss (fwd+bwd) s |")
    print("|---|---|---:|---:|---:|")
    for (precision, allocator), parts in splits.items():
        print(f"| {precision} | {allocator} | " + " | ".join(f"{parts[name]:.3f}" for name in parts) + " |")

    if args.scaling:
        scaling_table(args)


def scaling_table(args: argparse.Namespace) -> None:
    """bf16 step time against batch size (at 224 px) and image size (at batch 16), tuned allocator."""
    keep_freed_memory_for_reuse()
    print()
    print("## Step time (bf16, tuned allocator) vs batch size and image size")
    print()
    print("| batch | image | context / target patches | s/step | images/s |")
    print("|---:|---:|---|---:|---:|")
    for batch_size, image_size in [(8, 224), (16, 224), (32, 224), (64, 224), (16, 96), (16, 128), (16, 160),
                                   (16, 192)]:
        scaled = make_setup(args, batch_size, image_size)
        seconds = seconds_per_step(scaled, "bf16", max(2, args.steps // 2), warmup=1)
        lengths = f"{scaled.batch['context_mask'].shape[1]} / 4x{scaled.batch['target_masks'].shape[-1]}"
        print(f"| {batch_size} | {image_size} | {lengths} | {seconds:.3f} | {batch_size / seconds:.1f} |")


if __name__ == "__main__":
    main()
