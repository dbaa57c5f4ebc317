"""The attentive probe: a learned query over frozen patch tokens finds what mean pooling averages away."""

from __future__ import annotations

import pytest
import torch

from ijepa_hf import IJepaEncoderModel
from ijepa_hf.evaluation import AttentiveClassifier, attentive_probe, extract_features, linear_probe

from tiny import tiny_encoder_config


def _tokens(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """16 noise tokens per example; the label is carried by one token at a random position whose first feature
    marks it, so the mean over tokens dilutes the label 16-fold."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(n, 16, 32, generator=generator)
    labels = torch.randint(0, 4, (n,), generator=generator)
    where = torch.randint(0, 16, (n,), generator=generator)
    codes = torch.eye(4) * 3.0
    tokens[torch.arange(n), where, 0] = 6.0  # the marker the query can attend to
    tokens[torch.arange(n), where, 1:5] = codes[labels]
    return tokens, labels


def test_attentive_probe_beats_mean_pooling_where_the_label_sits_in_one_token():
    train_x, train_y = _tokens(1200, seed=0)
    test_x, test_y = _tokens(400, seed=1)
    attentive = attentive_probe(train_x, train_y, test_x, test_y, epochs=15, seed=0)
    pooled = linear_probe(train_x.mean(1), train_y, test_x.mean(1), test_y, weight_decay=1e-4)
    assert attentive["accuracy"] > 0.9 > pooled["accuracy"] + 0.2, (attentive["accuracy"], pooled["accuracy"])
    assert attentive["num_tokens"] == 16 and attentive["feature_dim"] == 32 and attentive["num_classes"] == 4
    again = attentive_probe(train_x, train_y, test_x, test_y, epochs=15, seed=0)
    assert again["accuracy"] == attentive["accuracy"]  # deterministic for a seed


def test_attentive_probe_on_encoder_tokens_and_its_errors():
    encoder = IJepaEncoderModel(tiny_encoder_config()).eval()
    images = [{"pixel_values": torch.randn(3, 32, 32), "label": i % 2} for i in range(12)]
    tokens, labels = extract_features(encoder, images, pool=False, progress=False, batch_size=5)
    pooled, _ = extract_features(encoder, images, progress=False, batch_size=5)
    assert tokens.shape == (12, 16, 32) and torch.allclose(tokens.mean(1), pooled, atol=1e-6)
    result = attentive_probe(tokens, labels, tokens, labels, epochs=2, batch_size=4)
    assert 0.0 <= result["accuracy"] <= 1.0 and result["num_train"] == 12
    with pytest.raises(ValueError, match=r"\[N, T, D\] patch tokens"):
        attentive_probe(pooled, labels, pooled, labels)
    with pytest.raises(ValueError, match="layers='last'"):
        extract_features(encoder, images, pool=False, layers=2, progress=False)
    with pytest.raises(ValueError, match="must divide"):
        AttentiveClassifier(30, 2, num_heads=4)
    assert AttentiveClassifier(32, 3)(torch.randn(2, 5, 32)).shape == (2, 3)


def test_probe_example_runs_the_attentive_probe(tmp_path, load_example):
    import json

    IJepaEncoderModel(tiny_encoder_config()).save_pretrained(tmp_path / "encoder")
    output = tmp_path / "probe.json"
    rows = load_example("probe").main([
        "--model_name_or_path", str(tmp_path / "encoder"), "--dataset_name", "procedural_shapes",
        "--procedural_image_size", "32", "--max_train_samples", "40", "--max_eval_samples", "20",
        "--layers", "last", "--attentive", "--attentive_epochs", "2", "--output_json", str(output), "--no_progress",
    ])
    assert [row["layers"] for row in rows] == ["last", "last, attentive"]
    saved = json.loads(output.read_text())["rows"][1]
    assert saved["attentive_accuracy"] == rows[1]["attentive_accuracy"] and saved["num_test"] == 20
