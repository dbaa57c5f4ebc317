"""The ``ijepa-hf`` command line.

    ijepa-hf convert CHECKPOINT OUTPUT_DIR [--encoder-only [--which context|target] | --to-transformers | --all]
                     [--release NAME | --num-heads N] [--push-to-hub REPO_ID]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

# Architectures of the four released checkpoints (dl.fbaipublicfiles.com/ijepa/...), keyed by release name; the
# values are preset names of `IJepaPretrainingConfig.from_preset`. Head counts are not stored in the weights.
OFFICIAL_RELEASES: dict[str, dict[str, str]] = {
    "IN1K-vit.h.14-300e": dict(preset="ijepa_vith14_in1k", dataset="imagenet-1k", hub="facebook/ijepa_vith14_1k"),
    "IN1K-vit.h.16-448px-300e": dict(preset="ijepa_vith16_448_in1k", dataset="imagenet-1k", hub="facebook/ijepa_vith16_1k"),
    "IN22K-vit.h.14-900e": dict(preset="ijepa_vith14_in22k", dataset="imagenet-21k", hub="facebook/ijepa_vith14_22k"),
    "IN22K-vit.g.16-600e": dict(preset="ijepa_vitg16_in22k", dataset="imagenet-21k", hub="facebook/ijepa_vitg16_22k"),
}


def _release_for(checkpoint: Path, release: str | None) -> str | None:
    if release:
        if release not in OFFICIAL_RELEASES:
            raise SystemExit(f"Unknown --release {release!r}; choose one of {sorted(OFFICIAL_RELEASES)}.")
        return release
    name = checkpoint.name.removesuffix(".pth.tar")
    return name if name in OFFICIAL_RELEASES else None


def _config_for(checkpoint: dict, release: str | None, num_heads: int | None):
    from .configuration_ijepa_hf import IJepaPretrainingConfig
    from .conversion import infer_official_config

    if release:
        config = IJepaPretrainingConfig.from_preset(OFFICIAL_RELEASES[release]["preset"])
    else:
        config = infer_official_config(checkpoint)
    if num_heads:
        config.encoder_config.num_attention_heads = num_heads
        config.predictor_config.num_attention_heads = num_heads
        config.encoder_config.validate_encoder()
        config.predictor_config.validate_predictor()
    return config


def _write_card(model, output_dir: Path, kind: str, release: str | None, source: str) -> None:
    """A model card for a converted checkpoint (CC BY-NC 4.0 for Meta's weights)."""
    try:
        from .hub import card_for_converted_checkpoint
    except ImportError:  # the card module is optional for conversion itself
        return
    card = card_for_converted_checkpoint(model, kind=kind, release=release, source=source,
                                         release_info=OFFICIAL_RELEASES.get(release or "", {}))
    card.save(output_dir / "README.md")


def convert(args: argparse.Namespace) -> None:
    from .conversion import (
        convert_official_checkpoint,
        convert_official_encoder,
        encoder_to_transformers,
        load_official_checkpoint,
    )
    from .image_processing import make_image_processor

    checkpoint_path = Path(args.checkpoint)
    output_dir = Path(args.output_dir)
    release = _release_for(checkpoint_path, args.release)
    checkpoint = load_official_checkpoint(checkpoint_path)
    config = _config_for(checkpoint, release, args.num_heads)
    which = "encoder" if args.which == "context" else "target_encoder"

    written: list[tuple[Path, object, str]] = []
    if args.encoder_only or args.to_transformers:
        encoder = convert_official_encoder(checkpoint, which=which, config=config.encoder_config)
        model = encoder_to_transformers(encoder) if args.to_transformers else encoder
        written.append((output_dir, model, "encoder"))
    else:
        pretraining = convert_official_checkpoint(checkpoint, config)
        if args.all:
            written += [
                (output_dir / "pretraining", pretraining, "pretraining"),
                (output_dir / "encoder", pretraining.export_encoder("context" if args.which == "context" else "target"), "encoder"),
                (output_dir / "predictor", pretraining.predictor, "predictor"),
            ]
        else:
            written.append((output_dir, pretraining, "pretraining"))

    for directory, model, kind in written:
        directory.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(directory)
        make_image_processor(config.encoder_config.image_size).save_pretrained(directory)
        _write_card(model, directory, kind, release, source=checkpoint_path.name)
        print(f"wrote {kind} ({type(model).__name__}) to {directory}")
        if args.push_to_hub:
            from huggingface_hub import HfApi

            repo_id = args.push_to_hub if len(written) == 1 else f"{args.push_to_hub}-{kind}"
            api = HfApi()
            api.create_repo(repo_id, exist_ok=True, private=args.private)
            api.upload_folder(folder_path=str(directory), repo_id=repo_id, commit_message=f"Convert {checkpoint_path.name}")
            print(f"pushed {directory} to {repo_id}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ijepa-hf", description="I-JEPA for Hugging Face: conversion and tools.")
    commands = parser.add_subparsers(dest="command", required=True)

    conv = commands.add_parser(
        "convert",
        help="Convert an official I-JEPA checkpoint (.pth.tar) into Hugging Face repos.",
        description="Writes a pretraining-model repo (AutoModelForPreTraining) by default.",
    )
    conv.add_argument("checkpoint", help="official checkpoint with `encoder`, `predictor`, `target_encoder`")
    conv.add_argument("output_dir")
    mode = conv.add_mutually_exclusive_group()
    mode.add_argument("--encoder-only", action="store_true", help="write an ijepa_hf encoder repo (AutoModel)")
    mode.add_argument("--to-transformers", action="store_true",
                      help="write a stock transformers `ijepa` encoder repo (loads without ijepa_hf)")
    mode.add_argument("--all", action="store_true",
                      help="write pretraining/, encoder/ and predictor/ repos under OUTPUT_DIR")
    conv.add_argument("--which", choices=("target", "context"), default="target",
                      help="encoder to export (default: target, the one the paper evaluates; HF/timm use context)")
    conv.add_argument("--release", help=f"official release name, one of {sorted(OFFICIAL_RELEASES)} "
                                        "(detected from the file name when possible)")
    conv.add_argument("--num-heads", type=int, help="attention heads (not stored in the weights; inferred otherwise)")
    conv.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload the written repo(s) to the Hub")
    conv.add_argument("--private", action="store_true", help="create the Hub repo(s) private")
    conv.set_defaults(func=convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"ijepa-hf {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
