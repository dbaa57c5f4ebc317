"""Loading as transformers does (issue 12): mismatched sizes, Auto classes across kinds of repo, wrong-kind inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel, IJepaConfig, IJepaModel, ViTConfig, ViTForImageClassification, pipeline

from ijepa_hf import (
    IJepaEncoderForImageClassification,
    IJepaEncoderModel,
    IJepaPredictorModel,
    IJepaForPreTraining,
    make_image_processor,
)

from tiny import GOLDEN_CHECKPOINT, random_masks, tiny_encoder_config, tiny_pretraining_config


def _same_weights(module: torch.nn.Module, reference: torch.nn.Module) -> bool:
    ours, ref = module.state_dict(), reference.state_dict()
    return ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loading")
    torch.manual_seed(0)
    classifier = IJepaEncoderForImageClassification(tiny_encoder_config(num_labels=3))
    classifier.save_pretrained(root / "classifier")
    IJepaEncoderModel(tiny_encoder_config()).save_pretrained(root / "encoder")
    pretraining = IJepaForPreTraining(tiny_pretraining_config())
    with torch.no_grad():  # a target encoder that differs from the context encoder
        for parameter in pretraining.target_encoder.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    pretraining.save_pretrained(root / "pretraining")
    make_image_processor(pretraining.config.encoder_config).save_pretrained(root / "pretraining")
    stock = IJepaModel(IJepaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                   image_size=32, patch_size=8))
    stock.save_pretrained(root / "stock")
    return {"root": root, "classifier": root / "classifier", "encoder": root / "encoder",
            "pretraining": root / "pretraining", "stock": root / "stock"}


# ------------------------------------------------------------------------------------------------------------------
# ignore_mismatched_sizes, as ViT
# ------------------------------------------------------------------------------------------------------------------


def test_ignore_mismatched_sizes_reheads_a_classifier_and_reports_the_keys(repos):
    original = IJepaEncoderForImageClassification.from_pretrained(repos["classifier"])
    model, info = IJepaEncoderForImageClassification.from_pretrained(
        repos["classifier"], num_labels=5, ignore_mismatched_sizes=True, output_loading_info=True
    )
    assert model.classifier.weight.shape == (5, 32) and model.config.num_labels == 5
    assert _same_weights(model.encoder, original.encoder)
    assert {key for key, *_ in info["mismatched_keys"]} == {"classifier.weight", "classifier.bias"}


def test_vit_and_ijepa_agree_on_mismatched_sizes(tmp_path):
    """The reference behaviour: ViT re-heads with the flag and refuses without it (a RuntimeError naming the flag);
    ours does the same, its error naming the weights and their shapes too."""
    vit = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                              intermediate_size=64, image_size=32, patch_size=8, num_labels=3))
    vit.save_pretrained(tmp_path / "vit")
    ijepa = IJepaEncoderForImageClassification(tiny_encoder_config(num_labels=3))
    ijepa.save_pretrained(tmp_path / "ijepa")
    for cls, path in ((ViTForImageClassification, tmp_path / "vit"), (IJepaEncoderForImageClassification, tmp_path / "ijepa")):
        assert cls.from_pretrained(path, num_labels=5, ignore_mismatched_sizes=True).classifier.out_features == 5
        with pytest.raises(RuntimeError, match="ignore_mismatched_sizes") as error:
            cls.from_pretrained(path, num_labels=5)
    assert "classifier.bias: (3,) saved, (5,) by the config" in str(error.value)


def test_an_encoder_loaded_with_another_image_size_is_told_it_needs_none(tmp_path):
    """An encoder runs at any input size as saved (its fixed sin-cos positions extend to any grid); loading one with
    another `image_size` changes only those tables' shape, and the error says so rather than naming widths and
    depths; a pretraining repo's encoder the same."""
    IJepaEncoderModel(tiny_encoder_config()).save_pretrained(tmp_path / "encoder")
    IJepaForPreTraining(tiny_pretraining_config()).save_pretrained(tmp_path / "pretraining")
    for repo in ("encoder", "pretraining"):
        with pytest.raises(ValueError, match=r"only the fixed sin-cos position tables differ .* any input size as "
                                             r"saved: leave image_size out"):
            IJepaEncoderModel.from_pretrained(tmp_path / repo, image_size=64)
    encoder = IJepaEncoderModel.from_pretrained(tmp_path / "encoder")
    assert encoder(torch.randn(1, 3, 64, 64)).last_hidden_state.shape[1] == 64


def test_a_weights_file_cut_short_is_a_clear_error(tmp_path):
    """A model folder whose weights file was cut short (a copy between file systems that did not finish) stopped every
    script with safetensors' traceback ("incomplete metadata, file not fully covered"); it is now an error naming the
    folder, what is likely wrong and what to do, which the scripts print as one line."""
    IJepaForPreTraining(tiny_pretraining_config()).save_pretrained(tmp_path / "run")
    weights = tmp_path / "run" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for cls in (IJepaForPreTraining, IJepaEncoderModel, IJepaEncoderForImageClassification):
        with pytest.raises(ValueError, match=r"a weights file of .* cannot be read .*cut off or changed after it was "
                                             r"saved .* copy or download it again"):
            cls.from_pretrained(tmp_path / "run")


# ------------------------------------------------------------------------------------------------------------------
# Auto classes across kinds of repo
# ------------------------------------------------------------------------------------------------------------------


def test_automodel_on_a_classifier_returns_its_encoder(repos):
    classifier = IJepaEncoderForImageClassification.from_pretrained(repos["classifier"])
    model, info = AutoModel.from_pretrained(repos["classifier"], output_loading_info=True)
    assert type(model) is IJepaEncoderModel
    assert _same_weights(model, classifier.encoder)
    assert not info["missing_keys"] and not info["unexpected_keys"]


@pytest.mark.parametrize("pooler_norm", ["batchnorm", "layernorm"])
def test_the_encoder_and_backbone_of_a_classifier_with_a_pooler_norm(repos, tmp_path, pooler_norm):
    """A classifier made on an encoder or pretraining repo standardises its pooled features (`pooler_norm`, a
    BatchNorm by default: buffers in its checkpoint), as examples/finetune.py saves it: AutoModel and AutoBackbone on
    it give its encoder, the head's weights left aside as the classifier's own head is."""
    from transformers import AutoBackbone

    kwargs = {} if pooler_norm == "batchnorm" else {"pooler_norm": pooler_norm}
    classifier = IJepaEncoderForImageClassification.from_pretrained(repos["encoder"], num_labels=3, **kwargs)
    assert classifier.config.pooler_norm == pooler_norm
    classifier.save_pretrained(tmp_path / "classifier")
    model = AutoModel.from_pretrained(tmp_path / "classifier")
    assert type(model) is IJepaEncoderModel and _same_weights(model, classifier.encoder)
    backbone = AutoBackbone.from_pretrained(tmp_path / "classifier", out_indices=[1])
    assert _same_weights(backbone, classifier.encoder)


def test_encoder_from_a_pretraining_repo_is_its_target_encoder(repos):
    pretraining = IJepaForPreTraining.from_pretrained(repos["pretraining"])
    encoder, info = IJepaEncoderModel.from_pretrained(repos["pretraining"], output_loading_info=True)
    assert type(encoder) is IJepaEncoderModel
    assert _same_weights(encoder, pretraining.target_encoder)
    assert not _same_weights(encoder, pretraining.context_encoder)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert all(p.requires_grad for p in encoder.parameters())  # a standalone, trainable encoder
    assert encoder.config.model_type == "ijepa_hf_encoder"


def test_classifier_from_a_pretraining_repo_gets_the_target_encoder_and_a_new_head(repos):
    pretraining = IJepaForPreTraining.from_pretrained(repos["pretraining"])
    classifier = IJepaEncoderForImageClassification.from_pretrained(repos["pretraining"], num_labels=5)
    assert classifier.classifier.out_features == 5
    assert _same_weights(classifier.encoder, pretraining.target_encoder)


def test_pretraining_repo_serves_feature_extraction_with_its_target_encoder(repos):
    pretraining = IJepaForPreTraining.from_pretrained(repos["pretraining"])
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = pretraining.target_encoder(pixels)
        output = AutoModel.from_pretrained(repos["pretraining"])(pixel_values=pixels)
    torch.testing.assert_close(output.last_hidden_state, expected.last_hidden_state, atol=0, rtol=0)
    torch.testing.assert_close(output.pooler_output, expected.pooler_output, atol=0, rtol=0)

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    extractor = pipeline("image-feature-extraction", model=str(repos["pretraining"]))
    features = torch.tensor(extractor(image))
    processor = make_image_processor(pretraining.config.encoder_config)
    with torch.no_grad():
        reference = pretraining.target_encoder(**processor(image, return_tensors="pt")).last_hidden_state
    torch.testing.assert_close(features, reference, atol=1e-5, rtol=0)
    pooled = torch.tensor(extractor(image, pool=True))
    torch.testing.assert_close(pooled, reference.mean(1), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------------------------
# Wrong-kind inputs: short errors naming what was given, what was expected and the fix
# ------------------------------------------------------------------------------------------------------------------


def test_encoder_repo_where_a_pretraining_repo_is_expected(repos):
    with pytest.raises(ValueError) as error:
        IJepaForPreTraining.from_pretrained(repos["encoder"])
    message = str(error.value)
    assert "ijepa_hf_encoder" in message and "ijepa_hf_pretraining" in message and "ijepa-hf convert" in message
    assert len(message) < 700, message


def test_raw_official_checkpoint_is_refused_with_the_convert_command():
    for cls in (IJepaEncoderModel, IJepaForPreTraining, IJepaEncoderForImageClassification):
        with pytest.raises(ValueError) as error:
            cls.from_pretrained(str(GOLDEN_CHECKPOINT))
        message = str(error.value)
        assert str(GOLDEN_CHECKPOINT) in message and "ijepa-hf convert" in message and "JSON" not in message
        assert len(message) < 700, message


def test_a_local_path_that_does_not_exist_is_named_as_such(tmp_path, monkeypatch):
    """A mistyped local folder is not a Hub repo id: transformers answered "Repo id must be in the form 'repo_name' or
    'namespace/repo_name'". Every class and loading helper says the folder does not exist; a path relative to the
    working directory counts too."""
    from ijepa_hf.loading import load_encoder, load_image_classifier

    monkeypatch.chdir(tmp_path)
    for path in (str(tmp_path / "runs" / "missing"), "./missing", "runs/missing/encoder"):
        for load in (IJepaEncoderModel.from_pretrained, IJepaForPreTraining.from_pretrained,
                     IJepaEncoderForImageClassification.from_pretrained, load_encoder,
                     lambda name: load_image_classifier(name, num_labels=3)):
            with pytest.raises(ValueError, match=r"no folder .*missing.*config\.json"):
                load(path)


def test_a_local_folder_without_a_config_is_named_as_such(tmp_path):
    """A folder that holds no config.json (a checkpoint of pretrain.py, `step_N/`: weights and optimizer state; a
    folder whose files went elsewhere) got transformers' "Unrecognized model ... Should have a `model_type` key in its
    config.json", as if the config were there but incomplete. The error now says the config is missing and what the
    folder may be instead."""
    from ijepa_hf.loading import load_encoder, load_image_classifier

    step = tmp_path / "run" / "step_4"
    step.mkdir(parents=True)
    (step / "checkpoint.json").write_text("{}")
    for load in (IJepaEncoderModel.from_pretrained, IJepaForPreTraining.from_pretrained, load_encoder,
                 lambda name: load_image_classifier(name, num_labels=3)):
        with pytest.raises(ValueError, match=r"step_4.* has no config\.json: it is a training checkpoint of "
                                             r"pretrain\.py, not a saved model\. .*--resume_from_checkpoint"):
            load(str(step))
    (step / "checkpoint.json").unlink()  # a folder whose files went elsewhere
    with pytest.raises(ValueError, match=r"step_4.* has no config\.json: not a saved model\."):
        load_encoder(str(step))
    IJepaEncoderModel(tiny_encoder_config()).save_pretrained(tmp_path / "repo" / "encoder")  # `subfolder` is honoured
    assert IJepaEncoderModel.from_pretrained(tmp_path / "repo", subfolder="encoder").config.hidden_size == 32


def test_stock_transformers_repo_is_refused_with_the_import_function(repos):
    for cls in (IJepaEncoderModel, IJepaForPreTraining, IJepaPredictorModel):
        with pytest.raises(ValueError) as error:
            cls.from_pretrained(repos["stock"])
        message = str(error.value)
        assert "'ijepa'" in message and "encoder_from_transformers" in message, message
        assert len(message) < 700, message


def test_predictor_class_on_a_pretraining_repo_names_the_fix(repos):
    with pytest.raises(ValueError, match=r"IJepaForPreTraining\.from_pretrained\(.*\)\.predictor"):
        IJepaPredictorModel.from_pretrained(repos["pretraining"])


def test_strict_loading_error_is_short(tmp_path):
    IJepaEncoderModel(tiny_encoder_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError) as error:
        IJepaEncoderModel.from_pretrained(tmp_path, num_hidden_layers=4)
    message = str(error.value)
    assert "missing keys" in message and "blocks.2.attn" in message and len(message) < 700, message


def test_load_image_classifier_reheads_with_ignore_mismatched_sizes(repos):
    """What `examples/finetune.py --ignore_mismatched_sizes` calls on a fine-tuned classifier repo."""
    from ijepa_hf.loading import load_image_classifier

    original = IJepaEncoderForImageClassification.from_pretrained(repos["classifier"])
    labels = {i: name for i, name in enumerate("abcde")}
    model = load_image_classifier(str(repos["classifier"]), num_labels=5, id2label=labels,
                                  label2id={v: k for k, v in labels.items()}, ignore_mismatched_sizes=True)
    assert model.classifier.out_features == 5 and model.config.id2label[4] == "e"
    assert _same_weights(model.encoder, original.encoder)
    # Without it: the head's size, the labels asked for and the fix, before anything is loaded.
    with pytest.raises(ValueError, match=r"classifier.*has a head of 3 labels \(LABEL_0, LABEL_1, LABEL_2\); 5 "
                                         r"were asked for \(a, b, c, d, e\).*ignore_mismatched_sizes=True "
                                         r"\(--ignore_mismatched_sizes in examples/finetune.py\)"):
        load_image_classifier(str(repos["classifier"]), num_labels=5, id2label=labels)


def test_repo_loaders_refuse_a_raw_checkpoint_with_the_convert_command():
    from ijepa_hf.loading import load_encoder
    from ijepa_hf.loading import load_image_classifier

    with pytest.raises(ValueError, match=r"load_encoder\(.*ijepa-hf convert"):
        load_encoder(str(GOLDEN_CHECKPOINT))
    with pytest.raises(ValueError, match=r"load_image_classifier\(.*ijepa-hf convert"):
        load_image_classifier(str(GOLDEN_CHECKPOINT), num_labels=2)


# ------------------------------------------------------------------------------------------------------------------
# One loading path (issue 26): every class and `loading.py` load one encoder of a pretraining repo through
# transformers' `from_pretrained` with `key_mapping`, keyword arguments passed through
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["target", "context"])
def test_every_encoder_class_loads_either_encoder_of_a_pretraining_repo(repos, which):
    from ijepa_hf import IJepaBackbone

    pretraining = IJepaForPreTraining.from_pretrained(repos["pretraining"])
    reference = pretraining.encoder_for(which)
    encoder, info = IJepaEncoderModel.from_pretrained(repos["pretraining"], encoder=which, output_loading_info=True)
    assert _same_weights(encoder, reference) and not info["missing_keys"] and not info["unexpected_keys"]
    classifier = IJepaEncoderForImageClassification.from_pretrained(repos["pretraining"], encoder=which, num_labels=4)
    assert _same_weights(classifier.encoder, reference) and classifier.classifier.out_features == 4
    backbone = IJepaBackbone.from_pretrained(repos["pretraining"], encoder=which, out_indices=[1])
    assert _same_weights(backbone, reference)


def test_the_encoder_choice_is_refused_where_it_means_nothing(repos):
    with pytest.raises(ValueError, match=r"encoder='context'.*pretraining repo"):
        IJepaEncoderModel.from_pretrained(repos["encoder"], encoder="context")
    with pytest.raises(ValueError, match=r"encoder must be one of \('target', 'context'\)"):
        IJepaEncoderModel.from_pretrained(repos["pretraining"], encoder="middle")
    # The whole pretraining model holds both encoders: a choice of one is refused, not ignored.
    for load in (IJepaForPreTraining.from_pretrained, AutoModel.from_pretrained):
        with pytest.raises(ValueError, match=r"encoder='context'.*IJepaForPreTraining is not one \(it loads both\)"):
            load(repos["pretraining"], encoder="context")


def test_from_pretrained_keywords_pass_through_unlisted(repos):
    """Keywords that transformers' `from_pretrained` takes reach it, even those no list of ours names (the list this
    replaced missed `gguf_file` and later additions, and refused them as unknown config fields)."""
    from ijepa_hf import IJepaBackbone

    for cls in (IJepaEncoderModel, IJepaEncoderForImageClassification, IJepaBackbone):
        model = cls.from_pretrained(repos["pretraining"], gguf_file=None, dtype=torch.bfloat16)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}, cls.__name__


def test_loading_helpers_take_the_model_classes_path(repos):
    """`load_encoder` / `load_image_classifier` on a pretraining repo load the one encoder they need, strictly, with
    every keyword passed to `from_pretrained` (dtype included)."""
    from ijepa_hf.loading import load_encoder, load_image_classifier

    pretraining = IJepaForPreTraining.from_pretrained(repos["pretraining"])
    encoder, _ = load_encoder(str(repos["pretraining"]), encoder="context", dtype=torch.bfloat16)
    def same_parameters(module, reference):  # the sin-cos buffer stays fp32 under any dtype
        ours, ref = dict(module.named_parameters()), dict(reference.named_parameters())
        return ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)

    reference = pretraining.context_encoder.to(torch.bfloat16)
    assert type(encoder) is IJepaEncoderModel and same_parameters(encoder, reference)
    classifier = load_image_classifier(str(repos["pretraining"]), num_labels=3, encoder="context", dtype=torch.bfloat16)
    assert {p.dtype for p in classifier.parameters()} == {torch.bfloat16}
    assert same_parameters(classifier.encoder, reference)
    assert classifier.config.pooler_norm is not None  # a new head, as from the class itself


def test_the_model_file_holds_models_not_loading_policy():
    source = Path(__file__).resolve().parents[1] / "ijepa_hf" / "modeling_ijepa_hf.py"
    text = source.read_text()
    for name in ("_HUB_KWARGS", "_LOADING_KWARGS", "get_config_dict", "_wrong_kind_message", "_REPO_KINDS"):
        assert name not in text, name


@pytest.mark.parametrize("which", ["target", "context"])
def test_an_encoder_taken_from_a_pretraining_repo_saves_as_its_own_kind(repos, tmp_path, which):
    """Saved after loading one encoder of a pretraining repo, a model is a plain encoder / classifier / backbone repo
    that loads back with the same weights. transformers re-applies a load's `key_mapping` in reverse on save; the
    mapping that picked the encoder (`target_encoder.` -> ``) must not come back, or every saved key gets the prefix
    and the saved model (a fine-tuned classifier included) no longer loads."""
    from safetensors import safe_open

    from ijepa_hf import IJepaBackbone

    for cls, kwargs in ((IJepaEncoderModel, {}), (IJepaEncoderForImageClassification, {"num_labels": 3}),
                        (IJepaBackbone, {"out_indices": [1]})):
        model = cls.from_pretrained(repos["pretraining"], encoder=which, **kwargs)
        folder = tmp_path / f"{cls.__name__}-{which}"
        model.save_pretrained(folder)
        with safe_open(folder / "model.safetensors", "pt") as saved:
            prefixed = [key for key in saved.keys() if key.startswith(("target_encoder.", "context_encoder."))]
        assert not prefixed, f"{cls.__name__} saved pretraining-repo keys: {prefixed[:3]}"
        reloaded = cls.from_pretrained(folder)
        assert _same_weights(reloaded, model), cls.__name__


def test_a_callers_own_key_mapping_is_still_reversed_on_save(repos, tmp_path):
    """Only the renaming this package adds is dropped: a caller's `key_mapping` (here for a pretraining repo saved
    with other names for the MLP's first layer) is reversed on save as transformers does for any model."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    legacy = tmp_path / "legacy"
    shutil.copytree(repos["pretraining"], legacy)
    weights = load_file(legacy / "model.safetensors")
    save_file({key.replace(".mlp.fc1.", ".mlp.dense1."): value for key, value in weights.items()},
              legacy / "model.safetensors", metadata={"format": "pt"})
    mapping = {r"\.mlp\.dense1\.": ".mlp.fc1."}
    model = IJepaEncoderModel.from_pretrained(legacy, key_mapping=mapping)
    assert _same_weights(model, IJepaForPreTraining.from_pretrained(repos["pretraining"]).target_encoder)
    model.save_pretrained(tmp_path / "enc")
    with safe_open(tmp_path / "enc" / "model.safetensors", "pt") as saved:
        keys = list(saved.keys())
    assert any(".mlp.dense1." in key for key in keys) and not any(key.startswith("target_encoder.") for key in keys)
    assert _same_weights(IJepaEncoderModel.from_pretrained(tmp_path / "enc", key_mapping=mapping), model)


def test_models_loaded_in_bfloat16_run_in_bfloat16(repos):
    """`from_pretrained(..., dtype=torch.bfloat16)` gives models that run on bf16 images: the sin-cos table (a float32
    buffer that the dtype does not cast) must not promote the residual stream to float32 under bf16 weights (the
    first LayerNorm refused the mix). Outputs agree with the float32 model's within bf16 precision."""
    from ijepa_hf import IJepaBackbone

    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    context, targets = random_masks(2, 16, 10, 2, 3)
    for cls, kwargs in ((IJepaEncoderModel, {}), (IJepaEncoderForImageClassification, {"num_labels": 3}),
                        (IJepaBackbone, {"out_indices": [1]}), (IJepaForPreTraining, {})):
        torch.manual_seed(0)  # the same new head in both dtypes
        full = cls.from_pretrained(repos["pretraining"], **kwargs).eval()
        torch.manual_seed(0)
        half = cls.from_pretrained(repos["pretraining"], dtype=torch.bfloat16, **kwargs).eval()
        if cls is IJepaForPreTraining:
            ours = half(images.bfloat16(), context_mask=context, target_masks=targets).loss
            reference = full(images, context_mask=context, target_masks=targets).loss
        elif cls is IJepaBackbone:
            ours, reference = half(images.bfloat16()).feature_maps[0], full(images).feature_maps[0]
        else:
            ours, reference = half(images.bfloat16())[0], full(images)[0]
        if cls is not IJepaForPreTraining:  # the loss is reduced in float32
            assert ours.dtype == torch.bfloat16, cls.__name__
        torch.testing.assert_close(ours.float(), reference, atol=0.1, rtol=0.05, msg=cls.__name__)
