"""I-JEPA with ``transformers.Trainer``: callbacks for the EMA target encoder, the weight-decay schedule and the
mask collator's batch counter, plus :class:`IJepaTrainer`, which wires all of them and the official optimizer
and LR schedule.

Where the hooks sit in transformers 5.24's training step (checked in ``Trainer._run_epoch``)::

    on_pre_optimizer_step  -> weight decay of this update (official: schedule before the update)
    optimizer.step()
    on_optimizer_step      -> EMA update of the target encoder (after the update, before zero_grad)
    lr_scheduler.step(); global_step += 1; on_step_end

During both optimizer hooks ``state.global_step`` is still the number of *completed* updates ``k - 1`` of the
``k``-th update, so the schedules are pure functions of ``state.global_step`` and ``state.max_steps``, and
survive ``trainer.train(resume_from_checkpoint=...)`` without extra state.

Minimal use with a plain ``Trainer`` (``remove_unused_columns=False`` keeps the ``pixel_values`` column)::

    collator = IJepaMaskCollator.from_config(model.config)
    trainer = Trainer(model=model, args=TrainingArguments(..., remove_unused_columns=False),
                      train_dataset=dataset, data_collator=collator,
                      callbacks=[EMACallback(), MaskCollatorStepCallback(collator)])
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .compilation import configure_inductor_for_variable_masks
from .cpu_allocator import keep_freed_memory_for_reuse
from .optim import build_optimizer
from .schedules import cosine_wd_value, ema_momentum_value, warmup_cosine_value

logger = logging.getLogger(__name__)

__all__ = ["EMACallback", "WeightDecayScheduleCallback", "MaskCollatorStepCallback", "IJepaTrainer"]


def _unwrap(model: Any) -> Any:
    """The I-JEPA model under DDP / compile wrappers (Trainer passes its unwrapped ``self.model``; be safe)."""
    while not hasattr(model, "update_target_encoder"):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"{type(model).__name__} has no update_target_encoder(): is it an IJepaPretrainingModel?")
        model = inner
    return model


class EMACallback(TrainerCallback):
    """Update the target encoder after every optimizer step: ``target = m * target + (1 - m) * context``.

    ``m`` follows the official linear schedule from ``start`` to ``end`` over ``state.max_steps`` updates; the
    ``k``-th update (1-based) uses index ``k - 1``, so the first one uses ``start`` (``EMAMomentum`` semantics).

    Args:
        momentum: ``(start, end)``; default: the model config's ``ema_momentum`` (officially ``(0.996, 1.0)``).

    Attributes:
        last_momentum: the momentum of the most recent update (``None`` before the first one).
    """

    def __init__(self, momentum: Sequence[float] | None = None) -> None:
        self.momentum = None if momentum is None else (float(momentum[0]), float(momentum[1]))
        self.last_momentum: float | None = None

    def momentum_at(self, step: int, max_steps: int, model: Any = None) -> float:
        start, end = self.momentum if self.momentum is not None else _unwrap(model).config.ema_momentum
        return ema_momentum_value(step, max(1, max_steps), start, end)

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          model: Any = None, **kwargs: Any) -> None:
        momentum = self.momentum_at(state.global_step, state.max_steps, model)
        _unwrap(model).update_target_encoder(momentum)
        self.last_momentum = momentum


class WeightDecayScheduleCallback(TrainerCallback):
    """Official cosine weight-decay schedule (``weight_decay -> final_weight_decay`` over ``state.max_steps``),
    written into the optimizer's decay groups just before each update (groups flagged ``WD_exclude`` or with
    weight decay 0 in an optimizer without such flags, i.e. biases and norms, are left alone).

    Args:
        final_weight_decay: end value (official 0.4).
        weight_decay: start value; default ``args.weight_decay`` (official 0.04).
    """

    def __init__(self, final_weight_decay: float = 0.4, weight_decay: float | None = None) -> None:
        self.final_weight_decay = float(final_weight_decay)
        self.weight_decay = weight_decay
        self.last_weight_decay: float | None = None

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              optimizer: Any = None, **kwargs: Any) -> None:
        start = args.weight_decay if self.weight_decay is None else self.weight_decay
        # The k-th update uses index k (official: the schedule is stepped before the update).
        value = cosine_wd_value(state.global_step + 1, max(1, state.max_steps), start, self.final_weight_decay)
        groups = optimizer.param_groups
        if not any("WD_exclude" in group for group in groups):
            # An optimizer not built by official_param_groups (e.g. the Trainer's own): the groups created with
            # weight decay 0 are the bias/norm groups; flag them once so they stay at 0.
            for group in groups:
                group["WD_exclude"] = group.get("weight_decay", 0.0) == 0.0
        for group in groups:
            if not group.get("WD_exclude", False):
                group["weight_decay"] = value
        self.last_weight_decay = value


class MaskCollatorStepCallback(TrainerCallback):
    """Keep the mask collator's batch counter on the global batch index at every epoch start (and pass the epoch
    to the training dataset's ``set_epoch``, if it has one).

    With ``dataloader_num_workers > 0`` the workers use copies of the collator, so its counter in the main process
    does not advance; and on ``resume_from_checkpoint`` the Trainer skips already-seen batches. Setting the counter
    to ``epoch * batches_per_epoch + skipped batches`` makes the masks of every batch a function of its position
    only, the same as in an uninterrupted run.
    """

    def __init__(self, collator: Any) -> None:
        if not hasattr(collator, "set_step"):
            raise TypeError(f"{type(collator).__name__} has no set_step(); expected an IJepaMaskCollator")
        self.collator = collator

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       train_dataloader: Any = None, **kwargs: Any) -> None:
        try:
            batches_per_epoch = len(train_dataloader)
        except TypeError:  # streamed data: no epochs to align; the collator counts by itself without workers
            if args.dataloader_num_workers > 0:
                logger.warning("Iterable dataset with dataloader workers: mask batch indices restart in every "
                               "worker copy; use dataloader_num_workers=0 for position-determined masks.")
            return
        accumulation = args.gradient_accumulation_steps
        steps_per_epoch = max(1, math.ceil(batches_per_epoch / accumulation))
        epoch, steps_in_epoch = divmod(state.global_step, steps_per_epoch)
        self.collator.set_step(epoch * batches_per_epoch + steps_in_epoch * accumulation)
        # Position-seeded datasets (ijepa_hf.training.loop.PretrainImageDataset) draw new crops each epoch only if
        # told the epoch; Accelerate's loader does not forward it when its sampler takes set_epoch itself.
        dataset = getattr(train_dataloader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)


class IJepaTrainer(Trainer):
    """``Trainer`` with the official I-JEPA optimisation.

    * AdamW over :func:`~ijepa_hf.training.official_param_groups` of the context encoder and predictor (weight
      decay on weights, none on biases and norms; the frozen target encoder is not optimised);
    * LR: linear warmup ``start_lr -> args.learning_rate`` over ``args.get_warmup_steps(max_steps)``, then cosine
      to ``final_lr``, with the official indexing (the ``k``-th update uses schedule index ``k``);
    * weight decay: cosine ``args.weight_decay -> final_weight_decay`` (:class:`WeightDecayScheduleCallback`);
    * EMA of the target encoder after each update (:class:`EMACallback`);
    * the mask collator's batch counter realigned at every epoch start (:class:`MaskCollatorStepCallback`, added
      when ``data_collator`` has ``set_step``).

    Use ``TrainingArguments(remove_unused_columns=False, ...)``: the collator needs the ``pixel_values`` column.
    The loss is the model's own (smooth-L1 on the predicted target features); gradient accumulation divides it by
    the number of micro-batches as usual.
    """

    def __init__(self, *args: Any, start_lr: float = 2e-4, final_lr: float = 1e-6, final_weight_decay: float = 0.4,
                 ema_momentum: Sequence[float] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.start_lr, self.final_lr = float(start_lr), float(final_lr)
        # The model's forward takes **kwargs only for API compatibility; it returns a mean loss, so the Trainer
        # must scale it for gradient accumulation instead of passing num_items_in_batch.
        self.model_accepts_loss_kwargs = False
        if self.args.device.type == "cpu":
            keep_freed_memory_for_reuse()
        if self.args.torch_compile:
            configure_inductor_for_variable_masks()
        self.add_callback(WeightDecayScheduleCallback(final_weight_decay))
        self.add_callback(EMACallback(ema_momentum))
        if hasattr(self.data_collator, "set_step"):
            self.add_callback(MaskCollatorStepCallback(self.data_collator))
        if self.args.remove_unused_columns:
            logger.warning("IJepaTrainer: remove_unused_columns=True drops the image columns the mask collator "
                           "needs; set remove_unused_columns=False.")

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            ijepa = _unwrap(self.model if model is None else model)
            self.optimizer = build_optimizer(
                {"encoder": ijepa.context_encoder, "predictor": ijepa.predictor}, lr=self.args.learning_rate,
                weight_decay=self.args.weight_decay, betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon,
            )
        return self.optimizer

    def create_scheduler(self, num_training_steps: int,
                         optimizer: torch.optim.Optimizer | None = None) -> torch.optim.lr_scheduler.LRScheduler:
        if self.lr_scheduler is None:
            ref_lr = self.args.learning_rate
            warmup = min(self.args.get_warmup_steps(num_training_steps), num_training_steps)
            total = max(1, num_training_steps)

            def factor(index: int) -> float:
                # LambdaLR's index i is used by update i + 1; the official update k uses schedule index k.
                return warmup_cosine_value(index + 1, warmup, total, self.start_lr, ref_lr, self.final_lr) / ref_lr

            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
            self._created_lr_scheduler = True
        return self.lr_scheduler
