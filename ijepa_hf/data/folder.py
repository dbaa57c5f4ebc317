"""Load an image dataset from the Hub or a local folder through ``datasets.load_dataset``, or one of the datasets
every script reads without the Hub (:data:`BUILTIN_DATASETS`).

Mirrors the data arguments of the Hugging Face image-pretraining examples (``--dataset_name``,
``--train_dir``, ``--image_column_name``, streaming) and adds image-column auto-detection.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["check_sample_limit", "detect_image_column", "load_builtin_split", "load_image_dataset",
           "BUILTIN_DATASETS", "IMAGE_COLUMN_CANDIDATES"]

IMAGE_COLUMN_CANDIDATES: tuple[str, ...] = ("image", "img")
# Dataset names every script reads without the Hub: the embedded procedural scenes and Debian's Fashion-MNIST
# (`ijepa_hf.data.fashion_mnist_dataset`), whose held-out split is 'test' (also called 'validation').
BUILTIN_DATASETS: tuple[str, ...] = ("procedural_shapes", "fashion_mnist")


def check_sample_limit(value: int | None, name: str) -> None:
    """Refuse a limit on the number of images (``max_samples``, ``max_train_samples``...) below 1: ``0`` would
    otherwise read as no limit wherever the limit is an ``or`` default. ``None`` keeps every image."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer (unset: every image), got {value!r}")


def load_builtin_split(name: str, split: str = "train", *, max_samples: int | None = None, image_size: int = 64,
                       seed: int = 0) -> Any:
    """One split (``train``, or ``test`` / ``validation``: the held-out one) of a :data:`BUILTIN_DATASETS` dataset,
    with ``image`` and ``label`` columns, read without the Hub. ``procedural_shapes``: the embedded pretraining
    data's scenes at ``image_size`` (default 2,000 training and 500 held-out images), its two splits disjoint draws
    (generator seeds ``2 * seed`` and ``2 * seed + 1``); ``fashion_mnist``: Debian's copy
    (:func:`~ijepa_hf.data.fashion_mnist_dataset`)."""
    check_sample_limit(max_samples, "max_samples")
    if name not in BUILTIN_DATASETS:
        raise ValueError(f"{name!r} is not one of the datasets read without the Hub, {list(BUILTIN_DATASETS)}")
    held_out = split in ("test", "validation")
    if split != "train" and not held_out:
        raise ValueError(f"{name} has the splits 'train' and 'test' (also called 'validation'), not {split!r}")
    if name == "procedural_shapes":
        from .pretraining import embedded_scenes

        count = max_samples or (500 if held_out else 2000)
        dataset = embedded_scenes(count, image_size=image_size, seed=2 * seed + held_out).to_hf_dataset()
    else:
        from .fashion_mnist import fashion_mnist_dataset

        dataset = fashion_mnist_dataset("test" if held_out else "train", max_samples=max_samples)
    return dataset.select_columns(["image", "label"])


def detect_image_column(dataset_or_features: Any, image_column: str | None = None) -> str:
    """Name of the image column of a dataset (or of a ``datasets.Features``).

    Order: ``image_column`` if given (must exist), then a column named ``"image"``, then ``"img"``, then the
    first column whose feature is ``datasets.Image``.

    Raises:
        ValueError: no such column; the message lists the columns and their types.
    """
    import datasets

    features = getattr(dataset_or_features, "features", dataset_or_features)
    if features is None:
        # Streaming datasets may not know their features until resolved.
        resolve = getattr(dataset_or_features, "_resolve_features", None)
        features = resolve().features if resolve is not None else None
    if features is None:
        raise ValueError("cannot detect the image column: the dataset has no known features; pass image_column= "
                         "(--image_column_name in the example scripts)")
    columns = list(features)
    if image_column is not None:
        if image_column not in features:
            raise ValueError(f"image column {image_column!r} not found; columns are {columns}: name one of them with "
                             "image_column= (--image_column_name in the example scripts)")
        return image_column
    for name in IMAGE_COLUMN_CANDIDATES:
        if name in features:
            return name
    for name, feature in features.items():
        if isinstance(feature, datasets.Image):
            return name
    described = ", ".join(f"{name}: {type(feature).__name__}" for name, feature in features.items())
    raise ValueError(
        f"no image column found (looked for {list(IMAGE_COLUMN_CANDIDATES)} or a datasets.Image feature) "
        f"among [{described}]; pass image_column= (--image_column_name in the example scripts)"
    )


def load_image_dataset(
    dataset_name: str | None = None,
    train_dir: str | os.PathLike | None = None,
    streaming: bool = False,
    image_column: str | None = None,
    split: str = "train",
    dataset_config_name: str | None = None,
    data_files: Any = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    max_samples: int | None = None,
    rename_image_column: bool = True,
    decode: bool = True,
    **load_kwargs: Any,
) -> Any:
    """Load one split of an image dataset.

    Exactly one source:
        * ``dataset_name``: a Hub dataset (``"cifar10"``) or a builder name; ``"imagefolder"`` needs
          ``train_dir`` (or ``data_files``) too;
        * ``train_dir`` alone: a local folder, read with the ``imagefolder`` builder (class sub-folders
          become a ``label`` column). Works offline.

    Args:
        dataset_name, dataset_config_name, data_files, cache_dir, token, **load_kwargs: passed to
            ``datasets.load_dataset``.
        train_dir: local image folder (``data_dir=`` of ``imagefolder``).
        streaming: return an ``IterableDataset`` (nothing is downloaded up front).
        image_column: name of the image column; auto-detected when ``None`` (see
            :func:`detect_image_column`).
        split: which split to return (default ``"train"``).
        max_samples: keep the first ``n`` examples (``select`` or ``take`` when streaming).
        rename_image_column: rename the detected column to ``"image"`` so downstream code
            (``make_transform_fn``, collators) can use the default name. If a different ``"image"`` column
            already exists, nothing is renamed.
        decode: ``False`` casts the image column to ``Image(decode=False)`` so rows hold
            ``{"bytes", "path"}`` and decoding happens in :func:`~ijepa_hf.data.loading.load_image`, which
            survives corrupt files (``datasets`` itself raises on them). ``set_image_transform`` does this
            cast for you.

    Returns:
        ``datasets.Dataset`` (or ``IterableDataset`` when streaming) whose image column is ``"image"`` when
        ``rename_image_column`` (else the detected name; use :func:`detect_image_column` to get it).
    """
    import datasets

    if dataset_name is None and train_dir is None and data_files is None:
        raise ValueError("give dataset_name (Hub name or builder) or train_dir (local image folder)")
    check_sample_limit(max_samples, "max_samples")
    kwargs: dict[str, Any] = dict(load_kwargs)
    if cache_dir is not None:
        kwargs["cache_dir"] = os.fspath(cache_dir)
    if token is not None:
        kwargs["token"] = token
    if data_files is not None:
        kwargs["data_files"] = data_files
    if train_dir is not None:
        if not os.path.isdir(train_dir):
            raise FileNotFoundError(f"train_dir {os.fspath(train_dir)!r} is not a directory")
        kwargs["data_dir"] = os.fspath(train_dir)
        dataset_name = dataset_name or "imagefolder"
    elif dataset_name is None:
        dataset_name = "imagefolder"
    dataset = datasets.load_dataset(dataset_name, dataset_config_name, split=split, streaming=streaming, **kwargs)
    column = detect_image_column(dataset, image_column)
    if max_samples is not None:
        dataset = dataset.take(max_samples) if streaming else dataset.select(range(min(max_samples, len(dataset))))
    if rename_image_column and column != "image":
        features = dataset.features
        if features is None or "image" not in features:
            dataset = dataset.rename_column(column, "image")
            column = "image"
    if not decode:
        feature = dataset.features[column] if dataset.features is not None else None
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset
