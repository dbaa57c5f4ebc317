"""Tiny configurations and golden-fixture access shared by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ijepa_hf import IJepaEncoderConfig, IJepaPretrainingConfig

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN_CHECKPOINT = FIXTURES / "official-tiny.pth.tar"


def tiny_encoder_config(**overrides) -> IJepaEncoderConfig:
    values = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    values.update(overrides)
    return IJepaEncoderConfig(**values)


def tiny_pretraining_config(**overrides) -> IJepaPretrainingConfig:
    encoder = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    encoder.update(overrides.pop("encoder", {}))
    predictor = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2)
    predictor.update(overrides.pop("predictor", {}))
    return IJepaPretrainingConfig(encoder_config=encoder, predictor_config=predictor, **overrides)


def random_masks(batch_size: int, num_patches: int, num_context: int, num_blocks: int, num_targets: int,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random sorted context indices [B, Kc] and target indices [B, M, Kt] (not multi-block shaped)."""
    generator = torch.Generator().manual_seed(seed)
    context = torch.stack([torch.randperm(num_patches, generator=generator)[:num_context].sort().values
                           for _ in range(batch_size)])
    targets = torch.stack([
        torch.stack([torch.randperm(num_patches, generator=generator)[:num_targets].sort().values
                     for _ in range(num_blocks)])
        for _ in range(batch_size)
    ])
    return context, targets


def golden() -> dict[str, torch.Tensor]:
    """The official implementation's inputs and outputs for official-tiny.pth.tar (see fixtures/README)."""
    return load_file(FIXTURES / "official-tiny.safetensors")


def golden_meta() -> dict:
    return json.loads((FIXTURES / "official-tiny.json").read_text())


def golden_target_masks(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack([tensors[f"target_mask_{i}"] for i in range(golden_meta()["num_target_blocks"])], dim=1)
