"""Training recipes (``ijepa_hf.training.recipes``): ``--recipe small`` sizes the predictor relative to the encoder
and warms up over a quarter of the run, in the Python API, ``pretrain`` / ``examples/pretrain.py`` and the Trainer
script; what the user sets explicitly wins; ``official`` changes nothing."""

from __future__ import annotations

import pytest

from ijepa_hf import IJepaPretrainingConfig
from ijepa_hf.training import apply_recipe, build_config, get_recipe, parse_args, recipe_training_arguments

from tiny import TINY_OVERRIDES, run

pytestmark = pytest.mark.usefixtures("one_thread")


def _encoder_config() -> IJepaPretrainingConfig:
    config = IJepaPretrainingConfig()
    config.update_from_string("encoder.hidden_size=96,encoder.num_attention_heads=3,encoder.num_hidden_layers=4,"
                              "predictor.hidden_size=48,predictor.num_hidden_layers=6,predictor.num_attention_heads=3")
    return config


def test_small_recipe_sizes_the_predictor_from_the_encoder_and_keeps_what_is_named():
    config = _encoder_config()
    small = apply_recipe(config, "small")
    assert (small.predictor_config.hidden_size, small.predictor_config.num_hidden_layers,
            small.predictor_config.num_attention_heads) == (96, 1, 3)
    assert small.encoder_config.to_dict() == config.encoder_config.to_dict()
    assert small.ema_momentum == config.ema_momentum  # recipes leave the EMA schedule alone
    kept = apply_recipe(config, "small", keep={"predictor.num_hidden_layers"})
    assert (kept.predictor_config.hidden_size, kept.predictor_config.num_hidden_layers) == (96, 6)
    assert apply_recipe(config, "official").to_dict() == config.to_dict()
    assert config.predictor_config.hidden_size == 48  # a copy: the input is unchanged
    with pytest.raises(ValueError, match=r"Unknown recipe 'tiny'; choose one of \['official', 'small'\]"):
        get_recipe("tiny")


def test_a_predictor_field_the_user_sets_is_validated_with_the_recipes_other_fields(tmp_path):
    """`--recipe small --config_overrides predictor.hidden_size=64` on an encoder of 2 heads is a valid predictor (64
    wide, the recipe's 2 heads and 1 block): the user's field and the recipe's are one change, not the width checked
    first against the default predictor's 12 heads. Its MLP follows the user's width, not the recipe's."""
    demo = ["--config_overrides", "predictor.hidden_size=64"]  # the embedded demo: 128 wide, 2 heads, small recipe
    own = ["--recipe", "small", "--output_dir", str(tmp_path), "--config_overrides",
           "encoder.hidden_size=128,encoder.num_attention_heads=2,predictor.hidden_size=64"]
    for argv in (demo, own):
        predictor = build_config(parse_args(argv)).predictor_config
        assert (predictor.hidden_size, predictor.num_attention_heads, predictor.num_hidden_layers) == (64, 2, 1)
        assert predictor.intermediate_size == 4 * 64
    with pytest.raises(ValueError, match=r"predictor `hidden_size` \(65\) must be divisible by predictor "
                                         r"`num_attention_heads` \(2\)"):
        build_config(parse_args(["--config_overrides", "predictor.hidden_size=65"]))


def test_recipe_in_the_arguments_warm_up_and_model(tmp_path):
    small = parse_args(["--recipe", "small", "--output_dir", str(tmp_path), "--config_overrides",
                        "encoder.hidden_size=64,encoder.num_attention_heads=2"])
    assert small.warmup_fraction == 0.25
    assert build_config(small).predictor_config.hidden_size == 64
    explicit = parse_args(["--recipe", "small", "--warmup_ratio", "0.1", "--output_dir", str(tmp_path),
                           "--config_overrides", "predictor.num_hidden_layers=3"])
    assert explicit.warmup_fraction == 0.1 and build_config(explicit).predictor_config.num_hidden_layers == 3
    demo = parse_args(["--recipe", "small"])  # the embedded demo's predictor is a default, not the user's
    config = build_config(demo)
    assert config.predictor_config.hidden_size == config.encoder_config.hidden_size
    assert config.predictor_config.num_hidden_layers == 1
    # Without --recipe the paper's warm-up (the embedded demo's own model uses the small recipe: test_pretraining).
    assert parse_args(["--train_dir", str(tmp_path), "--num_train_epochs", "3"]).warmup_fraction == pytest.approx(40 / 300)
    with pytest.raises(ValueError, match="--recipe small sizes a new model's predictor"):
        parse_args(["--recipe", "small", "--model_name_or_path", str(tmp_path), "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="Unknown recipe 'large'"):
        parse_args(["--recipe", "large"])


def test_pretrain_with_the_small_recipe(tmp_path):
    overrides = TINY_OVERRIDES.replace("predictor.hidden_size=16,predictor.num_hidden_layers=2,", "")
    result = run(tmp_path / "run", "--recipe", "small", "--config_overrides", overrides, steps=4)
    predictor = result.model.predictor.config
    assert (predictor.hidden_size, predictor.num_hidden_layers) == (32, 1)  # the tiny encoder's width, one block
    assert result.global_step == 4


def test_trainer_recipe_arguments_and_script(tmp_path, load_example):
    assert recipe_training_arguments(str(tmp_path), "small").warmup_steps == 0.25
    assert recipe_training_arguments(str(tmp_path)).warmup_steps == pytest.approx(40 / 300)
    example = load_example("pretrain_trainer")
    _, training = example.parse(["--recipe", "small", "--output_dir", str(tmp_path)])
    assert training.warmup_steps == 0.25  # not the demo's 5 steps
    trainer = example.main(["--recipe", "small", "--max_steps", "2", "--per_device_train_batch_size", "4",
                            "--embedded_num_images", "16", "--output_dir", str(tmp_path / "trainer"),
                            "--online_probe_images", "16"])
    predictor = trainer.model.predictor.config
    assert predictor.hidden_size == trainer.model.context_encoder.config.hidden_size
    assert predictor.num_hidden_layers == 1
    assert any("online_knn_accuracy" in entry for entry in trainer.state.log_history)


def test_a_predictor_larger_than_its_encoder_is_reported_where_training_starts(tmp_path, caplog):
    """The official predictor (384 wide, 12 blocks) under a 32-wide encoder is most of each step, many times the
    small recipe's, so the run says so and names the recipe; a predictor no larger than its encoder is not reported
    (ViT-B/16 with the official predictor; the tiny test model)."""
    from ijepa_hf.training import predictor_size_note

    assert predictor_size_note(IJepaPretrainingConfig()) is None  # ViT-B/16, the official predictor
    official_predictor = ",".join(part for part in TINY_OVERRIDES.split(",") if not part.startswith("predictor."))
    config = IJepaPretrainingConfig()
    config.update_from_string(official_predictor)
    note = predictor_size_note(config)
    assert note and "384 wide, 12 blocks" in note and "32 wide, 2 blocks" in note and "--recipe small" in note
    assert predictor_size_note(apply_recipe(config, "small")) is None

    with caplog.at_level("WARNING", logger="ijepa_hf.training"):
        run(tmp_path / "official", "--recipe", "official", "--config_overrides", official_predictor, steps=3)
    assert "The predictor (384 wide, 12 blocks" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ijepa_hf.training"):
        run(tmp_path / "tiny", steps=3)
    assert "The predictor (" not in caplog.text

    from transformers import TrainingArguments

    from ijepa_hf import IJepaForPreTraining
    from ijepa_hf.training import IJepaTrainer

    caplog.clear()
    with caplog.at_level("WARNING", logger="ijepa_hf.training"):
        IJepaTrainer(model=IJepaForPreTraining(config), args=TrainingArguments(str(tmp_path / "trainer"),
                                                                              report_to="none"))
    assert "The predictor (384 wide, 12 blocks" in caplog.text
