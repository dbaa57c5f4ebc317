"""Fine-tuning helpers and the Trainer example: layer-wise lr groups, the offline accuracy metric, data splits,
and a short fine-tuning run whose loss falls and whose saved model reloads with the same logits."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ijepa_hf import IJepaEncoderForImageClassification, IJepaEncoderModel, IJepaForPreTraining, make_image_processor
from ijepa_hf.finetuning import (
    LocalAccuracy,
    classification_collate,
    layerwise_lr_groups,
    load_accuracy_metric,
    load_labeled_splits,
    make_finetune_transforms,
    parameter_layer_id,
)
from ijepa_hf.loading import load_image_classifier

from tiny import tiny_encoder_config, tiny_pretraining_config

COLOURS = {"blue": (40, 60, 200), "red": (200, 50, 40)}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """``root/<class>/<i>.png``: 16 noisy 40x40 images per colour class (a task a tiny model learns fast)."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        (root / name).mkdir()
        for i in range(16):
            pixels = np.clip(np.array(colour) + rng.normal(0, 40, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def encoder_repo(tmp_path_factory) -> Path:
    """A saved tiny encoder with its image processor, as `export_encoder` + `save_pretrained` would leave it."""
    path = tmp_path_factory.mktemp("encoder")
    torch.manual_seed(0)
    IJepaEncoderModel(tiny_encoder_config()).save_pretrained(path)
    make_image_processor(32).save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Layer-wise learning rates
# ----------------------------------------------------------------------------------------------------------------


def test_layerwise_lr_groups():
    model = IJepaEncoderForImageClassification(tiny_encoder_config(num_labels=3))  # depth 2
    lr, decay = 1e-3, 0.5
    groups = layerwise_lr_groups(model, lr, 0.05, decay)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(lr_of) == len(named) == sum(len(g["params"]) for g in groups)  # each parameter exactly once
    expected = {
        "encoder.patch_embed.weight": lr * decay**3,  # embeddings: decay^(depth + 1)
        "encoder.blocks.0.attn.qkv.weight": lr * decay**2,  # block i: decay^(depth - i)
        "encoder.blocks.1.mlp.fc2.weight": lr * decay,
        "encoder.norm.weight": lr,  # final norm and head: full lr
        "classifier.weight": lr,
    }
    for name, value in expected.items():
        assert lr_of[id(named[name])] == pytest.approx(value), name
    assert wd_of[id(named["classifier.weight"])] == 0.05
    assert wd_of[id(named["classifier.bias"])] == wd_of[id(named["encoder.norm.weight"])] == 0.0
    assert groups[0]["lr"] == lr  # head first: Trainer logs the first group's lr

    # No decay -> one lr; frozen parameters are left out.
    model.encoder.patch_embed.requires_grad_(False)
    flat = layerwise_lr_groups(model, lr, 0.05, 1.0)
    assert {g["lr"] for g in flat} == {lr}
    assert sum(len(g["params"]) for g in flat) == len(named) - 2
    with pytest.raises(ValueError, match="layer_decay"):
        layerwise_lr_groups(model, lr, 0.05, 0.0)


@pytest.mark.parametrize("name, depth", [
    ("ijepa.embeddings.patch_embeddings.projection.weight", 0),  # transformers' I-JEPA / ViT
    ("ijepa.layers.3.mlp.fc1.weight", 4),
    ("vit.encoder.layer.0.attention.attention.query.weight", 1),
    ("vit.layernorm.weight", 13),
    ("classifier.bias", 13),
    ("encoder.pos_embed", 0),
])
def test_parameter_layer_id_other_naming_schemes(name, depth):
    assert parameter_layer_id(name, num_layers=12) == depth


# ----------------------------------------------------------------------------------------------------------------
# Metrics, transforms, data
# ----------------------------------------------------------------------------------------------------------------


def test_accuracy_metric_offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    started = time.perf_counter()
    metric = load_accuracy_metric()  # evaluate's Hub metric cannot be fetched: the local one is returned
    assert time.perf_counter() - started < 30
    assert metric.compute(predictions=[0, 1, 1, 2], references=[0, 1, 0, 2])["accuracy"] == pytest.approx(0.75)

    local = LocalAccuracy()
    assert local.compute(predictions=np.array([1, 1]), references=[1, 0], normalize=False) == {"accuracy": 1.0}
    local.add_batch(predictions=[0, 0], references=[0, 1])
    local.add_batch(predictions=[2], references=[2])
    assert local.compute()["accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        local.compute(predictions=[0], references=[0, 1])


def test_finetune_transforms_and_collate():
    train, evaluation = make_finetune_transforms(make_image_processor(32))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 40), dtype=np.uint8))  # grayscale
    assert train(image).shape == evaluation(image).shape == (3, 32, 32)
    torch.testing.assert_close(evaluation(image), evaluation(image))
    batch = classification_collate([{"pixel_values": torch.zeros(3, 32, 32), "label": 1},
                                    {"pixel_values": None, "label": 0}])  # an unreadable image is dropped
    assert batch["pixel_values"].shape == (1, 3, 32, 32) and batch["labels"].tolist() == [1]


def test_load_labeled_splits(image_folder):
    splits = load_labeled_splits(train_dir=str(image_folder), train_val_split=0.25, seed=0)
    assert len(splits["train"]) == 24 and len(splits["validation"]) == 8
    assert splits["train"].features["label"].names == ["blue", "red"]
    assert sorted(set(splits["validation"]["label"])) == [0, 1]  # stratified
    shapes = load_labeled_splits(dataset_name="procedural_shapes", max_train_samples=6, max_eval_samples=4,
                                 procedural_image_size=32)
    assert (len(shapes["train"]), len(shapes["validation"])) == (6, 4)
    assert shapes["train"].column_names == ["image", "label"]


def test_load_image_classifier_from_pretraining_repo(tmp_path):
    from transformers import AutoModelForImageClassification

    torch.manual_seed(0)
    pretraining = IJepaForPreTraining(tiny_pretraining_config())
    with torch.no_grad():  # make the two encoders differ
        for parameter in pretraining.context_encoder.parameters():
            parameter.add_(1.0)
    pretraining.save_pretrained(tmp_path)
    for which in ("target", "context"):
        classifier = load_image_classifier(str(tmp_path), num_labels=3, id2label={0: "a", 1: "b", 2: "c"},
                                           encoder=which)
        assert isinstance(classifier, IJepaEncoderForImageClassification) and classifier.config.num_labels == 3
        source = pretraining.encoder_for(which).state_dict()
        for key, value in classifier.encoder.state_dict().items():
            torch.testing.assert_close(value, source[key])
    # what a transformers user types: the Auto class on the pretraining repo gives the target encoder with a new head
    for labels in ({"num_labels": 10}, {"id2label": {0: "a", 1: "b"}, "label2id": {"a": 0, "b": 1}}):
        classifier = AutoModelForImageClassification.from_pretrained(tmp_path, **labels)
        assert isinstance(classifier, IJepaEncoderForImageClassification)
        assert classifier.classifier.out_features == classifier.config.num_labels == (10 if "num_labels" in labels
                                                                                       else 2)
        assert labels.get("id2label", classifier.config.id2label) == classifier.config.id2label
        source = pretraining.target_encoder.state_dict()
        assert all(torch.equal(value, source[key]) for key, value in classifier.encoder.state_dict().items())


# ----------------------------------------------------------------------------------------------------------------
# The Trainer example
# ----------------------------------------------------------------------------------------------------------------


def test_finetune_example(tmp_path, monkeypatch, load_example, image_folder, encoder_repo):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    output_dir = tmp_path / "finetuned"
    trainer = load_example("finetune").main([
        "--model_name_or_path", str(encoder_repo), "--train_dir", str(image_folder), "--train_val_split", "0.25",
        "--output_dir", str(output_dir), "--max_steps", "30", "--per_device_train_batch_size", "8",
        "--learning_rate", "1e-3", "--layer_decay", "0.75", "--warmup_steps", "3", "--logging_steps", "1",
        "--save_strategy", "no", "--report_to", "none", "--use_cpu", "--seed", "0", "--do_train", "--do_eval",
    ])

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses

    # The layer-wise groups reached the optimizer; Trainer's schedule kept their ratios.
    for group in trainer.optimizer.param_groups:
        assert group["initial_lr"] == pytest.approx(1e-3 * group["lr_scale"])
    assert min(g["lr_scale"] for g in trainer.optimizer.param_groups) == pytest.approx(0.75**3)

    eval_results = json.loads((output_dir / "eval_results.json").read_text())
    prediction = trainer.predict(trainer.eval_dataset)  # the accuracy recomputed from the model's own predictions
    expected = float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())
    assert eval_results["eval_accuracy"] == pytest.approx(expected)
    card = (output_dir / "README.md").read_text()
    assert str(encoder_repo) not in card  # a local folder is no base model (Trainer leaves it out as well)

    reloaded = AutoModelForImageClassification.from_pretrained(output_dir).eval()
    assert reloaded.config.id2label == {0: "blue", 1: "red"}
    processor = AutoImageProcessor.from_pretrained(output_dir)
    images = [Image.open(path) for path in sorted(image_folder.glob("*/0.png"))]
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    trained = trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values).logits, trained(pixel_values.to(trained.device)).logits)


# ----------------------------------------------------------------------------------------------------------------
# finetune.py decides training and evaluation as transformers' run_image_classification.py (issue 12)
# ----------------------------------------------------------------------------------------------------------------


def test_tests_run_offline_from_the_first_hub_import():
    """conftest sets HF_HUB_OFFLINE before huggingface_hub is imported: its constant is read at import time."""
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE is True


def _finetune_argv(model: Path, data: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(model), "--train_dir", str(data), "--train_val_split", "0.25",
            "--output_dir", str(output_dir), "--per_device_train_batch_size", "8", "--report_to", "none",
            "--use_cpu", "--seed", "0", "--save_strategy", "no", *extra]


@pytest.mark.parametrize("flags, message", [
    (["--eval_strategy", "epoch"], "--do_train"),  # transformers turns do_eval on: nothing would be trained
    ([], "--do_train"),
    # A crop of no area was accepted; one above the image failed in the crop, naming its own `scale`
    (["--do_train", "--min_crop_scale", "0"], "--min_crop_scale must be in (0, 1], got 0.0"),
    (["--do_train", "--min_crop_scale", "2"], "--min_crop_scale must be in (0, 1], got 2.0"),
    # refused once the data was read, naming the library's resize_ratio
    (["--do_train", "--eval_resize_ratio", "0.5"], "--eval_resize_ratio must be >= 1 (resize, then centre-crop)"),
    # Trainer takes any value; above 1 the targets' weights turn negative
    (["--do_train", "--label_smoothing_factor", "2"], "--label_smoothing_factor must be in [0, 1), got 2.0"),
    # Trainer ran them, training nothing (or, for --max_steps 0, the default epochs), and the run exited 0
    (["--do_train", "--max_steps", "0"], "--max_steps 0 trains nothing"),
    (["--do_train", "--num_train_epochs", "0"], "--num_train_epochs 0 trains nothing"),
    # Trainer puts it in its parameter groups, which torch's own check (of the default only) does not see: it ran
    (["--do_train", "--weight_decay", "-1"], "--weight_decay must be a finite number >= 0, got -1.0"),
    # refused once the data and the model were read, naming load_image_classifier
    (["--do_train", "--encoder", "foo"], "invalid choice: 'foo'"),
    # Trainer runs it in fp32 on CPU (no autocast), while its card said fp16 ("Native AMP")
    (["--do_train", "--fp16"], "--fp16: fp16 mixed precision is not applied on CPU"),
    # --layer_decay builds its own AdamW: Trainer's --optim and --optim_args were dropped without a word
    (["--do_train", "--layer_decay", "0.75", "--optim", "sgd"], "--optim sgd would not be used: --layer_decay builds"),
    (["--do_train", "--layer_decay", "0.75", "--optim_args", "foo=1"], "--optim_args foo=1 would not be used"),
    # a ZeroDivisionError traceback, and torch's DataLoader error once the data and model were read
    (["--do_train", "--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be a positive integer"),
    (["--do_train", "--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be a positive integer"),
])
def test_finetune_refuses_options_it_cannot_honour_before_it_runs(tmp_path, load_example, image_folder, encoder_repo,
                                                                 capsys, flags, message):
    with pytest.raises(SystemExit):
        load_example("finetune").main(_finetune_argv(encoder_repo, image_folder, tmp_path / "out", *flags))
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_finetune_refuses_a_resume_that_would_train_nothing(tmp_path, load_example, image_folder, encoder_repo,
                                                            capsys):
    """--resume_from_checkpoint without --do_train was dropped without a word: the run evaluated
    --model_name_or_path, not the checkpoint, and resuming checkpoint-2 still moved the later checkpoints aside."""
    finetune = load_example("finetune")
    output_dir = tmp_path / "ft"
    finetune.main(_finetune_argv(encoder_repo, image_folder, output_dir, "--do_train", "--max_steps", "4",
                                 "--save_strategy", "steps", "--save_steps", "2"))
    with pytest.raises(SystemExit):
        finetune.main(_finetune_argv(encoder_repo, image_folder, output_dir, "--do_eval", "--resume_from_checkpoint",
                                     str(output_dir / "checkpoint-2")))
    message = capsys.readouterr().err
    assert "--do_train" in message and "--model_name_or_path" in message, message
    assert (output_dir / "checkpoint-4").is_dir() and not list(output_dir.glob("_abandoned-*"))


def test_finetune_never_overwrites_another_run_unasked(tmp_path, load_example, image_folder, encoder_repo):
    output_dir = tmp_path / "previous"
    output_dir.mkdir()
    (output_dir / "README.md").write_text("another run's card")
    (output_dir / "all_results.json").write_text('{"eval_accuracy": 0.9}')
    finetune = load_example("finetune")
    with pytest.raises(ValueError, match="--overwrite_output_dir"):
        finetune.main(_finetune_argv(encoder_repo, image_folder, output_dir, "--do_eval"))
    assert (output_dir / "README.md").read_text() == "another run's card"
    assert json.loads((output_dir / "all_results.json").read_text()) == {"eval_accuracy": 0.9}
    finetune.main(_finetune_argv(encoder_repo, image_folder, output_dir, "--do_eval", "--overwrite_output_dir"))
    assert "eval_accuracy" in json.loads((output_dir / "eval_results.json").read_text())


def test_finetune_resume_keyword_is_latest_as_in_pretraining(tmp_path):
    from ijepa_hf import scripts as finetune  # the resolver of the Trainer scripts' --resume_from_checkpoint
    assert finetune.resolve_resume_checkpoint("latest", tmp_path) is None  # nothing yet: starts fresh
    for step in (5, 12):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (tmp_path / f"checkpoint-{step}" / "optimizer.pt").write_bytes(b"its optimizer state")
    assert finetune.resolve_resume_checkpoint("latest", tmp_path) == str(tmp_path / "checkpoint-12")
    with pytest.warns(FutureWarning, match="latest"):
        assert finetune.resolve_resume_checkpoint("last", tmp_path) == str(tmp_path / "checkpoint-12")
    assert finetune.resolve_resume_checkpoint(str(tmp_path / "checkpoint-5"), tmp_path) == str(tmp_path / "checkpoint-5")


def test_finetuned_card_carries_the_licence_of_meta_weights(tmp_path, load_example, image_folder):
    from huggingface_hub import ModelCard

    from ijepa_hf.cli import main as cli_main
    from ijepa_hf.licensing import META_WEIGHTS_LICENSE
    from tiny import GOLDEN_CHECKPOINT

    assert cli_main(["convert", str(GOLDEN_CHECKPOINT), str(tmp_path / "enc"), "--encoder-only", "--num-heads", "3"]) == 0
    output_dir = tmp_path / "ft"
    load_example("finetune").main(_finetune_argv(tmp_path / "enc", image_folder, output_dir, "--do_train",
                                                 "--max_steps", "1"))
    card = ModelCard.load(output_dir / "README.md")
    assert card.data.license == META_WEIGHTS_LICENSE
    assert "Validation data" not in _card_rows(card.content) and not card.data.eval_results  # nothing evaluated
    assert json.loads((output_dir / "config.json").read_text())["weights_license"] == META_WEIGHTS_LICENSE


def _card_rows(text: str) -> dict[str, str]:
    """The two-column tables of a card (architecture and training) as {label: value}."""
    return {label.strip("` "): value for label, value in re.findall(r"^\| ([^|]+?) \| ([^|]+?) \|$", text, re.M)}


def test_finetuned_card_describes_the_run(tmp_path, load_example, image_folder, encoder_repo):
    """finetune.py wrote transformers' generated card: fine-tuned from a pretrained I-JEPA encoder in a local folder
    it said 'This model was trained from scratch', named the evaluation split 'train' (the images held out of the
    training folder), and said nothing of the recipe (layer decay, crop) or how to load an ijepa_hf model. The card is
    the package's classifier card, with the run's recipe and its measured accuracy."""
    from huggingface_hub import ModelCard

    output_dir = tmp_path / "ft"
    load_example("finetune").main(_finetune_argv(encoder_repo, image_folder, output_dir, "--do_train", "--do_eval",
                                                 "--max_steps", "4", "--learning_rate", "2e-3", "--layer_decay",
                                                 "0.75", "--warmup_steps", "1", "--min_crop_scale", "0.5"))
    card = ModelCard.load(output_dir / "README.md")
    text = card.content
    assert "trained from scratch" not in text and str(encoder_repo) not in text
    assert "generated by ijepa_hf.cards" in text and "import ijepa_hf" in text  # an ijepa_hf_* model type
    rows = _card_rows(text)
    assert encoder_repo.name in rows["Initialised from"] and "I-JEPA encoder" in rows["Initialised from"]
    assert card.data.base_model is None  # a local folder is no Hub base model
    assert rows["Optimisation steps"] == "4"
    assert "0.002" in rows["Learning-rate schedule"] and "1 warm-up step" in rows["Learning-rate schedule"]
    assert "layer-wise learning-rate decay 0.75" in rows["Optimiser"]
    assert "(0.5, 1.0)" in rows["Augmentations"]
    assert rows["Validation data"].startswith("8 images held out of the training images (train_val_split 0.25")
    train_loss = json.loads((output_dir / "train_results.json").read_text())["train_loss"]
    assert rows["Final loss"] == f"{train_loss:.5f} (the run's mean: no step logged a loss)"  # logging_steps 500
    # The accuracy of eval_results.json, on the held-out images, in the metadata and the table
    accuracy = 100 * json.loads((output_dir / "eval_results.json").read_text())["eval_accuracy"]
    [result] = card.data.eval_results
    assert (result.dataset_split, result.metric_type) == ("validation", "accuracy")
    assert result.metric_value == pytest.approx(accuracy, abs=0.01)


def test_the_card_names_the_optimiser_trainer_ran(tmp_path, load_example, image_folder, encoder_repo):
    """Without --layer_decay, Trainer builds the optimiser --optim names; the card said AdamW whatever it was."""
    output_dir = tmp_path / "ft"
    trainer = load_example("finetune").main(_finetune_argv(encoder_repo, image_folder, output_dir, "--do_train",
                                                           "--max_steps", "1", "--optim", "sgd"))
    assert type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__ == "SGD"
    optimiser = _card_rows((output_dir / "README.md").read_text())["Optimiser"]
    assert optimiser.startswith("`sgd` (Trainer's --optim), weight decay 0") and "AdamW" not in optimiser


def test_the_card_of_an_evaluation_only_run_states_no_recipe(tmp_path, load_example, image_folder, encoder_repo):
    """finetune.py --do_eval alone evaluates a classifier: its card listed a learning-rate schedule, optimiser and crop
    that never ran (0 steps) and called the model "trained further"."""
    finetune = load_example("finetune")
    finetune.main(_finetune_argv(encoder_repo, image_folder, tmp_path / "trained", "--do_train", "--max_steps", "1"))
    finetune.main(_finetune_argv(tmp_path / "trained", image_folder, tmp_path / "evaluated", "--do_eval"))
    rows = _card_rows((tmp_path / "evaluated" / "README.md").read_text())
    assert rows["Evaluated model"] == ("not trained by this run: an image classifier "
                                       "(`IJepaEncoderForImageClassification`): the local folder `trained`")
    assert not {"Optimiser", "Learning-rate schedule", "Augmentations", "Optimisation steps"} & set(rows), rows
    assert rows["Validation data"].startswith("8 images held out of the training images")


def test_a_wrong_column_name_is_refused_naming_the_scripts_flag(tmp_path, load_example, image_folder, encoder_repo):
    """finetune.py --label_column_name lbl said "pass label_column=", a keyword its user never sees; the message now
    names the flag too (as the library's other messages do), and lists the data's columns."""
    finetune = load_example("finetune")
    with pytest.raises(ValueError, match=r"label column 'lbl' not found in \['image', 'label'\]; .*"
                                         r"--label_column_name"):
        finetune.main(_finetune_argv(encoder_repo, image_folder, tmp_path / "a", "--do_train", "--label_column_name",
                                     "lbl"))
    with pytest.raises(ValueError, match=r"image column 'img' not found; columns are \['image', 'label'\].*"
                                         r"--image_column_name"):
        finetune.main(_finetune_argv(encoder_repo, image_folder, tmp_path / "b", "--do_train", "--image_column_name",
                                     "img"))


def test_a_model_other_than_i_jepa_keeps_trainers_card_and_card_options_are_not_dropped(tmp_path, image_folder):
    """finetune.py fine-tunes any transformers image classifier: the I-JEPA card would misdescribe a ViT, which keeps
    Trainer's draft (with the run's licence). Trainer's card options do not reach the package's card, so they are
    refused rather than dropped."""
    from transformers import TrainingArguments, ViTConfig, ViTForImageClassification

    from ijepa_hf.finetuning import FinetuningTrainer, describe_initialisation
    from ijepa_hf.licensing import WeightsLicense

    splits = load_labeled_splits(train_dir=str(image_folder), train_val_split=0.25)
    vit = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, intermediate_size=64, num_labels=2))
    vit.save_pretrained(tmp_path / "vit")
    assert describe_initialisation(str(tmp_path / "vit")) == ("an image classifier (`ViTForImageClassification`): "
                                                              "the local folder `vit`")
    info = dict(initialised_from="a ViT", licence=WeightsLicense("mit", None), dataset_name=None,
                train_dataset=splits["train"], eval_dataset=splits["validation"], layer_decay=None,
                min_crop_scale=0.08, eval_resize_ratio=1.0)
    args = TrainingArguments(str(tmp_path / "out"), report_to="none", use_cpu=True)
    trainer = FinetuningTrainer(model=vit, args=args, card_info=info)
    trainer.create_model_card()
    text = (tmp_path / "out" / "README.md").read_text()
    assert "generated_from_trainer" in text and "license: mit" in text and "I-JEPA" not in text
    with pytest.raises(TypeError, match="language would not reach the card"):
        trainer.create_model_card(language="en")


def test_a_new_head_standardises_the_pooled_features_and_saved_classifiers_load_as_trained(tmp_path):
    """A head on an encoder repo gets the pooler norm (BatchNorm without affine, running statistics initialised);
    a classifier saved without one (older versions: no `pooler_norm` key) keeps its plain head and its outputs."""
    from transformers import AutoModelForImageClassification

    from ijepa_hf.configuration_ijepa_hf import NEW_HEAD_POOLER_NORM

    torch.manual_seed(0)
    IJepaEncoderModel(tiny_encoder_config()).save_pretrained(tmp_path / "encoder")
    pixels = torch.randn(4, 3, 32, 32)
    new = AutoModelForImageClassification.from_pretrained(tmp_path / "encoder", num_labels=3)
    assert new.config.pooler_norm == NEW_HEAD_POOLER_NORM == "batchnorm"
    assert isinstance(new.pooler_norm, torch.nn.BatchNorm1d) and not new.pooler_norm.affine
    assert torch.equal(new.pooler_norm.running_var, torch.ones(32)) and new.pooler_norm.running_mean.abs().sum() == 0
    new.train()(pixels)  # one batch moves the running statistics; saved and reloaded with them
    new.save_pretrained(tmp_path / "classifier")
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "classifier").eval()
    assert torch.equal(reloaded.pooler_norm.running_mean, new.pooler_norm.running_mean)
    torch.testing.assert_close(reloaded(pixels).logits, new.eval()(pixels).logits)
    # The trained head keeps its norm: another one (finetune.py --pooler_norm) fed it other inputs without a word
    with pytest.raises(ValueError, match=r"pooler_norm='layernorm'\): this classifier's head was trained on pooled "
                                         r"features normalised by 'batchnorm'"):
        AutoModelForImageClassification.from_pretrained(tmp_path / "classifier", pooler_norm="layernorm")
    same = AutoModelForImageClassification.from_pretrained(tmp_path / "classifier", pooler_norm="batchnorm").eval()
    torch.testing.assert_close(same(pixels).logits, reloaded(pixels).logits)
    explicit = AutoModelForImageClassification.from_pretrained(tmp_path / "encoder", num_labels=3, pooler_norm="none")
    assert isinstance(explicit.pooler_norm, torch.nn.Identity)
    # a classifier of an earlier version: its config has no pooler_norm, its head sees the raw pooled features
    old = IJepaEncoderForImageClassification(tiny_encoder_config(num_labels=3)).eval()
    old.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    config.pop("pooler_norm")
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "old").eval()
    assert isinstance(loaded.pooler_norm, torch.nn.Identity)
    torch.testing.assert_close(loaded(pixels).logits, old(pixels).logits)
    with pytest.raises(ValueError, match="`pooler_norm` must be one of"):
        tiny_encoder_config(pooler_norm="groupnorm")


def test_a_training_batch_of_one_image_uses_the_pooler_norms_running_statistics(tmp_path, load_example, image_folder,
                                                                                 encoder_repo):
    """BatchNorm cannot standardise a batch of one image: the last batch of an epoch whose size leaves one image over
    stopped fine-tuning with torch's "Expected more than 1 value per channel". That batch is standardised with the
    running statistics (left unchanged); with none yet (every batch of one image), the run is refused, naming the
    fix."""
    from transformers import AutoModelForImageClassification

    torch.manual_seed(0)
    model = AutoModelForImageClassification.from_pretrained(encoder_repo, num_labels=3).train()
    with pytest.raises(ValueError, match=r"pooler_norm='batchnorm'.*at least 2 images.*'layernorm'"):
        model(torch.randn(1, 3, 32, 32))
    model(torch.randn(4, 3, 32, 32))  # statistics from a real batch
    mean, var = model.pooler_norm.running_mean.clone(), model.pooler_norm.running_var.clone()
    one = torch.randn(1, 3, 32, 32)
    logits = model(one, labels=torch.tensor([2])).logits
    assert torch.equal(model.pooler_norm.running_mean, mean) and torch.equal(model.pooler_norm.running_var, var)
    torch.testing.assert_close(logits, model.eval()(one).logits)  # as in evaluation

    # Through the example: 9 training images in batches of 8.
    trainer = load_example("finetune").main(_finetune_argv(encoder_repo, image_folder, tmp_path / "ft", "--do_train",
                                                           "--max_train_samples", "9", "--num_train_epochs", "1"))
    assert trainer.state.global_step == 2
    # A per-device batch of one image: refused with the example's option, which then trains.
    single = ["--do_train", "--max_steps", "2", "--per_device_train_batch_size", "1"]
    with pytest.raises(ValueError, match="--pooler_norm layernorm"):
        load_example("finetune").main(_finetune_argv(encoder_repo, image_folder, tmp_path / "one", *single))
    trainer = load_example("finetune").main(_finetune_argv(encoder_repo, image_folder, tmp_path / "one-ln", *single,
                                                           "--pooler_norm", "layernorm"))
    assert trainer.model.config.pooler_norm == "layernorm" and trainer.state.global_step == 2


# ----------------------------------------------------------------------------------------------------------------
# finetune.py on a cluster: resuming, a second job into the folder, pushing (as the pretraining scripts)
# ----------------------------------------------------------------------------------------------------------------


def test_finetune_refuses_to_resume_under_other_settings_naming_them(tmp_path, load_example, image_folder,
                                                                     encoder_repo):
    """Trainer loads the checkpoint's optimizer and scheduler over new ones: a resume with another --learning_rate
    or --layer_decay went on with the checkpoint's without a word. As the pretraining scripts, it is refused,
    naming each setting; a longer run (--max_steps) continues, its schedule recomputed for the new length."""
    finetune = load_example("finetune")
    output_dir = tmp_path / "ft"
    first = ["--do_train", "--learning_rate", "1e-3", "--layer_decay", "0.75", "--save_strategy", "steps",
             "--save_steps", "2"]
    finetune.main(_finetune_argv(encoder_repo, image_folder, output_dir, *first, "--max_steps", "2"))
    resumed = [*first, "--max_steps", "4", "--resume_from_checkpoint", "latest"]
    changed = [arg if arg != "1e-3" else "5e-3" for arg in resumed]
    with pytest.raises(ValueError, match=r"Cannot resume exactly: .*learning_rate is 0.005, the checkpoint was "
                                         r"trained with 0.001"):
        finetune.main(_finetune_argv(encoder_repo, image_folder, output_dir, *changed))
    with pytest.raises(ValueError, match=r"layer_decay is 0.5, the checkpoint was trained with 0.75"):
        finetune.main(_finetune_argv(encoder_repo, image_folder, output_dir,
                                     *[arg if arg != "0.75" else "0.5" for arg in resumed]))
    with pytest.raises(ValueError, match=r"data is \{.images.: 9, .*the checkpoint was trained with \{.*.images.: 24\}"):
        finetune.main(_finetune_argv(encoder_repo, image_folder, output_dir, *resumed, "--max_train_samples", "9"))
    assert not (output_dir / "checkpoint-4").exists()
    trainer = finetune.main(_finetune_argv(encoder_repo, image_folder, output_dir, *resumed))
    assert trainer.state.global_step == 4
    # Resuming an earlier checkpoint moves the later ones aside; a refused resume used to have moved them already
    # (`latest` then went on from the earlier one). Refused before anything in the folder moves:
    earlier = [arg if arg != "latest" else str(output_dir / "checkpoint-2") for arg in changed]
    with pytest.raises(ValueError, match=r"Cannot resume exactly: .*learning_rate is 0.005"):
        finetune.main(_finetune_argv(encoder_repo, image_folder, output_dir, *earlier))
    assert (output_dir / "checkpoint-4").is_dir() and not list(output_dir.glob("_abandoned-*"))
    assert json.loads((output_dir / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4


def test_finetune_refuses_a_folder_another_run_is_training_into(tmp_path, load_example, image_folder, encoder_repo):
    """As the pretraining scripts: a second job into the folder of a live one (a requeue while the first still
    runs, two jobs given one folder) fails at once, naming the holder, instead of both writing checkpoints there."""
    from ijepa_hf.training.checkpointing import OutputDirInUseError, OutputDirLock

    output_dir = tmp_path / "ft"
    with OutputDirLock(output_dir):  # the live run
        with pytest.raises(OutputDirInUseError, match="is in use by another run"):
            load_example("finetune").main(_finetune_argv(encoder_repo, image_folder, output_dir, "--do_train",
                                                         "--max_steps", "2", "--resume_from_checkpoint", "latest"))
    assert not list(output_dir.glob("checkpoint-*")) and not (output_dir / "config.json").exists()


def test_finetune_push_leaves_out_the_replaced_run_and_the_lock(tmp_path, load_example, image_folder, encoder_repo,
                                                                fake_hub, hf_home):
    """--overwrite_output_dir moves the other run's checkpoints aside in the folder; Trainer's push uploads the
    folder, and uploaded them (its optimizer state, its pickled arguments). What it leaves out of a push is what
    starts with `_` and the top-level `checkpoint-*`: the folder set aside and the run lock must be among them."""
    import subprocess
    import sys

    from hub_utils import REPO_ROOT, hub_env

    output_dir = tmp_path / "ft"
    save = ["--do_train", "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2"]
    load_example("finetune").main(_finetune_argv(encoder_repo, image_folder, output_dir, *save))
    env = {**hub_env(fake_hub, hf_home), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "finetune.py"),
                           *_finetune_argv(encoder_repo, image_folder, output_dir, *save, "--overwrite_output_dir",
                                           "--push_to_hub", "--hub_model_id", "someone/finetuned")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    listing = subprocess.run(
        [sys.executable, "-c", "from huggingface_hub import HfApi; print(HfApi().list_repo_files('someone/finetuned'))"],
        env=env, capture_output=True, text=True, timeout=120)
    files = eval(listing.stdout)  # a list of file names printed by the line above  # noqa: S307
    assert "model.safetensors" in files and "README.md" in files
    assert [name for name in files if "checkpoint-" in name or "lock" in name] == [], files
    card = subprocess.run(
        [sys.executable, "-c", "from huggingface_hub import hf_hub_download; "
         "print(open(hf_hub_download('someone/finetuned', 'README.md')).read())"],
        env=env, capture_output=True, text=True, timeout=120).stdout
    assert "generated by ijepa_hf.cards" in card and 'repo_id = "someone/finetuned"' in card  # not Trainer's draft


def test_an_overwriting_run_reports_none_of_the_other_runs_results(tmp_path, load_example, image_folder,
                                                                   encoder_repo):
    """--overwrite_output_dir left the other run's files in the folder until the new run wrote its own: Trainer's
    save_metrics merges into an existing all_results.json, so a new run that only trained reported the other run's
    eval_accuracy as its own (and pushed its eval_results.json). The other run's outputs are moved aside with its
    checkpoints: nothing is deleted, nothing is mixed."""
    finetune = load_example("finetune")
    output_dir = tmp_path / "ft"
    finetune.main(_finetune_argv(encoder_repo, image_folder, output_dir, "--do_train", "--do_eval", "--max_steps",
                                 "2", "--save_strategy", "steps", "--save_steps", "2"))
    other = json.loads((output_dir / "all_results.json").read_text())
    assert "eval_accuracy" in other
    finetune.main(_finetune_argv(encoder_repo, image_folder, output_dir, "--do_train", "--max_steps", "1",
                                 "--overwrite_output_dir"))
    results = json.loads((output_dir / "all_results.json").read_text())
    assert "eval_accuracy" not in results and results["epoch"] > 0, results
    assert not (output_dir / "eval_results.json").exists()
    replaced = next(output_dir.glob("_replaced-*"))
    assert json.loads((replaced / "all_results.json").read_text()) == other
    assert (replaced / "checkpoint-2").is_dir() and (replaced / "eval_results.json").is_file()


_PREEMPTED_FINETUNE = """
import os, signal, sys
import transformers
sys.path.insert(0, {examples!r})
import finetune

calls = []
original = transformers.Trainer.training_step

def training_step(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:  # the scheduler's warning, during the second update
        os.kill(os.getpid(), signal.SIGTERM)
    return original(self, *args, **kwargs)

transformers.Trainer.training_step = training_step
finetune.main(sys.argv[1:])
"""


def test_finetune_saves_and_exits_75_on_a_preemption_signal_and_resumes(tmp_path, image_folder, encoder_repo):
    """As the pretraining scripts: SIGTERM / SIGUSR1 (a cluster's warning before it pre-empts or requeues the job)
    killed fine-tuning where it stood, losing the updates since the last save. It now finishes the update, saves a
    checkpoint and exits with code 75; --resume_from_checkpoint latest continues from that update."""
    import subprocess
    import sys

    from hub_utils import REPO_ROOT

    from ijepa_hf.training import PREEMPTED_EXIT_CODE

    script = tmp_path / "preempted.py"
    script.write_text(_PREEMPTED_FINETUNE.format(examples=str(REPO_ROOT / "examples")))
    output_dir = tmp_path / "ft"
    argv = _finetune_argv(encoder_repo, image_folder, output_dir, "--do_train", "--max_steps", "4")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, str(script), *argv], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == PREEMPTED_EXIT_CODE, proc.stderr[-3000:]
    assert json.loads((output_dir / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2
    assert not (output_dir / "model.safetensors").exists()  # not finished: no final model
    resumed = subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "finetune.py"), *argv,
                              "--resume_from_checkpoint", "latest"], env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 4


def test_finetune_continues_a_model_in_its_own_folder(tmp_path, load_example, image_folder, encoder_repo):
    """`--model_name_or_path ft --output_dir ft --overwrite_output_dir` (fine-tune a fine-tuned model again, in
    place): the model is read before the folder policy moves the earlier run's outputs aside."""
    finetune = load_example("finetune")
    output_dir = tmp_path / "ft"
    finetune.main(_finetune_argv(encoder_repo, image_folder, output_dir, "--do_train", "--max_steps", "2"))
    again = finetune.main(_finetune_argv(output_dir, image_folder, output_dir, "--do_train", "--max_steps", "1",
                                         "--overwrite_output_dir"))
    assert again.state.global_step == 1 and (output_dir / "model.safetensors").is_file()
    assert (next(output_dir.glob("_replaced-*")) / "model.safetensors").is_file()


def test_train_val_split_is_refused_where_the_data_has_its_own_validation(image_folder):
    # A held-out fraction asked for is honoured or refused: with validation data of its own it would silently not
    # be applied (the model selected on other images than the user chose).
    for source in (dict(train_dir=str(image_folder), validation_dir=str(image_folder)),
                   dict(dataset_name="procedural_shapes", max_train_samples=6, max_eval_samples=4,
                        procedural_image_size=32)):
        with pytest.raises(ValueError, match="train_val_split"):
            load_labeled_splits(train_val_split=0.25, **source)
        splits = load_labeled_splits(**source)  # not asked for: the data's own validation split
        assert len(splits["validation"]) in (4, 32)
    with pytest.raises(ValueError, match=r"train_val_split=1\.5.*\(0, 1\)"):
        load_labeled_splits(train_dir=str(image_folder), train_val_split=1.5)
    default = load_labeled_splits(train_dir=str(image_folder), seed=0)  # no validation data: 0.15 held out
    assert (len(default["train"]), len(default["validation"])) == (27, 5)
