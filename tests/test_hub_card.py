"""Tests of the model-card utilities in ``ijepa_hf.cards``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from hub_utils import REPO_ROOT, run_hub_script
from ijepa_hf.cards import (
    BASE_TAGS,
    MODEL_CARD_TEMPLATE_PATH,
    example_encoder_card,
    make_model_card,
    summarize_config,
)

TINY = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
)

TRAINING = {
    "data": "CIFAR-10 train (labels unused)",
    "steps": 12_000,
    "batch_size": 256,
    "masks": {"context_scale": (0.85, 1.0), "target_blocks": 4, "target_scale": (0.15, 0.2)},
    "lr_schedule": "warm-up 1k steps to 1e-3, cosine to 1e-6",
    "ema_schedule": "linear 0.996 -> 1.0",
    "seed": 0,
}

RESULTS = [
    {"task_name": "Linear probe", "dataset_name": "CIFAR-10", "dataset_type": "uoft-cs/cifar10",
     "dataset_split": "test", "metric_type": "accuracy", "metric_value": 0.812},
    {"dataset_name": "CIFAR-10", "metric_type": "accuracy", "metric_name": "k-NN top-1", "metric_value": 0.774},
]


def full_card(**overrides) -> ModelCard:
    kwargs = dict(
        model_name="someone/ijepa-tiny-cifar10",
        kind="encoder",
        config_summary={"model_type": "ijepa", **TINY},
        datasets=["uoft-cs/cifar10"],
        base_model="someone/ijepa-tiny-pretraining",
        tags=["cifar10", "ijepa"],  # duplicate of a base tag on purpose
        training=TRAINING,
        eval_results=RESULTS,
    )
    kwargs.update(overrides)
    return make_model_card(**kwargs)


def test_metadata_round_trips_through_yaml() -> None:
    data = ModelCard(str(full_card())).data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "image-feature-extraction"
    assert data.license == "apache-2.0"
    assert data.tags == [*BASE_TAGS, "cifar10"]
    assert data.base_model == "someone/ijepa-tiny-pretraining"
    assert data.datasets == ["uoft-cs/cifar10"]
    assert data.model_name == "someone/ijepa-tiny-cifar10"
    first, second = data.eval_results
    assert (first.task_type, first.task_name, first.dataset_type, first.dataset_split) == (
        "image-classification", "Linear probe", "uoft-cs/cifar10", "test")
    assert (first.metric_type, first.metric_value) == ("accuracy", 0.812)
    assert second.dataset_type == "CIFAR-10" and second.metric_name == "k-NN top-1"


def test_classifier_kind_and_optional_fields() -> None:
    card = make_model_card(model_name="x/cls", kind="classifier", config_summary={"num_labels": 10})
    data, text = card.data, str(card)
    assert data.pipeline_tag == "image-classification"
    assert data.tags == list(BASE_TAGS) and data.datasets is None and data.base_model is None
    assert "model-index" not in text and "model_name" not in text
    assert "AutoModelForImageClassification" in text
    assert "No training details were provided" in text and "No evaluation results are reported" in text


def test_content_sections() -> None:
    text = str(full_card())
    for heading in ("## Model description", "### Architecture", "## Intended use", "## Limitations",
                    "## How to use", "## Training", "## Evaluation", "## License", "## Citation"):
        assert re.search(rf"^{re.escape(heading)}$", text, re.M), heading
    assert "Joint-Embedding Predictive Architecture" in text and "no [CLS]" in text
    # How to load, with the I-JEPA pooling protocol.
    assert 'AutoImageProcessor.from_pretrained(repo_id)' in text and "AutoModel.from_pretrained(repo_id)" in text
    assert 'repo_id = "someone/ijepa-tiny-cifar10"' in text and ".mean(dim=1)" in text
    # Architecture and training-recipe tables.
    assert "| `hidden_size` | 32 |" in text and "| `patch_size` | 8 |" in text
    assert "| Training data | CIFAR-10 train (labels unused) |" in text
    assert "| Optimisation steps | 12000 |" in text and "| Batch size | 256 |" in text
    assert "| Masking | context_scale=(0.85, 1.0), target_blocks=4, target_scale=(0.15, 0.2) |" in text
    assert "| Learning-rate schedule |" in text and "| Target-encoder EMA momentum | linear 0.996 -> 1.0 |" in text
    assert "| Seed | 0 |" in text  # unknown keys are kept, with a readable label
    # Results table.
    assert "| Linear probe | CIFAR-10 (test) | accuracy | 0.812 |" in text
    assert "| image-classification | CIFAR-10 | k-NN top-1 | 0.774 |" in text
    # Licence and citation.
    assert "released under the `apache-2.0` licence" in text and "CC BY-NC" not in text
    for fragment in ("@inproceedings{assran2023ijepa", "Self-Supervised Learning from Images with a Joint-Embedding "
                     "Predictive Architecture", "Assran, Mahmoud", "LeCun, Yann", "(CVPR)", "2301.08243", "2023"):
        assert fragment in text, fragment


def test_cc_by_nc_statement_for_meta_weights() -> None:
    card = full_card(license="cc-by-nc-4.0", base_model="facebook/ijepa_vith14_1k")
    text = str(card)
    assert card.data.license == "cc-by-nc-4.0"
    assert "**CC BY-NC 4.0**" in text and "non-commercial use only" in text
    assert "facebookresearch/ijepa" in text and "Non-commercial use only" in text  # also under intended use
    # Weights derived from Meta's checkpoints cannot be relabelled with a permissive licence.
    with pytest.raises(ValueError, match="cc-by-nc-4.0"):
        full_card(license="apache-2.0", base_model="facebook/ijepa_vith14_1k")


def test_saves_to_readme(tmp_path: Path) -> None:
    card = full_card()
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.content == card.content
    assert loaded.data.to_dict() == card.data.to_dict()


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="kind"):
        make_model_card(model_name="x/y", kind="decoder", config_summary={})
    with pytest.raises(ValueError, match="metric_value"):
        make_model_card(model_name="x/y", kind="encoder", config_summary={},
                        eval_results=[{"dataset_name": "d", "metric_type": "accuracy"}])


def test_custom_loading_code_and_extra_section() -> None:
    text = str(full_card(loading_code="print('hello')\n", extra="## Notes\n\nTrained on a laptop."))
    assert "```python\nprint('hello')\n```" in text
    assert "## Notes\n\nTrained on a laptop." in text
    assert text.index("## Notes") < text.index("## License")


def test_summarize_config() -> None:
    from transformers import IJepaConfig, IJepaModel

    from ijepa_hf import IJepaPretrainingConfig

    summary = summarize_config(IJepaConfig(**TINY))
    assert summary["model_type"] == "ijepa" and summary["hidden_size"] == 32 and summary["patch_size"] == 8
    assert "num_labels" not in summary  # transformers' default 2-label map is not a real head
    model = IJepaModel(IJepaConfig(**TINY))
    assert summarize_config(model)["num_parameters"] == f"{model.num_parameters():,}"
    nested = summarize_config(IJepaPretrainingConfig(encoder_config=dict(TINY), predictor_config={"hidden_size": 16}))
    assert nested["model_type"] == "ijepa_hf_pretraining"
    assert nested["encoder.hidden_size"] == 32 and nested["predictor.hidden_size"] == 16


def _run_loading_code(card: ModelCard, tmp_path: Path) -> dict:
    """Execute the card's "How to use" snippet, with the example image replaced by a real file."""
    from PIL import Image

    image_path = tmp_path / "example.jpg"
    Image.new("RGB", (40, 48), color=(120, 30, 200)).save(image_path)
    code = re.search(r"```python\n(.*?)```", str(card), re.S).group(1)
    namespace: dict = {}
    exec(code.replace('"example.jpg"', repr(str(image_path))), namespace)
    return namespace


def test_default_loading_code_runs(tmp_path: Path) -> None:
    """The snippet users copy from the card must work: stock encoder, stock classifier, ijepa_hf pretraining."""
    import torch
    from transformers import IJepaConfig, IJepaForImageClassification, IJepaModel

    from ijepa_hf import IJepaPretrainingConfig, IJepaForPreTraining, make_image_processor

    processor = make_image_processor(32)
    checkpoints = {
        "encoder": IJepaModel(IJepaConfig(**TINY)),
        "classifier": IJepaForImageClassification(IJepaConfig(**TINY, id2label={0: "cat", 1: "dog", 2: "owl"})),
        "pretraining": IJepaForPreTraining(
            IJepaPretrainingConfig(
                encoder_config=dict(TINY), predictor_config={"hidden_size": 16, "num_hidden_layers": 1}
            )
        ),
    }
    for kind, model in checkpoints.items():
        local = tmp_path / kind
        model.save_pretrained(local)
        processor.save_pretrained(local)
        card = make_model_card(model_name=str(local), kind=kind, config_summary=summarize_config(model))
        assert ("import ijepa_hf" in str(card)) == (kind == "pretraining")
        namespace = _run_loading_code(card, tmp_path)
        if kind == "classifier":
            assert namespace["logits"].shape == (1, 3)
        else:
            assert namespace["image_embedding"].shape == (1, 32)
            assert torch.isfinite(namespace["image_embedding"]).all()


def test_template_copy_and_example_are_in_sync() -> None:
    """``model_cards/`` holds browsable copies; they must match what the package actually renders."""
    assert (REPO_ROOT / "model_cards" / "model_card_template.md").read_text() == MODEL_CARD_TEMPLATE_PATH.read_text()
    example = (REPO_ROOT / "model_cards" / "example_encoder_card.md").read_text()
    assert example == str(example_encoder_card()), "regenerate it: see model_cards/README.md"
    assert ModelCard(example).data.license == "cc-by-nc-4.0"


def test_card_push_to_fake_hub(fake_hub: str, tmp_path: Path) -> None:
    """The card passes the Hub's README path (validate-yaml, commit) and reads back with the same metadata."""
    run_hub_script(
        """
        from huggingface_hub import HfApi, ModelCard
        from ijepa_hf.cards import example_encoder_card

        card = example_encoder_card()
        HfApi().create_repo("test-org/card-only")
        card.push_to_hub("test-org/card-only")
        loaded = ModelCard.load("test-org/card-only")
        assert loaded.content == card.content
        assert loaded.data.license == "cc-by-nc-4.0" and loaded.data.eval_results[0].metric_value == 79.3
        """,
        fake_hub,
        tmp_path / "home",
    )
