#!/usr/bin/env python
"""Does a plain ``transformers.Trainer`` fine-tune of a pretrained I-JEPA encoder learn? Fashion-MNIST, through the
user's own path, side by side with the package's linear probe on the same encoder.

1. The encoder: ``--encoder DIR`` (any encoder or pretraining repo), or ``--pretrain-steps N``: Fashion-MNIST
   written as an image folder and pretrained with ``ijepa_hf.training.pretrain`` (what ``examples/pretrain.py``
   runs), the target encoder taken from ``<output>/pretraining/encoder``.
2. The reference: the package's linear probe (L-BFGS logistic regression, ``ijepa_hf.evaluation``) on the frozen,
   mean-pooled features of the same training and test images.
3. What a transformers user writes: ``AutoModelForImageClassification.from_pretrained(encoder, num_labels=10,
   pooler_norm=...)``, the repo's ``AutoImageProcessor``, ``Trainer`` with ordinary settings (AdamW, linear decay,
   a few epochs): the head alone (encoder frozen) and everything, for each ``--pooler-norms`` value.

    python benchmarks/bench_finetune_trainer.py --pretrain-steps 1500 --output /tmp/ft-bench
    python benchmarks/bench_finetune_trainer.py --encoder /tmp/ft-bench/pretraining/encoder --output /tmp/ft-bench

Prints a table and writes ``<output>/finetune_trainer_results.json`` (the last line printed is the same JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from machine import cpu_description


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="working folder (image folder, pretraining run, results)")
    parser.add_argument("--encoder", help="a pretrained encoder or pretraining repo (else --pretrain-steps)")
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--pretrain-batch", type=int, default=64)
    parser.add_argument("--pretrain-images", type=int, default=None, help="first N training images (default all)")
    parser.add_argument("--train-images", type=int, default=10000, help="first N training images (fine-tune, probe)")
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--head-lr", type=float, default=1e-3, help="learning rate of the head-only fine-tune")
    parser.add_argument("--full-lr", type=float, default=1e-4, help="learning rate of the full fine-tune")
    parser.add_argument("--pooler-norms", default="none,batchnorm,layernorm")
    parser.add_argument("--modes", default="head,full")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args(argv)


def fashion_mnist_folder(root: Path, split: str, limit: int | None) -> Path:
    """Fashion-MNIST ``split`` as ``root/<split>/<class>/<index>.png`` (written once)."""
    from PIL import Image

    from ijepa_hf.data import FASHION_MNIST_CLASSES, load_fashion_mnist

    folder = root / split
    done = folder / ".complete"
    if done.exists():
        return folder
    images, labels = load_fashion_mnist(split)
    for index in range(len(images) if limit is None else min(limit, len(images))):
        target = folder / FASHION_MNIST_CLASSES[int(labels[index])].replace("/", "-")
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(images[index])).save(target / f"{index:05d}.png", compress_level=1)
    done.write_text("")
    return folder


def pretrain_encoder(args: argparse.Namespace, root: Path) -> Path:
    from ijepa_hf.training import parse_args as pretrain_args
    from ijepa_hf.training import pretrain

    images = fashion_mnist_folder(root / "data", "train", args.pretrain_images)
    out = root / "pretraining"
    argv = ["--train_dir", str(images), "--output_dir", str(out), "--image_size", "32", "--recipe", "small",
            "--config_overrides", "encoder.patch_size=4,encoder.hidden_size=128,encoder.num_hidden_layers=4,"
                                  "encoder.num_attention_heads=2,min_keep=4",
            "--ema_momentum", "0.99,0.999", "--learning_rate", "5e-4", "--per_device_train_batch_size",
            str(args.pretrain_batch), "--max_train_steps", str(args.pretrain_steps), "--logging_steps", "100",
            "--online_probe_steps", "0", "--seed", str(args.seed), "--num_workers", "1", "--overwrite_output_dir"]
    started = time.perf_counter()
    result = pretrain(pretrain_args(argv))
    print(f"pretrained {result.global_step} steps in {time.perf_counter() - started:.0f} s, final loss "
          f"{result.final_loss:.4f}", flush=True)
    return Path(result.encoder_dir)


def classification_data(root: Path, args: argparse.Namespace, processor: Any) -> tuple[Any, Any]:
    from ijepa_hf.data import fashion_mnist_dataset

    def transform(batch: dict[str, Any]) -> dict[str, Any]:
        pixels = processor(images=[image.convert("RGB") for image in batch["image"]], return_tensors="pt")
        return {"pixel_values": pixels["pixel_values"], "labels": batch["label"]}

    train = fashion_mnist_dataset("train", max_samples=args.train_images)
    test = fashion_mnist_dataset("test", max_samples=args.test_images)
    train.set_transform(transform)
    test.set_transform(transform)
    return train, test


def linear_probe(encoder_dir: Path, train: Any, test: Any, args: argparse.Namespace) -> float:
    from ijepa_hf.evaluation import linear_probe as probe
    from ijepa_hf.loading import load_encoder

    encoder, _ = load_encoder(str(encoder_dir))
    encoder.eval()

    def features(dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
        loader = torch.utils.data.DataLoader(dataset, batch_size=256)
        out, labels = [], []
        with torch.no_grad():
            for batch in loader:
                out.append(encoder(pixel_values=batch["pixel_values"]).pooler_output)
                labels.append(batch["labels"])
        return torch.cat(out), torch.cat(labels)

    (x_train, y_train), (x_test, y_test) = features(train), features(test)
    return float(probe(x_train, y_train, x_test, y_test)["accuracy"])


def trainer_finetune(encoder_dir: Path, train: Any, test: Any, args: argparse.Namespace, mode: str,
                     pooler_norm: str) -> dict[str, Any]:
    from transformers import AutoModelForImageClassification, Trainer, TrainingArguments, set_seed

    import ijepa_hf  # noqa: F401  (registers the model types, as a user's script does)

    set_seed(args.seed)
    model = AutoModelForImageClassification.from_pretrained(encoder_dir, num_labels=10, pooler_norm=pooler_norm)
    if mode == "head":
        for name, parameter in model.named_parameters():
            parameter.requires_grad = name.startswith(("classifier.", "pooler_norm."))
    training = TrainingArguments(
        output_dir=str(Path(args.output) / f"ft-{mode}-{pooler_norm}"), learning_rate=args.head_lr if mode == "head"
        else args.full_lr, num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=256, save_strategy="no", report_to="none", logging_steps=50, use_cpu=True,
        remove_unused_columns=False, seed=args.seed, disable_tqdm=True,
    )

    def accuracy(prediction: Any) -> dict[str, float]:
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    trainer = Trainer(model=model, args=training, train_dataset=train, eval_dataset=test, compute_metrics=accuracy)
    started = time.perf_counter()
    trainer.train()
    metrics = trainer.evaluate()
    return {"mode": mode, "pooler_norm": pooler_norm, "accuracy": metrics["eval_accuracy"],
            "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.output)
    root.mkdir(parents=True, exist_ok=True)
    encoder_dir = Path(args.encoder) if args.encoder else pretrain_encoder(args, root)
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(encoder_dir)
    train, test = classification_data(root, args, processor)
    results: dict[str, Any] = {
        "machine": cpu_description(), "encoder": str(encoder_dir), "train_images": len(train),
        "test_images": len(test), "epochs": args.epochs, "batch_size": args.batch_size,
        "learning_rates": {"head": args.head_lr, "full": args.full_lr},
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }
    results["linear_probe"] = linear_probe(encoder_dir, train, test, args)
    print(f"linear probe (L-BFGS, frozen features): {results['linear_probe']:.4f}", flush=True)
    results["trainer"] = []
    for mode in args.modes.split(","):
        for norm in args.pooler_norms.split(","):
            row = trainer_finetune(encoder_dir, train, test, args, mode, norm)
            results["trainer"].append(row)
            print(f"Trainer {mode:<4} pooler_norm={norm:<9} accuracy {row['accuracy']:.4f} ({row['seconds']:.0f} s)",
                  flush=True)
    (root / "finetune_trainer_results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
