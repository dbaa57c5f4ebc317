"""The pictures are valid PNGs of the expected pixel size (figure size x dpi) and are not blank."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ijepa_hf import IJepaEncoderModel, IJepaMaskCollator
from ijepa_hf.data import PretrainTransform, ProceduralShapes
from ijepa_hf.visualization import (
    pca_rgb,
    plot_mask_grid,
    plot_masks,
    plot_pca_features,
    plot_training_curves,
)

from tiny import tiny_encoder_config


def assert_picture(path: Path, size: tuple[int, int]) -> None:
    """A PNG of ``size`` (width, height) with real content (many colours, not one flat fill)."""
    assert Path(path).is_file()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == size
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 10
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    """A collator batch of 3 procedural 64 px images (8x8 patch grid)."""
    collator = IJepaMaskCollator(64, 8, min_keep=4, seed=0)
    shapes = ProceduralShapes(3, image_size=64, transform=PretrainTransform(64))
    return collator([shapes[i] for i in range(3)])


def test_plot_masks(tmp_path, batch):
    path = plot_masks(batch["pixel_values"][0], batch["context_mask"][0], batch["target_masks"][0], 8,
                      tmp_path / "sub" / "masks.png", title="image 0", figsize=(4, 4.6), dpi=50)
    assert_picture(path, (200, 230))
    # A PIL image, a boolean context mask and a single target block.
    image = ProceduralShapes(1, image_size=64).get_image(0)
    context = torch.zeros(64, dtype=torch.bool)
    context[:40] = True
    assert_picture(plot_masks(image, context, torch.arange(50, 54), 8, tmp_path / "pil.png", dpi=50), (200, 230))
    with pytest.raises(ValueError, match="patch indices"):
        plot_masks(image, torch.tensor([0, 64]), torch.arange(4), 8, tmp_path / "bad.png")


def test_plot_mask_grid(tmp_path, batch):
    path = plot_mask_grid(batch["pixel_values"], batch["context_mask"], batch["target_masks"], 8,
                          tmp_path / "grid.png", ncols=2, panel_size=2.0, dpi=50)
    with Image.open(path) as image:
        width, height = image.size
    assert width == 2 * 2.0 * 50 and height > 2 * 2.0 * 50  # 2 x 2 panels plus the legend row
    assert_picture(path, (width, height))


def test_plot_training_curves(tmp_path):
    rows = [{"step": i, "loss": 1.0 / (i + 1), "lr": 1e-3 * i / 50, "wd": 0.04 + 1e-4 * i,
             "momentum": 0.996 + 4e-5 * i, "target_std": 0.5 - 0.001 * i, "images_per_s": 100.0 + i}
            for i in range(50)]
    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps(row) + "\n" for row in rows) + '{"step": 50, "lo')  # a cut-off last line
    assert_picture(plot_training_curves(log, tmp_path / "curves.png", figsize=(8, 6), dpi=50), (400, 300))
    # Rows in memory; a log with only some keys (and a NaN) still plots.
    partial = [{"step": i, "loss": float("nan") if i == 3 else 2.0 - 0.1 * i} for i in range(10)]
    assert_picture(plot_training_curves(partial, tmp_path / "loss.png", figsize=(4, 3), dpi=50), (200, 150))
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_training_curves([{"step": 1, "foo": 2}], tmp_path / "none.png")
    # A run whose every logged loss was non-finite: the error said no row had a `loss` while listing `loss` as found
    with pytest.raises(ValueError, match=r"nothing to plot: no finite value .* of the known keys found, each non-finite in "
                                         r"every row: \['loss'\]"):
        plot_training_curves([{"step": 1, "loss": float("nan")}, {"step": 2, "loss": float("inf")}],
                             tmp_path / "nan.png")


def test_training_curves_show_the_regulariser_terms_and_the_online_rankme(tmp_path):
    from ijepa_hf.visualization import _panels_with_data

    plain = [{"step": i, "loss": 0.5, "online_rankme": 3.0 + i} for i in range(4)]
    regularised = [{**row, "prediction_loss": 0.4, "sigreg_loss": 2.0, "variance_loss": 0.1} for row in plain]
    titles = [panel[0] for panel in _panels_with_data(regularised)]
    assert any("regulariser" in t for t in titles) and any("online probe" in t for t in titles)
    assert not any("regulariser" in panel[0] for panel in _panels_with_data(plain))
    loss_panel = next(panel for panel in _panels_with_data(regularised) if panel[0] == "loss")
    assert "prediction_loss" in loss_panel[1]
    assert_picture(plot_training_curves(regularised, tmp_path / "c.png", figsize=(8, 6), dpi=50), (400, 300))


def test_a_panel_without_its_left_axis_curves_draws_the_others_on_it(tmp_path, monkeypatch):
    # VICReg's terms (the regulariser panel's twin axis) without SIGReg's (its left axis): no empty axis beside them.
    from matplotlib.axes import Axes

    twins = []
    real_twinx = Axes.twinx
    monkeypatch.setattr(Axes, "twinx", lambda self: twins.append(self) or real_twinx(self))
    rows = [{"step": i, "variance_loss": 0.1, "covariance_loss": 1.0 / (i + 1)} for i in range(4)]
    assert_picture(plot_training_curves(rows, tmp_path / "v.png", figsize=(4, 3), dpi=50), (200, 150))
    assert twins == []
    plot_training_curves([{**row, "sigreg_loss": 2.0} for row in rows], tmp_path / "s.png", figsize=(4, 3), dpi=50)
    assert len(twins) == 1


def test_training_curves_default_size_gives_every_panel_row_room(tmp_path):
    # Eight panels (a regularised run with the online probe) in four rows: the default figure grows with the rows,
    # and every panel title fits the half width of the figure (a longer one was cut off at both ends).
    from ijepa_hf.visualization import _PANELS

    rows = [{"step": i, **{key: 1.0 + i for panel in _PANELS for key in panel[1] + panel[2]}} for i in range(4)]
    with Image.open(plot_training_curves(rows, tmp_path / "all.png", dpi=50)) as image:
        width, height = image.size
    assert width == 600 and height >= 4 * 2.4 * 50
    assert all(len(panel[0]) <= 60 for panel in _PANELS), [panel[0] for panel in _PANELS if len(panel[0]) > 60]
    with Image.open(plot_training_curves([{"step": 0, "loss": 1.0}], tmp_path / "one.png", dpi=50)) as image:
        assert image.size[1] < height  # one panel: a shorter figure


def test_pca_rgb_and_plot(tmp_path):
    features = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    colours = pca_rgb(features, (4, 4))
    assert colours.shape == (4, 4, 3) and colours.min() >= 0 and colours.max() <= 1
    torch.testing.assert_close(pca_rgb(features, (4, 4)), colours)  # deterministic (exact SVD, fixed signs)
    with pytest.raises(ValueError, match="grid"):
        pca_rgb(features, (3, 4))

    torch.manual_seed(0)
    model = IJepaEncoderModel(tiny_encoder_config())
    image = ProceduralShapes(1, image_size=48).get_image(0)  # resized to the model's 32 px by the processor
    assert_picture(plot_pca_features(model, image, tmp_path / "pca.png", figsize=(6, 3), dpi=50), (300, 150))


def test_visualize_example(tmp_path, load_example):
    visualize = load_example("visualize")
    path = visualize.main(["masks", "--output", str(tmp_path / "m.png"), "--image_size", "64", "--patch_size", "8",
                           "--min_keep", "4", "--batch_size", "2", "--ncols", "2", "--dpi", "40"])
    with Image.open(path) as image:
        assert image.size[0] == 2 * 2.5 * 40
    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": i, "loss": 1.0 / (i + 1)}) + "\n" for i in range(5)))
    # One panel: 12 x 3.5 inches (the default figure's least height).
    assert_picture(visualize.main(["curves", "--log", str(log), "--output", str(tmp_path / "c.png"), "--dpi", "40"]),
                   (480, 140))


def test_an_image_that_cannot_be_read_is_named_before_the_model_loads(tmp_path, load_example, monkeypatch):
    """`visualize.py pca --image` of a missing or broken file loaded the model, then ended with a bare "cannot read
    X" and exit code 1; it is now a user's error naming --image and why, before anything is loaded."""
    example = load_example("visualize")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the image was read")

    monkeypatch.setattr(example, "load_encoder", no_model)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not a jpeg")
    argv = ["pca", "--model_name_or_path", str(tmp_path), "--output", str(tmp_path / "pca.png"), "--image"]
    with pytest.raises(ValueError, match=r"--image .*missing\.jpg: no such file"):
        example.main([*argv, str(tmp_path / "missing.jpg")])
    with pytest.raises(ValueError, match=r"--image .*broken\.jpg cannot be read as an image \(UnidentifiedImageError"):
        example.main([*argv, str(broken)])
    with pytest.raises(ValueError, match=r"--image .* is a folder: give one image file"):  # it said "no such file"
        example.main([*argv, str(tmp_path)])
