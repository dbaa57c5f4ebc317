"""The arguments of a pretraining run, the embedded demo's settings, and the config a run trains.

:class:`PretrainingArguments` is the command line of ``examples/pretrain.py`` (``HfArgumentParser``, transformers'
example-script names); its defaults are what ``--help`` prints. :func:`parse_args` reads the command line or one
JSON file the same way, and when no data source is given applies the embedded demo's settings
(:data:`EMBEDDED_DEMO_DEFAULTS`) to the options the user did not set, saying so in the log.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..configuration_ijepa_hf import (MASK_MODES, IJepaPretrainingConfig, config_override_items, list_presets,
                                      parse_config_overrides)
from ..pretrained_loading import missing_config
from .checkpointing import check_output_dir_options
from .kernels import check_attention_choice
from .metrics import DEFAULT_ONLINE_PROBE_IMAGES, CollapseMonitor
from .recipes import Recipe, recipe_changes
from .schedules import check_learning_rates

logger = logging.getLogger(__name__)

__all__ = [
    "PretrainingArguments",
    "parse_args",
    "build_config",
    "build_pretraining_config",
    "EMBEDDED_DEMO_DEFAULTS",
    "EMBEDDED_DEMO_MODEL",
    "OPERATIONAL_FIELDS",
    "SCHEDULE_LENGTH_FIELDS",
    "explicit_options",
    "parse_range",
]


def _help(text: str) -> dict[str, Any]:
    return {"help": text}


def parse_range(text: str, name: str, low: float, high: float) -> tuple[float, float]:
    """A ``'min,max'`` option (``--ema_momentum``, ``--crop_scale``) as two floats with ``low <= min <= max <=
    high``; ``ValueError`` naming ``--<name>`` otherwise."""
    try:
        values = [float(v) for v in str(text).replace(" ", "").strip("()[]").split(",")]
    except ValueError:
        values = []
    if len(values) != 2 or not (low <= values[0] <= values[1] <= high):
        raise ValueError(f"--{name} must be 'min,max' with {low} <= min <= max <= {high}, got {text!r}")
    return values[0], values[1]


@dataclass
class PretrainingArguments:
    """Arguments of :func:`~ijepa_hf.training.pretrain` (also the command line of ``examples/pretrain.py``).

    Defaults follow the official I-JEPA configs where they exist (LR 1e-3 with start 2e-4 and final 1e-6, weight
    decay 0.04 -> 0.4, EMA 0.996 -> 1.0, warm-up 40 of 300 epochs, random resized crop 0.3-1.0 only, no gradient
    clipping). Without any data argument the run uses the embedded procedural-shapes dataset (no download).
    """

    # ---- data
    dataset_name: str | None = field(default=None, metadata=_help(
        "Hub dataset name (e.g. 'cifar10'), a datasets builder ('imagefolder' together with --train_dir), or "
        "'fashion_mnist': Debian's copy, read locally (held-out split 'test')."))
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
    embedded_scenes: str | None = field(default=None, metadata=_help(
        "Changes to the embedded scenes' generator settings (ijepa_hf.data.EMBEDDED_SCENES), as 'key=value,...' "
        "over max_objects, min_objects, radius_range=[lo,hi], noise_std, palette, shared_shape (e.g. "
        "'shared_shape=false,radius_range=[0.14,0.3]': the generator's own defaults); only without a data argument. "
        "The probe of examples/pretrain.py draws its scenes with the same settings."))
    validation_dir: str | None = field(default=None, metadata=_help(
        "Local folder of held-out images: their prediction loss (eval_loss) is logged every --eval_steps updates "
        "and at the end."))
    validation_split_name: str | None = field(default=None, metadata=_help(
        "Split of --dataset_name with held-out images for eval_loss (e.g. 'validation')."))
    max_eval_samples: int | None = field(default=None, metadata=_help(
        "Keep only the first N held-out images (embedded data: 256 held-out scenes by default)."))
    cache_dir: str | None = field(default=None, metadata=_help("datasets / transformers cache directory."))
    crop_scale: str = field(default="0.3,1.0", metadata=_help(
        "Area range 'min,max' of the random resized crop (official 0.3,1.0)."))
    # ---- model
    recipe: str = field(default="official", metadata=_help(
        "'official': the paper's settings; 'small': for short runs on small data, a one-block predictor as wide as "
        "the encoder and a warm-up of a quarter of the run (ijepa_hf.training.recipes says why). Explicit "
        "--warmup_ratio/--warmup_steps and predictor.* overrides win over it."))
    config_name: str | None = field(default=None, metadata=_help(
        "A preset name (see ijepa_hf.list_presets()) or a path/repo id of a pretraining config. Default: "
        "IJepaPretrainingConfig() (ViT-B/16, 224 px); the embedded demo uses a small ViT instead."))
    model_name_or_path: str | None = field(default=None, metadata=_help(
        "Continue from a saved pretraining model (local directory or Hub repo with context, target encoder and "
        "predictor)."))
    config_overrides: str | None = field(default=None, metadata=_help(
        "Config overrides 'a=1,b=2' (IJepaPretrainingConfig.update_from_string); prefix 'encoder.' / 'predictor.' "
        "for the sub-configs, lists in brackets, e.g. "
        "'encoder.hidden_size=192,predictor.num_hidden_layers=4,target_scale=[0.15,0.2]'. On the embedded demo "
        "they change the demo's small model (yours win); --config_name / --model_name_or_path replace it."))
    image_size: int | None = field(default=None, metadata=_help(
        "Training resolution (the encoder's and predictor's image_size); not together with an image_size in "
        "--config_overrides."))
    mask_mode: str | None = field(default=None, metadata=_help(
        "Mask sampler: 'fixed' (the config's default: official sampler with its defects fixed) or 'official'."))
    # ---- output
    output_dir: str = field(default="outputs/pretrain", metadata=_help(
        "Where checkpoints and the model go (embedded demo: outputs/pretrain-default)."))
    overwrite_output_dir: bool = field(default=False, metadata=_help(
        "Start a new run in an --output_dir that holds another one (its files are replaced as the new run writes "
        "them; its checkpoints are never resumed or pruned by the new run)."))
    # ---- optimisation
    per_device_train_batch_size: int = field(default=64, metadata=_help(
        "Batch size per process (embedded demo: 16)."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Micro-batches per optimizer step."))
    max_train_steps: int | None = field(default=None, metadata=_help(
        "Total optimizer steps; overrides --num_train_epochs (embedded demo: 2400 unless --num_train_epochs is "
        "given)."))
    num_train_epochs: int = field(default=1, metadata=_help("Epochs (ignored when --max_train_steps is set)."))
    learning_rate: float = field(default=1e-3, metadata=_help(
        "Peak (reference) learning rate (official 1e-3; embedded demo: 5e-4)."))
    start_lr: float = field(default=2e-4, metadata=_help("Learning rate at the start of the warm-up."))
    final_lr: float = field(default=1e-6, metadata=_help("Learning rate at the end of the cosine."))
    warmup_steps: int | None = field(default=None, metadata=_help("Warm-up steps (overrides --warmup_ratio)."))
    warmup_ratio: float | None = field(default=None, metadata=_help(
        "Warm-up as a fraction of all steps; default: the recipe's (official: 40/300, the IN-1k 40 of 300 "
        "epochs; small: 0.25)."))
    weight_decay: float = field(default=0.04, metadata=_help("Initial weight decay."))
    final_weight_decay: float = field(default=0.4, metadata=_help("Final weight decay (cosine schedule)."))
    ema_momentum: str | None = field(default=None, metadata=_help(
        "EMA momentum 'start,end' of the target encoder (default: the config's, officially 0.996,1.0); not "
        "together with ema_momentum in --config_overrides."))
    max_grad_norm: float | None = field(default=None, metadata=_help(
        "Clip the gradient norm to this value; unset or <= 0: no clipping (the official recipe does not clip)."))
    adam_beta1: float = field(default=0.9, metadata=_help("AdamW beta1."))
    adam_beta2: float = field(default=0.999, metadata=_help("AdamW beta2."))
    mixed_precision: str | None = field(default=None, metadata=_help(
        "'no', 'fp16' or 'bf16' (official: bf16); default: what `accelerate launch`/config says."))
    attn_implementation: str = field(default="sdpa", metadata=_help(
        "Attention kernel: 'sdpa' (torch's fused scaled_dot_product_attention), 'eager' (two matmuls and a "
        "softmax; on some CPUs faster in bf16 training) or 'auto' (time both on this run's model, batch and "
        "precision at start-up and keep the faster, logged; two runs may then pick differently)."))
    gradient_checkpointing: bool = field(default=False, metadata=_help("Recompute activations in backward."))
    torch_compile: bool = field(default=False, metadata=_help(
        "Compile with torch.compile (inductor); --torch_compile_scope says what (benchmarks/README.md has the cost)."))
    torch_compile_scope: str = field(default="model", metadata=_help(
        "With --torch_compile: 'model' (the whole model, through Accelerate; one recompile for dynamic mask lengths) "
        "or 'blocks' (each transformer block, one compiled graph shared by every layer: much shorter to compile)."))
    num_workers: int = field(default=0, metadata=_help(
        "DataLoader worker processes that decode, crop and mask the images (0: in the training process). On a GPU "
        "give it enough that the log's loader_images_per_s stays above its images_per_s (data_wait_fraction near "
        "0), up to the CPU cores per GPU less one or two (what decoding costs: benchmarks/README.md, 'Pretraining "
        "end to end'). Workers live for the whole run."))
    prefetch_factor: int = field(default=4, metadata=_help(
        "Batches each worker prepares ahead (with --num_workers > 0)."))
    seed: int = field(default=0, metadata=_help("Seed of the model init, data order, crops and masks."))
    skip_nonfinite_steps: int = field(default=0, metadata=_help(
        "Skip up to N updates whose loss or gradients are not finite (their optimizer step and EMA are not "
        "applied) before stopping. 0 (default): stop at the first one. N > 0 checks every step on the host "
        "(one device sync per step)."))
    # ---- checkpoints
    checkpointing_steps: str | None = field(default=None, metadata=_help(
        "Save the training state every N optimizer steps, or 'epoch' (to output_dir/step_<N>)."))
    checkpoints_total_limit: int | None = field(default=None, metadata=_help(
        "Keep only the newest N complete checkpoints of this run."))
    resume_from_checkpoint: str | None = field(default=None, metadata=_help(
        "A step_<N> folder, or 'latest' (the newest complete checkpoint of the run in output_dir; starts the run "
        "afresh if it has none). The run's settings must be the checkpoint's (see --extend_run)."))
    extend_run: bool = field(default=False, metadata=_help(
        "On resume, accept a larger --max_train_steps / --num_train_epochs: the LR, weight-decay and EMA "
        "schedules are recomputed for the new length and continue from the checkpoint's step on the new curves."))
    allow_process_count_change: bool = field(default=False, metadata=_help(
        "On resume, accept another number of processes when the global batch stays the same (set "
        "--per_device_train_batch_size so that it does): the same images make each global batch; masks sampled per "
        "process (mask_mode 'official') are drawn anew. One-process and data-parallel (DDP) runs only."))
    # ---- distributed
    ddp_timeout: int = field(default=600, metadata=_help(
        "Seconds a process waits for the others in a collective before the run fails (a rank that died or "
        "stalled); torch's default would be 1800."))
    preemption_signals: str = field(default="SIGTERM,SIGUSR1", metadata=_help(
        "Signals that ask the run to stop: it finishes the current update, writes a complete checkpoint and exits "
        "with code 75 (continue with --resume_from_checkpoint latest). 'none': the signals keep their default "
        "action. SLURM sends SIGTERM at pre-emption and at the time limit."))
    # ---- logging
    with_tracking: bool = field(default=False, metadata=_help("Log metrics to trackers (see --report_to)."))
    disable_tqdm: bool = field(default=False, metadata=_help(
        "No progress bar (as TrainingArguments.disable_tqdm): for logs read by programs; train_log.jsonl is written "
        "either way."))
    report_to: str = field(default="tensorboard", metadata=_help(
        "Tracker(s) for --with_tracking: 'tensorboard', 'wandb', 'all', ... (comma-separated)."))
    logging_steps: int = field(default=10, metadata=_help(
        "Log (train_log.jsonl, trackers, progress bar) every N optimizer steps (embedded demo: 20)."))
    collapse_threshold: float = field(default=0.01, metadata=_help(
        "Collapse warning when the batch std of the pooled, normalised target features falls below this."))
    collapse_max_cosine: float = field(default=0.999, metadata=_help(
        "Collapse warning when the mean pairwise cosine of different images' pooled target features exceeds this."))
    # ---- held-out loss
    eval_steps: int | None = field(default=None, metadata=_help(
        "Every N updates (and at the end), the prediction loss on the held-out images (--validation_dir / "
        "--validation_split_name; the embedded data has its own held-out scenes) as eval_loss in train_log.jsonl, "
        "the trackers and training_curves.png. Every evaluation sees the same crops and masks, so the curve follows "
        "the weights alone. Default: at the end only when held-out images are named, else off."))
    per_device_eval_batch_size: int | None = field(default=None, metadata=_help(
        "Batch of the held-out loss per device (default: --per_device_train_batch_size)."))
    # ---- online probe (learning telemetry)
    online_probe_steps: int | None = field(default=None, metadata=_help(
        "Every N updates (and at the end), k-NN accuracy and RankMe of the target encoder's pooled features on a "
        "fixed labelled subset of the data (a bank and held-out queries), logged to train_log.jsonl, TensorBoard and "
        "training_curves.png, beside the same k-NN on raw pixels (online_knn_pixels_accuracy, the reference). "
        "Default: about 10 times per run, on log rows, when the data has labels (else off, logged); 0: off. Cost: "
        "a forward of the target encoder over --online_probe_images images per probe (online_probe_seconds in the "
        "row; the run's total share is logged at the end): on very short CPU runs this can be a large share."))
    online_probe_images: int = field(default=DEFAULT_ONLINE_PROBE_IMAGES, metadata=_help(
        "Images of the online probe set (half bank, half queries)."))
    online_probe_label_column: str | None = field(default=None, metadata=_help(
        "Label column of the online probe (default 'label': image folders with class sub-folders, Hub datasets with "
        "a label column, the embedded scenes' largest shape); integer ids or class names."))
    online_probe_k: int = field(default=20, metadata=_help("Neighbours of the online k-NN."))
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
                     "logging_steps", "embedded_num_images", "ddp_timeout", "prefetch_factor"):
            positive(name)
        for name in ("max_train_steps", "max_train_samples", "checkpoints_total_limit", "image_size", "eval_steps",
                     "per_device_eval_batch_size", "max_eval_samples"):
            positive(name, allow_none=True)
        check_seed(self.seed)
        for name in ("warmup_steps", "num_workers", "skip_nonfinite_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.warmup_ratio is not None and not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"--warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if not self.evaluates and (self.max_eval_samples is not None or self.per_device_eval_batch_size is not None):
            raise ValueError("--max_eval_samples / --per_device_eval_batch_size set the held-out loss, which this run "
                             "does not compute: add --eval_steps N (and --validation_dir or --validation_split_name "
                             "unless the data is the embedded scenes)")
        parse_embedded_scene_option(self.embedded_scenes, self.uses_embedded_data)  # fails before the run starts
        from .preemption import parse_signals

        parse_signals(self.preemption_signals)  # an unknown name is an error naming it
        from .recipes import get_recipe

        get_recipe(self.recipe)  # an unknown name is an error naming the recipes
        for name in ("learning_rate", "start_lr", "final_lr", "weight_decay", "final_weight_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"--{name} must be a finite number >= 0, got {value}")
        check_learning_rates(self.start_lr, self.learning_rate, self.final_lr,
                             names=("--start_lr", "--learning_rate", "--final_lr"))
        if self.max_grad_norm is not None and not math.isfinite(self.max_grad_norm):
            raise ValueError(f"--max_grad_norm must be finite (<= 0 or unset: no clipping), got {self.max_grad_norm}")
        if self.checkpointing_steps is not None:
            text = str(self.checkpointing_steps).strip()
            if text != "epoch" and not (text.isdigit() and int(text) > 0):
                raise ValueError(f"--checkpointing_steps must be a positive integer or 'epoch', got {text!r}")
            self.checkpointing_steps = text
        check_online_probe_options(self.online_probe_steps, self.online_probe_images, self.online_probe_k)
        check_attention_choice(self.attn_implementation)
        if self.mixed_precision is not None and self.mixed_precision not in ("no", "fp16", "bf16", "fp8"):
            raise ValueError(f"--mixed_precision must be one of no/fp16/bf16/fp8, got {self.mixed_precision!r}")
        if self.torch_compile_scope not in TORCH_COMPILE_SCOPES:
            raise ValueError(f"--torch_compile_scope must be one of {TORCH_COMPILE_SCOPES}, got "
                             f"{self.torch_compile_scope!r}")
        if self.mask_mode is not None and self.mask_mode not in MASK_MODES:
            raise ValueError(f"--mask_mode must be one of {MASK_MODES}, got {self.mask_mode!r}")
        check_streaming_options(self.streaming, self.max_train_steps is not None, self.uses_embedded_data,
                                shuffle_buffer_size=self.shuffle_buffer_size)
        _check_model_source(self.config_name, self.model_name_or_path, self.recipe)
        check_output_dir_options(self.overwrite_output_dir, self.resume_from_checkpoint)
        for flag in ("extend_run", "allow_process_count_change"):
            if getattr(self, flag) and not self.resume_from_checkpoint:
                raise ValueError(f"--{flag} only applies with --resume_from_checkpoint")
        overrides = parse_config_overrides(self.config_overrides)  # validates the syntax early
        for flag, keys in FLAG_FIELDS.items():
            clash = [key for key in keys if key in overrides]
            if getattr(self, flag) is not None and clash:
                raise ValueError(f"--{flag} and --config_overrides {clash[0]}=... set the same field: give it once")
        self.ema_range  # validates the string
        self.crop_range  # validates the string
        CollapseMonitor(self.collapse_threshold, self.collapse_max_cosine)  # validates the thresholds
        self._demo_defaults: dict[str, Any] = {}

    @property
    def ema_range(self) -> tuple[float, float] | None:
        """``--ema_momentum`` as ``(start, end)``, or ``None`` (use the config's)."""
        return parse_ema_momentum(self.ema_momentum)

    @property
    def crop_range(self) -> tuple[float, float]:
        return parse_crop_scale(self.crop_scale)

    @property
    def evaluates(self) -> bool:
        """Whether the run logs the held-out loss (``--eval_steps``, or held-out images named)."""
        return (self.eval_steps is not None or self.validation_dir is not None
                or self.validation_split_name is not None)

    @property
    def eval_batch_size(self) -> int:
        """The held-out loss's batch per device."""
        return self.per_device_eval_batch_size or self.per_device_train_batch_size

    @property
    def clip_grad_norm(self) -> float | None:
        """The clipping norm, or ``None`` when clipping is off (unset or ``<= 0``, transformers' convention)."""
        return self.max_grad_norm if self.max_grad_norm is not None and self.max_grad_norm > 0 else None

    @property
    def embedded_scene_settings(self) -> dict[str, Any]:
        """``--embedded_scenes`` as ``ProceduralShapes`` keyword arguments over ``EMBEDDED_SCENES`` (``{}``: none)."""
        return parse_embedded_scene_option(self.embedded_scenes, self.uses_embedded_data)

    @property
    def warmup_fraction(self) -> float:
        """``--warmup_ratio``, or the recipe's when it is unset."""
        from .recipes import get_recipe

        return self.warmup_ratio if self.warmup_ratio is not None else get_recipe(self.recipe).warmup_ratio

    @property
    def uses_embedded_data(self) -> bool:
        """True when no data argument was given (the embedded procedural-shapes dataset is used)."""
        return self.dataset_name is None and self.train_dir is None

    @property
    def demo_defaults_applied(self) -> dict[str, Any]:
        """The embedded demo's settings :func:`parse_args` filled in (empty otherwise)."""
        return dict(self._demo_defaults)

    def to_dict(self) -> dict[str, Any]:
        """The arguments as JSON-ready values, without the Hub token."""
        values = dataclasses.asdict(self)
        values.pop("hub_token", None)
        return values


# Settings of the embedded demo (no data argument), sized for a 2-core CPU: a small ViT on a 12x12 patch grid (96 px,
# patch 8, width 128, depth 4, 2 heads) with the "small" recipe's predictor (one block as wide as the encoder) and
# warm-up (a quarter of the run), 2400 steps of batch 16 (about 9 epochs of the 4096 images), peak lr 5e-4. At that
# budget small batches learned clearly more than batch 64; the official peak lr 1e-3 made the outcome depend on the
# seed, 2e-3 collapsed. On the embedded scenes (`ijepa_hf.data.EMBEDDED_SCENES`) the small recipe and the 12x12 grid
# gave the best shape and texture margins over random init of the settings tried, the grid at twice the step's cost
# of 64 px (benchmarks/README.md, "Procedural scenes: the object-shape label", has the runs and their seed spread).
# min_keep 4 keeps the official masks feasible on a small grid (the official 10 assumes 14x14 or more). The target
# encoder follows faster than the official 0.996 -> 1.0 (0.99 -> 0.999): in 2400 steps the official EMA keeps the
# target behind the context encoder (whose features probed better), and the faster one probed better on shape and
# texture (benchmarks/README.md has the runs).
EMBEDDED_DEMO_DEFAULTS: dict[str, Any] = {
    "output_dir": "outputs/pretrain-default",
    "per_device_train_batch_size": 16,
    "max_train_steps": 2400,
    "logging_steps": 20,
    "learning_rate": 5e-4,
}
# The demo's model; the recipe belongs to it (it sizes the predictor from this encoder), so a model source given by
# the user (--config_name / --model_name_or_path) drops the recipe too. --config_overrides changes this model.
EMBEDDED_DEMO_MODEL: dict[str, Any] = {
    "image_size": 96,
    "recipe": "small",
    "config_overrides": "encoder.patch_size=8,encoder.hidden_size=128,encoder.num_hidden_layers=4,"
                        "encoder.num_attention_heads=2,min_keep=4",
    "ema_momentum": "0.99,0.999",
}
# What --torch_compile compiles: the whole model, or each transformer block (`compilation.compile_blocks`).
TORCH_COMPILE_SCOPES = ("model", "blocks")
# Options that say where a model comes from: when one is given, the demo's model is not used at all.
MODEL_SOURCE_OPTIONS = ("config_name", "model_name_or_path")
# The flags that set a config field, and the `--config_overrides` keys of that field (give a field once).
FLAG_FIELDS: dict[str, tuple[str, ...]] = {
    "image_size": ("encoder.image_size", "predictor.image_size"),
    "mask_mode": ("mask_mode",),
    "ema_momentum": ("ema_momentum",),
}

# Options that may differ between a run and its resume: where and how often things are written, how the work is
# spread, logged or published. Every other option defines the run and must equal the checkpoint's.
OPERATIONAL_FIELDS = frozenset({
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "extend_run", "allow_process_count_change",
    "checkpointing_steps",
    "checkpoints_total_limit", "logging_steps", "with_tracking", "disable_tqdm", "report_to", "push_to_hub",
    "hub_model_id",
    "hub_token", "hub_private_repo", "num_workers", "prefetch_factor", "ddp_timeout", "preemption_signals",
    "cache_dir", "torch_compile", "torch_compile_scope",
    "gradient_checkpointing", "attn_implementation", "online_probe_steps", "online_probe_images",
    "online_probe_label_column", "online_probe_k", "collapse_threshold", "collapse_max_cosine", "skip_nonfinite_steps",
    "validation_dir", "validation_split_name", "max_eval_samples", "eval_steps", "per_device_eval_batch_size",
})
# Options that set the run's length: may grow on resume with --extend_run.
SCHEDULE_LENGTH_FIELDS = ("max_train_steps", "num_train_epochs")


def explicit_options(argv: Sequence[str]) -> set[str]:
    """Option names present on a command line (``--name value`` or ``--name=value``)."""
    names = set()
    for item in argv:
        if item.startswith("--"):
            names.add(item[2:].split("=", 1)[0].replace("-", "_"))
    return names


def parse_args(argv: Sequence[str] | None = None) -> PretrainingArguments:
    """Parse a command line, or a single ``.json`` file of arguments, into :class:`PretrainingArguments`.

    Both forms mean the same run. Without a data source (``--dataset_name`` / ``--train_dir``) the embedded demo's
    settings (:data:`EMBEDDED_DEMO_DEFAULTS`, and :data:`EMBEDDED_DEMO_MODEL` unless ``--config_name`` or
    ``--model_name_or_path`` is given) fill the options not given; ``--config_overrides`` changes the demo's model
    (:func:`demo_model_options`). ``args.demo_defaults_applied`` lists what the demo filled in and the run logs it.
    """
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(PretrainingArguments)
    if len(argv) == 1 and argv[0].endswith(".json"):
        with open(os.path.abspath(argv[0]), encoding="utf-8") as handle:
            values = json.load(handle)
        if not isinstance(values, dict):
            raise ValueError(f"{argv[0]} must hold a JSON object of arguments")
        explicit = set(values)
        (args,) = parser.parse_dict(values)
    else:
        explicit = explicit_options(argv)
        (args,) = parser.parse_args_into_dataclasses(args=argv)
    if not args.uses_embedded_data:
        return args
    demo = {k: v for k, v in EMBEDDED_DEMO_DEFAULTS.items() if k not in explicit}
    if {"max_train_steps", "num_train_epochs"} & explicit:
        demo.pop("max_train_steps", None)
    if not {"output_dir", "overwrite_output_dir", "resume_from_checkpoint"} & explicit:
        demo["overwrite_output_dir"] = True  # the demo's own folder: running the demo again replaces it
    filled = dict(demo)  # what the demo filled in, for the log and the recipe: of the overrides, the demo's own
    if not set(MODEL_SOURCE_OPTIONS) & explicit:
        model, demo_overrides = demo_model_options(EMBEDDED_DEMO_MODEL, explicit, args.config_overrides)
        demo.update(model)
        filled.update({name: value for name, value in model.items() if name != "config_overrides"})
        if demo_overrides is not None:
            filled["config_overrides"] = demo_overrides
    if demo:
        args = dataclasses.replace(args, **demo)  # re-runs the validation
        args._demo_defaults = filled
    return args


def demo_model_options(demo_model: dict[str, Any], given: set[str],
                       config_overrides: str | None) -> tuple[dict[str, Any], str | None]:
    """What a demo's model (``{"image_size": 96, "recipe": "small", "config_overrides": ..., ...}``) fills in for a
    run that names no model source (:data:`MODEL_SOURCE_OPTIONS`), the options ``given`` explicitly and its
    ``config_overrides``: the demo's options not given, with the user's ``--config_overrides`` applied on top of the
    demo's (the user's value wins for a field both set), and without the demo's flags whose field the user's overrides
    set (:data:`FLAG_FIELDS`). Returns ``(options, the demo's overrides that were kept)``: the options to set and, for
    the log, what of the demo's overrides the run uses."""
    user_items = config_override_items(config_overrides)
    user = {key for key, _ in user_items}
    options = {name: value for name, value in demo_model.items() if name not in given and name != "config_overrides"}
    for flag, keys in FLAG_FIELDS.items():
        if user.intersection(keys):
            options.pop(flag, None)
    kept = [item for key, item in config_override_items(demo_model.get("config_overrides")) if key not in user]
    if kept or user_items:
        options["config_overrides"] = ",".join(kept + [item for _, item in user_items])
    return options, ",".join(kept) or None


def parse_ema_momentum(text: str | None) -> tuple[float, float] | None:
    """``--ema_momentum 'start,end'`` as ``(start, end)`` (each in [0, 1]), or ``None`` (use the config's)."""
    return None if text is None else parse_range(text, "ema_momentum", 0.0, 1.0)


def parse_crop_scale(text: str) -> tuple[float, float]:
    """``--crop_scale 'min,max'``: the area range of the random resized crop, in (0, 1]."""
    return parse_range(text, "crop_scale", 1e-6, 1.0)


MAX_SEED = 2**31 - 1  # every generator seeded takes it, with room for the per-process and per-draw offsets added


def check_seed(seed: int) -> None:
    """``--seed``, as every script names it: an integer the random generators take (numpy's refusal of a negative
    seed does not say which option it came from)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"--seed must be an integer in [0, 2**31 - 1], got {seed!r}")


def parse_embedded_scene_option(text: str | None, uses_embedded_data: bool) -> dict[str, Any]:
    """``--embedded_scenes``, as both pretraining scripts take it: ``ProceduralShapes`` keyword arguments over
    ``EMBEDDED_SCENES`` (``{}``: none); refused beside a data argument, which the scenes would not change."""
    from ..data import parse_embedded_scenes

    if text and not uses_embedded_data:
        raise ValueError("--embedded_scenes sets the embedded scenes, but a data argument (--dataset_name / "
                         "--train_dir) is given; drop one of them.")
    return parse_embedded_scenes(text)


def check_streaming_options(streaming: bool, has_step_budget: bool, uses_embedded_data: bool,
                            budget_option: str = "--max_train_steps", shuffle_buffer_size: int = 0) -> None:
    """``--streaming`` and ``--shuffle_buffer_size``, as both pretraining scripts check them: a stream has no length
    to count epochs in, and the embedded data is not streamed."""
    if shuffle_buffer_size < 0:
        raise ValueError(f"--shuffle_buffer_size must be >= 0 (0: no shuffling), got {shuffle_buffer_size}")
    if streaming and not has_step_budget:
        raise ValueError(f"--streaming needs {budget_option} (a streamed dataset has no length to count epochs)")
    if streaming and uses_embedded_data:
        raise ValueError("--streaming needs --dataset_name or --train_dir")


def check_online_probe_options(steps: int | None, num_images: int, k: int) -> None:
    """The online probe's options, as both pretraining scripts name them (checked before any data is read)."""
    if steps is not None and steps < 0:
        raise ValueError(f"--online_probe_steps must be >= 0 (0: off), got {steps}")
    if num_images < 2:
        raise ValueError(f"--online_probe_images must be >= 2 (a bank and queries), got {num_images}")
    if k < 1:
        raise ValueError(f"--online_probe_k must be >= 1, got {k}")


def _check_model_source(config_name: str | None, model_name_or_path: str | None,
                        recipe: str | Recipe = "official") -> None:
    if config_name is not None and model_name_or_path is not None:
        raise ValueError("give either --config_name (new model) or --model_name_or_path (continue one), not both")
    name = getattr(recipe, "name", recipe)
    if name != "official" and model_name_or_path is not None:
        raise ValueError(f"--recipe {name} sizes a new model's predictor, but --model_name_or_path continues a saved "
                         "model with its own; drop one of them.")


def build_pretraining_config(
    *,
    config_name: str | None = None,
    model_name_or_path: str | None = None,
    config_overrides: str | None = None,
    image_size: int | None = None,
    mask_mode: str | None = None,
    ema_momentum: tuple[float, float] | None = None,
    recipe: str | Recipe = "official",
    keep: Collection[str] = (),
    cache_dir: str | None = None,
    token: str | None = None,
) -> IJepaPretrainingConfig:
    """A pretraining config from a preset / file / repo (``config_name``), a saved model's (``model_name_or_path``)
    or the default (``IJepaPretrainingConfig()``), changed by ``config_overrides``
    (:meth:`IJepaPretrainingConfig.update_from_string`'s language), the ``image_size``, ``mask_mode`` and
    ``ema_momentum`` flags (a flag may not set the same field as an override: :class:`PretrainingArguments` refuses
    that) and the ``recipe``'s fields, except those named in ``keep`` (what the user set:
    :func:`~ijepa_hf.training.recipes.recipe_changes`), which win over the overrides'. All in one change, validated
    once: ``--image_size 96 --config_overrides encoder.patch_size=12`` is valid though 12 does not divide the
    default 224, and so is a predictor width the recipe's head count divides."""
    _check_model_source(config_name, model_name_or_path, recipe)
    for option, source in (("config_name", config_name), ("model_name_or_path", model_name_or_path)):
        # transformers reads a folder without config.json as the class's default config, without a word
        reason = None if source is None else missing_config(source)
        if reason is not None:
            raise ValueError(f"--{option} {source} {reason}" + (" --config_name also takes a config file or a "
                                                               f"preset ({', '.join(list_presets())})."
                                                               if option == "config_name" else ""))
    if model_name_or_path is not None:
        config = IJepaPretrainingConfig.from_pretrained(model_name_or_path, cache_dir=cache_dir, token=token)
    elif config_name is None:
        config = IJepaPretrainingConfig()
    elif config_name in list_presets():
        config = IJepaPretrainingConfig.from_preset(config_name)
    else:
        try:
            config = IJepaPretrainingConfig.from_pretrained(config_name, cache_dir=cache_dir, token=token)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"--config_name {config_name!r} is neither a preset ({', '.join(list_presets())}) nor a "
                f"loadable config path/repo: {error}"
            ) from error
    changes = config.override_changes(config_overrides)  # the command line's language, parsed at its edge
    if image_size is not None:
        changes["encoder"]["image_size"] = int(image_size)
    if mask_mode is not None:
        changes["mask_mode"] = mask_mode
    if ema_momentum is not None:
        changes["ema_momentum"] = [float(ema_momentum[0]), float(ema_momentum[1])]
    if recipe != "official":
        encoder = config.updated(encoder=changes["encoder"]) if changes["encoder"] else config  # sizes the predictor
        for name, value in recipe_changes(encoder, recipe, keep).items():
            if name == "predictor":
                changes["predictor"].update(value)
            else:
                changes[name] = value
    unchanged = changes == {"encoder": {}, "predictor": {}}
    return config if unchanged else config.updated(**changes)


def build_config(args: PretrainingArguments) -> IJepaPretrainingConfig:
    """The config of a run: :func:`build_pretraining_config` with the run's options and recipe, which fills the
    fields the user did not set (overrides that the embedded demo filled in count as not set)."""
    keep = set(parse_config_overrides(args.config_overrides)) - set(
        parse_config_overrides(args.demo_defaults_applied.get("config_overrides")))
    if args.ema_range is not None:
        keep.add("ema_momentum")
    return build_pretraining_config(
        config_name=args.config_name, model_name_or_path=args.model_name_or_path,
        config_overrides=args.config_overrides, image_size=args.image_size, mask_mode=args.mask_mode,
        ema_momentum=args.ema_range, recipe=args.recipe, keep=keep, cache_dir=args.cache_dir, token=args.hub_token)
