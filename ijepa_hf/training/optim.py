"""The official I-JEPA AdamW parameter groups.

For each module (official: the context encoder, then the predictor), parameters whose name does not
contain ``"bias"`` and that are not 1-D get weight decay; biases and 1-D parameters (LayerNorm weights)
get none and are flagged ``WD_exclude=True`` (the decay groups ``WD_exclude=False``), so the weight-decay schedule
(:meth:`~ijepa_hf.training.PretrainingSchedule.apply`) writes only into the decay groups. The 3-D ``mask_token`` and the patch-embedding conv are therefore decayed, as in the official code.
Group order is official too: every module's decay group, then every module's no-decay group, so with
``(encoder, predictor)`` the four groups are ``[enc decay, pred decay, enc no-decay, pred no-decay]``.

One deliberate difference: parameters with ``requires_grad=False`` are skipped (the official code puts
its frozen sin-cos position embeddings in the decay groups, where they have no effect).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..modeling_ijepa_hf import is_no_decay_param

__all__ = ["official_param_groups", "build_optimizer", "is_no_decay_param"]

NamedModules = Mapping[str, nn.Module] | Iterable[tuple[str, nn.Module]] | nn.Module


def _as_named_modules(named_modules: NamedModules) -> list[tuple[str, nn.Module]]:
    declared = getattr(named_modules, "optimized_modules", None)
    if callable(declared):  # a model that declares its groups (IJepaForPreTraining)
        return list(declared().items())
    if isinstance(named_modules, nn.Module):
        return [("model", named_modules)]
    if isinstance(named_modules, Mapping):
        return list(named_modules.items())
    pairs = list(named_modules)
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[1], nn.Module)):
            raise TypeError(f"expected (name, nn.Module) pairs, got {pair!r}")
    return pairs


def official_param_groups(
    named_modules: NamedModules, weight_decay: float = 0.04
) -> list[dict[str, Any]]:
    """Build the official AdamW parameter groups.

    Args:
        named_modules: a model that declares its trained modules (``optimized_modules()``, as
            `IJepaForPreTraining`: ``{"encoder": context encoder, "predictor": predictor}``), such a dict itself, a
            list of ``(name, module)`` pairs, or a single module. Order matters (group order follows it).
        weight_decay: initial weight decay of the decay groups (the wd schedule overwrites it each step;
            official ``0.04``).

    Returns:
        A list of dicts for ``torch.optim.AdamW``: decay groups ``{"params", "weight_decay", "WD_exclude": False,
        "group_name": "<module>.decay"}`` for every module, then no-decay groups ``{"params",
        "weight_decay": 0.0, "WD_exclude": True, "group_name": "<module>.no_decay"}``. Empty groups are
        left out; frozen parameters are skipped; a parameter shared between modules is kept only in its
        first group (torch refuses duplicates).
    """
    seen: set[int] = set()
    decay_groups: list[dict[str, Any]] = []
    no_decay_groups: list[dict[str, Any]] = []
    for module_name, module in _as_named_modules(named_modules):
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for name, param in module.named_parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if is_no_decay_param(name, param) else decay).append(param)
        if decay:
            decay_groups.append(
                {"params": decay, "weight_decay": float(weight_decay), "WD_exclude": False,
                 "group_name": f"{module_name}.decay"}
            )
        if no_decay:
            no_decay_groups.append(
                {
                    "params": no_decay,
                    "weight_decay": 0.0,
                    "WD_exclude": True,
                    "group_name": f"{module_name}.no_decay",
                }
            )
    groups = decay_groups + no_decay_groups
    if not groups:
        raise ValueError("no trainable parameters in the given modules")
    return groups


def build_optimizer(
    named_modules: NamedModules,
    lr: float = 1e-3,
    weight_decay: float = 0.04,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    fused: bool | None = None,
    foreach: bool | None = None,
) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over :func:`official_param_groups` (torch's default betas/eps, as official).

    ``lr`` and ``weight_decay`` are only initial values: the schedules set them at construction and on
    every step.

    Implementation choice: ``fused=None`` picks torch's fused kernel when every parameter is a floating-point
    CPU or CUDA tensor: one kernel for all parameters instead of the per-parameter loop that torch (and so the
    official code) uses by default on CPU (benchmarks/README.md has the timings). Pass ``fused``/``foreach``
    explicitly to override; they are mutually exclusive in torch.
    """
    groups = official_param_groups(named_modules, weight_decay=weight_decay)
    if fused is None and foreach is None:
        params = [p for group in groups for p in group["params"]]
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params) or None
    kwargs: dict[str, Any] = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
    if fused:
        kwargs["fused"] = True
    elif foreach is not None:
        kwargs["foreach"] = foreach
    return torch.optim.AdamW(groups, **kwargs)
