"""The ``ijepa-hf`` command line.

    ijepa-hf convert CHECKPOINT OUTPUT_DIR [--encoder-only [--encoder target|context] | --to-transformers | --all]
                     [--release NAME] [--num-heads N] [--remote-code] [--push-to-hub REPO_ID [--private]]
    ijepa-hf push OUTPUT_DIR [REPO_ID] [--private]   # upload a finished pretraining run (e.g. after a failed push)

Every written directory is a ready-to-push repo: config and weights, ``preprocessor_config.json``, a README
model card (CC BY-NC 4.0, the licence of Meta's weights) and, with ``--remote-code``, the modelling code.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any, Sequence

# Architectures of the four released checkpoints (dl.fbaipublicfiles.com/ijepa/<name>.pth.tar), keyed by release
# name: `preset` names an `IJepaPretrainingConfig.from_preset` config (head counts are not stored in the weights,
# so they cannot be inferred), `dataset` the Hub dataset it was pretrained on, `hub` the facebook/ repo of
# transformers' conversion (the card's base_model) and `epochs` the schedule length, as the file name says.
OFFICIAL_RELEASES: dict[str, dict[str, Any]] = {
    "IN1K-vit.h.14-300e": dict(preset="ijepa_vith14_in1k", dataset="imagenet-1k", hub="facebook/ijepa_vith14_1k",
                               epochs=300),
    "IN1K-vit.h.16-448px-300e": dict(preset="ijepa_vith16_448_in1k", dataset="imagenet-1k",
                                     hub="facebook/ijepa_vith16_1k", epochs=300),
    "IN22K-vit.h.14-900e": dict(preset="ijepa_vith14_in22k", dataset="imagenet-21k", hub="facebook/ijepa_vith14_22k",
                                epochs=900),
    "IN22K-vit.g.16-600e": dict(preset="ijepa_vitg16_in22k", dataset="imagenet-21k", hub="facebook/ijepa_vitg16_22k",
                                epochs=600),
}


def _release_for(checkpoint: Path, release: str | None) -> str | None:
    """The release named by ``--release``, else the one the file name gives (``IN1K-vit.h.14-300e.pth.tar``)."""
    if release:
        if release not in OFFICIAL_RELEASES:
            # ValueError: `main` reports it as a one-line CLI error (exit code 2), not a traceback.
            raise ValueError(f"unknown --release {release!r}; choose one of {sorted(OFFICIAL_RELEASES)}.")
        return release
    name = checkpoint.name.removesuffix(".pth.tar")
    return name if name in OFFICIAL_RELEASES else None


# Config fields that the tensor shapes determine, compared between a release's preset and the checkpoint.
_SHAPE_FIELDS = {
    "encoder_config": ("image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers",
                       "intermediate_size"),
    "predictor_config": ("hidden_size", "num_hidden_layers", "intermediate_size"),
}


def _check_release_matches(release: str, preset: Any, architecture: dict, has_predictor: bool) -> None:
    """Fail fast, before a (multi-GB) model of the release's size is built, when the weights are of another shape.

    ``architecture`` is `ijepa_hf.conversion.official_architecture` of the checkpoint.
    """
    differences = [
        f"{section.removesuffix('_config')}.{field}: release {getattr(getattr(preset, section), field)} vs "
        f"checkpoint {architecture[section.removesuffix('_config')][field]}"
        for section, fields in _SHAPE_FIELDS.items()
        if section == "encoder_config" or has_predictor
        for field in fields
        if getattr(getattr(preset, section), field) != architecture[section.removesuffix("_config")][field]
    ]
    if differences:
        raise ValueError(
            f"the checkpoint does not match the architecture of release {release!r} ({'; '.join(differences)}). "
            "Pass the right --release, or rename the file and give --num-heads to convert it by its shapes."
        )


def _config_for(checkpoint: dict, release: str | None, num_heads: int | None) -> tuple[Any, str]:
    """The architecture to convert to, and where its head count comes from (for the card).

    The head count is not stored in the weights: it is ``--num-heads`` when given, else the release's preset,
    else the official model table for the official widths; any other width without ``--num-heads`` is an error.
    """
    from .configuration_ijepa_hf import IJepaPretrainingConfig
    from .conversion import infer_official_config, official_architecture

    if release:
        # The release also fixes what the shapes cannot tell: the head counts.
        config = IJepaPretrainingConfig.from_preset(OFFICIAL_RELEASES[release]["preset"])
        _check_release_matches(release, config, official_architecture(checkpoint),  # cheap: tensor shapes only
                               has_predictor=checkpoint.get("predictor") is not None)
        source = f"the architecture of release `{release}`"
    else:
        config = infer_official_config(checkpoint, num_heads=num_heads)
        source = f"the official model table for width {config.encoder_config.hidden_size}"
    if num_heads:
        config.encoder_config.num_attention_heads = num_heads
        config.predictor_config.num_attention_heads = num_heads
        config.encoder_config.validate_encoder()
        config.predictor_config.validate_predictor()
        source = "given with `--num-heads`"
    return config, source


def _repo_ids(push_to_hub: str | None, kinds: Sequence[str]) -> list[str | None]:
    """Hub repo of each written directory: ``REPO_ID`` for a single repo, ``REPO_ID-<kind>`` with ``--all``."""
    if not push_to_hub:
        return [None] * len(kinds)
    return [push_to_hub if len(kinds) == 1 else f"{push_to_hub}-{kind}" for kind in kinds]


def convert(args: argparse.Namespace) -> None:
    from .conversion import (
        convert_official_checkpoint,
        convert_official_encoder,
        encoder_to_transformers,
        load_official_checkpoint,
    )
    from .cards import card_for_converted_checkpoint
    from .hub import push_folder, save_model_repo
    from .image_processing import make_image_processor
    from .licensing import META_WEIGHTS_LICENSE, record_weights_license

    if args.remote_code and args.to_transformers:
        raise ValueError("--remote-code does not apply to --to-transformers: stock `ijepa` repos load without it.")
    checkpoint_path = Path(args.checkpoint)
    output_dir = Path(args.output_dir)
    targets = [output_dir / kind for kind in ("pretraining", "encoder", "predictor")] if args.all else [output_dir]
    held = [path for path in targets if path.is_dir() and any(path.iterdir())]
    if held and not args.overwrite:  # before the checkpoint is read: a trained run given by mistake keeps its files
        raise ValueError(f"{', '.join(map(str, held))} already hold{'s' if len(held) == 1 else ''} files (a model, an "
                         "earlier conversion?): pass --overwrite to write the converted repo there, or choose another "
                         "output_dir.")
    release = _release_for(checkpoint_path, args.release)
    checkpoint = load_official_checkpoint(checkpoint_path)
    config, heads_source = _config_for(checkpoint, release, args.num_heads)
    # (directory, model, kind, which encoder for encoder repos)
    written: list[tuple[Path, Any, str, str | None]] = []
    if args.encoder_only or args.to_transformers:
        encoder = convert_official_encoder(checkpoint, encoder=args.encoder, config=config.encoder_config)
        model = encoder_to_transformers(encoder) if args.to_transformers else encoder
        written.append((output_dir, model, "encoder", args.encoder))
    else:
        pretraining = convert_official_checkpoint(checkpoint, config)
        if args.all:
            written += [
                (output_dir / "pretraining", pretraining, "pretraining", None),
                (output_dir / "encoder", pretraining.export_encoder(args.encoder), "encoder", args.encoder),
                (output_dir / "predictor", pretraining.predictor, "predictor", None),
            ]
        else:
            written.append((output_dir, pretraining, "pretraining", None))

    repo_ids = _repo_ids(args.push_to_hub, [kind for _, _, kind, _ in written])
    base_model = OFFICIAL_RELEASES.get(release or "", {}).get("hub")
    for (directory, model, kind, encoder_choice), repo_id in zip(written, repo_ids):
        # Meta's weights are CC BY-NC 4.0: the config carries it on to every model derived from this one.
        record_weights_license(model, META_WEIGHTS_LICENSE, base_model)
        card = card_for_converted_checkpoint(
            model, kind=kind, release=release, source=checkpoint_path.name,
            release_info=OFFICIAL_RELEASES.get(release or "", {}), encoder=encoder_choice, model_name=repo_id,
            remote_code=args.remote_code, num_heads_source=heads_source,
        )
        save_model_repo(model, directory, image_processor=make_image_processor(config.encoder_config.image_size),
                        card=card, remote_code=args.remote_code)
        print(f"wrote {kind} ({type(model).__name__}) to {directory}")
        if repo_id:
            commit = push_folder(directory, repo_id, private=args.private or None,
                                 commit_message=f"Convert {checkpoint_path.name} ({kind})")
            print(f"pushed {directory} to {repo_id} ({commit.commit_url})")


def push(args: argparse.Namespace) -> None:
    from .training.checkpointing import OutputDirLock
    from .training.export import push_output_dir

    # The folder's run lock for the upload: a run training there is refused rather than published half-way (an
    # earlier final model beside its new log, a model file being written), and no run starts there meanwhile.
    folder = Path(args.output_dir)
    with OutputDirLock(folder) if folder.is_dir() else contextlib.nullcontext():
        url = push_output_dir(folder, args.repo_id, private=args.private or None)
    print(f"pushed {args.output_dir} ({url})")


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
    conv.add_argument("--encoder", choices=("target", "context"), default="target",
                      help="encoder to export (default: target, the one the paper evaluates; HF/timm use context)")
    conv.add_argument("--release", help=f"official release name, one of {sorted(OFFICIAL_RELEASES)} "
                                        "(detected from the file name when possible)")
    conv.add_argument("--num-heads", type=int,
                      help="attention heads of the encoder and the predictor; not stored in the weights, so required "
                           "unless the width is an official one (192/384/768/1024/1280/1408)")
    conv.add_argument("--remote-code", action="store_true",
                      help="also save the modelling code and an auto_map, so the repos load with "
                           "trust_remote_code=True where ijepa_hf is not installed")
    conv.add_argument("--push-to-hub", metavar="REPO_ID",
                      help="also upload the written repo(s) to the Hub (with --all: REPO_ID-pretraining, "
                           "REPO_ID-encoder, REPO_ID-predictor)")
    conv.add_argument("--private", action="store_true", help="create new Hub repo(s) private")
    conv.add_argument("--overwrite", action="store_true",
                      help="write into an output folder that holds files (otherwise refused: its model would be "
                           "replaced)")
    conv.set_defaults(func=convert)

    upload = commands.add_parser(
        "push",
        help="Upload a finished pretraining run (its --output_dir) to the Hub, without its training checkpoints.",
        description="What `--push_to_hub` uploads at the end of a run: the final model, encoder/, cards, log and "
                    "curves; for a run whose push failed, or that was trained without --push_to_hub.",
    )
    upload.add_argument("output_dir", help="the --output_dir of a finished run")
    upload.add_argument("repo_id", nargs="?", help="Hub repo id (default: the folder's name)")
    upload.add_argument("--private", action="store_true", help="create the repo private if it does not exist")
    upload.set_defaults(func=push)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"ijepa-hf {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
