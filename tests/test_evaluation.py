"""Frozen-feature evaluation: probes on synthetic features, feature extraction with a tiny model, the table,
and the probe example end to end."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from ijepa_hf import IJepaEncoderForImageClassification, IJepaEncoderModel, IJepaForPreTraining
from ijepa_hf.data import EvalTransform
from ijepa_hf.evaluation import (
    evaluate_encoder,
    extract_features,
    format_results_table,
    knn_probe,
    linear_probe,
    low_shot_linear_probe,
)

from tiny import tiny_encoder_config, tiny_pretraining_config


def clusters(num_classes: int = 4, dim: int = 16, n: int = 300, seed: int = 0, spread: float = 3.0):
    """Gaussian blobs, one per class: ``(x [n, dim], y [n])``, linearly separable for a large spread."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(1234)) * spread
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    return centres[labels] + torch.randn(n, dim, generator=generator), labels


# ----------------------------------------------------------------------------------------------------------------
# Probes
# ----------------------------------------------------------------------------------------------------------------


def test_linear_probe_separable_and_deterministic():
    train_x, train_y = clusters(seed=0)
    test_x, test_y = clusters(seed=1)
    result = linear_probe(train_x, train_y, test_x, test_y)
    assert result["accuracy"] >= 0.97 and result["train_accuracy"] >= 0.97
    assert result["num_classes"] == 4 and result["feature_dim"] == 16
    assert set(result["weight_decay_search"]) == {1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1}
    assert linear_probe(train_x, train_y, test_x, test_y) == result


def test_linear_probe_chance_on_random_labels():
    train_x, _ = clusters(seed=0, n=400)
    test_x, _ = clusters(seed=1, n=400)
    generator = torch.Generator().manual_seed(5)
    train_y, test_y = torch.randint(0, 4, (400,), generator=generator), torch.randint(0, 4, (400,), generator=generator)
    assert linear_probe(train_x, train_y, test_x, test_y)["accuracy"] < 0.35  # chance is 0.25
    assert knn_probe(train_x, train_y, test_x, test_y)["accuracy"] < 0.35


def test_linear_probe_adamw_fixed_weight_decay_and_arbitrary_class_ids():
    train_x, train_y = clusters(num_classes=3, seed=0)
    test_x, test_y = clusters(num_classes=3, seed=1)
    ids = torch.tensor([3, 7, 10])  # class ids need not be 0..C-1
    result = linear_probe(train_x, ids[train_y], test_x, ids[test_y], optimizer="adamw", epochs=20, lr=1e-2,
                          batch_size=64, weight_decay=1e-4, standardize=False)
    assert result["accuracy"] >= 0.95
    assert result["num_classes"] == 3 and result["weight_decay"] == 1e-4 and result["weight_decay_search"] == {}


def test_knn_exact_on_duplicated_points():
    points, labels = clusters(n=50, seed=3, spread=0.1)  # heavily overlapping classes
    train_x, train_y = points.repeat(3, 1), labels.repeat(3)  # every point three times
    for weighted in (True, False):
        result = knn_probe(train_x, train_y, points, labels, k=3, weighted=weighted)
        assert result["accuracy"] == 1.0 and result["k"] == 3
    # Chunking does not change the votes; k is clamped to the training-set size.
    assert knn_probe(train_x, train_y, points, labels, k=20, chunk_size=7) == knn_probe(train_x, train_y, points,
                                                                                       labels, k=20)
    assert knn_probe(points[:5], labels[:5], points, labels, k=20)["k"] == 5


def test_probes_reject_bad_inputs():
    x, y = clusters(n=20)
    with pytest.raises(ValueError, match="train_labels must be"):
        linear_probe(x, y[:10], x, y)
    with pytest.raises(ValueError, match="negative"):
        knn_probe(x, torch.full_like(y, -1), x, y)
    with pytest.raises(ValueError, match="widths differ"):
        knn_probe(x, y, x[:, :3], y)
    # Non-finite features (a diverged run, an fp16 overflow) are named, not a deep error of the solver.
    bad = x.clone()
    bad[3, 1], bad[7, 0] = float("nan"), float("inf")
    for probe in (linear_probe, knn_probe, low_shot_linear_probe):
        kwargs = {"num_labels": 10} if probe is low_shot_linear_probe else {}
        with pytest.raises(ValueError, match=r"train_features has 2 rows with NaN or infinite values \(rows 3, 7\)"):
            probe(bad, y, x, y, **kwargs)
        with pytest.raises(ValueError, match=r"test_features has 2 rows with NaN"):
            probe(x, y, bad, y, **kwargs)
    from ijepa_hf.evaluation import attentive_probe

    tokens = x[:, None, :].repeat(1, 2, 1)
    with pytest.raises(ValueError, match=r"train_tokens has 2 rows with NaN or infinite values"):
        attentive_probe(bad[:, None, :].repeat(1, 2, 1), y, tokens, y, epochs=1)


def test_format_results_table():
    table = format_results_table([
        {"model": "a|b", "layers": "last", "linear_accuracy": 0.8123, "knn_accuracy": 0.5, "linear": {"x": 1}},
        {"model": "c", "layers": "last 4", "linear_accuracy": 0.9, "knn_accuracy": None, "note": "x"},
    ])
    lines = table.splitlines()
    assert lines[0] == "| model | layers | linear acc (%) | k-NN acc (%) | note |"
    assert lines[2] == "| a\\|b | last | 81.2 | 50.0 | – |"
    assert lines[3] == "| c | last 4 | 90.0 | – | x |"
    with pytest.raises(ValueError):
        format_results_table([])


# ----------------------------------------------------------------------------------------------------------------
# Feature extraction
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_dataset() -> datasets.Dataset:
    """7 PIL images of mixed sizes, 2 of them grayscale, with ClassLabel labels."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)) for _ in range(5)]
    images += [Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8)) for _ in range(2)]  # mode "L"
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=3)})
    return datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2, 0, 1, 2, 0]}, features=features)


@pytest.fixture(scope="module")
def encoder() -> IJepaEncoderModel:
    torch.manual_seed(0)
    return IJepaEncoderModel(tiny_encoder_config(num_hidden_layers=4)).eval()


def test_extract_features_last_and_last4(image_dataset, encoder):
    last, labels = extract_features(encoder, image_dataset, batch_size=3, progress=False)
    assert last.shape == (7, 32) and last.dtype == torch.float32
    assert labels.tolist() == [0, 1, 2, 0, 1, 2, 0]
    four, _ = extract_features(encoder, image_dataset, batch_size=3, layers=4, progress=False)
    assert four.shape == (7, 4 * 32)
    # The last block's slice is the final output; layers=1 is "last".
    torch.testing.assert_close(four[:, -32:], last, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(extract_features(encoder, image_dataset, layers=1, progress=False)[0], last)

    # By hand: each of the last 4 blocks' outputs through the final norm, mean-pooled, concatenated.
    from ijepa_hf import make_image_processor

    pixel_values = make_image_processor(32)(images=list(image_dataset["image"]), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = encoder(pixel_values, output_hidden_states=True).hidden_states
    expected = torch.cat([encoder.norm(h).mean(1) for h in hidden[-4:]], dim=-1)
    torch.testing.assert_close(four, expected, rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="4 blocks"):
        extract_features(encoder, image_dataset, layers=5, progress=False)
    with pytest.raises(ValueError, match="layers"):
        extract_features(encoder, image_dataset, layers="first", progress=False)


def test_extract_features_resolves_wrapped_models(image_dataset):
    torch.manual_seed(0)
    pretraining = IJepaForPreTraining(tiny_pretraining_config()).train()
    with torch.no_grad():  # a fresh model's two encoders are identical: make them differ, so a mix-up shows
        for parameter in pretraining.context_encoder.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    target, _ = extract_features(pretraining, image_dataset, progress=False)
    expected, _ = extract_features(pretraining.target_encoder, image_dataset, progress=False)
    torch.testing.assert_close(target, expected)
    context, _ = extract_features(pretraining, image_dataset, progress=False, encoder="context")
    torch.testing.assert_close(context, extract_features(pretraining.context_encoder, image_dataset, progress=False)[0])
    assert not torch.allclose(context, target, atol=1e-3)
    assert pretraining.context_encoder.training  # the previous mode is restored

    classifier = IJepaEncoderForImageClassification(tiny_encoder_config(num_labels=3))
    features, _ = extract_features(classifier, image_dataset, progress=False)
    torch.testing.assert_close(features, extract_features(classifier.encoder, image_dataset, progress=False)[0])


def test_extract_features_iterables_transforms_and_missing_labels(image_dataset, encoder):
    images = list(image_dataset["image"])
    transform = EvalTransform(32, resize_ratio=1.0)
    # A generator (no length) of dicts without labels, with a per-image transform.
    features, labels = extract_features(encoder, ({"image": image} for image in images), transform=transform,
                                        batch_size=4, progress=False)
    assert features.shape == (7, 32) and labels.tolist() == [-1] * 7
    # Pre-transformed (pixel_values, label) pairs in a list give the same features.
    pairs = [(transform(image), i % 3) for i, image in enumerate(images)]
    same, pair_labels = extract_features(encoder, pairs, batch_size=4, progress=False)
    torch.testing.assert_close(same, features)
    assert pair_labels.tolist() == [i % 3 for i in range(7)]


def test_evaluate_encoder_row(image_dataset, encoder):
    row = evaluate_encoder(encoder, image_dataset, image_dataset, layers=4, name="tiny", batch_size=4,
                           progress=False, knn_kwargs={"k": 1})
    assert row["model"] == "tiny" and row["layers"] == "last 4" and row["feature_dim"] == 128
    assert row["knn_accuracy"] == 1.0  # test == train: each point is its own nearest neighbour
    assert "| tiny | last 4 |" in format_results_table([row])


def test_probe_example_on_procedural_shapes(tmp_path, load_example, encoder):
    encoder.save_pretrained(tmp_path / "encoder")
    output = tmp_path / "probe.json"
    rows = load_example("probe").main([
        "--model_name_or_path", str(tmp_path / "encoder"), "--dataset_name", "procedural_shapes",
        "--procedural_image_size", "32", "--max_train_samples", "40", "--max_eval_samples", "20",
        "--layers", "last", "4", "--k", "5", "--output_json", str(output), "--no_progress",
        "--low_shot_labels", "10", "--low_shot_draws", "2",
    ])
    assert [row["layers"] for row in rows] == ["last", "last 4"]
    for row in rows:  # the low-shot probe: 2 draws of 10 class-balanced labels, on the same features
        assert row["low_shot"]["num_labels"] == 10 and row["low_shot"]["seeds"] == [0, 1]
        assert 0.0 <= row["low_shot_accuracy"] <= 1.0
    saved = json.loads(output.read_text())
    assert saved["rows"][1]["feature_dim"] == 128
    # The file holds exactly the accuracies the run computed.
    for row, saved_row in zip(rows, saved["rows"]):
        assert saved_row["linear_accuracy"] == row["linear_accuracy"] and saved_row["knn_accuracy"] == row["knn_accuracy"]


# ----------------------------------------------------------------------------------------------------------------
# Issue 12: rows stay matched to their source; probe defaults at any depth
# ----------------------------------------------------------------------------------------------------------------


def test_load_encoder_on_a_pretraining_repo_gives_its_target_encoder(tmp_path):
    """The README's headline example: `load_encoder("outputs/pretrain-default")`."""
    from ijepa_hf import make_image_processor
    from ijepa_hf.loading import load_encoder

    torch.manual_seed(0)
    pretraining = IJepaForPreTraining(tiny_pretraining_config())
    with torch.no_grad():
        for parameter in pretraining.target_encoder.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    pretraining.save_pretrained(tmp_path)
    make_image_processor(pretraining.config.encoder_config).save_pretrained(tmp_path)
    for which, reference in (("target", pretraining.target_encoder), ("context", pretraining.context_encoder)):
        encoder, processor = load_encoder(str(tmp_path), encoder=which)
        pixels = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(encoder(pixels).last_hidden_state, reference(pixels).last_hidden_state)
        assert processor.size == {"height": 32, "width": 32}


def test_extract_features_returns_the_source_row_of_every_feature(image_dataset, encoder):
    rows = [{"image": image, "label": label} for image, label in zip(image_dataset["image"], image_dataset["label"])]
    rows[2]["image"] = b"not an image"  # skipped: the rows after it would shift
    rows[5]["image"] = b"nor this"
    features, labels, indices = extract_features(encoder, rows, batch_size=3, progress=False, return_indices=True)
    assert indices.tolist() == [0, 1, 3, 4, 6]
    assert labels.tolist() == [image_dataset["label"][i] for i in indices.tolist()]
    reference, _ = extract_features(encoder, image_dataset, batch_size=3, progress=False)
    torch.testing.assert_close(features, reference[indices], rtol=1e-5, atol=1e-5)


def test_extract_features_example_writes_ids_and_paths(tmp_path, load_example, encoder):
    folder = tmp_path / "images" / "cat"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "2.png").write_bytes(b"corrupt")  # unreadable: skipped
    encoder.save_pretrained(tmp_path / "encoder")
    output = load_example("extract_features").main([
        "--model_name_or_path", str(tmp_path / "encoder"), "--train_dir", str(tmp_path / "images"),
        "--output", str(tmp_path / "feats"), "--format", "npz", "--no_progress",
    ])
    saved = np.load(output)
    assert saved["features"].shape[0] == len(saved["ids"]) == len(saved["paths"]) == 3
    assert [Path(p).name for p in saved["paths"]] == ["0.png", "1.png", "3.png"]
    assert saved["ids"].tolist() == [0, 1, 3]
    out = load_example("extract_features").main([
        "--model_name_or_path", str(tmp_path / "encoder"), "--train_dir", str(tmp_path / "images"),
        "--output", str(tmp_path / "feats_ds"), "--format", "datasets", "--no_progress",
    ])
    table = datasets.load_from_disk(str(out))
    assert table["id"] == [0, 1, 3] and [Path(p).name for p in table["path"]] == ["0.png", "1.png", "3.png"]


@pytest.mark.parametrize("output_format", ["npz", "datasets"])
def test_extract_features_never_replaces_earlier_features_unasked(tmp_path, load_example, encoder, output_format):
    """An --output that exists (the features of another split or model, maybe hours of extraction) was replaced
    without a word (npz), or written into (datasets). It is refused before anything is extracted, naming
    --overwrite_output, which replaces it."""
    encoder.save_pretrained(tmp_path / "encoder")
    argv = ["--model_name_or_path", str(tmp_path / "encoder"), "--dataset_name", "procedural_shapes", "--max_samples",
            "4", "--format", output_format, "--no_progress"]
    extract = load_example("extract_features")
    first = extract.main([*argv, "--output", str(tmp_path / "feats")])
    written = {path: path.read_bytes() for path in ([first] if first.is_file() else sorted(first.rglob("*.*")))}
    with pytest.raises(SystemExit):
        extract.main([*argv, "--split", "test", "--output", str(tmp_path / "feats")])
    assert {path: path.read_bytes() for path in written} == written
    second = extract.main([*argv, "--split", "test", "--output", str(tmp_path / "feats"), "--overwrite_output"])
    assert second == first
    split = (json.loads(str(np.load(second)["metadata"])) if output_format == "npz"
             else json.loads((second / "extraction.json").read_text()))["split"]
    assert split == "test" and not [path for path in tmp_path.iterdir() if path.name.startswith(".")]


def test_extract_features_stopped_while_writing_leaves_the_earlier_features_whole(tmp_path, load_example, encoder,
                                                                                  monkeypatch):
    """The features are written under a temporary name and renamed: a write that fails half-way (a full disk, a
    kill) leaves the earlier file as it was, and no partial file behind."""
    encoder.save_pretrained(tmp_path / "encoder")
    argv = ["--model_name_or_path", str(tmp_path / "encoder"), "--dataset_name", "procedural_shapes", "--max_samples",
            "4", "--format", "npz", "--no_progress", "--output", str(tmp_path / "feats.npz")]
    extract = load_example("extract_features")
    earlier = extract.main(argv).read_bytes()

    def full_disk(handle, **arrays):
        handle.write(b"half of the archive")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(extract.np, "savez", full_disk)
    with pytest.raises(OSError, match="No space left"):
        extract.main([*argv, "--overwrite_output"])
    assert (tmp_path / "feats.npz").read_bytes() == earlier
    assert sorted(path.name for path in tmp_path.iterdir()) == ["encoder", "feats.npz"]


def test_extract_features_example_reads_the_builtin_datasets_without_the_hub(tmp_path, load_example, encoder):
    encoder.save_pretrained(tmp_path / "encoder")
    for split in ("train", "test"):
        output = load_example("extract_features").main([
            "--model_name_or_path", str(tmp_path / "encoder"), "--dataset_name", "procedural_shapes", "--split", split,
            "--max_samples", "6", "--output", str(tmp_path / f"feats_{split}"), "--format", "npz", "--no_progress",
        ])
        saved = np.load(output)
        assert saved["features"].shape[0] == 6 and (saved["labels"] >= 0).all()
    with pytest.raises(ValueError, match="splits 'train' and 'test'"):
        load_example("extract_features").main([
            "--model_name_or_path", str(tmp_path / "encoder"), "--dataset_name", "procedural_shapes", "--split",
            "extra", "--output", str(tmp_path / "x"), "--no_progress"])


def test_extract_features_refuses_a_named_label_column_the_data_lacks(tmp_path, load_example, encoder):
    """`extract_features.py --label_column_name <typo>` saved every label as -1 with a warning, as for data without
    labels: a column the user named is now refused, naming the data's columns; the default `label` missing from
    unlabelled data still gives -1."""
    encoder.save_pretrained(tmp_path / "encoder")
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (60 * i, 90, 30)).save(folder / f"{i}.png")
    argv = ["--model_name_or_path", str(tmp_path / "encoder"), "--format", "npz", "--no_progress"]
    with pytest.raises(ValueError, match=r"--label_column_name 'kind': the data has no such column \(its columns: "
                                         r"\['image', 'label'\]\)"):
        load_example("extract_features").main([*argv, "--dataset_name", "procedural_shapes", "--max_samples", "4",
                                                "--label_column_name", "kind", "--output", str(tmp_path / "a")])
    assert not (tmp_path / "a.npz").exists() and not (tmp_path / "a").exists()
    output = load_example("extract_features").main([*argv, "--train_dir", str(folder), "--output", str(tmp_path / "b")])
    assert (np.load(output)["labels"] == -1).all()


def test_probe_defaults_work_on_shallow_encoders(tmp_path, load_example):
    torch.manual_seed(0)
    IJepaEncoderModel(tiny_encoder_config(num_hidden_layers=3)).save_pretrained(tmp_path / "encoder")
    rows = load_example("probe").main([
        "--model_name_or_path", str(tmp_path / "encoder"), "--dataset_name", "procedural_shapes",
        "--procedural_image_size", "32", "--max_train_samples", "20", "--max_eval_samples", "10", "--k", "3",
        "--no_progress",
    ])
    assert [row["layers"] for row in rows] == ["last", "last 3"]
    assert rows[1]["feature_dim"] == 3 * 32


def test_multi_layer_features_come_from_the_encoders_intermediate_layers(image_dataset, encoder, monkeypatch):
    calls = []
    original = type(encoder).get_intermediate_layers

    def spy(self, pixel_values, n=1, reshape=False, norm=False):
        calls.append((n, reshape, norm))
        return original(self, pixel_values, n=n, reshape=reshape, norm=norm)

    monkeypatch.setattr(type(encoder), "get_intermediate_layers", spy)
    features, _ = extract_features(encoder, image_dataset, batch_size=4, layers=2, progress=False)
    assert features.shape == (7, 64)
    assert calls == [(2, False, True), (2, False, True)]  # two batches, last 2 blocks, normalised tokens


def test_low_shot_indices_are_balanced_seeded_and_checked():
    from ijepa_hf.evaluation import low_shot_indices

    labels = torch.arange(10).repeat_interleave(100)[torch.randperm(1000, generator=torch.Generator().manual_seed(0))]
    index = low_shot_indices(labels, 60, seed=0)
    assert len(index) == 60 and len(index.unique()) == 60
    assert torch.bincount(labels[index], minlength=10).tolist() == [6] * 10
    assert torch.equal(index, low_shot_indices(labels, 60, seed=0))
    assert not torch.equal(index, low_shot_indices(labels, 60, seed=1))
    counts = torch.bincount(labels[low_shot_indices(labels, 64, seed=3)], minlength=10)
    assert sorted(counts.tolist()) == [6] * 6 + [7] * 4  # the remainder spread one per class
    with pytest.raises(ValueError, match="fewer than the 10 classes"):
        low_shot_indices(labels, 5)
    with pytest.raises(ValueError, match="ask for fewer labels"):
        low_shot_indices(labels, 1001)


def test_low_shot_linear_probe_fits_on_the_subset_only():
    from ijepa_hf.evaluation import low_shot_linear_probe

    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (800,), generator=generator)
    centers = torch.randn(4, 16, generator=generator) * 3
    features = centers[labels] + torch.randn(800, 16, generator=generator)
    result = low_shot_linear_probe(features[:600], labels[:600], features[600:], labels[600:], num_labels=40,
                                   seeds=(0, 1, 2))
    assert result["num_labels"] == 40 and len(result["accuracies"]) == 3 and result["accuracy"] > 0.9
    # Replacing the features of every training example outside the drawn subsets by noise changes nothing.
    from ijepa_hf.evaluation import low_shot_indices

    used = torch.cat([low_shot_indices(labels[:600], 40, seed=s) for s in (0, 1, 2)])
    noisy = torch.randn(600, 16, generator=generator) * 100
    noisy[used] = features[:600][used]
    again = low_shot_linear_probe(noisy, labels[:600], features[600:], labels[600:], num_labels=40,
                                  seeds=(0, 1, 2))
    assert again["accuracies"] == result["accuracies"]


def test_a_probe_of_no_training_is_refused(tmp_path, load_example, encoder, capsys):
    """`linear_probe(epochs=0)` returned the accuracy of an untrained head as the probe's (probe.py --linear_epochs 0
    printed 30% on 5 classes); probe.py's option values are now checked before any feature is extracted (an
    --attentive_epochs 0 stopped the run only after the linear and k-NN probes)."""
    from ijepa_hf.evaluation import linear_probe

    features, labels = torch.randn(20, 8), torch.arange(20) % 2
    for optimizer in ("lbfgs", "adamw"):
        with pytest.raises(ValueError, match="epochs must be >= 1, got 0"):
            linear_probe(features, labels, features, labels, epochs=0, optimizer=optimizer)
    encoder.save_pretrained(tmp_path / "encoder")
    probe = load_example("probe")
    for option in ("--linear_epochs", "--attentive_epochs", "--low_shot_draws", "--batch_size", "--k"):
        with pytest.raises(SystemExit):
            probe.main(["--model_name_or_path", str(tmp_path / "encoder"), "--dataset_name", "procedural_shapes",
                        "--attentive", "--low_shot_labels", "10", option, "0", "--no_progress"])
        assert f"{option} must be >= 1, got 0" in capsys.readouterr().err


def test_a_low_shot_subset_the_data_cannot_give_is_refused_before_any_encoder_runs(tmp_path, load_example, encoder,
                                                                                   monkeypatch, capsys):
    """probe.py --low_shot_labels fewer than the classes (or more than a class can give) stopped the run only after
    every feature of the training set was extracted (hours on a large set), with an error naming the library's
    `num_labels`; the option is now checked against the labels as soon as they are read, naming it."""
    encoder.save_pretrained(tmp_path / "encoder")
    probe = load_example("probe")

    def no_encoder(*args, **kwargs):
        raise AssertionError("the encoder was loaded before the options were checked")

    monkeypatch.setattr(probe, "load_encoder", no_encoder)
    argv = ["--model_name_or_path", str(tmp_path / "encoder"), "--dataset_name", "procedural_shapes",
            "--max_train_samples", "40", "--no_progress"]
    with pytest.raises(ValueError, match=r"--low_shot_labels 3: 3 labels are fewer than the \d+ classes"):
        probe.main([*argv, "--low_shot_labels", "3"])
    with pytest.raises(ValueError, match=r"--low_shot_labels 400: class \d+ has \d+ examples, fewer than the \d+ a "
                                         r"balanced subset of 400 labels needs: ask for fewer labels"):
        probe.main([*argv, "--low_shot_labels", "400"])
    with pytest.raises(SystemExit):
        probe.main([*argv, "--low_shot_labels", "0"])
    assert "--low_shot_labels must be >= 1, got 0" in capsys.readouterr().err


def test_probe_checks_every_models_depth_before_any_encoder_runs(tmp_path, load_example, encoder, monkeypatch):
    """probe.py --model_name_or_path A B --layers 4, with B of 2 blocks, probed A (hours on a large set), then
    stopped at B with "layers=4 but the encoder has 2 blocks." and no result of A written. Every model's depth is
    now read from its config before any encoder is loaded, and the error names the model and the fix."""
    encoder.save_pretrained(tmp_path / "deep")
    IJepaEncoderModel(tiny_encoder_config(num_hidden_layers=2)).save_pretrained(tmp_path / "shallow")
    pretraining = tmp_path / "pretraining"
    IJepaForPreTraining(tiny_pretraining_config()).save_pretrained(pretraining)  # 2 blocks
    probe = load_example("probe")

    def no_encoder(*args, **kwargs):
        raise AssertionError("an encoder was loaded before every model's depth was checked")

    monkeypatch.setattr(probe, "load_encoder", no_encoder)
    argv = ["--dataset_name", "procedural_shapes", "--max_train_samples", "20", "--no_progress"]
    for shallow in (tmp_path / "shallow", pretraining):
        expected = rf"--layers 4: layers=4 asks for the last 4 blocks, but {shallow} has 2 blocks: ask for 1 to 2"
        with pytest.raises(ValueError, match=expected):
            probe.main(["--model_name_or_path", str(tmp_path / "deep"), str(shallow), "--layers", "last", "4",
                        *argv])


def test_probe_writes_each_models_rows_as_soon_as_they_are_done(tmp_path, load_example, encoder, monkeypatch):
    """A failure at the second of several models (out of memory, the network) lost the first model's finished
    probes: the results file was written only at the end. It is now rewritten after each model."""
    encoder.save_pretrained(tmp_path / "first")
    encoder.save_pretrained(tmp_path / "second")
    probe = load_example("probe")
    real_load = probe.load_encoder

    def fail_on_second(path, *args, **kwargs):
        if str(path).endswith("second"):
            raise RuntimeError("out of memory (injected)")
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(probe, "load_encoder", fail_on_second)
    output = tmp_path / "probe.json"
    with pytest.raises(RuntimeError, match="injected"):
        probe.main(["--model_name_or_path", str(tmp_path / "first"), str(tmp_path / "second"), "--dataset_name",
                    "procedural_shapes", "--procedural_image_size", "32", "--max_train_samples", "20",
                    "--max_eval_samples", "10", "--layers", "last", "--k", "3", "--output_json", str(output),
                    "--no_progress"])
    saved = json.loads(output.read_text())
    assert [row["model"] for row in saved["rows"]] == [str(tmp_path / "first")]
    assert 0.0 <= saved["rows"][0]["linear_accuracy"] <= 1.0
