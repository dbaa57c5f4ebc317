"""Smoke tests of ``benchmarks/learning.py`` (the I-JEPA vs MAE learning benchmark) and ``benchmarks/seed_table.py``.

The script is imported as a module (benchmarks are scripts, not a package). Its end-to-end run uses Fashion-MNIST-
shaped IDX files written by the test, so it runs without Debian's package; no timings are asserted.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from tiny import write_fake_fashion_mnist


_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "learning.py"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def learning():
    spec = importlib.util.spec_from_file_location("benchmarks_learning", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


# A tiny ViT so that a few steps and the probes run in seconds.
_TINY_MODEL = ("encoder.image_size=32,encoder.patch_size=8,encoder.hidden_size=32,encoder.num_hidden_layers=1,"
               "encoder.num_attention_heads=2,min_keep=0,target_scale=[0.2,0.3],num_target_blocks=2")
_TINY = ["--model-overrides", _TINY_MODEL, "--mae-decoder-width", "16", "--mae-decoder-heads", "2", "--batch-size",
         "32", "--no-progress", "--threads", "1", "--eval-batch-size", "64", "--log-every", "1"]


def test_mae_init_trap_is_fixed_and_asserted(learning):
    """transformers 5.24 leaves ViT-MAE's position tables, CLS and mask tokens at zero; build_mae fixes that."""
    from transformers import ViTMAEForPreTraining

    from ijepa_hf import IJepaPretrainingConfig

    args = learning.parse_args(_TINY)
    config = IJepaPretrainingConfig()
    config.update_from_string(_TINY_MODEL)
    model = learning.build_mae(config, args)
    embeddings = model.vit.embeddings
    assert (model.config.hidden_size, model.config.patch_size, model.config.image_size) == (32, 8, 32)
    for table in (embeddings.position_embeddings, model.decoder.decoder_pos_embed):
        assert bool((table[0, 1:].norm(dim=-1) > 0).all())
    assert torch.count_nonzero(embeddings.cls_token) and torch.count_nonzero(model.decoder.mask_token)
    # The check catches the bug on a model built the plain way (if transformers ever fixes it, nothing to catch).
    plain = ViTMAEForPreTraining(model.config)
    if not torch.count_nonzero(plain.vit.embeddings.position_embeddings):
        with pytest.raises(AssertionError, match="init trap"):
            learning.check_mae_initialization(plain)
    learning.initialize_mae(plain)
    learning.check_mae_initialization(plain)


def test_budgets_in_images_compare_across_machines(learning):
    default = learning.parse_args([])  # 1,118,976 images = 8,742 steps of 128, on any machine
    assert default.max_steps == 8742 and default.recipe == "small"
    assert learning.parse_args(["--budget-images", "1000", "--batch-size", "100"]).max_steps == 10
    with pytest.raises(SystemExit):
        learning.parse_args(["--max-steps", "20", "--budget-images", "1000"])
    with pytest.raises(SystemExit):
        learning.parse_args(["--budget-images", "10"])
    with pytest.raises(ValueError, match="recipe"):
        learning.parse_args(["--recipe", "fast"])


def test_the_benchmark_has_no_training_loop_crop_or_size_table_of_its_own():
    """It trains through pretrain() and transformers' Trainer, crops with the library's transform and takes the
    model from the config language: none of the former private pieces are back."""
    source = _SCRIPT.read_text()
    for private in ("PretrainingStep", "train_for_budget", "random_resized_crop", "ENCODER_SIZES", "sample_masks",
                    "model.forward ="):
        assert private not in source
    assert "pretrain(parse_pretraining_args(argv))" in source and "Trainer(model=model" in source


def test_fashion_mnist_end_to_end_through_the_users_path(learning, tmp_path):
    data = write_fake_fashion_mnist(tmp_path / "fmnist", train=256, test=64)
    results = learning.main([*_TINY, "--fashion-mnist-dir", str(data), "--max-steps", "3", "--low-shot-labels",
                             "20", "--low-shot-draws", "2", "--attentive-epochs", "1", "--precision", "fp32",
                             "--config-overrides", "sigreg_weight=0.05", "--output-dir", str(tmp_path / "out")])
    out = tmp_path / "out"
    models = [row["model"] for row in results["rows"]]
    assert models == ["raw pixels", "random init (same ViT)", "I-JEPA target encoder", "I-JEPA context encoder",
                      "MAE (transformers ViTMAE)"]
    for row in results["rows"]:
        assert 0.0 <= row["linear_accuracy"] <= 1.0 and 0.0 <= row["knn_accuracy"] <= 1.0
        low = row["probes"]["low_shot_linear"]
        assert low["num_labels"] == 20 and len(low["accuracies"]) == 2 and row["low_shot_accuracy"] == low["accuracy"]
        assert row["probes"]["attentive"]["num_tokens"] == 16 and 0.0 <= row["attentive_accuracy"] <= 1.0
    pixels = results["rows"][0]
    assert pixels["feature_dim"] == 32 * 32 and pixels["linear_accuracy"] > 0.5  # the label's bar is easy to see
    assert results["training"]["ijepa"]["steps"] == 3 and results["training"]["mae"]["images_seen"] == 96
    # I-JEPA ran through pretrain(): its output folder, log (with the regulariser's terms), curves and config.
    rows = [json.loads(line) for line in (out / "ijepa" / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3] and all("sigreg_loss" in row for row in rows)
    assert (out / "ijepa" / "training_curves.png").is_file() and (out / "ijepa" / "encoder" / "config.json").is_file()
    assert results["ijepa_config"]["sigreg_weight"] == 0.05
    assert results["ijepa_config"]["predictor_config"]["num_hidden_layers"] == 1  # the small recipe's predictor
    # MAE ran through transformers' Trainer and was saved with its log.
    from transformers import ViTMAEForPreTraining

    assert ViTMAEForPreTraining.from_pretrained(out / "mae").config.hidden_size == 32
    assert len((out / "mae" / "train_log.jsonl").read_text().splitlines()) == 3
    saved = json.loads((out / "fashion-mnist_results.json").read_text())
    assert saved["table"].startswith("| model |") and saved["settings"]["seed"] == 0
    # A second run reuses the Parquet copy of the data.
    parquet = out / "data" / "train.parquet"
    before = parquet.stat().st_mtime_ns
    learning.main([*_TINY, "--fashion-mnist-dir", str(data), "--max-steps", "1", "--methods", "ijepa",
                   "--skip-context-encoder", "--low-shot-labels", "0", "--attentive-epochs", "0", "--precision",
                   "fp32", "--output-dir", str(out)])
    assert parquet.stat().st_mtime_ns == before


def test_probe_blocks_adds_a_row_of_the_last_blocks_features(learning, tmp_path):
    """``--probe-blocks N`` adds, after each encoder's row, a row on its last N blocks (each through the final norm,
    pooled, concatenated): the standard rows stay as they were, and the last block's part is the standard feature."""
    data = write_fake_fashion_mnist(tmp_path / "fmnist", train=128, test=32)
    two_blocks = ["--model-overrides", _TINY_MODEL.replace("num_hidden_layers=1", "num_hidden_layers=2")]
    argv = [*_TINY, *two_blocks, "--fashion-mnist-dir", str(data), "--max-steps", "1", "--methods", "random,ijepa,mae",
            "--skip-context-encoder", "--low-shot-labels", "10", "--low-shot-draws", "1", "--attentive-epochs", "1",
            "--precision", "fp32", "--output-dir", str(tmp_path / "out")]
    results = learning.main([*argv, "--probe-blocks", "2"])
    rows = {row["model"]: row for row in results["rows"]}
    for name in ("random init (same ViT)", "I-JEPA target encoder", "MAE (transformers ViTMAE)"):
        blocks = rows[f"{name}, last 2 blocks"]
        assert rows[name]["feature_dim"] == 32 and blocks["feature_dim"] == 64
        assert "attentive_accuracy" in rows[name] and "attentive_accuracy" not in blocks
        assert 0.0 <= blocks["linear_accuracy"] <= 1.0 and 0.0 <= blocks["low_shot_accuracy"] <= 1.0
    # The features themselves: the last block's half of the 2-block features is the standard pooled feature.
    args = learning.parse_args([*argv, "--probe-blocks", "2"])
    from ijepa_hf import IJepaForPreTraining, IJepaPretrainingConfig

    config = IJepaPretrainingConfig()
    config.update_from_string(two_blocks[1])
    train, _ = learning.fashion_mnist_splits(str(data), 16, 16)
    torch.manual_seed(0)
    for features in (lambda **kw: learning.mae_features(learning.build_mae(config, args), train, 32, args, **kw),
                     lambda **kw: learning.ijepa_features(IJepaForPreTraining(config).eval(), train, 32, args, **kw)):
        torch.manual_seed(0)
        last = features()
        torch.manual_seed(0)
        both = features(blocks=2)
        assert both.shape == (16, 64)
        torch.testing.assert_close(both[:, 32:], last)
        assert not torch.allclose(both[:, :32], last)
    with pytest.raises(SystemExit, match="more than the encoder's 2 blocks"):
        learning.main([*argv, "--probe-blocks", "3"])
    with pytest.raises(SystemExit):
        learning.parse_args(["--probe-blocks", "0"])


def test_missing_fashion_mnist_names_the_install_command(learning, tmp_path):
    with pytest.raises(SystemExit, match="apt-get install dataset-fashion-mnist"):
        learning.main([*_TINY, "--fashion-mnist-dir", str(tmp_path / "none"), "--max-steps", "1",
                       "--output-dir", str(tmp_path / "out")])


def test_seed_table_means_stds_and_margins(tmp_path):
    spec = importlib.util.spec_from_file_location("benchmarks_seed_table", _SCRIPT.parent / "seed_table.py")
    seed_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seed_table)
    paths = []
    for seed, (ours, pixels) in enumerate([(0.86, 0.84), (0.88, 0.85), (0.87, 0.845)]):
        rows = [{"model": "I-JEPA target encoder", "linear_accuracy": ours, "knn_accuracy": ours - 0.01},
                {"model": "raw pixels", "linear_accuracy": pixels, "knn_accuracy": ours - 0.005}]
        training = {"ijepa": {"steps": 10, "images_seen": 1280, "seconds": 60.0, "images_per_s": 21.3,
                              "training_flops": 1e12 if seed else None}}
        path = tmp_path / f"seed{seed}.json"
        path.write_text(json.dumps({"rows": rows, "training": training, "settings": {"seed": seed},
                                    "machine": {"torch_threads": 2, "cpu": "test CPU"}}))
        paths.append(str(path))
    text = seed_table.main(paths)
    assert "| I-JEPA target encoder | 87.0 ± 1.0 (86.0, 88.0, 87.0) |" in text
    assert "| raw pixels | 84.5 ± 0.5 (84.0, 85.0, 84.5) |" in text
    # linear: +2.5 over pixels with a larger std of 1.0 -> established; 20-NN: -0.5 -> not
    assert "linear +2.5 (larger std 1.0: established)" in text
    assert "20-NN -0.5 (larger std 1.0: not established)" in text
    assert "| ijepa | 0 | 10 | 1,280 | 1.0 | 2 | 21 | – |" in text and "| 1e+12 |" in text
    with pytest.raises(SystemExit, match="no such results file"):
        seed_table.main([str(tmp_path / "missing.json")])
