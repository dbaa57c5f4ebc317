#!/usr/bin/env python
"""How much of the shape label the main job's encoder can hold: the same ViT trained *supervised* on it.

    python benchmarks/main_job_supervised.py --seed 0 --output-dir /tmp/supervised-s0
    python benchmarks/main_job_supervised.py --seed 0 --output-dir /tmp/supervised-s0-no-crop --crop_scale 1.0,1.0

The main job (``examples/pretrain.py`` without options) pretrains a small I-JEPA on the embedded scenes and probes
its frozen, mean-pooled features for the class of the largest object. This script gives that number a ceiling:
the same encoder (the demo's config, through the same ``build_config``), training images, crop, steps, batch and
peak learning rate, trained with cross-entropy on the label by transformers' ``Trainer``
(``IJepaEncoderForImageClassification``: a linear head on the mean-pooled output; AdamW, warm-up then cosine).
The trained encoder, without its head, is saved as the main job saves its target encoder and goes through the
example's own probe, so its row compares with the main job's table cell for cell (random init and raw pixels are
recomputed beside it).

Options this script does not know go to the main job's own parser (the learning rate, crop, steps, batch, model),
so the supervised run changes with them as the main job would.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from transformers import Trainer, TrainingArguments

from ijepa_hf import IJepaEncoderForImageClassification, make_image_processor
from ijepa_hf.data import PretrainTransform, embedded_scenes
from ijepa_hf.finetuning import classification_collate
from ijepa_hf.training import build_config, parse_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import pretrain as main_job  # noqa: E402  (examples/pretrain.py: its probe and table)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_description  # noqa: E402


def train_supervised(args, label: str, output_dir: Path) -> tuple[IJepaEncoderForImageClassification, list[dict]]:
    """The demo's encoder with a linear head, trained on ``label`` by transformers' ``Trainer`` for the main job's
    steps, batch and peak learning rate (warm-up then cosine, AdamW); returns the model and Trainer's log."""
    config = build_config(args).encoder_config
    config.num_labels = len(main_job._class_names(label))
    torch.manual_seed(args.seed)
    model = IJepaEncoderForImageClassification(config)
    image_size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    # The main job's training scenes, cropped as its pretraining crops them; each item carries every label.
    transform = PretrainTransform(image_size, crop_scale=args.crop_range,
                                  generator=torch.Generator().manual_seed(args.seed))
    images = embedded_scenes(args.embedded_num_images, image_size=image_size, seed=0, transform=transform,
                             **args.embedded_scene_settings)
    training = TrainingArguments(
        output_dir=str(output_dir / "trainer"), max_steps=args.max_train_steps,
        per_device_train_batch_size=args.per_device_train_batch_size, learning_rate=args.learning_rate,
        weight_decay=0.05, lr_scheduler_type="cosine", warmup_steps=max(1, args.max_train_steps // 15),
        logging_steps=100, save_strategy="no", report_to=[], seed=args.seed, dataloader_num_workers=0,
        remove_unused_columns=False,  # the collator picks the label from every label an item carries
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
    trainer = Trainer(model=model, args=training, train_dataset=images,
                      data_collator=lambda items: classification_collate([{**item, "labels": item[label]}
                                                                          for item in items]))
    trainer.train()
    return model.eval(), trainer.state.log_history


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default="shape", choices=("shape", "texture"))
    parser.add_argument("--output-dir", required=True)
    cli, pretrain_options = parser.parse_known_args(argv)
    output_dir = Path(cli.output_dir)
    # The demo's settings, changed by the main job's options given here.
    args = parse_args(["--seed", str(cli.seed), "--output_dir", str(output_dir / "unused"), *pretrain_options])
    started = time.perf_counter()
    model, log = train_supervised(args, cli.label, output_dir)
    train_s = time.perf_counter() - started
    encoder_dir = output_dir / "encoder"
    model.encoder.save_pretrained(encoder_dir)  # the encoder without its head, probed as the main job's
    make_image_processor(model.config).save_pretrained(encoder_dir)
    results = main_job.probe(args, SimpleNamespace(encoder_dir=encoder_dir))
    results["rows"][0]["model"] = f"supervised on {cli.label} (same ViT, steps, data)"
    table = main_job.format_probe_table(results)
    print(table)
    command = " ".join(sys.argv if argv is None else ["main_job_supervised.py", *argv])
    summary = {"command": command, "cpu": cpu_description(), "torch_threads": torch.get_num_threads(),
               "train_seconds": train_s, "trainer_log": log, "probe": results}
    (output_dir / "supervised_results.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"training {train_s:.0f} s; results in {output_dir / 'supervised_results.json'}")
    return summary


if __name__ == "__main__":
    main()
