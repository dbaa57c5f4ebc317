"""Configurations: presets of the official sizes, validation errors, serialisation."""

from __future__ import annotations

import pytest
import torch

from ijepa_hf import (
    IJepaEncoderConfig,
    IJepaEncoderModel,
    IJepaPredictorConfig,
    IJepaPredictorModel,
    IJepaPretrainingConfig,
    list_presets,
)


def count_parameters(model_class, config) -> int:
    with torch.device("meta"):
        model = model_class(config)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# Trainable parameter counts of the official models (measured on the official code, see the reference notes).
@pytest.mark.parametrize("preset, encoder_params, predictor_params", [
    ("ijepa_vith14_in1k", 630_434_560, 22_279_424),
    ("ijepa_vith16_448_in1k", 630_664_960, 22_279_424),
    ("ijepa_vitg16_in22k", 1_011_092_608, 29_475_712),
])
def test_official_presets_have_the_official_parameter_counts(preset, encoder_params, predictor_params):
    config = IJepaPretrainingConfig.from_preset(preset)
    assert count_parameters(IJepaEncoderModel, config.encoder_config) == encoder_params
    assert count_parameters(IJepaPredictorModel, config.predictor_config) == predictor_params


@pytest.mark.parametrize("size, encoder_params, predictor_params", [
    ("vit_tiny", 5_486_400, 10_795_968), ("vit_small", 21_589_632, 10_943_616)])
def test_small_sizes_with_a_depth_6_predictor(size, encoder_params, predictor_params):
    config = IJepaPretrainingConfig.from_preset(f"{size}_patch16_224", predictor={"num_hidden_layers": 6})
    assert count_parameters(IJepaEncoderModel, config.encoder_config) == encoder_params
    assert count_parameters(IJepaPredictorModel, config.predictor_config) == predictor_params


def test_every_preset_builds_a_valid_config():
    for name in list_presets():
        config = IJepaPretrainingConfig.from_preset(name)
        assert config.predictor_config.grid_size == config.encoder_config.grid_size
        assert config.predictor_config.num_attention_heads == config.encoder_config.num_attention_heads
    with pytest.raises(ValueError, match="Unknown preset"):
        IJepaPretrainingConfig.from_preset("vit_colossal")


@pytest.mark.parametrize("kwargs, field", [
    (dict(image_size=100, patch_size=16), "image_size"),
    (dict(hidden_size=100, num_attention_heads=3), "num_attention_heads"),
    (dict(num_hidden_layers=0), "num_hidden_layers"),
    (dict(patch_size=-4), "patch_size"),
    (dict(drop_path_rate=1.5), "drop_path_rate"),
    (dict(image_size=(224, 200), patch_size=16), "image_size"),
])
def test_invalid_encoder_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        IJepaEncoderConfig(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    (dict(target_scale=(0.1, 1.5)), "target_scale"),
    (dict(context_scale=(0.0, 1.0)), "context_scale"),
    (dict(target_scale=(0.3, 0.2)), "target_scale"),
    (dict(target_aspect_ratio=(-1, 2)), "target_aspect_ratio"),
    (dict(num_target_blocks=0), "num_target_blocks"),
    (dict(min_keep=-1), "min_keep"),
    (dict(mask_mode="random"), "mask_mode"),
    (dict(loss="l1"), "loss"),
    (dict(ema_momentum=(0.996, 1.1)), "ema_momentum"),
    (dict(predictor_config=dict(hidden_size=30, num_attention_heads=4)), "num_attention_heads"),
    (dict(predictor_config=dict(encoder_hidden_size=10)), "encoder_hidden_size"),
    (dict(predictor_config=dict(image_size=448)), "grid"),
])
def test_invalid_pretraining_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        IJepaPretrainingConfig(**kwargs)


def test_pretraining_config_round_trips_and_predictor_inherits_the_encoder(tmp_path):
    config = IJepaPretrainingConfig(
        encoder_config=dict(image_size=96, patch_size=8, hidden_size=96, num_hidden_layers=3, num_attention_heads=3),
        predictor_config=dict(hidden_size=48, num_hidden_layers=2), mask_mode="official", loss="mse")
    assert config.predictor_config.encoder_hidden_size == 96
    assert config.predictor_config.grid_size == (12, 12)
    config.save_pretrained(tmp_path)
    loaded = IJepaPretrainingConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert isinstance(loaded.encoder_config, IJepaEncoderConfig)
    assert isinstance(loaded.predictor_config, IJepaPredictorConfig)
    assert loaded.mask_mode == "official" and tuple(loaded.target_scale) == (0.15, 0.2)


def test_model_types_are_our_own():
    assert {IJepaEncoderConfig.model_type, IJepaPredictorConfig.model_type, IJepaPretrainingConfig.model_type} == {
        "ijepa_hf_encoder", "ijepa_hf_predictor", "ijepa_hf_pretraining"}
