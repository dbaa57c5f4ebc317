"""Publishing I-JEPA models: Hub round trips, remote code, `ijepa-hf convert` repos and the feature pipeline.

Hub clients run in subprocesses (``run_hub_script``) because ``huggingface_hub`` reads ``HF_ENDPOINT`` and
``HF_HUB_OFFLINE`` at import. Pushers and pullers use different ``HF_HOME``s, so every pull goes through the fake
server, and reference tensors travel through safetensors files, never through shared memory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoImageProcessor, AutoModel, AutoModelForPreTraining, IJepaConfig, IJepaModel, pipeline

from hub_utils import run_hub_script
from ijepa_hf import (
    IJepaBackbone,
    IJepaBackboneConfig,
    IJepaEncoderForImageClassification,
    IJepaEncoderModel,
    IJepaPredictorModel,
    IJepaForPreTraining,
    make_image_processor,
)
from ijepa_hf.cli import OFFICIAL_RELEASES
from ijepa_hf.cli import main as cli_main
from ijepa_hf.cards import META_WEIGHTS_LICENSE, card_for_converted_checkpoint
from ijepa_hf.hub import remote_code_auto_map, save_with_remote_code

from tiny import GOLDEN_CHECKPOINT, random_masks, tiny_encoder_config, tiny_pretraining_config

DEAD_ENDPOINT = "http://127.0.0.1:9"  # discard port: nothing listens, any request would fail fast

# kind -> (Auto class that loads it, expected class name); shared by the pull and the offline scripts.
KINDS = {
    "encoder": ("AutoModel", "IJepaEncoderModel"),
    "predictor": ("AutoModel", "IJepaPredictorModel"),
    "pretraining": ("AutoModelForPreTraining", "IJepaForPreTraining"),
    "classifier": ("AutoModelForImageClassification", "IJepaEncoderForImageClassification"),
}

# Prelude of the pull scripts: register the model types, compare a loaded model with the pushed weights bit for bit.
SAME_WEIGHTS = """
import torch
from safetensors.torch import load_file

import ijepa_hf  # noqa: F401

def same(model, path):
    ref, sd = load_file(path), model.state_dict()
    return sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
"""


def _image(seed: int = 0, size: tuple[int, int] = (40, 52)) -> Image.Image:
    """A random RGB image of a size other than the models', so the processor has to resize it."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# ----------------------------------------------------------------------------------------------------------------
# push_to_hub / from_pretrained: revisions, cache, offline
# ----------------------------------------------------------------------------------------------------------------


def test_push_pull_revisions_cache_and_offline(fake_hub: str, tmp_path: Path) -> None:
    """Each model kind: push A with `push_to_hub`, the image processor, then B with `push_model`; pull both."""
    refs = tmp_path / "refs"
    refs.mkdir()
    run_hub_script(
        f"""
        import json, torch
        from huggingface_hub import HfApi
        from safetensors.torch import save_file
        from ijepa_hf import (IJepaEncoderForImageClassification, IJepaEncoderModel, IJepaPredictorModel,
                              IJepaForPreTraining, make_image_processor)
        from ijepa_hf.hub import push_model
        from tiny import tiny_encoder_config, tiny_pretraining_config

        builders = {{
            "encoder": lambda: IJepaEncoderModel(tiny_encoder_config()),
            "predictor": lambda: IJepaPredictorModel(tiny_pretraining_config().predictor_config),
            "pretraining": lambda: IJepaForPreTraining(tiny_pretraining_config()),
            "classifier": lambda: IJepaEncoderForImageClassification(
                tiny_encoder_config(num_labels=3, id2label={{0: "cat", 1: "dog", 2: "fish"}})),
        }}
        processor = make_image_processor(32)
        shas = {{}}
        for kind, build in builders.items():
            repo = f"test-org/hub-{{kind}}"
            torch.manual_seed(0)
            model_a = build()
            model_a.push_to_hub(repo, commit_message="first weights")
            sha_a = HfApi().model_info(repo).sha
            processor.push_to_hub(repo)
            torch.manual_seed(1)
            model_b = build()
            sha_b = push_model(model_b, repo, image_processor=processor, commit_message="second weights").oid
            for name, model in (("a", model_a), ("b", model_b)):
                save_file({{k: v.contiguous() for k, v in model.state_dict().items()}},
                          rf"{refs}/{{kind}}_{{name}}.safetensors")
            shas[kind] = {{"a": sha_a, "b": sha_b}}
        json.dump(shas, open(rf"{refs}/shas.json", "w"))
        """,
        fake_hub,
        tmp_path / "pusher_home",
    )
    shas = json.loads((refs / "shas.json").read_text())
    assert all(s["a"] != s["b"] and len(s["a"]) == len(s["b"]) == 40 for s in shas.values()), shas

    # A fresh process and cache: file listing, latest weights, revision A by its sha, the image processor.
    puller_home = tmp_path / "puller_home"
    run_hub_script(
        SAME_WEIGHTS
        + f"""
import transformers
from huggingface_hub import HfApi

kinds, shas, refs = {KINDS!r}, {shas!r}, r"{refs}"
for kind, (auto_name, class_name) in kinds.items():
    repo, auto = f"test-org/hub-{{kind}}", getattr(transformers, auto_name)
    files = set(HfApi().list_repo_files(repo))
    assert {{"config.json", "model.safetensors", "preprocessor_config.json", "README.md"}} <= files, files
    assert not any(f.endswith(".py") for f in files), files  # plain pushes ship no code
    latest = auto.from_pretrained(repo)
    assert type(latest).__name__ == class_name and type(latest).__module__ == "ijepa_hf.modeling_ijepa_hf"
    assert same(latest, f"{{refs}}/{{kind}}_b.safetensors"), kind
    first = auto.from_pretrained(repo, revision=shas[kind]["a"])
    assert same(first, f"{{refs}}/{{kind}}_a.safetensors") and not same(first, f"{{refs}}/{{kind}}_b.safetensors")
    processor = transformers.AutoImageProcessor.from_pretrained(repo)
    assert processor.size == {{"height": 32, "width": 32}} and list(processor.image_mean) == [0.485, 0.456, 0.406]
    if kind == "pretraining":
        assert not any(p.requires_grad for p in latest.target_encoder.parameters())
    if kind == "classifier":
        assert latest.config.id2label == {{0: "cat", 1: "dog", 2: "fish"}}
""",
        fake_hub,
        puller_home,
    )
    # The cache holds a snapshot per pulled revision.
    for kind, kind_shas in shas.items():
        snapshots = puller_home / "hub" / f"models--test-org--hub-{kind}" / "snapshots"
        assert {kind_shas["a"], kind_shas["b"]} <= {p.name for p in snapshots.iterdir()}, kind

    # Offline, with a dead endpoint: both revisions and the processor come from the cache alone.
    run_hub_script(
        SAME_WEIGHTS
        + f"""
import transformers

kinds, shas, refs = {KINDS!r}, {shas!r}, r"{refs}"
for kind, (auto_name, class_name) in kinds.items():
    repo, auto = f"test-org/hub-{{kind}}", getattr(transformers, auto_name)
    assert same(auto.from_pretrained(repo), f"{{refs}}/{{kind}}_b.safetensors"), kind
    assert same(auto.from_pretrained(repo, revision=shas[kind]["a"]), f"{{refs}}/{{kind}}_a.safetensors"), kind
    transformers.AutoImageProcessor.from_pretrained(repo)
""",
        DEAD_ENDPOINT,
        puller_home,
        offline=True,
    )


def test_every_push_path_writes_our_card(fake_hub: str, tmp_path: Path) -> None:
    """`model.push_to_hub` and `save_pretrained(push_to_hub=True)` upload ijepa_hf's card (kind, licence and base
    model of the weights, the pushed tags), not transformers' generic one; a card the repo already has is kept."""
    run_hub_script(
        f"""
        from huggingface_hub import HfApi, ModelCard
        from ijepa_hf import IJepaEncoderModel, IJepaForPreTraining
        from ijepa_hf.licensing import record_weights_license
        from tiny import tiny_encoder_config, tiny_pretraining_config

        generic = "This model card has been automatically generated."

        encoder = IJepaEncoderModel(tiny_encoder_config())
        encoder.add_model_tags("from-model")
        encoder.push_to_hub("test-org/card-push", tags=["from-push"])
        card = ModelCard.load("test-org/card-push")
        assert generic not in card.text, card.text
        assert "I-JEPA **encoder**" in card.text and 'repo_id = "test-org/card-push"' in card.text, card.text
        assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-feature-extraction"
        assert card.data.license == "apache-2.0" and {{"ijepa", "from-model", "from-push"}} <= set(card.data.tags)

        pretraining = IJepaForPreTraining(tiny_pretraining_config())
        record_weights_license(pretraining, "cc-by-nc-4.0", "facebook/ijepa_vith14_1k")
        pretraining.save_pretrained(r"{tmp_path}/saved", push_to_hub=True, repo_id="test-org/card-save")
        card = ModelCard.load("test-org/card-save")
        assert generic not in card.text and "I-JEPA **pretraining** model" in card.text, card.text
        assert card.data.license == "cc-by-nc-4.0" and card.data.base_model == "facebook/ijepa_vith14_1k"
        assert ModelCard.load(r"{tmp_path}/saved/README.md").text == card.text  # the local folder gets it too

        HfApi().create_repo("test-org/card-own")
        ModelCard("---\\nlicense: mit\\n---\\n# My own card\\n").push_to_hub("test-org/card-own")
        encoder.push_to_hub("test-org/card-own")
        card = ModelCard.load("test-org/card-own")
        assert "# My own card" in card.text and card.data.license == "mit", card.text
        """,
        fake_hub,
        tmp_path / "home",
    )


# ----------------------------------------------------------------------------------------------------------------
# Remote code
# ----------------------------------------------------------------------------------------------------------------


def test_save_with_remote_code_writes_auto_map_and_restores_classes(tmp_path: Path) -> None:
    model = IJepaForPreTraining(tiny_pretraining_config())
    save_with_remote_code(model, tmp_path / "remote", image_processor=make_image_processor(32))
    files = {p.name for p in (tmp_path / "remote").iterdir()}
    assert {"configuration_ijepa_hf.py", "configuration_ijepa_hf_backbone.py", "modeling_ijepa_hf.py",
            "preprocessor_config.json"} <= files
    assert json.loads((tmp_path / "remote" / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "configuration_ijepa_hf.IJepaPretrainingConfig",
        "AutoModel": "modeling_ijepa_hf.IJepaForPreTraining",
        "AutoModelForPreTraining": "modeling_ijepa_hf.IJepaForPreTraining",
    }
    # register_for_auto_class was undone: a later plain save ships neither code nor auto_map.
    assert IJepaForPreTraining._auto_class is None and type(model.config)._auto_class is None
    model.save_pretrained(tmp_path / "plain")
    assert not list((tmp_path / "plain").glob("*.py"))
    assert "auto_map" not in json.loads((tmp_path / "plain" / "config.json").read_text())

    assert remote_code_auto_map(IJepaEncoderForImageClassification(tiny_encoder_config(num_labels=2))) == {
        "AutoConfig": "configuration_ijepa_hf.IJepaEncoderConfig",
        "AutoModel": "modeling_ijepa_hf.IJepaEncoderModel",
        "AutoModelForImageClassification": "modeling_ijepa_hf.IJepaEncoderForImageClassification",
        "AutoBackbone": "modeling_ijepa_hf.IJepaEncoderBackbone",  # the backbone under the encoder's config class
    }
    assert remote_code_auto_map(IJepaBackbone(IJepaBackboneConfig(**tiny_encoder_config().to_dict()))) == {
        "AutoConfig": "configuration_ijepa_hf_backbone.IJepaBackboneConfig",
        "AutoBackbone": "modeling_ijepa_hf.IJepaBackbone",
    }
    stock = IJepaModel(IJepaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                   image_size=32, patch_size=8))
    with pytest.raises(ValueError, match="not an ijepa_hf model"):
        save_with_remote_code(stock, tmp_path / "stock")


def test_remote_code_loads_without_ijepa_hf(fake_hub: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    encoder = IJepaEncoderModel(tiny_encoder_config()).eval()
    pretraining = IJepaForPreTraining(tiny_pretraining_config()).eval()
    save_with_remote_code(encoder, tmp_path / "encoder", image_processor=make_image_processor(32))
    save_with_remote_code(pretraining, tmp_path / "pretraining", image_processor=make_image_processor(32))
    pixels = torch.randn(2, 3, 32, 32)
    context_mask, target_masks = random_masks(2, 16, num_context=8, num_blocks=2, num_targets=3)
    with torch.no_grad():
        out = pretraining(pixels, context_mask, target_masks)
        expected = {
            "pixel_values": pixels, "context_mask": context_mask, "target_masks": target_masks,
            "encoder_last_hidden_state": encoder(pixels).last_hidden_state,
            "encoder_pooler_output": encoder(pixels).pooler_output,
            "image_pooler_output": encoder(**make_image_processor(32)(images=_image(), return_tensors="pt")).pooler_output,
            "predictions": out.predictions, "loss": out.loss,
        }
    save_file(expected, tmp_path / "expected.safetensors")
    save_file(encoder.state_dict(), tmp_path / "encoder_weights.safetensors")

    run_hub_script(
        f"""
        from ijepa_hf.hub import push_folder
        for kind in ("encoder", "pretraining"):
            push_folder(rf"{tmp_path}/{{kind}}", f"test-org/remote-{{kind}}")
        """,
        fake_hub,
        tmp_path / "pusher_home",
    )
    # `sys.modules["ijepa_hf"] = None` makes every import of the package fail, so only the shipped code can run.
    run_hub_script(
        f"""
        import sys
        sys.modules["ijepa_hf"] = None
        import numpy as np, torch
        from PIL import Image
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoModelForImageClassification, AutoModelForPreTraining, pipeline

        try:
            import ijepa_hf  # noqa: F401
        except ImportError:
            pass
        else:
            raise AssertionError("ijepa_hf must not be importable here")
        enc_repo, pre_repo = "test-org/remote-encoder", "test-org/remote-pretraining"
        for kwargs in ({{}}, {{"trust_remote_code": False}}):
            try:
                AutoModel.from_pretrained(enc_repo, **kwargs)
            except ValueError as e:
                assert "trust_remote_code" in str(e), e
            else:
                raise AssertionError(f"remote code ran without trust_remote_code=True ({{kwargs}})")

        exp = load_file(r"{tmp_path / 'expected.safetensors'}")
        close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        encoder = AutoModel.from_pretrained(enc_repo, trust_remote_code=True).eval()
        assert type(encoder).__name__ == "IJepaEncoderModel", type(encoder)
        assert type(encoder).__module__.startswith("transformers_modules."), type(encoder).__module__
        ref = load_file(r"{tmp_path / 'encoder_weights.safetensors'}")
        assert all(torch.equal(encoder.state_dict()[k], v) for k, v in ref.items())
        with torch.no_grad():
            out = encoder(exp["pixel_values"])
        close(out.last_hidden_state, exp["encoder_last_hidden_state"])
        close(out.pooler_output, exp["encoder_pooler_output"])

        classifier = AutoModelForImageClassification.from_pretrained(enc_repo, trust_remote_code=True)
        assert type(classifier).__name__ == "IJepaEncoderForImageClassification"

        for auto in (AutoModelForPreTraining, AutoModel):
            model = auto.from_pretrained(pre_repo, trust_remote_code=True).eval()
            assert type(model).__name__ == "IJepaForPreTraining" and type(model).__module__.startswith("transformers_modules.")
            assert not any(p.requires_grad for p in model.target_encoder.parameters())
            with torch.no_grad():
                out = model(exp["pixel_values"], exp["context_mask"], exp["target_masks"])
            close(out.predictions, exp["predictions"])
            close(out.loss, exp["loss"])

        pixels = np.random.default_rng(0).integers(0, 256, size=(40, 52, 3), dtype=np.uint8)
        extractor = pipeline("image-feature-extraction", model=enc_repo, trust_remote_code=True)
        pooled = torch.tensor(extractor(Image.fromarray(pixels), pool=True))
        close(pooled, exp["image_pooler_output"])
        assert not [m for m, mod in sys.modules.items() if mod is not None and m.split(".")[0] == "ijepa_hf"]
        """,
        fake_hub,
        tmp_path / "puller_home",
    )


# ----------------------------------------------------------------------------------------------------------------
# ijepa-hf convert
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted_all(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("convert_all")
    assert cli_main(["convert", str(GOLDEN_CHECKPOINT), str(out), "--all", "--num-heads", "3"]) == 0
    return out


def test_convert_all_writes_three_ready_repos(converted_all: Path) -> None:
    for kind in ("pretraining", "encoder", "predictor"):
        files = {p.name for p in (converted_all / kind).iterdir()}
        assert files == {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"}, (kind, files)
        card = ModelCard.load(converted_all / kind / "README.md")
        assert card.data.license == META_WEIGHTS_LICENSE == "cc-by-nc-4.0"
        assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-feature-extraction"
        assert card.data.base_model is None and card.data.datasets is None  # not an official release
        assert "CC BY-NC 4.0" in card.text and "official-tiny.pth.tar" in card.text
        assert "| `num_attention_heads` | 3 |" in card.text or "| `encoder.num_attention_heads` | 3 |" in card.text
        assert AutoImageProcessor.from_pretrained(converted_all / kind).size == {"height": 96, "width": 96}

    pretraining = AutoModelForPreTraining.from_pretrained(converted_all / "pretraining")
    encoder = AutoModel.from_pretrained(converted_all / "encoder")
    predictor = AutoModel.from_pretrained(converted_all / "predictor")
    assert isinstance(pretraining, IJepaForPreTraining) and isinstance(encoder, IJepaEncoderModel)
    assert isinstance(predictor, IJepaPredictorModel)
    for part, reference in ((encoder, pretraining.target_encoder), (predictor, pretraining.predictor)):
        ref = reference.state_dict()
        assert all(torch.equal(v, ref[k]) for k, v in part.state_dict().items())

    assert "target encoder" in (converted_all / "encoder" / "README.md").read_text()
    pretraining_card = (converted_all / "pretraining" / "README.md").read_text()
    assert "## Continue pretraining" in pretraining_card and "update_target_encoder" in pretraining_card


def test_card_of_an_official_release_names_base_model_and_dataset() -> None:
    release = "IN22K-vit.h.14-900e"
    model = IJepaEncoderModel(tiny_encoder_config())
    card = card_for_converted_checkpoint(model, kind="encoder", release=release, source=f"{release}.pth.tar",
                                         release_info=OFFICIAL_RELEASES[release], encoder="context",
                                         model_name="someone/ijepa-vith14-22k", remote_code=True)
    data = ModelCard(str(card)).data
    assert data.license == "cc-by-nc-4.0" and data.base_model == "facebook/ijepa_vith14_22k"
    assert data.datasets == ["imagenet-21k"]
    assert "context encoder" in card.text and "trust_remote_code=True" in card.text
    assert 'repo_id = "someone/ijepa-vith14-22k"' in card.text and "| Epochs | 900 |" in card.text


def test_convert_release_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["convert", str(GOLDEN_CHECKPOINT), str(tmp_path / "a"), "--release", "IN1K-vit.b.16"]) == 2
    error = capsys.readouterr().err
    assert "unknown --release 'IN1K-vit.b.16'" in error and "IN1K-vit.h.14-300e" in error
    # A file named like a release is converted with that release's architecture; wrong shapes fail fast.
    renamed = tmp_path / "IN1K-vit.h.14-300e.pth.tar"
    shutil.copy(GOLDEN_CHECKPOINT, renamed)
    assert cli_main(["convert", str(renamed), str(tmp_path / "b")]) == 2
    error = capsys.readouterr().err
    assert "does not match the architecture of release 'IN1K-vit.h.14-300e'" in error
    assert "hidden_size: release 1280 vs checkpoint 96" in error
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert cli_main(["convert", str(GOLDEN_CHECKPOINT), str(tmp_path / "c"), "--to-transformers", "--remote-code"]) == 2


def test_convert_push_to_hub_with_remote_code(fake_hub: str, tmp_path: Path) -> None:
    run_hub_script(
        f"""
        import sys
        from huggingface_hub import HfApi, ModelCard, hf_hub_download
        from ijepa_hf.cli import main

        assert main(["convert", r"{GOLDEN_CHECKPOINT}", r"{tmp_path / 'out'}", "--all", "--num-heads", "3",
                     "--remote-code", "--push-to-hub", "test-org/tiny-converted"]) == 0
        for kind in ("pretraining", "encoder", "predictor"):
            repo = f"test-org/tiny-converted-{{kind}}"
            files = set(HfApi().list_repo_files(repo))
            assert {{"config.json", "model.safetensors", "preprocessor_config.json", "README.md",
                     "configuration_ijepa_hf.py", "modeling_ijepa_hf.py"}} <= files, (repo, files)
            card = ModelCard.load(repo)
            assert card.data.license == "cc-by-nc-4.0" and f'repo_id = "{{repo}}"' in card.text
        """,
        fake_hub,
        tmp_path / "home",
    )
    auto_map = json.loads((tmp_path / "out" / "pretraining" / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForPreTraining"] == "modeling_ijepa_hf.IJepaForPreTraining"


# ----------------------------------------------------------------------------------------------------------------
# image-feature-extraction pipeline
# ----------------------------------------------------------------------------------------------------------------


def test_image_feature_extraction_pipeline(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = IJepaEncoderModel(tiny_encoder_config()).eval()
    processor = make_image_processor(32)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    extractor = pipeline("image-feature-extraction", model=str(tmp_path))
    images = [_image(0), _image(1, size=(64, 48))]
    with torch.no_grad():
        reference = model(**processor(images=images, return_tensors="pt"))
    for i, image in enumerate(images):
        patches = torch.tensor(extractor(image))  # nested lists [1, num_patches, hidden]
        pooled = torch.tensor(extractor(image, pool=True))  # [1, hidden]: our pooler_output, the patch mean
        torch.testing.assert_close(patches[0], reference.last_hidden_state[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pooled[0], reference.pooler_output[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pooled[0], patches[0].mean(dim=0), rtol=1e-5, atol=1e-6)
    tensors = pipeline("image-feature-extraction", model=str(tmp_path), return_tensors=True)(images[0], pool=True)
    assert tensors.shape == (1, 32)
