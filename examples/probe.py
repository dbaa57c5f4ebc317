#!/usr/bin/env python
"""Frozen-feature evaluation of an I-JEPA encoder: linear probe and k-NN on average-pooled patch features of
the last layer and of the last 4 layers (the paper's protocol; see `ijepa_hf.evaluation`).

Examples::

    # the embedded procedural-shapes data (no download), a pretraining run's target encoder
    python examples/probe.py --model_name_or_path ./ijepa-run --dataset_name procedural_shapes

    # the context encoder, Fashion-MNIST from local IDX files, several models in one table
    python examples/probe.py --model_name_or_path ./run-a ./run-b --encoder context --dataset_name fashion_mnist

    # an image folder with train/ and val/ class sub-folders, results saved as JSON
    python examples/probe.py --model_name_or_path facebook/ijepa_vith14_1k --train_dir imgs/train \\
        --validation_dir imgs/val --output_json probe.json

Prints a Markdown table (linear and k-NN accuracy for each model and layer choice) and writes all numbers,
including each probe's chosen weight decay and its search, to ``--output_json``, rewritten after each model (a
failure at a later model keeps the earlier ones' results). Every model's path and depth are checked against
``--layers`` before any data is read.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ijepa_hf.evaluation import (attentive_probe, evaluate_encoder, extract_features, format_results_table,
                                 low_shot_indices)
from ijepa_hf.evaluation.features import check_layers
from ijepa_hf.loading import encoder_depth, load_encoder
from ijepa_hf.finetuning import BUILTIN_DATASETS, DEFAULT_TRAIN_VAL_SPLIT, load_labeled_splits
from ijepa_hf.scripts import configure_logging, resolve_device, run_script
from ijepa_hf.training.arguments import check_seed

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", nargs="+", required=True,
                       help="Encoder, pretraining or classifier repo(s) / folder(s); several give one table.")
    model.add_argument("--encoder", choices=("target", "context"), default="target",
                       help="Which encoder of a pretraining repo (the paper evaluates the target encoder).")
    model.add_argument("--revision", default=None)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset_name", default=None,
                      help=f"Hub dataset or one of {BUILTIN_DATASETS} (no download).")
    data.add_argument("--dataset_config_name", default=None)
    data.add_argument("--train_dir", default=None, help="Image folder with one sub-folder per class.")
    data.add_argument("--validation_dir", default=None, help="Evaluation image folder.")
    data.add_argument("--train_val_split", type=float, default=None,
                      help="Held-out fraction of train when there is no validation/test data (default "
                           f"{DEFAULT_TRAIN_VAL_SPLIT}); refused where there is.")
    data.add_argument("--image_column_name", default=None)
    data.add_argument("--label_column_name", default="label")
    data.add_argument("--max_train_samples", type=int, default=None,
                      help="Truncate train (procedural_shapes: how many to generate, default 2000).")
    data.add_argument("--max_eval_samples", type=int, default=None,
                      help="Truncate the evaluation split (procedural_shapes: default 500).")
    data.add_argument("--procedural_image_size", type=int, default=64)
    probe = parser.add_argument_group("probes")
    probe.add_argument("--layers", nargs="+", default=None,
                       help="Feature choices: 'last' and/or a number k of last blocks (default: 'last' and the "
                            "last 4 blocks, or all blocks of a shallower encoder).")
    probe.add_argument("--linear_epochs", type=int, default=100, help="L-BFGS iterations (AdamW: epochs).")
    probe.add_argument("--linear_optimizer", choices=("lbfgs", "adamw"), default="lbfgs")
    probe.add_argument("--k", type=int, default=20, help="k-NN neighbours.")
    probe.add_argument("--temperature", type=float, default=0.07, help="k-NN vote temperature.")
    probe.add_argument("--low_shot_labels", type=int, default=None,
                       help="Also a linear probe trained on this many class-balanced training labels (e.g. 1%% of the "
                            "training set, as the paper's 1%% ImageNet protocol), tested on the whole evaluation split.")
    probe.add_argument("--low_shot_draws", type=int, default=3,
                       help="Labelled subsets drawn for --low_shot_labels (seeds seed, seed+1, ...; mean reported).")
    probe.add_argument("--attentive", action="store_true",
                       help="Also train an attentive probe (a learned query over the last layer's patch tokens, as "
                            "V-JEPA 2's evaluation); keeps every image's tokens in memory: subsample large sets.")
    probe.add_argument("--attentive_epochs", type=int, default=20, help="Attentive-probe epochs (AdamW, cosine).")
    run = parser.add_argument_group("run")
    run.add_argument("--batch_size", type=int, default=64)
    run.add_argument("--num_workers", type=int, default=0)
    run.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--output_json", default=None, help="Where to write all results.")
    run.add_argument("--no_progress", action="store_true", help="Hide progress bars.")
    args = parser.parse_args(argv)
    if args.dataset_name is None and args.train_dir is None:
        parser.error("give --dataset_name or --train_dir.")
    # Checked before any feature is extracted (the probes check them too, after hours of extraction on a large set)
    for name in ("linear_epochs", "attentive_epochs", "low_shot_draws", "batch_size", "k", "low_shot_labels"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.temperature <= 0:
        parser.error(f"--temperature must be > 0, got {args.temperature}.")
    try:
        check_seed(args.seed)
    except ValueError as error:
        parser.error(str(error))
    return args


def default_layers(encoder: torch.nn.Module) -> list[str]:
    """``["last", "4"]`` (the paper's two protocols), the multi-layer choice capped at the encoder's depth (and left
    out for a one-block encoder, where it is "last")."""
    depth = getattr(encoder.config, "num_hidden_layers", 4)
    return ["last"] + ([str(min(4, depth))] if depth > 1 else [])


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Runs the probes; returns the result rows (see `ijepa_hf.evaluation.evaluate_encoder`)."""
    args = parse_args(argv)
    configure_logging()
    device = resolve_device(args.device)  # before any data or model is read
    hub_kwargs = {"revision": args.revision} if args.revision else {}
    for path in args.model_name_or_path:  # every model's path and depth, before the data and the first model's probes
        depth = encoder_depth(path, **hub_kwargs)
        for layers in args.layers or []:
            try:
                check_layers(layers, depth, owner=path)
            except ValueError as error:
                raise ValueError(f"--layers {layers}: {error}") from None
    output = None if args.output_json is None else Path(args.output_json)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)

    splits = load_labeled_splits(
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        train_dir=args.train_dir,
        validation_dir=args.validation_dir,
        train_val_split=args.train_val_split,
        image_column=args.image_column_name,
        label_column=args.label_column_name,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
        seed=args.seed,
        procedural_image_size=args.procedural_image_size,
    )
    logger.info("Probing on %d training and %d evaluation images.", len(splits["train"]), len(splits["validation"]))
    if args.low_shot_labels is not None:  # the subsets the low-shot probe will draw, before any feature is extracted
        labels = torch.as_tensor(splits["train"]["label"])
        for draw in range(args.low_shot_draws):
            try:
                low_shot_indices(labels, args.low_shot_labels, seed=args.seed + draw)
            except ValueError as error:
                raise ValueError(f"--low_shot_labels {args.low_shot_labels}: {error}") from None

    rows = []
    for path in args.model_name_or_path:
        encoder, image_processor = load_encoder(path, encoder=args.encoder, **hub_kwargs)
        encoder.to(device)
        name = path if args.encoder == "target" else f"{path} ({args.encoder})"
        for layers in args.layers or default_layers(encoder):
            rows.append(evaluate_encoder(
                encoder,
                splits["train"],
                splits["validation"],
                layers=layers,
                name=name,
                image_processor=image_processor,
                batch_size=args.batch_size,
                num_workers=args.num_workers,
                progress=not args.no_progress,
                linear_kwargs={"epochs": args.linear_epochs, "optimizer": args.linear_optimizer, "seed": args.seed},
                knn_kwargs={"k": args.k, "temperature": args.temperature},
                low_shot_labels=args.low_shot_labels,
                low_shot_seeds=[args.seed + draw for draw in range(args.low_shot_draws)],
            ))
            logger.info("%s, %s: linear %.2f%%, k-NN %.2f%%", name, rows[-1]["layers"],
                        100 * rows[-1]["linear_accuracy"], 100 * rows[-1]["knn_accuracy"])
        if args.attentive:
            extract = dict(image_processor=image_processor, batch_size=args.batch_size, num_workers=args.num_workers,
                           progress=not args.no_progress, pool=False)
            train_x, train_y = extract_features(encoder, splits["train"], **extract)
            test_x, test_y = extract_features(encoder, splits["validation"], **extract)
            result = attentive_probe(train_x, train_y, test_x, test_y, epochs=args.attentive_epochs, seed=args.seed)
            rows.append({"model": name, "layers": "last, attentive", "attentive_accuracy": result["accuracy"],
                         "feature_dim": result["feature_dim"], "num_train": result["num_train"],
                         "num_test": result["num_test"], "attentive": result})
            logger.info("%s, attentive probe: %.2f%%", name, 100 * result["accuracy"])
        del encoder
        if output is not None:  # after each model: a later model's failure keeps the finished ones' results
            write_results(output, {"dataset": args.dataset_name or args.train_dir, "encoder": args.encoder,
                                   "rows": rows})

    print(format_results_table(rows))
    if output is not None:
        logger.info("Results written to %s", output)
    return rows


def write_results(path: Path, payload: dict[str, Any]) -> None:
    """``payload`` as ``path``, through a temporary file and a rename: never a torn file."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(temporary, path)


if __name__ == "__main__":
    run_script(main)
