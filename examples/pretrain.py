#!/usr/bin/env python
"""Pretrain an I-JEPA model (Accelerate), then, on the embedded data, probe what it learned.

    python examples/pretrain.py                          # the main job: a few CPU minutes, then a probe table
    python examples/pretrain.py --train_dir ./images --config_name vit_small_patch16_224 --max_train_steps 10000
    accelerate launch examples/pretrain.py --dataset_name <hub dataset> --config_name ijepa_vith14_in1k \\
        --per_device_train_batch_size 128 --mixed_precision bf16 --num_train_epochs 300 --with_tracking
    python examples/pretrain.py args.json                # all arguments from a JSON file

Every option of ``ijepa_hf.training.PretrainingArguments`` is accepted (``--help`` lists them). This script only
adds defaults sized for a 2-core CPU (below) and, when no data argument is given, the probe: linear and 20-NN
accuracy of the target encoder's mean-pooled features on held-out procedural images (label: the class of the
largest shape), next to a randomly initialised encoder of the same architecture. The table is printed and
saved to ``<output_dir>/probe_results.json``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ijepa_hf.training.loop import PretrainingArguments, PretrainingResult, parse_args, pretrain

logger = logging.getLogger("pretrain")

# Defaults of this script (any of them can be overridden on the command line), sized so that the whole job,
# probe included, takes a few minutes on a 2-core CPU. The model is a small ViT on an 8x8 patch grid: 64 px images,
# patch 8, width 128, depth 4 (2 heads of 64); predictor width 64, depth 3 (the official predictor/encoder width
# ratio is 384/1280 = 0.3). Width 192 triples the step time on such a CPU. min_keep 4 keeps the official masks
# feasible on an 8x8 grid (the official 10 assumes 14x14 or more). The EMA starts at 0.99: with the official 0.996
# a run of a few hundred steps would leave the target encoder close to its random initialisation.
SCRIPT_DEFAULTS: list[str] = [
    "--output_dir", "outputs/pretrain-default",
    "--per_device_train_batch_size", "64",
    "--max_train_steps", "300",
    "--logging_steps", "10",
    "--ema_momentum", "0.99,1.0",
    "--embedded_num_images", "4096",
]
MODEL_DEFAULTS: list[str] = [
    "--image_size", "64",
    "--config_overrides",
    "encoder.patch_size=8,encoder.hidden_size=128,encoder.num_hidden_layers=4,encoder.num_attention_heads=2,"
    "predictor.hidden_size=64,predictor.num_hidden_layers=3,predictor.num_attention_heads=2,min_keep=4",
]
# Held-out probe data: other seeds than the training data (seed 0), so no probe image was seen in pretraining.
PROBE_TRAIN_IMAGES, PROBE_TEST_IMAGES = 2000, 1000
PROBE_TRAIN_SEED, PROBE_TEST_SEED = 1, 2


def with_script_defaults(argv: list[str]) -> list[str]:
    """Prepend this script's defaults; later (user) occurrences of an option win. The model defaults are only
    used when the user picks no model (``--config_name`` / ``--model_name_or_path`` / ``--config_overrides``)."""
    if len(argv) == 1 and argv[0].endswith(".json"):
        return argv  # a JSON file is the complete argument set
    user_picks_model = any(a.split("=")[0] in ("--config_name", "--model_name_or_path", "--config_overrides")
                           for a in argv)
    return SCRIPT_DEFAULTS + ([] if user_picks_model else MODEL_DEFAULTS) + argv


def probe(args: PretrainingArguments, result: PretrainingResult) -> list[dict[str, Any]]:
    """Linear and 20-NN probes of the trained target encoder and of a random-init twin (main process only)."""
    from ijepa_hf import IJepaEncoderModel
    from ijepa_hf.data import ProceduralShapes
    from ijepa_hf.evaluation import evaluate_encoder, format_results_table, load_encoder

    encoder, processor = load_encoder(result.encoder_dir)  # the saved artifact, as a user would load it
    config = encoder.config
    torch.manual_seed(args.seed + 1)
    random_encoder = IJepaEncoderModel(config).eval()
    image_size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    train = ProceduralShapes(PROBE_TRAIN_IMAGES, image_size=image_size, seed=PROBE_TRAIN_SEED)
    test = ProceduralShapes(PROBE_TEST_IMAGES, image_size=image_size, seed=PROBE_TEST_SEED)
    rows = []
    for name, model in (("I-JEPA target encoder", encoder), ("random init (same architecture)", random_encoder)):
        row = evaluate_encoder(model.eval(), train, test, name=name, image_processor=processor, batch_size=128,
                               progress=False, knn_kwargs={"k": 20})
        rows.append(row)
    print(f"\nProbe on held-out procedural shapes ({PROBE_TRAIN_IMAGES} train / {PROBE_TEST_IMAGES} test images, "
          f"label = class of the largest shape, {len(ProceduralShapes.shape_names)} classes, chance "
          f"{100 / len(ProceduralShapes.shape_names):.0f}%):\n")
    print(format_results_table([{k: v for k, v in row.items() if k not in ("layers",)} for row in rows]))
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO)
    started = time.perf_counter()
    args = parse_args(with_script_defaults(list(sys.argv[1:] if argv is None else argv)))
    result = pretrain(args)
    summary: dict[str, Any] = {"pretraining": result.to_dict()}
    is_main = torch.distributed.get_rank() == 0 if torch.distributed.is_initialized() else True
    if args.uses_embedded_data and is_main:
        probe_started = time.perf_counter()
        summary["probe"] = probe(args, result)
        summary["probe_seconds"] = time.perf_counter() - probe_started
    summary["total_seconds"] = time.perf_counter() - started
    if is_main:
        if "probe" in summary:
            path = Path(args.output_dir) / "probe_results.json"
            path.write_text(json.dumps(summary, indent=2, default=str))
            print(f"\nSaved {path}")
        loss = "n/a" if result.final_loss is None else f"{result.final_loss:.4f}"
        print(f"Pretraining: {result.global_step} steps, final loss {loss}, "
              f"{result.images_per_s:.0f} images/s, {result.bad_images} unreadable images skipped, "
              f"total {summary['total_seconds']:.0f}s. Model: {result.output_dir}, encoder: {result.encoder_dir}")
    return summary


if __name__ == "__main__":
    main()
