"""One I-JEPA training step on CPU, beside the official step: throughput, achieved GFLOP/s against the matmul
ceiling measured in the same run, peak memory, and the split between target encoder, context encoder and predictor.

The step is the whole official step: target encoder on the full image (no grad) + LayerNorm + gather, context
encoder on the context patches, predictor (one sequence per target block), smooth-L1 loss, backward, AdamW with the
official parameter groups, EMA update. Default sizes: ViT-Ti/16 at 224 px, predictor width 384 depth 6, official
masks, batch 16, 2 threads.

The baseline is the official code itself when a checkout of facebookresearch/ijepa is named (``--official-root DIR``
or ``$IJEPA_OFFICIAL_ROOT``): its modules and ``MaskCollator`` are imported from there at run time
(``official_code.py``; none of that CC BY-NC code is in this repository), the masks of both codes are its draw, and
before any timing both steps must compute the same fp32 loss on the same weights and masks. Without a checkout, the
baseline is the official step rebuilt op for op (``official_step.py``, checked against the official code's golden
vectors), labelled as such. Every row is timed in fresh processes, the rounds interleaving all rows, so that the
ratios compare the codes on the same host whatever its speed at the time.

    python benchmarks/bench_train_step.py --official-root ~/src/ijepa      # against the official code
    python benchmarks/bench_train_step.py                                  # against the rebuilt official step
    python benchmarks/bench_train_step.py --profile                        # + where ours spends its time
    python benchmarks/bench_train_step.py --scaling                        # + step time vs batch and image size
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import torch
from safetensors.torch import load_file, save_file
from torch.utils.flop_counter import FlopCounterMode

from ijepa_hf import IJepaMaskCollator, IJepaPretrainingConfig, IJepaForPreTraining
from ijepa_hf.training import build_optimizer, keep_freed_memory_for_reuse
from official_code import (  # benchmarks/official_code.py, beside this script: the user's checkout, at run time
    ENVIRONMENT_VARIABLE,
    OfficialCodeStep,
    _revision,
    import_official,
    official_masks,
    resolve_root,
)
from official_step import OfficialStep  # benchmarks/official_step.py, beside this script
from machine import cpu_description  # benchmarks/machine.py, beside this script
from peak_memory import peak_rss_bytes  # benchmarks/peak_memory.py, beside this script

ALLOCATORS = ("tuned", "default")
PRECISIONS = ("fp32", "bf16")
ATTENTIONS = ("sdpa", "eager")
# Both codes' fp32 losses on the same weights and masks must agree this closely, or the timings compare different work.
LOSS_TOLERANCE = 1e-5
# The profile's summary: substrings of aten operator names, first match wins.
OPERATOR_CATEGORIES = {
    "matmul": ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "flash_attention", "convolution",
               "aten::linear"),
    "copies and dtype casts": ("copy_", "aten::to", "_to_copy", "contiguous", "aten::clone", "aten::cat", "aten::stack",
                               "index", "gather", "scatter", "repeat"),
    "optimizer": ("adam", "Optimizer", "_foreach", "lerp"),
    "allocation": ("aten::empty", "aten::resize_"),
    "layer norm": ("layer_norm",),
    "softmax": ("softmax",),
    "GELU": ("gelu",),
    "reductions": ("aten::sum", "aten::mean", "aten::norm", "smooth_l1"),
    "elementwise": ("aten::add", "aten::mul", "aten::div", "aten::sub", "aten::fill_", "aten::zero_",
                    "aten::where", "aten::masked"),
}
PROFILE_ROWS = 15


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


def make_setup(args: argparse.Namespace, batch_size: int, image_size: int, batch: dict | None = None,
               attention: str = "sdpa") -> Setup:
    """Model (``attn_implementation=attention``), AdamW (official groups, fused) and ``batch`` (default: the typical
    batch of ``--mask-mode``)."""
    torch.manual_seed(0)
    config = make_config(args, image_size)
    config._attn_implementation = attention
    model = IJepaForPreTraining(config).train()
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    optimizer = build_optimizer(model)
    if batch is None:
        batch = typical_batch(config, args.mask_mode, batch_size, image_size)
    return Setup(model, optimizer, batch)


def typical_batch(config: IJepaPretrainingConfig, mask_mode: str, batch_size: int, image_size: int) -> dict:
    """A mask batch whose sizes are the sampler's averages, so that one batch stands for a typical step.

    Step time follows the context length and the target-block length, which vary from batch to batch (the official
    sampler's batch-min truncation most of all); the official step was measured at the averages of its sampler
    (B=16: ~60 context and ~33 target patches per block at 224/16). The first of 64 seeds whose draw is closest to
    the averages of those 64 draws is used.
    """
    images = [{"pixel_values": torch.randn(3, image_size, image_size)} for _ in range(batch_size)]
    min_keep = feasible_min_keep(config, mask_mode)
    draws = [IJepaMaskCollator.from_config(config, mask_mode=mask_mode, min_keep=min_keep, seed=seed)(images)
             for seed in range(64)]
    lengths = torch.tensor([[d["context_mask"].shape[1], d["target_masks"].shape[-1]] for d in draws], dtype=torch.float)
    distance = ((lengths - lengths.mean(0)) / lengths.mean(0)).abs().sum(1)
    return draws[int(distance.argmin())]


def feasible_min_keep(config: IJepaPretrainingConfig, mask_mode: str = "official") -> int:
    """The official ``min_keep`` of 10 patches, or 3 where 10 is infeasible (small grids, e.g. 8x8, whose smallest
    target block is 3x3): ijepa_hf's sampler refuses an infeasible setting, the official one would retry forever."""
    try:
        IJepaMaskCollator.from_config(config, mask_mode=mask_mode, min_keep=10)
        return 10
    except ValueError:
        return 3


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


def measure_in_child(args: argparse.Namespace, precision: str, allocator: str, code: str = "ijepa_hf",
                     attention: str = "sdpa", with_split: bool = False) -> dict:
    """Seconds per step and peak RSS (``code="official"``: the official step's, with its FLOPs; ``with_split``: also
    ours split by model part) in a fresh process: each configuration starts from the same empty heap, and the peak
    belongs to that configuration alone."""
    command = [sys.executable, __file__, "--child", precision, "--allocator", allocator, "--code", code,
               "--attn-implementation", attention, "--batch-file", str(args.batch_file), *_model_flags(args)]
    if args.official_root is not None:
        command += ["--official-root", str(args.official_root)]
    if with_split:
        command.append("--with-split")
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def _model_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--size", args.size, "--patch-size", str(args.patch_size), "--batch-size", str(args.batch_size),
             "--image-size", str(args.image_size), "--predictor-width", str(args.predictor_width),
             "--predictor-depth", str(args.predictor_depth), "--threads", str(args.threads),
             "--mask-mode", args.mask_mode, "--steps", str(args.steps)]
    return flags + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])


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


# ---- the mask batch both codes step on ---------------------------------------------------------------------------

def write_batch(args: argparse.Namespace, path: Path) -> str:
    """Saves the one batch every child steps on (``pixel_values [B, 3, H, W]``, ``context_mask [B, K]``,
    ``target_masks [B, M, T]``) and says where its masks come from.

    With an official checkout the masks are the official ``MaskCollator``'s draw (of 64 seeds) whose sizes are
    closest to the average of those draws, so that one batch stands for a typical step; without one, the same rule
    over ijepa_hf's sampler in ``--mask-mode``.
    """
    config = make_config(args, args.image_size)
    if args.official_root is None:
        batch = typical_batch(config, args.mask_mode, args.batch_size, args.image_size)
        source = f"ijepa_hf's {args.mask_mode}-mode sampler"
    else:
        if args.mask_mode != "official":
            raise SystemExit("--mask-mode fixed has no counterpart in the official code; use --mask-mode official "
                             "with --official-root.")
        official = import_official(args.official_root)
        draws = []
        for seed in range(64):
            try:
                draws.append(official_masks(official, args.batch_size, args.image_size, args.patch_size, seed,
                                            min_keep=feasible_min_keep(config)))
            except Exception as error:  # the official sampler retries forever or fails on infeasible small grids
                raise SystemExit(f"The official MaskCollator cannot sample masks at {args.image_size} px / patch "
                                 f"{args.patch_size}: {error}") from error
        lengths = torch.tensor([[c.shape[1], t[0].shape[1]] for c, t in draws], dtype=torch.float)
        distance = ((lengths - lengths.mean(0)) / lengths.mean(0)).abs().sum(1)
        context, targets = draws[int(distance.argmin())]
        torch.manual_seed(0)
        batch = {"pixel_values": torch.randn(args.batch_size, 3, args.image_size, args.image_size),
                 "context_mask": context, "target_masks": torch.stack(targets, dim=1)}
        source = f"the official MaskCollator ({official.root}, {official.revision})"
    save_file({name: batch[name].contiguous() for name in ("pixel_values", "context_mask", "target_masks")}, str(path))
    return source


def read_batch(path: str) -> dict[str, torch.Tensor]:
    return load_file(path)


# ---- the children ------------------------------------------------------------------------------------------------

def official_runner(args: argparse.Namespace, batch: dict[str, torch.Tensor]) -> tuple[Callable[[str], float],
                                                                                        Callable[[], float]]:
    """``(step(precision), flops())`` of the official step: the official code itself with ``--official-root``,
    else the rebuilt one (``official_step.py``)."""
    pixels, context = batch["pixel_values"], batch["context_mask"]
    targets = list(batch["target_masks"].unbind(1))
    torch.manual_seed(0)
    if args.official_root is not None:
        code = OfficialCodeStep(import_official(args.official_root), args.size, args.patch_size, args.image_size,
                                args.predictor_width, args.predictor_depth)
        run = lambda precision: code.step(pixels, [context], targets, autocast=precision == "bf16")  # noqa: E731
        loss = lambda: code.loss(pixels, [context], targets)  # noqa: E731
        optimizer = code.optimizer
    else:
        config = make_config(args, args.image_size)
        encoder, predictor = config.encoder_config, config.predictor_config
        rebuilt = OfficialStep.build(args.image_size, encoder.patch_size, encoder.hidden_size,
                                     encoder.num_hidden_layers, encoder.num_attention_heads, predictor.hidden_size,
                                     predictor.num_hidden_layers)
        run = lambda precision: rebuilt.step(pixels, context, targets, autocast=precision == "bf16")  # noqa: E731
        loss = lambda: rebuilt.loss(pixels, context, targets)  # noqa: E731
        optimizer = rebuilt.optimizer

    def flops() -> float:
        with FlopCounterMode(display=False) as counter:
            loss().backward()
        optimizer.zero_grad()
        return counter.get_total_flops()

    return run, flops


def check_same_loss(args: argparse.Namespace) -> dict:
    """Both codes on the same weights (the official ``init_model``'s, converted) and the same batch, fp32: the loss
    before and after one AdamW + EMA step (constant lr 1e-3, weight decay 0.01, momentum 0.996 in both)."""
    from ijepa_hf.conversion import convert_official_checkpoint

    batch = read_batch(args.batch_file)
    pixels, context = batch["pixel_values"], batch["context_mask"]
    targets = list(batch["target_masks"].unbind(1))
    torch.manual_seed(0)
    official = OfficialCodeStep(import_official(args.official_root), args.size, args.patch_size, args.image_size,
                                args.predictor_width, args.predictor_depth)
    for group in official.optimizer.param_groups:  # the schedulers are not stepped here: fixed, equal values
        group["lr"], group["weight_decay"] = 1e-3, 0.0 if group.get("WD_exclude") else 0.01
    model = convert_official_checkpoint(official.state_dicts()).train()
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.01)
    losses: dict[str, list[float]] = {"official": [], "ijepa_hf": []}
    for _ in range(2):
        loss = official.loss(pixels, [context], targets)
        loss.backward()
        official.optimizer.step()
        official.optimizer.zero_grad()
        with torch.no_grad():
            for q, k in zip(official.encoder.parameters(), official.target_encoder.parameters()):
                k.mul_(0.996).add_(0.004 * q)
        losses["official"].append(loss.item())
        ours = model(**batch).loss
        ours.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_target_encoder(0.996)
        losses["ijepa_hf"].append(ours.item())
    return losses


def child(args: argparse.Namespace) -> None:
    if args.allocator == "tuned":
        keep_freed_memory_for_reuse()
    batch = read_batch(args.batch_file)
    if args.code == "official":
        run, flops = official_runner(args, batch)
        seconds = median_seconds(lambda: run(args.child), args.steps, warmup=2)
        print(json.dumps({"seconds": seconds, "peak_rss_gb": peak_rss_bytes() / 2**30, "flops": flops()}))
        return
    setup = make_setup(args, args.batch_size, args.image_size, batch=batch, attention=args.attn_implementation)
    seconds = seconds_per_step(setup, args.child, args.steps)
    result = {"seconds": seconds, "peak_rss_gb": peak_rss_bytes() / 2**30}
    if args.with_split:
        result["split"] = split(setup, args.child)
    print(json.dumps(result))


# ---- the machine -------------------------------------------------------------------------------------------------

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
    parser.add_argument("--rounds", type=_positive, default=5,
                        help="fresh processes per row, interleaved with the official step's")
    parser.add_argument("--official-root", default=None,
                        help="a checkout of facebookresearch/ijepa to time (imported at run time, nothing copied); "
                             f"default ${ENVIRONMENT_VARIABLE}; without either, the rebuilt official step "
                             "(official_step.py)")
    parser.add_argument("--precisions", type=_subset_of(PRECISIONS), default=list(PRECISIONS))
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--allocators", type=_subset_of(ALLOCATORS), default=["tuned"],
                        help="'tuned': glibc malloc keeps freed memory, as ijepa_hf's training loops set it on CPU "
                             "(ijepa_hf.training.keep_freed_memory_for_reuse); 'default': glibc's defaults")
    parser.add_argument("--attn-implementations", type=_subset_of(ATTENTIONS), default=list(ATTENTIONS),
                        help="ijepa_hf rows: the model's attn_implementation ('sdpa': torch's fused kernel, 'eager': "
                             "two matmuls and a softmax)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile ours in each precision (with the faster attention of the table): time per "
                             "kind of operator against the matmul ceiling, and the top operators")
    parser.add_argument("--scaling", action="store_true", help="also time batch 8-64 and image 96-224 (bf16)")
    parser.add_argument("--scaling-only", action="store_true", help="only the scaling table")
    parser.add_argument("--child", choices=PRECISIONS, help=argparse.SUPPRESS)
    parser.add_argument("--check-same-loss", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--with-split", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch-file", help=argparse.SUPPRESS)
    parser.add_argument("--allocator", choices=ALLOCATORS, default="tuned", help=argparse.SUPPRESS)
    parser.add_argument("--attn-implementation", choices=ATTENTIONS, default="sdpa", help=argparse.SUPPRESS)
    parser.add_argument("--code", choices=("ijepa_hf", "official"), default="ijepa_hf", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        args.official_root = resolve_root(args.official_root)
    except FileNotFoundError as error:
        parser.error(str(error))
    if args.check_same_loss:
        print(json.dumps(check_same_loss(args)))
        return
    if args.child:
        child(args)
        return

    if args.scaling_only:
        scaling_table(args)
        return
    with tempfile.TemporaryDirectory() as folder:
        args.batch_file = Path(folder) / "batch.safetensors"
        source = write_batch(args, args.batch_file)
        fastest = side_by_side(args, source)
        if args.profile:
            for precision in args.precisions:
                profile_table(args, precision, fastest[precision])
    if args.scaling:
        scaling_table(args)


def side_by_side(args: argparse.Namespace, mask_source: str) -> dict[str, str]:
    """Prints the side-by-side table; returns the fastest of our attention implementations per precision."""
    batch = read_batch(args.batch_file)
    setup = make_setup(args, args.batch_size, args.image_size, batch=batch)
    flops = step_flops(setup)
    baseline = ("official code" if args.official_root is not None else "official (rebuilt)")
    print(f"# I-JEPA training step: {args.size}/{args.patch_size} at {args.image_size} px, batch {args.batch_size}, "
          f"predictor {args.predictor_width}x{args.predictor_depth}, masks from {mask_source} "
          f"(context {batch['context_mask'].shape[1]}, {batch['target_masks'].shape[1]} targets of "
          f"{batch['target_masks'].shape[-1]} patches)")
    print(f"CPU: {cpu_description()}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"{flops / 1e9:.1f} matmul GFLOP per step for ijepa_hf (forward + backward)")
    if args.official_root is not None:
        print(f"baseline: facebookresearch/ijepa at {args.official_root} ({_revision(args.official_root)}), its "
              "modules and MaskCollator imported at run time; its step as benchmarks/official_code.py describes")
        losses = json.loads(subprocess.run(
            [sys.executable, __file__, "--check-same-loss", "--batch-file", str(args.batch_file), "--official-root",
             str(args.official_root), *_model_flags(args)], check=True, capture_output=True, text=True
        ).stdout.strip().splitlines()[-1])
        gaps = [abs(a - b) for a, b in zip(losses["official"], losses["ijepa_hf"])]
        print("same weights and masks, fp32: loss before / after one AdamW + EMA step: official "
              + " / ".join(f"{value:.6f}" for value in losses["official"]) + ", ijepa_hf "
              + " / ".join(f"{value:.6f}" for value in losses["ijepa_hf"]) + f" (largest gap {max(gaps):.1e})")
        if max(gaps) > LOSS_TOLERANCE:
            raise SystemExit(f"The two steps compute different losses (gap {max(gaps):.1e} > {LOSS_TOLERANCE}): "
                             "they would not be timing the same work, so no ratio is printed.")
    else:
        print("baseline: no official checkout given (--official-root or $IJEPA_OFFICIAL_ROOT), so the official step "
              "rebuilt op for op (benchmarks/official_step.py), checked against the official code's golden vectors")
    print(f"each row: the median over {args.rounds} rounds of fresh processes (median of {args.steps} steps each); "
          "each round runs every row back to back, so that all see the same host")
    print()
    print(f"| code | precision | allocator | attention | s/step | images/s | GFLOP/s | matmul ceiling GFLOP/s | "
          f"of ceiling | peak RSS GB | speed-up vs {baseline}: median (range over rounds) | peak RSS vs {baseline} |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|")
    splits = {}
    fastest: dict[str, str] = {}
    best_seconds: dict[str, float] = {}
    for precision in args.precisions:
        ceilings = [matmul_ceiling(precision)]
        rows = {(baseline, "default", "–"): [],
                **{("ijepa_hf", allocator, attention): [] for allocator in args.allocators
                   for attention in args.attn_implementations}}
        for round_index in range(args.rounds):
            for code, allocator, attention in rows:
                rows[code, allocator, attention].append(measure_in_child(
                    args, precision, allocator, code="ijepa_hf" if code == "ijepa_hf" else "official",
                    attention=attention if code == "ijepa_hf" else "sdpa",
                    with_split=code == "ijepa_hf" and round_index == 0))
        ceilings.append(matmul_ceiling(precision))
        ceiling = median(ceilings)
        official_results = rows[baseline, "default", "–"]
        for (code, allocator, attention), results in rows.items():
            seconds = median([result["seconds"] for result in results])
            ratios = [official["seconds"] / result["seconds"] for official, result in zip(official_results, results)]
            achieved = (results[0]["flops"] if "flops" in results[0] else flops) / seconds / 1e9
            rss = max(result["peak_rss_gb"] for result in results)
            official_rss = max(result["peak_rss_gb"] for result in official_results)
            print(f"| {code} | {precision} | {allocator} | {attention} | {seconds:.3f} | "
                  f"{args.batch_size / seconds:.1f} | {achieved:.0f} | {ceiling:.0f} "
                  f"({min(ceilings):.0f}-{max(ceilings):.0f}) | {achieved / ceiling:.0%} | {rss:.2f} | "
                  f"{median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | {rss / official_rss:.2f} |")
            if code == "ijepa_hf":
                splits[precision, allocator, attention] = results[0]["split"]
                if seconds < best_seconds.get(precision, float("inf")):
                    best_seconds[precision], fastest[precision] = seconds, attention
    print()
    print(f"The {baseline} step does {official_results[0]['flops'] / 1e9:.1f} matmul GFLOP per step (its predictor's "
          "last block also computes the context rows). The ceiling: a plain square matrix product at this thread "
          "count, measured before and after the rounds (median, range). Peak RSS: VmHWM, the largest of the rounds.")
    print()
    print("| precision | allocator | attention | target encoder (fwd) s | context encoder (fwd+bwd) s | "
          "predictor + loss (fwd+bwd) s |")
    print("|---|---|---|---:|---:|---:|")
    for (precision, allocator, attention), parts in splits.items():
        print(f"| {precision} | {allocator} | {attention} | " + " | ".join(f"{parts[name]:.3f}" for name in parts)
              + " |")
    return fastest


def operator_category(name: str) -> str:
    """The kind of work an aten operator does, for the profile's summary."""
    for category, members in OPERATOR_CATEGORIES.items():
        if any(member in name for member in members):
            return category
    return "other"


def profile_table(args: argparse.Namespace, precision: str, attention: str) -> None:
    """Where ours spends a step (with ``attention``, the faster implementation in the table): time per kind of
    operator (self CPU time of torch.profiler) against what the matmul FLOPs would take at the measured ceiling, then
    the top operators."""
    from torch.profiler import ProfilerActivity, profile

    keep_freed_memory_for_reuse()
    setup = make_setup(args, args.batch_size, args.image_size, batch=read_batch(args.batch_file), attention=attention)
    flops = step_flops(setup, precision)
    for _ in range(3):
        train_step(setup, precision)
    steps = 3
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(steps):
            train_step(setup, precision)
    wall = (time.perf_counter() - start) / steps
    ceiling = matmul_ceiling(precision)
    events = [event for event in profiler.key_averages() if event.self_cpu_time_total > 0]
    total = sum(event.self_cpu_time_total for event in events) / steps / 1e6
    by_category: dict[str, float] = {}
    for event in events:
        category = operator_category(event.key)
        by_category[category] = by_category.get(category, 0.0) + event.self_cpu_time_total / steps / 1e6
    print()
    print(f"## Profile: ijepa_hf, {precision}, attention {attention}, {steps} profiled steps of {wall:.3f} s (under "
          f"the profiler); {flops / 1e9:.1f} matmul GFLOP would take {flops / ceiling / 1e9:.3f} s at the ceiling of "
          f"{ceiling:.0f} GFLOP/s")
    print()
    print("| kind of operator | s per step | share of the profiled time |")
    print("|---|---:|---:|")
    for category, seconds in sorted(by_category.items(), key=lambda item: item[1], reverse=True):
        print(f"| {category} | {seconds:.3f} | {seconds / total:.0%} |")
    print()
    print("| operator | kind | self CPU ms per step | share | calls per step |")
    print("|---|---|---:|---:|---:|")
    for event in sorted(events, key=lambda event: event.self_cpu_time_total, reverse=True)[:PROFILE_ROWS]:
        print(f"| {event.key} | {operator_category(event.key)} | {event.self_cpu_time_total / steps / 1e3:.1f} | "
              f"{event.self_cpu_time_total / steps / 1e6 / total:.1%} | {event.count // steps} |")


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
