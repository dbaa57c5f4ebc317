"""Does it learn? I-JEPA against MAE, random init and raw pixels on Fashion-MNIST, at the same budget in images, each
trained through the path a user runs:

* **I-JEPA** through :func:`ijepa_hf.training.pretrain` (what ``examples/pretrain.py`` runs) on Fashion-MNIST as a
  ``datasets`` dataset: :func:`ijepa_hf.data.fashion_mnist_dataset` written once as Parquet and given as
  ``--dataset_name``, so the library's crop, mask collator, recipe, schedules, EMA, online probe and logging are the
  ones measured. Its ``train_log.jsonl`` is the run's own; ``training_curves.png`` is drawn from it.
* **MAE** through transformers' own ``Trainer`` with ``ViTMAEForPreTraining`` of the same encoder size on the same
  images and crops (the library's ``PretrainTransform``), MAE's recipe: mask ratio 0.75, AdamW betas (0.9, 0.95),
  weight decay 0.05, the same peak learning rate and warm-up fraction, cosine to 1e-6.
* **random init**: the same ViT at the initial weights of the seed; **raw pixels**: the 32 x 32 grey image.

Frozen features of the training images (average-pooled final tokens, or the tokens themselves for the attentive
probe) are probed with :mod:`ijepa_hf.evaluation` on the test images: linear (L-BFGS, L2 chosen on held-out training
images), 20-NN (cosine), the low-shot linear probe (600 class-balanced labels, the paper's 1 % protocol, mean of
``--low-shot-draws``) and the attentive probe.

The model is set by the command-line language of ``examples/pretrain.py``: ``--model-overrides`` (default: 32 px,
patch 4, ViT 128 x 4 with 2 heads, ``min_keep`` 4) plus ``--config-overrides`` for anything else, e.g. an
anti-collapse regulariser (``sigreg_weight=0.05``); ``--recipe`` sizes the predictor and the warm-up
(:mod:`ijepa_hf.training.recipes`). MAE's encoder is built from the I-JEPA encoder config of the run.

Run::

    python benchmarks/learning.py --seed 0                              # 1,118,976 images per method, small recipe
    python benchmarks/learning.py --seed 0 --methods ijepa --config-overrides sigreg_weight=0.05
    python benchmarks/learning.py --max-steps 2 --train-size 512 --test-size 128   # smoke run (numbers meaningless)

Outputs go to ``--output-dir`` (default ``outputs/learning``): ``fashion-mnist_results.json`` (table, settings,
machine, per-method training summary and probe details; ``seed_table.py`` reads it), ``ijepa/`` (the ``pretrain``
output folder: model, ``encoder/``, ``train_log.jsonl``, and ``training_curves.png`` drawn from it), ``mae/`` (the MAE model,
``train_log.jsonl`` and ``training_curves.png``) and ``data/`` (the Parquet files, reused by later runs).

One pitfall guarded against: in transformers 5.24 a ``ViTMAEForPreTraining`` built from a config has all-zero
position embeddings, CLS and mask tokens (its own init is skipped); :func:`initialize_mae` re-runs the modules' own
initialisers and :func:`check_mae_initialization` asserts the result.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

import ijepa_hf
from ijepa_hf import IJepaForPreTraining, IJepaPretrainingConfig
from ijepa_hf.data import EvalTransform, PretrainTransform, fashion_mnist_dataset
from ijepa_hf.data.fashion_mnist import DEFAULT_FASHION_MNIST_DIR
from ijepa_hf.evaluation import (attentive_probe, extract_features, format_results_table, knn_probe, linear_probe,
                                 low_shot_linear_probe)
from ijepa_hf.training import build_config, pretrain
from ijepa_hf.training import parse_args as parse_pretraining_args
from ijepa_hf.training.recipes import get_recipe
from ijepa_hf.visualization import plot_training_curves

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling helper below, also when imported by path
from machine import cpu_description  # noqa: E402  (benchmarks/machine.py, beside this script)

logger = logging.getLogger("learning")

METHODS = ("ijepa", "mae", "random", "pixels")
# The budget in images compares across machines: 8,742 steps of batch 128, what 20 minutes gave the small recipe on a
# 2-core AMX Xeon (benchmarks/README.md).
DEFAULT_BUDGET_IMAGES = 8742 * 128
# The model of the Fashion-MNIST rows of benchmarks/README.md, in examples/pretrain.py's --config_overrides language.
DEFAULT_MODEL_OVERRIDES = ("encoder.image_size=32,encoder.patch_size=4,encoder.hidden_size=128,"
                           "encoder.num_hidden_layers=4,encoder.num_attention_heads=2,min_keep=4")
INSTALL_HINT = ("Install Debian's package with `sudo apt-get install dataset-fashion-mnist`, or point "
                "FASHION_MNIST_DIR / --fashion-mnist-dir to a folder holding {train,t10k}-{images-idx3,labels-idx1}-"
                "ubyte[.gz].")
ROW_NAMES = {"pixels": "raw pixels", "random": "random init (same ViT)", "target": "I-JEPA target encoder",
             "context": "I-JEPA context encoder", "mae": "MAE (transformers ViTMAE)"}


# ----------------------------------------------------------------------------------------------------------------
# Data: Fashion-MNIST as datasets, once as Parquet for pretrain()
# ----------------------------------------------------------------------------------------------------------------


def fashion_mnist_splits(root: str | None, train_size: int | None, test_size: int | None) -> tuple[Any, Any]:
    """The training and test splits as ``datasets.Dataset`` (``image``, ``label``); ``SystemExit`` with the install
    command when the files are missing."""
    try:
        return (fashion_mnist_dataset("train", root, max_samples=train_size),
                fashion_mnist_dataset("test", root, max_samples=test_size))
    except FileNotFoundError as error:
        raise SystemExit(f"Fashion-MNIST not found ({root or os.environ.get('FASHION_MNIST_DIR') or DEFAULT_FASHION_MNIST_DIR}): "
                         f"{error}\n{INSTALL_HINT}") from None


def write_parquet_once(dataset: Any, folder: Path) -> Path:
    """``folder/train.parquet`` holding ``dataset`` (kept when it already holds the same number of rows): a folder
    ``datasets.load_dataset`` reads as a dataset whose ``train`` split it is, i.e. what ``--dataset_name`` takes."""
    path = folder / "train.parquet"
    if path.is_file():
        import pyarrow.parquet as pq

        if pq.ParquetFile(path).metadata.num_rows == len(dataset):
            return folder
    folder.mkdir(parents=True, exist_ok=True)
    dataset.to_parquet(str(path))
    return folder


# ----------------------------------------------------------------------------------------------------------------
# I-JEPA: pretrain(), the function behind examples/pretrain.py
# ----------------------------------------------------------------------------------------------------------------


def pretraining_argv(args: argparse.Namespace, data_dir: Path, output_dir: Path) -> list[str]:
    """The ``examples/pretrain.py`` command line of the benchmark's I-JEPA run (its config is built from it too)."""
    overrides = ",".join(part for part in (args.model_overrides, args.config_overrides) if part)
    argv = ["--dataset_name", str(data_dir), "--output_dir", str(output_dir), "--overwrite_output_dir",
            "--config_overrides", overrides, "--recipe", args.recipe, "--seed", str(args.seed),
            "--per_device_train_batch_size", str(args.batch_size), "--max_train_steps", str(args.max_steps),
            "--logging_steps", str(args.log_every), "--num_workers", str(args.num_workers),
            "--mixed_precision", "bf16" if args.precision == "bf16" else "no"]
    if args.online_probe_steps is not None:
        argv += ["--online_probe_steps", str(args.online_probe_steps)]
    if not args.progress:
        argv.append("--disable_tqdm")
    return argv


def pretrain_ijepa(args: argparse.Namespace, data_dir: Path, output_dir: Path) -> Any:
    """Run :func:`ijepa_hf.training.pretrain` with the benchmark's settings; returns its ``PretrainingResult``."""
    argv = pretraining_argv(args, data_dir, output_dir)
    logger.info("I-JEPA: pretrain(parse_args(%s))", argv)
    return pretrain(parse_pretraining_args(argv))


# ----------------------------------------------------------------------------------------------------------------
# MAE: transformers' Trainer and ViTMAEForPreTraining
# ----------------------------------------------------------------------------------------------------------------


def build_mae(config: IJepaPretrainingConfig, args: argparse.Namespace) -> Any:
    """transformers' ``ViTMAEForPreTraining`` with the I-JEPA encoder's size, initialised properly."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    encoder = config.encoder_config
    mae_config = ViTMAEConfig(
        image_size=encoder.image_size, patch_size=encoder.patch_size, num_channels=3, hidden_size=encoder.hidden_size,
        num_hidden_layers=encoder.num_hidden_layers, num_attention_heads=encoder.num_attention_heads,
        intermediate_size=encoder.intermediate_size, layer_norm_eps=encoder.layer_norm_eps,
        decoder_hidden_size=args.mae_decoder_width, decoder_num_hidden_layers=args.mae_decoder_depth,
        decoder_num_attention_heads=args.mae_decoder_heads, decoder_intermediate_size=4 * args.mae_decoder_width,
        mask_ratio=args.mae_mask_ratio, norm_pix_loss=args.mae_norm_pix_loss,
    )
    model = ViTMAEForPreTraining(mae_config)
    initialize_mae(model)
    check_mae_initialization(model)
    return model


def initialize_mae(model: Any) -> None:
    """Re-run ViT-MAE's own initialisers, which transformers 5.24 skips for a model built from a config.

    In 5.24 ``post_init`` flags the patch projection as initialised (``_is_hf_initialized``) before
    ``ViTMAEEmbeddings.initialize_weights`` runs, so that method returns at once, and
    ``ViTMAEPreTrainedModel._init_weights`` zeroes the decoder's mask token and position table. Clearing the flags
    and calling both modules' ``initialize_weights`` restores MAE's sin-cos tables, xavier patch projection and
    N(0, 0.02) tokens.
    """
    embeddings, decoder = model.vit.embeddings, model.decoder
    tensors = (embeddings.patch_embeddings.projection, embeddings.patch_embeddings.projection.weight,
               embeddings.position_embeddings, embeddings.cls_token, decoder.decoder_pos_embed, decoder.mask_token)
    for item in tensors:
        if hasattr(item, "_is_hf_initialized"):
            item._is_hf_initialized = False
    embeddings.initialize_weights()
    decoder.initialize_weights(embeddings.patch_embeddings.num_patches)


def check_mae_initialization(model: Any) -> None:
    """Assert MAE's fixed position tables and tokens are initialised: every patch row non-zero and distinct."""
    embeddings, decoder = model.vit.embeddings, model.decoder
    for name, table in (("vit.embeddings.position_embeddings", embeddings.position_embeddings),
                        ("decoder.decoder_pos_embed", decoder.decoder_pos_embed)):
        patches = table.detach()[0, 1:]  # row 0 is the CLS slot, zero by MAE's formula
        if not bool((patches.norm(dim=-1) > 0).all()) or torch.unique(patches, dim=0).shape[0] != patches.shape[0]:
            raise AssertionError(f"MAE {name} is zero or degenerate: the transformers 5.24 init trap; call "
                                 "initialize_mae(model)")
    for name, token in (("cls_token", embeddings.cls_token), ("mask_token", decoder.mask_token)):
        if not torch.count_nonzero(token):
            raise AssertionError(f"MAE {name} is all zeros: the transformers 5.24 init trap; call initialize_mae")


def _pixel_values_only(examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.stack([example["pixel_values"] for example in examples])}


def train_mae(model: Any, train: Any, image_size: int, args: argparse.Namespace, output_dir: Path) -> dict[str, Any]:
    """MAE with transformers' ``Trainer`` on ``train`` (the same images, cropped by the library's
    ``PretrainTransform``); saves the model, ``train_log.jsonl`` and ``training_curves.png`` in ``output_dir``."""
    from transformers import Trainer, TrainingArguments

    from ijepa_hf.data import make_transform_fn
    from ijepa_hf.training.metrics import write_train_log

    crops = train.with_transform(make_transform_fn(PretrainTransform(image_size), keep_columns=()))
    training_args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=args.batch_size, max_steps=args.max_steps,
        learning_rate=args.learning_rate, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": 1e-6},
        warmup_steps=get_recipe(args.recipe).warmup_ratio, weight_decay=args.mae_weight_decay, adam_beta1=0.9,
        adam_beta2=0.95, bf16=args.precision == "bf16", use_cpu=True, seed=args.seed, logging_steps=args.log_every,
        save_strategy="no", report_to="none", remove_unused_columns=False, dataloader_drop_last=True,
        dataloader_num_workers=args.num_workers, disable_tqdm=not args.progress,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=crops, data_collator=_pixel_values_only)
    started = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - started
    check_mae_initialization(model)
    trainer.save_model(str(output_dir))
    rows = [{"step": entry["step"], "loss": entry["loss"], "lr": entry.get("learning_rate")}
            for entry in trainer.state.log_history if "loss" in entry]
    write_train_log(output_dir / "train_log.jsonl", rows)
    _plot(rows, output_dir / "training_curves.png", f"MAE on Fashion-MNIST, {args.max_steps} steps of {args.batch_size}")
    steps = trainer.state.global_step
    return {"steps": steps, "images_seen": steps * args.batch_size, "seconds": seconds,
            "images_per_s": steps * args.batch_size / max(seconds, 1e-9), "final_loss": output.training_loss}


# ----------------------------------------------------------------------------------------------------------------
# Frozen features
# ----------------------------------------------------------------------------------------------------------------


def _autocast(args: argparse.Namespace):
    return torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()


def eval_transform(image_size: int) -> EvalTransform:
    """28 px -> ``image_size`` with no crop (the whole garment), bilinear as the pretraining crops."""
    return EvalTransform(image_size, resize_ratio=1.0, interpolation="bilinear")


def ijepa_features(model: Any, dataset: Any, image_size: int, args: argparse.Namespace, encoder: str = "target",
                   tokens: bool = False, blocks: int = 1) -> torch.Tensor:
    """Average-pooled final features ``[N, D]`` of an I-JEPA encoder (``ijepa_hf.evaluation.extract_features``), or
    with ``tokens=True`` the final patch tokens ``[N, T, D]``. ``blocks > 1``: the outputs of the last ``blocks``
    blocks, each through the final LayerNorm, average-pooled and concatenated ``[N, blocks * D]``."""
    with _autocast(args):
        features, _ = extract_features(model, dataset, transform=eval_transform(image_size), label_column=None,
                                       batch_size=args.eval_batch_size, progress=args.progress, encoder=encoder,
                                       pool=not tokens, layers="last" if blocks == 1 else blocks)
    return features.float()


@contextmanager
def mae_without_masking(model: Any) -> Iterator[None]:
    """Temporarily set MAE's mask ratio to 0 so the encoder sees every patch (restored afterwards)."""
    config = model.vit.embeddings.config
    previous, config.mask_ratio = config.mask_ratio, 0.0
    try:
        yield
    finally:
        config.mask_ratio = previous


@torch.no_grad()
def mae_features(model: Any, dataset: Any, image_size: int, args: argparse.Namespace,
                 tokens: bool = False, blocks: int = 1) -> torch.Tensor:
    """MAE encoder features without masking: the mean of the patch tokens (CLS excluded) after the final norm
    ``[N, D]``, or with ``tokens=True`` the patch tokens ``[N, T, D]``. ``blocks > 1``: the last ``blocks`` blocks'
    outputs, each through the final norm, averaged over the patches and concatenated ``[N, blocks * D]`` (the same
    as ``ijepa_features``)."""
    if tokens and blocks != 1:
        raise ValueError("the attentive probe reads the last block's tokens: tokens=True needs blocks=1")
    vit = model.vit.eval()
    num_patches = vit.embeddings.patch_embeddings.num_patches
    pixels = _images(dataset, image_size)
    features = []
    with mae_without_masking(model), _autocast(args):
        for start in range(0, len(pixels), args.eval_batch_size):
            batch = pixels[start : start + args.eval_batch_size]
            # Increasing "noise" keeps the patches in raster order (no random shuffle; pooling ignores order).
            noise = torch.arange(num_patches, dtype=torch.float32).expand(len(batch), -1)
            output = vit(pixel_values=batch, noise=noise, output_hidden_states=blocks > 1)
            if blocks > 1:
                # hidden_states[-1] is the last block's output before the final norm (last_hidden_state is after).
                last = output.hidden_states[-blocks:]
                features.append(torch.cat([vit.layernorm(h)[:, 1:].float().mean(dim=1) for h in last], dim=1))
                continue
            hidden = output.last_hidden_state[:, 1:].float()
            features.append(hidden if tokens else hidden.mean(dim=1))
    return torch.cat(features)


def _images(dataset: Any, image_size: int) -> torch.Tensor:
    """Every image of ``dataset`` through the evaluation transform, ``[N, 3, S, S]`` normalised."""
    transform = eval_transform(image_size)
    return torch.stack([transform(example["image"]) for example in dataset])


def pixel_features(dataset: Any, image_size: int, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw grey pixels in [0, 1]: flattened ``[N, S * S]`` and as patch tokens ``[N, T, p * p]`` (the tokens a ViT's
    patch projection sees, without any learned weights)."""
    transform = eval_transform(image_size)
    normalised = _images(dataset, image_size)[:, :1]
    grey = normalised * transform.std[0] + transform.mean[0]  # undo the normalisation of the (identical) channels
    tokens = F.unfold(grey, kernel_size=patch_size, stride=patch_size).transpose(1, 2).contiguous()
    return grey.flatten(1), tokens


# ----------------------------------------------------------------------------------------------------------------
# Probes
# ----------------------------------------------------------------------------------------------------------------


def probe_row(name: str, train_tokens: torch.Tensor, test_tokens: torch.Tensor, train_labels: torch.Tensor,
              test_labels: torch.Tensor, args: argparse.Namespace, extra: Mapping[str, Any],
              pooled: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, Any]:
    """Every probe of one feature set: ``*_tokens [N, T, D]`` for the attentive probe, their mean over T (or
    ``pooled``) for the others. Returns a table row (``probes`` holds the details)."""
    train_x, test_x = pooled if pooled is not None else (train_tokens.mean(1), test_tokens.mean(1))
    started = time.perf_counter()
    probes: dict[str, Any] = {
        "linear": linear_probe(train_x, train_labels, test_x, test_labels, seed=args.seed),
        "knn": knn_probe(train_x, train_labels, test_x, test_labels, k=args.knn_k),
    }
    row: dict[str, Any] = {"model": name, "linear_accuracy": probes["linear"]["accuracy"],
                           "knn_accuracy": probes["knn"]["accuracy"], **extra}
    if args.low_shot_labels:
        low = low_shot_linear_probe(train_x, train_labels, test_x, test_labels, num_labels=args.low_shot_labels,
                                    seeds=[1000 * args.seed + draw for draw in range(args.low_shot_draws)])
        probes["low_shot_linear"], row["low_shot_accuracy"] = low, low["accuracy"]
    if args.attentive_epochs:
        attentive = attentive_probe(train_tokens, train_labels, test_tokens, test_labels, epochs=args.attentive_epochs,
                                    batch_size=args.attentive_batch_size, seed=args.seed)
        probes["attentive"], row["attentive_accuracy"] = attentive, attentive["accuracy"]
    row.update(probes=probes, feature_dim=int(train_x.shape[1]))
    logger.info("%s probed in %.1fs: %s", name, time.perf_counter() - started,
                {k: round(v, 4) for k, v in row.items() if isinstance(v, float)})
    return row


# ----------------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    import transformers

    return {"cpu": cpu_description(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "ijepa_hf": ijepa_hf.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def _plot(rows: Any, path: Path, title: str) -> str | None:
    try:
        return str(plot_training_curves(rows, path, title=title))
    except (ValueError, RuntimeError) as error:  # nothing to plot, or no matplotlib backend
        logger.warning("Could not plot %s: %s", path, error)
        return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described by ``args`` (see :func:`parse_args`); returns the results dict (also saved)."""
    torch.set_num_threads(args.threads)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    train, test = fashion_mnist_splits(args.fashion_mnist_dir, args.train_size, args.test_size)
    train_labels, test_labels = torch.tensor(train["label"]), torch.tensor(test["label"])
    machine = machine_info()
    logger.info("Fashion-MNIST %d train / %d test images; machine %s", len(train), len(test), machine)

    # The run's I-JEPA config, as pretrain() builds it from the same command line (MAE and random init use it too).
    config = build_config(parse_pretraining_args(pretraining_argv(args, output_dir / "data", output_dir / "ijepa")))
    encoder = config.encoder_config
    image_size, patch_size = _side(encoder.image_size), _side(encoder.patch_size)
    if args.probe_blocks > encoder.num_hidden_layers:
        raise SystemExit(f"--probe-blocks {args.probe_blocks} is more than the encoder's {encoder.num_hidden_layers} "
                         "blocks (--model-overrides sets its depth)")

    rows: list[dict[str, Any]] = []
    training: dict[str, dict[str, Any]] = {}

    def probe_model(name: str, features: Callable[..., torch.Tensor], extra: Mapping[str, Any]) -> None:
        tokens = args.attentive_epochs > 0
        train_x, test_x = features(train, tokens=tokens), features(test, tokens=tokens)
        if tokens:
            rows.append(probe_row(name, train_x, test_x, train_labels, test_labels, args, extra))
        else:  # without the attentive probe the pooled features are all the probes need
            rows.append(probe_row(name, train_x[:, None], test_x[:, None], train_labels, test_labels, args, extra))
        if args.probe_blocks > 1:  # a second row: the last blocks' pooled features (no attentive probe: tokens)
            pooled = features(train, blocks=args.probe_blocks), features(test, blocks=args.probe_blocks)
            no_attentive = argparse.Namespace(**{**vars(args), "attentive_epochs": 0})
            rows.append(probe_row(f"{name}, last {args.probe_blocks} blocks", pooled[0][:, None], pooled[1][:, None],
                                  train_labels, test_labels, no_attentive, extra))

    if "pixels" in args.methods:
        (train_flat, train_tokens), (test_flat, test_tokens) = (pixel_features(train, image_size, patch_size),
                                                                pixel_features(test, image_size, patch_size))
        rows.append(probe_row(ROW_NAMES["pixels"], train_tokens, test_tokens, train_labels, test_labels, args,
                              {"steps": None, "images_seen": None}, pooled=(train_flat, test_flat)))

    if "random" in args.methods:
        torch.manual_seed(args.seed)
        random_init = IJepaForPreTraining(config).eval()
        probe_model(ROW_NAMES["random"],
                    lambda data, tokens=False, blocks=1: ijepa_features(random_init, data, image_size, args,
                                                                        tokens=tokens, blocks=blocks),
                    {"steps": 0, "images_seen": 0})
        del random_init

    if "ijepa" in args.methods:
        data_dir = write_parquet_once(train, output_dir / "data")
        result = pretrain_ijepa(args, data_dir, output_dir / "ijepa")
        _plot(result.log_file, output_dir / "ijepa" / "training_curves.png",
              f"I-JEPA on Fashion-MNIST, {args.max_steps} steps of {args.batch_size}")
        training["ijepa"] = {"steps": result.global_step, "images_seen": result.global_step * args.batch_size,
                             "seconds": result.train_runtime_s, "images_per_s": result.images_per_s,
                             "final_loss": result.final_loss, "online_probe_seconds": result.online_probe_s}
        trained = IJepaForPreTraining.from_pretrained(result.output_dir).eval()
        extra = {"steps": result.global_step, "images_seen": result.global_step * args.batch_size}
        probe_model(ROW_NAMES["target"],
                    lambda data, tokens=False, blocks=1: ijepa_features(trained, data, image_size, args, tokens=tokens,
                                                                        blocks=blocks), extra)
        if not args.skip_context_encoder:
            probe_model(ROW_NAMES["context"],
                        lambda data, tokens=False, blocks=1: ijepa_features(trained, data, image_size, args, "context",
                                                                            tokens, blocks),
                        extra)
        del trained

    if "mae" in args.methods:
        torch.manual_seed(args.seed)
        mae = build_mae(config, args)
        training["mae"] = summary = train_mae(mae, train, image_size, args, output_dir / "mae")
        probe_model(ROW_NAMES["mae"],
                    lambda data, tokens=False, blocks=1: mae_features(mae, data, image_size, args, tokens, blocks),
                    {"steps": summary["steps"], "images_seen": summary["images_seen"]})
        del mae

    table = format_results_table(rows)
    header = (f"Fashion-MNIST: {args.max_steps} steps of {args.batch_size} ({args.max_steps * args.batch_size:,} "
              f"images) per method, {image_size} px, patch {patch_size}, ViT {encoder.hidden_size}x"
              f"{encoder.num_hidden_layers}, recipe {args.recipe}, {args.precision}; probes on {len(train)} train / "
              f"{len(test)} test images\nmachine: {machine['cpu']}, {machine['cpu_count']} CPUs, torch "
              f"{machine['torch']}, {machine['torch_threads']} threads, load average at start "
              f"{machine['load_average_at_start']}")
    results = {"task": "fashion-mnist", "header": header, "table": table, "rows": rows, "training": training,
               "machine": machine, "settings": dict(vars(args)), "ijepa_config": config.to_dict(),
               "command": " ".join(sys.argv)}
    path = output_dir / "fashion-mnist_results.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    print("\n" + header + "\n\n" + table + "\n")
    for name, summary in training.items():
        print(f"{name}: {summary['steps']} steps in {summary['seconds']:.0f}s, {summary['images_per_s']:.0f} "
              f"images/s, final loss {summary['final_loss']}")
    print(f"\nresults: {path}")
    return results


def _side(size: int | Sequence[int]) -> int:
    return int(size if isinstance(size, int) else size[0])


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def _methods(text: str) -> tuple[str, ...]:
    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"methods must be a comma-separated subset of {METHODS}, got {text!r}")
    return methods


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--methods", type=_methods, default=METHODS, help="comma-separated subset of " + ",".join(METHODS))
    add("--seed", type=int, default=0)
    add("--recipe", default="small", help="ijepa_hf.training.recipes: the predictor and the warm-up (both methods)")
    add("--model-overrides", default=DEFAULT_MODEL_OVERRIDES, help="the model, in --config_overrides language")
    add("--config-overrides", default="", help="more config fields, e.g. sigreg_weight=0.05 (I-JEPA only)")
    add("--budget-images", type=int, default=None, help=f"images per method (default {DEFAULT_BUDGET_IMAGES:,})")
    add("--max-steps", type=int, default=None, help="optimizer steps per method (instead of --budget-images)")
    add("--batch-size", type=int, default=128)
    add("--learning-rate", type=float, default=1e-3, help="MAE's peak learning rate (I-JEPA: pretrain's default)")
    add("--precision", choices=("bf16", "fp32"), default="bf16")
    add("--threads", type=int, default=os.cpu_count() or 1)
    add("--num-workers", type=int, default=0, help="data-loader workers of both trainings")
    add("--log-every", type=int, default=100)
    add("--online-probe-steps", type=int, default=None, help="pretrain's --online_probe_steps (0: off)")
    add("--mae-decoder-width", type=int, default=128)
    add("--mae-decoder-depth", type=int, default=1)
    add("--mae-decoder-heads", type=int, default=2)
    add("--mae-mask-ratio", type=float, default=0.75)
    add("--mae-norm-pix-loss", action="store_true")
    add("--mae-weight-decay", type=float, default=0.05)
    add("--train-size", type=int, default=None, help="first N training images (pretraining and probes)")
    add("--test-size", type=int, default=None, help="first N test images")
    add("--eval-batch-size", type=int, default=512)
    add("--knn-k", type=int, default=20)
    add("--probe-blocks", type=int, default=1,
        help="N > 1: a second row per encoder, its last N blocks' outputs pooled and concatenated (linear, k-NN, "
             "low-shot; DINO's linear evaluation)")
    add("--low-shot-labels", type=int, default=600, help="labels of the low-shot probe (0: skip)")
    add("--low-shot-draws", type=int, default=3)
    add("--attentive-epochs", type=int, default=10, help="0: skip the attentive probe")
    add("--attentive-batch-size", type=int, default=256)
    add("--skip-context-encoder", action="store_true")
    add("--fashion-mnist-dir", default=None)
    add("--output-dir", default="outputs/learning")
    add("--no-progress", dest="progress", action="store_false")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_steps is not None and args.budget_images is not None:
        parser.error("give one budget: --max-steps or --budget-images")
    if args.max_steps is None:
        images = args.budget_images if args.budget_images is not None else DEFAULT_BUDGET_IMAGES
        if images < args.batch_size:
            parser.error(f"--budget-images {images} is less than one batch of {args.batch_size}")
        args.max_steps = images // args.batch_size
    if args.probe_blocks < 1:
        parser.error(f"--probe-blocks must be >= 1, got {args.probe_blocks}")
    get_recipe(args.recipe)  # an unknown recipe fails here, naming the choices
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
