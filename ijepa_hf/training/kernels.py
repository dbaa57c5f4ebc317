"""Kernel choices made by measurement on the machine that trains, not by a guess from its hardware.

Which attention kernel is faster depends on the CPU or GPU, the precision and the sequence lengths: on one CPU
torch's fused SDPA kernel wins in fp32 and loses in bf16 training (its backward recomputes in small tiles), on
another the order flips, and on a GPU SDPA wins. The model does exactly what ``attn_implementation`` says;
:func:`choose_attention_implementation` times the candidates on the run's own model, batch and precision and sets
the faster one; :func:`set_attention_implementation` is ``--attn_implementation`` of both pretraining scripts.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ContextManager

import torch

__all__ = ["ATTENTION_CANDIDATES", "ATTENTION_CHOICES", "check_attention_choice", "choose_attention_implementation",
           "set_attention_implementation"]

logger = logging.getLogger(__name__)

ATTENTION_CANDIDATES = ("sdpa", "eager")
ATTENTION_CHOICES = ("auto", *ATTENTION_CANDIDATES)  # what --attn_implementation takes


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def choose_attention_implementation(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
    candidates: Sequence[str] = ATTENTION_CANDIDATES,
    repeats: int = 2,
) -> tuple[str, dict[str, float]]:
    """Times the pretraining loss's forward + backward on ``batch`` with each of ``candidates`` and keeps the
    fastest.

    Args:
        model: an `IJepaForPreTraining` (or any model whose output has ``.loss`` and that supports
            ``set_attn_implementation``), on the device it will train on and not yet wrapped for data parallelism
            (no gradient all-reduce must run here).
        batch: one training batch of the run's shapes (``pixel_values [B, C, H, W]``, ``context_mask [B, K]``,
            ``target_masks [B, M, T]``).
        autocast: the run's mixed-precision context (e.g. ``accelerator.autocast``).
        candidates: ``attn_implementation`` names to compare.
        repeats: timed passes per candidate after one untimed warm-up pass; the fastest pass counts.

    Returns:
        ``(name, {candidate: seconds})``. The model is left with ``name`` set, no gradients, unchanged weights
        and the random generators as they were (dropout in a pass must not shift the run's random stream).
    """
    if not candidates:
        raise ValueError("`candidates` is empty: name at least one attn_implementation to choose from.")
    device = batch["pixel_values"].device
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    seconds: dict[str, list[float]] = {name: [] for name in candidates}
    try:
        for index in range(repeats + 1):
            for name in candidates:  # interleaved, so that a slower moment of the host hits every candidate
                model.set_attn_implementation(name)
                _synchronize(device)
                start = time.perf_counter()
                with autocast():
                    loss = model(**batch).loss
                loss.backward()
                _synchronize(device)
                if index:
                    seconds[name].append(time.perf_counter() - start)
                model.zero_grad(set_to_none=True)
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
    best = {name: min(times) if times else float("nan") for name, times in seconds.items()}
    choice = min(candidates, key=lambda name: best[name]) if repeats else candidates[0]
    model.set_attn_implementation(choice)
    return choice, best


def check_attention_choice(name: str) -> None:
    """``--attn_implementation``'s value, as both pretraining scripts check it before anything runs."""
    if name not in ATTENTION_CHOICES:
        raise ValueError(f"--attn_implementation must be auto, sdpa or eager, got {name!r}")


def set_attention_implementation(model: torch.nn.Module, name: str, mask_collator: Any, *, batch_size: int,
                                 seed: int, device: torch.device | str,
                                 autocast: Callable[[], ContextManager] = contextlib.nullcontext,
                                 num_processes: int = 1) -> str:
    """``--attn_implementation`` of a pretraining run: ``name`` as given, or (``auto``) the faster of
    :data:`ATTENTION_CANDIDATES` timed by :func:`choose_attention_implementation` on a random batch of the run's
    shapes (``batch_size`` images with ``mask_collator``'s masks, per-image lengths too) and precision
    (``autocast``), on ``device``. Call it before the model is wrapped for data parallelism (no gradient all-reduce
    may run); rank 0's choice holds on every rank (their timings differ, their kernels must not). Returns the
    implementation set."""
    check_attention_choice(name)
    if name != "auto":
        model.set_attn_implementation(name)
        return name
    model.to(device)
    masks = mask_collator.sample_batch(batch_size, batch_index=0)
    height, width = mask_collator.image_size
    channels = getattr(getattr(model.config, "encoder_config", None), "num_channels", 3)
    pixels = torch.randn(batch_size, channels, height, width, generator=torch.Generator().manual_seed(seed))
    batch = {key: value.to(device) for key, value in {"pixel_values": pixels, **masks}.items()}
    choice, seconds = choose_attention_implementation(model, batch, autocast)
    if num_processes > 1:
        from accelerate.utils import broadcast_object_list

        choice = broadcast_object_list([choice])[0]
        model.set_attn_implementation(choice)
    logger.info("--attn_implementation auto: %s (forward + backward of one batch here: %s; pass "
                "--attn_implementation %s to pin it)", choice,
                ", ".join(f"{key} {value * 1e3:.0f} ms" for key, value in seconds.items()), choice)
    return choice
