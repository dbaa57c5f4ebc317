"""Training utilities: the official I-JEPA schedules (lr, weight decay, EMA momentum) and AdamW groups."""

from .cpu_allocator import keep_freed_memory_for_reuse
from .optim import build_optimizer, is_no_decay_param, official_param_groups
from .schedules import (
    CosineWeightDecay,
    EMAMomentum,
    WarmupCosineLR,
    cosine_wd_value,
    ema_momentum_value,
    warmup_cosine_value,
)

__all__ = [
    "WarmupCosineLR",
    "CosineWeightDecay",
    "EMAMomentum",
    "warmup_cosine_value",
    "cosine_wd_value",
    "ema_momentum_value",
    "official_param_groups",
    "build_optimizer",
    "is_no_decay_param",
    "keep_freed_memory_for_reuse",
    # loop.py (Accelerate pretraining) and trainer.py (transformers.Trainer), imported lazily below
    "PretrainingArguments",
    "PretrainingResult",
    "pretrain",
    "parse_args",
    "IJepaTrainer",
    "EMACallback",
    "WeightDecayScheduleCallback",
    "MaskCollatorStepCallback",
]

# The loop and the Trainer helpers pull in accelerate / datasets / transformers.Trainer: load them on first use so
# that `import ijepa_hf.training` (schedules, optimizer groups) stays light.
_LAZY = {
    "PretrainingArguments": "loop",
    "PretrainingResult": "loop",
    "pretrain": "loop",
    "parse_args": "loop",
    "IJepaTrainer": "trainer",
    "EMACallback": "trainer",
    "WeightDecayScheduleCallback": "trainer",
    "MaskCollatorStepCallback": "trainer",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
