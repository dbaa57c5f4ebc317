"""``benchmarks/official_step.py``, the rebuilt official step that ``bench_train_step.py`` times beside ours: it must
compute what the official code computes (golden vectors made by the official code), or the same-run speed-up it
anchors would compare against the wrong work."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ijepa_hf.conversion import load_official_checkpoint

from tiny import GOLDEN_CHECKPOINT, golden, golden_meta

ATOL = 1e-5
_BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def official_step():
    sys.path.insert(0, str(_BENCHMARKS))
    try:
        import official_step

        yield official_step
    finally:
        sys.path.remove(str(_BENCHMARKS))
        sys.modules.pop("official_step", None)


def _golden_step(official_step):
    meta, checkpoint = golden_meta(), load_official_checkpoint(GOLDEN_CHECKPOINT)
    step = official_step.OfficialStep.build(
        image_size=meta["image_size"], patch_size=meta["patch_size"], dim=meta["hidden_size"],
        depth=meta["num_hidden_layers"], heads=meta["num_attention_heads"], predictor_dim=meta["predictor_hidden_size"],
        predictor_depth=meta["predictor_num_hidden_layers"], lr=meta["train_step"]["lr"],
        weight_decay=meta["train_step"]["weight_decay"])
    # strict: every official key has a home in the rebuilt modules and none is missing
    step.encoder.load_state_dict(checkpoint["encoder"])
    step.target_encoder.load_state_dict(checkpoint["target_encoder"])
    step.predictor.load_state_dict(checkpoint["predictor"])
    return step


def test_rebuilt_official_step_matches_the_official_code_before_and_after_one_step(official_step):
    g, meta = golden(), golden_meta()
    step = _golden_step(official_step)
    masks = (g["context_mask"], [g[f"target_mask_{i}"] for i in range(meta["num_target_blocks"])])

    with torch.no_grad():
        assert abs(step.loss(g["pixel_values"], *masks).item() - g["loss_step0"].item()) < ATOL
    loss = step.step(g["pixel_values"], *masks, momentum=meta["train_step"]["ema_momentum"])
    assert abs(loss - g["loss_step0"].item()) < ATOL

    torch.testing.assert_close(step.encoder.blocks[0].attn.qkv.weight.detach(),
                               g["context_encoder_after_step.blocks.0.attn.qkv.weight"], atol=ATOL, rtol=0)
    torch.testing.assert_close(step.target_encoder.blocks[0].attn.qkv.weight,
                               g["target_encoder_after_step.blocks.0.attn.qkv.weight"], atol=ATOL, rtol=0)
    with torch.no_grad():
        assert abs(step.loss(g["pixel_values"], *masks).item() - g["loss_step1"].item()) < ATOL


def test_rebuilt_official_step_keeps_the_official_costs(official_step):
    g, meta = golden(), golden_meta()
    step = _golden_step(official_step)
    # the official optimizer: torch's per-parameter AdamW, the four official groups, frozen tables in the decay groups
    assert not any(step.optimizer.defaults[flag] for flag in ("fused", "foreach"))
    sizes = [len(group["params"]) for group in step.optimizer.param_groups]
    assert len(sizes) == 4 and all(sizes)
    assert any(p is step.encoder.pos_embed for p in step.optimizer.param_groups[0]["params"])
    # the residual stream leaves the patch embedding as a transposed view, as in the official code
    assert not step.encoder.patch_embed(g["pixel_values"]).is_contiguous()
    # bf16 autocast runs end to end and stays near the fp32 loss
    masks = (g["context_mask"], [g[f"target_mask_{i}"] for i in range(meta["num_target_blocks"])])
    bf16_loss = step.step(g["pixel_values"], *masks, autocast=True)
    assert abs(bf16_loss - g["loss_step0"].item()) < 0.02 * g["loss_step0"].item()
