"""I-JEPA training on one GPU: step throughput and MFU with bf16 autocast at the largest batch that fits, and how
closely a bf16-autocast step agrees with an fp32 one.

Prepared to run as one short job on a lent GPU machine (it also runs on CPU at toy sizes, which the tests use):

    python benchmarks/bench_gpu.py                                  # ViT-B/16 and ViT-H/14, writes a JSON + table
    python benchmarks/bench_gpu.py --models vit_base_patch16_224 --max-batch 64 --steps 5
    python benchmarks/bench_gpu.py --models '' --agreement-models '' --profile-model '' \
        --compile-models vit_base_patch16_224 --compile-batch 1024  # torch.compile against eager (minutes)

Results of a run on an H200 are in benchmarks/README.md (GPU section) and benchmarks/results/gpu_h200*.json.

Per model (official presets: predictor width 384, depth 12; official masks; AdamW with the official groups, fused;
EMA update): the batch is doubled from ``--min-batch`` until a step runs out of memory or reaches ``--max-batch``;
the largest batch that ran is timed (CUDA-synchronised, median step). MFU is the step's matmul FLOPs (counted by
``torch.utils.flop_counter`` on one forward + backward) over the time, against the card's dense bf16 peak from its
data sheet and against a bf16 matrix product measured in the same run. Agreement: the same weights and batch, loss,
predictions and gradients with bf16 autocast against fp32 (TF32 off). Profile: torch.profiler over a few steps of one
model at its timed batch, the busiest kernels and how much of the wall-clock step the GPU was busy (a step that
waits on the host shows as a low fraction). Compile: the step under ``torch.compile`` against eager, after one
recompile for a second mask shape. Contexts: one model stepped with the contexts cut to the batch's shortest (the
official collator), every image's whole context padded, and packed (variable-length attention), per real context
token, with the packed step checked against the padded one. Target copy: the lever of a bf16 copy of the target
encoder's weights refreshed after the EMA, in its parts (:func:`target_copy_row`). The JSON is rewritten after
every stage, so a run stopped by a time limit still leaves what it measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from bench_train_step import (  # benchmarks/bench_train_step.py, beside this script: the same step, timed the same way
    Setup,
    matmul_ceiling,
    median_seconds,
    seconds_per_step,
    split,
    step_flops,
    synchronize,
    train_step,
)

import ijepa_hf.modeling_ijepa_hf as modeling
from ijepa_hf import IJepaMaskCollator, IJepaPretrainingConfig, IJepaForPreTraining
from ijepa_hf.modeling_ijepa_hf import packed_sequences
from ijepa_hf.training import build_optimizer
from ijepa_hf.training.compilation import compile_blocks, configure_inductor_for_variable_masks

DEFAULT_MODELS = ("vit_base_patch16_224", "ijepa_vith14_in1k")
# Dense bf16 tensor-core peaks from the data sheets, TFLOP/s. Matched as substrings of the device name, first hit wins.
DATASHEET_BF16_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0), ("L40S", 362.0),
                         ("A10G", 70.0), ("L4", 121.0))


def datasheet_peak_tflops(name: str) -> float | None:
    """The card's dense bf16 peak, or None for a device not in the table (a CPU, an unlisted GPU)."""
    return next((peak for key, peak in DATASHEET_BF16_TFLOPS if key in name), None)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def preset_config(preset: str) -> IJepaPretrainingConfig:
    """The config of a preset name, or of ``name@SIZE``: the preset at another image size (a toy run's smaller
    grid; a table row keeps the whole name)."""
    name, _, size = preset.partition("@")
    if not size:
        return IJepaPretrainingConfig.from_preset(name)
    if not size.isdigit():
        raise SystemExit(f"{preset!r}: the size after '@' must be an image side in pixels, e.g. {name}@96")
    return IJepaPretrainingConfig.from_preset(name, encoder={"image_size": int(size)},
                                              predictor={"image_size": int(size)})


def build(preset: str, device: torch.device, seed: int = 0) -> tuple[IJepaForPreTraining, IJepaPretrainingConfig]:
    torch.manual_seed(seed)
    config = preset_config(preset)
    with device:  # built in place: a ViT-H pair is 1.3B parameters, slow to initialise on the host
        model = IJepaForPreTraining(config)
    return model.train(), config


def training_setup(preset: str, device: torch.device, batch_size: int) -> Setup:
    """Model, AdamW (official groups, fused) and one official-mask batch, as bench_train_step.py's step uses them."""
    model, config = build(preset, device)
    optimizer = build_optimizer(model)
    return Setup(model, optimizer, mask_batch(config, batch_size, device))


def mask_batch(config: IJepaPretrainingConfig, batch_size: int, device: torch.device, seed: int = 0) -> dict:
    """Random images with official-mode masks, on the device."""
    size = config.encoder_config.image_size
    height, width = (size, size) if isinstance(size, int) else size
    generator = torch.Generator().manual_seed(seed)
    images = [{"pixel_values": torch.randn(3, height, width, generator=generator)} for _ in range(batch_size)]
    batch = IJepaMaskCollator.from_config(config, mask_mode="official", seed=seed)(images)
    return {key: value.to(device) for key, value in batch.items() if isinstance(value, torch.Tensor)}


def _presets(text: str) -> list[str]:
    """A comma-separated list of preset names; '' is none."""
    return [name.strip() for name in text.split(",") if name.strip()]


def _batch_for(preset: str, option: str, explicit: int | None, timed: dict[str, int]) -> int:
    """The batch of a later stage for ``preset``: ``explicit`` (its ``--<option>-batch``), else the batch the
    throughput stage timed for that preset; refused when there is neither."""
    batch_size = explicit or timed.get(preset)
    if batch_size is None:
        raise SystemExit(f"--{option}-models {preset}: pass --{option}-batch, or list it in --models too.")
    return batch_size


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def largest_batch(preset: str, device: torch.device, min_batch: int, max_batch: int) -> tuple[int, list[str]]:
    """Doubles the batch until two training steps run out of memory; returns the largest that ran, and a log."""
    log: list[str] = []
    model, config = build(preset, device)
    optimizer = build_optimizer(model)
    best, batch_size = 0, min_batch
    while batch_size <= max_batch:
        try:
            setup = Setup(model, optimizer, mask_batch(config, batch_size, device))
            for _ in range(2):
                train_step(setup, "bf16")
            synchronize(device)
            best = batch_size
            log.append(f"batch {batch_size}: ok")
        except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
            if not _is_out_of_memory(error):
                raise
            log.append(f"batch {batch_size}: out of memory")
            break
        finally:
            setup = None
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        batch_size *= 2
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if best == 0:
        raise RuntimeError(f"{preset}: even batch {min_batch} does not fit on {device}; lower --min-batch.")
    return best, log


def measure_throughput(preset: str, device: torch.device, batch_size: int, steps: int, ceiling_tflops: float,
                       profile: bool = False) -> tuple[dict, dict | None]:
    """The timed row of ``preset`` at ``batch_size``; with ``profile``, also :func:`profile_steps` on the same model
    and batch (else None)."""
    setup = training_setup(preset, device, batch_size)
    model, batch = setup.model, setup.batch
    if device.type == "cuda":
        train_step(setup, "bf16")  # the optimizer state exists from here on, so the peak below is a step's
        torch.cuda.reset_peak_memory_stats(device)
    seconds = seconds_per_step(setup, "bf16", steps, warmup=3)
    flops = step_flops(setup, "bf16")
    parts = split(setup, "bf16")
    achieved = flops / seconds / 1e12
    peak = datasheet_peak_tflops(device_name(device))
    result = {
        "model": preset,
        "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "batch_size": batch_size,
        "context_patches": int(batch["context_mask"].shape[1]),
        "target_patches": list(batch["target_masks"].shape[1:]),
        "seconds_per_step": seconds,
        "images_per_second": batch_size / seconds,
        "tflop_per_step": flops / 1e12,
        "achieved_tflops": achieved,
        "mfu_datasheet": achieved / peak if peak else None,
        "of_matmul_ceiling": achieved / ceiling_tflops,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "split_seconds": parts,  # forward of the target encoder; forward + backward of the others; no AdamW / EMA
    }
    profiled = None
    if profile:
        summary, table = profile_steps(setup)
        profiled = {"model": preset, "batch_size": batch_size, **summary, "top_kernels": table}
    del setup, model, batch
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result, profiled


def profile_steps(setup: Setup, steps: int = 3, rows: int = 15) -> tuple[dict, str]:
    """Profiles ``steps`` bf16 training steps: device-busy fraction of the wall clock and the busiest kernels."""
    from torch.profiler import ProfilerActivity, profile

    device = setup.batch["pixel_values"].device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    train_step(setup, "bf16")
    synchronize(device)
    start = time.perf_counter()
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            train_step(setup, "bf16")
        synchronize(device)
    wall = (time.perf_counter() - start) / steps
    averages = profiler.key_averages()
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    # An aten op's device time repeats that of the kernels it launched; kernels alone have no CPU-side time.
    kernels = [event for event in averages if event.self_cpu_time_total == 0 and event.self_device_time_total > 0]
    busy = sum(event.self_device_time_total for event in kernels) / 1e6 / steps
    summary = {"wall_seconds_per_step": wall, "kernel_seconds_per_step": busy if kernels else None,
               "device_busy_fraction": busy / wall if kernels else None}
    return summary, averages.table(sort_by=sort_by, row_limit=rows)


def compiled_speedup(preset: str, device: torch.device, batch_size: int, steps: int, backend: str = "inductor",
                     scope: str = "model") -> dict:
    """The bf16 step compiled against eager, same model and batch: ``scope="model"`` is ``torch.compile(model)``
    (what ``--torch_compile`` does), ``"blocks"`` compiles each transformer block in place
    (``ijepa_hf.training.compilation.compile_blocks``, ``--torch_compile_scope blocks``).

    Official masks change the context and target lengths from batch to batch, so the compiled model first sees a
    batch of another shape: dynamo recompiles once with dynamic sizes, as in training, before anything is timed.
    Inductor's mix-order reduction is turned off as the training loops do (``ijepa_hf.training.compilation``),
    unless ``TORCHINDUCTOR_MIX_ORDER_REDUCTION`` says otherwise.
    """
    from torch._inductor import config as inductor_config

    configure_inductor_for_variable_masks()
    setup = training_setup(preset, device, batch_size)
    model, optimizer = setup.model, setup.optimizer
    config = model.config
    other_shape = next(batch for seed in range(1, 20)
                       if (batch := mask_batch(config, batch_size, device, seed))["context_mask"].shape
                       != setup.batch["context_mask"].shape)
    shapes = [{name: list(batch[name].shape) for name in ("context_mask", "target_masks")}
              for batch in (setup.batch, other_shape)]
    torch._dynamo.reset()

    def loss_and_backward(module: torch.nn.Module, batch: dict) -> tuple[float, float]:
        synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = module(**batch).loss
        loss.backward()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        return float(loss.detach()), time.perf_counter() - start

    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    # Eager is timed first ("blocks" compiles the model in place); the two losses are then taken on the same weights.
    eager_seconds = seconds_per_step(setup, "bf16", steps, warmup=2)
    eager_loss, _ = loss_and_backward(model, setup.batch)
    compiled = torch.compile(model, backend=backend) if scope == "model" else model
    if scope == "blocks":
        compile_blocks(model, backend=backend)
    compiled_loss, first_compile = loss_and_backward(compiled, setup.batch)  # same weights: the losses must agree
    _, second_compile = loss_and_backward(compiled, other_shape)
    compiled_seconds = seconds_per_step(Setup(compiled, setup.optimizer, setup.batch), "bf16", steps, warmup=2)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
    del setup, model, compiled
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "model": preset, "batch_size": batch_size, "backend": backend, "scope": scope,
        "mask_shapes": shapes,
        "first_compile_seconds": first_compile, "recompile_seconds": second_compile, "graphs": graphs,
        "eager_seconds_per_step": eager_seconds, "compiled_seconds_per_step": compiled_seconds,
        "speed_up": eager_seconds / compiled_seconds,
        "loss_eager": eager_loss, "loss_compiled": compiled_loss,
        "loss_relative_difference": abs(compiled_loss - eager_loss) / abs(eager_loss),
        "mix_order_reduction": bool(getattr(inductor_config.triton, "mix_order_reduction", False)),
    }


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def agreement(preset: str, device: torch.device, batch_size: int) -> dict:
    """bf16 autocast against fp32 (TF32 off) on the same weights and batch: loss, predictions, gradients."""
    model, config = build(preset, device)
    batch = mask_batch(config, batch_size, device, seed=1)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    runs = {}
    try:
        for name, enabled in (("fp32", False), ("bf16", True)):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled):
                output = model(**batch)
            output.loss.backward()
            grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
            runs[name] = (output.loss.detach().float(), output.predictions.detach().float(),
                          output.targets.detach().float(), grads)
            model.zero_grad(set_to_none=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    (loss32, pred32, tgt32, grad32), (loss16, pred16, tgt16, grad16) = runs["fp32"], runs["bf16"]
    del model
    return {
        "model": preset,
        "batch_size": batch_size,
        "loss_fp32": float(loss32),
        "loss_bf16": float(loss16),
        "loss_relative_difference": abs(float(loss16) - float(loss32)) / abs(float(loss32)),
        "predictions_relative_error": _relative(pred16, pred32),
        "predictions_cosine": _cosine(pred16, pred32),
        "targets_relative_error": _relative(tgt16, tgt32),
        "gradient_relative_error": _relative(grad16, grad32),
        "gradient_cosine": _cosine(grad16, grad32),
    }


def low_precision_copy(encoder: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``encoder`` whose matrix-product weights and biases (every ``Linear`` and ``Conv2d``) are in
    ``dtype`` — what autocast casts them to at every use — while LayerNorms (run in float32 under autocast) and
    buffers stay as they are. Under autocast it gives the same outputs as ``encoder``: the cast is the same
    rounding, done once instead of at every forward."""
    copied = copy.deepcopy(encoder)
    for module in copied.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            module.to(dtype)
    return copied


def target_copy_row(preset: str, device: torch.device, batch_size: int, steps: int) -> dict:
    """The lever of a bf16 copy of the target encoder, refreshed right after the EMA (fp32 master kept), measured
    in its parts on one official-mask batch (bf16 autocast, medians of ``steps``): the target encoder's forward
    with autocast casting the fp32 weights at every use, the same forward on the copy (its outputs compared), the
    EMA update, and the refresh of the copy from the master. ``saving_seconds_per_step`` is the forward saved less
    the refresh added: the copy is worth building only where it is clearly positive."""
    model, config = build(preset, device)
    pixel_values = mask_batch(config, batch_size, device)["pixel_values"]
    master = model.target_encoder
    lowp = low_precision_copy(master, torch.bfloat16)
    # The copy's parameters and their masters, in the same order, for one foreach copy per refresh.
    masters = dict(master.named_parameters())
    pairs = [(p, masters[name]) for name, p in lowp.named_parameters() if p.dtype == torch.bfloat16]
    lowp_params, master_params = [p for p, _ in pairs], [m for _, m in pairs]

    def forward(encoder: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            return encoder(pixel_values).last_hidden_state

    def refresh() -> None:
        with torch.no_grad():
            torch._foreach_copy_(lowp_params, master_params)

    difference = float((forward(master).float() - forward(lowp).float()).abs().max())
    seconds = {
        "forward_seconds_autocast": median_seconds(lambda: forward(master), steps, 2, device),
        "forward_seconds_copy": median_seconds(lambda: forward(lowp), steps, 2, device),
        "ema_seconds": median_seconds(lambda: model.update_target_encoder(0.996), steps, 2, device),
        "refresh_seconds": median_seconds(refresh, steps, 2, device),
    }
    row = {"model": preset, "batch_size": batch_size, "targets_max_abs_difference": difference, **seconds,
           "saving_seconds_per_step": seconds["forward_seconds_autocast"] - seconds["forward_seconds_copy"]
           - seconds["refresh_seconds"],
           "copy_megabytes": sum(p.numel() * p.element_size() for p in lowp_params) / 1e6}
    print(json.dumps(row), flush=True)
    del model, master, lowp, pairs, lowp_params, master_params
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


# The three ways of giving the context encoder each image's context: cut to the batch's shortest (the official
# collator), every image's whole context padded to the longest, or packed into one sequence without padding.
CONTEXT_MODES = ("cut", "padded", "packed")


def context_lengths_rows(preset: str, device: torch.device, batch_size: int, steps: int) -> list[dict]:
    """The same model and images stepped with cut, padded and packed contexts (bf16 autocast): seconds per step
    and per thousand real context tokens (every image's context once, the cost a user pays per token kept), and
    the packed step's loss and gradients against the padded one on the same weights and batch."""
    rows, reference = [], {}
    for mode in CONTEXT_MODES:
        model, config = build(preset, device)
        if mode != "cut":
            config = config.updated(context_lengths="per_image")
        batch = mask_batch(config, batch_size, device)
        # On CPU there is no variable-length kernel: "packed" then runs its reference attention (the toy run).
        packing = {"cut": False, "padded": False, "packed": True if device.type == "cpu" else None}[mode]
        with packed_sequences(packing):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                output = model(**batch)
            output.loss.backward()
            grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
            model.zero_grad(set_to_none=True)
            setup = Setup(model, build_optimizer(model), batch)
            seconds = seconds_per_step(setup, "bf16", steps, warmup=2)
        lengths = batch.get("context_lengths")
        tokens = int(lengths.sum()) if lengths is not None else batch["context_mask"].numel()
        row = {"model": preset, "batch_size": batch_size, "mode": mode, "context_tokens": tokens,
               "padded_length": int(batch["context_mask"].shape[1]), "seconds_per_step": seconds,
               "ms_per_1k_context_tokens": 1e6 * seconds / tokens}
        if mode == "packed":
            kernel = modeling._varlen_kernel(device, torch.bfloat16)
            row["attention"] = "varlen kernel" if kernel is not None else "reference (unpacked per step)"
        if mode == "padded":
            reference = {"loss": float(output.loss), "grads": grads}
        elif mode == "packed":
            row["loss_relative_difference_to_padded"] = abs(float(output.loss) - reference["loss"]) / abs(
                reference["loss"])
            row["gradient_cosine_to_padded"] = _cosine(grads, reference["grads"])
        rows.append(row)
        print(json.dumps(row), flush=True)
        del setup, model, batch, output, grads
        if device.type == "cuda":
            torch.cuda.empty_cache()
    cut = rows[0]["ms_per_1k_context_tokens"]
    for row in rows:
        row["per_token_cost_vs_cut"] = row["ms_per_1k_context_tokens"] / cut
    return rows


def format_tables(device_label: str, throughput: list[dict], agreements: list[dict],
                  context_rows: list[dict] | None = None, target_copy_rows: list[dict] | None = None) -> str:
    lines = [f"device: {device_label}", "",
             "| model | params (M) | batch | context / target patches | s/step | images/s | TFLOP/step | "
             "achieved TFLOP/s | MFU (data sheet) | of measured bf16 matmul | peak memory GiB | "
             "split s: target / context / predictor |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in throughput:
        mfu = f"{row['mfu_datasheet']:.1%}" if row["mfu_datasheet"] is not None else "n/a"
        memory = f"{row['peak_memory_gib']:.1f}" if row["peak_memory_gib"] is not None else "n/a"
        blocks, per_block = row["target_patches"]
        parts = " / ".join(f"{row['split_seconds'][part]:.3f}"
                           for part in ("target encoder", "context encoder", "predictor + loss"))
        lines.append(f"| {row['model']} | {row['parameters_m']} | {row['batch_size']} | {row['context_patches']} / "
                     f"{blocks}x{per_block} | {row['seconds_per_step']:.3f} | {row['images_per_second']:.1f} | "
                     f"{row['tflop_per_step']:.2f} | {row['achieved_tflops']:.1f} | {mfu} | "
                     f"{row['of_matmul_ceiling']:.1%} | {memory} | {parts} |")
    lines += ["", "| model | batch | loss fp32 | loss bf16 | loss rel. diff | predictions rel. err / cosine | "
              "targets rel. err | gradient rel. err / cosine |", "|---|---:|---:|---:|---:|---|---:|---|"]
    for row in agreements:
        lines.append(f"| {row['model']} | {row['batch_size']} | {row['loss_fp32']:.5f} | {row['loss_bf16']:.5f} | "
                     f"{row['loss_relative_difference']:.2e} | {row['predictions_relative_error']:.2e} / "
                     f"{row['predictions_cosine']:.5f} | {row['targets_relative_error']:.2e} | "
                     f"{row['gradient_relative_error']:.2e} / {row['gradient_cosine']:.5f} |")
    if context_rows:
        lines += ["", "| model | batch | contexts | real context tokens | padded length | s/step | "
                  "ms / 1k context tokens | per token vs cut | packed vs padded: loss rel. diff / grad cosine |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---|"]
        for row in context_rows:
            mode = row["mode"] + (f" ({row['attention']})" if "attention" in row else "")
            check = (f"{row['loss_relative_difference_to_padded']:.2e} / {row['gradient_cosine_to_padded']:.5f}"
                     if "gradient_cosine_to_padded" in row else "")
            lines.append(f"| {row['model']} | {row['batch_size']} | {mode} | {row['context_tokens']} | "
                         f"{row['padded_length']} | {row['seconds_per_step']:.3f} | "
                         f"{row['ms_per_1k_context_tokens']:.3f} | {row['per_token_cost_vs_cut']:.2f}x | {check} |")
    if target_copy_rows:
        lines += ["", "| model | batch | target forward ms: autocast casts / bf16 copy | EMA ms | copy refresh ms | "
                  "saved ms per step | copy MB | targets max abs diff |", "|---|---:|---|---:|---:|---:|---:|---:|"]
        for row in target_copy_rows:
            lines.append(f"| {row['model']} | {row['batch_size']} | {1e3 * row['forward_seconds_autocast']:.2f} / "
                         f"{1e3 * row['forward_seconds_copy']:.2f} | {1e3 * row['ema_seconds']:.2f} | "
                         f"{1e3 * row['refresh_seconds']:.2f} | {1e3 * row['saving_seconds_per_step']:.2f} | "
                         f"{row['copy_megabytes']:.0f} | {row['targets_max_abs_difference']:.1e} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help="comma-separated presets (IJepaPretrainingConfig.from_preset names; name@SIZE: at "
                             "another image size, e.g. a toy run's vit_tiny_patch16_224@96)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--min-batch", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model (median)")
    parser.add_argument("--agreement-models", default="vit_base_patch16_224",
                        help="comma-separated presets for the bf16-vs-fp32 check ('' to skip)")
    parser.add_argument("--agreement-batch", type=int, default=16)
    parser.add_argument("--matmul-size", type=int, default=8192)
    parser.add_argument("--profile-model", default="vit_base_patch16_224",
                        help="preset whose timed batch is profiled (one of --models; '' to skip)")
    parser.add_argument("--compile-models", default="",
                        help="comma-separated presets whose step is also timed under torch.compile (minutes each)")
    parser.add_argument("--compile-batch", type=int, default=None,
                        help="batch for --compile-models (default: the largest found for that preset)")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--compile-scopes", default="model",
                        help="comma-separated: model (torch.compile(model)), blocks (each transformer block)")
    parser.add_argument("--context-lengths-model", default="vit_base_patch16_224",
                        help="preset stepped with cut, padded and packed contexts ('' to skip)")
    parser.add_argument("--context-lengths-batch", type=int, default=256)
    parser.add_argument("--target-copy-models", default="",
                        help="comma-separated presets: the bf16 target-encoder copy lever, in its parts ('' to skip)")
    parser.add_argument("--target-copy-batch", type=int, default=None,
                        help="batch for --target-copy-models (default: the timed batch of that preset)")
    parser.add_argument("--output", default=None,
                        help="JSON path (default: $OUT/gpu_results.json if $OUT is set, else none)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU; pass --device cpu for a toy run.")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 parts of an autocast step, as a GPU user runs them
    name = device_name(device)
    print(f"{name}; torch {torch.__version__}", flush=True)
    output = args.output or (str(Path(os.environ["OUT"]) / "gpu_results.json") if os.environ.get("OUT") else None)
    results: dict = {"device": name, "torch": torch.__version__, "command": sys.argv, "batch_search": {},
                     "throughput": [], "agreement": [], "profile": {}, "compiled": [], "context_lengths": [],
                     "target_copy": []}

    def save() -> None:
        results["table"] = format_tables(name, results["throughput"], results["agreement"],
                                         results["context_lengths"], results["target_copy"])
        if output:
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            Path(output).write_text(json.dumps(results, indent=1))

    ceiling = matmul_ceiling("bf16", args.matmul_size, device=device) / 1e3
    results.update(matmul_ceiling_tflops=ceiling, datasheet_bf16_tflops=datasheet_peak_tflops(name))
    print(f"bf16 matmul {args.matmul_size}^3: {ceiling:.1f} TFLOP/s", flush=True)
    save()
    # Agreement first: it is short, and a run cut off by its time limit during the largest model still reports it.
    for preset in _presets(args.agreement_models):
        results["agreement"].append(agreement(preset, device, args.agreement_batch))
        print(json.dumps(results["agreement"][-1]), flush=True)
        save()

    for preset in _presets(args.models):
        batch_size, results["batch_search"][preset] = largest_batch(preset, device, args.min_batch, args.max_batch)
        print(f"{preset}: {', '.join(results['batch_search'][preset])}", flush=True)
        profile = preset == args.profile_model
        try:
            row, profiled = measure_throughput(preset, device, batch_size, args.steps, ceiling, profile)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as error:  # a fresh model can fragment differently
            if not _is_out_of_memory(error) or batch_size // 2 < args.min_batch:
                raise
            torch.cuda.empty_cache()
            row, profiled = measure_throughput(preset, device, batch_size // 2, args.steps, ceiling, profile)
        results["throughput"].append(row)
        print(json.dumps(row), flush=True)
        if profiled:
            results["profile"] = profiled
            summary = {key: value for key, value in profiled.items() if key != "top_kernels"}
            print(json.dumps(summary) + "\n" + profiled["top_kernels"], flush=True)
        save()

    if args.context_lengths_model:
        results["context_lengths"] = context_lengths_rows(args.context_lengths_model, device,
                                                          args.context_lengths_batch, args.steps)
        save()

    batches = {row["model"]: row["batch_size"] for row in results["throughput"]}
    for preset in _presets(args.target_copy_models):
        batch_size = _batch_for(preset, "target-copy", args.target_copy_batch, batches)
        results["target_copy"].append(target_copy_row(preset, device, batch_size, args.steps))
        save()

    for preset in _presets(args.compile_models):
        batch_size = _batch_for(preset, "compile", args.compile_batch, batches)
        for scope in _presets(args.compile_scopes):
            results["compiled"].append(compiled_speedup(preset, device, batch_size, args.steps, args.compile_backend,
                                                        scope))
            print(json.dumps(results["compiled"][-1]), flush=True)
            save()

    print("\n" + results["table"])
    if output:
        print(f"wrote {output}")
    return results


if __name__ == "__main__":
    main()
