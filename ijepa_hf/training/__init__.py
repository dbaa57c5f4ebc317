"""Training utilities: the official I-JEPA schedules (lr, weight decay, EMA momentum) and AdamW groups."""

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
]
