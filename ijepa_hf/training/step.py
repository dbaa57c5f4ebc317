"""One I-JEPA training step under Accelerate — the one implementation the pretraining loop and the benchmarks use
(``IJepaTrainer`` runs transformers' own step and applies the same schedule and EMA in its hooks).

Official order of one optimizer update ``k`` (1-based):

1. forward (target encoder on the full image, context encoder on the context patches, predictor on every target
   block), loss, backward — for each micro-batch of the update;
2. the learning rate and weight decay of update ``k`` are written into the optimizer (the official schedules
   advance *before* the update; here at the start of the update's last micro-batch, because a DeepSpeed engine
   steps inside ``accelerator.backward``), gradients are clipped if asked, ``optimizer.step()``;
3. the EMA target encoder moves with the momentum of update ``k`` (:class:`~ijepa_hf.training.PretrainingSchedule`
   holds the indexing).

Non-finite losses (and, with clipping, gradient norms) are recorded on the device (no host sync per step);
:meth:`PretrainingStep.check` raises :class:`NonFiniteLossError` at the syncs the caller makes anyway (log rows,
checkpoints, the end). A non-finite gradient without clipping shows one update later, in the loss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .distributed import EmaMode, update_target_encoder
from .metrics import REGULARIZER_KEYS, collapse_statistics
from .schedules import PretrainingSchedule

__all__ = ["PretrainingStep", "StepOutput", "NonFiniteLossError", "weights_are_finite", "dummy_batch_factory"]


class NonFiniteLossError(RuntimeError):
    """The loss or the gradients of an update were NaN or infinite."""

    def __init__(self, update: int, lr: float, detail: str = "", *, can_skip: bool = True) -> None:
        self.update = update
        super().__init__(
            f"The loss or the gradients became non-finite (NaN/inf) at step {update} (learning rate {lr:.3g}){detail}."
            " Likely cause: a learning rate too high for this model and batch size (lower --learning_rate, "
            "lengthen the warm-up or set --max_grad_norm), fp16 overflow (use bf16), or corrupt input. Nothing "
            "after the last finite checkpoint was saved; resume from it with --resume_from_checkpoint latest"
            + (", or allow a few bad steps with --skip_nonfinite_steps N." if can_skip else ".")
        )


def weights_are_finite(model: torch.nn.Module) -> bool:
    """Whether every floating-point parameter and buffer of ``model`` this rank holds is finite (one host sync).

    Sharded (FSDP2 ``DTensor``) parameters are checked on the local shard: reduce the answer over ranks."""
    tensors = [_local_data(t) for t in (*model.parameters(), *model.buffers())]
    checks = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(checks).all()) if checks else True


def _local_data(tensor: torch.Tensor) -> torch.Tensor:
    """What this rank holds of a parameter: the local shard of an FSDP2 ``DTensor``, the partition of a DeepSpeed
    ZeRO-3 parameter (whose ``data`` is empty outside a gather), else the tensor."""
    if hasattr(tensor, "to_local"):
        return tensor.to_local()
    partition = getattr(tensor, "ds_tensor", None)
    return partition if partition is not None else tensor


def dummy_batch_factory(mask_collator: Any, config: Any, device: torch.device | str | None = None
                        ) -> Callable[[], dict[str, torch.Tensor]]:
    """Makes (once, then hands out again) a one-image batch of zeros with masks of ``mask_collator``'s geometry,
    for a micro-batch whose images were all unreadable: forward and backward run on it with the loss multiplied by 0,
    so data-parallel ranks keep issuing the same collectives. ``device``: where the tensors go (``None``: left on the
    CPU, for a caller that moves batches itself)."""
    cache: dict[str, torch.Tensor] = {}

    def make() -> dict[str, torch.Tensor]:
        if not cache:
            masks = mask_collator.sample_batch(1, batch_index=0)  # the keys of a real batch (context_lengths too)
            height, width = mask_collator.image_size
            pixels = torch.zeros(1, config.encoder_config.num_channels, height, width)
            batch = {"pixel_values": pixels, **masks}
            cache.update({k: v if device is None else v.to(device) for k, v in batch.items()})
        return cache

    return make


@dataclass
class StepOutput:
    """What one micro-batch did. ``loss`` stays on the device (detached); ``None`` for a batch without images."""

    loss: torch.Tensor | None
    num_images: int
    context_patches: int | torch.Tensor  # per image: the padded length, or the mean of context_lengths (on device)
    target_patches: int
    stats: dict[str, float] | None
    updated: bool  # this micro-batch ended an optimizer update
    skipped: bool = False  # ... whose optimizer step and EMA were skipped (non-finite, --skip_nonfinite_steps)
    terms: dict[str, torch.Tensor] | None = None  # the regulariser's terms (REGULARIZER_KEYS, detached), if on


def _context_patches(inputs: Mapping[str, torch.Tensor]) -> int | torch.Tensor:
    """Context patches per image of a batch: the context length, or with per-image lengths their mean, left on the
    device (the log window reads it at its next sync)."""
    lengths = inputs.get("context_lengths")
    if lengths is None:
        return int(inputs["context_mask"].shape[1])
    return lengths.detach().to(torch.float64).mean()


def _regularizer_terms(output: Any) -> dict[str, torch.Tensor] | None:
    """The anti-collapse terms a regularised model's output carries (detached, on the device), else ``None``."""
    terms = {k: output[k].detach() for k in REGULARIZER_KEYS if output.get(k) is not None}
    return terms or None


class PretrainingStep:
    """Forward, backward and — on the last micro-batch of an update — schedule, clipping, optimizer step and EMA.

    Args:
        accelerator: the run's ``Accelerator`` (gradient accumulation, mixed precision, data parallel).
        model: the prepared ``IJepaForPreTraining``-style model (``loss``, ``target_hidden_state``, ...).
        optimizer: the prepared optimizer (official groups: :func:`~ijepa_hf.training.build_optimizer`).
        schedule: lr / weight decay / EMA momentum as functions of the update number.
        max_grad_norm: clip the gradient norm to this; ``None`` or ``<= 0``: no clipping.
        dummy_batch: makes a one-image batch for micro-batches whose images were all unreadable: it runs forward
            and backward with the loss multiplied by 0, so data-parallel ranks keep issuing the same collectives.
        skip_nonfinite_steps: how many non-finite updates to skip (no optimizer step, no EMA) before raising;
            ``0`` raises at the next :meth:`check`. ``> 0`` syncs with the host at every update.
        ema_mode: how the EMA reaches the target encoder under the run's sharding
            (:func:`~ijepa_hf.training.distributed.configure_distributed`).
    """

    def __init__(self, accelerator: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 schedule: PretrainingSchedule, *, max_grad_norm: float | None = None,
                 dummy_batch: Callable[[], Mapping[str, torch.Tensor]] | None = None,
                 skip_nonfinite_steps: int = 0, ema_mode: EmaMode = EmaMode.REPLICATED) -> None:
        self.accelerator, self.model, self.optimizer, self.schedule = accelerator, model, optimizer, schedule
        self.max_grad_norm = max_grad_norm if max_grad_norm is not None and max_grad_norm > 0 else None
        self.dummy_batch = dummy_batch
        self.skip_nonfinite_steps = int(skip_nonfinite_steps)
        self.skipped_updates = 0
        self.ema_mode = ema_mode
        self.ema_model = accelerator.unwrap_model(model, keep_torch_compile=False)
        device = accelerator.device
        self._window_bad = torch.zeros((), dtype=torch.bool, device=device)  # this update's micro-batches so far
        self._first_bad = torch.zeros((), dtype=torch.long, device=device)  # first non-finite update (0: none)
        # fp16's GradScaler skips updates with inf gradients itself: its norm is not a fault.
        self._check_gradients = getattr(accelerator, "scaler", None) is None

    def _clip(self) -> torch.Tensor | None:
        """Clip (if asked) and return the total gradient norm, else ``None``. Without clipping no norm is computed
        (it would cost a pass over every gradient): a non-finite gradient makes the weights, and so the next loss,
        non-finite, which the loss check and the weight check before every save catch."""
        if self.max_grad_norm is None:
            return None
        norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        return norm if self._check_gradients else None

    def __call__(self, batch: Mapping[str, torch.Tensor] | None, update: int, want_stats: bool = False) -> StepOutput:
        """Run one micro-batch that contributes to optimizer update ``update`` (1-based)."""
        real = batch is not None
        if not real and self.dummy_batch is None:
            raise ValueError("a batch without images needs the dummy_batch factory")
        inputs = batch if real else self.dummy_batch()
        accelerator = self.accelerator
        updated = skipped = False
        with accelerator.accumulate(self.model):
            if accelerator.sync_gradients:
                # Before backward: under DeepSpeed the engine steps the optimizer inside accelerator.backward.
                self.schedule.apply(self.optimizer, update)
            output = self.model(**inputs)  # prepare() wrapped forward in autocast for mixed precision
            loss = output.loss if real else output.loss * 0.0
            accelerator.backward(loss)
            self._window_bad |= ~torch.isfinite(loss.detach())
            if accelerator.sync_gradients:
                updated = True
                norm = self._clip()
                if norm is not None:
                    self._window_bad |= ~torch.isfinite(norm)
                bad = self._window_bad
                self._first_bad = torch.where((self._first_bad == 0) & bad, update, self._first_bad)
                if self.skip_nonfinite_steps and bool(bad):  # the documented per-update sync of this option
                    skipped = True
                    self.skipped_updates += 1
                    self._first_bad.zero_()
                    if self.skipped_updates > self.skip_nonfinite_steps:
                        raise NonFiniteLossError(update, self.schedule.lr_at(update),
                                                 f", one non-finite step more than --skip_nonfinite_steps "
                                                 f"{self.skip_nonfinite_steps} allows")
                self._window_bad = torch.zeros_like(self._window_bad)
                if not skipped:
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        if updated and not skipped:
            update_target_encoder(self.ema_model, self.schedule.momentum_at(update), self.ema_mode,
                                  is_main_process=accelerator.process_index == 0)
        return StepOutput(
            loss=loss.detach() if real else None,
            num_images=int(inputs["pixel_values"].shape[0]) if real else 0,
            context_patches=_context_patches(inputs),
            target_patches=int(inputs["target_masks"].shape[-1]),
            stats=collapse_statistics(output) if (want_stats and real) else None,
            updated=updated,
            skipped=skipped,
            terms=_regularizer_terms(output) if real else None,
        )

    def first_nonfinite_update(self) -> int:
        """The first update with a non-finite loss or gradient norm on any rank, 0 if none (a collective)."""
        return int(self.accelerator.reduce(self._first_bad.clone(), "max").item())

    def check(self) -> None:
        """Raise :class:`NonFiniteLossError` if any update so far was non-finite (every rank must call it)."""
        update = self.first_nonfinite_update()
        if update:
            raise NonFiniteLossError(update, self.schedule.lr_at(update))
