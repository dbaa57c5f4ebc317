"""I-JEPA with ``transformers.Trainer``: :class:`IJepaTrainer` and the callbacks it wires (EMA target encoder,
weight-decay schedule, mask-collator batch counter), and :class:`OnlineProbeCallback` (online k-NN and RankMe).

:class:`IJepaTrainer` honours ``TrainingArguments`` or refuses what it cannot honour — never a silent
reinterpretation:

* ``learning_rate`` is the peak; ``warmup_steps`` the warm-up (below 1: a fraction of the run); ``lr_scheduler_type="cosine"`` is
  the I-JEPA warm-up-cosine, with ``lr_scheduler_kwargs={"start_lr": ..., "final_lr": ...}`` (both 0 by default:
  transformers' cosine; the official recipe uses 2e-4 and 1e-6) and the official indexing (update ``k`` uses
  schedule index ``k``); every other ``lr_scheduler_type`` is transformers' own;
* ``weight_decay`` is the weight decay of the decay groups (the official groups: weights decayed, biases and 1-D
  parameters not); ``IJepaTrainer(final_weight_decay=...)`` turns it into the official cosine ramp (0.04 -> 0.4),
  ``None`` keeps it constant;
* ``optim``: ``adamw_torch`` or ``adamw_torch_fused`` (AdamW over the official groups, with ``adam_beta1/2`` and
  ``adam_epsilon``); other optimizers are refused with an error naming the field;
* ``max_grad_norm`` is the Trainer's (``0`` disables clipping, as the official recipe);
* ``ddp_find_unused_parameters=None`` (the default) means ``False``, as in the Accelerate loop: every trainable
  parameter takes part in each step's loss, so data parallelism needs no search of the autograd graph for unused
  ones (the Trainer's choice for other models); ``True`` is honoured.

:func:`official_training_arguments` returns ``TrainingArguments`` with the official recipe.

Where the hooks sit in transformers 5.24's training step::

    on_pre_optimizer_step  -> weight decay of update k (official: schedules advance before the update)
    optimizer.step()
    on_optimizer_step      -> EMA of the target encoder with the momentum of update k
    lr_scheduler.step(); global_step += 1; on_step_end

During both optimizer hooks ``state.global_step`` is ``k - 1``, so update ``k = state.global_step + 1`` is passed
to the stateless :class:`~ijepa_hf.training.PretrainingSchedule`, and ``trainer.train(resume_from_checkpoint=...)``
needs no extra state.

The input path is the Accelerate loop's, set through ``TrainingArguments``: with an
:class:`~ijepa_hf.data.PretrainImageDataset` and ``dataloader_drop_last=True`` the sampler hands each sample's epoch
and mask index to the workers (:class:`~ijepa_hf.data.EpochShuffleSampler` with keys), so
``dataloader_persistent_workers`` keeps the masks a function of the batch position; ``uint8`` images are finished on
the device (:func:`~ijepa_hf.data.normalize_images`); ``dataloader_pin_memory``, ``dataloader_prefetch_factor`` and
``accelerator_config={"non_blocking": True}`` (set by :func:`official_training_arguments`) keep the copies off the
step's critical path.

Evaluation (``eval_dataset``, ``evaluate()``) gives the prediction loss on held-out images as ``eval_loss``, a function
of the weights alone: it draws its masks from a copy of the data collator that starts at batch 0 for every
evaluation (the training collator's count is left as it was, so evaluating does not change the training), and a
:class:`~ijepa_hf.data.PretrainImageDataset` is read in order with each image's crop and masks picked by its position
(:func:`~ijepa_hf.data.build_validation_data` makes one).

As in the Accelerate loop: a non-finite loss stops the run at the next log row or save with
:class:`~ijepa_hf.training.NonFiniteLossError`, naming the update, unless ``skip_nonfinite_steps`` allows skipping
it, and non-finite weights are never saved; a batch
with no readable image is a zero-weight stand-in; log rows carry the collapse signals, the weight decay and the EMA
momentum.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import has_length

from ..configuration_ijepa_hf import IJepaPretrainingConfig
from ..data import (IMAGENET_MEAN, IMAGENET_STD, LOAD_SECONDS_KEY, EpochShuffleSampler, PretrainImageDataset,
                    normalize_images)
from ..licensing import record_weights_license, weights_license
from ..visualization import plot_training_curves
from .compilation import configure_inductor_for_variable_masks
from .checkpointing import resolve_trainer_checkpoint
from .cpu_allocator import keep_freed_memory_for_reuse
from .distributed import update_target_encoder
from .export import (batch_summary, final_loss_summary, mask_summary, measured_summary, recipe_summary,
                     write_encoder_and_cards)
from .metrics import (COLLAPSE_KEYS, REGULARIZER_KEYS, TRAIN_LOG_NAME, CollapseMonitor, collapse_inputs,
                      collapse_signals, online_probe, regularizer_vector, write_train_log)
from .optim import build_optimizer
from .preemption import DEFAULT_PREEMPTION_SIGNALS, PreemptionHandler, TrainingPreempted, parse_signals
from .recipes import get_recipe, predictor_size_note
from .resume import RunSettingsCallback, check_trainer_resume_compatible, trainer_run_settings
from .schedules import PretrainingSchedule, check_learning_rates
from .step import NonFiniteLossError, dummy_batch_factory, weights_are_finite

logger = logging.getLogger(__name__)

__all__ = ["EMACallback", "WeightDecayScheduleCallback", "MaskCollatorStepCallback", "PreemptionCallback",
           "IJepaTrainer",
           "check_batch_arguments", "check_mixed_precision", "check_training_arguments", "official_training_arguments",
           "recipe_scheduler_kwargs",
           "OFFICIAL_FINAL_WEIGHT_DECAY",
           "TORCH_ADAMW_OPTIMIZERS"]

# Trainer's names of torch's AdamW: the optimisers IJepaTrainer (the official parameter groups) and finetune.py's
# layer-wise groups build.
TORCH_ADAMW_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")
_COSINE_KWARGS = ("start_lr", "final_lr")
OFFICIAL_FINAL_WEIGHT_DECAY = 0.4
# Marks the batch that stands in for one of no readable image (IJepaTrainer._stand_in).
_UNREADABLE_BATCH = "unreadable_batch"


def _unwrap(model: Any) -> Any:
    """The I-JEPA model under DDP / compile wrappers (Trainer passes its unwrapped ``self.model``; be safe)."""
    while not hasattr(model, "update_target_encoder"):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"{type(model).__name__} has no update_target_encoder(): is it an IJepaForPreTraining?")
        model = inner
    return model


def current_update(state: TrainerState) -> int:
    """The 1-based number ``k`` of the update being made, as the stateless schedules count it: during both optimizer
    hooks ``state.global_step`` is still ``k - 1``."""
    return state.global_step + 1


def official_training_arguments(output_dir: str, **overrides: Any) -> TrainingArguments:
    """``TrainingArguments`` of the official I-JEPA recipe: peak lr 1e-3 with the warm-up-cosine 2e-4 -> 1e-3 ->
    1e-6 over a 40/300 warm-up, weight decay 0.04 (pair with ``IJepaTrainer(final_weight_decay=0.4)``), AdamW over
    the official groups, no gradient clipping, image columns kept. ``overrides`` win."""
    values: dict[str, Any] = dict(
        output_dir=output_dir, learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=40 / 300, weight_decay=0.04,
        optim="adamw_torch_fused", max_grad_norm=0.0, remove_unused_columns=False,
        # The official loader drops the last incomplete batch; complete batches also let the sampler key every
        # sample with its mask index (IJepaTrainer._get_train_sampler). Non-blocking copies of pinned batches.
        dataloader_drop_last=True, accelerator_config={"non_blocking": True},
    )
    values.update(overrides)
    values.setdefault("lr_scheduler_kwargs", recipe_scheduler_kwargs(values["lr_scheduler_type"]))
    return TrainingArguments(**values)


def recipe_scheduler_kwargs(lr_scheduler_type: Any) -> dict[str, float]:
    """The official recipe's ``lr_scheduler_kwargs`` for ``lr_scheduler_type``: the I-JEPA cosine's start and end
    learning rates; none for another scheduler (transformers' own take neither)."""
    scheduler = getattr(lr_scheduler_type, "value", lr_scheduler_type)
    return {"start_lr": 2e-4, "final_lr": 1e-6} if scheduler == "cosine" else {}


def recipe_training_arguments(output_dir: str, recipe: str = "official", **overrides: Any) -> TrainingArguments:
    """:func:`official_training_arguments` with the warm-up of ``recipe`` (``ijepa_hf.training.recipes``: the
    ``small`` recipe warms up over a quarter of the run). Pair with ``apply_recipe(config, recipe)`` for the model;
    ``overrides`` win."""
    return official_training_arguments(output_dir, **{"warmup_steps": get_recipe(recipe).warmup_ratio, **overrides})


class EMACallback(TrainerCallback):
    """Update the target encoder after every optimizer step: ``target = m * target + (1 - m) * context``.

    ``m`` follows the official linear schedule from ``start`` to ``end`` over ``state.max_steps`` updates (the first
    update uses ``start``; :meth:`PretrainingSchedule.momentum_at`).

    Args:
        momentum: ``(start, end)``; default: the model config's ``ema_momentum`` (officially ``(0.996, 1.0)``).

    Attributes:
        last_momentum: the momentum of the most recent update (``None`` before the first one).
        skip_next: set by :class:`IJepaTrainer` when it skips an update with a non-finite loss
            (``skip_nonfinite_steps``): the target encoder is left as it is for that update too.
    """

    def __init__(self, momentum: Sequence[float] | None = None) -> None:
        self.momentum = None if momentum is None else (float(momentum[0]), float(momentum[1]))
        self.last_momentum: float | None = None
        self.skip_next = False

    def momentum_at(self, update: int, max_steps: int, model: Any = None) -> float:
        start, end = self.momentum if self.momentum is not None else _unwrap(model).config.ema_momentum
        return PretrainingSchedule(total_steps=max(1, max_steps), ema_start=start, ema_end=end).momentum_at(update)

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          model: Any = None, **kwargs: Any) -> None:
        if self.skip_next:
            self.skip_next = False
            return
        momentum = self.momentum_at(current_update(state), state.max_steps, model)
        # Under DeepSpeed ZeRO-3 the update gathers both encoders (every rank calls it; rank 0 modifies).
        update_target_encoder(_unwrap(model), momentum, is_main_process=state.is_world_process_zero)
        self.last_momentum = momentum


class WeightDecayScheduleCallback(TrainerCallback):
    """The official cosine weight-decay schedule (``weight_decay -> final_weight_decay`` over ``state.max_steps``),
    written into the optimizer's decay groups just before each update.

    Args:
        final_weight_decay: end value (official 0.4).
        weight_decay: start value; default ``args.weight_decay`` (official 0.04).
    """

    def __init__(self, final_weight_decay: float = OFFICIAL_FINAL_WEIGHT_DECAY,
                 weight_decay: float | None = None) -> None:
        self.final_weight_decay = float(final_weight_decay)
        self.weight_decay = weight_decay
        self.last_weight_decay: float | None = None

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              optimizer: Any = None, **kwargs: Any) -> None:
        start = args.weight_decay if self.weight_decay is None else self.weight_decay
        schedule = PretrainingSchedule(total_steps=max(1, state.max_steps), start_weight_decay=start,
                                       final_weight_decay=self.final_weight_decay)
        update = current_update(state)
        schedule.apply(optimizer, update, lr=False)
        self.last_weight_decay = schedule.weight_decay_at(update)


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
        # Position-seeded datasets (ijepa_hf.data.PretrainImageDataset) draw new crops each epoch only if told the
        # epoch; Accelerate's loader does not forward it when its sampler takes set_epoch itself.
        dataset = getattr(train_dataloader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)


class PreemptionCallback(TrainerCallback):
    """Pre-emption for ``Trainer`` (which has none): the first of ``signals`` (default SIGTERM and SIGUSR1) makes
    the Trainer save a checkpoint after the current update and stop; :attr:`preempted` then holds the
    :class:`~ijepa_hf.training.preemption.TrainingPreempted` to raise or turn into
    :data:`~ijepa_hf.training.preemption.PREEMPTED_EXIT_CODE`, and ``trainer.train(resume_from_checkpoint=True)``
    continues from that update. The processes agree after every update on the host (gloo), as the Accelerate loop
    does (:class:`~ijepa_hf.training.preemption.PreemptionHandler`). The handlers are installed for the length of
    ``train()``."""

    def __init__(self, signals: Sequence[str] | str | None = None) -> None:
        self.signals = parse_signals(DEFAULT_PREEMPTION_SIGNALS if signals is None else signals)
        self.handler: Any = None
        self.preempted: Any = None
        self._stopping_at: int | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self.handler = PreemptionHandler.for_this_process(self.signals, args.ddp_timeout).__enter__()
        self.preempted, self._stopping_at = None, None

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> TrainerControl:
        if self.handler is not None and state.global_step < state.max_steps and self.handler.stop_requested():
            control.should_save = True
            control.should_training_stop = True
            self._stopping_at = state.global_step
        return control

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if self.handler is None:
            return
        if self._stopping_at is not None:
            checkpoint = f"{args.output_dir}/checkpoint-{self._stopping_at}"
            self.preempted = TrainingPreempted(self._stopping_at, checkpoint, self.handler.received.name)
        self.handler.__exit__(None, None, None)
        self.handler = None


class OnlineProbeCallback(TrainerCallback):
    """The online learning telemetry of :func:`~ijepa_hf.training.pretrain` for ``IJepaTrainer``: every
    ``every_n_steps`` updates (and at the last), k-NN accuracy and RankMe of the target encoder's pooled features on
    ``probe_set`` (an :class:`~ijepa_hf.data.OnlineProbeSet`, e.g. from
    :func:`~ijepa_hf.data.build_online_probe_set`), logged by the Trainer with its other values (``log_history``,
    TensorBoard and the other ``report_to`` integrations) as ``online_knn_accuracy``, ``online_rankme`` and
    ``online_probe_seconds``. ``seconds`` sums what it cost."""

    def __init__(self, probe_set: Any, every_n_steps: int, k: int = 20) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if k < 1:  # here, not at the first probe a tenth of the run in
            raise ValueError(f"the online probe's k must be >= 1, got {k} (--online_probe_k)")
        self.probe_set, self.every_n_steps, self.k = probe_set, int(every_n_steps), int(k)
        self.pending: dict[str, float] = {}
        self.seconds = 0.0

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: Any = None, **kwargs: Any) -> TrainerControl:
        if state.global_step % self.every_n_steps and state.global_step != state.max_steps:
            return control
        autocast = (lambda: torch.autocast(args.device.type, dtype=torch.bfloat16)) if args.bf16 else None  # noqa: E731
        self.pending = online_probe(_unwrap(model).target_encoder, self.probe_set.pixel_values,
                                    self.probe_set.labels, k=self.k, autocast=autocast)
        self.seconds += self.pending["online_probe_seconds"]
        control.should_log = True
        return control

    def pop(self) -> dict[str, float]:
        values, self.pending = self.pending, {}
        return values


def check_batch_arguments(args: TrainingArguments) -> None:
    """Refuse (``ValueError``) a batch size or accumulation below 1: Trainer would divide by it (a ZeroDivisionError)
    or fail in the data loader once the data and the model were read (any Trainer: finetune.py runs it too)."""
    for name in ("gradient_accumulation_steps", "per_device_train_batch_size", "per_device_eval_batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name} must be a positive integer, got {getattr(args, name)}")


def check_mixed_precision(args: TrainingArguments) -> None:
    """Refuse (``ValueError``) ``fp16`` on CPU: accelerate applies no autocast there, so the run would be fp32's while
    its log and card said fp16 (any Trainer: the fine-tuning script runs this check too)."""
    if args.fp16 and args.device.type == "cpu":
        raise ValueError("fp16 mixed precision is not applied on CPU (the run would be fp32's while the log and the "
                         "card said fp16): use bf16=True, or neither, on CPU")


def check_training_arguments(args: TrainingArguments, final_weight_decay: float | None = None) -> dict[str, float]:
    """Refuse (``ValueError`` naming the field) the ``TrainingArguments`` :class:`IJepaTrainer` cannot honour, as the
    trainer does when it is made; a script calls it before reading any data. Returns the cosine's start/final lr."""
    try:
        return _check_training_arguments(args, final_weight_decay)
    except ValueError as error:
        raise ValueError(f"IJepaTrainer: {error}") from None


def _check_training_arguments(args: TrainingArguments, final_weight_decay: float | None) -> dict[str, float]:
    optim = getattr(args.optim, "value", args.optim)
    if optim not in TORCH_ADAMW_OPTIMIZERS:
        raise ValueError(
            f"optim={optim!r} is not supported; I-JEPA optimises the official AdamW parameter groups "
            f"(weight decay on weights, none on biases and 1-D parameters): use optim='adamw_torch' or "
            "'adamw_torch_fused' (official_training_arguments() sets the official recipe)")
    if args.optim_args:
        raise ValueError(f"optim_args={args.optim_args!r} is not supported; AdamW takes adam_beta1, adam_beta2 and "
                         "adam_epsilon")
    check_mixed_precision(args)
    check_batch_arguments(args)
    # Options for labels or language models: I-JEPA's loss has no labels and its model no token embeddings
    if args.label_smoothing_factor:  # Trainer would ignore it without a word
        raise ValueError(f"label_smoothing_factor={args.label_smoothing_factor} smooths classification labels; "
                         "I-JEPA's loss has none: leave it at 0")
    if args.neftune_noise_alpha is not None:
        raise ValueError(f"neftune_noise_alpha={args.neftune_noise_alpha} adds noise to a language model's token "
                         "embeddings; I-JEPA's encoder has none: leave it out")
    if args.use_liger_kernel:
        raise ValueError("use_liger_kernel patches language models' layers (Liger kernels); it does not apply to "
                         "I-JEPA: leave it out")
    if not (args.weight_decay >= 0 and math.isfinite(args.weight_decay)):  # torch checks its default, not our groups
        raise ValueError(f"weight_decay must be a finite number >= 0, got {args.weight_decay}")
    if final_weight_decay is not None and (final_weight_decay < 0 or not math.isfinite(final_weight_decay)):
        raise ValueError(f"final_weight_decay must be a finite number >= 0, got {final_weight_decay}")
    scheduler = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    kwargs = dict(args.lr_scheduler_kwargs or {})
    if scheduler != "cosine":
        ours = sorted(set(kwargs) & set(_COSINE_KWARGS))
        if ours:  # transformers' own schedulers would stop the run at its start with a TypeError
            raise ValueError(f"lr_scheduler_kwargs {ours} are options of the I-JEPA cosine (lr_scheduler_type="
                             f"'cosine'), not of {scheduler!r}: leave them out, or use the cosine")
        return {}
    unknown = sorted(set(kwargs) - set(_COSINE_KWARGS))
    if unknown:
        raise ValueError(f"lr_scheduler_kwargs {unknown} are not options of the I-JEPA cosine; it takes "
                         f"{list(_COSINE_KWARGS)} (official: start_lr=2e-4, final_lr=1e-6)")
    cosine = {"start_lr": float(kwargs.get("start_lr", 0.0)), "final_lr": float(kwargs.get("final_lr", 0.0))}
    check_learning_rates(cosine["start_lr"], args.learning_rate, cosine["final_lr"],
                         names=("lr_scheduler_kwargs start_lr", "learning_rate", "lr_scheduler_kwargs final_lr"))
    return cosine


def _no_unused_parameter_search(args: TrainingArguments | None) -> TrainingArguments:
    """``args`` (the Trainer's default when ``None``) with ``ddp_find_unused_parameters=None`` resolved to ``False``.

    The Trainer resolves ``None`` to ``True`` for a model without activation checkpointing: under data parallelism
    DDP then walks the autograd graph after every forward for parameters without a gradient, and warns on every
    process that it found none. I-JEPA's loss uses every trainable parameter at every step (a batch of no readable
    image through its zero-weight stand-in too). A copy, so the caller's object is left as given."""
    if args is None:
        return _no_unused_parameter_search(TrainingArguments(output_dir="tmp_trainer"))  # the Trainer's default
    if args.ddp_find_unused_parameters is not None:
        return args
    resolved = copy.copy(args)
    resolved.ddp_find_unused_parameters = False
    return resolved


class IJepaTrainer(Trainer):
    """``Trainer`` for I-JEPA pretraining (see the module docstring for how ``TrainingArguments`` are honoured).

    Adds :class:`EMACallback`, :class:`WeightDecayScheduleCallback` (when ``final_weight_decay`` is given) and
    :class:`MaskCollatorStepCallback` (when ``data_collator`` has ``set_step``). The loss is the model's own
    (smooth-L1 on the predicted target features); gradient accumulation divides it by the number of micro-batches.

    Args:
        final_weight_decay: end of the cosine weight-decay ramp from ``args.weight_decay`` (official 0.4);
            ``None``: constant ``args.weight_decay``.
        ema_momentum: ``(start, end)`` of the EMA; default the model config's.
        collapse_threshold, collapse_max_cosine: when a log row warns of collapse (the pooled target features' std
            below, or their mean pairwise cosine above), as ``pretrain``'s options of the same names.
        data_fingerprint: what identifies the training images (``PretrainingData.fingerprint()``): recorded in the
            checkpoints, so that resuming on other images is refused, as in ``pretrain``; ``None``: not checked.
        skip_nonfinite_steps: how many updates with a non-finite loss to skip (no optimizer step, no EMA; the
            learning-rate schedule moves on) before stopping with :class:`~ijepa_hf.training.NonFiniteLossError`, as
            ``pretrain``'s option; ``0`` (default) stops at the next log row. ``> 0`` syncs with the host at every
            update. Under fp16 the gradient scaler skips the optimizer step (and holds the schedule) itself.

    Attributes:
        skipped_updates: how many updates this process's run skipped (``skip_nonfinite_steps``).
    """

    def __init__(self, model: Any = None, args: TrainingArguments | None = None, *trainer_args: Any,
                 final_weight_decay: float | None = None, ema_momentum: Sequence[float] | None = None,
                 collapse_threshold: float = 0.01, collapse_max_cosine: float = 0.999,
                 data_fingerprint: dict[str, Any] | None = None, skip_nonfinite_steps: int = 0,
                 **kwargs: Any) -> None:
        if isinstance(skip_nonfinite_steps, bool) or not isinstance(skip_nonfinite_steps, int) \
                or skip_nonfinite_steps < 0:
            raise ValueError(f"IJepaTrainer: skip_nonfinite_steps must be an integer >= 0, got "
                             f"{skip_nonfinite_steps!r}")
        # Before Trainer's own set-up, which stops with a traceback on some of them (NEFTune, Liger)
        cosine = check_training_arguments(args, final_weight_decay) if args is not None else None
        super().__init__(model, _no_unused_parameter_search(args), *trainer_args, **kwargs)
        if skip_nonfinite_steps and self.is_deepspeed_enabled:
            raise ValueError("IJepaTrainer: skip_nonfinite_steps is not supported with DeepSpeed (its engine steps the "
                             "optimizer itself); set it to 0")
        self.skip_nonfinite_steps = skip_nonfinite_steps
        self.skipped_updates = 0
        self._dummy_batch: Any = None  # makes the stand-in for a batch of no readable image (_stand_in)
        self._batch_counts = [0, 0]  # training batches with a readable image / without one, in this process
        self._readable_checked = False  # whether a process has read an image in the first epoch's worth of batches
        self._first_nonfinite = torch.zeros((), dtype=torch.long)  # first update with a non-finite loss (0: none)
        # collapse_inputs() of the last batch with an image since the last log row, kept on the device (the signals
        # are computed when a row is written: whatever asks for one, logging_steps, an epoch's end or a callback)
        self._collapse_inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self._collapse_monitor = CollapseMonitor(min_std=collapse_threshold, max_cosine=collapse_max_cosine)
        self._term_sums: torch.Tensor | None = None  # the regulariser's terms summed since the last log row
        self._term_count = 0
        self._cosine = cosine if cosine is not None else check_training_arguments(self.args, final_weight_decay)
        self._final_weight_decay = final_weight_decay
        self._settings = RunSettingsCallback({**self._run_settings(final_weight_decay, ema_momentum),
                                              **({"data": data_fingerprint} if data_fingerprint else {})})
        self.add_callback(self._settings)
        # The model's forward takes **kwargs only for API compatibility; it returns a mean loss, so the Trainer
        # must scale it for gradient accumulation instead of passing num_items_in_batch.
        self.model_accepts_loss_kwargs = False
        if self.args.device.type == "cpu":
            keep_freed_memory_for_reuse()
        if self.args.torch_compile:
            configure_inductor_for_variable_masks()
        if final_weight_decay is not None:
            self.add_callback(WeightDecayScheduleCallback(final_weight_decay))
        self._ema = EMACallback(ema_momentum)
        self.add_callback(self._ema)
        if hasattr(self.data_collator, "set_step"):
            self.add_callback(MaskCollatorStepCallback(self.data_collator))
        config = getattr(self.model, "config", None)  # Trainer wraps the model later, in train()
        predictor_note = predictor_size_note(config) if isinstance(config, IJepaPretrainingConfig) else None
        if predictor_note:
            logger.warning(predictor_note)
        columns = getattr(self.train_dataset, "column_names", None)
        if self.args.remove_unused_columns and columns is not None and "pixel_values" not in columns:
            # Only a datasets.Dataset has its columns removed, and the model's signature keeps pixel_values.
            logger.warning("IJepaTrainer: remove_unused_columns=True drops the columns %s the mask collator reads; "
                           "set remove_unused_columns=False.", columns)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's, resuming only what can be continued exactly: ``True`` is the newest complete checkpoint of
        ``output_dir`` (folders a kill cut short during their save are skipped, naming them); a checkpoint cut short,
        of the weights only (``save_only_model``), or trained under other settings is refused, naming why
        (:func:`~ijepa_hf.training.checkpointing.resolve_trainer_checkpoint`,
        :func:`~ijepa_hf.training.resume.check_trainer_resume_compatible`). Images fewer than one global batch
        are refused under ``dataloader_drop_last`` (the loader would be empty and the run end after no update)."""
        if self.args.dataloader_drop_last and self._complete_batches_per_epoch() == 0:
            raise ValueError(f"{len(self.train_dataset)} images are fewer than one global batch "
                             f"({self._train_batch_size} x {self.args.world_size} processes), which "
                             "dataloader_drop_last drops: nothing would be trained; lower per_device_train_batch_size "
                             "or add data")
        if resume_from_checkpoint is True:
            resume_from_checkpoint = resolve_trainer_checkpoint("latest", self.args.output_dir)
            if resume_from_checkpoint is None:  # the Trainer's own message
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        elif isinstance(resume_from_checkpoint, (str, os.PathLike)):
            resume_from_checkpoint = resolve_trainer_checkpoint(str(resume_from_checkpoint), self.args.output_dir)
        if resume_from_checkpoint:
            self.check_resume(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def check_resume(self, checkpoint: str | os.PathLike) -> None:
        """Refuse (``ValueError`` naming every difference) to continue ``checkpoint`` under this trainer's settings
        and model config: what ``train(resume_from_checkpoint=...)`` checks first, for an output-folder policy to
        run before it moves anything (``ijepa_hf.scripts.trainer_run_folder``'s ``check_resume``)."""
        check_trainer_resume_compatible(checkpoint, self._settings.settings, _unwrap(self.model).config)

    def _run_settings(self, final_weight_decay: float | None, ema_momentum: Sequence[float] | None
                      ) -> dict[str, Any]:
        """What defines the run beyond the model config (which the checkpoint's config.json holds): the Trainer's
        (:func:`~ijepa_hf.training.resume.trainer_run_settings`), the weight-decay ramp and EMA, and the random
        crop of a training set that says which it draws (the package's pretraining datasets)."""
        crop = getattr(self.train_dataset, "crop_scale", None)
        return {**trainer_run_settings(self.args), "final_weight_decay": final_weight_decay,
                "ema_momentum": None if ema_momentum is None else [float(m) for m in ema_momentum],
                **({} if crop is None else {"crop_scale": [float(c) for c in crop]})}

    def save_run(self, *, data_description: str, hub_dataset: str | None = None, source: str | None = None
                 ) -> Path | None:
        """Save what :func:`~ijepa_hf.training.pretrain` publishes into ``args.output_dir``: the pretraining model
        (``save_model``), the target encoder in ``encoder/`` with its image processor, both model cards (licence and
        base model of the weights, the recipe; ``data_description`` / ``hub_dataset`` name the data, ``source``
        where the weights were continued from), ``train_log.jsonl`` (the Trainer's log history) and
        ``training_curves.png``. ``ijepa_hf.training.export.push_output_dir`` uploads the folder as ``pretrain()``
        does. Every process calls it; the main one writes. Returns the encoder folder (``None`` elsewhere)."""
        model = _unwrap(self.model)
        weights = weights_license(model, source=source)
        record_weights_license(model, *weights)  # before save_model, so that the saved config carries it
        self.save_model()
        if not self.is_world_process_zero():
            return None
        output_dir = Path(self.args.output_dir)
        rows = [row for row in self.state.log_history
                if "loss" in row or "eval_loss" in row or "online_knn_accuracy" in row]
        write_train_log(output_dir / TRAIN_LOG_NAME, rows)
        args, config = self.args, model.config
        precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "no"
        training = {
            "data": data_description,
            "image_size": config.encoder_config.image_size,
            "trainer": f"transformers.Trainer ({type(self).__name__})",
            "steps": f"{self.state.global_step} of {self.state.max_steps}",
            "batch_size": batch_summary(args.per_device_train_batch_size, args.world_size,
                                        args.gradient_accumulation_steps),
            "masks": mask_summary(config),
            **self._recipe_summary(),
            "mixed_precision": precision,
            "seed": args.seed,
            "final_loss": final_loss_summary(self.state.log_history),
            **measured_summary(rows),
        }
        encoder_dir = write_encoder_and_cards(model, model.export_encoder("target"), output_dir,
                                              name=args.hub_model_id or output_dir.name, weights=weights,
                                              training=training, hub_dataset=hub_dataset)
        if rows:
            try:
                plot_training_curves(rows, output_dir / "training_curves.png", title=f"{output_dir.name} (Trainer)")
            except (ValueError, ImportError) as error:  # a log without curves to draw must not fail the save
                logger.warning("Could not draw the training curves: %s", error)
        return encoder_dir

    def _recipe_summary(self) -> dict[str, Any]:
        """The card's recipe rows (``ijepa_hf.training.export.recipe_summary``, as ``pretrain()`` writes them): the
        schedules this trainer ran, the crop when the training set says which it draws."""
        args, model = self.args, _unwrap(self.model)
        total = max(1, self.state.max_steps)
        start_wd = args.weight_decay
        ema_start, ema_end = self._ema.momentum if self._ema.momentum is not None else model.config.ema_momentum
        schedule = PretrainingSchedule(
            total_steps=total, warmup_steps=min(total, args.get_warmup_steps(total)),
            start_lr=self._cosine.get("start_lr", 0.0), peak_lr=args.learning_rate,
            final_lr=self._cosine.get("final_lr", 0.0), start_weight_decay=start_wd,
            final_weight_decay=start_wd if self._final_weight_decay is None else self._final_weight_decay,
            ema_start=ema_start, ema_end=ema_end)
        scheduler = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
        other = None if self._cosine else (f"transformers' {scheduler}, peak {args.learning_rate:g}, warm-up over "
                                           f"{schedule.warmup_steps} steps")
        return recipe_summary(schedule, crop_scale=getattr(self.train_dataset, "crop_scale", None),
                              betas=(args.adam_beta1, args.adam_beta2), max_grad_norm=args.max_grad_norm,
                              lr_schedule=other)

    def _keyed_samples(self, dataset: Any) -> bool:
        """Whether ``dataset`` takes :class:`~ijepa_hf.data.SampleKey` s from the sampler (see the module docstring)."""
        return isinstance(dataset, PretrainImageDataset) and self.args.dataloader_drop_last

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if not self._keyed_samples(dataset):
            if self.args.dataloader_persistent_workers and self.args.dataloader_num_workers > 0:
                logger.warning("IJepaTrainer: dataloader_persistent_workers with a dataset that takes no sample keys "
                               "(an ijepa_hf PretrainImageDataset with dataloader_drop_last=True does): the workers' "
                               "mask counters are not realigned at epoch starts, so the masks of a resumed run differ "
                               "from an uninterrupted one.")
            return super()._get_train_sampler(train_dataset)
        return EpochShuffleSampler(len(dataset), self.args.seed, batch_size=self._train_batch_size,
                                   num_processes=self.args.world_size)

    def _get_eval_sampler(self, eval_dataset: Any) -> Any:
        if not self._keyed_samples(eval_dataset):
            return super()._get_eval_sampler(eval_dataset)
        return EpochShuffleSampler(len(eval_dataset), self.args.seed, batch_size=self.args.eval_batch_size,
                                   num_processes=self.args.world_size, shuffle=False)

    def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
        """The Trainer's, collated by a copy of the data collator set to batch 0 (see the module docstring)."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(dataset, str):  # one of several named sets (Trainer.evaluate calls back once per name)
            dataset = self.eval_dataset[dataset]
        if (self.args.dataloader_persistent_workers and self.args.dataloader_num_workers > 0
                and not self._keyed_samples(dataset)):
            logger.warning("IJepaTrainer: dataloader_persistent_workers with an eval_dataset that takes no sample "
                           "keys: the kept workers' mask counters go on counting, so each evaluation draws other "
                           "masks (an ijepa_hf PretrainImageDataset, e.g. from build_validation_data, does not).")
        training_collator = self.data_collator
        self.data_collator = copy.deepcopy(training_collator)
        if hasattr(self.data_collator, "set_step"):
            self.data_collator.set_step(0)
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = training_collator

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The Trainer's (onto the device), then ``uint8`` images finished there with the dataset's statistics."""
        inputs = super()._prepare_inputs(inputs)
        inputs.pop(LOAD_SECONDS_KEY, None)
        pixels = inputs.get("pixel_values")
        if isinstance(pixels, torch.Tensor) and not pixels.is_floating_point():
            inputs["pixel_values"] = normalize_images(pixels, *self._image_statistics())
        return inputs

    def _image_statistics(self) -> tuple[Sequence[float], Sequence[float]]:
        """Mean and std of the training images' normalisation: the dataset's, else the image processor's, else
        ImageNet's (the official recipe's)."""
        statistics = getattr(self.train_dataset, "image_statistics", None)
        if statistics is not None:
            return statistics
        processor = self.processing_class
        if getattr(processor, "image_mean", None) is not None and getattr(processor, "image_std", None) is not None:
            return processor.image_mean, processor.image_std
        return IMAGENET_MEAN, IMAGENET_STD

    def _stand_in(self) -> dict[str, Any]:
        """The batch that replaces one whose images were all unreadable (the collator gives ``None`` for it): a
        one-image batch of zeros with the run's mask geometry (:func:`~ijepa_hf.training.step.dummy_batch_factory`),
        marked so that :meth:`compute_loss` weighs it 0 in training and leaves it out of evaluation."""
        if self._dummy_batch is None:
            collator = getattr(self.data_collator, "mask_collator", self.data_collator)
            if not hasattr(collator, "sample_batch"):
                raise ValueError("IJepaTrainer: a batch without a readable image came from a data_collator without "
                                 "masks to stand in for it; use ijepa_hf.data.MaskedBatchCollator(IJepaMaskCollator)")
            self._dummy_batch = dummy_batch_factory(collator, _unwrap(self.model).config)
        return {**self._dummy_batch(), _UNREADABLE_BATCH: True}

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> Any:
        """The Trainer's, with a training batch of no readable image replaced by :meth:`_stand_in`: a zero-weight
        update keeps the run (and data-parallel ranks) going, as the Accelerate loop's step does. A whole epoch's
        worth of batches without a readable image in any process stops the run, naming the data, as the loop does
        (:meth:`_require_a_readable_image`)."""
        def readable() -> Any:
            for batch in epoch_iterator:
                self._batch_counts[batch is None] += 1
                self._require_a_readable_image()
                yield self._stand_in() if batch is None else batch

        return super().get_batch_samples(readable(), num_batches, device)

    def _complete_batches_per_epoch(self) -> int | None:
        """The training data's complete global batches (each process's batch times the processes); ``None`` for data
        of no length."""
        dataset = self.train_dataset
        return len(dataset) // (self._train_batch_size * self.args.world_size) if has_length(dataset) else None

    def _require_a_readable_image(self) -> None:
        """Once every process has taken an epoch's worth of batches (all at the same update), stop the run when none
        of them has read an image. A process without one trains on with zero-weight updates beside the others, as in
        the Accelerate loop: stopping it alone would leave the others waiting in the next gradient all-reduce."""
        if self._readable_checked:  # once per run: every batch passes here
            return
        per_epoch = self._complete_batches_per_epoch()
        if per_epoch is None or sum(self._batch_counts) < max(1, per_epoch):
            return
        dataset = self.train_dataset
        self._readable_checked = True
        readable = torch.tensor([self._batch_counts[0]], device=self.args.device)
        if self.args.world_size > 1:
            readable = self.accelerator.reduce(readable, "sum")
        if readable.item() == 0:
            raise RuntimeError(f"the training data ({type(dataset).__name__} of {len(dataset)} rows) yielded no "
                               f"readable image in a whole epoch ({self._batch_counts[1]} batches in each process): "
                               "check the data and its image column")

    def prediction_step(self, model: Any, inputs: dict[str, Any] | None, prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> Any:
        """The Trainer's, with a held-out batch of no readable image replaced by :meth:`_stand_in`."""
        return super().prediction_step(model, self._stand_in() if inputs is None else inputs, prediction_loss_only,
                                       ignore_keys=ignore_keys)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """The model's loss; a regularised model's terms (`REGULARIZER_KEYS`) are kept on the device for the next
        log row. A stand-in batch (:meth:`_stand_in`) weighs 0 in training; in evaluation its loss is NaN, which the
        Trainer leaves out of ``eval_loss`` (``logging_nan_inf_filter``, on by default), so the batch is skipped as the
        Accelerate loop skips it (with the filter off, ``eval_loss`` is NaN)."""
        stand_in = inputs.pop(_UNREADABLE_BATCH, False)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:  # on the device: read at log rows and saves (_check_finite), no sync per step
            first = self._first_nonfinite.to(loss.device)
            self._first_nonfinite = torch.where((first == 0) & ~torch.isfinite(loss.detach()),
                                                self.state.global_step + 1, first)
        if stand_in:
            if not model.training:
                logger.warning("IJepaTrainer: a held-out batch had no readable image (the files are named above): "
                               "left out of this evaluation's eval_loss%s", "" if self.args.logging_nan_inf_filter
                               else ", which is NaN with logging_nan_inf_filter=False")
            loss = loss * (0.0 if model.training else float("nan"))
            return (loss, outputs) if return_outputs else loss
        if model.training:
            self._collapse_inputs = collapse_inputs(outputs)
        if model.training and isinstance(outputs, dict) and outputs.get("prediction_loss") is not None:
            terms = regularizer_vector(outputs)
            self._term_sums = terms if self._term_sums is None else self._term_sums + terms
            self._term_count += 1
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """The Trainer's; with ``skip_nonfinite_steps``, the last micro-batch of an update whose loss was non-finite
        on any process leaves the update out (:meth:`_skip_update`)."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.skip_nonfinite_steps and self.accelerator.sync_gradients:
            first = int(self.accelerator.reduce(self._first_nonfinite.to(self.args.device), "max"))  # the sync
            if first:
                self._skip_update(model, first)
        return loss

    def _skip_update(self, model: Any, update: int) -> None:
        """Leave out update ``update`` (its loss was non-finite): with no gradient, AdamW steps no parameter (and
        under fp16 the gradient scaler skips the step for the NaN gradients itself); no EMA. One update more than
        ``skip_nonfinite_steps`` allows stops the run."""
        self.skipped_updates += 1
        if self.skipped_updates > self.skip_nonfinite_steps:
            lr = self.lr_scheduler.get_last_lr()[0] if self.lr_scheduler is not None else self.args.learning_rate
            raise NonFiniteLossError(update, lr, ", one non-finite step more than skip_nonfinite_steps="
                                                 f"{self.skip_nonfinite_steps} allows")
        if self.accelerator.scaler is None:
            model.zero_grad(set_to_none=True)
        self._ema.skip_next = True
        self._first_nonfinite = torch.zeros_like(self._first_nonfinite)
        self._collapse_inputs = None  # the skipped batch's features are no signal of the weights
        logger.warning("IJepaTrainer: update %d had a non-finite loss: skipped (no optimizer step, no EMA); %d of "
                       "skip_nonfinite_steps=%d", update, self.skipped_updates, self.skip_nonfinite_steps)

    def _mean_over_processes(self, sums: torch.Tensor | None, count: int, size: int) -> list[float] | None:
        """``sums`` (``[size]``, over ``count`` batches of this process) averaged over every process's batches, or
        ``None`` when no process had one. Every process joins the collective, also one whose batches since the last
        row had no readable image (``sums=None``): a process that skipped it would leave the others waiting."""
        mine = torch.zeros(size + 1, device=self.args.device)
        if sums is not None:
            mine[:size], mine[size] = sums.to(mine.device), count
        total = self.accelerator.reduce(mine, "sum").tolist()
        return None if total[size] == 0 else [value / total[size] for value in total[:size]]

    def _pop_regularizer_terms(self) -> dict[str, float]:
        """The means of the regulariser's terms since the last log row, over micro-batches and processes."""
        means = self._mean_over_processes(self._term_sums, self._term_count, len(REGULARIZER_KEYS))
        self._term_sums, self._term_count = None, 0
        return {} if means is None else {k: v for k, v in zip(REGULARIZER_KEYS, means) if not math.isnan(v)}

    def _schedule_values(self) -> dict[str, float]:
        """The loop's schedule keys beside Trainer's ``learning_rate``: the decay groups' weight decay and the EMA
        momentum of the last update."""
        values = {}
        if self.optimizer is not None:
            values["weight_decay"] = max(group["weight_decay"] for group in self.optimizer.param_groups)
        ema = next((c for c in self.callback_handler.callbacks if isinstance(c, EMACallback)), None)
        if ema is not None and ema.last_momentum is not None:
            values["momentum"] = ema.last_momentum
        return values

    def _pop_collapse_statistics(self) -> dict[str, float]:
        """The collapse signals of each process's last batch since the last log row, averaged over processes (NaN
        where undefined)."""
        signals = None if self._collapse_inputs is None else collapse_signals(*self._collapse_inputs)
        means = self._mean_over_processes(signals, 1, len(COLLAPSE_KEYS))
        self._collapse_inputs = None
        return {} if means is None else dict(zip(COLLAPSE_KEYS, means))

    def _check_finite(self, weights: bool = False) -> None:
        """Raise :class:`~ijepa_hf.training.NonFiniteLossError` naming the first update with a non-finite loss on any
        process (recorded on the device by :meth:`compute_loss`, read here: at log rows and saves, as the Accelerate
        loop does); ``weights``: the model's weights must be finite too. Every process calls it."""
        flags = torch.stack([self._first_nonfinite.to(self.args.device),
                             torch.tensor(0 if not weights or weights_are_finite(self.model) else 1,
                                          device=self.args.device)])
        first, bad_weights = (int(v) for v in self.accelerator.reduce(flags, "max").tolist())
        if first or bad_weights:
            step = first or self.state.global_step
            lr = self.lr_scheduler.get_last_lr()[0] if self.lr_scheduler is not None else self.args.learning_rate
            raise NonFiniteLossError(step, lr, "" if first else ": the weights are no longer finite",
                                     can_skip=bool(first))  # the option's name in pretrain_trainer.py too

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # Trainer's checkpoints start with save_model too: no checkpoint or final model is saved non-finite.
        self._check_finite(weights=True)
        super().save_model(output_dir, _internal_call)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's log, with the regulariser's terms (if the model has one on) and the values of an
        :class:`OnlineProbeCallback` that ran since the last one."""
        if "loss" in logs:
            self._check_finite()  # Trainer's logging_nan_inf_filter would show a NaN loss as a finite one
            logs.update(self._pop_regularizer_terms())
            logs.update(self._pop_collapse_statistics())
            logs.update(self._schedule_values())
            self._collapse_monitor.check({"step": self.state.global_step, **logs})
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, OnlineProbeCallback):
                logs.update(callback.pop())
        super().log(logs, *args, **kwargs)

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            ijepa = _unwrap(self.model if model is None else model)
            optim = getattr(self.args.optim, "value", self.args.optim)
            self.optimizer = build_optimizer(
                ijepa, lr=self.args.learning_rate,
                weight_decay=self.args.weight_decay, betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon, fused=optim == "adamw_torch_fused", foreach=None,
            )
        return self.optimizer

    def create_scheduler(self, num_training_steps: int,
                         optimizer: torch.optim.Optimizer | None = None) -> torch.optim.lr_scheduler.LRScheduler:
        warmup = self.args.get_warmup_steps(num_training_steps)
        if self.lr_scheduler is None and warmup > num_training_steps:
            raise ValueError(f"IJepaTrainer: warmup_steps {warmup} is longer than the run ({num_training_steps} steps): "
                             "the learning rate would never reach its peak; lower it, or give a fraction of the run "
                             "(warmup_steps < 1)")
        if self.lr_scheduler is None and self._cosine:
            peak = self.args.learning_rate
            schedule = PretrainingSchedule(
                total_steps=max(1, num_training_steps), warmup_steps=warmup,
                start_lr=self._cosine["start_lr"], peak_lr=peak, final_lr=self._cosine["final_lr"])

            def factor(index: int) -> float:
                # LambdaLR's value after `index` scheduler steps is used by update index + 1.
                return schedule.lr_at(index + 1) / peak if peak > 0 else 0.0

            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
            self._created_lr_scheduler = True
            return self.lr_scheduler
        return super().create_scheduler(num_training_steps, optimizer)
