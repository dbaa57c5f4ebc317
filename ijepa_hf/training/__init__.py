"""Training: the official I-JEPA schedules and AdamW groups, the training step, checkpoints, metrics, the
Accelerate loop (:func:`pretrain`) and the ``transformers.Trainer`` integration (:class:`IJepaTrainer`).

Modules, one concept each: ``arguments`` (the run's options and config), ``schedules`` (lr / weight decay / EMA as
functions of the update number), ``optim`` (parameter groups), ``step`` (one training step), ``checkpointing``
(output folder, lock, atomic save), ``resume`` (a checkpoint's loop state, the compatibility check, resuming),
``metrics`` (log schema, collapse statistics, online probe), ``export``
(final model, cards, push), ``preemption`` (signals that stop a run with a checkpoint), ``host_syncs`` (counting
where the host waits for the device), ``recipes`` (official / small), ``kernels`` (kernel choices by measurement),
``distributed`` (FSDP2 / DeepSpeed / per-process masks), ``loop`` (:func:`pretrain`), ``trainer``
(:class:`IJepaTrainer`).
"""

from .cpu_allocator import keep_freed_memory_for_reuse
from .preemption import PREEMPTED_EXIT_CODE, PreemptionHandler, TrainingPreempted
from .optim import build_optimizer, is_no_decay_param, official_param_groups
from .schedules import (
    PretrainingSchedule,
    applies_weight_decay,
    cosine_wd_value,
    ema_momentum_value,
    warmup_cosine_value,
)

__all__ = [
    "PretrainingSchedule",
    "applies_weight_decay",
    "warmup_cosine_value",
    "cosine_wd_value",
    "ema_momentum_value",
    "official_param_groups",
    "build_optimizer",
    "is_no_decay_param",
    "keep_freed_memory_for_reuse",
    "PREEMPTED_EXIT_CODE",
    "PreemptionHandler",
    "TrainingPreempted",
    # imported lazily below (they pull in accelerate / datasets / transformers.Trainer)
    "PretrainingArguments",
    "PretrainingResult",
    "pretrain",
    "parse_args",
    "build_config",
    "build_pretraining_config",
    "PretrainingStep",
    "NonFiniteLossError",
    "IJepaTrainer",
    "EMACallback",
    "WeightDecayScheduleCallback",
    "MaskCollatorStepCallback",
    "OnlineProbeCallback",
    "PreemptionCallback",
    "official_training_arguments",
    "recipe_training_arguments",
    "check_training_arguments",
    "check_mixed_precision",
    "check_batch_arguments",
    "RECIPES",
    "apply_recipe",
    "get_recipe",
    "predictor_size_note",
]

# `import ijepa_hf.training` (schedules, optimizer groups) stays light: the rest loads on first use.
_LAZY = {
    "PretrainingArguments": "arguments",
    "parse_args": "arguments",
    "build_config": "arguments",
    "build_pretraining_config": "arguments",
    "PretrainingResult": "loop",
    "pretrain": "loop",
    "PretrainingStep": "step",
    "NonFiniteLossError": "step",
    "IJepaTrainer": "trainer",
    "EMACallback": "trainer",
    "WeightDecayScheduleCallback": "trainer",
    "MaskCollatorStepCallback": "trainer",
    "OnlineProbeCallback": "trainer",
    "PreemptionCallback": "trainer",
    "recipe_training_arguments": "trainer",
    "RECIPES": "recipes",
    "apply_recipe": "recipes",
    "get_recipe": "recipes",
    "predictor_size_note": "recipes",
    "official_training_arguments": "trainer",
    "check_training_arguments": "trainer",
    "check_mixed_precision": "trainer",
    "check_batch_arguments": "trainer",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
