"""Live learning telemetry: the online k-NN and RankMe of the target encoder during pretraining, in the loop's log
(and TensorBoard) and through ``OnlineProbeCallback`` in ``IJepaTrainer``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ijepa_hf.data import OnlineProbeSet
from ijepa_hf.training import IJepaTrainer, OnlineProbeCallback
from ijepa_hf.training.metrics import online_probe

from tiny import read_log, run, tiny_trainer_parts, trainer_args

pytestmark = pytest.mark.usefixtures("one_thread")


class _PixelFeatures(torch.nn.Module):
    """An "encoder" whose pooled feature is the first row of the image's first channel."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))

    def forward(self, pixel_values):
        return SimpleNamespace(pooler_output=pixel_values[:, 0, 0, :] * self.weight)


def _probe_images(labels: torch.Tensor, informative: bool) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(len(labels), 3, 8, 8, generator=generator) * 0.1
    if informative:
        pixels[torch.arange(len(labels)), 0, 0, labels] += 1.0  # one direction per class
    return pixels


def test_online_probe_measures_what_the_features_know():
    labels = torch.arange(64) % 4
    encoder = _PixelFeatures().train()
    good = online_probe(encoder, _probe_images(labels, True), labels, k=5)
    assert good["online_knn_accuracy"] == 1.0
    assert encoder.training  # put back in training mode
    chance = online_probe(encoder, _probe_images(labels, False), labels, k=5)
    assert chance["online_knn_accuracy"] < 0.6
    assert 1.0 <= good["online_rankme"] <= 8 and good["online_probe_seconds"] >= 0


def test_online_probe_reports_the_raw_pixel_reference_beside_the_encoder():
    """Features that throw the pixels' information away score below the raw-pixel k-NN on the same split."""
    labels = torch.arange(64) % 4
    pixels = _probe_images(labels, True)
    encoder = _PixelFeatures()
    with torch.no_grad():
        encoder.weight.zero_()  # constant features: nothing learnt
    values = online_probe(encoder, pixels, labels, k=5)
    assert values["online_knn_pixels_accuracy"] == 1.0 > values["online_knn_accuracy"]
    again = online_probe(_PixelFeatures(), pixels, labels, k=5)  # cached per pixel tensor and k: the same value
    assert again["online_knn_pixels_accuracy"] == 1.0
    assert online_probe(encoder, _probe_images(labels, False), labels, k=5)["online_knn_pixels_accuracy"] < 0.6


def test_pretrain_logs_the_online_probe_at_its_steps_and_reports_its_cost(tmp_path, monkeypatch):
    result = run(tmp_path / "run", "--online_probe_steps", "3", "--online_probe_images", "32", steps=8)
    rows = read_log(tmp_path / "run")
    probed = [row["step"] for row in rows if row.get("online_knn_accuracy") is not None]
    assert probed == [3, 6, 8]  # every 3 updates and at the end, although rows come every 2
    row = next(row for row in rows if row["step"] == 3)
    assert 0.0 <= row["online_knn_accuracy"] <= 1.0 and row["online_rankme"] >= 1.0
    assert len({r["online_knn_pixels_accuracy"] for r in rows if r["step"] in probed}) == 1  # the run's reference
    assert result.online_probe_s == pytest.approx(sum(r["online_probe_seconds"] for r in rows
                                                      if "online_probe_seconds" in r))
    assert result.online_knn_accuracy == rows[-1]["online_knn_accuracy"]
    import ijepa_hf.visualization as visualization

    figures = []
    real = visualization._new_figure
    monkeypatch.setattr(visualization, "_new_figure", lambda *a: figures.append(real(*a)) or figures[-1])
    visualization.plot_training_curves(result.log_file, tmp_path / "curves.png")
    titles = [axes.get_title() for axes in figures[0].axes]
    assert any(title.startswith("online probe: k-NN accuracy") for title in titles)
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_the_default_probes_ten_times_and_zero_turns_it_off(tmp_path):
    run(tmp_path / "default", "--online_probe_images", "16", steps=20)
    probed = [row["step"] for row in read_log(tmp_path / "default") if "online_knn_accuracy" in row]
    assert probed == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    run(tmp_path / "off", "--online_probe_steps", "0", steps=4)
    assert not any("online_knn_accuracy" in row for row in read_log(tmp_path / "off"))


def test_a_probe_without_labels_is_refused_naming_the_option(tmp_path):
    with pytest.raises(ValueError, match=r"--online_probe_label_column 'colour' is not a column of the data \(it has \['count'"):
        run(tmp_path / "bad", "--online_probe_steps", "2", "--online_probe_label_column", "colour", steps=2)
    folder = tmp_path / "images"
    folder.mkdir()
    from PIL import Image

    for index in range(8):  # a flat folder: no class sub-folders, so no labels
        Image.new("RGB", (32, 32), (index * 30, 0, 0)).save(folder / f"{index}.png")
    with pytest.raises(ValueError, match="needs labels.*--online_probe_label_column"):
        run(tmp_path / "nolabels", "--train_dir", str(folder), "--online_probe_steps", "2", steps=2, batch=4)
    run(tmp_path / "quiet", "--train_dir", str(folder), steps=2, batch=4)  # the default: off, logged


def test_trainer_callback_logs_the_probe_with_the_trainer(tmp_path):
    model, collator, data = tiny_trainer_parts()
    labels = torch.arange(16) % 4
    probe_set = OnlineProbeSet(torch.randn(16, 3, 32, 32), labels, "label", "test")
    callback = OnlineProbeCallback(probe_set, every_n_steps=2, k=3)
    trainer = IJepaTrainer(model=model, args=trainer_args(tmp_path, logging_steps=3), train_dataset=data,
                           data_collator=collator, callbacks=[callback])
    trainer.train()
    probed = [entry["step"] for entry in trainer.state.log_history if "online_knn_accuracy" in entry]
    assert probed == [2, 4]  # its own steps, whatever logging_steps says
    assert callback.seconds > 0
    with pytest.raises(ValueError, match="every_n_steps must be >= 1"):
        OnlineProbeCallback(probe_set, every_n_steps=0)


def test_string_class_labels_are_probed_and_a_column_of_measurements_is_refused(tmp_path):
    """A dataset's label column may hold class names (Parquet files, CSV metadata): the online k-NN only needs which
    images share a class, so names are probed as classes (they failed with "invalid literal for int()"). A column of
    non-integer numbers is no class label, and is refused naming the column."""
    import numpy as np
    from datasets import Dataset, Image as ImageFeature
    from PIL import Image

    rng = np.random.default_rng(0)
    paths, names, scores = [], [], []
    for index in range(16):
        name = ("red", "blue")[index % 2]
        pixels = np.full((32, 32, 3), (200, 30, 30) if name == "red" else (30, 30, 200), np.uint8)
        path = tmp_path / f"{index}.png"
        Image.fromarray(np.clip(pixels + rng.normal(0, 20, pixels.shape), 0, 255).astype(np.uint8)).save(path)
        paths.append(str(path)), names.append(name), scores.append(index + 0.5)
    data = tmp_path / "data"
    data.mkdir()
    Dataset.from_dict({"image": paths, "colour": names, "score": scores}).cast_column(
        "image", ImageFeature()).to_parquet(str(data / "train.parquet"))

    run(tmp_path / "names", "--dataset_name", str(data), "--online_probe_label_column", "colour",
        "--online_probe_steps", "2", "--online_probe_images", "16", steps=2, batch=4)
    rows = [row for row in read_log(tmp_path / "names") if "online_knn_accuracy" in row]
    assert rows and all(0.0 <= row["online_knn_accuracy"] <= 1.0 for row in rows)
    with pytest.raises(ValueError, match=r"--online_probe_label_column 'score' holds \d+\.5: .*class labels"):
        run(tmp_path / "scores", "--dataset_name", str(data), "--online_probe_label_column", "score",
            "--online_probe_steps", "2", "--online_probe_images", "16", steps=2, batch=4)


def test_the_trainer_example_takes_the_probes_label_column_and_k(tmp_path):
    """examples/pretrain_trainer.py has examples/pretrain.py's probe options: which column holds the labels, and the
    neighbours of the k-NN (it had neither, and probed 'label' with k = 20 only)."""
    import sys

    from tiny import REPO_ROOT

    sys.path.insert(0, str(REPO_ROOT / "examples"))
    try:
        import pretrain_trainer as example
    finally:
        sys.path.pop(0)
    common = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--embedded_num_images", "16",
              "--online_probe_images", "16", "--online_probe_steps", "1"]
    trainer = example.main([*common, "--output_dir", str(tmp_path / "count"), "--online_probe_label_column", "count",
                            "--online_probe_k", "5"])
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, OnlineProbeCallback))
    assert callback.probe_set.label_name == "count" and callback.k == 5
    with pytest.raises(ValueError, match="--online_probe_label_column 'colour' is not a column"):
        example.main([*common, "--output_dir", str(tmp_path / "colour"), "--online_probe_label_column", "colour"])
