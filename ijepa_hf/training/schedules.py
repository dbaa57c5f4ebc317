"""The official I-JEPA schedules — learning rate, weight decay, EMA momentum — as values of an explicit update number.

Schedules hold no state (timm's rule): the caller tracks how many optimizer updates it has made and asks for the
values of the next one. That makes resuming trivial (nothing to checkpoint but the update count) and keeps the
official indexing in exactly one function per schedule:

* update ``k`` (1-based, ``k = 1 .. T``) uses **learning-rate and weight-decay index** ``k``: the official loop
  calls ``scheduler.step()`` and ``wd_scheduler.step()`` *before* the optimizer step, so the very first update
  already uses index 1, and the last one index ``T`` (the final value);
* update ``k`` uses **EMA-momentum index** ``k - 1``: the official generator yields ``T + 1`` values, the loop takes
  ``next(momentum_scheduler)`` *after* the optimizer step, so the first EMA uses the start value (0.996) and the
  last one index ``T - 1``.

Formulas (``i`` = schedule index, ``W`` = warm-up steps, ``T`` = total steps):

* LR: ``i < W``: ``start + i / W * (peak - start)``; else with ``p = (i - W) / max(1, T - W)``:
  ``max(final, final + (peak - final) * 0.5 * (1 + cos(pi * p)))``.
* WD: ``p = i / T``; ``final + (start - final) * 0.5 * (1 + cos(pi * p))``, clamped at ``final`` on the side it
  approaches (official 0.04 -> 0.4, an increase).
* EMA: ``start + i * (end - start) / T``.

One deviation, beyond the last update only: ``p`` is clamped to ``[0, 1]``, so past ``T`` the values stay at their
final values (the official cosine would turn back up, which it never reaches because the run stops at ``T``).

Use::

    schedule = PretrainingSchedule(total_steps=T, warmup_steps=W)
    for update in range(1, T + 1):
        schedule.apply(optimizer, update)     # lr and weight decay of this update, before optimizer.step()
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        model.update_target_encoder(schedule.momentum_at(update))
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = [
    "PretrainingSchedule",
    "check_learning_rates",
    "warmup_cosine_value",
    "cosine_wd_value",
    "ema_momentum_value",
    "applies_weight_decay",
]


def check_learning_rates(start_lr: float, peak_lr: float, final_lr: float,
                         names: tuple[str, str, str] = ("start_lr", "peak_lr", "final_lr")) -> None:
    """Refuse (``ValueError``, the values called by ``names``) a warm-up start or a cosine end above the peak: the
    warm-up would go down, or the cosine up. The rule of every path that runs these schedules."""
    start, peak, final = names
    if start_lr > peak_lr:
        raise ValueError(f"{start}={start_lr:g} is above {peak}={peak_lr:g} (the peak): the warm-up would go down. "
                         f"Lower {start} (official: 2e-4 for the peak 1e-3) or raise {peak}")
    if final_lr > peak_lr:
        raise ValueError(f"{final}={final_lr:g} is above {peak}={peak_lr:g} (the peak): the cosine would go up. "
                         f"Lower {final} (official 1e-6) or raise {peak}")


def warmup_cosine_value(
    index: int, warmup_steps: int, total_steps: int, start_lr: float, peak_lr: float, final_lr: float
) -> float:
    """Learning rate at schedule *index* ``index`` (see the module docstring for which index an update uses)."""
    if index < warmup_steps:
        return start_lr + (index / warmup_steps) * (peak_lr - start_lr)
    progress = min(1.0, (index - warmup_steps) / max(1, total_steps - warmup_steps))
    return max(final_lr, final_lr + (peak_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def cosine_wd_value(index: int, total_steps: int, start_wd: float, final_wd: float) -> float:
    """Weight decay at schedule index ``index``."""
    progress = min(1.0, index / max(1, total_steps))
    wd = final_wd + (start_wd - final_wd) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # Clamp on the side of final_wd (the official code clamps in whichever direction it moves).
    return max(final_wd, wd) if final_wd <= start_wd else min(final_wd, wd)


def ema_momentum_value(index: int, total_steps: int, start: float, end: float) -> float:
    """EMA momentum at schedule index ``index``: linear from ``start`` (index 0) to ``end`` (index ``T``)."""
    index = min(max(index, 0), total_steps)
    return start + index * (end - start) / max(1, total_steps)


def applies_weight_decay(group: Mapping[str, Any]) -> bool:
    """Whether the weight-decay schedule writes into this param group.

    Groups made by :func:`~ijepa_hf.training.official_param_groups` carry ``WD_exclude=True`` on their no-decay
    half (the official flag); optimizers built elsewhere mark no flag, and their groups created with weight decay
    0 (biases and norms, transformers' convention) are left alone too.
    """
    if "WD_exclude" in group:
        return not group["WD_exclude"]
    return group.get("weight_decay", 0.0) != 0.0


@dataclass(frozen=True)
class PretrainingSchedule:
    """The three official schedules of one run, as pure functions of the 1-based optimizer update number.

    Args:
        total_steps: ``T``, the optimizer updates of the run (the official ``ipe * epochs * ipe_scale``).
        warmup_steps: linear warm-up length ``W`` (``0 <= W <= T``).
        start_lr, peak_lr, final_lr: warm-up start, peak (the official ``ref_lr``) and cosine end.
        start_weight_decay, final_weight_decay: cosine weight decay (official 0.04 -> 0.4; equal values: constant).
        ema_start, ema_end: linear EMA momentum of the target encoder (official 0.996 -> 1.0).
    """

    total_steps: int
    warmup_steps: int = 0
    start_lr: float = 2e-4
    peak_lr: float = 1e-3
    final_lr: float = 1e-6
    start_weight_decay: float = 0.04
    final_weight_decay: float = 0.4
    ema_start: float = 0.996
    ema_end: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.total_steps, bool) or int(self.total_steps) != self.total_steps or self.total_steps < 1:
            raise ValueError(f"total_steps must be an integer >= 1, got {self.total_steps!r}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={self.total_steps}], got {self.warmup_steps}")
        for name in ("start_lr", "peak_lr", "final_lr", "start_weight_decay", "final_weight_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        check_learning_rates(self.start_lr, self.peak_lr, self.final_lr)
        if not 0.0 <= self.ema_start <= self.ema_end <= 1.0:
            raise ValueError(f"EMA momentum must satisfy 0 <= start <= end <= 1, got ({self.ema_start}, "
                             f"{self.ema_end})")

    def _check(self, update: int) -> int:
        if isinstance(update, bool) or int(update) != update or update < 1:
            raise ValueError(f"update numbers are 1-based integers, got {update!r}")
        return int(update)

    def lr_at(self, update: int) -> float:
        """Learning rate of optimizer update ``update`` (1-based): schedule index ``update``."""
        return warmup_cosine_value(self._check(update), self.warmup_steps, self.total_steps, self.start_lr,
                                   self.peak_lr, self.final_lr)

    def weight_decay_at(self, update: int) -> float:
        """Weight decay of update ``update``: schedule index ``update``."""
        return cosine_wd_value(self._check(update), self.total_steps, self.start_weight_decay,
                               self.final_weight_decay)

    def momentum_at(self, update: int) -> float:
        """EMA momentum after update ``update``: schedule index ``update - 1``."""
        return ema_momentum_value(self._check(update) - 1, self.total_steps, self.ema_start, self.ema_end)

    def values_at(self, update: int) -> dict[str, float]:
        """``{"lr", "weight_decay", "momentum"}`` of update ``update`` (for logs)."""
        return {"lr": self.lr_at(update), "weight_decay": self.weight_decay_at(update),
                "momentum": self.momentum_at(update)}

    def apply(self, optimizer: torch.optim.Optimizer, update: int, *, lr: bool = True) -> None:
        """Write the learning rate (unless ``lr=False``) and weight decay of ``update`` into ``optimizer``.

        Call it before ``optimizer.step()`` of that update. Weight decay goes only into the groups
        :func:`applies_weight_decay` selects.
        """
        wd = self.weight_decay_at(update)
        value = self.lr_at(update) if lr else None
        for group in optimizer.param_groups:
            if value is not None:
                group["lr"] = value
            if applies_weight_decay(group):
                group["weight_decay"] = wd

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
