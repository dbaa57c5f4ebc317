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


# ----------------------------------------------------------------------------------------------------------------
# transformers 5.x idiom: @strict dataclass configs, validate_* run automatically, sub-configs
# ----------------------------------------------------------------------------------------------------------------

import dataclasses  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError  # noqa: E402
from transformers import AutoConfig, PreTrainedConfig  # noqa: E402

from ijepa_hf.configuration_ijepa_hf import MASK_FIELDS, check_mask_settings  # noqa: E402

CONFIGS_0_1 = Path(__file__).parent / "fixtures" / "configs-0.1"  # saved by the hand-written configs (9e42c74)


@pytest.mark.parametrize("cls", [IJepaEncoderConfig, IJepaPredictorConfig, IJepaPretrainingConfig])
def test_configs_are_strict_dataclasses_without_hand_written_init(cls):
    assert dataclasses.is_dataclass(cls) and issubclass(cls, PreTrainedConfig)
    assert hasattr(cls, "__validators__") and hasattr(cls, "__class_validators__")  # what @strict adds
    names = {f.name for f in dataclasses.fields(cls)}
    own = {"encoder_config", "predictor_config", *MASK_FIELDS} if cls is IJepaPretrainingConfig else {
        "hidden_size", "image_size", "patch_size", "num_attention_heads", "intermediate_size"}
    assert own <= names
    with pytest.raises(ValueError, match="keyword"):
        cls(768)  # keyword-only, as every 5.x config


@pytest.mark.parametrize("kwargs, field", [
    (dict(hidden_size="x"), "hidden_size"),
    (dict(num_hidden_layers=2.5), "num_hidden_layers"),
    (dict(qkv_bias="yes"), "qkv_bias"),
    (dict(image_size="224"), "image_size"),
    (dict(hidden_act=1), "hidden_act"),
])
def test_wrong_types_are_refused_by_strict(kwargs, field):
    with pytest.raises(StrictDataclassFieldValidationError, match=field) as error:
        IJepaEncoderConfig(**kwargs)
    assert isinstance(error.value, ValueError)  # as the hand-written configs raised
    config = IJepaEncoderConfig()
    with pytest.raises(ValueError, match=field):  # also on assignment
        setattr(config, field, next(iter(kwargs.values())))


def test_pretraining_field_types_are_strict():
    for kwargs, field in ((dict(min_keep="4"), "min_keep"), (dict(target_scale=0.2), "target_scale"),
                          (dict(allow_overlap="no"), "allow_overlap"), (dict(encoder_config="vit"), "encoder_config"),
                          (dict(mask_mode=1), "mask_mode")):
        with pytest.raises(StrictDataclassFieldValidationError, match=field):
            IJepaPretrainingConfig(**kwargs)


def test_validators_run_automatically_and_before_saving(tmp_path):
    with pytest.raises(StrictDataclassClassValidationError, match="num_attention_heads") as error:
        IJepaEncoderConfig(hidden_size=100, num_attention_heads=3)
    assert isinstance(error.value, ValueError)
    assert str(error.value) == "`hidden_size` (100) must be divisible by `num_attention_heads` (3)."
    for cls, name in ((IJepaEncoderConfig, "validate_encoder"), (IJepaPredictorConfig, "validate_predictor"),
                      (IJepaPretrainingConfig, "validate_pretraining"), (IJepaPretrainingConfig, "validate_masking")):
        assert name in {v.__name__ for v in cls.__class_validators__}
    config = IJepaEncoderConfig()
    config.num_attention_heads = 7  # assignment checks the type only; validate() and save_pretrained the rules
    with pytest.raises(ValueError, match="divisible"):
        config.validate()
    with pytest.raises(ValueError, match="divisible"):
        config.save_pretrained(tmp_path)


def test_composite_through_sub_configs_and_derived_defaults():
    assert IJepaPretrainingConfig.sub_configs == {"encoder_config": IJepaEncoderConfig,
                                                  "predictor_config": IJepaPredictorConfig}
    config = IJepaPretrainingConfig(encoder_config=IJepaEncoderConfig(hidden_size=192, num_attention_heads=3,
                                                                       image_size=(64, 96), patch_size=16))
    predictor = config.predictor_config
    assert (predictor.encoder_hidden_size, predictor.image_size, predictor.patch_size,
            predictor.num_attention_heads) == (192, [64, 96], 16, 3)  # inherited from the encoder
    assert predictor.hidden_size == 384 and predictor.intermediate_size == 4 * 384
    assert config.encoder_config.intermediate_size == 4 * 192 and config.encoder_config.grid_size == (4, 6)
    assert config.image_size == [64, 96] and config.patch_size == 16 and config.encoder_config.num_patches == 24
    given = IJepaPretrainingConfig(predictor_config=dict(num_attention_heads=4))
    assert given.predictor_config.num_attention_heads == 4  # given explicitly: not inherited
    assert isinstance(IJepaPretrainingConfig().encoder_config, IJepaEncoderConfig)


def test_encoder_config_where_a_pretraining_config_is_expected_is_a_clear_error():
    encoder = IJepaEncoderConfig(hidden_size=96, num_attention_heads=3).to_dict()
    with pytest.raises(ValueError, match=r"Expected a pretraining config.*export_encoder.*IJepaEncoderModel"):
        IJepaPretrainingConfig.from_dict(encoder)
    with pytest.raises(ValueError, match="ijepa_hf_encoder"):
        IJepaPretrainingConfig(**encoder)


@pytest.mark.parametrize("name, cls", [("pretraining", IJepaPretrainingConfig), ("encoder", IJepaEncoderConfig),
                                       ("predictor", IJepaPredictorConfig), ("preset-vit-tiny", IJepaPretrainingConfig)])
def test_config_json_of_the_hand_written_configs_still_loads(name, cls, tmp_path):
    loaded = cls.from_pretrained(CONFIGS_0_1 / name)
    assert type(AutoConfig.from_pretrained(CONFIGS_0_1 / name)) is cls
    if name == "preset-vit-tiny":
        assert loaded.to_dict() == IJepaPretrainingConfig.from_preset("vit_tiny_patch16_224").to_dict()
        return

    def plain(config):  # JSON view without the version stamps
        data = json.loads(json.dumps(config.to_dict()))
        for d in (data, data.get("encoder_config", {}), data.get("predictor_config", {})):
            d.pop("transformers_version", None)
        return data

    expected = json.loads((CONFIGS_0_1 / "expected_to_dict.json").read_text())[name]
    if cls is IJepaPretrainingConfig:  # fields added since take their defaults
        expected = {**expected, "context_lengths": "shortest", "mask_sampling": None, "sigreg_weight": 0.0,
                    "sigreg_num_slices": 256, "vicreg_variance_weight": 0.0, "vicreg_covariance_weight": 0.0,
                    "regularized_embeddings": "context_pooled",
                    "encoder_config": {**expected["encoder_config"], "pooler_norm": None}}
    if cls is IJepaEncoderConfig:
        expected = {**expected, "pooler_norm": None}
    assert plain(loaded) == expected
    for config in (loaded, getattr(loaded, "encoder_config", loaded), getattr(loaded, "predictor_config", loaded)):
        if name != "predictor":  # the licence fields recorded by ijepa_hf.licensing survive
            assert config.weights_license == "cc-by-nc-4.0" and config.weights_base_model == "facebook/ijepa_vith14_1k"
    loaded.save_pretrained(tmp_path)  # ...and round-trips in the new layout
    assert plain(cls.from_pretrained(tmp_path)) == expected


def test_mask_settings_are_validated_once_with_finite_aspect_ratios():
    defaults = IJepaPretrainingConfig.default_mask_settings()
    assert defaults == dict(num_target_blocks=4, context_scale=(0.85, 1.0), target_scale=(0.15, 0.2),
                            target_aspect_ratio=(0.75, 1.5), min_keep=10, allow_overlap=False, mask_mode="fixed",
                            context_lengths="shortest")
    assert check_mask_settings(**defaults)["target_aspect_ratio"] == (0.75, 1.5)
    for field, value in (("target_aspect_ratio", (0.5, float("inf"))), ("context_scale", (float("nan"), 1.0)),
                         ("target_aspect_ratio", (0.0, 2.0)), ("target_scale", (0.2, 0.1))):
        with pytest.raises(ValueError, match=field):
            IJepaPretrainingConfig(**{field: value})
        with pytest.raises(ValueError, match=field):
            check_mask_settings(**{**defaults, field: value})
    config = IJepaPretrainingConfig(target_aspect_ratio=(0.5, 2), min_keep=0, allow_overlap=True)
    assert config.mask_settings()["target_aspect_ratio"] == [0.5, 2] and config.min_keep == 0


def test_config_errors_pickle():
    import pickle

    for kwargs in (dict(hidden_size="x"), dict(hidden_size=100, num_attention_heads=3)):
        with pytest.raises(ValueError) as error:
            IJepaEncoderConfig(**kwargs)
        clone = pickle.loads(pickle.dumps(error.value))
        assert type(clone) is type(error.value) and str(clone) == str(error.value)


def test_values_given_to_from_pretrained_are_validated_before_a_model_is_built(tmp_path):
    """`from_pretrained(repo, drop_path_rate=2.0)` (finetune.py --drop_path_rate 2) sets the value on the loaded
    config past its validators (assignment checks the type only): the model was built and training then failed
    deep in torch ("bernoulli_ expects p to be in [0, 1]"). The model refuses a config its constructor would."""
    from transformers import AutoModelForImageClassification, AutoModelForPreTraining

    from tiny import tiny_encoder_config, tiny_pretraining_config
    from ijepa_hf import IJepaEncoderModel, IJepaForPreTraining

    IJepaEncoderModel(tiny_encoder_config()).save_pretrained(tmp_path / "encoder")
    with pytest.raises(ValueError, match=r"`drop_path_rate` must be in \[0, 1\), got 2.0"):
        AutoModelForImageClassification.from_pretrained(tmp_path / "encoder", num_labels=2, drop_path_rate=2.0)
    IJepaForPreTraining(tiny_pretraining_config()).save_pretrained(tmp_path / "pretraining")
    with pytest.raises(ValueError, match="num_target_blocks"):
        AutoModelForPreTraining.from_pretrained(tmp_path / "pretraining", num_target_blocks=0)
    assert AutoModelForImageClassification.from_pretrained(tmp_path / "encoder", num_labels=2,
                                                           drop_path_rate=0.1).config.drop_path_rate == 0.1


@pytest.mark.parametrize("option", ["config_name", "model_name_or_path"])
def test_a_folder_without_a_config_is_refused_not_read_as_the_default_config(tmp_path, option):
    """transformers' `from_pretrained` of a folder without config.json returns the class's default config without a
    word, so `--config_name ./run` (a folder whose config was moved or never written) trained a default ViT-B/16."""
    from ijepa_hf.training import build_pretraining_config

    with pytest.raises(ValueError, match=f"--{option} .* has no config.json"):
        build_pretraining_config(**{option: str(tmp_path)})
