#!/usr/bin/env python
"""Extract average-pooled I-JEPA features of an image dataset and save them.

The features are those of the paper's evaluation (see `ijepa_hf.evaluation.extract_features`): the mean over
patches of the final output (``--layers last``, ``[N, D]``) or of the last k blocks, each LayerNorm'ed and
concatenated (``--layers 4``, ``[N, 4D]``).

Examples::

    python examples/extract_features.py --model_name_or_path ./ijepa-run --train_dir ./images \\
        --output ./features --format datasets
    python examples/extract_features.py --model_name_or_path facebook/ijepa_vith14_1k \\
        --dataset_name cifar10 --split test --layers 4 --output cifar10-test.npz --format npz

Outputs:
    * ``--format datasets``: a ``datasets.Dataset`` saved with ``save_to_disk`` (columns ``features``
      float32 ``[D]``, ``label``, ``id`` and ``path``; reload with ``datasets.load_from_disk``), plus ``extraction.json``;
    * ``--format npz``: one ``.npz`` with ``features [N, D]``, ``labels [N]``, ``ids [N]``, ``paths [N]`` and a
      JSON ``metadata`` string.

An ``--output`` that exists is refused before anything is extracted, unless ``--overwrite_output`` (the new features
are written under a temporary name and replace it only once complete). Unreadable images are skipped; ``id`` (the
row in the source split) and ``path`` (its file, when it has one) keep every feature row matched to its image.

Labels are -1 when the data has no label column (e.g. an image folder without class sub-folders).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from ijepa_hf.data import BUILTIN_DATASETS, load_builtin_split, load_image_dataset
from ijepa_hf.evaluation import extract_features
from ijepa_hf.loading import load_encoder
from ijepa_hf.scripts import configure_logging, resolve_device, run_script

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="Encoder, pretraining or classifier repo.")
    parser.add_argument("--encoder", choices=("target", "context"), default="target",
                        help="Which encoder of a pretraining repo.")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--dataset_name", default=None,
                        help=f"Hub dataset (or a datasets builder name), or one read locally: {', '.join(BUILTIN_DATASETS)}.")
    parser.add_argument("--dataset_config_name", default=None)
    parser.add_argument("--train_dir", default=None, help="Local image folder (read with imagefolder).")
    parser.add_argument("--split", default="train", help="Split to extract (default: train).")
    parser.add_argument("--image_column_name", default=None, help="Image column (auto-detected).")
    parser.add_argument("--label_column_name", default=None,
                        help="Column of the labels (default: 'label' where the data has one, else labels are -1).")
    parser.add_argument("--max_samples", type=int, default=None)
    parser.add_argument("--output", required=True, help="Output folder (datasets) or .npz file.")
    parser.add_argument("--overwrite_output", action="store_true", help="Replace an --output that exists.")
    parser.add_argument("--format", choices=("datasets", "npz"), default="datasets")
    parser.add_argument("--layers", default="last", help="'last' or a number k of last blocks (e.g. 4).")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)
    if args.dataset_name is None and args.train_dir is None:
        parser.error("give --dataset_name or --train_dir.")
    output = output_path(args.output, args.format)
    if output.exists() and not args.overwrite_output:  # before hours of extraction, not after
        parser.error(f"--output {output} exists (earlier features?): pass --overwrite_output to replace it, or choose "
                     "another --output.")
    return args


def output_path(output: str | Path, output_format: str) -> Path:
    """Where the features go: ``output``, with the ``.npz`` suffix for ``npz``."""
    output = Path(output)
    return output if output_format != "npz" or output.suffix == ".npz" else output.with_suffix(".npz")


def save_features(
    features: torch.Tensor,
    labels: torch.Tensor,
    output: str | Path,
    output_format: str,
    metadata: dict[str, Any],
    label_feature: Any | None = None,
    ids: torch.Tensor | None = None,
    paths: list[str | None] | None = None,
) -> Path:
    """Writes ``features [N, D]``, ``labels [N]``, the source row ``ids [N]`` and file ``paths [N]`` (``""`` where a
    row has no file) as a saved ``datasets.Dataset`` or an ``.npz``: row ``i`` of every array is the same image.

    ``label_feature``: the source's label feature (a ``ClassLabel`` keeps the class names); default int64.
    """
    output = output_path(output, output_format)
    ids = torch.arange(len(labels)) if ids is None else ids
    paths = [p or "" for p in paths] if paths is not None else [""] * len(labels)
    output.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name, then renamed: a run stopped while writing leaves any earlier output whole.
    partial = output.parent / f".{output.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        if output_format == "npz":
            with open(partial, "wb") as handle:  # np.savez would add .npz to the temporary name
                np.savez(handle, features=features.numpy(), labels=labels.numpy(), ids=ids.numpy(),
                         paths=np.array(paths, dtype=str), metadata=json.dumps(metadata))
        else:
            _features_dataset(features, labels, ids, paths, label_feature).save_to_disk(str(partial))
            (partial / "extraction.json").write_text(json.dumps(metadata, indent=2) + "\n")
        _replace(partial, output)
    finally:
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        partial.unlink(missing_ok=True)
    return output


def _replace(new: Path, output: Path) -> None:
    """Put ``new`` at ``output``, replacing what is there (a file or a folder) only once ``new`` is complete."""
    if not output.exists() or output.is_file() and new.is_file():
        os.replace(new, output)
        return
    old = output.parent / f".{output.name}.replaced-{uuid.uuid4().hex[:8]}"
    os.replace(output, old)
    os.replace(new, output)
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()


def _features_dataset(features: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor, paths: list[str],
                      label_feature: Any | None) -> Any:
    import datasets

    return datasets.Dataset.from_dict(
        {"id": ids.numpy(), "path": paths, "features": features.numpy(), "label": labels.numpy()},
        features=datasets.Features({
            "id": datasets.Value("int64"),
            "path": datasets.Value("string"),
            "features": datasets.List(datasets.Value("float32"), length=features.shape[1]),
            "label": label_feature if label_feature is not None and (labels >= 0).all() else datasets.Value("int64"),
        }),
    )


def main(argv: list[str] | None = None) -> Path:
    """Extracts and saves the features; returns the output path."""
    args = parse_args(argv)
    configure_logging()
    device = resolve_device(args.device)  # before any data or model is read
    if args.dataset_name in BUILTIN_DATASETS:  # read locally, as probe.py and finetune.py do
        dataset = load_builtin_split(args.dataset_name, args.split, max_samples=args.max_samples)
        dataset = dataset.cast_column("image", datasets.Image(decode=False))
    else:
        dataset = load_image_dataset(
            dataset_name=args.dataset_name,
            train_dir=args.train_dir,
            dataset_config_name=args.dataset_config_name,
            split=args.split,
            image_column=args.image_column_name,
            max_samples=args.max_samples,
            decode=False,  # decode in ijepa_hf's robust loader: a corrupt file is skipped, not fatal
        )
    if args.label_column_name is not None and args.label_column_name not in dataset.column_names:
        raise ValueError(f"--label_column_name {args.label_column_name!r}: the data has no such column (its columns: "
                         f"{dataset.column_names}); leave the option out to save labels of -1")
    label_column = args.label_column_name or ("label" if "label" in dataset.column_names else None)
    if label_column is None:
        logger.warning("No 'label' column: labels are saved as -1.")
    encoder, image_processor = load_encoder(
        args.model_name_or_path, encoder=args.encoder, **({"revision": args.revision} if args.revision else {})
    )
    encoder.to(device)
    features, labels, ids = extract_features(
        encoder,
        dataset,
        image_processor=image_processor,
        label_column=label_column,
        batch_size=args.batch_size,
        layers=args.layers,
        num_workers=args.num_workers,
        progress=not args.no_progress,
        return_indices=True,
    )
    # The image column holds {"bytes", "path"} (decode=False): the file of every kept row.
    column = dataset.select_columns(["image"])["image"] if "image" in dataset.column_names else None
    paths = [column[i].get("path") if isinstance(column[i], dict) else None for i in ids.tolist()] if column else None
    if len(labels) < len(dataset):
        logger.warning("%d unreadable image(s) were skipped.", len(dataset) - len(labels))
    metadata = {
        "model_name_or_path": args.model_name_or_path,
        "encoder": args.encoder,
        "layers": args.layers,
        "pooling": "mean over patch tokens",
        "source": args.dataset_name or args.train_dir,
        "split": args.split,
        "num_images": int(features.shape[0]),
        "feature_dim": int(features.shape[1]),
    }
    label_feature = dataset.features[label_column] if label_column else None
    if hasattr(label_feature, "names"):  # a ClassLabel: keep the class names with the npz too
        metadata["class_names"] = list(label_feature.names)
    output = save_features(features, labels, args.output, args.format, metadata, label_feature, ids=ids, paths=paths)
    logger.info("Saved %d x %d features to %s", features.shape[0], features.shape[1], output)
    return output


if __name__ == "__main__":
    run_script(main)
