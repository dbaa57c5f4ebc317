"""The official I-JEPA per-iteration schedules: learning rate, weight decay and EMA momentum.

All three are stepped once per optimizer step and are checkpointable (``state_dict`` /
``load_state_dict`` with plain Python numbers, so ``accelerator.register_for_checkpointing(sched)`` and a
``weights_only`` ``torch.load`` both work). Do **not** pass them to ``accelerator.prepare``: they are not
``torch.optim.lr_scheduler.LRScheduler`` objects and need no wrapping.

Step order (the official one, kept here):

.. code-block:: python

    for it in range(total_steps):
        lr = lr_sched.step()        # BEFORE the update: update k (1-based) uses schedule index k
        wd = wd_sched.step()        #   (so the very first update already uses index 1, not 0)
        loss = ...; loss.backward(); optimizer.step(); optimizer.zero_grad()
        m = ema_sched.step()        # AFTER the update: update k uses index k - 1 (first EMA: m = start)
        ema_update(target, context, m)

Construction sets the optimizer to schedule index 0, so a loop that instead steps the LR/WD schedulers
*after* ``optimizer.step()`` (the PyTorch convention) uses indices ``0 .. T-1``: the same curve shifted by
one. Index ``T = total_steps`` (the final value) is reached by the last official update for LR and WD;
the EMA momentum's last used value is index ``T - 1`` (the official generator yields ``T + 1`` values and
the loop consumes ``T``).

Formulas (``i`` = schedule index, ``W`` = warmup steps, ``T`` = total steps):

* LR: ``i < W``: ``start + i / W * (ref - start)``; else with ``p = (i - W) / max(1, T - W)``:
  ``max(final, final + (ref - final) * 0.5 * (1 + cos(pi * p)))``.
* WD: ``p = i / T``; ``final + (ref - final) * 0.5 * (1 + cos(pi * p))``, clamped at ``final`` on the side it
  approaches (official 0.04 -> 0.4, an increase).
* EMA: ``start + i * (end - start) / T``.

Deviation from the official code, beyond the last step only: ``p`` is clamped to ``[0, 1]``, so after
``T`` steps the values stay at their final values (the official cosine would turn back up, which it never
reaches because the run stops at ``T``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = [
    "WarmupCosineLR",
    "CosineWeightDecay",
    "EMAMomentum",
    "warmup_cosine_value",
    "cosine_wd_value",
    "ema_momentum_value",
]


def warmup_cosine_value(
    step: int, warmup_steps: int, total_steps: int, start_lr: float, ref_lr: float, final_lr: float
) -> float:
    """Learning rate at schedule index ``step`` (see the module docstring)."""
    if step < warmup_steps:
        return start_lr + (step / warmup_steps) * (ref_lr - start_lr)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return max(final_lr, final_lr + (ref_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def cosine_wd_value(step: int, total_steps: int, ref_wd: float, final_wd: float) -> float:
    """Weight decay at schedule index ``step`` (see the module docstring)."""
    progress = min(1.0, step / max(1, total_steps))
    wd = final_wd + (ref_wd - final_wd) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # Clamp on the side of final_wd (the official code clamps in whichever direction it moves).
    return max(final_wd, wd) if final_wd <= ref_wd else min(final_wd, wd)


def ema_momentum_value(step: int, total_steps: int, start: float, end: float) -> float:
    """EMA momentum at schedule index ``step``: linear from ``start`` (index 0) to ``end`` (index ``T``)."""
    step = min(max(step, 0), total_steps)
    return start + step * (end - start) / max(1, total_steps)


def _wd_applies(group: dict[str, Any]) -> bool:
    """Official rule: groups flagged ``WD_exclude=True`` keep their weight decay (0); also honour
    ``apply_weight_decay=False`` as an alias."""
    return not group.get("WD_exclude", False) and group.get("apply_weight_decay", True)


class _StepSchedule:
    """Shared bookkeeping: an integer counter, checkpointable state, value accessors."""

    _hparams: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.step_count = 0  # number of step() calls so far

    def value_at(self, step: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def value(self) -> float:
        """The value currently in use (the one the last ``step()`` returned, or index 0 before any)."""
        return self.value_at(self._current_index())

    def get(self) -> float:
        return self.value

    def _current_index(self) -> int:
        return self.step_count

    def state_dict(self) -> dict[str, Any]:
        """``{"step_count": int, <hyper-parameters>}``: plain Python numbers only."""
        state: dict[str, Any] = {"step_count": self.step_count}
        for name in self._hparams:
            state[name] = getattr(self, name)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the counter and hyper-parameters (like torch LR schedulers), then re-apply the current
        value to the optimizer so a resumed run continues exactly where it stopped."""
        for name in self._hparams:
            if name in state_dict:
                setattr(self, name, type(getattr(self, name))(state_dict[name]))
        self.step_count = int(state_dict["step_count"])
        self._apply(self.value)

    def _apply(self, value: float) -> None:
        """Write ``value`` into the optimizer (no-op for schedules without one)."""

    def step(self) -> float:
        """Advance by one optimizer step; returns the value to use for it (see the module docstring)."""
        self.step_count += 1
        value = self.value
        self._apply(value)
        return value

    def __repr__(self) -> str:
        params = ", ".join(f"{n}={getattr(self, n)}" for n in self._hparams)
        return f"{type(self).__name__}({params}, step_count={self.step_count}, value={self.value:.6g})"


class WarmupCosineLR(_StepSchedule):
    """Linear warmup ``start_lr -> ref_lr`` over ``warmup_steps``, then cosine to ``final_lr``.

    Sets ``lr`` of every param group of ``optimizer`` (the official code uses one lr for all groups). On
    construction the groups get index 0 (``start_lr``); each ``step()`` advances first, so with the
    official order (``step()`` before ``optimizer.step()``) the first update uses index 1.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (or an Accelerate-wrapped one exposing ``param_groups``).
        warmup_steps: ``int(warmup_epochs * iterations_per_epoch)``.
        total_steps: ``T``, the number of optimizer steps of the run (``ipe_scale`` already applied).
        start_lr, ref_lr, final_lr: official defaults in the configs: ``2e-4``, ``1e-3``, ``1e-6``.
    """

    _hparams = ("warmup_steps", "total_steps", "start_lr", "ref_lr", "final_lr")

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int,
        total_steps: int,
        start_lr: float,
        ref_lr: float,
        final_lr: float = 0.0,
    ) -> None:
        super().__init__()
        if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
            raise ValueError(
                f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps, got {warmup_steps}, {total_steps}"
            )
        self.optimizer = optimizer
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.start_lr = float(start_lr)
        self.ref_lr = float(ref_lr)
        self.final_lr = float(final_lr)
        self._apply(self.value)

    def value_at(self, step: int) -> float:
        return warmup_cosine_value(step, self.warmup_steps, self.total_steps, self.start_lr, self.ref_lr, self.final_lr)

    def _apply(self, value: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = value

    def get_last_lr(self) -> list[float]:
        """Per-group lr, like torch schedulers (all equal here)."""
        return [group["lr"] for group in self.optimizer.param_groups]


class CosineWeightDecay(_StepSchedule):
    """Cosine weight-decay schedule ``ref_wd -> final_wd`` (official: an *increase* 0.04 -> 0.4).

    Sets ``weight_decay`` only on groups that do not carry ``WD_exclude=True`` (nor
    ``apply_weight_decay=False``), i.e. the decay groups of :func:`~ijepa_hf.training.official_param_groups`;
    bias / 1-D groups stay at 0. Same step order as :class:`WarmupCosineLR`.
    """

    _hparams = ("total_steps", "ref_wd", "final_wd")

    def __init__(
        self, optimizer: torch.optim.Optimizer, total_steps: int, ref_wd: float = 0.04, final_wd: float = 0.4
    ) -> None:
        super().__init__()
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.optimizer = optimizer
        self.total_steps = int(total_steps)
        self.ref_wd = float(ref_wd)
        self.final_wd = float(final_wd)
        self._apply(self.value)

    def value_at(self, step: int) -> float:
        return cosine_wd_value(step, self.total_steps, self.ref_wd, self.final_wd)

    def _apply(self, value: float) -> None:
        for group in self.optimizer.param_groups:
            if _wd_applies(group):
                group["weight_decay"] = value


class EMAMomentum(_StepSchedule):
    """Linear EMA momentum for the target encoder: index ``i`` -> ``start + i * (end - start) / T``.

    Mirrors the official generator: the ``k``-th ``step()`` (1-based) returns index ``k - 1`` and then
    advances, so the first EMA update uses ``start`` (0.996) and the last of ``T`` updates uses index
    ``T - 1``. :attr:`value` is the value returned by the last ``step()`` (``start`` before any). Indices
    past ``T`` stay at ``end``.

    The EMA itself is ``target = m * target + (1 - m) * context`` for every parameter pair.
    """

    _hparams = ("total_steps", "start", "end")

    def __init__(self, total_steps: int, start: float = 0.996, end: float = 1.0) -> None:
        super().__init__()
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps = int(total_steps)
        self.start = float(start)
        self.end = float(end)

    def value_at(self, step: int) -> float:
        return ema_momentum_value(step, self.total_steps, self.start, self.end)

    def _current_index(self) -> int:
        # The k-th step() uses index k-1 (official generator semantics); before any step, index 0.
        return max(0, self.step_count - 1)
