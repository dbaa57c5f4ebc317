"""Tests for ijepa_hf.data: transforms, robust loading, procedural shapes, Fashion-MNIST, folders."""

from __future__ import annotations

import io
import logging
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ijepa_hf.data import (
    FASHION_MNIST_CLASSES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SHAPE_NAMES,
    TEXTURE_NAMES,
    BadImageCounter,
    EvalTransform,
    IDXFormatError,
    ImageFileDataset,
    PretrainTransform,
    ProceduralShapes,
    RandomResizedCrop,
    SafeDataset,
    SkipBadCollator,
    as_hf_dataset,
    detect_image_column,
    fashion_mnist_dataset,
    load_fashion_mnist,
    load_image,
    load_image_dataset,
    make_transform_fn,
    set_image_transform,
    to_rgb,
)

from tiny import write_idx


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def _rand_image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def _jpeg_bytes(w: int = 48, h: int = 40) -> bytes:
    buf = io.BytesIO()
    _rand_image(w, h).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """root/{a,b}/...: 5 good images (png + jpg) and one truncated JPEG."""
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for i in range(3):
        _rand_image(20 + i, 24, seed=i).save(root / "a" / f"{i}.png")
    for i in range(2):
        (root / "b" / f"{i}.jpg").write_bytes(_jpeg_bytes())
    data = _jpeg_bytes()
    (root / "b" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    return root


# ----------------------------------------------------------------------------------------------------------
# transforms
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_size", [(64, 48), (17, 90), (300, 301)])
@pytest.mark.parametrize("out_size", [32, (24, 40)])
def test_random_resized_crop_output_size(in_size, out_size):
    crop = RandomResizedCrop(out_size, generator=torch.Generator().manual_seed(0))
    out = crop(_rand_image(*in_size))
    expected = (out_size, out_size) if isinstance(out_size, int) else (out_size[1], out_size[0])
    assert out.size == expected  # PIL: (width, height)
    # Tensor input [C, H, W] -> [C, h, w].
    t = torch.rand(3, in_size[1], in_size[0])
    assert crop(t).shape[-2:] == ((out_size, out_size) if isinstance(out_size, int) else tuple(out_size))


def test_random_resized_crop_params_and_reproducibility():
    scale, ratio = (0.3, 1.0), (3 / 4, 4 / 3)
    g1, g2 = torch.Generator().manual_seed(123), torch.Generator().manual_seed(123)
    boxes1 = [RandomResizedCrop.get_params(100, 120, scale, ratio, g1) for _ in range(50)]
    boxes2 = [RandomResizedCrop.get_params(100, 120, scale, ratio, g2) for _ in range(50)]
    assert boxes1 == boxes2
    assert len(set(boxes1)) > 40  # actually random
    for top, left, h, w in boxes1:
        assert 0 <= top and top + h <= 100 and 0 <= left and left + w <= 120
        # Rounding of w and h allows a little slack on area and ratio.
        assert 0.3 * 12000 * 0.9 <= h * w <= 12000
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    # Same generator seed -> same image; the global RNG is untouched when a generator is given.
    img = _rand_image(80, 60)
    state = torch.random.get_rng_state()
    a = RandomResizedCrop(32, generator=torch.Generator().manual_seed(5))(img)
    b = RandomResizedCrop(32, generator=torch.Generator().manual_seed(5))(img)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    # Without a generator, torch.manual_seed controls it (DataLoader-worker seeding).
    torch.manual_seed(7)
    c = RandomResizedCrop.get_params(60, 80, scale, ratio)
    torch.manual_seed(7)
    assert RandomResizedCrop.get_params(60, 80, scale, ratio) == c


def _torchvision_get_params(height, width, scale, ratio):
    """torchvision's RandomResizedCrop.get_params (BSD), restated to pin draw-for-draw parity."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,)).item()
            j = torch.randint(0, width - w + 1, size=(1,)).item()
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def test_random_resized_crop_matches_torchvision_draws():
    for seed in range(200):
        torch.manual_seed(seed)
        expected = _torchvision_get_params(37 + seed, 91, (0.3, 1.0), (3 / 4, 4 / 3))
        torch.manual_seed(seed)
        assert RandomResizedCrop.get_params(37 + seed, 91, (0.3, 1.0), (3 / 4, 4 / 3)) == expected


def test_random_resized_crop_central_fallback():
    # A 1000x10 strip cannot host a crop with aspect <= 4/3 covering >= 99% of it: central fallback.
    top, left, h, w = RandomResizedCrop.get_params(10, 1000, (0.99, 1.0), (3 / 4, 4 / 3), torch.Generator())
    assert (h, w) == (10, round(10 * 4 / 3)) and top == 0 and left == (1000 - w) // 2


def test_pretrain_transform_shape_and_normalisation():
    color = (128, 64, 200)
    img = Image.new("RGB", (50, 70), color)
    out = PretrainTransform(32, generator=torch.Generator().manual_seed(0))(img)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    expected = torch.tensor([(c / 255 - m) / s for c, m, s in zip(color, IMAGENET_MEAN, IMAGENET_STD)])
    assert torch.allclose(out, expected.view(3, 1, 1).expand_as(out), atol=1e-5)
    # Any mode is accepted (converted to RGB); random images give roughly standardised values.
    grey = PretrainTransform(16)(Image.new("L", (20, 20), 255))
    assert grey.shape == (3, 16, 16)
    assert torch.allclose(grey[:, 0, 0], torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]))


def test_eval_transform():
    t = EvalTransform(32)  # resize shorter side to int(32 * 256/224) = 36, centre crop 32
    assert t.resize_size == 36
    img = _rand_image(90, 60)
    out = t(img)
    assert out.shape == (3, 32, 32)
    assert torch.equal(out, t(img))  # deterministic
    same = EvalTransform(32, resize_ratio=1.0)(_rand_image(32, 32))
    manual = torch.from_numpy(np.array(_rand_image(32, 32))).permute(2, 0, 1).float() / 255
    manual = (manual - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(same, manual, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# to_rgb / load_image
# ----------------------------------------------------------------------------------------------------------


def test_to_rgb_modes():
    rgb = Image.new("RGB", (4, 4), (1, 2, 3))
    assert to_rgb(rgb) is rgb
    assert to_rgb(Image.new("L", (4, 4), 77)).getpixel((0, 0)) == (77, 77, 77)
    assert to_rgb(Image.new("1", (4, 4), 1)).getpixel((0, 0)) == (255, 255, 255)
    # RGBA: transparent -> white background; opaque unchanged; background=None drops alpha.
    rgba = Image.new("RGBA", (2, 1), (10, 20, 30, 0))
    rgba.putpixel((1, 0), (10, 20, 30, 255))
    out = to_rgb(rgba)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (10, 20, 30)
    assert to_rgb(rgba, background=None).getpixel((0, 0)) == (10, 20, 30)
    assert to_rgb(Image.new("LA", (2, 2), (50, 0))).getpixel((0, 0)) == (255, 255, 255)
    # P with and without transparency.
    p = Image.new("P", (2, 2), 1)
    p.putpalette([0, 0, 0, 200, 100, 0] + [0] * 762)
    assert to_rgb(p).getpixel((0, 0)) == (200, 100, 0)
    p.info["transparency"] = p.getpixel((0, 0))
    assert to_rgb(p).getpixel((0, 0)) == (255, 255, 255)
    # CMYK: no ink -> white, full cyan -> (0, 255, 255).
    assert to_rgb(Image.new("CMYK", (2, 2), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("CMYK", (2, 2), (255, 0, 0, 0))).getpixel((0, 0)) == (0, 255, 255)
    # 16-bit grey: full range kept (PIL's own convert would clip everything above 255 to white).
    i16 = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    assert i16.mode.startswith("I;16")
    assert [to_rgb(i16).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    i32 = Image.fromarray(np.array([[0, 100, 200]], dtype=np.int32))
    assert i32.mode == "I" and [to_rgb(i32).getpixel((x, 0))[0] for x in range(3)] == [0, 100, 200]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert f.mode == "F" and [to_rgb(f).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    ycc = Image.new("RGB", (2, 2), (30, 60, 90)).convert("YCbCr")
    assert to_rgb(ycc).mode == "RGB"


def test_load_image_sources_and_corrupt_files(tmp_path, caplog):
    good = tmp_path / "good.jpg"
    good.write_bytes(_jpeg_bytes())
    counter = BadImageCounter(max_warnings=2)
    assert load_image(good, counter).size == (48, 40)
    assert load_image(str(good), counter).mode == "RGB"
    assert load_image(good.read_bytes(), counter).size == (48, 40)
    assert load_image({"bytes": None, "path": str(good)}, counter).size == (48, 40)
    assert load_image(Image.new("L", (3, 3)), counter).mode == "RGB"
    assert counter.count == 0 and str(counter) == "0 bad images"

    data = good.read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    noise = tmp_path / "noise.png"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    with caplog.at_level(logging.WARNING, logger="ijepa_hf.data.loading"):
        assert load_image(truncated, counter) is None
        assert load_image(noise, counter) is None
        assert load_image(tmp_path / "missing.jpg", counter) is None
        assert load_image(b"not an image", counter) is None
    assert counter.count == 4 and len(counter) == 4
    assert "truncated.jpg" in caplog.text and "noise.png" in caplog.text
    assert "missing.jpg" not in caplog.text  # only the first max_warnings=2 are logged one by one
    assert "4 bad images skipped" in str(counter) and "truncated.jpg" in str(counter)
    # A file read again (the next epoch) counts again, but is named and reported once.
    counter = BadImageCounter(max_warnings=5)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ijepa_hf.data.loading"):
        for _ in range(3):
            assert load_image(truncated, counter) is None
        assert load_image(noise, counter) is None
    assert counter.count == 4 and caplog.text.count("truncated.jpg") == 1
    assert str(counter).count("truncated.jpg") == 1 and "noise.png" in str(counter)
    counter.reset()
    assert counter.count == 0 and counter.examples == []


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_over_folder_with_corrupt_file(image_folder, num_workers):
    counter = BadImageCounter()
    ds = ImageFileDataset.from_folder(image_folder, transform=PretrainTransform(16), counter=counter)
    assert len(ds) == 6 and ds.class_names == ["a", "b"]
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=num_workers, collate_fn=SkipBadCollator())
    batches = [b for b in loader if b is not None]
    assert sum(b["pixel_values"].shape[0] for b in batches) == 5
    assert all(b["pixel_values"].shape[1:] == (3, 16, 16) for b in batches)
    # Counted even when the failure happened in a worker process (shared-memory slots).
    assert counter.count == 1, str(counter)


def test_skip_bad_collator_and_safe_dataset():
    collate = SkipBadCollator()
    assert collate([None, {"pixel_values": None}]) is None
    out = collate([{"pixel_values": torch.zeros(2)}, None, {"pixel_values": torch.ones(2)}])
    assert out["pixel_values"].shape == (2, 2)

    class Flaky(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            if i == 2:
                raise OSError("broken")
            return torch.tensor([i])

    safe = SafeDataset(Flaky(), counter=BadImageCounter())
    assert safe[2] is None and safe.counter.count == 1
    batch = next(iter(torch.utils.data.DataLoader(safe, batch_size=4, collate_fn=SkipBadCollator())))
    assert batch.tolist() == [[0], [1], [3]]


def test_hf_imagefolder_pipeline_survives_bad_file(image_folder, tmp_path):
    ds = load_image_dataset(train_dir=image_folder, cache_dir=tmp_path / "cache")
    assert detect_image_column(ds) == "image" and len(ds) == 6
    counter = BadImageCounter()
    ds = set_image_transform(ds, PretrainTransform(16), counter=counter)
    rows = [ds[i] for i in range(len(ds))]  # single-row access works (bad row -> pixel_values None)
    assert sum(r["pixel_values"] is None for r in rows) == 1 and all("label" in r for r in rows)
    counter.reset()
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=SkipBadCollator())
    seen = sum(b["pixel_values"].shape[0] for b in loader if b is not None)
    assert seen == 5 and counter.count == 1
    # drop_bad=True for batched access.
    fn = make_transform_fn(PretrainTransform(8), counter=BadImageCounter(), drop_bad=True)
    out = fn({"image": [Image.new("RGB", (9, 9)), b"junk"], "label": [0, 1], "other": [1, 2]})
    assert len(out["pixel_values"]) == 1 and out["label"] == [0] and "other" not in out


def test_detect_image_column():
    import datasets

    img = Image.new("RGB", (4, 4))
    assert detect_image_column(datasets.Dataset.from_dict({"img": [img], "y": [0]})) == "img"
    feats = datasets.Features({"txt": datasets.Value("string"), "picture": datasets.Image()})
    ds = datasets.Dataset.from_dict({"txt": ["a"], "picture": [img]}, features=feats)
    assert detect_image_column(ds) == "picture"
    assert detect_image_column(ds, "txt") == "txt"
    with pytest.raises(ValueError, match="no image column"):
        detect_image_column(datasets.Dataset.from_dict({"txt": ["a"]}))
    with pytest.raises(ValueError, match="not found"):
        detect_image_column(ds, "nope")
    with pytest.raises(ValueError, match="dataset_name"):
        load_image_dataset()


# ----------------------------------------------------------------------------------------------------------
# procedural shapes
# ----------------------------------------------------------------------------------------------------------


def test_procedural_shared_shape_changes_only_the_other_objects_classes():
    independent = ProceduralShapes(60, image_size=48, seed=5, max_objects=3)
    shared = ProceduralShapes(60, image_size=48, seed=5, max_objects=3, shared_shape=True)
    differed = 0
    for i in range(len(shared)):
        a, b = independent.describe(i), shared.describe(i)
        assert all(o["shape"] == b["objects"][0]["shape"] for o in b["objects"])  # one class per scene
        assert a["label"] == b["label"] and a["texture"] == b["texture"] and a["count"] == b["count"]
        for oa, ob in zip(a["objects"], b["objects"], strict=True):  # same layout, sizes, rotations, fills
            assert (oa["cx"], oa["cy"], oa["radius"], oa["angle"], oa["stripe_color"]) == (
                ob["cx"], ob["cy"], ob["radius"], ob["angle"], ob["stripe_color"])
        differed += any(o["shape"] != a["objects"][0]["shape"] for o in a["objects"])
    assert differed >= 10  # the independent draw does mix classes, so the option changes images
    assert "shared_shape=True" in repr(shared)


def test_embedded_scenes_are_the_same_wherever_they_are_drawn():
    from ijepa_hf.data import EMBEDDED_SCENES, build_pretraining_data, embedded_scenes
    from ijepa_hf.finetuning import load_labeled_splits

    assert EMBEDDED_SCENES["shared_shape"] is True
    reference = embedded_scenes(4, image_size=32, seed=0)
    assert reference.shared_shape and reference.radius_range == tuple(EMBEDDED_SCENES["radius_range"])
    data = build_pretraining_data(image_size=32, embedded_num_images=4)  # no data argument: the embedded scenes
    assert repr(data.dataset.source) == repr(reference)
    splits = load_labeled_splits(dataset_name="procedural_shapes", max_train_samples=4, max_eval_samples=2,
                                 procedural_image_size=32)  # the probe / fine-tuning examples' built-in data
    for i in range(4):
        assert np.array_equal(np.asarray(splits["train"][i]["image"].convert("RGB")), reference.render(i)[0])
        assert splits["train"][i]["label"] == reference.labels(i)["shape"]


def test_procedural_deterministic_and_labels():
    a = ProceduralShapes(40, image_size=48, seed=3, max_objects=4)
    b = ProceduralShapes(40, image_size=48, seed=3, max_objects=4)
    # Same (seed, index) -> identical, in any access order.
    assert np.array_equal(a.render(7)[0], b.render(7)[0])
    _ = b.render(0), b.render(30)
    assert np.array_equal(a.render(7)[0], b.render(7)[0])
    assert not np.array_equal(a.render(7)[0], a.render(8)[0])
    assert not np.array_equal(a.render(7)[0], ProceduralShapes(40, image_size=48, seed=4).render(7)[0])
    counts, shapes, textures = set(), set(), set()
    for i in range(len(a)):
        item = a[i]
        assert item["image"].size == (48, 48) and item["image"].mode == "RGB"
        assert 1 <= item["count"] <= 4 and 0 <= item["label"] < len(SHAPE_NAMES)
        assert item["label"] == item["shape"] == a.labels(i)["shape"]
        assert 0 <= item["texture"] < len(TEXTURE_NAMES) and item["texture"] == a.describe(i)["background"]["texture"]
        assert item["position"].shape == (2,) and bool(((item["position"] > 0) & (item["position"] < 1)).all())
        d = a.describe(i)
        assert len(d["objects"]) == item["count"]
        assert all(o["radius"] < d["objects"][0]["radius"] for o in d["objects"][1:])  # largest is unique
        counts.add(item["count"])
        shapes.add(item["label"])
        textures.add(item["texture"])
    assert len(counts) >= 3 and len(shapes) >= 4 and len(textures) >= 4  # varied
    with pytest.raises(IndexError):
        a.render(40)
    t = ProceduralShapes(4, image_size=32, transform=PretrainTransform(24))
    batch = torch.utils.data.default_collate([t[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 24, 24) and batch["position"].shape == (4, 2)


def test_procedural_items_are_drawn_once_per_process_where_the_dataset_fits(monkeypatch):
    """A pretraining epoch after the first reads the drawn scenes instead of drawing them again; the items are those
    `render` draws, which still gives a fresh array each call; a dataset over the byte budget draws on every access."""
    ds = ProceduralShapes(6, image_size=32, seed=5)
    calls = []
    draw = ProceduralShapes.render
    monkeypatch.setattr(ProceduralShapes, "render", lambda self, i: calls.append(i) or draw(self, i))
    for _ in range(3):
        for i in range(len(ds)):
            item = ds[i]
            assert np.array_equal(np.asarray(item["image"]), draw(ds, i)[0])
            assert item["label"] == ds.labels(i)["label"] and item["count"] == ds.labels(i)["count"]
    assert sorted(calls) == list(range(6))  # three epochs, each item drawn once
    assert np.array_equal(np.asarray(ds.get_image(2)), draw(ds, 2)[0]) and len(calls) == 6
    fresh = ds.render(2)[0]
    fresh[:] = 0  # the caller's own array: the kept item does not change
    assert np.array_equal(np.asarray(ds[2]["image"]), draw(ds, 2)[0]) and np.asarray(ds[2]["image"]).any()

    monkeypatch.setattr(ProceduralShapes, "RENDER_CACHE_BYTES", 6 * 32 * 32 * 3 - 1)
    big = ProceduralShapes(6, image_size=32, seed=5)
    calls.clear()
    for _ in range(2):
        _ = [big[i] for i in range(len(big))]
    assert len(calls) == 12


def test_procedural_hf_dataset():
    ds = as_hf_dataset(6, image_size=32, seed=1)
    src = ProceduralShapes(6, image_size=32, seed=1)
    assert set(ds.column_names) == {"image", "label", "shape", "texture", "count", "position", "size"}
    assert ds.features["label"].names == list(SHAPE_NAMES) and ds.features["texture"].names == list(TEXTURE_NAMES)
    row = ds[2]
    assert isinstance(row["image"], Image.Image) and row["image"].size == (32, 32)
    assert np.array_equal(np.asarray(row["image"]), src.render(2)[0])  # PNG is lossless
    assert row["label"] == src.labels(2)["label"] and row["count"] == src.labels(2)["count"]
    assert row["texture"] == src.labels(2)["texture"]
    assert np.allclose(row["position"], src.labels(2)["position"], atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Fashion-MNIST
# ----------------------------------------------------------------------------------------------------------

_FMNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR") or "/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(
    not (_FMNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST not installed (sudo apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_real_files():
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [1000] * 10  # the test split is exactly balanced
    ds = fashion_mnist_dataset("test", max_samples=5)
    assert len(ds) == 5 and ds.features["label"].names == list(FASHION_MNIST_CLASSES)
    assert ds[0]["image"].size == (28, 28) and ds[0]["label"] == int(labels[0])
    assert np.array_equal(np.asarray(ds[0]["image"]), images[0])


def test_fashion_mnist_fake_files_and_errors(tmp_path, monkeypatch):
    images = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    labels = np.array([0, 9, 4], dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    got_images, got_labels = load_fashion_mnist("train")
    assert np.array_equal(got_images, images) and got_labels.tolist() == [0, 9, 4]

    # Wrong magic.
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, magic=b"\x12\x34\x08\x03")
    with pytest.raises(IDXFormatError, match="magic"):
        load_fashion_mnist("train", root=tmp_path)
    # Truncated data.
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, truncate=10)
    with pytest.raises(IDXFormatError, match="truncated"):
        load_fashion_mnist("train", root=tmp_path)
    # Not gzip at all.
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"garbage" * 10)
    with pytest.raises(IDXFormatError, match="gzip"):
        load_fashion_mnist("train", root=tmp_path)
    # Missing files: the message says how to install.
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("test", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="FASHION_MNIST_DIR"):
        load_fashion_mnist("train", root=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation")


def test_random_resized_crop_defaults_are_official():
    # The official crop scale and ratio are the defaults.
    crop = RandomResizedCrop(224)
    assert crop.scale == (0.3, 1.0) and math.isclose(crop.ratio[0], 3 / 4) and math.isclose(crop.ratio[1], 4 / 3)


@pytest.mark.parametrize("value", [0, -3])
def test_a_sample_limit_below_one_is_refused_not_read_as_no_limit(tmp_path, value):
    """`--max_train_samples 0` trained on every image (pretrain_trainer.py: the 2,048 embedded scenes; probe.py:
    2,000), read as no limit; pretrain.py refused it. Every data entry point refuses it now, naming the field."""
    from ijepa_hf.data import build_pretraining_data, build_validation_data, load_image_dataset
    from ijepa_hf.finetuning import load_builtin_split, load_labeled_splits

    folder = tmp_path / "images" / "cat"
    folder.mkdir(parents=True)
    _rand_image(32, 32).save(folder / "0.png")
    calls = {
        "max_train_samples": [lambda: build_pretraining_data(image_size=32, max_train_samples=value),
                              lambda: build_pretraining_data(image_size=32, train_dir=str(tmp_path / "images"),
                                                             max_train_samples=value),
                              lambda: load_labeled_splits(dataset_name="procedural_shapes", max_train_samples=value),
                              lambda: load_labeled_splits(train_dir=str(tmp_path / "images"),
                                                          max_train_samples=value)],
        "max_eval_samples": [lambda: build_validation_data(image_size=32, max_eval_samples=value),
                             lambda: load_labeled_splits(dataset_name="procedural_shapes", max_eval_samples=value)],
        "max_samples": [lambda: load_builtin_split("procedural_shapes", max_samples=value),
                        lambda: load_image_dataset(train_dir=str(tmp_path / "images"), max_samples=value)],
    }
    for name, functions in calls.items():
        for call in functions:
            with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
                call()
