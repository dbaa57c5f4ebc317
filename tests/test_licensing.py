"""Licences and base models of derived weights, and cards on every push path (issue 12)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from ijepa_hf import (
    IJepaEncoderForImageClassification,
    IJepaEncoderModel,
    IJepaForPreTraining,
    make_image_processor,
)
from ijepa_hf.cli import main as cli_main
from ijepa_hf.cards import make_model_card
from ijepa_hf.hub import push_model
from ijepa_hf.licensing import (
    DEFAULT_LICENSE,
    META_WEIGHTS_LICENSE,
    record_weights_license,
    weights_license,
)

from tiny import GOLDEN_CHECKPOINT, tiny_encoder_config, tiny_pretraining_config

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("licensed")
    assert cli_main(["convert", str(GOLDEN_CHECKPOINT), str(out), "--all", "--num-heads", "3"]) == 0
    return out


def test_converted_configs_record_the_meta_licence(converted):
    for kind in ("pretraining", "encoder", "predictor"):
        config = json.loads((converted / kind / "config.json").read_text())
        assert config["weights_license"] == META_WEIGHTS_LICENSE, kind
    pretraining = json.loads((converted / "pretraining" / "config.json").read_text())
    assert pretraining["encoder_config"]["weights_license"] == META_WEIGHTS_LICENSE


def test_models_derived_from_a_conversion_keep_its_licence(converted, tmp_path):
    pretraining = IJepaForPreTraining.from_pretrained(converted / "pretraining")
    assert weights_license(pretraining).license == META_WEIGHTS_LICENSE  # pretrained further
    exported = pretraining.export_encoder("target")
    assert weights_license(exported).license == META_WEIGHTS_LICENSE
    target = IJepaEncoderModel.from_pretrained(converted / "pretraining")  # the redirect to the target encoder
    assert weights_license(target).license == META_WEIGHTS_LICENSE
    classifier = IJepaEncoderForImageClassification.from_pretrained(converted / "encoder", num_labels=4)
    assert weights_license(classifier).license == META_WEIGHTS_LICENSE  # fine-tuned
    classifier.save_pretrained(tmp_path / "classifier")
    reloaded = IJepaEncoderForImageClassification.from_pretrained(tmp_path / "classifier")
    assert weights_license(reloaded).license == META_WEIGHTS_LICENSE


def test_fresh_weights_get_the_package_licence():
    assert weights_license(IJepaEncoderModel(tiny_encoder_config())) == (DEFAULT_LICENSE, None)


def test_base_model_is_the_hub_source_else_the_recorded_one():
    model = IJepaEncoderModel(tiny_encoder_config())
    record_weights_license(model, META_WEIGHTS_LICENSE, "facebook/ijepa_vith14_1k")
    assert weights_license(model) == (META_WEIGHTS_LICENSE, "facebook/ijepa_vith14_1k")
    assert weights_license(model, source="me/ijepa-continued") == (META_WEIGHTS_LICENSE, "me/ijepa-continued")


def test_a_repo_converted_before_the_field_existed_is_recognised_by_its_card(converted, tmp_path):
    legacy = tmp_path / "legacy"
    shutil.copytree(converted / "encoder", legacy)
    config = json.loads((legacy / "config.json").read_text())
    del config["weights_license"], config["weights_base_model"]
    (legacy / "config.json").write_text(json.dumps(config))
    model = IJepaEncoderModel.from_pretrained(legacy)
    assert weights_license(model).license == META_WEIGHTS_LICENSE


def test_push_model_without_a_card_writes_a_licensed_one(converted, monkeypatch):
    pushed: dict[str, str] = {}

    def fake_push_folder(folder, repo_id, **kwargs):
        pushed.update({p.name: p.read_text() for p in Path(folder).iterdir() if p.suffix in (".md", ".json", ".py")})

    monkeypatch.setattr("ijepa_hf.hub.push_folder", fake_push_folder)
    encoder = IJepaEncoderModel.from_pretrained(converted / "encoder")
    push_model(encoder, "me/tiny-encoder", image_processor=make_image_processor(encoder.config), remote_code=True)
    assert "README.md" in pushed and "modeling_ijepa_hf.py" in pushed
    card = ModelCard(pushed["README.md"])
    assert card.data.license == META_WEIGHTS_LICENSE and "CC BY-NC 4.0" in card.text
    assert "me/tiny-encoder" in card.text

    pushed.clear()
    push_model(IJepaForPreTraining(tiny_pretraining_config()), "me/fresh")
    assert ModelCard(pushed["README.md"]).data.license == DEFAULT_LICENSE


def test_cards_do_not_contradict_any_resolution():
    readme = (REPO_ROOT / "README.md").read_text()
    assert "any resolution" in readme
    card = make_model_card(model_name="x/y", kind="encoder", config_summary={"hidden_size": 32}).text
    assert "interpolation" not in card and "any resolution" in card
    for path in (REPO_ROOT / "model_cards").glob("*.md"):
        assert "need interpolation" not in path.read_text(), path
