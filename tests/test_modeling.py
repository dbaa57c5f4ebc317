"""Encoder, predictor, pretraining model and classifier: behaviour, save/load round trips, Auto classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
)
from transformers.models.ijepa import IJepaConfig

from ijepa_hf import (
    IJepaEncoderConfig,
    IJepaEncoderForImageClassification,
    IJepaEncoderModel,
    IJepaPredictorModel,
    IJepaForPreTraining,
    make_image_processor,
    sincos_position_embeddings,
)
from ijepa_hf.conversion import load_official_checkpoint

from tiny import GOLDEN_CHECKPOINT, random_masks, tiny_encoder_config, tiny_pretraining_config


def numpy_sincos(embed_dim: int, grid: int) -> np.ndarray:
    """An independent numpy rendering of the MAE/official recipe: meshgrid(w, h), first half from grid[0]."""
    grid_h = np.arange(grid, dtype=np.float64)
    grid_w = np.arange(grid, dtype=np.float64)
    mesh = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid, grid)

    def one_dim(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_dim(embed_dim // 2, mesh[0]), one_dim(embed_dim // 2, mesh[1])], axis=1)


def test_sincos_matches_the_official_formula_and_checkpoint():
    ours = sincos_position_embeddings(96, (12, 12))
    np.testing.assert_allclose(ours.numpy(), numpy_sincos(96, 12).astype(np.float32), atol=1e-7)
    official = load_official_checkpoint(GOLDEN_CHECKPOINT)["encoder"]["pos_embed"][0]
    torch.testing.assert_close(ours, official, atol=1e-6, rtol=0)


def _assert_tables_are_formula(model):
    for module in model.modules():
        if isinstance(module, (IJepaEncoderModel, IJepaPredictorModel)):
            expected = sincos_position_embeddings(module.pos_embed.shape[-1], module.grid_size)[None]
            assert module.pos_embed.abs().sum() > 0
            torch.testing.assert_close(module.pos_embed, expected, atol=0, rtol=0)
            assert not module.pos_embed.requires_grad


def test_position_tables_survive_config_construction_save_load_and_missing_keys(tmp_path):
    model = IJepaForPreTraining(tiny_pretraining_config())
    _assert_tables_are_formula(model)
    model.save_pretrained(tmp_path / "full")
    _assert_tables_are_formula(AutoModelForPreTraining.from_pretrained(tmp_path / "full"))
    # A checkpoint without the tables (e.g. written by another tool) gets them recomputed, not zeros.
    weights = load_file(tmp_path / "full" / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.endswith("pos_embed")}, tmp_path / "full" / "model.safetensors",
              metadata={"format": "pt"})
    _assert_tables_are_formula(AutoModelForPreTraining.from_pretrained(tmp_path / "full"))


def test_masked_forward_drops_tokens_and_scales_compute():
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    encoder = IJepaEncoderModel(tiny_encoder_config(image_size=64)).eval()
    pixels = torch.randn(2, 3, 64, 64)
    keep = torch.tensor([[0, 5, 9, 40, 63, 12, 13, 14], [1, 2, 3, 4, 5, 6, 7, 8]])

    def flops(**kwargs):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            output = encoder(pixels, **kwargs)
        return counter.get_total_flops(), output

    full_flops, _ = flops()
    masked_flops, masked = flops(context_mask=keep)
    assert masked.last_hidden_state.shape == (2, 8, 32)
    torch.testing.assert_close(masked.pooler_output, masked.last_hidden_state.mean(1))
    # 8 of 64 tokens: the blocks cost ~1/8 (the patch embedding still sees every patch).
    assert masked_flops < 0.3 * full_flops


def test_eager_and_sdpa_agree_and_outputs_are_collected():
    torch.manual_seed(0)
    config = tiny_encoder_config()
    sdpa = IJepaEncoderModel(config).eval()
    eager_config = tiny_encoder_config()
    eager_config._attn_implementation = "eager"
    eager = IJepaEncoderModel(eager_config).eval()
    eager.load_state_dict(sdpa.state_dict())
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = sdpa(pixels, output_hidden_states=True)
        b = eager(pixels, output_attentions=True)
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, atol=1e-5, rtol=0)
    assert len(a.hidden_states) == config.num_hidden_layers + 1
    assert b.attentions[0].shape == (2, 2, 16, 16)
    torch.testing.assert_close(b.attentions[0].sum(-1), torch.ones(2, 2, 16))
    # Bidirectional: the first token attends to the last one (a causal mask would zero this).
    assert (b.attentions[0][:, :, 0, -1] > 0).all()


def test_other_resolutions_use_the_sincos_formula_for_their_grid():
    torch.manual_seed(0)
    encoder = IJepaEncoderModel(tiny_encoder_config()).eval()
    assert encoder.position_embeddings((4, 4)) is encoder.pos_embed
    torch.testing.assert_close(encoder.position_embeddings((6, 8))[0], sincos_position_embeddings(32, (6, 8)))
    with torch.no_grad():
        output = encoder(torch.randn(1, 3, 48, 64))
    assert output.last_hidden_state.shape == (1, 48, 32)


@pytest.mark.parametrize("shape, message", [((1, 3, 30, 32), "not divisible by the patch size 8"),
                                            ((1, 1, 32, 32), r"\[batch, 3, height, width\]")])
def test_bad_pixel_values_are_clear_errors(shape, message):
    encoder = IJepaEncoderModel(tiny_encoder_config())
    with pytest.raises(ValueError, match=message):
        encoder(torch.randn(*shape))


def test_bad_mask_indices_are_clear_errors():
    model = IJepaForPreTraining(tiny_pretraining_config())
    pixels = torch.randn(2, 3, 32, 32)
    context, targets = random_masks(2, 16, 6, 2, 3)
    with pytest.raises(ValueError, match="outside"):
        model(pixels, context + 100, targets)
    negative = context.clone()
    negative[0, 0] = -1
    with pytest.raises(ValueError, match=r"`context_mask` holds patch indices in \[-1, \d+\], outside \[0, 15\]"):
        model(pixels, negative, targets)
    with pytest.raises(ValueError, match="batch size"):
        model(pixels, context[:1], targets)
    with pytest.raises(ValueError, match="IJepaMaskCollator"):
        model(pixels, context_mask=context)  # one mask without the other
    # Images only are feature extraction with the target encoder (AutoModel / pipeline on a pretraining repo).
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).last_hidden_state, model.target_encoder(pixels).last_hidden_state)


def test_each_target_block_is_predicted_in_its_own_sequence():
    torch.manual_seed(0)
    model = IJepaForPreTraining(tiny_pretraining_config()).eval()
    pixels = torch.randn(3, 3, 32, 32)
    context, targets = random_masks(3, 16, 7, 4, 3)
    with torch.no_grad():
        joint = model(pixels, context, targets).predictions  # [4 * 3, 3, 32], block-major
        for block in range(4):
            alone = model(pixels, context, targets[:, block : block + 1]).predictions
            torch.testing.assert_close(joint[block * 3 : (block + 1) * 3], alone, atol=1e-5, rtol=0)


def test_predictor_skips_the_context_rows_of_its_last_block_without_changing_anything():
    torch.manual_seed(0)
    predictor = IJepaForPreTraining(tiny_pretraining_config()).predictor.train()
    context_mask, target_masks = random_masks(3, 16, 7, 4, 3)
    features = torch.randn(3, 7, 32, requires_grad=True)
    pruned = predictor(features, context_mask, target_masks).predictions
    (grad_pruned,) = torch.autograd.grad(pruned.square().sum(), features)
    # Asking for every layer's hidden states turns the pruning off: the full last block is the reference.
    full = predictor(features, context_mask, target_masks, output_hidden_states=True)
    assert full.hidden_states[-1].shape == (4 * 3, 7 + 3, predictor.config.hidden_size)
    (grad_full,) = torch.autograd.grad(full.predictions.square().sum(), features)
    torch.testing.assert_close(pruned, full.predictions, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad_pruned, grad_full, atol=1e-6, rtol=1e-5)


def _count_sdpa_calls(model: torch.nn.Module, pixels: torch.Tensor, monkeypatch) -> int:
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(pixels).last_hidden_state.float().sum().backward()
    monkeypatch.setattr(F, "scaled_dot_product_attention", real)
    return len(calls)


def test_attn_implementation_is_honoured_whatever_the_hardware(monkeypatch, tmp_path):
    """``sdpa`` means torch's SDPA kernel and ``eager`` the matmul-softmax path, also in CPU bf16 training, where the
    model used to swap SDPA for the matmul path on its own; switching (``set_attn_implementation``, or
    ``from_pretrained(attn_implementation=...)``) works through transformers' attention interface."""
    torch.manual_seed(0)
    config = tiny_encoder_config()
    model = IJepaEncoderModel(config).train()
    pixels = torch.randn(2, 3, 32, 32)
    blocks = config.num_hidden_layers
    assert model.config._attn_implementation == "sdpa"
    assert _count_sdpa_calls(model, pixels, monkeypatch) == blocks
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = model(pixels).last_hidden_state

    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    assert _count_sdpa_calls(model, pixels, monkeypatch) == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = model(pixels).last_hidden_state
    torch.testing.assert_close(fast, reference, atol=0.1, rtol=0.05)  # equal up to bf16 rounding

    model.save_pretrained(tmp_path)
    reloaded = IJepaEncoderModel.from_pretrained(tmp_path, attn_implementation="sdpa").train()
    assert _count_sdpa_calls(reloaded, pixels, monkeypatch) == blocks
    pretraining = IJepaForPreTraining(tiny_pretraining_config())
    pretraining.set_attn_implementation("eager")
    assert {m.config._attn_implementation for m in (pretraining.context_encoder, pretraining.target_encoder,
                                                    pretraining.predictor)} == {"eager"}


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = IJepaForPreTraining(tiny_pretraining_config()).train()
    pixels = torch.randn(2, 3, 32, 32)
    masks = random_masks(2, 16, 8, 2, 3)
    model(pixels, *masks).loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.activation_checkpointing_enable()
    assert model.context_encoder.blocks[0].gradient_checkpointing
    model(pixels, *masks).loss.backward()
    for name, grad in reference.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-6, rtol=1e-5)


def test_bf16_autocast_training_step_is_close_to_fp32():
    torch.manual_seed(0)
    model = IJepaForPreTraining(tiny_pretraining_config())
    pixels = torch.randn(4, 3, 32, 32)
    masks = random_masks(4, 16, 8, 4, 3)
    fp32 = model(pixels, *masks).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(pixels, *masks)
    assert output.loss.dtype == torch.float32 and torch.isfinite(output.loss)
    assert abs(output.loss.item() - fp32.item()) < 0.05 * fp32.item()
    output.loss.backward()
    assert model.predictor.mask_token.grad is not None and torch.isfinite(model.predictor.mask_token.grad).all()


def test_ema_update_and_target_encoder_is_frozen():
    torch.manual_seed(0)
    model = IJepaForPreTraining(tiny_pretraining_config())
    for a, b in zip(model.context_encoder.parameters(), model.target_encoder.parameters()):
        assert torch.equal(a, b)  # the target starts as a copy
    with torch.no_grad():
        for p in model.context_encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.target_encoder.parameters()]
    model.update_target_encoder(0.9)
    for old, new, ctx in zip(before, model.target_encoder.parameters(), model.context_encoder.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * ctx)
    assert not any(p.requires_grad for p in model.target_encoder.parameters())
    model.train()
    assert not model.target_encoder.training and model.context_encoder.training


def test_mse_loss_is_selectable():
    torch.manual_seed(0)
    model = IJepaForPreTraining(tiny_pretraining_config(loss="mse"))
    output = model(torch.randn(2, 3, 32, 32), *random_masks(2, 16, 8, 2, 3))
    torch.testing.assert_close(output.loss, F.mse_loss(output.predictions, output.targets))


@pytest.mark.parametrize("cls, auto", [
    (IJepaEncoderModel, AutoModel),
    (IJepaEncoderForImageClassification, AutoModelForImageClassification),
    (IJepaForPreTraining, AutoModelForPreTraining),
    (IJepaPredictorModel, AutoModel),
])
def test_save_load_round_trip_is_bit_exact(tmp_path, cls, auto):
    torch.manual_seed(0)
    if cls is IJepaForPreTraining:
        model = cls(tiny_pretraining_config())
        model.update_target_encoder(0.5)
        with torch.no_grad():
            model.target_encoder.norm.weight.add_(0.25)  # make the target differ from the context encoder
    elif cls is IJepaPredictorModel:
        model = cls(tiny_pretraining_config().predictor_config)
    elif cls is IJepaEncoderForImageClassification:
        model = cls(tiny_encoder_config(num_labels=3))
    else:
        model = cls(tiny_encoder_config())
    model.save_pretrained(tmp_path)
    loaded = auto.from_pretrained(tmp_path)
    assert type(loaded) is cls
    original, reloaded = model.state_dict(), loaded.state_dict()
    assert set(original) == set(reloaded)
    for key in original:
        assert torch.equal(original[key], reloaded[key]), key
    if cls is IJepaForPreTraining:
        assert not any(p.requires_grad for p in loaded.target_encoder.parameters())
        assert all(p.requires_grad for p in loaded.context_encoder.parameters())


def test_loading_a_mismatched_checkpoint_is_an_error(tmp_path):
    IJepaEncoderModel(tiny_encoder_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not match"):
        IJepaEncoderModel.from_pretrained(tmp_path, config=tiny_encoder_config(num_hidden_layers=3))
    # A classifier on an encoder checkpoint is fine: only its head is new.
    classifier = IJepaEncoderForImageClassification.from_pretrained(tmp_path, num_labels=4)
    assert classifier.classifier.out_features == 4


def test_classifier_loss_is_cross_entropy():
    torch.manual_seed(0)
    model = IJepaEncoderForImageClassification(tiny_encoder_config(num_labels=5))
    pixels, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 4, 2])
    output = model(pixels, labels=labels)
    assert output.logits.shape == (3, 5)
    torch.testing.assert_close(output.loss, F.cross_entropy(output.logits, labels))
    pooled = model.encoder(pixels).pooler_output
    torch.testing.assert_close(output.logits, model.classifier(pooled))


def test_auto_registration_leaves_transformers_ijepa_alone(tmp_path):
    assert AutoConfig.for_model("ijepa").__class__ is IJepaConfig
    config = AutoConfig.for_model("ijepa_hf_encoder", hidden_size=64, num_attention_heads=4)
    assert isinstance(config, IJepaEncoderConfig)
    make_image_processor(config).save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert list(processor.image_mean) == [0.485, 0.456, 0.406] and list(processor.image_std) == [0.229, 0.224, 0.225]
    from PIL import Image
    gray = Image.fromarray(np.zeros((50, 70), dtype=np.uint8), mode="L")
    assert processor(gray, return_tensors="pt")["pixel_values"].shape == (1, 3, 224, 224)


def test_outputs_are_recorded_by_transformers_capture_machinery():
    # hidden_states / attentions come from `_can_record_outputs` hooks (capture_outputs), return_dict=False from
    # the decorators; the config's output_* flags are the defaults, as for transformers' own models.
    torch.manual_seed(0)
    config = tiny_encoder_config()
    config._attn_implementation = "eager"
    encoder = IJepaEncoderModel(config).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = encoder(pixels)
        full = encoder(pixels, output_hidden_states=True, output_attentions=True)
        as_tuple = encoder(pixels, output_hidden_states=True, return_dict=False)
        only_last = encoder(pixels, output_hidden_states=[-1])
        encoder.config.output_hidden_states = True
        from_config = encoder(pixels)
        encoder.config.output_hidden_states = False
    assert plain.hidden_states is None and plain.attentions is None
    assert len(full.hidden_states) == 3 and len(full.attentions) == 2
    # hidden_states[-1] is the last block's output before the final norm (tie_last_hidden_states=False).
    torch.testing.assert_close(encoder.norm(full.hidden_states[-1]), full.last_hidden_state)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 3
    torch.testing.assert_close(as_tuple[2][1], full.hidden_states[1])
    assert only_last.hidden_states[0] is None and only_last.hidden_states[-1] is not None
    assert len(from_config.hidden_states) == 3

    classifier = IJepaEncoderForImageClassification(tiny_encoder_config(num_labels=3)).eval()
    with torch.no_grad():
        out = classifier(pixels, labels=torch.tensor([0, 2]), output_hidden_states=True)
        tup = classifier(pixels, labels=torch.tensor([0, 2]), return_dict=False)
    assert len(out.hidden_states) == 3 and out.attentions is None
    assert len(tup) == 2 and tup[0].dim() == 0 and tup[1].shape == (2, 3)

    model = IJepaForPreTraining(tiny_pretraining_config()).eval()
    context_mask, target_masks = random_masks(2, 16, 7, 2, 3)
    with torch.no_grad():
        out = model(pixels, context_mask, target_masks, return_dict=False)
        features = model(pixels, output_hidden_states=True)
    assert isinstance(out, tuple) and out[0].dim() == 0
    assert len(features.hidden_states) == 3


def test_predictor_records_full_layers_while_its_last_block_is_shortened_otherwise():
    torch.manual_seed(0)
    config = tiny_pretraining_config()
    predictor = IJepaForPreTraining(config).predictor.eval()
    predictor.config._attn_implementation = "eager"
    context_mask, target_masks = random_masks(3, 16, 7, 4, 3)
    features = torch.randn(3, 7, 32)
    with torch.no_grad():
        pruned = predictor(features, context_mask, target_masks)
        recorded = predictor(features, context_mask, target_masks, output_attentions=True)
        as_tuple = predictor(features, context_mask, target_masks, return_dict=False)
    assert pruned.hidden_states is None and pruned.attentions is None
    assert [a.shape for a in recorded.attentions] == [(12, 2, 10, 10)] * 2  # every row of the last block
    torch.testing.assert_close(recorded.predictions, pruned.predictions, atol=1e-6, rtol=1e-5)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    torch.testing.assert_close(as_tuple[0], pruned.predictions)


def test_names_follow_transformers_and_one_encoder_vocabulary():
    import warnings

    import ijepa_hf
    from transformers import PreTrainedModel

    model = IJepaForPreTraining(tiny_pretraining_config())
    assert model.encoder_for() is model.target_encoder and model.encoder_for("target") is model.target_encoder
    assert model.encoder_for("context") is model.context_encoder
    with pytest.raises(ValueError, match="'target' or 'context'"):
        model.encoder_for("target_encoder")
    # transformers' get_encoder(modality) keeps its meaning.
    assert type(model).get_encoder is PreTrainedModel.get_encoder
    exported = model.export_encoder(encoder="context")
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), model.context_encoder.state_dict().values()))
    # The 0.1.0 names still resolve for one release, with a FutureWarning.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ijepa_hf.IJepaPretrainingModel is IJepaForPreTraining
        assert ijepa_hf.IJepaPretrainingOutput is ijepa_hf.IJepaForPreTrainingOutput
    assert [w.category for w in caught] == [FutureWarning, FutureWarning]
    with pytest.raises(AttributeError):
        ijepa_hf.NoSuchThing  # noqa: B018


def test_unknown_forward_arguments_are_refused_naming_them():
    """A typo or another model's argument is an error, not silently ignored; transformers' own arguments pass."""
    from ijepa_hf import IJepaEncoderConfig, IJepaEncoderForImageClassification, IJepaEncoderModel

    config = IJepaEncoderConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, num_labels=3)
    pixels = torch.randn(2, 3, 32, 32)
    mask = torch.arange(8).repeat(2, 1)
    encoder = IJepaEncoderModel(config).eval()
    with pytest.raises(TypeError, match=r"IJepaEncoderModel.forward\(\) got unexpected keyword argument\(s\) "
                                        r"\['context_maks'\]"):
        encoder(pixels, context_maks=mask)
    with pytest.raises(TypeError, match="bool_masked_pos.*pass the indices of the patches to keep as `context_mask`"):
        encoder(pixels, bool_masked_pos=torch.zeros(2, 16, dtype=torch.bool))
    classifier = IJepaEncoderForImageClassification(config).eval()
    with pytest.raises(TypeError, match="'interpolate_pos_encoding'"):
        classifier(pixels, interpolate_pos_encoding=True)
    # what transformers passes: output flags, return_dict, Trainer's num_items_in_batch
    out = classifier(pixels, labels=torch.tensor([0, 1]), output_hidden_states=True, num_items_in_batch=2)
    assert out.loss is not None and len(out.hidden_states) == 2


def test_set_input_size_moves_the_grid_and_refuses_a_size_the_patches_do_not_divide():
    from ijepa_hf import sincos_position_embeddings

    model = IJepaForPreTraining(tiny_pretraining_config())
    patch = model.config.encoder_config.patch_size
    weights = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("pos_embed")}
    model.set_input_size(6 * patch)
    assert model.config.encoder_config.image_size == model.config.predictor_config.image_size == 6 * patch
    for module in (model.context_encoder, model.target_encoder, model.predictor):
        assert torch.equal(module.pos_embed[0], sincos_position_embeddings(module.pos_embed.shape[-1], (6, 6)))
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items() if k in weights)
    pixels = torch.randn(2, 3, 6 * patch, 6 * patch)
    assert model.target_encoder(pixels).last_hidden_state.shape[1] == 36
    with pytest.raises(ValueError):
        model.set_input_size(6 * patch + 1)
    assert model.config.encoder_config.image_size == 6 * patch and model.context_encoder.pos_embed.shape[1] == 36
