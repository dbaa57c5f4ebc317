"""The optional anti-collapse regularisers (SIGReg, VICReg variance / covariance): their definitions, the config
fields that turn them on, what the model adds to its loss, and where a run logs them."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.nn import functional as F

from ijepa_hf import IJepaForPreTraining, IJepaMaskCollator, IJepaPretrainingConfig
from ijepa_hf.modeling_ijepa_hf import sigreg_loss, vicreg_losses
from ijepa_hf.training.recipes import Recipe, apply_recipe

from tiny import tiny_pretraining_config


pytestmark = pytest.mark.usefixtures("one_thread")

REGULARISED = dict(sigreg_weight=0.05, vicreg_variance_weight=1.0, vicreg_covariance_weight=0.04)


# ----------------------------------------------------------------------------------------------------------------
# The statistics themselves
# ----------------------------------------------------------------------------------------------------------------


def test_sigreg_is_small_for_a_standard_gaussian_and_large_for_collapsed_or_shrunk_embeddings():
    torch.manual_seed(0)
    gaussian = sigreg_loss(torch.randn(1024, 32), 128)
    collapsed = sigreg_loss(torch.randn(1024, 1).expand(1024, 32), 128)  # every dimension the same number
    shrunk = sigreg_loss(0.05 * torch.randn(1024, 32), 128)  # isotropic but far too small
    shifted = sigreg_loss(torch.randn(1024, 32) + 2.0, 128)
    assert gaussian < 3  # the statistic of a sample from the null is O(1), whatever N
    assert min(collapsed, shrunk, shifted) > 20 * gaussian


def test_sigreg_matches_its_formula_on_one_direction():
    """With one direction the statistic is N * integral |ecf - phi|^2 phi dt of that projection."""
    torch.manual_seed(1)
    x = torch.randn(64, 3) * 1.7 + 0.3
    torch.manual_seed(5)
    value = sigreg_loss(x, 1)
    torch.manual_seed(5)
    direction = torch.randn(3, 1)
    projection = (x @ (direction / direction.norm())).squeeze(1).double()
    t = torch.linspace(-5, 5, 17, dtype=torch.float64)
    phi = torch.exp(-t**2 / 2)
    angles = projection[:, None] * t
    error = ((angles.cos().mean(0) - phi) ** 2 + angles.sin().mean(0) ** 2) * phi
    expected = 64 * torch.trapezoid(error, t)
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)


def test_sigreg_gradient_spreads_a_collapsed_set():
    """Gradient descent on SIGReg alone takes near-collapsed points to many effective dimensions."""
    from ijepa_hf.training.metrics import effective_rank

    torch.manual_seed(0)
    points = (torch.randn(256, 1) * torch.ones(1, 16) + 0.01 * torch.randn(256, 16)).requires_grad_()
    before = effective_rank(points.detach())
    optimizer = torch.optim.Adam([points], lr=0.05)
    for _ in range(150):
        optimizer.zero_grad()
        sigreg_loss(points, 64).backward()
        optimizer.step()
    assert before < 2
    assert effective_rank(points.detach()) > 12


def test_vicreg_terms_follow_their_definitions():
    torch.manual_seed(0)
    white = torch.randn(4096, 8)
    variance, covariance = vicreg_losses(white)
    assert variance < 0.02 and covariance < 0.02
    constant = torch.ones(100, 8)
    variance, covariance = vicreg_losses(constant)
    torch.testing.assert_close(variance, torch.tensor(1 - 1e-2))  # max(0, 1 - sqrt(0 + 1e-4)) in every dimension
    assert covariance == 0
    copies = torch.randn(4096, 1).expand(4096, 8) * 3  # std 3 (no variance penalty), fully correlated
    variance, covariance = vicreg_losses(copies)
    assert variance == 0
    torch.testing.assert_close(covariance, torch.tensor(9.0**2 * 8 * 7 / 8), rtol=0.1, atol=0)


def test_weights_leave_rows_out_exactly():
    torch.manual_seed(0)
    x = torch.randn(20, 6)
    keep = torch.rand(20) > 0.4
    for fn in (lambda e, w=None: sigreg_loss(e, 16, w), vicreg_losses):
        torch.manual_seed(3)
        weighted = fn(x, keep)
        torch.manual_seed(3)
        selected = fn(x[keep])
        for a, b in zip(torch.atleast_1d(*weighted) if isinstance(weighted, tuple) else [weighted],
                        torch.atleast_1d(*selected) if isinstance(selected, tuple) else [selected]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Config fields
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("sigreg_weight", -0.1), ("sigreg_weight", float("nan")), ("vicreg_variance_weight", float("inf")),
    ("vicreg_covariance_weight", -1), ("sigreg_num_slices", 0), ("regularized_embeddings", "predictions"),
])
def test_invalid_regularizer_fields_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        IJepaPretrainingConfig(**{field: value})


def test_regularizers_are_off_by_default_and_survive_a_save(tmp_path):
    config = IJepaPretrainingConfig()
    assert not config.regularized
    on = tiny_pretraining_config(**REGULARISED, regularized_embeddings="context_tokens", sigreg_num_slices=32)
    on.save_pretrained(tmp_path)
    loaded = IJepaPretrainingConfig.from_pretrained(tmp_path)
    assert loaded.regularized and loaded.regularized_embeddings == "context_tokens"
    assert (loaded.sigreg_weight, loaded.vicreg_variance_weight, loaded.sigreg_num_slices) == (0.05, 1.0, 32)
    config.update_from_string("sigreg_weight=0.1")  # the command line's language
    assert config.regularized


def test_a_recipe_sets_regularizer_fields_unless_the_user_did():
    recipe = Recipe("regularised", config_fields={"sigreg_weight": 0.02})
    assert apply_recipe(IJepaPretrainingConfig(), recipe).sigreg_weight == 0.02
    assert apply_recipe(IJepaPretrainingConfig(), recipe, keep={"sigreg_weight"}).sigreg_weight == 0.0


# ----------------------------------------------------------------------------------------------------------------
# The model's loss
# ----------------------------------------------------------------------------------------------------------------


def _batch(config, batch_size=6, seed=0, **collator):
    torch.manual_seed(seed)
    masks = IJepaMaskCollator.from_config(config, seed=seed, **collator)
    batch = masks([{"pixel_values": torch.randn(3, 32, 32)} for _ in range(batch_size)])
    return {k: batch[k] for k in ("pixel_values", "context_mask", "target_masks", "context_lengths") if k in batch}


def _model(**fields):
    torch.manual_seed(0)
    return IJepaForPreTraining(tiny_pretraining_config(min_keep=0, num_target_blocks=2, target_scale=[0.2, 0.3],
                                                       **fields)).eval()


def test_off_by_default_the_output_and_loss_are_the_prediction_alone():
    model = _model()
    output = model(**_batch(model.config))
    assert output.prediction_loss is None and output.sigreg_loss is None and output.variance_loss is None
    torch.testing.assert_close(output.loss, F.smooth_l1_loss(output.predictions, output.targets))


@pytest.mark.parametrize("embeddings", ["context_pooled", "context_tokens"])
def test_regularised_loss_is_prediction_plus_weighted_terms_and_trains_the_context_encoder(embeddings):
    plain, regularised = _model(), _model(**REGULARISED, regularized_embeddings=embeddings)
    regularised.load_state_dict(plain.state_dict())
    batch = _batch(plain.config)
    torch.manual_seed(7)
    output = regularised(**batch)
    torch.testing.assert_close(output.prediction_loss, plain(**batch).loss)
    expected = (output.prediction_loss + 0.05 * output.sigreg_loss + 1.0 * output.variance_loss
                + 0.04 * output.covariance_loss)
    torch.testing.assert_close(output.loss, expected)
    # The terms are those of the embeddings the config names.
    context = output.context_hidden_state
    pooled = context.mean(1) if embeddings == "context_pooled" else context.flatten(0, 1)
    torch.testing.assert_close(torch.stack(vicreg_losses(pooled)),
                               torch.stack([output.variance_loss, output.covariance_loss]))
    # Only the regulariser's terms: their gradient reaches the context encoder, not the predictor or the target.
    regularised.zero_grad()
    (output.loss - output.prediction_loss).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in regularised.context_encoder.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in regularised.predictor.parameters())
    assert all(p.grad is None for p in regularised.target_encoder.parameters())


@pytest.mark.parametrize("embeddings", ["context_pooled", "context_tokens"])
def test_per_image_context_padding_is_left_out_of_the_terms(embeddings):
    model = _model(**REGULARISED, regularized_embeddings=embeddings)
    batch = _batch(model.config, context_lengths="per_image")
    lengths = batch["context_lengths"]
    assert lengths.min() < lengths.max()  # the batch has padding
    torch.manual_seed(2)
    output = model(**batch)
    real = [output.context_hidden_state[i, :n] for i, n in enumerate(lengths.tolist())]
    embedded = torch.stack([r.mean(0) for r in real]) if embeddings == "context_pooled" else torch.cat(real)
    torch.manual_seed(2)
    expected_sigreg = sigreg_loss(embedded, model.config.sigreg_num_slices)
    torch.testing.assert_close(output.sigreg_loss, expected_sigreg, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.stack(vicreg_losses(embedded)),
                               torch.stack([output.variance_loss, output.covariance_loss]), rtol=1e-5, atol=1e-6)


def test_terms_are_float32_under_bf16_autocast():
    model = _model(**REGULARISED)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(**_batch(model.config))
    assert output.sigreg_loss.dtype == output.variance_loss.dtype == torch.float32
    assert math.isfinite(float(output.loss.detach()))


# ----------------------------------------------------------------------------------------------------------------
# Where the terms are logged: pretrain()'s train_log.jsonl and IJepaTrainer's log_history
# ----------------------------------------------------------------------------------------------------------------


def test_pretrain_logs_the_terms_beside_the_loss(tmp_path):
    from ijepa_hf.training import parse_args, pretrain

    pretrain(parse_args([
        "--output_dir", str(tmp_path / "on"), "--embedded_num_images", "32", "--per_device_train_batch_size", "8",
        "--max_train_steps", "4", "--logging_steps", "2", "--warmup_steps", "1", "--config_overrides",
        "encoder.image_size=32,encoder.patch_size=8,encoder.hidden_size=32,encoder.num_hidden_layers=2,"
        "encoder.num_attention_heads=2,predictor.hidden_size=16,predictor.num_hidden_layers=2,"
        "predictor.num_attention_heads=2,min_keep=0,target_scale=[0.2,0.3],num_target_blocks=2,"
        "sigreg_weight=0.05,vicreg_variance_weight=0.5",
    ]))
    rows = [json.loads(line) for line in (tmp_path / "on" / "train_log.jsonl").read_text().splitlines()]
    assert rows
    for row in rows:
        assert {"prediction_loss", "sigreg_loss", "variance_loss"} <= set(row)
        assert "covariance_loss" not in row  # its weight is 0: off
        assert row["loss"] > row["prediction_loss"] > 0 and row["sigreg_loss"] > 0
    saved = json.loads((tmp_path / "on" / "config.json").read_text())
    assert saved["sigreg_weight"] == 0.05


def test_trainer_logs_the_terms_beside_the_loss(tmp_path):
    from transformers import TrainingArguments

    from ijepa_hf.data import PretrainTransform, ProceduralShapes
    from ijepa_hf.training.trainer import IJepaTrainer

    model = _model(sigreg_weight=0.05, vicreg_covariance_weight=0.1).train()
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-3,
        warmup_steps=1, remove_unused_columns=False, report_to="none", use_cpu=True, save_strategy="no",
        logging_steps=2, dataloader_num_workers=0, seed=0,
    )
    trainer = IJepaTrainer(model=model, args=args, data_collator=IJepaMaskCollator.from_config(model.config, seed=0),
                           train_dataset=ProceduralShapes(16, image_size=32, transform=PretrainTransform(32)))
    trainer.train()
    rows = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(rows) == 2
    for row in rows:
        assert {"prediction_loss", "sigreg_loss", "covariance_loss"} <= set(row)
        assert "variance_loss" not in row
        assert row["sigreg_loss"] > 0 and row["prediction_loss"] > 0
