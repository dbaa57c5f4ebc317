"""Smoke tests of ``benchmarks/learning.py`` (the I-JEPA vs MAE learning benchmark).

The script is imported as a module (benchmarks are scripts, not a package). No timings are asserted: the budget
logic is exercised with ``--max-steps`` so the tests are deterministic and fast on a shared 2-core CPU.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "learning.py"


@pytest.fixture(scope="module")
def learning():
    spec = importlib.util.spec_from_file_location("benchmarks_learning", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


# A tiny ViT so that a few steps and the probes run in seconds.
_TINY = ["--width", "32", "--depth", "1", "--heads", "2", "--predictor-width", "16", "--predictor-depth", "1",
         "--mae-decoder-width", "16", "--mae-decoder-depth", "1", "--mae-decoder-heads", "2", "--batch-size", "32",
         "--no-progress", "--threads", "2"]


def test_mae_init_trap_is_fixed_and_asserted(learning):
    """transformers 5.24 leaves ViT-MAE's position tables, CLS and mask tokens at zero; build_mae fixes that."""
    from transformers import ViTMAEForPreTraining

    args = learning.parse_args(_TINY)
    model = learning.build_mae(args)
    embeddings = model.vit.embeddings
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


def test_ijepa_position_tables_checked(learning):
    model = learning.build_ijepa(learning.parse_args(_TINY))
    learning.check_ijepa_position_tables(model)
    with torch.no_grad():
        model.predictor.pos_embed.zero_()
    with pytest.raises(AssertionError, match="sin-cos"):
        learning.check_ijepa_position_tables(model)


def test_random_resized_crop_batch(learning):
    images = torch.rand(6, 1, 32, 32)
    same = learning.random_resized_crop_batch(images, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    torch.testing.assert_close(same, images)
    generator = torch.Generator().manual_seed(0)
    crops = learning.random_resized_crop_batch(images, generator=generator)
    assert crops.shape == images.shape and torch.isfinite(crops).all()
    assert not torch.allclose(crops, images)


def test_ridge_probe_recovers_a_linear_map(learning):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=generator)
    y = x @ torch.randn(8, 2, generator=generator) + 0.5
    result = learning.ridge_probe(x[:300], y[:300], x[300:], y[300:])
    assert result["r2"] > 0.99 and result["mae"] < 0.05
    # Wide features (d > n) take the kernel path: same solution as the textbook primal formula.
    wide = torch.randn(30, 80, generator=generator, dtype=torch.float64)
    target = torch.randn(30, 2, generator=generator, dtype=torch.float64)
    (kernel,) = learning._ridge_solutions(wide, target, [0.1])
    primal = torch.linalg.solve(wide.T @ wide + 0.1 * 30 * torch.eye(80, dtype=torch.float64), wide.T @ target)
    torch.testing.assert_close(kernel, primal)


def test_budget_planning_ends_schedules_with_the_budget(learning):
    """A budget run plans its steps from the first ones; the schedules are sized to the plan."""
    args = learning.parse_args([*_TINY, "--calibration-steps", "2", "--log-every", "1"])
    data = learning.ImageData(
        train=torch.randint(0, 256, (64, 1, 32, 32), dtype=torch.uint8), test=torch.zeros(0, 1, 32, 32),
        train_labels={}, test_labels={}, mean=(0.5,), std=(0.25,), description="noise",
    )
    learner = learning.IJepaLearner(learning.build_ijepa(args), args)
    result = learning.train_for_budget(learner, data, args, budget_seconds=3.0)
    assert result.steps >= 1 and result.images_seen == 32 * result.steps
    if result.planned_steps is not None:  # planned once the calibration steps ran
        assert learner.schedule.total_steps == result.planned_steps
        assert learner.step_fn.schedule is learner.schedule  # the library step runs on the re-planned schedule
    assert all(row["loss"] > 0 for row in result.log)


def test_fashion_mnist_end_to_end(learning, tmp_path):
    if not learning.fashion_mnist_available():
        pytest.skip("Fashion-MNIST not installed: " + learning.fashion_mnist_install_message(None))
    results = learning.main([*_TINY, "--task", "fashion-mnist", "--max-steps", "2", "--train-size", "512",
                             "--test-size", "128", "--low-shot-labels", "20", "--low-shot-draws", "2",
                             "--attentive-epochs", "1", "--output-dir", str(tmp_path)])
    models = [row["model"] for row in results["rows"]]
    assert models == ["raw pixels", "random init (same ViT)", "I-JEPA target encoder", "I-JEPA context encoder",
                      "MAE (transformers ViTMAE)"]
    for row in results["rows"]:
        assert 0.0 <= row["linear_accuracy"] <= 1.0 and 0.0 <= row["knn_accuracy"] <= 1.0
    assert results["training"]["ijepa"]["steps"] == 2 and results["training"]["mae"]["images_seen"] == 64
    for row in results["rows"]:  # every feature set gets the 1%-style probe and the attentive probe
        low = row["probes"]["low_shot_linear"]
        assert low["num_labels"] == 20 and len(low["accuracies"]) == 2 and row["low_shot_accuracy"] == low["accuracy"]
        assert row["probes"]["attentive"]["num_tokens"] == 64 and 0.0 <= row["attentive_accuracy"] <= 1.0
    assert "low-shot linear acc (%)" in results["table"] and "attentive acc (%)" in results["table"]
    for method in ("ijepa", "mae"):  # FLOPs counted on real steps, reported with the budget
        summary = results["training"][method]
        assert summary["flops_per_step"] > 0 and summary["training_flops"] == summary["flops_per_step"] * 2
    # The trained models are kept, so that later probes need no retraining.
    from transformers import ViTMAEForPreTraining

    from ijepa_hf import IJepaEncoderModel

    encoder = IJepaEncoderModel.from_pretrained(tmp_path / "ijepa_target_encoder")
    assert encoder.config.hidden_size == 32
    assert ViTMAEForPreTraining.from_pretrained(tmp_path / "mae").config.hidden_size == 32
    saved = json.loads((tmp_path / "fashion-mnist_results.json").read_text())
    assert saved["table"].startswith("| model |")
    assert (tmp_path / "fashion-mnist_ijepa_log.jsonl").is_file()
    for method in ("ijepa", "mae"):
        assert (tmp_path / f"fashion-mnist_{method}_curves.png").is_file()


def test_spatial_end_to_end(learning, tmp_path):
    results = learning.main([*_TINY, "--task", "spatial", "--image-size", "32", "--patch-size", "4", "--max-steps",
                             "1", "--train-size", "96", "--test-size", "48", "--methods", "ijepa,mae",
                             "--skip-context-encoder", "--output-dir", str(tmp_path)])
    rows = {row["model"]: row for row in results["rows"]}
    assert set(rows) == {"I-JEPA target encoder", "MAE (transformers ViTMAE)"}
    for row in rows.values():
        assert 0.0 <= row["count_linear_accuracy"] <= 1.0 and row["position_mae_px"] >= 0.0
        assert row["position_r2"] <= 1.0


def test_recipes_fill_only_the_flags_not_given(learning):
    official = learning.parse_args([])
    assert (official.width, official.depth, official.heads, official.predictor_width, official.predictor_depth) == (
        192, 6, 3, 96, 4)
    assert official.warmup_fraction == pytest.approx(40 / 300)
    budget = learning.parse_args(["--recipe", "small"])
    assert (budget.width, budget.depth, budget.heads, budget.predictor_width, budget.predictor_depth) == (
        128, 4, 2, 128, 1)
    assert budget.warmup_fraction == 0.25
    overridden = learning.parse_args(["--recipe", "small", "--predictor-depth", "2", "--warmup-fraction", "0.1"])
    assert (overridden.width, overridden.predictor_depth, overridden.warmup_fraction) == (128, 2, 0.1)
    # the model the recipe names is the one that gets built
    config = learning.build_ijepa(budget).config
    assert (config.encoder_config.hidden_size, config.encoder_config.num_hidden_layers) == (128, 4)
    assert (config.predictor_config.hidden_size, config.predictor_config.num_hidden_layers) == (128, 1)


def test_budgets_in_images_compare_across_machines(learning):
    default = learning.parse_args([])  # fashion-mnist: 1,118,976 images = 8,742 steps of 128, on any machine
    assert default.budget_images == 8742 * 128 and default.max_steps == 8742
    assert learning.parse_args(["--budget-images", "1000", "--batch-size", "100"]).max_steps == 10
    assert learning.parse_args(["--budget-minutes", "20"]).max_steps is None  # wall-clock stays available
    with pytest.raises(SystemExit, match="give one budget"):
        learning.parse_args(["--budget-minutes", "20", "--budget-images", "1000"])
    with pytest.raises(SystemExit, match="less than one batch"):
        learning.parse_args(["--budget-images", "10"])


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
