"""I-JEPA pretraining with Accelerate: the library behind ``examples/pretrain.py``.

:func:`pretrain` runs the official I-JEPA recipe (Assran et al., 2023) on one CPU, one GPU or many processes
(``accelerate launch``), with the command-line conventions of transformers' image-pretraining examples
(``run_mim_no_trainer.py`` / ``run_mae.py``) and without their known bugs (``--hub_model_id`` / ``--hub_token``
are defined; ``--resume_from_checkpoint latest`` works).

What one optimizer step does (official order, see ``ijepa_hf.training.schedules``):

1. the LR (warmup-cosine) and weight-decay (cosine, 0.04 -> 0.4) schedules advance, *before* the update;
2. forward (target encoder on the full image, context encoder on the context patches, predictor on every
   target block), smooth-L1 loss, backward, AdamW step over the official parameter groups;
3. the EMA target encoder is updated on the unwrapped model with the linearly increasing momentum.

Determinism and exact resume. Everything random in the data pipeline is a pure function of the seed and of
positions, never of a global RNG or of worker timing:

* the sample order of epoch ``e`` is a permutation seeded by ``(seed, e)`` (:class:`EpochShuffleSampler`);
* the random resized crop of sample ``i`` in epoch ``e`` uses a generator seeded by ``(seed, e, i)``;
* the masks of global batch ``k`` depend only on ``(seed, k)`` (``IJepaMaskCollator``; the loop calls
  ``collator.set_step`` with the global batch index at every epoch start and on resume).

So a run stopped at step ``n`` and resumed with ``--resume_from_checkpoint latest`` produces bitwise the same
weights as an uninterrupted run, whatever ``--num_workers`` is, and a ``P``-process run sees exactly the
images, crops and masks of a 1-process run with the same global batch (streaming datasets: the order is
deterministic for a fixed ``--num_workers`` only).

Bad data never kills a run: unreadable images are counted and skipped (``ijepa_hf.data.load_image``), any PIL
mode is converted to RGB, and a batch whose images are all bad becomes a zero-loss step (so that data-parallel
ranks stay in lock-step).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from ..configuration_ijepa_hf import IJepaPretrainingConfig, list_presets
from ..data import BadImageCounter, ProceduralShapes, PretrainTransform, load_image, load_image_dataset
from ..masking import IJepaMaskCollator
from .optim import build_optimizer
from .schedules import CosineWeightDecay, EMAMomentum, WarmupCosineLR

logger = logging.getLogger(__name__)

__all__ = [
    "PretrainingArguments",
    "PretrainingResult",
    "pretrain",
    "parse_args",
    "parse_config_overrides",
    "apply_config_overrides",
    "build_config",
    "find_latest_checkpoint",
    "collapse_statistics",
    "EpochShuffleSampler",
    "PretrainImageDataset",
    "PretrainIterableImageDataset",
    "MaskedBatchCollator",
    "TRAIN_LOG_NAME",
    "EMBEDDED_DATASET_NAME",
]

TRAIN_LOG_NAME = "train_log.jsonl"
EMBEDDED_DATASET_NAME = "procedural-shapes"
TRACKER_PROJECT_NAME = "ijepa_pretraining"
_CHECKPOINT_RE = re.compile(r"^step_(\d+)$")


# --------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------


def _help(text: str) -> dict[str, Any]:
    return {"help": text}


@dataclass
class PretrainingArguments:
    """Arguments of :func:`pretrain` (also the command line of ``examples/pretrain.py`` via ``HfArgumentParser``).

    Defaults follow the official I-JEPA configs where they exist (LR 1e-3 with start 2e-4 and final 1e-6, weight
    decay 0.04 -> 0.4, EMA 0.996 -> 1.0, warmup 40 of 300 epochs, random resized crop 0.3-1.0 only). Without any
    data argument the run uses the embedded procedural-shapes dataset (no download).
    """

    # ---- data
    dataset_name: str | None = field(default=None, metadata=_help(
        "Hub dataset name (e.g. 'cifar10') or a datasets builder ('imagefolder' together with --train_dir)."))
    dataset_config_name: str | None = field(default=None, metadata=_help("Configuration name of the Hub dataset."))
    train_dir: str | None = field(default=None, metadata=_help(
        "Local folder of images (read with the 'imagefolder' builder; class sub-folders are fine)."))
    image_column_name: str | None = field(default=None, metadata=_help(
        "Image column of the dataset (default: 'image', then 'img', then the first Image feature)."))
    dataset_split: str = field(default="train", metadata=_help("Split to train on."))
    streaming: bool = field(default=False, metadata=_help(
        "Stream the dataset (IterableDataset, nothing downloaded up front); needs --max_train_steps."))
    shuffle_buffer_size: int = field(default=1000, metadata=_help(
        "Shuffle buffer of a streamed dataset (0 disables shuffling)."))
    max_train_samples: int | None = field(default=None, metadata=_help("Keep only the first N training images."))
    embedded_num_images: int = field(default=4096, metadata=_help(
        "Size of the embedded procedural-shapes dataset used when no data argument is given."))
    cache_dir: str | None = field(default=None, metadata=_help("datasets / transformers cache directory."))
    crop_scale: str = field(default="0.3,1.0", metadata=_help(
        "Area range 'min,max' of the random resized crop (official 0.3,1.0)."))
    # ---- model
    config_name: str | None = field(default=None, metadata=_help(
        "A preset name (see ijepa_hf.list_presets()) or a path/repo id of a pretraining config. Default: "
        "IJepaPretrainingConfig() (ViT-B/16, 224 px)."))
    model_name_or_path: str | None = field(default=None, metadata=_help(
        "Continue from a saved pretraining model (local directory or Hub repo with context, target encoder and "
        "predictor)."))
    config_overrides: str | None = field(default=None, metadata=_help(
        "Config overrides 'a=1,b=2'; prefix 'encoder.' / 'predictor.' for the sub-configs, lists in brackets, "
        "e.g. 'encoder.hidden_size=192,predictor.num_hidden_layers=4,target_scale=[0.15,0.2]'."))
    image_size: int | None = field(default=None, metadata=_help(
        "Training resolution (overrides the encoder's and the predictor's image_size)."))
    mask_mode: str | None = field(default=None, metadata=_help(
        "Mask sampler: 'fixed' (default in the config: official sampler with its defects fixed) or 'official'."))
    # ---- output
    output_dir: str = field(default="outputs/pretrain", metadata=_help("Where checkpoints and the model go."))
    # ---- optimisation
    per_device_train_batch_size: int = field(default=64, metadata=_help("Batch size per process."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Micro-batches per optimizer step."))
    max_train_steps: int | None = field(default=None, metadata=_help(
        "Total optimizer steps; overrides --num_train_epochs."))
    num_train_epochs: int = field(default=1, metadata=_help("Epochs (ignored when --max_train_steps is set)."))
    learning_rate: float = field(default=1e-3, metadata=_help("Peak (reference) learning rate (official 1e-3)."))
    start_lr: float = field(default=2e-4, metadata=_help("Learning rate at the start of the warmup."))
    final_lr: float = field(default=1e-6, metadata=_help("Learning rate at the end of the cosine."))
    warmup_steps: int | None = field(default=None, metadata=_help("Warmup steps (overrides --warmup_ratio)."))
    warmup_ratio: float = field(default=40 / 300, metadata=_help(
        "Warmup as a fraction of all steps (official IN-1k: 40 of 300 epochs)."))
    weight_decay: float = field(default=0.04, metadata=_help("Initial weight decay."))
    final_weight_decay: float = field(default=0.4, metadata=_help("Final weight decay (cosine schedule)."))
    ema_momentum: str | None = field(default=None, metadata=_help(
        "EMA momentum 'start,end' of the target encoder (default: the config's, officially 0.996,1.0)."))
    max_grad_norm: float | None = field(default=None, metadata=_help(
        "Clip the gradient norm (the official recipe does not clip)."))
    adam_beta1: float = field(default=0.9, metadata=_help("AdamW beta1."))
    adam_beta2: float = field(default=0.999, metadata=_help("AdamW beta2."))
    mixed_precision: str | None = field(default=None, metadata=_help(
        "'no', 'fp16' or 'bf16' (official: bf16); default: what `accelerate launch`/config says."))
    gradient_checkpointing: bool = field(default=False, metadata=_help("Recompute activations in backward."))
    torch_compile: bool = field(default=False, metadata=_help("Compile the model with torch.compile (inductor)."))
    num_workers: int = field(default=0, metadata=_help("DataLoader worker processes."))
    seed: int = field(default=0, metadata=_help("Seed of the model init, data order, crops and masks."))
    # ---- checkpoints
    checkpointing_steps: str | None = field(default=None, metadata=_help(
        "Save the training state every N optimizer steps, or 'epoch' (to output_dir/step_<N>)."))
    checkpoints_total_limit: int | None = field(default=None, metadata=_help(
        "Keep only the newest N step_* checkpoints."))
    resume_from_checkpoint: str | None = field(default=None, metadata=_help(
        "A step_* folder to resume from, or 'latest' (the newest step_* in output_dir; starts fresh if none)."))
    # ---- logging
    with_tracking: bool = field(default=False, metadata=_help("Log metrics to trackers (see --report_to)."))
    report_to: str = field(default="tensorboard", metadata=_help(
        "Tracker(s) for --with_tracking: 'tensorboard', 'wandb', 'all', ... (comma-separated)."))
    logging_steps: int = field(default=10, metadata=_help(
        "Log (train_log.jsonl, trackers, progress bar) every N optimizer steps."))
    collapse_threshold: float = field(default=0.01, metadata=_help(
        "Warn when the batch std of the pooled, normalised target features falls below this (collapse)."))
    # ---- hub
    push_to_hub: bool = field(default=False, metadata=_help("Upload output_dir to the Hub at the end."))
    hub_model_id: str | None = field(default=None, metadata=_help(
        "Repo id for --push_to_hub (default: the name of output_dir)."))
    hub_token: str | None = field(default=None, metadata=_help("Hub token (also used to read Hub datasets)."))
    hub_private_repo: bool | None = field(default=None, metadata=_help("Create the Hub repo as private."))

    def __post_init__(self) -> None:
        def positive(name: str, allow_none: bool = False) -> None:
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name} must be a positive integer, got {value!r}")

        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
                     "logging_steps", "embedded_num_images"):
            positive(name)
        for name in ("max_train_steps", "max_train_samples", "checkpoints_total_limit"):
            positive(name, allow_none=True)
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"--warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"--warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if self.num_workers < 0:
            raise ValueError(f"--num_workers must be >= 0, got {self.num_workers}")
        if self.checkpointing_steps is not None:
            text = str(self.checkpointing_steps).strip()
            if text != "epoch" and not (text.isdigit() and int(text) > 0):
                raise ValueError(f"--checkpointing_steps must be a positive integer or 'epoch', got {text!r}")
            self.checkpointing_steps = text
        if self.mixed_precision is not None and self.mixed_precision not in ("no", "fp16", "bf16", "fp8"):
            raise ValueError(f"--mixed_precision must be one of no/fp16/bf16/fp8, got {self.mixed_precision!r}")
        if self.mask_mode is not None and self.mask_mode not in ("fixed", "official"):
            raise ValueError(f"--mask_mode must be 'fixed' or 'official', got {self.mask_mode!r}")
        if self.streaming and self.max_train_steps is None:
            raise ValueError("--streaming needs --max_train_steps (a streamed dataset has no length to count epochs)")
        if self.streaming and self.dataset_name is None and self.train_dir is None:
            raise ValueError("--streaming needs --dataset_name or --train_dir")
        if self.config_name is not None and self.model_name_or_path is not None:
            raise ValueError("give either --config_name (new model) or --model_name_or_path (continue one), not both")
        self.ema_range  # validates the string
        self.crop_range  # validates the string

    @staticmethod
    def _pair(text: str, name: str, low: float, high: float) -> tuple[float, float]:
        try:
            values = [float(v) for v in str(text).replace(" ", "").strip("()[]").split(",")]
        except ValueError:
            values = []
        if len(values) != 2 or not (low <= values[0] <= values[1] <= high):
            raise ValueError(f"--{name} must be 'min,max' with {low} <= min <= max <= {high}, got {text!r}")
        return values[0], values[1]

    @property
    def ema_range(self) -> tuple[float, float] | None:
        """``--ema_momentum`` as ``(start, end)``, or ``None`` (use the config's)."""
        return None if self.ema_momentum is None else self._pair(self.ema_momentum, "ema_momentum", 0.0, 1.0)

    @property
    def crop_range(self) -> tuple[float, float]:
        return self._pair(self.crop_scale, "crop_scale", 1e-6, 1.0)

    @property
    def uses_embedded_data(self) -> bool:
        """True when no data argument was given (the embedded procedural-shapes dataset is used)."""
        return self.dataset_name is None and self.train_dir is None


def parse_args(argv: Sequence[str] | None = None) -> PretrainingArguments:
    """Parse command-line arguments into :class:`PretrainingArguments`.

    A single ``.json`` argument is read as a file of arguments (transformers' example-script convention).
    """
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(PretrainingArguments)
    if len(argv) == 1 and argv[0].endswith(".json"):
        (args,) = parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    else:
        (args,) = parser.parse_args_into_dataclasses(args=argv)
    return args


# --------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------

_SUB_CONFIG_PREFIXES = {"encoder": "encoder_config", "predictor": "predictor_config"}
# Predictor fields that must follow the encoder unless set explicitly (the predictor lives on its grid and width).
_PREDICTOR_FOLLOWS_ENCODER = {"image_size": "image_size", "patch_size": "patch_size",
                              "encoder_hidden_size": "hidden_size"}


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets (so list values like ``[0.15,0.2]`` survive)."""
    parts, depth, current = [], 0, []
    for char in text:
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _parse_value(text: str) -> Any:
    """``true``/``false``/``none``, int, float, a bracketed list (JSON-ish) or a bare string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    if text[:1] in "[(" and text[-1:] in "])":
        return [_parse_value(v) for v in _split_top_level(text[1:-1])]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip("'\"")


def parse_config_overrides(text: str | None) -> dict[str, Any]:
    """Parse ``"a=1,encoder.hidden_size=192,target_scale=[0.15,0.2]"`` into ``{key: value}``.

    Values: ``true``/``false``, ``none``, ints, floats, bracketed lists, otherwise strings. Keys keep their
    ``encoder.`` / ``predictor.`` prefix (see :func:`apply_config_overrides`).
    """
    if not text:
        return {}
    overrides: dict[str, Any] = {}
    for item in _split_top_level(text):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or not value.strip():
            raise ValueError(f"config override {item!r} is not of the form key=value (in {text!r})")
        overrides[key] = _parse_value(value.strip())
    return overrides


def _coerce(value: Any, current: Any, key: str) -> Any:
    """Check ``value`` against the type of the current config value (like ``update_from_string``)."""
    if current is None or value is None:
        return value
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(current, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(current, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(current, (list, tuple)):
        if isinstance(value, list) and len(value) == len(current):
            return [_coerce(v, c, key) for v, c in zip(value, current)]
        if isinstance(current, list) and len(current) == 2 and isinstance(value, int):
            return value  # e.g. image_size=[224,224] may be overridden by a single int
    elif isinstance(current, str):
        return str(value)
    else:
        return value
    raise ValueError(f"config override {key}={value!r} does not match the type of the current value {current!r}")


def apply_config_overrides(
    config: IJepaPretrainingConfig, overrides: str | Mapping[str, Any] | None
) -> IJepaPretrainingConfig:
    """A new :class:`IJepaPretrainingConfig` with ``overrides`` applied (the input is not modified).

    Args:
        config: the base config.
        overrides: ``"a=1,b=2"`` (see :func:`parse_config_overrides`) or a dict. Keys are top-level fields
            (``num_target_blocks``, ``min_keep``, ``mask_mode``, ...) or ``encoder.<field>`` /
            ``predictor.<field>`` for the sub-configs. When the encoder's ``image_size``, ``patch_size`` or
            ``hidden_size`` change, the predictor follows unless its own value is overridden too.

    Raises:
        ValueError: unknown key (with close matches), a value of the wrong type, or an invalid resulting config.
    """
    items = parse_config_overrides(overrides) if isinstance(overrides, str) or overrides is None else dict(overrides)
    if not items:
        return config
    data = config.to_dict()
    for key, value in items.items():
        prefix, dot, name = key.partition(".")
        if dot:
            if prefix not in _SUB_CONFIG_PREFIXES:
                raise ValueError(f"unknown config prefix {prefix!r} in {key!r}; use 'encoder.' or 'predictor.'")
            target, label = data[_SUB_CONFIG_PREFIXES[prefix]], f"{prefix}."
        else:
            target, label, name = data, "", key
        if name not in target or name.endswith("_config"):
            valid = sorted(k for k in target if not k.startswith("_") and not k.endswith("_config"))
            close = difflib.get_close_matches(name, valid, n=3)
            hint = f" Did you mean {', '.join(label + c for c in close)}?" if close else ""
            raise ValueError(
                f"unknown config key {key!r}.{hint} Valid {label or 'top-level '}keys: {', '.join(valid)}"
                + ("" if dot else "; sub-config keys take an 'encoder.' or 'predictor.' prefix.")
            )
        target[name] = _coerce(value, target[name], key)
    encoder, predictor = data["encoder_config"], data["predictor_config"]
    for pred_key, enc_key in _PREDICTOR_FOLLOWS_ENCODER.items():
        if f"encoder.{enc_key}" in items and f"predictor.{pred_key}" not in items:
            predictor[pred_key] = encoder[enc_key]
    if "encoder.intermediate_size" not in items and "encoder.hidden_size" in items:
        encoder["intermediate_size"] = None  # re-derive 4 * hidden_size rather than keep the old width
    if "predictor.intermediate_size" not in items and "predictor.hidden_size" in items:
        predictor["intermediate_size"] = None
    return IJepaPretrainingConfig.from_dict(data)


def build_config(args: PretrainingArguments) -> IJepaPretrainingConfig:
    """The pretraining config: preset / file / repo (``--config_name``), a saved model's
    (``--model_name_or_path``) or the default, then ``--config_overrides``, ``--image_size``, ``--mask_mode``
    and ``--ema_momentum``."""
    if args.model_name_or_path is not None:
        config = IJepaPretrainingConfig.from_pretrained(args.model_name_or_path, cache_dir=args.cache_dir,
                                                        token=args.hub_token)
    elif args.config_name is None:
        config = IJepaPretrainingConfig()
    elif args.config_name in list_presets():
        config = IJepaPretrainingConfig.from_preset(args.config_name)
    else:
        try:
            config = IJepaPretrainingConfig.from_pretrained(args.config_name, cache_dir=args.cache_dir,
                                                            token=args.hub_token)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"--config_name {args.config_name!r} is neither a preset ({', '.join(list_presets())}) nor a "
                f"loadable config path/repo: {error}"
            ) from error
    overrides = parse_config_overrides(args.config_overrides)
    if args.image_size is not None:
        overrides.setdefault("encoder.image_size", args.image_size)
    if args.mask_mode is not None:
        overrides.setdefault("mask_mode", args.mask_mode)
    if args.ema_range is not None:
        overrides.setdefault("ema_momentum", list(args.ema_range))
    return apply_config_overrides(config, overrides)


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def _mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence hashing: nearby inputs give unrelated streams)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1, np.uint64)[0]) >> 1


class EpochShuffleSampler(Sampler[int]):
    """A random permutation per epoch that depends only on ``(seed, epoch)``.

    Unlike ``RandomSampler`` it consumes no global RNG state, so the order survives a resume and is the same
    for any number of processes (Accelerate shards the batches of this order across ranks).
    """

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch, 0x5A3))
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


class _SeededTransform:
    """The pretraining transform with its own generator, reseeded for every sample (crops depend on position,
    not on which worker or process draws them)."""

    def __init__(self, image_size: int, crop_scale: tuple[float, float], seed: int) -> None:
        self.generator = torch.Generator()
        self.transform = PretrainTransform(image_size, crop_scale=crop_scale, generator=self.generator)
        self.seed = int(seed)
        self.epoch = 0

    def __call__(self, image: Any, *position: int) -> torch.Tensor:
        self.generator.manual_seed(_mix_seed(self.seed, self.epoch, *position))
        return self.transform(image)


class _CroppedImageSource:
    """What both pretraining datasets share: an image source, the bad-image counter and the seeded crop."""

    def __init__(self, source: Any, image_size: int, *, image_key: str = "image",
                 crop_scale: tuple[float, float] = (0.3, 1.0), counter: BadImageCounter | None = None,
                 seed: int = 0) -> None:
        self.source = source
        self.image_key = image_key
        self.counter = counter if counter is not None else BadImageCounter()
        self.transform = _SeededTransform(image_size, crop_scale, seed)

    def set_epoch(self, epoch: int) -> None:
        self.transform.epoch = int(epoch)


class PretrainImageDataset(_CroppedImageSource, Dataset):
    """Map-style pretraining dataset: ``source[i][image_key]`` -> ``{"pixel_values": [3, S, S]}`` or ``None``.

    ``source`` is anything indexable whose items are dicts holding an image (a PIL image, a path, bytes or a
    ``datasets`` ``{"bytes", "path"}`` dict): a ``datasets.Dataset`` with an ``Image(decode=False)`` column or
    :class:`~ijepa_hf.data.ProceduralShapes`. Unreadable images (and any error reading the row) return ``None``
    and are counted in ``counter``; the crop of item ``i`` in epoch ``e`` is seeded by ``(seed, e, i)``.
    """

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor] | None:
        try:
            item = self.source[index][self.image_key]
        except Exception as error:  # noqa: BLE001 - a broken row must not stop a long run
            self.counter.add(f"item {index}", error)
            return None
        image = load_image(item, counter=self.counter)
        return None if image is None else {"pixel_values": self.transform(image, index)}


class PretrainIterableImageDataset(_CroppedImageSource, IterableDataset):
    """Streaming counterpart of :class:`PretrainImageDataset`: bad rows are skipped (counted), crops are seeded
    by ``(seed, epoch, worker, position)``. ``set_epoch`` is forwarded to the source (HF shuffling)."""

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        for position, row in enumerate(self.source):  # HF IterableDatasets shard themselves over workers
            image = load_image(row[self.image_key], counter=self.counter)
            if image is not None:
                yield {"pixel_values": self.transform(image, worker, position)}


class MaskedBatchCollator:
    """Drop bad (``None``) examples, then collate with the mask collator.

    A batch with no good example returns ``None`` but still consumes its mask index, so the masks of later
    batches do not shift (the mask stream stays a function of the batch position).
    """

    def __init__(self, mask_collator: IJepaMaskCollator) -> None:
        self.mask_collator = mask_collator

    def set_step(self, step: int) -> None:
        """Forwarded to the mask collator (so step-aligning hooks can treat both alike)."""
        self.mask_collator.set_step(step)

    def __call__(self, examples: list[Any]) -> dict[str, torch.Tensor] | None:
        good = [example for example in examples if example is not None and example.get("pixel_values") is not None]
        if not good:
            self.mask_collator.sample_masks(1)  # advance the mask stream; result unused
            return None
        return self.mask_collator(good)


@dataclass
class _TrainData:
    dataset: Dataset | IterableDataset
    sampler: EpochShuffleSampler | None
    description: str  # for logs and the model card
    hub_dataset: str | None  # Hub dataset id for the card metadata
    num_images: int | None


def _build_train_data(args: PretrainingArguments, image_size: int, counter: BadImageCounter) -> _TrainData:
    common = dict(image_size=image_size, crop_scale=args.crop_range, counter=counter, seed=args.seed)
    if args.uses_embedded_data:
        num = min(args.embedded_num_images, args.max_train_samples or args.embedded_num_images)
        # Rendered at the training resolution; the data seed is fixed so that --seed varies only the training.
        source = ProceduralShapes(num, image_size=image_size, seed=0)
        dataset = PretrainImageDataset(source, **common)
        return _TrainData(dataset, EpochShuffleSampler(num, args.seed),
                          f"{EMBEDDED_DATASET_NAME} (embedded, {num} images at {image_size}px)", None, num)
    source = load_image_dataset(
        dataset_name=args.dataset_name, train_dir=args.train_dir, streaming=args.streaming,
        image_column=args.image_column_name, split=args.dataset_split, dataset_config_name=args.dataset_config_name,
        cache_dir=args.cache_dir, token=args.hub_token, max_samples=args.max_train_samples, decode=False,
    )
    name = args.dataset_name if args.dataset_name not in (None, "imagefolder") else None
    description = name or f"image folder {args.train_dir}"
    if args.streaming:
        if args.shuffle_buffer_size > 0:
            source = source.shuffle(seed=args.seed, buffer_size=args.shuffle_buffer_size)
        return _TrainData(PretrainIterableImageDataset(source, **common), None, f"{description} (streamed)",
                          name, None)
    return _TrainData(PretrainImageDataset(source, **common), EpochShuffleSampler(len(source), args.seed),
                      f"{description} ({len(source)} images)", name, len(source))


# --------------------------------------------------------------------------------------------------------------
# Checkpoints, logging helpers
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Progress:
    """Checkpointed loop position (registered with ``accelerator.register_for_checkpointing``)."""

    completed_steps: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    batches_seen: int = 0  # micro-batches consumed in the whole run = index of the next global batch's masks
    images_seen: int = 0  # good images consumed by this process

    def state_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        for key, value in state.items():
            if hasattr(self, key):
                setattr(self, key, int(value))


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The ``step_<N>`` folder of ``output_dir`` with the largest ``N`` (``None`` if there is none)."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name))]
    return max(found)[1] if found else None


def _prune_checkpoints(output_dir: Path, keep: int) -> None:
    found = sorted((int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CHECKPOINT_RE.match(p.name)))
    for _, path in found[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


@torch.no_grad()
def collapse_statistics(output: Any) -> dict[str, float]:
    """Representation-collapse signals of one forward pass.

    * ``target_std``: std over the batch of the mean-pooled, LayerNorm'ed target-encoder features, averaged
      over dimensions. It goes to 0 when every image gets the same embedding (complete collapse), also when
      features only encode patch position.
    * ``target_token_std`` / ``pred_std``: std over all target tokens of the targets and of the predictions
      (averaged over dimensions); predictions much narrower than targets mean the predictor regresses to the mean.
    """
    hidden = output.target_hidden_state.float()
    pooled = F.layer_norm(hidden, hidden.shape[-1:]).mean(1)
    targets = output.targets.float().flatten(0, -2)
    predictions = output.predictions.float().flatten(0, -2)
    nan = float("nan")
    return {
        "target_std": pooled.std(0).mean().item() if pooled.shape[0] > 1 else nan,
        "target_token_std": targets.std(0).mean().item() if targets.shape[0] > 1 else nan,
        "pred_std": predictions.std(0).mean().item() if predictions.shape[0] > 1 else nan,
    }


def _tracker_config(args: PretrainingArguments, extra: Mapping[str, Any]) -> dict[str, Any]:
    """Flat hparams for trackers (TensorBoard accepts only int/float/str/bool)."""
    values = {**dataclasses.asdict(args), **extra}
    values.pop("hub_token", None)  # never write a secret into logs
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()}


def _truncate_log(path: Path, last_step: int) -> None:
    """Drop rows logged after ``last_step`` by an interrupted run (they are logged again after a resume)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line).get("step", 0) <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


# --------------------------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------------------------


@dataclass
class PretrainingResult:
    """What :func:`pretrain` returns (on every process; paths are those written by the main process)."""

    final_loss: float | None
    global_step: int
    total_steps: int
    epochs_completed: float
    output_dir: str
    encoder_dir: str
    log_file: str
    bad_images: int
    images_per_s: float
    train_runtime_s: float
    resumed_from: str | None = None
    hub_url: str | None = None
    # The trained (unwrapped) model, for in-process use, e.g. checks in a notebook; not part of to_dict().
    model: Any = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}


# --------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------


def pretrain(args: PretrainingArguments) -> PretrainingResult:
    """Run I-JEPA pretraining as described in the module docstring; returns a :class:`PretrainingResult`.

    Works under plain ``python`` (one process) and ``accelerate launch`` (DDP, FSDP, DeepSpeed configs; see
    ``docs/distributed.md``). Writes to ``args.output_dir``: ``train_log.jsonl``, ``step_<N>/`` checkpoints,
    TensorBoard logs (with ``--with_tracking``), and at the end the pretraining model (``config.json``,
    ``model.safetensors``, ``preprocessor_config.json``, ``README.md``) plus ``encoder/`` (the target encoder
    as a standalone ``IJepaEncoderModel`` with its image processor and card).
    """
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import DistributedType, set_seed

    from .compilation import configure_inductor_for_variable_masks
    from .cpu_allocator import keep_freed_memory_for_reuse

    output_dir = Path(args.output_dir)
    if args.torch_compile:
        configure_inductor_for_variable_masks()
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=[t.strip() for t in args.report_to.split(",")] if args.with_tracking else None,
        project_dir=str(output_dir),
        # Each rank collates its own rows of the global batch (the mask collator knows its rank); dispatching
        # would run the collator once on rank 0 with the wrong batch size.
        dataloader_config=DataLoaderConfiguration(dispatch_batches=False, split_batches=False),
        dynamo_backend="inductor" if args.torch_compile else None,
    )
    _configure_logging(accelerator.is_main_process)
    if accelerator.device.type == "cpu":
        keep_freed_memory_for_reuse()
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:
        # Accelerate only builds a CPU process group when asked to use the CPU; otherwise every launched process
        # would train alone and all of them would write to the same output_dir.
        raise RuntimeError(
            f"{launched} processes were launched (WORLD_SIZE={launched}) but Accelerate set up no process group. "
            "On a machine without GPUs set ACCELERATE_USE_CPU=1 for data-parallel CPU training (gloo), e.g. "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ...` (see docs/distributed.md)."
        )
    logger.info("Accelerator: %s", accelerator.state)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    # ---- model (same init on every rank: seeded before construction)
    set_seed(args.seed)
    config = build_config(args)
    model = _build_model(args, config)
    if args.gradient_checkpointing:
        # transformers 5.x renamed the method (the old name warns and goes away in v6).
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    image_size = config.encoder_config.image_size
    if not isinstance(image_size, int):
        if image_size[0] != image_size[1]:
            raise ValueError(f"only square training images are supported, got image_size {image_size}")
        image_size = image_size[0]

    # ---- data
    counter = BadImageCounter()
    data = _build_train_data(args, image_size, counter)
    mask_collator = IJepaMaskCollator.from_config(
        config, seed=args.seed, num_processes=accelerator.num_processes, process_index=accelerator.process_index
    )
    dataloader = DataLoader(
        data.dataset, batch_size=args.per_device_train_batch_size, sampler=data.sampler, drop_last=True,
        collate_fn=MaskedBatchCollator(mask_collator), num_workers=args.num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )
    optimizer = build_optimizer(
        {"encoder": model.context_encoder, "predictor": model.predictor}, lr=args.learning_rate,
        weight_decay=args.weight_decay, betas=(args.adam_beta1, args.adam_beta2),
    )
    model, optimizer, dataloader = accelerator.prepare(model, optimizer, dataloader)

    # ---- step counts (after prepare: the dataloader length is per process)
    sized = data.num_images is not None
    batches_per_epoch = len(dataloader) if sized else None
    if sized and batches_per_epoch == 0:
        raise ValueError(
            f"{data.num_images} images are fewer than one global batch ({args.per_device_train_batch_size} x "
            f"{accelerator.num_processes} processes); lower --per_device_train_batch_size or add data"
        )
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps) if sized else None
    total_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(total_steps / steps_per_epoch) if sized else None
    warmup_steps = args.warmup_steps if args.warmup_steps is not None else int(args.warmup_ratio * total_steps)
    warmup_steps = min(warmup_steps, total_steps)

    lr_schedule = WarmupCosineLR(optimizer, warmup_steps, total_steps, args.start_lr, args.learning_rate,
                                 args.final_lr)
    wd_schedule = CosineWeightDecay(optimizer, total_steps, args.weight_decay, args.final_weight_decay)
    ema_start, ema_end = config.ema_momentum
    ema_schedule = EMAMomentum(total_steps, ema_start, ema_end)
    progress = _Progress()
    accelerator.register_for_checkpointing(lr_schedule, wd_schedule, ema_schedule, mask_collator, progress)

    # ---- resume
    resumed_from = _resolve_resume(args.resume_from_checkpoint, output_dir)
    if resumed_from is not None:
        logger.info("Resuming from %s", resumed_from)
        accelerator.load_state(str(resumed_from))
        if sized and progress.batch_in_epoch >= batches_per_epoch:
            progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
    log_path = output_dir / TRAIN_LOG_NAME
    if accelerator.is_main_process:
        if resumed_from is None:
            log_path.unlink(missing_ok=True)
        else:
            _truncate_log(log_path, progress.completed_steps)

    global_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    run_info = {"total_steps": total_steps, "warmup_steps": warmup_steps, "global_batch_size": global_batch,
                "num_processes": accelerator.num_processes, "data": data.description,
                "mixed_precision": accelerator.mixed_precision}
    if args.with_tracking:
        accelerator.init_trackers(TRACKER_PROJECT_NAME, _tracker_config(args, run_info))
    logger.info("***** Running I-JEPA pretraining *****")
    logger.info("  Data = %s", data.description)
    logger.info("  Model = %s parameters (%s trainable)", f"{_unwrap(accelerator, model).num_parameters():,}",
                f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,}")
    logger.info("  Batch per device = %d, processes = %d, accumulation = %d, global batch = %d",
                args.per_device_train_batch_size, accelerator.num_processes, args.gradient_accumulation_steps,
                global_batch)
    logger.info("  Optimizer steps = %d (warmup %d), epochs = %s, starting at step %d", total_steps, warmup_steps,
                num_epochs if sized else "streamed", progress.completed_steps)
    logger.info("  Masks: %r", mask_collator)

    # ---- train
    unwrapped = _unwrap(accelerator, model)
    step_runner = _StepRunner(accelerator, model, optimizer, lr_schedule, wd_schedule, args.max_grad_norm,
                              mask_collator, config)
    reporter = _Reporter(accelerator, args, log_path, total_steps, progress.completed_steps)
    start_time, start_images = time.perf_counter(), progress.images_seen
    good_batches = 0  # batches with at least one readable image, in this invocation
    model.train()
    while progress.completed_steps < total_steps and (not sized or progress.epoch < num_epochs):
        for source in (data.sampler, data.dataset):
            if hasattr(source, "set_epoch"):
                source.set_epoch(progress.epoch)
        # Masks are indexed by the global batch number; workers cannot report back, so set it explicitly.
        mask_collator.set_step(progress.batches_seen)
        epoch_loader = (accelerator.skip_first_batches(dataloader, progress.batch_in_epoch)
                        if progress.batch_in_epoch else dataloader)
        # Accelerate's loaders call set_epoch(<their own iteration counter>) when iterated; a skip-loader made on
        # resume starts that counter at 0, so pin it to the real epoch.
        epoch_loader.set_epoch(progress.epoch)
        for batch in epoch_loader:
            progress.batch_in_epoch += 1
            progress.batches_seen += 1
            step_out = step_runner(batch, want_stats=reporter.is_log_step(progress.completed_steps + 1))
            progress.images_seen += step_out.num_images
            good_batches += step_out.loss is not None
            reporter.add(step_out)
            if not accelerator.sync_gradients:
                continue
            momentum = ema_schedule.step()
            unwrapped.update_target_encoder(momentum)
            progress.completed_steps += 1
            step = progress.completed_steps
            epoch = progress.epoch + (progress.batch_in_epoch / batches_per_epoch if sized else 0)
            reporter.step_done(step, epoch=epoch, lr=lr_schedule.value, wd=wd_schedule.value, momentum=momentum)
            if args.checkpointing_steps not in (None, "epoch") and step % int(args.checkpointing_steps) == 0:
                _save_checkpoint(accelerator, output_dir, step, args.checkpoints_total_limit)
            if step >= total_steps:
                break
        else:  # the epoch ran to its end
            # Without readable images the run would only make zero-loss steps (forever, if streamed).
            _require_good_batches(accelerator, good_batches, data.description, counter)
            progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
            if args.checkpointing_steps == "epoch":
                _save_checkpoint(accelerator, output_dir, progress.completed_steps, args.checkpoints_total_limit)
            continue
        _require_good_batches(accelerator, good_batches, data.description, counter)
        break
    reporter.close()
    runtime = time.perf_counter() - start_time
    images_per_s = (progress.images_seen - start_images) * accelerator.num_processes / max(runtime, 1e-9)

    # ---- bad images (summed over ranks; the counter also sees DataLoader workers)
    bad = int(accelerator.reduce(torch.tensor([counter.count], device=accelerator.device), "sum").item())
    if bad:
        logger.warning("Skipped %d unreadable image(s) during training: %s", bad, counter)
    else:
        logger.info("No unreadable images.")

    # ---- save
    final_loss = reporter.final_loss
    training_summary = _training_summary(args, config, data, run_info, progress, final_loss, bad, images_per_s)
    encoder_dir = output_dir / "encoder"
    _save_final(accelerator, model, config, args, output_dir, encoder_dir, training_summary, data.hub_dataset,
                sharded=accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED))
    hub_url = _push(args, output_dir) if args.push_to_hub and accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    if args.with_tracking:
        accelerator.end_training()
    logger.info("Done: %d steps in %.1fs (%.1f images/s), final loss %s, model in %s", progress.completed_steps,
                runtime, images_per_s, "n/a" if final_loss is None else f"{final_loss:.4f}", output_dir)
    return PretrainingResult(
        final_loss=final_loss, global_step=progress.completed_steps, total_steps=total_steps,
        epochs_completed=(progress.batches_seen / batches_per_epoch) if sized else float(progress.epoch),
        output_dir=str(output_dir), encoder_dir=str(encoder_dir), log_file=str(log_path), bad_images=bad,
        images_per_s=images_per_s, train_runtime_s=runtime,
        resumed_from=None if resumed_from is None else str(resumed_from), hub_url=hub_url,
        model=_unwrap(accelerator, model),
    )


# --------------------------------------------------------------------------------------------------------------
# Loop pieces
# --------------------------------------------------------------------------------------------------------------


def _configure_logging(is_main: bool) -> None:
    """Quiet datasets/transformers on non-main processes (the example-script convention)."""
    import datasets
    import transformers

    if logging.getLogger().handlers == []:
        logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                            level=logging.INFO if is_main else logging.ERROR)
    logger.setLevel(logging.INFO if is_main else logging.ERROR)
    if is_main:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()


def _build_model(args: PretrainingArguments, config: IJepaPretrainingConfig) -> Any:
    from ..modeling_ijepa_hf import IJepaPretrainingModel

    if args.model_name_or_path is None:
        return IJepaPretrainingModel(config)
    return IJepaPretrainingModel.from_pretrained(args.model_name_or_path, config=config, cache_dir=args.cache_dir,
                                                 token=args.hub_token)


def _unwrap(accelerator: Any, model: Any) -> Any:
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def _resolve_resume(value: str | None, output_dir: Path) -> Path | None:
    if not value:
        return None
    if value == "latest":
        found = find_latest_checkpoint(output_dir)
        if found is None:
            logger.warning("--resume_from_checkpoint latest: no step_* checkpoint in %s, starting from scratch",
                           output_dir)
        return found
    path = Path(value)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {value!r} is not a checkpoint folder")
    return path


def _require_good_batches(accelerator: Any, good_batches: int, description: str, counter: BadImageCounter) -> None:
    """Raise (on every rank alike) when no rank has had a single readable image so far."""
    if accelerator.reduce(torch.tensor([good_batches], device=accelerator.device), "sum").item() == 0:
        raise RuntimeError(f"the training data ({description}) yielded no readable image in a whole epoch "
                           f"or run ({counter}): check the data and --image_column_name")


def _save_checkpoint(accelerator: Any, output_dir: Path, step: int, total_limit: int | None) -> None:
    path = output_dir / f"step_{step}"
    accelerator.save_state(str(path))  # every rank must call it (sharded states)
    if accelerator.is_main_process and total_limit:
        _prune_checkpoints(output_dir, total_limit)
    logger.info("Saved checkpoint %s", path)


@dataclass
class _StepOutput:
    loss: float | None  # None for a batch without good images
    num_images: int
    stats: dict[str, float] | None
    context_patches: int
    target_patches: int


class _StepRunner:
    """One micro-batch: forward, backward, and (on the last micro-batch of a step) schedules + optimizer step.

    Official order: the LR / weight-decay schedules advance before the update. A batch whose images were all
    unreadable still runs a forward/backward on a dummy image with the loss multiplied by 0, so data-parallel
    ranks keep issuing the same collectives.
    """

    def __init__(self, accelerator: Any, model: Any, optimizer: Any, lr_schedule: WarmupCosineLR,
                 wd_schedule: CosineWeightDecay, max_grad_norm: float | None, mask_collator: IJepaMaskCollator,
                 config: IJepaPretrainingConfig) -> None:
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.lr_schedule, self.wd_schedule, self.max_grad_norm = lr_schedule, wd_schedule, max_grad_norm
        self.mask_collator, self.config = mask_collator, config
        self._dummy: dict[str, torch.Tensor] | None = None

    def _dummy_batch(self) -> dict[str, torch.Tensor]:
        if self._dummy is None:
            context, targets = self.mask_collator.sample_masks(1, batch_index=0)
            height, width = self.mask_collator.image_size
            pixels = torch.zeros(1, self.config.encoder_config.num_channels, height, width)
            self._dummy = {k: v.to(self.accelerator.device) for k, v in
                           {"pixel_values": pixels, "context_mask": context, "target_masks": targets}.items()}
        return self._dummy

    def __call__(self, batch: dict[str, torch.Tensor] | None, want_stats: bool) -> _StepOutput:
        real = batch is not None
        inputs = batch if real else self._dummy_batch()
        accelerator = self.accelerator
        with accelerator.accumulate(self.model):
            output = self.model(**inputs)  # prepare() already wrapped forward in autocast for mixed precision
            loss = output.loss if real else output.loss * 0.0
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                self.lr_schedule.step()
                self.wd_schedule.step()
                if self.max_grad_norm:
                    accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return _StepOutput(
            loss=loss.detach().float().item() if real else None,
            num_images=int(inputs["pixel_values"].shape[0]) if real else 0,
            stats=collapse_statistics(output) if (want_stats and real) else None,
            context_patches=int(inputs["context_mask"].shape[1]),
            target_patches=int(inputs["target_masks"].shape[-1]),
        )


class _LogWindow:
    """Accumulates micro-batch results between two logged steps; :meth:`flush` reduces them over ranks."""

    _STATS = ("target_std", "target_token_std", "pred_std")

    def __init__(self) -> None:
        self._reset()
        self._time = time.perf_counter()

    def _reset(self) -> None:
        self.loss_sum, self.loss_count, self.images, self.context, self.target, self.batches = 0.0, 0, 0, 0, 0, 0
        self.stats: dict[str, float] | None = None
        self.skipped = 0

    def add(self, out: _StepOutput) -> None:
        self.batches += 1
        self.context += out.context_patches
        self.target += out.target_patches
        self.images += out.num_images
        if out.loss is None:
            self.skipped += 1
        else:
            self.loss_sum += out.loss
            self.loss_count += 1
        if out.stats is not None:
            self.stats = out.stats

    def flush(self, accelerator: Any, **fields: Any) -> dict[str, Any] | None:
        """Reduce over ranks (every rank must call this) and return the row to log (``None`` if empty)."""
        stats = self.stats or {}
        values = [self.loss_sum, self.loss_count, self.images, self.skipped,
                  *(stats.get(k, float("nan")) for k in self._STATS)]
        summed = accelerator.reduce(torch.tensor(values, dtype=torch.float64, device=accelerator.device), "sum")
        summed = summed.tolist()
        if summed[1] == 0:
            # No good batch on any rank since the last row: keep accumulating (the skipped-batch count included)
            # into the next row rather than logging a row without a loss. Every rank sees the same sum.
            return None
        now = time.perf_counter()
        elapsed, self._time = now - self._time, now
        batches, context, target = self.batches, self.context, self.target
        self._reset()
        processes = accelerator.num_processes
        row = {**fields, "loss": summed[0] / summed[1], "images_per_s": summed[2] / max(elapsed, 1e-9)}
        row.update({k: v / processes for k, v in zip(self._STATS, summed[4:])})
        row.update(context_patches=context / max(batches, 1), target_patches=target / max(batches, 1),
                   skipped_batches=int(summed[3]))
        return row


class _Reporter:
    """Progress bar, logged rows (trackers + ``train_log.jsonl``) and the collapse warning."""

    def __init__(self, accelerator: Any, args: PretrainingArguments, log_path: Path, total_steps: int,
                 initial_step: int) -> None:
        from tqdm.auto import tqdm

        self.accelerator, self.args, self.log_path, self.total_steps = accelerator, args, log_path, total_steps
        self.window = _LogWindow()
        self.final_loss: float | None = None
        self.collapse_warned = False
        self.bar = tqdm(total=total_steps, initial=initial_step, desc="pretraining", dynamic_ncols=True,
                        disable=not accelerator.is_local_main_process)

    def is_log_step(self, step: int) -> bool:
        return step % self.args.logging_steps == 0 or step == self.total_steps

    def add(self, out: _StepOutput) -> None:
        self.window.add(out)

    def step_done(self, step: int, **fields: Any) -> None:
        """Called on every rank after each optimizer step (the log reduction is a collective)."""
        self.bar.update(1)
        if not self.is_log_step(step):
            return
        row = self.window.flush(self.accelerator, step=step, **fields)
        if row is None:
            return
        self.final_loss = float(row["loss"])
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
        if self.args.with_tracking:
            self.accelerator.log({f"train/{k}": v for k, v in row.items() if k != "step" and v == v}, step=step)
        if self.accelerator.is_main_process:
            clean = {k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}
            with self.log_path.open("a") as f:
                f.write(json.dumps(clean) + "\n")
        std = row.get("target_std", float("nan"))
        if std == std and std < self.args.collapse_threshold and not self.collapse_warned:
            self.collapse_warned = True
            logger.warning(
                "Possible representation collapse at step %d: target_std=%.2e < %.2e (the target encoder maps "
                "different images to nearly the same features). Consider a lower LR, a longer warmup or a higher "
                "EMA momentum.", step, std, self.args.collapse_threshold)

    def close(self) -> None:
        self.bar.close()


def _training_summary(args: PretrainingArguments, config: IJepaPretrainingConfig, data: _TrainData,
                      run_info: Mapping[str, Any], progress: _Progress, final_loss: float | None, bad: int,
                      images_per_s: float) -> dict[str, Any]:
    """The recipe as recorded in the model cards."""
    return {
        "data": data.description,
        "image_size": config.encoder_config.image_size,
        "augmentations": f"random resized crop {args.crop_range}, ImageNet normalisation (official recipe)",
        "steps": f"{progress.completed_steps} of {run_info['total_steps']}",
        "batch_size": (f"{run_info['global_batch_size']} ({args.per_device_train_batch_size} per device x "
                       f"{run_info['num_processes']} processes x {args.gradient_accumulation_steps} accumulation)"),
        "masks": {"num_target_blocks": config.num_target_blocks, "target_scale": config.target_scale,
                  "target_aspect_ratio": config.target_aspect_ratio, "context_scale": config.context_scale,
                  "min_keep": config.min_keep, "allow_overlap": config.allow_overlap, "mode": config.mask_mode},
        "optimizer": f"AdamW (betas {args.adam_beta1}, {args.adam_beta2}), official parameter groups",
        "lr_schedule": (f"linear warmup {args.start_lr:g} -> {args.learning_rate:g} over "
                        f"{run_info['warmup_steps']} steps, cosine to {args.final_lr:g}"),
        "wd_schedule": f"cosine {args.weight_decay:g} -> {args.final_weight_decay:g}",
        "ema_schedule": f"linear {config.ema_momentum[0]:g} -> {config.ema_momentum[1]:g}",
        "mixed_precision": run_info["mixed_precision"],
        "seed": args.seed,
        "final_loss": "n/a" if final_loss is None else round(final_loss, 5),
        "unreadable_images_skipped": bad,
        "throughput": f"{images_per_s:.1f} images/s",
    }


def _save_final(accelerator: Any, model: Any, config: IJepaPretrainingConfig, args: PretrainingArguments,
                output_dir: Path, encoder_dir: Path, training: Mapping[str, Any], hub_dataset: str | None,
                sharded: bool) -> None:
    """Save the pretraining model, the target encoder, image processors and model cards (main process)."""
    from .. import make_image_processor
    from ..hub import default_loading_code, make_model_card, summarize_config
    from ..modeling_ijepa_hf import IJepaEncoderModel

    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # gathers sharded (FSDP/DeepSpeed) weights; all ranks call it
    if not accelerator.is_main_process:
        return
    unwrapped = _unwrap(accelerator, model)
    unwrapped.save_pretrained(output_dir, state_dict=state_dict, save_function=accelerator.save)
    if sharded:  # the unwrapped modules hold shards: rebuild the encoder from the gathered weights
        prefix = "target_encoder."
        encoder = IJepaEncoderModel(config.encoder_config)
        encoder.load_state_dict({k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)})
    else:
        encoder = unwrapped.export_encoder("target")
    encoder.save_pretrained(encoder_dir)
    processor = make_image_processor(config.encoder_config)
    processor.save_pretrained(output_dir)
    processor.save_pretrained(encoder_dir)

    name = args.hub_model_id or output_dir.name
    card_kwargs = dict(datasets=hub_dataset, training=training, tags=["ijepa-hf-pretraining"])
    make_model_card(model_name=name, kind="pretraining", config_summary=summarize_config(unwrapped),
                    **card_kwargs).save(output_dir / "README.md")
    loading = default_loading_code(name, "encoder", custom_code=True)
    loading = loading.replace("from_pretrained(repo_id)", 'from_pretrained(repo_id, subfolder="encoder")')
    make_model_card(model_name=f"{name} (target encoder)", kind="encoder", config_summary=summarize_config(encoder),
                    loading_code=loading, **card_kwargs).save(encoder_dir / "README.md")


def _push(args: PretrainingArguments, output_dir: Path) -> str:
    """Upload ``output_dir`` (without the ``step_*`` training checkpoints) to the Hub."""
    from huggingface_hub import HfApi

    api = HfApi(token=args.hub_token)
    repo_id = args.hub_model_id or output_dir.name
    repo_id = api.create_repo(repo_id, exist_ok=True, private=args.hub_private_repo).repo_id
    commit = api.upload_folder(folder_path=str(output_dir), repo_id=repo_id, repo_type="model",
                               commit_message="I-JEPA pretraining", ignore_patterns=["step_*", "step_*/**"])
    logger.info("Pushed %s to %s", output_dir, repo_id)
    return getattr(commit, "commit_url", None) or str(commit)
