#!/usr/bin/env python
"""Pictures of I-JEPA runs and models (PNG files; no display needed).

Sub-commands::

    # the multi-block masks the collator draws for a batch (procedural shapes unless --train_dir/--dataset_name)
    python examples/visualize.py masks --output masks.png --image_size 224 --patch_size 16 --batch_size 8
    python examples/visualize.py masks --output masks.png --model_name_or_path ./ijepa-run   # the run's mask config

    # PCA of the patch features of one image (RGB = first three principal components)
    python examples/visualize.py pca --model_name_or_path ./ijepa-run --image photo.jpg --output pca.png

    # training curves (loss, lr/wd, EMA momentum, target std, throughput) from a run's log
    python examples/visualize.py curves --log ./ijepa-run/train_log.jsonl --output curves.png
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from PIL import Image

from ijepa_hf.data import BadImageCounter, PretrainTransform, embedded_scenes, load_image, load_image_dataset
from ijepa_hf.finetuning import processor_image_size
from ijepa_hf.loading import load_encoder
from ijepa_hf.masking import IJepaMaskCollator
from ijepa_hf.scripts import configure_logging, run_script
from ijepa_hf.visualization import plot_mask_grid, plot_pca_features, plot_training_curves

logger = logging.getLogger(__name__)


def _images(args: argparse.Namespace, count: int, image_size: int) -> list[Image.Image]:
    """``count`` images from --train_dir / --dataset_name, else the embedded procedural shapes."""
    if args.train_dir is None and args.dataset_name is None:
        shapes = embedded_scenes(count, image_size=image_size, seed=args.seed)
        return [shapes.get_image(i) for i in range(count)]
    dataset = load_image_dataset(dataset_name=args.dataset_name, train_dir=args.train_dir, max_samples=count,
                                 decode=False)
    images = [load_image(example["image"]) for example in dataset]
    return [image for image in images if image is not None]


def masks(args: argparse.Namespace) -> Path:
    """Draws one collator batch: the masks on the (pretraining-transformed) images."""
    if args.model_name_or_path:
        from transformers import AutoConfig  # ijepa_hf's config types are registered by the imports above

        config = AutoConfig.from_pretrained(args.model_name_or_path)
        collator = IJepaMaskCollator.from_config(config, seed=args.seed)
    else:
        collator = IJepaMaskCollator(args.image_size, args.patch_size, num_target_blocks=args.num_target_blocks,
                                     min_keep=args.min_keep, seed=args.seed)
    height = collator.image_size[0]
    transform = PretrainTransform(height)
    batch = collator([{"pixel_values": transform(image)} for image in _images(args, args.batch_size, height)])
    return plot_mask_grid(batch["pixel_values"], batch["context_mask"], batch["target_masks"],
                          collator.generator.patch_size[0], args.output, max_images=args.batch_size,
                          ncols=args.ncols, title=f"I-JEPA masks ({collator.generator.mask_mode} mode), seed {args.seed}",
                          dpi=args.dpi)


def pca(args: argparse.Namespace) -> Path:
    """PCA map of one image's patch features."""
    image: Any = None
    if args.image:  # read before the model loads: a wrong path fails at once
        if Path(args.image).is_dir():
            raise ValueError(f"--image {args.image} is a folder: give one image file (the PCA map is of one image)")
        if not Path(args.image).is_file():
            raise ValueError(f"--image {args.image}: no such file")
        bad = BadImageCounter(max_warnings=0)
        image = load_image(args.image, bad)
        if image is None:
            reason = bad.examples[0].removeprefix(f"{args.image} (").removesuffix(")") if bad.examples else ""
            raise ValueError(f"--image {args.image} cannot be read as an image ({reason}): give a file PIL opens "
                             "(PNG, JPEG, ...)")
    encoder, image_processor = load_encoder(args.model_name_or_path, encoder=args.encoder)
    if image is None:
        image = _images(args, 1, processor_image_size(image_processor))[0]
    return plot_pca_features(encoder, image, args.output, image_processor, dpi=args.dpi,
                             interpolation=args.interpolation)


def curves(args: argparse.Namespace) -> Path:
    return plot_training_curves(args.log, args.output, title=args.title or str(args.log), dpi=args.dpi)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def add_common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--output", required=True, help="PNG file to write.")
        sub.add_argument("--dpi", type=int, default=100)

    def add_data(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--train_dir", default=None, help="Image folder (default: procedural shapes).")
        sub.add_argument("--dataset_name", default=None, help="Hub dataset (default: procedural shapes).")
        sub.add_argument("--seed", type=int, default=0)

    sub = commands.add_parser("masks", help="masks of a collator batch")
    add_common(sub)
    add_data(sub)
    sub.add_argument("--model_name_or_path", default=None,
                     help="A pretraining repo whose mask settings to use (else --image_size etc.).")
    sub.add_argument("--image_size", type=int, default=224)
    sub.add_argument("--patch_size", type=int, default=16)
    sub.add_argument("--num_target_blocks", type=int, default=4)
    sub.add_argument("--min_keep", type=int, default=10, help="Lower it for small patch grids.")
    sub.add_argument("--batch_size", type=int, default=8)
    sub.add_argument("--ncols", type=int, default=4)
    sub.set_defaults(func=masks)

    sub = commands.add_parser("pca", help="PCA map of one image's patch features")
    add_common(sub)
    add_data(sub)
    sub.add_argument("--model_name_or_path", required=True)
    sub.add_argument("--encoder", choices=("target", "context"), default="target")
    sub.add_argument("--image", default=None, help="Image file (default: first image of the data).")
    sub.add_argument("--interpolation", choices=("nearest", "bilinear", "bicubic"), default="nearest")
    sub.set_defaults(func=pca)

    sub = commands.add_parser("curves", help="training curves from train_log.jsonl")
    add_common(sub)
    sub.add_argument("--log", required=True, help="A run's train_log.jsonl.")
    sub.add_argument("--title", default=None)
    sub.set_defaults(func=curves)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    """Runs one sub-command; returns the written PNG's path."""
    args = parse_args(argv)
    configure_logging()
    path = args.func(args)
    logger.info("Wrote %s", path)
    return path


if __name__ == "__main__":
    run_script(main)
