"""Does it learn? I-JEPA against MAE, random init and raw pixels at the same budget.

Every method is pretrained WITHOUT labels for the same budget (images seen, optimizer steps or wall-clock), then its
frozen features are probed with the package's probes (``ijepa_hf.evaluation``):

* ``--task fashion-mnist`` (default budget 1,118,976 images = 8,742 steps of 128 per method): Fashion-MNIST from
  Debian's ``dataset-fashion-mnist`` (60k train / 10k test, 28 px upsampled to 32 px, grey copied to 3 channels).
  Rows: I-JEPA target encoder, I-JEPA context encoder, MAE (transformers' ``ViTMAEForPreTraining``, same encoder
  size), the same ViT at random init, raw 32x32 pixels. On average-pooled features: linear probe (L-BFGS logistic
  regression, L2 chosen on a held-out part of the training set), 20-NN cosine k-NN and the low-shot linear probe
  (600 class-balanced labels, 1 %, mean of ``--low-shot-draws``); on the final patch tokens: the attentive probe.
  All on the full test set. Each trained model is saved (``ijepa_target_encoder/``, ``mae/``) and each training
  run's matmul FLOPs are counted on real steps.
* ``--task spatial`` (default budget 5 min per method): the package's procedural scenes (64 px, patch 8). Probes
  for the object count (linear probe and k-NN), the class of the largest shape (linear probe) and the position of
  the largest object (closed-form ridge regression: R^2 and mean absolute error in pixels).

Recipe (defaults, ``--recipe official``; every knob is a flag): bf16 autocast, batch 128, ViT width 192 depth 6 heads
3 (MLP 768), I-JEPA predictor 96 x 4, official mask scales with ``min_keep`` 4 and ``mask_mode`` fixed, AdamW with the official
parameter groups, warmup-cosine lr (2e-4 -> 1e-3 -> 1e-6, warmup 40/300 of the run), cosine weight decay
0.04 -> 0.4, EMA 0.996 -> 1. MAE: mask ratio 0.75, decoder 128 x 2, same lr schedule, AdamW betas (0.9, 0.95) and a
constant weight decay 0.05 (MAE's recipe). Augmentation for both: random resized crop only (area 0.3-1, the official
I-JEPA recipe), done on whole batches of tensors. ``--recipe small`` changes the sizes and the warm-up only:
ViT 128 x 4 (2 heads), a one-block predictor 128 wide, warm-up 25 % of the run (MAE gets the same encoder and
warm-up).

The number of optimizer steps that fits the budget is estimated from the first steps and re-estimated at 25, 50
and 75 % of the budget, so the lr / wd / EMA schedules end when the budget ends (a run stops at the budget or at
the planned step count, whichever comes first; both are reported).

Run::

    python benchmarks/learning.py --task fashion-mnist --budget-minutes 20
    python benchmarks/learning.py --task fashion-mnist --recipe small --seed 0   # the budget in images
    python benchmarks/learning.py --task spatial --budget-minutes 5
    python benchmarks/learning.py --budget-minutes 0.5          # smoke run (a few minutes, numbers meaningless)

Outputs go to ``--output-dir`` (default ``outputs/learning``): ``<task>_results.json`` (table, settings, machine,
per-method training summary and probe details), ``<task>_<method>_log.jsonl`` and ``<task>_<method>_curves.png``.

Two pitfalls this script guards against: in transformers 5.24 a
``ViTMAEForPreTraining`` built from a config has all-zero position embeddings, CLS and mask tokens (its own init is
skipped); :func:`initialize_mae` re-runs the modules' own initialisers and :func:`check_mae_initialization` asserts
the result. Our own sin-cos buffers are checked against their formula by :func:`check_ijepa_position_tables`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

import ijepa_hf
from ijepa_hf import IJepaEncoderConfig, IJepaEncoderModel, IJepaMaskCollator, IJepaPretrainingConfig, IJepaForPreTraining
from ijepa_hf.data import IMAGENET_MEAN, IMAGENET_STD, ProceduralShapes, load_fashion_mnist
from ijepa_hf.data.fashion_mnist import DEFAULT_FASHION_MNIST_DIR
from ijepa_hf.evaluation import (attentive_probe, extract_features, format_results_table, knn_probe, linear_probe,
                                 low_shot_linear_probe)
from ijepa_hf.modeling_ijepa_hf import sincos_position_embeddings
from ijepa_hf.training import PretrainingSchedule, PretrainingStep, build_optimizer, keep_freed_memory_for_reuse
from ijepa_hf.training.kernels import choose_attention_implementation
from ijepa_hf.training.recipes import get_recipe

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling helper below, also when imported by path
from machine import cpu_description  # noqa: E402  (benchmarks/machine.py, beside this script)
from ijepa_hf.visualization import plot_training_curves

logger = logging.getLogger("learning")

TASKS = ("fashion-mnist", "spatial")
METHODS = ("ijepa", "mae", "random", "pixels")
DEFAULT_BUDGET_MINUTES = {"fashion-mnist": 20.0, "spatial": 5.0}
# Budgets in images seen compare across machines; the default is what 20 minutes gave on a 2-core AMX Xeon with the
# small recipe (8,742 steps of batch 128). The spatial task keeps its wall-clock default (no such reference run).
DEFAULT_BUDGET_IMAGES = {"fashion-mnist": 8742 * 128}
# Below this budget the run is a smoke test: probe on subsets so it ends in a few minutes (override with
# --probe-train-size / --probe-test-size).
SMOKE_BUDGET_MINUTES = 2.0
SMOKE_PROBE_SIZES = (4000, 1000)
SPATIAL_PROBE_TRAIN_IMAGES = 5000
# Named starting points: the encoder size of this benchmark, then the library's recipe of the same name
# (ijepa_hf.training.recipes) for the predictor and the warm-up. Any of these flags given explicitly wins.
ENCODER_SIZES = {
    # the reference sizes (the official code was measured with them), with the reference predictor
    "official": dict(width=192, depth=6, heads=3, predictor_width=96, predictor_depth=4),
    # the smaller encoder that learned more per CPU-minute (benchmarks/README.md); the predictor is the recipe's
    "small": dict(width=128, depth=4, heads=2),
}


def recipe_defaults(name: str) -> dict[str, Any]:
    """The flags ``--recipe name`` fills: this benchmark's encoder size, the library recipe's predictor (sized
    relative to that encoder) and warm-up."""
    recipe = get_recipe(name)
    values = dict(ENCODER_SIZES[name], warmup_fraction=recipe.warmup_ratio)
    encoder = IJepaEncoderConfig(hidden_size=values["width"], num_hidden_layers=values["depth"],
                                 num_attention_heads=values["heads"], intermediate_size=4 * values["width"])
    predictor = recipe.predictor_fields(IJepaPretrainingConfig(encoder_config=encoder.to_dict()))
    if "hidden_size" in predictor:
        values["predictor_width"] = predictor["hidden_size"]
    if "num_hidden_layers" in predictor:
        values["predictor_depth"] = predictor["num_hidden_layers"]
    return values


# A 1-minute load average at least this high before the run means other processes compete for the CPUs.
BUSY_LOAD_AVERAGE = 1.0
INSTALL_COMMAND = ["apt-get", "install", "-y", "dataset-fashion-mnist"]
# Fraction of the budget at which the planned number of steps is re-estimated from the measured speed.
REPLAN_FRACTIONS = (0.25, 0.5, 0.75)
# Training steps whose FLOPs are counted (steps 2 to 1 + FLOP_COUNT_STEPS).
FLOP_COUNT_STEPS = 3
# Provisional schedule length while the first steps are timed: the lr stays at ~start_lr, the EMA at ~start.
PROVISIONAL_STEPS = 1_000_000


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ImageData:
    """Images of one task as ``uint8 [N, C, S, S]`` (C = 1 for Fashion-MNIST, 3 for the scenes) plus labels.

    uint8 keeps 60k images at 32 px in 60 MB (float32 would be 4x); batches are converted on the fly.
    """

    train: torch.Tensor
    test: torch.Tensor
    train_labels: dict[str, torch.Tensor]
    test_labels: dict[str, torch.Tensor]
    mean: tuple[float, ...]  # per stored channel, in [0, 1] units
    std: tuple[float, ...]
    description: str

    @property
    def image_size(self) -> int:
        return int(self.train.shape[-1])

    def to_model_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] float ``[B, C, S, S]`` -> normalised float32 ``[B, 3, S, S]`` (grey is repeated)."""
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        x = (x - mean) / std
        return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


def fashion_mnist_install_message(root: str | os.PathLike | None) -> str:
    where = root or os.environ.get("FASHION_MNIST_DIR") or DEFAULT_FASHION_MNIST_DIR
    return (
        f"Fashion-MNIST not found in {where}. Install Debian's package with\n"
        f"    sudo {' '.join(INSTALL_COMMAND)}\n"
        "(or rerun this script with --install as root), or point FASHION_MNIST_DIR / --fashion-mnist-dir to a folder "
        "holding {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]."
    )


def fashion_mnist_available(root: str | os.PathLike | None = None) -> bool:
    try:
        load_fashion_mnist("test", root)
    except FileNotFoundError:
        return False
    return True


def ensure_fashion_mnist(root: str | os.PathLike | None, install: bool) -> None:
    """Raise ``SystemExit`` with the apt-get command when the IDX files are missing (or install them with
    ``install=True`` when running as root)."""
    if fashion_mnist_available(root):
        return
    if not install:
        raise SystemExit(fashion_mnist_install_message(root))
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        raise SystemExit("--install needs root. " + fashion_mnist_install_message(root))
    logger.info("Installing Fashion-MNIST: %s", " ".join(INSTALL_COMMAND))
    subprocess.run(INSTALL_COMMAND, check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if not fashion_mnist_available(root):
        raise SystemExit("apt-get finished but the files are still missing. " + fashion_mnist_install_message(root))


def upsample_uint8(images: np.ndarray, size: int) -> torch.Tensor:
    """``uint8 [N, H, W]`` -> ``uint8 [N, 1, size, size]`` (bilinear, in chunks to bound memory)."""
    out = torch.empty(images.shape[0], 1, size, size, dtype=torch.uint8)
    source = torch.from_numpy(images)
    for start in range(0, len(source), 8192):
        chunk = source[start : start + 8192, None].float()
        resized = F.interpolate(chunk, size=(size, size), mode="bilinear", align_corners=False)
        out[start : start + 8192] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


def load_fashion_mnist_data(
    image_size: int = 32,
    root: str | os.PathLike | None = None,
    train_size: int | None = None,
    test_size: int | None = None,
) -> ImageData:
    """Fashion-MNIST upsampled to ``image_size``; mean/std from the training images (one grey channel)."""
    train_images, train_labels = load_fashion_mnist("train", root)
    test_images, test_labels = load_fashion_mnist("test", root)
    train_images, train_labels = train_images[:train_size], train_labels[:train_size]
    test_images, test_labels = test_images[:test_size], test_labels[:test_size]
    train = upsample_uint8(train_images, image_size)
    test = upsample_uint8(test_images, image_size)
    pixels = train.float().div_(255.0)
    return ImageData(
        train=train,
        test=test,
        train_labels={"label": torch.from_numpy(train_labels)},
        test_labels={"label": torch.from_numpy(test_labels)},
        mean=(pixels.mean().item(),),
        std=(pixels.std().item(),),
        description=f"Fashion-MNIST {len(train)} train / {len(test)} test, 28 px -> {image_size} px, grey x3",
    )


def render_shapes(
    num_images: int, image_size: int, seed: int, progress: bool = True
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Render ``ProceduralShapes`` into ``uint8 [N, 3, S, S]`` and its labels (count, shape, position)."""
    dataset = ProceduralShapes(num_images, image_size=image_size, seed=seed)
    images = torch.empty(num_images, 3, image_size, image_size, dtype=torch.uint8)
    count = torch.empty(num_images, dtype=torch.long)
    shape = torch.empty(num_images, dtype=torch.long)
    position = torch.empty(num_images, 2, dtype=torch.float32)
    for i in tqdm(range(num_images), desc=f"rendering scenes (seed {seed})", disable=not progress, mininterval=2):
        array, labels = dataset.render(i)
        images[i] = torch.from_numpy(array).permute(2, 0, 1)
        count[i], shape[i] = labels["count"], labels["shape"]
        position[i] = torch.tensor(labels["position"])
    return images, {"count": count, "shape": shape, "position": position}


def load_spatial_data(
    image_size: int, train_images: int, test_images: int, seed: int, progress: bool = True
) -> ImageData:
    """Procedural scenes: a pretraining/probe-training set and an independent test set (another seed)."""
    train, train_labels = render_shapes(train_images, image_size, seed, progress)
    test, test_labels = render_shapes(test_images, image_size, seed + 1_000_003, progress)
    return ImageData(
        train=train,
        test=test,
        train_labels=train_labels,
        test_labels=test_labels,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        description=f"ProceduralShapes {train_images} train / {test_images} test, {image_size} px",
    )


def random_resized_crop_batch(
    images: torch.Tensor,
    scale: tuple[float, float] = (0.3, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    tries: int = 10,
) -> torch.Tensor:
    """Random resized crop of a whole float batch ``[B, C, H, W]`` back to ``H x W`` (bilinear, one grid_sample).

    Boxes follow torchvision's rule, vectorised: ``tries`` draws of area ~ U(scale) and log-aspect ~ U(log ratio)
    per image, the first integer box that fits is placed uniformly; otherwise the whole image (the torchvision
    fallback for a square image whose ratio range contains 1). Doing it per batch on tensors avoids a PIL round
    trip per image, which would cost more than the training step of this tiny ViT. Inside the box this equals
    crop-then-resize (bilinear); the outermost output pixels blend in the image just outside the box instead of
    clamping at its edge.
    """
    batch, _, height, width = images.shape
    area = height * width
    u = torch.rand(batch, tries, 2, generator=generator)
    target_area = area * (scale[0] + u[..., 0] * (scale[1] - scale[0]))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + u[..., 1] * (log_hi - log_lo))
    w = torch.sqrt(target_area * aspect).round()
    h = torch.sqrt(target_area / aspect).round()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((batch,), -1))
    rows = torch.arange(batch)
    w = torch.where(first >= 0, w[rows, first.clamp_min(0)], torch.full((batch,), float(width)))
    h = torch.where(first >= 0, h[rows, first.clamp_min(0)], torch.full((batch,), float(height)))
    pos = torch.rand(batch, 2, generator=generator)
    top = torch.floor(pos[:, 0] * (height - h + 1))
    left = torch.floor(pos[:, 1] * (width - w + 1))
    # align_corners=False: output pixel j samples the box at left + (j + 0.5) * w / W_out, i.e. x_n = a * u + b.
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0] = w / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


class EpochBatches:
    """Endless shuffled mini-batches of indices (a fresh permutation per epoch, last partial batch dropped)."""

    def __init__(self, num_items: int, batch_size: int, generator: torch.Generator) -> None:
        if num_items < batch_size:
            raise ValueError(f"{num_items} training images are fewer than one batch of {batch_size}")
        self.num_items, self.batch_size, self.generator = num_items, batch_size, generator
        self.epoch = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            order = torch.randperm(self.num_items, generator=self.generator)
            yield from order[: self.num_items // self.batch_size * self.batch_size].split(self.batch_size)
            self.epoch += 1


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


def build_ijepa(args: argparse.Namespace) -> IJepaForPreTraining:
    """The small I-JEPA of this benchmark (encoder ``--width/--depth/--heads``, predictor ``--predictor-*``)."""
    config = IJepaPretrainingConfig(
        encoder_config=dict(
            image_size=args.image_size, patch_size=args.patch_size, hidden_size=args.width,
            num_hidden_layers=args.depth, num_attention_heads=args.heads, intermediate_size=args.mlp_ratio * args.width,
        ),
        predictor_config=dict(
            hidden_size=args.predictor_width, num_hidden_layers=args.predictor_depth,
            num_attention_heads=args.predictor_heads or args.heads,
        ),
        num_target_blocks=args.num_target_blocks,
        context_scale=args.context_scale,
        target_scale=args.target_scale,
        target_aspect_ratio=args.target_aspect_ratio,
        min_keep=args.min_keep,
        allow_overlap=args.allow_overlap,
        mask_mode=args.mask_mode,
        ema_momentum=args.ema,
    )
    model = IJepaForPreTraining(config)
    check_ijepa_position_tables(model)
    return model


def check_ijepa_position_tables(model: IJepaForPreTraining) -> None:
    """Assert that every fixed sin-cos table equals its formula (not zero, not left uninitialised)."""
    for name, module in (("context_encoder", model.context_encoder), ("target_encoder", model.target_encoder),
                         ("predictor", model.predictor)):
        expected = sincos_position_embeddings(module.pos_embed.shape[-1], tuple(module.grid_size))[None]
        table = module.pos_embed.detach().float().cpu()
        if not torch.count_nonzero(table) or not torch.allclose(table, expected, atol=1e-6):
            raise AssertionError(f"{name}.pos_embed is not the sin-cos table (max |diff| "
                                 f"{(table - expected).abs().max().item():.3g}); the init trap of hf-conventions §8")
    if not torch.count_nonzero(model.predictor.mask_token):
        raise AssertionError("predictor.mask_token is all zeros: its init did not run")


def build_mae(args: argparse.Namespace) -> Any:
    """transformers' ``ViTMAEForPreTraining`` with the I-JEPA encoder's size, initialised properly."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    config = ViTMAEConfig(
        image_size=args.image_size, patch_size=args.patch_size, num_channels=3, hidden_size=args.width,
        num_hidden_layers=args.depth, num_attention_heads=args.heads, intermediate_size=args.mlp_ratio * args.width,
        decoder_hidden_size=args.mae_decoder_width, decoder_num_hidden_layers=args.mae_decoder_depth,
        decoder_num_attention_heads=args.mae_decoder_heads, decoder_intermediate_size=4 * args.mae_decoder_width,
        mask_ratio=args.mae_mask_ratio, norm_pix_loss=args.mae_norm_pix_loss,
    )
    model = ViTMAEForPreTraining(config)
    initialize_mae(model)
    check_mae_initialization(model)
    return model


def initialize_mae(model: Any) -> None:
    """Re-run ViT-MAE's own initialisers, which transformers 5.24 skips for a model built from a config.

    In 5.24 ``post_init`` flags the patch projection as initialised (``_is_hf_initialized``) before
    ``ViTMAEEmbeddings.initialize_weights`` runs, so that method returns at once, and
    ``ViTMAEPreTrainedModel._init_weights`` zeroes the decoder's mask token and position table. The result has
    all-zero (and frozen) position embeddings, CLS and mask tokens: no position information at all. Clearing the
    flags and calling both modules' ``initialize_weights`` restores MAE's sin-cos tables, xavier patch projection
    and N(0, 0.02) tokens.
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
            raise AssertionError(f"MAE {name} is zero or degenerate: the transformers 5.24 init trap "
                                 "(hf-conventions §8); call initialize_mae(model)")
    for name, token in (("cls_token", embeddings.cls_token), ("mask_token", decoder.mask_token)):
        if not torch.count_nonzero(token):
            raise AssertionError(f"MAE {name} is all zeros: the transformers 5.24 init trap; call initialize_mae")


# ----------------------------------------------------------------------------------------------------------------
# Training for a wall-clock budget
# ----------------------------------------------------------------------------------------------------------------


class _Learner:
    """What both methods share: a stateless schedule whose length :meth:`retarget` moves to a newly planned step
    count (values already used are not rewritten: the caller passes the update number)."""

    name = ""
    schedule: PretrainingSchedule
    warmup_fraction: float

    def retarget(self, total_steps: int) -> None:
        total_steps = max(1, int(total_steps))
        self.schedule = dataclasses.replace(self.schedule, total_steps=total_steps, warmup_steps=min(
            total_steps, int(round(self.warmup_fraction * total_steps))))

    def values(self, update: int) -> dict[str, float]:
        return self.schedule.values_at(update)


def select_attention(method: str, model: Any, requested: str, batch: Callable[[], Mapping[str, torch.Tensor]],
                     autocast: Callable[[], Any] = nullcontext) -> str:
    """Sets ``model``'s attention kernel: ``requested``, or with ``"auto"`` the faster one on this machine, timed
    on ``batch()`` (as ``pretrain --attn_implementation auto``; logged). Returns the kernel's name."""
    if requested != "auto":
        model.set_attn_implementation(requested)
        return requested
    choice, seconds = choose_attention_implementation(model, batch(), autocast)
    logger.info("%s attention: %s (forward + backward of one batch: %s)", method, choice,
                ", ".join(f"{name} {value * 1e3:.0f} ms" for name, value in seconds.items()))
    return choice


class IJepaLearner(_Learner):
    """The library's I-JEPA training step (``ijepa_hf.training.PretrainingStep``: lr/wd schedules first, forward,
    smooth-L1, backward, AdamW, then the EMA of the target encoder) on batches masked by the library's collator."""

    name = "ijepa"

    def __init__(self, model: IJepaForPreTraining, args: argparse.Namespace) -> None:
        from accelerate import Accelerator

        self.model = model.train()
        if args.precision == "bf16":
            # Autocast around forward only, as Accelerate's mixed precision does (backward follows forward's dtypes).
            model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)
        self.collator = IJepaMaskCollator.from_config(model.config, seed=args.seed)
        size = args.image_size
        self.attention = select_attention(
            "I-JEPA", model, args.attn_implementation,
            lambda: {"pixel_values": torch.randn(args.batch_size, model.config.encoder_config.num_channels, size, size),
                     **self.collator.sample_batch(args.batch_size, batch_index=0)})
        self.optimizer = build_optimizer(
            model, lr=args.lr, weight_decay=args.weight_decay
        )
        self.warmup_fraction = args.warmup_fraction
        self.schedule = PretrainingSchedule(
            total_steps=PROVISIONAL_STEPS, warmup_steps=int(args.warmup_fraction * PROVISIONAL_STEPS),
            start_lr=args.start_lr, peak_lr=args.lr, final_lr=args.final_lr, start_weight_decay=args.weight_decay,
            final_weight_decay=args.final_weight_decay, ema_start=args.ema[0], ema_end=args.ema[1])
        self.step_fn = PretrainingStep(Accelerator(cpu=True), self.model, self.optimizer, self.schedule)

    def retarget(self, total_steps: int) -> None:
        super().retarget(total_steps)
        # At once, not at the next step: a re-plan after the budget's last step must still reach the library step.
        self.step_fn.schedule = self.schedule

    def step(self, pixel_values: torch.Tensor, update: int, want_stats: bool) -> tuple[float, dict[str, float]]:
        context_mask, target_masks = self.collator.sample_masks(pixel_values.shape[0])
        self.step_fn.schedule = self.schedule
        out = self.step_fn({"pixel_values": pixel_values, "context_mask": context_mask, "target_masks": target_masks},
                           update, want_stats=want_stats)
        stats: dict[str, float] = {}
        if want_stats:
            stats = dict(out.stats)
            stats.update(context_patches=float(out.context_patches), target_patches=float(out.target_patches))
        return out.loss.item(), stats


class MAELearner(_Learner):
    """One MAE step with transformers' ``ViTMAEForPreTraining`` (random 75 % masking inside the model)."""

    name = "mae"

    def __init__(self, model: Any, args: argparse.Namespace) -> None:
        self.model = model.train()
        # The official groups (no decay on biases / 1-D params) and fused AdamW, with MAE's betas and a constant
        # weight decay (MAE's recipe has no wd schedule).
        self.optimizer = build_optimizer({"mae": model}, lr=args.mae_lr, weight_decay=args.mae_weight_decay,
                                         betas=(0.9, 0.95))
        self.warmup_fraction = args.warmup_fraction
        self.schedule = PretrainingSchedule(
            total_steps=PROVISIONAL_STEPS, warmup_steps=int(args.warmup_fraction * PROVISIONAL_STEPS),
            start_lr=args.start_lr * args.mae_lr / args.lr, peak_lr=args.mae_lr, final_lr=args.final_lr,
            start_weight_decay=args.mae_weight_decay, final_weight_decay=args.mae_weight_decay)
        self.autocast = args.precision == "bf16"
        # The same kernel choice as I-JEPA's (CPU SDPA's backward is slow for these small heads on some machines;
        # each method gets the faster kernel).
        size = args.image_size
        self.attention = select_attention(
            "MAE", model, args.attn_implementation,
            lambda: {"pixel_values": torch.randn(args.batch_size, 3, size, size)},
            lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast))

    def step(self, pixel_values: torch.Tensor, update: int, want_stats: bool) -> tuple[float, dict[str, float]]:
        self.schedule.apply(self.optimizer, update)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.model(pixel_values=pixel_values).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item(), {}

    def values(self, update: int) -> dict[str, float]:
        return {"lr": self.schedule.lr_at(update)}


@dataclass
class TrainResult:
    method: str
    steps: int
    planned_steps: int | None
    images_seen: int
    epochs: float
    seconds: float
    budget_seconds: float | None
    final_loss: float | None
    images_per_s: float
    load_average_before: tuple[float, float, float] | None
    load_average_after: tuple[float, float, float] | None
    # Matmul / convolution / attention FLOPs of the training steps (forward + backward, torch's FlopCounterMode,
    # mean of FLOP_COUNT_STEPS counted steps times the number of steps; elementwise work is not counted)
    training_flops: float | None = None
    flops_per_step: float | None = None
    log: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("log")
        return out


def _load_average() -> tuple[float, float, float] | None:
    try:
        return tuple(round(v, 2) for v in os.getloadavg())  # type: ignore[return-value]
    except (AttributeError, OSError):
        return None


def train_for_budget(
    learner: IJepaLearner | MAELearner,
    data: ImageData,
    args: argparse.Namespace,
    budget_seconds: float | None,
    max_steps: int | None = None,
    log_path: Path | None = None,
) -> TrainResult:
    """Train ``learner`` on ``data.train`` (labels unused) until the budget or the planned steps run out.

    With ``max_steps`` the run has that many steps (schedules sized for it, no timing). Otherwise the first
    ``args.calibration_steps`` steps are timed (the very first one, which pays one-off allocations, excluded) to
    plan the number of steps that fits the budget; the plan is re-estimated at :data:`REPLAN_FRACTIONS` of the
    budget from the average speed so far. The calibration steps are real training steps and count towards the
    budget.
    """
    if budget_seconds is None and max_steps is None:
        raise ValueError("give a budget or max_steps")
    generator = torch.Generator().manual_seed(args.seed)
    batches = iter(EpochBatches(len(data.train), args.batch_size, generator))
    planned = max_steps
    if planned is not None:
        learner.retarget(planned)
    replans = list(REPLAN_FRACTIONS) if budget_seconds else []
    rows: list[dict[str, Any]] = []
    window_loss, window_count, window_images = 0.0, 0, 0
    load_before = _load_average()
    progress = tqdm(total=planned, desc=f"{learner.name} pretraining", disable=not args.progress, dynamic_ncols=True,
                    mininterval=1.0)
    start = time.perf_counter()
    window_start = start
    calibration_start: float | None = None
    step, images_seen, last_loss = 0, 0, None
    counted_flops: list[int] = []
    if log_path is not None:
        log_path.unlink(missing_ok=True)
    while True:
        now = time.perf_counter()
        elapsed = now - start
        if budget_seconds is not None and elapsed >= budget_seconds:
            break
        if planned is not None and step >= planned:
            break
        index = next(batches)
        images = data.train[index].float().div_(255.0)
        if args.augment == "rrc":
            images = random_resized_crop_batch(images, scale=args.crop_scale, generator=generator)
        pixel_values = data.to_model_input(images)
        want_stats = (step + 1) % args.log_every == 0
        # FLOPs of steps 2.. (the first pays one-off work); counting slows those steps a little.
        counting = 1 <= step <= FLOP_COUNT_STEPS
        with FlopCounterMode(display=False) if counting else nullcontext() as counter:
            loss, stats = learner.step(pixel_values, step + 1, want_stats)
        if counting:
            counted_flops.append(counter.get_total_flops())
        step += 1
        images_seen += len(index)
        last_loss = loss
        window_loss, window_count, window_images = window_loss + loss, window_count + 1, window_images + len(index)
        progress.update(1)
        now = time.perf_counter()

        if not math.isfinite(loss):
            raise FloatingPointError(f"{learner.name}: non-finite loss {loss} at step {step}")
        # ---- planning the number of steps that fits the budget
        if budget_seconds is not None and max_steps is None:
            # The first step pays one-off allocations: time from its end.
            due = step == args.calibration_steps
            while replans and now - start >= replans[0] * budget_seconds:
                replans.pop(0)
                due = True
            if step == 1:
                calibration_start = now
            elif due and calibration_start is not None:
                seconds_per_step = (now - calibration_start) / (step - 1)
                planned = step + int((budget_seconds - (now - start)) / seconds_per_step)
                learner.retarget(planned)
                progress.total = planned
                progress.refresh()
                logger.info("%s: %.3f s/step after %d steps -> %d steps planned for the budget", learner.name,
                            seconds_per_step, step, planned)

        # ---- logging
        if step % args.log_every == 0 or (planned is not None and step == planned):
            row = {"step": step, "loss": window_loss / window_count, **learner.values(step),
                   "images_per_s": window_images / max(now - window_start, 1e-9), "elapsed_s": round(now - start, 2),
                   **stats}
            rows.append(row)
            if log_path is not None:
                with log_path.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
            progress.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", refresh=False)
            if len(rows) % args.print_every == 0:
                extra = " ".join(f"{k}={v:.3g}" for k, v in stats.items())
                logger.info("%s step %d/%s loss %.4f lr %.2e %s", learner.name, step, planned, row["loss"], row["lr"],
                            extra)
            window_loss, window_count, window_images, window_start = 0.0, 0, 0, now
    progress.close()
    seconds = time.perf_counter() - start
    flops_per_step = sum(counted_flops) / len(counted_flops) if counted_flops else None
    return TrainResult(
        method=learner.name, steps=step, planned_steps=planned, images_seen=images_seen,
        epochs=images_seen / len(data.train), seconds=round(seconds, 2),
        budget_seconds=budget_seconds, final_loss=rows[-1]["loss"] if rows else last_loss,
        images_per_s=images_seen / max(seconds, 1e-9), load_average_before=load_before,
        load_average_after=_load_average(),
        training_flops=flops_per_step * step if flops_per_step is not None else None,
        flops_per_step=flops_per_step, log=rows,
    )


# ----------------------------------------------------------------------------------------------------------------
# Frozen features
# ----------------------------------------------------------------------------------------------------------------


class NormalisedImages(torch.utils.data.Dataset):
    """``{"pixel_values": [3, S, S]}`` items of a uint8 image tensor, for ``ijepa_hf.evaluation.extract_features``.

    ``__getitems__`` normalises a whole batch at once (the DataLoader calls it instead of ``__getitem__``).
    """

    def __init__(self, images: torch.Tensor, data: ImageData) -> None:
        self.images, self.data = images, data

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.data.to_model_input(self.images[index : index + 1])[0]}

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        batch = self.data.to_model_input(self.images[torch.as_tensor(indices)])
        return [{"pixel_values": row} for row in batch]


def ijepa_features(
    encoder: IJepaEncoderModel, images: torch.Tensor, data: ImageData, args: argparse.Namespace,
    tokens: bool = False,
) -> torch.Tensor:
    """Average-pooled final features ``[N, D]`` of an I-JEPA encoder, with the package's ``extract_features``, or
    with ``tokens=True`` the final patch tokens ``[N, T, D]`` (their mean over T is the pooled feature)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
        features, _ = extract_features(encoder, NormalisedImages(images, data), label_column=None,
                                       batch_size=args.eval_batch_size, progress=args.progress, pool=not tokens)
    return features


@contextmanager
def mae_without_masking(model: Any) -> Iterator[None]:
    """Temporarily set MAE's mask ratio to 0 so the encoder sees every patch (restored afterwards)."""
    config = model.vit.embeddings.config
    previous = config.mask_ratio
    config.mask_ratio = 0.0
    try:
        yield
    finally:
        config.mask_ratio = previous


@torch.no_grad()
def mae_features(model: Any, images: torch.Tensor, data: ImageData, args: argparse.Namespace,
                 tokens: bool = False) -> torch.Tensor:
    """MAE encoder features without masking: the mean of the patch tokens (CLS excluded), after the final norm,
    ``[N, D]``; with ``tokens=True`` the patch tokens themselves ``[N, T, D]``."""
    vit = model.vit
    was_training = vit.training
    vit.eval()
    num_patches = vit.embeddings.patch_embeddings.num_patches
    features = []
    try:
        with mae_without_masking(model), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            for start in tqdm(range(0, len(images), args.eval_batch_size), desc="Extracting MAE features",
                              disable=not args.progress, unit="batch"):
                batch = data.to_model_input(images[start : start + args.eval_batch_size])
                # Increasing "noise" keeps the patches in raster order (no random shuffle; pooling ignores order).
                noise = torch.arange(num_patches, dtype=torch.float32).expand(len(batch), -1)
                hidden = vit(pixel_values=batch, noise=noise).last_hidden_state
                features.append(hidden[:, 1:].float() if tokens else hidden[:, 1:].mean(dim=1).float())
    finally:
        vit.train(was_training)
    return torch.cat(features)


def pixel_features(images: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """Raw pixels in [0, 1], flattened (Fashion-MNIST: its one grey channel, 32 x 32 = 1024 values).

    ``size`` average-pools the images to ``size x size`` first: the 64 px RGB scenes would give 12k dimensions,
    which makes the probes slower than the pretraining (16 x 16 x 3 = 768 keeps object layout and colour).
    """
    pixels = images.float().div_(255.0)
    if size is not None and size < pixels.shape[-1]:
        pixels = F.adaptive_avg_pool2d(pixels, size)
    return pixels.flatten(1)


def pixel_tokens(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Raw pixels in [0, 1] as patch tokens ``[N, T, C * p * p]`` (raster order), for the attentive probe: the same
    tokens a ViT's patch projection sees, without any learned weights."""
    pixels = images.float().div_(255.0)
    return F.unfold(pixels, kernel_size=patch_size, stride=patch_size).transpose(1, 2).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Probes
# ----------------------------------------------------------------------------------------------------------------


def _ridge_solutions(x: torch.Tensor, y: torch.Tensor, penalties: Sequence[float]) -> list[torch.Tensor]:
    """``argmin ||x W - y||^2 + p * n * ||W||^2`` for each ``p`` (float64, one eigendecomposition for all).

    Uses the d x d Gram matrix when d <= n and the n x n kernel matrix otherwise (raw-pixel features of the scenes
    have 12k dimensions), so the cost is set by the smaller side.
    """
    n, d = x.shape
    if d <= n:
        eigenvalues, vectors = torch.linalg.eigh(x.T @ x)
        projected = vectors.T @ (x.T @ y)
        return [vectors @ (projected / (eigenvalues + p * n).unsqueeze(1)) for p in penalties]
    eigenvalues, vectors = torch.linalg.eigh(x @ x.T)
    projected = vectors.T @ y
    return [x.T @ (vectors @ (projected / (eigenvalues + p * n).unsqueeze(1))) for p in penalties]


def ridge_probe(
    train_features: torch.Tensor,
    train_targets: torch.Tensor,
    test_features: torch.Tensor,
    test_targets: torch.Tensor,
    penalties: Sequence[float] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0),
    val_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, Any]:
    """Closed-form ridge regression on frozen, standardised features (intercept unpenalised).

    The penalty (per sample, on standardised features) is chosen by mean squared error on a held-out
    ``val_fraction`` of the training set, then the model is refitted on the whole training set.

    Returns ``{"r2" (mean over target dimensions), "r2_per_dim", "mae" (mean absolute error, target units),
    "penalty", "penalty_search" ({penalty: val MSE})}``.
    """
    x = train_features.double()
    y = train_targets.double().reshape(len(x), -1)
    x_test = test_features.double()
    y_test = test_targets.double().reshape(len(x_test), -1)

    def fit(
        x_fit: torch.Tensor, y_fit: torch.Tensor, grid: Sequence[float]
    ) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        mean, std = x_fit.mean(0), x_fit.std(0).clamp_min(1e-6)
        y_mean = y_fit.mean(0)
        weights = _ridge_solutions((x_fit - mean) / std, y_fit - y_mean, grid)
        return [lambda z, w=w: ((z - mean) / std) @ w + y_mean for w in weights]

    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    num_val = max(1, int(round(val_fraction * len(x))))
    val, fit_index = order[:num_val], order[num_val:]
    search = {}
    for penalty, predict in zip(penalties, fit(x[fit_index], y[fit_index], penalties)):
        search[penalty] = ((predict(x[val]) - y[val]) ** 2).mean().item()
    chosen = min(penalties, key=lambda p: (search[p], -p))
    prediction = fit(x, y, [chosen])[0](x_test)
    residual = ((prediction - y_test) ** 2).sum(0)
    total = ((y_test - y_test.mean(0)) ** 2).sum(0).clamp_min(1e-12)
    r2 = 1 - residual / total
    return {
        "r2": r2.mean().item(),
        "r2_per_dim": r2.tolist(),
        "mae": (prediction - y_test).abs().mean().item(),
        "penalty": chosen,
        "penalty_search": search,
    }


def probe_sizes(args: argparse.Namespace, data: ImageData) -> tuple[int, int]:
    """Numbers of training / test images the probes use (all of them unless a smoke budget or the flags say)."""
    smoke = args.budget_minutes is not None and args.budget_minutes < SMOKE_BUDGET_MINUTES and args.max_steps is None
    train = args.probe_train_size or (SMOKE_PROBE_SIZES[0] if smoke else len(data.train))
    test = args.probe_test_size or (SMOKE_PROBE_SIZES[1] if smoke else len(data.test))
    return min(train, len(data.train)), min(test, len(data.test))


def classification_probes(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                          args: argparse.Namespace, knn: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"linear": linear_probe(train_x, train_y, test_x, test_y, seed=args.seed)}
    if knn:
        out["knn"] = knn_probe(train_x, train_y, test_x, test_y, k=args.knn_k)
    return out


def evaluate_features(name: str, train_x: torch.Tensor, test_x: torch.Tensor, data: ImageData, task: str,
                      args: argparse.Namespace, extra: Mapping[str, Any],
                      tokens: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, Any]:
    """Probe one set of frozen features ``[N, D]`` (and, for the attentive probe, their patch tokens
    ``([N_train, T, D'], [N_test, T, D'])``); returns a table row (nested dicts hold the probes' details)."""
    n_train, n_test = len(train_x), len(test_x)
    train_labels = {k: v[:n_train] for k, v in data.train_labels.items()}
    test_labels = {k: v[:n_test] for k, v in data.test_labels.items()}
    start = time.perf_counter()
    with torch_threads(args.probe_threads):
        row = _probe_row(name, train_x, test_x, train_labels, test_labels, data, task, args, extra)
        if task == "fashion-mnist" and args.low_shot_labels:
            # The paper's 1% protocol: a linear probe trained on a class-balanced 1% of the labels, tested on all
            # test images; a mean over draws of the labelled subset (the draw moves the result more than the seed
            # of the probe does).
            low = low_shot_linear_probe(train_x, train_labels["label"], test_x, test_labels["label"],
                                        num_labels=args.low_shot_labels,
                                        seeds=[1000 * args.seed + draw for draw in range(args.low_shot_draws)])
            row["low_shot_accuracy"] = low["accuracy"]
            row["probes"]["low_shot_linear"] = low
        if task == "fashion-mnist" and tokens is not None and args.attentive_epochs:
            attentive = attentive_probe(tokens[0], train_labels["label"], tokens[1], test_labels["label"],
                                        epochs=args.attentive_epochs, batch_size=args.attentive_batch_size,
                                        seed=args.seed)
            row["attentive_accuracy"] = attentive["accuracy"]
            row["probes"]["attentive"] = attentive
    row["feature_dim"] = int(train_x.shape[1])
    logger.info("%s probed in %.1fs: %s", name, time.perf_counter() - start,
                {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if not isinstance(v, dict)})
    return row


@contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    """Temporarily run torch with ``num_threads`` intra-op threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _probe_row(name: str, train_x: torch.Tensor, test_x: torch.Tensor, train_labels: Mapping[str, torch.Tensor],
               test_labels: Mapping[str, torch.Tensor], data: ImageData, task: str, args: argparse.Namespace,
               extra: Mapping[str, Any]) -> dict[str, Any]:
    if task == "fashion-mnist":
        probes = classification_probes(train_x, train_labels["label"], test_x, test_labels["label"], args)
        row = {"model": name, "linear_accuracy": probes["linear"]["accuracy"],
               "knn_accuracy": probes["knn"]["accuracy"], **extra}
    else:
        count = classification_probes(train_x, train_labels["count"], test_x, test_labels["count"], args)
        shape = classification_probes(train_x, train_labels["shape"], test_x, test_labels["shape"], args, knn=False)
        position = ridge_probe(train_x, train_labels["position"], test_x, test_labels["position"], seed=args.seed)
        probes = {"count": count, "shape": shape, "position": position}
        row = {"model": name, "count_linear_accuracy": count["linear"]["accuracy"],
               "count_knn_accuracy": count["knn"]["accuracy"], "shape_linear_accuracy": shape["linear"]["accuracy"],
               "position_r2": position["r2"], "position_mae_px": position["mae"] * data.image_size, **extra}
    row["probes"] = probes
    return row


# ----------------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = cpu_description()
    import transformers

    return {
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "ijepa_hf": ijepa_hf.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "load_average_at_start": _load_average(),
    }


def load_task_data(args: argparse.Namespace) -> ImageData:
    if args.task == "fashion-mnist":
        ensure_fashion_mnist(args.fashion_mnist_dir, args.install)
        return load_fashion_mnist_data(args.image_size, args.fashion_mnist_dir, args.train_size, args.test_size)
    return load_spatial_data(args.image_size, args.train_size or args.spatial_train_images,
                             args.test_size or args.spatial_test_images, args.seed, args.progress)


def _plot(result: TrainResult, path: Path, title: str) -> str | None:
    if not result.log:
        return None
    try:
        return str(plot_training_curves(result.log, path, title=title))
    except (ValueError, RuntimeError) as error:  # nothing to plot, or no matplotlib backend
        logger.warning("Could not plot %s: %s", path, error)
        return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described by ``args`` (see :func:`parse_args`); returns the results dict (also saved)."""
    torch.set_num_threads(args.threads)
    keep_freed_memory_for_reuse()  # as the package's training loops do on CPU; it helps every method alike
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    prefix = args.task
    budget_seconds = None if args.max_steps else args.budget_minutes * 60.0

    data = load_task_data(args)
    n_train, n_test = probe_sizes(args, data)
    machine = machine_info()
    logger.info("Data: %s; probes on %d train / %d test images", data.description, n_train, n_test)
    logger.info("Machine: %s", machine)
    load = machine["load_average_at_start"]
    if load is not None and load[0] >= BUSY_LOAD_AVERAGE:
        logger.warning(
            "Other processes are using the CPUs (1-min load average %.2f before this run). With every core busy a "
            "%d-thread torch step can be several times slower (OpenMP threads wait for descheduled siblings), so a "
            "fixed budget buys fewer steps; prefer a quiet machine (or --threads 1 while others run).",
            load[0], args.threads)
    budget_text = (f"{args.max_steps} steps of {args.batch_size} ({args.max_steps * args.batch_size:,} images)"
                   if args.max_steps else f"{args.budget_minutes:g} min")

    rows: list[dict[str, Any]] = []
    training: dict[str, dict[str, Any]] = {}
    curves: dict[str, str | None] = {}

    attentive = args.task == "fashion-mnist" and args.attentive_epochs > 0

    def probe(name: str, train_x: torch.Tensor, test_x: torch.Tensor, extra: Mapping[str, Any],
              tokens: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        rows.append(evaluate_features(name, train_x, test_x, data, args.task, args, extra, tokens))

    def probe_model(name: str, features: Callable[..., torch.Tensor], extra: Mapping[str, Any]) -> None:
        """Probe a model's frozen features; ``features(images, tokens=...)`` gives pooled or token features."""
        if not attentive:
            probe(name, features(data.train[:n_train]), features(data.test[:n_test]), extra)
            return
        train_tokens, test_tokens = features(data.train[:n_train], tokens=True), features(data.test[:n_test], tokens=True)
        probe(name, train_tokens.mean(dim=1), test_tokens.mean(dim=1), extra, (train_tokens, test_tokens))

    if "pixels" in args.methods:
        name = "raw pixels" if args.pixel_size >= data.image_size else f"raw pixels ({args.pixel_size} px)"
        probe(name, pixel_features(data.train[:n_train], args.pixel_size),
              pixel_features(data.test[:n_test], args.pixel_size), {"steps": None, "images_seen": None},
              (pixel_tokens(data.train[:n_train], args.patch_size), pixel_tokens(data.test[:n_test], args.patch_size))
              if attentive else None)

    if "ijepa" in args.methods or "random" in args.methods:
        torch.manual_seed(args.seed)
        model = build_ijepa(args)
        if "random" in args.methods:
            # The same architecture and the very weights I-JEPA starts from.
            random_encoder = model.export_encoder("context")
            probe_model("random init (same ViT)",
                        lambda images, tokens=False: ijepa_features(random_encoder, images, data, args, tokens),
                        {"steps": 0, "images_seen": 0, "training_flops": 0})
            del random_encoder
        if "ijepa" in args.methods:
            learner = IJepaLearner(model, args)
            logger.info("I-JEPA: %s trainable parameters, masks %r",
                        f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,}", learner.collator)
            result = train_for_budget(learner, data, args, budget_seconds, args.max_steps,
                                      output_dir / f"{prefix}_ijepa_log.jsonl")
            check_ijepa_position_tables(model)
            training["ijepa"] = result.summary()
            curves["ijepa"] = _plot(result, output_dir / f"{prefix}_ijepa_curves.png",
                                    f"I-JEPA on {args.task}, {budget_text}")
            extra = {"steps": result.steps, "images_seen": result.images_seen, "training_flops": result.training_flops}
            model.target_encoder.save_pretrained(output_dir / "ijepa_target_encoder")
            probe_model("I-JEPA target encoder",
                        lambda images, tokens=False: ijepa_features(model.target_encoder, images, data, args, tokens),
                        extra)
            if not args.skip_context_encoder:
                probe_model("I-JEPA context encoder",
                            lambda images, tokens=False: ijepa_features(model.context_encoder, images, data, args,
                                                                        tokens), extra)
        del model

    if "mae" in args.methods:
        torch.manual_seed(args.seed)
        mae = build_mae(args)
        learner = MAELearner(mae, args)
        logger.info("MAE: %s trainable parameters", f"{sum(p.numel() for p in mae.parameters() if p.requires_grad):,}")
        result = train_for_budget(learner, data, args, budget_seconds, args.max_steps,
                                  output_dir / f"{prefix}_mae_log.jsonl")
        check_mae_initialization(mae)
        training["mae"] = result.summary()
        curves["mae"] = _plot(result, output_dir / f"{prefix}_mae_curves.png", f"MAE on {args.task}, {budget_text}")
        mae.save_pretrained(output_dir / "mae")
        probe_model("MAE (transformers ViTMAE)",
                    lambda images, tokens=False: mae_features(mae, images, data, args, tokens),
                    {"steps": result.steps, "images_seen": result.images_seen,
                     "training_flops": result.training_flops})
        del mae

    table = format_results_table(rows)
    header = (f"{args.task}: {budget_text} per method, batch {args.batch_size}, {args.image_size} px, patch "
              f"{args.patch_size}, ViT {args.width}x{args.depth}, {args.precision}; probes on {n_train} train / "
              f"{n_test} test images\nmachine: {machine['cpu']}, {machine['cpu_count']} CPUs, "
              f"torch {machine['torch']}, "
              f"{machine['torch_threads']} threads ({args.probe_threads} for the probes), load average at start "
              f"{machine['load_average_at_start']}")
    results = {
        "task": args.task, "header": header, "table": table, "rows": rows, "training": training,
        "curves": curves, "data": data.description, "probe_train_size": n_train, "probe_test_size": n_test,
        "machine": machine, "settings": {k: v for k, v in vars(args).items()}, "command": " ".join(sys.argv),
    }
    path = output_dir / f"{prefix}_results.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    print("\n" + header + "\n\n" + table + "\n")
    for name, summary in training.items():
        print(f"{name}: {summary['steps']} steps (planned {summary['planned_steps']}) in {summary['seconds']:.0f}s, "
              f"{summary['images_per_s']:.0f} images/s, {summary['epochs']:.2f} epochs, final loss "
              f"{summary['final_loss']:.4f}, load average {summary['load_average_before']} -> "
              f"{summary['load_average_after']}")
    print(f"\nresults: {path}")
    return results


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def _pair(text: str) -> tuple[float, float]:
    values = [float(v) for v in str(text).replace(" ", "").strip("()[]").split(",")]
    if len(values) != 2 or values[0] > values[1]:
        raise argparse.ArgumentTypeError(f"expected 'min,max', got {text!r}")
    return values[0], values[1]


def _methods(text: str) -> tuple[str, ...]:
    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"methods must be a comma-separated subset of {METHODS}, got {text!r}")
    return methods


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--task", choices=TASKS, default="fashion-mnist")
    add("--budget-minutes", type=float, default=None,
        help=f"wall-clock pretraining budget per method (default {DEFAULT_BUDGET_MINUTES})")
    add("--max-steps", type=int, default=None, help="train exactly this many optimizer steps per method")
    add("--budget-images", type=int, default=None,
        help="train on this many images per method (steps = images / batch size; default for fashion-mnist: "
             f"{DEFAULT_BUDGET_IMAGES['fashion-mnist']:,}, i.e. 8,742 steps of 128); the same on every machine, "
             "unlike --budget-minutes")
    add("--methods", type=_methods, default=METHODS, help=f"comma-separated subset of {','.join(METHODS)}")
    add("--output-dir", default="outputs/learning")
    add("--seed", type=int, default=0)
    add("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    add("--precision", choices=("bf16", "fp32"), default="bf16", help="bf16 autocast for training and extraction")
    add("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    add("--log-every", type=int, default=10, help="log a row (loss, lr, ...) every N steps")
    add("--print-every", type=int, default=10, help="print every N-th logged row")
    add("--calibration-steps", type=int, default=6, help="steps timed to plan the schedules' length")
    # data
    add("--image-size", type=int, default=None, help="32 for fashion-mnist, 64 for spatial")
    add("--patch-size", type=int, default=None, help="4 for fashion-mnist, 8 for spatial")
    add("--train-size", type=int, default=None, help="use only the first N training images (default all)")
    add("--test-size", type=int, default=None, help="use only the first N test images (default all)")
    add("--probe-train-size", type=int, default=None,
        help=f"training images for the probes (default all; {SMOKE_PROBE_SIZES[0]} below a "
             f"{SMOKE_BUDGET_MINUTES:g}-min budget)")
    add("--probe-test-size", type=int, default=None,
        help=f"test images for the probes (default all; {SMOKE_PROBE_SIZES[1]} below a {SMOKE_BUDGET_MINUTES:g}-min "
             "budget)")
    add("--pixel-size", type=int, default=None,
        help="raw-pixel baseline resolution (average pooling): 32 for fashion-mnist (all pixels), 16 for spatial")
    add("--spatial-train-images", type=int, default=20000)
    add("--spatial-test-images", type=int, default=2000)
    add("--fashion-mnist-dir", default=None,
        help=f"IDX folder (default $FASHION_MNIST_DIR or {DEFAULT_FASHION_MNIST_DIR})")
    add("--install", action="store_true", help="apt-get install dataset-fashion-mnist if missing (needs root)")
    add("--augment", choices=("rrc", "none"), default="rrc", help="random resized crop (official) or none")
    add("--crop-scale", type=_pair, default=(0.3, 1.0))
    # model
    add("--recipe", choices=tuple(ENCODER_SIZES), default="official",
        help="model sizes and warm-up: 'official' (the issue's reference sizes: ViT 192x6, predictor 96x4, warm-up "
             "40/300) or 'small' (ViT 128x4 with the library's small recipe, ijepa_hf.training.recipes: a one-block "
             "predictor as wide as the encoder, warm-up 25%%: 2x the steps in a short budget); the flags below "
             "override it")
    add("--batch-size", type=int, default=128)
    add("--width", type=int, default=None)
    add("--depth", type=int, default=None)
    add("--heads", type=int, default=None)
    add("--mlp-ratio", type=int, default=4)
    add("--predictor-width", type=int, default=None)
    add("--predictor-depth", type=int, default=None)
    add("--predictor-heads", type=int, default=None, help="default: the encoder's (official)")
    add("--attn-implementation", choices=("auto", "sdpa", "eager"), default="auto",
        help="attention kernel of I-JEPA and MAE; auto: the faster of the two for each, timed on one batch at the start")
    # masks
    add("--num-target-blocks", type=int, default=4)
    add("--context-scale", type=_pair, default=(0.85, 1.0))
    add("--target-scale", type=_pair, default=(0.15, 0.2))
    add("--target-aspect-ratio", type=_pair, default=(0.75, 1.5))
    add("--min-keep", type=int, default=4)
    add("--mask-mode", choices=("fixed", "official"), default="fixed")
    add("--allow-overlap", action="store_true")
    # optimisation
    add("--lr", type=float, default=1e-3)
    add("--start-lr", type=float, default=2e-4)
    add("--final-lr", type=float, default=1e-6)
    add("--warmup-fraction", type=float, default=None)
    add("--weight-decay", type=float, default=0.04)
    add("--final-weight-decay", type=float, default=0.4)
    add("--ema", type=_pair, default=(0.996, 1.0))
    # MAE
    add("--mae-lr", type=float, default=1e-3)
    add("--mae-weight-decay", type=float, default=0.05)
    add("--mae-mask-ratio", type=float, default=0.75)
    add("--mae-decoder-width", type=int, default=128)
    add("--mae-decoder-depth", type=int, default=2)
    add("--mae-decoder-heads", type=int, default=4)
    add("--mae-norm-pix-loss", action="store_true")
    # evaluation
    add("--knn-k", type=int, default=20)
    add("--eval-batch-size", type=int, default=512)
    add("--probe-threads", type=int, default=1,
        help="torch threads for the probes: L-BFGS is a stream of small vector ops for which a second OpenMP thread "
             "costs more than it gains, and which slow down 40x when another process holds the cores")
    add("--skip-context-encoder", action="store_true", help="do not probe the I-JEPA context encoder")
    add("--low-shot-labels", type=int, default=600,
        help="fashion-mnist: also a linear probe trained on this many class-balanced labels (1%% of 60,000, as the "
             "paper's 1%% ImageNet protocol); 0 turns it off")
    add("--low-shot-draws", type=int, default=3, help="labelled subsets drawn for the low-shot probe (mean reported)")
    add("--attentive-epochs", type=int, default=10,
        help="fashion-mnist: epochs of the attentive probe (ijepa_hf.evaluation.attentive_probe) on the final patch "
             "tokens; 0 turns it off")
    add("--attentive-batch-size", type=int, default=256)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for name, value in recipe_defaults(args.recipe).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    spatial = args.task == "spatial"
    if sum(value is not None for value in (args.budget_minutes, args.max_steps, args.budget_images)) > 1:
        raise SystemExit("give one budget: --budget-minutes, --max-steps or --budget-images")
    if args.budget_minutes is None and args.max_steps is None and args.budget_images is None:
        args.budget_images = DEFAULT_BUDGET_IMAGES.get(args.task)
    if args.budget_images is not None:
        if args.budget_images < args.batch_size:
            raise SystemExit(f"--budget-images {args.budget_images} is less than one batch of {args.batch_size}")
        args.max_steps = args.budget_images // args.batch_size
    if args.budget_minutes is None:
        args.budget_minutes = DEFAULT_BUDGET_MINUTES[args.task]
    if args.image_size is None:
        args.image_size = 64 if spatial else 32
    if args.patch_size is None:
        args.patch_size = 8 if spatial else 4
    if args.pixel_size is None:
        args.pixel_size = 16 if spatial else args.image_size
    if args.budget_minutes <= 0 and args.max_steps is None:
        raise SystemExit("--budget-minutes must be > 0 (or give --max-steps)")
    if args.image_size % args.patch_size:
        raise SystemExit(f"--image-size {args.image_size} is not a multiple of --patch-size {args.patch_size}")
    for name in ("log_every", "print_every", "batch_size", "eval_batch_size", "threads", "probe_threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.calibration_steps < 2:
        raise SystemExit("--calibration-steps must be >= 2 (the first step is not timed)")
    if spatial and args.probe_train_size is None and args.budget_minutes >= SMOKE_BUDGET_MINUTES:
        # 5000 of the 20000 pretraining scenes: raw-pixel features of the scenes have 12k dimensions, and the
        # probes on all 20000 would take longer than the pretraining.
        args.probe_train_size = SPATIAL_PROBE_TRAIN_IMAGES
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
