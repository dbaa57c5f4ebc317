#!/usr/bin/env python
"""Pretrain an I-JEPA model (Accelerate), then, on the embedded data, probe what it learned.

    python examples/pretrain.py                          # the main job: a few CPU minutes, then a probe table
    python examples/pretrain.py --seed 1                 # the same job with another model init, data order, masks
    python examples/pretrain.py --config_overrides predictor.num_hidden_layers=2   # its model with a 2-block predictor
    python examples/pretrain.py --train_dir ./images --config_name vit_small_patch16_224 --max_train_steps 10000
    accelerate launch examples/pretrain.py --dataset_name <hub dataset> --config_name ijepa_vith14_in1k \\
        --per_device_train_batch_size 128 --mixed_precision bf16 --num_train_epochs 300 --with_tracking
    python examples/pretrain.py args.json                # all arguments from a JSON file

Every option of ``ijepa_hf.training.PretrainingArguments`` is accepted (``--help`` lists them with their
defaults). When no data argument is given, the embedded ``ijepa_hf.data.ProceduralShapes`` scenes
(``ijepa_hf.data.EMBEDDED_SCENES``, changed with ``--embedded_scenes``) are used with the
library's demo settings sized for a 2-core CPU (``ijepa_hf.training.arguments.EMBEDDED_DEMO_DEFAULTS`` /
``EMBEDDED_DEMO_MODEL``, filled in only for options not given, and logged; ``--config_overrides`` changes the demo's
model, ``--config_name`` replaces it), and the run ends with a probe: frozen,
mean-pooled features of the **target encoder** (its last 4 blocks, concatenated) on held-out procedural images
(other generator seeds than the training images), with a linear probe (L-BFGS logistic regression) and a 20-NN
probe, next to a randomly initialised encoder of the same architecture and raw pixels.

Labels probed (all read from the generator, i.e. properties of the image content):

* ``texture`` (the main label): the background texture class (solid, gradient, stripes, checker, noise), a global
  property of the scene that mean-pooled features can carry;
* ``shape``: the class of the largest object, the semantic label (every object of an embedded scene has it, so
  hidden objects can be predicted from visible ones; ``ijepa_hf.data.EMBEDDED_SCENES``); benchmarks/README.md
  says how far the features get on it;
* ``count``: the number of objects.

The table is printed and saved to ``<output_dir>/probe_results.json``, the training curves (from
``train_log.jsonl``) to ``<output_dir>/training_curves.png`` and the I-JEPA masks of a few images to
``<output_dir>/masks.png``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ijepa_hf.scripts import TRAINING_INTERRUPTED, configure_logging, run_script
from ijepa_hf.training import (
    PREEMPTED_EXIT_CODE,
    PretrainingArguments,
    PretrainingResult,
    TrainingPreempted,
    parse_args,
    pretrain,
)

logger = logging.getLogger("pretrain")

# Held-out probe data: the training images use generator seed 0, the probe's train / test images seeds 1 / 2, so
# no probe image was seen in pretraining. The images come from the same generator settings as the training images
# (`ijepa_hf.data.EMBEDDED_SCENES`, changed by --embedded_scenes).
PROBE_TRAIN_IMAGES, PROBE_TEST_IMAGES = 2000, 1000
PROBE_TRAIN_SEED, PROBE_TEST_SEED = 1, 2
PROBE_K = 20
# Probe features: the outputs of the last PROBE_LAYERS blocks (all four of the demo encoder), each through the
# encoder's final LayerNorm, mean-pooled and concatenated (`extract_features(layers=k)`, DINO's linear evaluation).
# Mean-pooling only the last block dilutes the objects among the background patches; the earlier blocks keep more
# of where the objects' edges are. The same features for the random-init twin, so the comparison stays fair; on the
# shape label this lifted the pretrained features by 2-4 points and not the random ones (benchmarks/README.md).
PROBE_LAYERS = 4
# Labels probed, main label first (see the module docstring).
MAIN_LABEL = "texture"
PROBE_LABELS: tuple[str, ...] = ("texture", "shape", "count")
LABEL_DESCRIPTIONS = {
    "texture": "background texture",
    "shape": "class of the largest object",
    "count": "number of objects",
}
RAW_PIXELS_SIZE = 16  # raw-pixel baseline: the image average-pooled to 16x16 RGB (768 numbers)


def _class_names(label: str) -> list[str]:
    from ijepa_hf.data import SHAPE_NAMES, TEXTURE_NAMES

    return {"texture": list(TEXTURE_NAMES), "shape": list(SHAPE_NAMES)}.get(label, [])


def _raw_pixels(dataset: Any, size: int) -> torch.Tensor:
    """Images of ``dataset`` average-pooled to ``size x size`` RGB, flattened, in [0, 1]."""
    images = torch.stack([torch.from_numpy(dataset.render(i)[0]) for i in range(len(dataset))])
    images = images.permute(0, 3, 1, 2).float() / 255.0
    return torch.nn.functional.adaptive_avg_pool2d(images, size).flatten(1)


def probe(args: PretrainingArguments, result: PretrainingResult) -> dict[str, Any]:
    """Linear and 20-NN probes, for every label in ``PROBE_LABELS``, of the trained target encoder, a random-init
    twin and raw pixels, on held-out procedural images (main process only). Returns the JSON-ready results."""
    from ijepa_hf import IJepaEncoderModel
    from ijepa_hf.data import embedded_scenes
    from ijepa_hf.evaluation import extract_features, knn_probe, linear_probe
    from ijepa_hf.loading import load_encoder

    encoder, processor = load_encoder(result.encoder_dir)  # the saved artifact, as a user would load it
    config = encoder.config
    torch.manual_seed(args.seed + 1)
    random_encoder = IJepaEncoderModel(config).eval()
    image_size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    scenes = args.embedded_scene_settings  # the pretraining scenes' settings (--embedded_scenes)
    splits = {"train": embedded_scenes(PROBE_TRAIN_IMAGES, image_size=image_size, seed=PROBE_TRAIN_SEED, **scenes),
              "test": embedded_scenes(PROBE_TEST_IMAGES, image_size=image_size, seed=PROBE_TEST_SEED, **scenes)}
    labels = {split: {label: torch.tensor([ds.labels(i)[label] for i in range(len(ds))]) for label in PROBE_LABELS}
              for split, ds in splits.items()}

    layers = min(PROBE_LAYERS, config.num_hidden_layers)  # a user's shallower encoder: all its blocks
    features: dict[str, dict[str, torch.Tensor]] = {}
    for name, model in (("I-JEPA target encoder", encoder), ("random init (same architecture)", random_encoder)):
        features[name] = {split: extract_features(model.eval(), ds, image_processor=processor, label_column=None,
                                                  batch_size=128, layers=layers, progress=False)[0]
                          for split, ds in splits.items()}
    features[f"raw pixels ({RAW_PIXELS_SIZE}x{RAW_PIXELS_SIZE} RGB)"] = {
        split: _raw_pixels(ds, RAW_PIXELS_SIZE) for split, ds in splits.items()}

    rows = []
    for name, feats in features.items():
        row: dict[str, Any] = {"model": name, "feature_dim": int(feats["train"].shape[1])}
        for label in PROBE_LABELS:
            train_y, test_y = labels["train"][label], labels["test"][label]
            linear = linear_probe(feats["train"], train_y, feats["test"], test_y)
            knn = knn_probe(feats["train"], train_y, feats["test"], test_y, k=PROBE_K)
            row[label] = {"linear_accuracy": linear["accuracy"], "knn_accuracy": knn["accuracy"],
                          "linear": linear, "knn": knn}
        rows.append(row)
    chance = {}
    for label in PROBE_LABELS:
        test_y = labels["test"][label]
        chance[label] = float(torch.bincount(test_y).max()) / len(test_y)  # majority class of the test set
    return {
        "main_label": MAIN_LABEL,
        "labels": {label: {"description": LABEL_DESCRIPTIONS[label], "classes": _class_names(label)
                           or sorted({int(v) for v in labels["test"][label]}),
                           "chance_majority_class": chance[label]} for label in PROBE_LABELS},
        "data": {"generator": repr(splits["test"]).replace(f"num_images={PROBE_TEST_IMAGES}, ", ""),
                 "train_images": PROBE_TRAIN_IMAGES, "test_images": PROBE_TEST_IMAGES,
                 "train_seed": PROBE_TRAIN_SEED, "test_seed": PROBE_TEST_SEED, "pretraining_seed": 0},
        "features": f"mean-pooled patch features of the last {layers} blocks (each through the final LayerNorm), "
                    "concatenated (raw pixels: average-pooled image)",
        "layers": layers,
        "k": PROBE_K,
        "rows": rows,
    }


def format_probe_table(results: dict[str, Any]) -> str:
    """The probe results as an aligned Markdown table: one row per feature set, linear and k-NN accuracy (%) per
    label, and a last row with the chance level (majority class of the test set)."""
    k = results["k"]
    labels = list(results["labels"])
    header = ["features"] + [f"{label}{' (main)' if label == results['main_label'] else ''} {kind}"
                             for label in labels for kind in ("linear", f"{k}-NN")]
    table = [[row["model"]] + [f"{100 * row[label][key]:.1f}" for label in labels
                               for key in ("linear_accuracy", "knn_accuracy")] for row in results["rows"]]
    table.append(["chance (majority class)"] + [f"{100 * results['labels'][label]['chance_majority_class']:.1f}"
                                                for label in labels for _ in range(2)])
    widths = [max(len(line[i]) for line in [header] + table) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                                 for i, (cell, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if i else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule] + [line(cells) for cells in table])


def _data_name(args: PretrainingArguments) -> str:
    if args.uses_embedded_data:
        return "procedural shapes"
    return args.dataset_name if args.dataset_name not in (None, "imagefolder") else f"images in {args.train_dir}"


def write_figures(args: PretrainingArguments, result: PretrainingResult) -> dict[str, str]:
    """Training curves (from the run's ``train_log.jsonl``) and, on the embedded data, the masks of the first 8
    training images (uncropped), as PNGs."""
    from ijepa_hf import IJepaMaskCollator, IJepaPretrainingConfig
    from ijepa_hf.data import EvalTransform, embedded_scenes
    from ijepa_hf.visualization import plot_mask_grid, plot_training_curves

    output_dir = Path(result.output_dir)
    paths: dict[str, str] = {}
    try:
        paths["training_curves"] = str(plot_training_curves(
            result.log_file, output_dir / "training_curves.png",
            title=f"I-JEPA pretraining on {_data_name(args)} ({result.global_step} steps)"))
    except (OSError, ValueError) as error:
        logger.warning("No training-curve figure: %s", error)
    if not args.uses_embedded_data:
        return paths
    config = IJepaPretrainingConfig.from_pretrained(result.output_dir)
    image_size = config.encoder_config.image_size
    image_size = image_size if isinstance(image_size, int) else image_size[0]
    patch_size = config.encoder_config.patch_size
    patch_size = patch_size if isinstance(patch_size, int) else patch_size[0]
    collator = IJepaMaskCollator.from_config(config, seed=args.seed)
    transform = EvalTransform(image_size, resize_ratio=1.0)
    # The first training images (uncropped).
    images = embedded_scenes(8, image_size=image_size, seed=0, **args.embedded_scene_settings)
    batch = collator([{"pixel_values": transform(images.get_image(i))} for i in range(len(images))])
    paths["masks"] = str(plot_mask_grid(batch["pixel_values"], batch["context_mask"], batch["target_masks"],
                                        patch_size, output_dir / "masks.png",
                                        title="I-JEPA masks: context (blue) predicts the target blocks"))
    return paths


def print_summary(args: PretrainingArguments, summary: dict[str, Any], result: PretrainingResult,
                  probe_path: Path | None) -> None:
    loss = "n/a" if result.final_loss is None else f"{result.final_loss:.4f}"
    train_s = result.train_runtime_s if result.train_runtime_s is not None else float("nan")
    print(f"\nPretraining (--seed {args.seed}): {result.global_step} steps of batch "
          f"{args.per_device_train_batch_size * args.gradient_accumulation_steps} per process in {train_s:.0f}s "
          f"({result.images_per_s:.0f} images/s), final loss {loss}, {result.bad_images} unreadable images skipped.")
    results = summary.get("probe")
    if results is not None:
        main = results["main_label"]
        info = results["labels"][main]
        data = results["data"]
        print(f"\nProbe of frozen, mean-pooled features (last {results['layers']} blocks, concatenated) on held-out "
              f"procedural images ({data['train_images']} "
              f"train / {data['test_images']} test, generator seeds {data['train_seed']} / {data['test_seed']}; "
              f"pretraining images: seed {data['pretraining_seed']}). Accuracy in %, linear probe and "
              f"{results['k']}-NN.")
        print(f"Main label: {main} = {info['description']} ({len(info['classes'])} classes: "
              f"{', '.join(map(str, info['classes']))}; chance {100 * info['chance_majority_class']:.1f}%).\n")
        print(format_probe_table(results))
        ijepa, random = results["rows"][0][main], results["rows"][1][main]
        print(f"\nI-JEPA target encoder vs random init on {main}: "
              f"{100 * (ijepa['linear_accuracy'] - random['linear_accuracy']):+.1f} points linear, "
              f"{100 * (ijepa['knn_accuracy'] - random['knn_accuracy']):+.1f} points {results['k']}-NN.")
    print(f"\nModel (context + target encoder + predictor): {result.output_dir}")
    print(f"Target encoder (for probes / fine-tuning):    {result.encoder_dir}")
    for key, text in (("training_curves", "Training curves:"), ("masks", "Mask overlay:")):
        if key in summary.get("figures", {}):
            print(f"{text:<45}{summary['figures'][key]}")
    print(f"{'Training log:':<45}{result.log_file}")
    if probe_path is not None:
        print(f"{'Probe results (JSON):':<45}{probe_path}")
    print(f"Total time ({'pretraining + probe' if probe_path is not None else 'pretraining'}): "
          f"{summary['total_seconds']:.0f}s")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    configure_logging()
    started = time.perf_counter()
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        result = pretrain(args)
    except TrainingPreempted as stopped:  # a pre-emption signal: the checkpoint is complete, the job may requeue
        logger.warning("%s", stopped)
        raise SystemExit(PREEMPTED_EXIT_CODE) from None
    summary: dict[str, Any] = {"pretraining": result.to_dict()}
    is_main = torch.distributed.get_rank() == 0 if torch.distributed.is_initialized() else True
    probe_path = None
    if is_main:
        try:
            summary["figures"] = write_figures(args, result)
        except Exception as error:  # noqa: BLE001 - a figure must not cost the run its results
            logger.warning("Could not write the figures: %s", error)
    if args.uses_embedded_data and is_main:
        probe_started = time.perf_counter()
        summary["probe"] = probe(args, result)
        summary["probe_seconds"] = time.perf_counter() - probe_started
    summary["total_seconds"] = time.perf_counter() - started
    if is_main:
        if "probe" in summary:
            probe_path = Path(args.output_dir) / "probe_results.json"
            probe_path.write_text(json.dumps(summary, indent=2, default=str))
        print_summary(args, summary, result, probe_path)
    return summary


if __name__ == "__main__":
    run_script(main, on_interrupt=TRAINING_INTERRUPTED)  # which also ends the process group in order
