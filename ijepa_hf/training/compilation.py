"""``torch.compile`` for I-JEPA: the settings its variable-length masks need, and compiling the transformer block
once for every layer (:func:`compile_blocks`, ``--torch_compile_scope blocks``).

Official masks change the number of context and target patches from batch to batch, so a compiled model is
recompiled once with dynamic sequence lengths (torch's automatic dynamic shapes). Inductor's *mix-order reduction*
(LayerNorm backward's row and column reductions fused into one kernel; on by default in torch 2.11) then sizes a
workspace view with a wrong symbolic expression, and the first backward after the recompile fails with
``RuntimeError: shape '[N, 384]' is invalid for input of size M`` — seen on a GPU with torch 2.11 (the GPU
section of ``benchmarks/README.md`` has the run, and what the compiled step gains). With the fusion turned off the
compiled step runs and matches eager.
"""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

MIX_ORDER_REDUCTION_ENV = "TORCHINDUCTOR_MIX_ORDER_REDUCTION"


def configure_inductor_for_variable_masks() -> bool:
    """Turns off inductor's mix-order reduction for this process, unless the user chose a value through
    ``TORCHINDUCTOR_MIX_ORDER_REDUCTION`` (set it to ``1`` to keep the fusion, e.g. on a torch that fixed it).

    Returns whether the setting was changed. Call it before the first compiled forward.
    """
    if MIX_ORDER_REDUCTION_ENV in os.environ:
        return False
    from torch._inductor import config as inductor_config

    if not getattr(inductor_config.triton, "mix_order_reduction", False):  # older torch, or already off
        return False
    inductor_config.triton.mix_order_reduction = False
    logger.info("torch.compile: inductor's mix-order reduction turned off (it breaks on the varying mask lengths "
                "of I-JEPA batches; set %s=1 to keep it).", MIX_ORDER_REDUCTION_ENV)
    return True


def compile_blocks(model: Any, backend: str = "inductor") -> int:
    """Compiles every transformer block of ``model`` (an `IJepaForPreTraining`, or any module holding I-JEPA encoders
    and predictors) in place, with dynamic shapes: the blocks share one code, so the compiled graph is made once and
    reused by every layer and every mask length (regional compilation: much shorter to compile than the whole model,
    the fusions that matter, LayerNorm, GELU, residual adds around the matrix products, all inside a block).

    The predictor's last block stays eager: it updates only the target tokens (its output is shorter than its
    input), and inductor (torch 2.13) then fails in the backward pass with a stride assertion on that output's
    gradient. Returns the number of blocks compiled. The parameter names, and so checkpoints, are unchanged."""
    from ..modeling_ijepa_hf import IJepaEncoderModel, IJepaPredictorModel

    configure_inductor_for_variable_masks()
    compiled = 0
    for module in model.modules():
        if isinstance(module, IJepaEncoderModel):
            blocks = list(module.blocks)
        elif isinstance(module, IJepaPredictorModel):
            blocks = list(module.blocks)[:-1]
        else:
            continue
        for block in blocks:
            block.compile(backend=backend, dynamic=True)
            compiled += 1
    return compiled
