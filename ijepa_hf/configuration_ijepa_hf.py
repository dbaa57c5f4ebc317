# Copyright 2026 The ijepa-hf Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Configurations of the I-JEPA encoder, predictor and pretraining model.

This file is self-contained (it imports only transformers, huggingface_hub and the standard library) so that it
can be copied next to the weights of a Hub repo and loaded with ``trust_remote_code=True`` by people who do not
have ``ijepa_hf`` installed.

The configs follow transformers 5.x: ``@strict`` dataclasses whose annotated fields are type-checked on
assignment and whose ``validate_*`` methods run after ``__init__`` (and again before ``save_pretrained``); the
pretraining config is a composite declared through ``sub_configs_defaults``. Invalid values raise a `ValueError`
naming the field and the fix (it is also huggingface_hub's ``StrictDataclass*ValidationError``).

The pretraining config is the one place where the multi-block mask settings are defined and validated
(`check_mask_settings`); the mask collator reads its defaults and rules from here.

The model types are ``ijepa_hf_encoder``, ``ijepa_hf_predictor`` and ``ijepa_hf_pretraining``; transformers'
own ``ijepa`` type (its encoder-only ``IJepaModel``) is left untouched and is reached through conversion.
"""

# Linter note (transformers' structural linter, `mlinter ijepa_hf`), for the `# trf-ignore` comments below:
# TRF057: `@auto_docstring` takes a model's name and intro from transformers' own model registry, which this package
# is not part of (it renders "a None model" and drops the hand-written text), so the configs document themselves.

import copy
import dataclasses
import difflib
import math
import numbers
from typing import Any

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from transformers import PreTrainedConfig

__all__ = [
    "IJepaEncoderConfig",
    "IJepaPredictorConfig",
    "IJepaPretrainingConfig",
    "ENCODER_SIZES",
    "PRETRAINING_PRESETS",
    "MASK_FIELDS",
    "MASK_MODES",
    "MASK_SAMPLINGS",
    "CONTEXT_LENGTHS",
    "POOLER_NORMS",
    "NEW_HEAD_POOLER_NORM",
    "ENCODER_CHOICES",
    "REGULARIZED_EMBEDDINGS",
    "ConfigValueError",
    "ConfigTypeError",
    "check_grid",
    "check_mask_settings",
    "config_override_items",
    "default_mask_sampling",
    "list_presets",
    "parse_config_overrides",
]

# ----------------------------------------------------------------------------------------------------------------
# Strict dataclasses whose errors stay `ValueError`s
# ----------------------------------------------------------------------------------------------------------------


class ConfigValueError(StrictDataclassClassValidationError, ValueError):
    """A ``validate_*`` check failed. The message names the field and the fix."""

    def __init__(self, validator: str, cause: Exception) -> None:
        Exception.__init__(self, str(cause))  # the cause names the field; strict's prefix adds nothing
        self.validator = validator

    def __reduce__(self):  # picklable (e.g. raised in a DataLoader worker)
        return type(self), (self.validator, ValueError(str(self)))


class ConfigTypeError(StrictDataclassFieldValidationError, TypeError, ValueError):
    """A field got a value of the wrong type (e.g. ``hidden_size="x"``)."""

    def __init__(self, field: str, cause: Exception) -> None:
        super().__init__(field=field, cause=cause)
        self.field, self.cause = field, cause

    def __reduce__(self):
        return type(self), (self.field, TypeError(str(self.cause)))


def _value_errors(cls: type) -> type:
    """Applied over huggingface_hub's ``@strict``: its errors are raised as `ValueError`s as well, as this package's
    configs always raised them (callers and the CLI catch `ValueError`). The checks themselves are ``@strict``'s
    (the field annotations) and the ``validate_*`` methods."""
    run_validators, strict_setattr = cls.validate, cls.__setattr__

    def validate(self) -> None:
        """Run the ``validate_*`` checks; raises `ConfigValueError` (a `ValueError`) naming the field."""
        try:
            run_validators(self)
        except StrictDataclassClassValidationError as error:
            if isinstance(error, ConfigValueError):
                raise
            cause = error.__cause__ or error
            raise ConfigValueError(getattr(error, "validator", "validate"), cause) from cause

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            strict_setattr(self, name, value)
        except StrictDataclassFieldValidationError as error:
            if isinstance(error, ConfigTypeError):
                raise
            raise ConfigTypeError(field=name, cause=error.__cause__ or error) from error.__cause__

    validate.__is_defined_by_strict_decorator__ = True  # lets subclasses apply @strict again
    cls.validate, cls.__setattr__ = validate, __setattr__
    return cls


# ----------------------------------------------------------------------------------------------------------------
# Field checks (each names the field it rejects)
# ----------------------------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _as_pair(value: Any, field_name: str) -> tuple[int, int]:
    if _is_int(value):
        return int(value), int(value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v) for v in value):
        return int(value[0]), int(value[1])
    raise ValueError(f"`{field_name}` must be an int or a pair of ints (height, width), got {value!r}.")


def _check_positive_int(value: Any, field_name: str) -> None:
    if not _is_int(value) or value <= 0:
        raise ValueError(f"`{field_name}` must be a positive integer, got {value!r}.")


def _check_range(value: Any, field_name: str, low: float, high: float, *, low_open: bool = True) -> tuple[float, float]:
    """Validates a finite (min, max) pair inside (low, high] (or [low, high] when ``low_open`` is False)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ValueError(f"`{field_name}` must be a (min, max) pair of numbers, got {value!r}.")
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"`{field_name}` must be a (min, max) pair of numbers, got {value!r}.") from None
    lower_ok = (lo > low) if low_open else (lo >= low)
    if not (math.isfinite(lo) and math.isfinite(hi) and lower_ok and hi <= high and lo <= hi):
        interval = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ValueError(f"`{field_name}` must be finite, satisfy min <= max and lie in {interval}, got {value!r}.")
    return lo, hi


def check_grid(image_size: Any, patch_size: Any, prefix: str = "") -> tuple[int, int]:
    """(rows, columns) of the patch grid; raises `ValueError` naming ``image_size`` / ``patch_size``."""
    image_h, image_w = _as_pair(image_size, f"{prefix}image_size")
    patch_h, patch_w = _as_pair(patch_size, f"{prefix}patch_size")
    for value, name in ((image_h, "image_size"), (image_w, "image_size"), (patch_h, "patch_size"), (patch_w, "patch_size")):
        _check_positive_int(value, prefix + name)
    if image_h % patch_h or image_w % patch_w:
        raise ValueError(
            f"`{prefix}image_size` {image_size} is not divisible by `{prefix}patch_size` {patch_size}: "
            f"choose an image size that is a multiple of the patch size (e.g. {image_h // patch_h * patch_h} or "
            f"{(image_h // patch_h + 1) * patch_h})."
        )
    return image_h // patch_h, image_w // patch_w


# ----------------------------------------------------------------------------------------------------------------
# Mask settings: defined (IJepaPretrainingConfig's fields) and validated (here) once
# ----------------------------------------------------------------------------------------------------------------

MASK_MODES = ("fixed", "official")
# How the contexts of one batch are made rectangular: "shortest" cuts every context to the shortest of the batch (the
# official collator), "per_image" keeps each image's own and pads (the model then masks the padding).
CONTEXT_LENGTHS = ("shortest", "per_image")
MASK_FIELDS = ("num_target_blocks", "context_scale", "target_scale", "target_aspect_ratio", "min_keep",
               "allow_overlap", "mask_mode", "context_lengths")
# Which batch a data-parallel process samples the masks of (`mask_sampling`): the global batch, keeping its own rows
# (a P-process run sees the masks of a 1-process run), or its own batch alone (the official code).
MASK_SAMPLINGS = ("global", "per_process")
_LOSSES = ("smooth_l1", "mse")
# What the anti-collapse regularisers see (`regularized_embeddings`): each image's context-encoder output averaged
# over its context patches ([B, D]), or every context token ([B * Kc, D], padding left out).
REGULARIZED_EMBEDDINGS = ("context_pooled", "context_tokens")


def default_mask_sampling(mask_mode: str) -> str:
    """The sampling scope of a mask mode when `mask_sampling` is not given: the official code's (each process its
    own batch) for ``"official"``, the global batch for ``"fixed"``."""
    return "per_process" if mask_mode == "official" else "global"


def check_mask_settings(
    *,
    num_target_blocks: Any,
    context_scale: Any,
    target_scale: Any,
    target_aspect_ratio: Any,
    min_keep: Any,
    allow_overlap: Any,
    mask_mode: Any,
    context_lengths: Any = "shortest",
) -> dict[str, Any]:
    """The one rule set of the multi-block mask settings (`IJepaPretrainingConfig` and `IJepaMaskCollator`).

    Rules: ``num_target_blocks`` a positive int; ``context_scale`` / ``target_scale`` finite ``(min, max)`` in
    ``(0, 1]``; ``target_aspect_ratio`` a finite positive ``(min, max)``; ``min_keep`` an int >= 0;
    ``allow_overlap`` a bool; ``mask_mode`` one of `MASK_MODES`;
    ``context_lengths`` one of `CONTEXT_LENGTHS`.

    Returns:
        The settings normalised: ints, ``(min, max)`` float tuples, a bool and the mode string.

    Raises:
        ValueError: naming the first invalid field.
    """
    _check_positive_int(num_target_blocks, "num_target_blocks")
    if not _is_int(min_keep) or min_keep < 0:
        raise ValueError(f"`min_keep` must be a non-negative integer, got {min_keep!r}.")
    if not isinstance(allow_overlap, bool):
        raise ValueError(f"`allow_overlap` must be a bool (true/false), got {allow_overlap!r}.")
    if mask_mode not in MASK_MODES:
        raise ValueError(f"`mask_mode` must be one of {MASK_MODES}, got {mask_mode!r}.")
    if context_lengths not in CONTEXT_LENGTHS:
        raise ValueError(
            f"`context_lengths` must be one of {CONTEXT_LENGTHS}, got {context_lengths!r}: 'shortest' cuts every "
            "context of a batch to the shortest one (the official collator), 'per_image' keeps each image's own "
            "context and pads it."
        )
    return {
        "num_target_blocks": int(num_target_blocks),
        "context_scale": _check_range(context_scale, "context_scale", 0.0, 1.0),
        "target_scale": _check_range(target_scale, "target_scale", 0.0, 1.0),
        "target_aspect_ratio": _check_range(target_aspect_ratio, "target_aspect_ratio", 0.0, math.inf),
        "min_keep": int(min_keep),
        "allow_overlap": allow_overlap,
        "mask_mode": mask_mode,
        "context_lengths": context_lengths,
    }


# ----------------------------------------------------------------------------------------------------------------
# Encoder and predictor
# ----------------------------------------------------------------------------------------------------------------

# JSON gives lists, Python callers tuples; both are accepted and stored as lists.
_Size = int | list[int] | tuple[int, int]
_Range = list[float | int] | tuple[float | int, float | int]


# trf-ignore: TRF057 (linter note at the top of this file)
@_value_errors
@strict
class _IJepaTransformerConfig(PreTrainedConfig):
    """Fields shared by the encoder and the predictor: a stack of pre-norm ViT blocks on a patch grid."""

    image_size: _Size = 224
    patch_size: _Size = 16
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int | None = None  # None: 4 * hidden_size
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    initializer_range: float = 0.02
    attention_dropout: float | int = 0.0
    hidden_dropout: float | int = 0.0
    drop_path_rate: float | int = 0.0

    def __post_init__(self, **kwargs: Any) -> None:
        if isinstance(self.image_size, tuple):
            self.image_size = list(self.image_size)
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        super().__post_init__(**kwargs)

    def _check_transformer(self, prefix: str = "") -> None:
        """Raises `ValueError` naming the first invalid shared field (``prefix`` says whose field it is)."""
        check_grid(self.image_size, self.patch_size, prefix=prefix)
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            _check_positive_int(getattr(self, name), prefix + name)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"{prefix}`hidden_size` ({self.hidden_size}) must be divisible by {prefix}`num_attention_heads` "
                f"({self.num_attention_heads})."
            )
        for name in ("attention_dropout", "hidden_dropout", "drop_path_rate"):
            if not 0.0 <= float(getattr(self, name)) < 1.0:
                raise ValueError(f"{prefix}`{name}` must be in [0, 1), got {getattr(self, name)!r}.")
        if not float(self.layer_norm_eps) > 0:
            raise ValueError(f"{prefix}`layer_norm_eps` must be positive, got {self.layer_norm_eps!r}.")
        if not float(self.initializer_range) > 0:
            raise ValueError(f"{prefix}`initializer_range` must be positive, got {self.initializer_range!r}.")

    @property
    def grid_size(self) -> tuple[int, int]:
        """(rows, columns) of the patch grid at `image_size`."""
        return check_grid(self.image_size, self.patch_size)

    @property
    def num_patches(self) -> int:
        rows, cols = self.grid_size
        return rows * cols


# Normalisations of a classifier's pooled features (`IJepaEncoderConfig.pooler_norm`; None: unset), and the one a new
# head gets. The pooled features of an I-JEPA encoder share a large common offset and vary little around it, which a
# plain linear head trained with ordinary learning rates barely moves past; standardised, it learns
# (benchmarks/README.md, "Fine-tuning with Trainer", has the measurement that chose it).
POOLER_NORMS = (None, "none", "batchnorm", "layernorm")
NEW_HEAD_POOLER_NORM = "batchnorm"
# The two encoders of a pretraining model: the target encoder (the EMA one, which the paper evaluates) and the
# context encoder.
ENCODER_CHOICES = ("target", "context")


# trf-ignore: TRF057 (linter note at the top of this file)
@_value_errors
@strict
class IJepaEncoderConfig(_IJepaTransformerConfig):
    r"""Configuration of an I-JEPA vision transformer encoder (context or target encoder).

    A plain pre-norm ViT without CLS token, with fixed 2-D sin-cos position embeddings, as in the official
    implementation. Defaults describe a ViT-B/16 at 224 px; see `ENCODER_SIZES` and
    `IJepaPretrainingConfig.from_preset` for the official sizes.

    Args:
        image_size: Input resolution the position table is built for (other resolutions still work).
        patch_size: Side of the square patches.
        num_channels: Number of input channels.
        hidden_size: Width D of the transformer.
        num_hidden_layers: Number of blocks.
        num_attention_heads: Heads per block; must divide `hidden_size`.
        intermediate_size: Hidden width of the MLP (None: 4 * D, as all official sizes but ViT-g, 6144).
        hidden_act: MLP activation (exact GELU in the official code).
        layer_norm_eps: LayerNorm epsilon (1e-6 in the official code).
        qkv_bias: Bias in the fused query/key/value projection.
        initializer_range: Std of the truncated-normal init of linear and conv weights.
        attention_dropout, hidden_dropout, drop_path_rate: Regularisation (all 0 in the official pretraining).
        pooler_norm: How an image classifier on this encoder (`IJepaEncoderForImageClassification`) normalises the
            pooled features before its linear head: ``"batchnorm"`` (each feature standardised over the batch, with
            running statistics at evaluation, no affine parameters: MAE's linear-probe head), ``"layernorm"``
            (BEiT's and Data2Vec's ``fc_norm``), ``"none"``. Unset (``None``): a classifier saved without it has no
            normalisation, as it was trained; a new head on an encoder or pretraining repo gets
            `NEW_HEAD_POOLER_NORM`. Unused by the other models.
    """

    model_type = "ijepa_hf_encoder"
    # Read from a pretraining repo, an encoder's config is that repo's `encoder_config` (transformers' own rule for
    # one part of a composite config): an encoder class loads one encoder of a pretraining repo as any repo.
    base_config_key = "encoder_config"

    num_channels: int = 3
    pooler_norm: str | None = None

    def validate_encoder(self) -> None:
        """Raises `ValueError` naming the first invalid field (runs automatically)."""
        _check_positive_int(self.num_channels, "num_channels")
        if self.pooler_norm not in POOLER_NORMS:
            raise ValueError(f"`pooler_norm` must be one of {POOLER_NORMS}, got {self.pooler_norm!r}.")
        self._check_transformer()

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "IJepaEncoderConfig":
        """An encoder config of an official size, e.g. ``"vit_huge"`` (patch/image size via overrides)."""
        if name not in ENCODER_SIZES:
            raise ValueError(f"Unknown encoder size {name!r}; choose one of {sorted(ENCODER_SIZES)}.")
        return cls(**{**ENCODER_SIZES[name], **overrides})


# trf-ignore: TRF057 (linter note at the top of this file)
@_value_errors
@strict
class IJepaPredictorConfig(_IJepaTransformerConfig):
    r"""Configuration of the narrow I-JEPA predictor transformer.

    Args:
        encoder_hidden_size: Width D of the encoder whose outputs are predicted (input and output width).
        image_size, patch_size: Define the patch grid of the predictor's fixed sin-cos position table; they must
            match the encoder's.
        hidden_size: Predictor width (384 in every official config).
        num_hidden_layers: Predictor depth (12 for ViT-H, 16 for ViT-g in the official configs).
        num_attention_heads: Heads; the official code reuses the encoder's head count.
        intermediate_size: MLP width (4 * `hidden_size` by default).
        Other fields as in `IJepaEncoderConfig`.
    """

    model_type = "ijepa_hf_predictor"

    encoder_hidden_size: int = 768
    hidden_size: int = 384

    def validate_predictor(self) -> None:
        """Raises `ValueError` naming the first invalid field (runs automatically)."""
        _check_positive_int(self.encoder_hidden_size, "predictor encoder_hidden_size")
        self._check_transformer(prefix="predictor ")


# ----------------------------------------------------------------------------------------------------------------
# Pretraining (composite)
# ----------------------------------------------------------------------------------------------------------------

# Top-level fields of an encoder/predictor config: given to the pretraining config they mean the wrong kind of repo.
_SINGLE_MODEL_FIELDS = ("image_size", "patch_size", "hidden_size", "num_hidden_layers")
# Predictor fields inherited from the encoder unless given.
_PREDICTOR_INHERITS = {"encoder_hidden_size": "hidden_size", "image_size": "image_size",
                       "patch_size": "patch_size", "num_attention_heads": "num_attention_heads"}


# trf-ignore: TRF057 (linter note at the top of this file)
@_value_errors
@strict
class IJepaPretrainingConfig(PreTrainedConfig):
    r"""Configuration of the full I-JEPA pretraining model: context encoder, EMA target encoder (same
    architecture), predictor, plus the multi-block mask, loss and EMA settings of the recipe.

    Args:
        encoder_config: `IJepaEncoderConfig` or dict; shared by the context and the target encoder.
        predictor_config: `IJepaPredictorConfig` or dict. Its `encoder_hidden_size`, `image_size`, `patch_size`
            and `num_attention_heads` default to the encoder's; the first three must equal them.
        num_target_blocks: Target blocks per image (4).
        context_scale: Scale range of the context block (0.85, 1.0), aspect ratio 1.
        target_scale: Scale range of each target block (0.15, 0.2).
        target_aspect_ratio: Height/width range of the target blocks (0.75, 1.5); finite.
        min_keep: A mask must keep more than this many patches (10 in the official configs).
        allow_overlap: Whether the context may overlap the targets (False).
        mask_mode: ``"fixed"`` (default: the official sampler with its defects fixed) or ``"official"`` (the
            official distribution, defects included).
        context_lengths: ``"shortest"`` (default, the official collator) cuts the context of every image of a batch
            to the shortest context in the (global) batch, so the number of context patches an image keeps falls
            as the batch grows; ``"per_image"`` keeps each image's own context, padded to the longest of the batch,
            with the padding masked out of attention (the batch then computes exactly what each image would
            alone). Target blocks are unchanged by either: the sampler draws one target size per batch. The
            default stays the official behaviour, which the published recipes and their results were trained
            with.
        mask_sampling: Which batch each data-parallel process samples the masks of: ``"global"`` (the whole global
            batch, keeping its own rows: a run on P processes sees the masks of a run on one) or ``"per_process"``
            (its own batch alone, as the official code, whose context cut then depends on the per-process batch).
            ``None`` (default): the mask mode's own, ``"per_process"`` for ``"official"`` and ``"global"`` for
            ``"fixed"`` (`mask_sampling_scope`).
        loss: ``"smooth_l1"`` (the official code) or ``"mse"`` (the paper's L2).
        smooth_l1_beta: Beta of the smooth L1 loss (1.0 = torch default, as the official code).
        normalize_targets: Apply a parameter-free LayerNorm to the target encoder output (official).
        ema_momentum: (start, end) of the linear EMA momentum schedule (0.996, 1.0).
        sigreg_weight: Weight of SIGReg (LeJEPA, Balestriero & LeCun 2025) added to the prediction loss: the
            Epps-Pulley statistic between random 1-D projections of the regularised embeddings and a standard
            normal, averaged over the projections — it pushes the embeddings towards an isotropic Gaussian, which
            no collapsed representation is. 0 (default): off, the official objective.
        sigreg_num_slices: Random unit directions drawn afresh at every forward for SIGReg (256).
        vicreg_variance_weight: Weight of VICReg's variance term (Bardes et al. 2022; added to I-JEPA by C-JEPA):
            the mean over dimensions of ``max(0, 1 - std)`` of the regularised embeddings. 0 (default): off.
        vicreg_covariance_weight: Weight of VICReg's covariance term: the sum of the squared off-diagonal
            covariances of the regularised embeddings, divided by their width. 0 (default): off.
        regularized_embeddings: What the regularisers see, both computed on each process's micro-batch in fp32:
            ``"context_pooled"`` (default) — each image's context-encoder output averaged over its context patches,
            the features a probe reads once the EMA has carried them to the target encoder, so a collapse of
            exactly those is penalised; ``"context_tokens"`` — every context patch token, more samples per batch
            for the statistics and a constraint on the tokens themselves (what dense tasks read).
    """

    model_type = "ijepa_hf_pretraining"
    sub_configs_defaults = {"encoder_config": IJepaEncoderConfig, "predictor_config": IJepaPredictorConfig}

    encoder_config: IJepaEncoderConfig | dict | None = None
    predictor_config: IJepaPredictorConfig | dict | None = None
    # The multi-block mask settings (validated by `check_mask_settings`, the mask collator's defaults).
    num_target_blocks: int = 4
    context_scale: _Range = (0.85, 1.0)
    target_scale: _Range = (0.15, 0.2)
    target_aspect_ratio: _Range = (0.75, 1.5)
    min_keep: int = 10
    allow_overlap: bool = False
    mask_mode: str = "fixed"
    context_lengths: str = "shortest"
    mask_sampling: str | None = None
    # Loss and EMA.
    loss: str = "smooth_l1"
    smooth_l1_beta: float | int = 1.0
    normalize_targets: bool = True
    ema_momentum: _Range = (0.996, 1.0)
    # Anti-collapse regularisers (weight 0: off).
    sigreg_weight: float | int = 0.0
    sigreg_num_slices: int = 256
    vicreg_variance_weight: float | int = 0.0
    vicreg_covariance_weight: float | int = 0.0
    regularized_embeddings: str = "context_pooled"

    def __post_init__(self, **kwargs: Any) -> None:
        stray = sorted(k for k in _SINGLE_MODEL_FIELDS if k in kwargs)
        if stray:
            given = kwargs.get("model_type") or "an encoder/predictor config"
            raise ValueError(
                f"Expected a pretraining config (model_type {self.model_type!r}: encoder_config + predictor_config), "
                f"got the top-level fields {stray} of {given!r}: that is the config of a single encoder (e.g. a "
                "repo made by export_encoder or `ijepa-hf convert --encoder-only`). Pretrain from a preset "
                "(--config_name vit_base_patch16_224 ...) or a pretraining repo (`ijepa-hf convert` without "
                "--encoder-only); load an encoder repo with IJepaEncoderModel / AutoModel."
            )
        if not isinstance(self.encoder_config, IJepaEncoderConfig):
            self.encoder_config = IJepaEncoderConfig(**(self.encoder_config or {}))
        if not isinstance(self.predictor_config, IJepaPredictorConfig):
            # The predictor lives on the encoder's grid and width: inherit them unless given explicitly.
            inherited = {pred: getattr(self.encoder_config, enc) for pred, enc in _PREDICTOR_INHERITS.items()}
            self.predictor_config = IJepaPredictorConfig(**{**inherited, **(self.predictor_config or {})})
        for name in ("context_scale", "target_scale", "target_aspect_ratio", "ema_momentum"):
            setattr(self, name, list(getattr(self, name)))
        super().__post_init__(**kwargs)

    def validate_pretraining(self) -> None:
        """Raises `ValueError` naming the first invalid field of the composite (runs automatically)."""
        enc, pred = self.encoder_config, self.predictor_config
        if pred.encoder_hidden_size != enc.hidden_size:
            raise ValueError(
                f"`predictor_config.encoder_hidden_size` ({pred.encoder_hidden_size}) must equal "
                f"`encoder_config.hidden_size` ({enc.hidden_size})."
            )
        if pred.grid_size != enc.grid_size:
            raise ValueError(
                f"The predictor's patch grid {pred.grid_size} (image_size {pred.image_size}, patch_size "
                f"{pred.patch_size}) must equal the encoder's {enc.grid_size}: set the same image_size and "
                "patch_size in `predictor_config` as in `encoder_config`."
            )
        if self.loss not in _LOSSES:
            raise ValueError(f"`loss` must be one of {_LOSSES}, got {self.loss!r}.")
        if not float(self.smooth_l1_beta) > 0:
            raise ValueError(f"`smooth_l1_beta` must be positive, got {self.smooth_l1_beta!r}.")
        _check_range(self.ema_momentum, "ema_momentum", 0.0, 1.0, low_open=False)

    def validate_regularizers(self) -> None:
        """Raises `ValueError` naming the first invalid regulariser field (runs automatically)."""
        for name in ("sigreg_weight", "vicreg_variance_weight", "vicreg_covariance_weight"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"`{name}` must be a finite number >= 0 (0 turns the term off), got {value!r}.")
        if self.sigreg_num_slices < 1:
            raise ValueError(f"`sigreg_num_slices` must be >= 1, got {self.sigreg_num_slices!r}.")
        if self.regularized_embeddings not in REGULARIZED_EMBEDDINGS:
            raise ValueError(f"`regularized_embeddings` must be one of {REGULARIZED_EMBEDDINGS}, got "
                             f"{self.regularized_embeddings!r}.")

    @property
    def regularized(self) -> bool:
        """Whether any anti-collapse regulariser is on."""
        return any(float(getattr(self, name)) > 0
                   for name in ("sigreg_weight", "vicreg_variance_weight", "vicreg_covariance_weight"))

    def validate_masking(self) -> None:
        """Raises `ValueError` naming the first invalid mask field (runs automatically)."""
        check_mask_settings(**self.mask_settings())
        if self.mask_sampling is not None and self.mask_sampling not in MASK_SAMPLINGS:
            raise ValueError(f"`mask_sampling` must be one of {MASK_SAMPLINGS} or None (the mask mode's own), got "
                             f"{self.mask_sampling!r}.")

    @property
    def mask_sampling_scope(self) -> str:
        """`mask_sampling`, or when it is ``None`` the mask mode's own scope (``"per_process"`` for ``"official"``,
        ``"global"`` for ``"fixed"``)."""
        return default_mask_sampling(self.mask_mode) if self.mask_sampling is None else self.mask_sampling

    def mask_settings(self) -> dict[str, Any]:
        """The mask fields (`MASK_FIELDS`) of this config, as ``{name: value}``."""
        return {name: getattr(self, name) for name in MASK_FIELDS}

    @classmethod
    def default_mask_settings(cls) -> dict[str, Any]:
        """The defaults of the mask fields (what `IJepaMaskCollator` uses for settings it is not given)."""
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        return {name: defaults[name] for name in MASK_FIELDS}

    # Aliases so that mask samplers can read the geometry from the pretraining config directly.
    @property
    def image_size(self) -> int | list[int]:
        return self.encoder_config.image_size

    @property
    def patch_size(self) -> int | list[int]:
        return self.encoder_config.patch_size

    def updated(self, *, encoder: dict[str, Any] | None = None, predictor: dict[str, Any] | None = None,
                **fields: Any) -> "IJepaPretrainingConfig":
        """A validated copy with typed changes: top-level ``fields`` (``min_keep=4``, ``sigreg_weight=0.05``, ...)
        and ``encoder`` / ``predictor`` sub-config fields (``encoder={"image_size": 96}``).

        When the encoder's ``image_size``, ``patch_size`` or ``hidden_size`` change, the predictor follows unless
        its own value is given too, and an ``intermediate_size`` not given is re-derived from a new width (of either
        sub-config).

        Raises:
            ValueError: an unknown field (with close matches) or an invalid resulting config; ``TypeError`` (a
                `ConfigTypeError`, also a ``ValueError``) a value of the wrong type.
        """
        data = self.to_dict()
        changes = {"encoder": dict(encoder or {}), "predictor": dict(predictor or {}), "": fields}
        subs = {"encoder": data["encoder_config"], "predictor": data["predictor_config"], "": data}
        for prefix, values in changes.items():
            target, label = subs[prefix], f"{prefix}." if prefix else ""
            for name in values:
                if name not in target or name.endswith("_config") or name.startswith("_"):
                    valid = sorted(k for k in target if not k.startswith("_") and not k.endswith("_config"))
                    close = difflib.get_close_matches(name, valid, n=3)
                    hint = f" Did you mean {', '.join(label + c for c in close)}?" if close else ""
                    raise ValueError(
                        f"unknown config key {label + name!r}.{hint} Valid {label or 'top-level '}keys: "
                        f"{', '.join(valid)}" + ("" if prefix else "; sub-config keys take an 'encoder.' or "
                                                                     "'predictor.' prefix.")
                    )
            target.update(values)
        encoder_changes, predictor_changes = changes["encoder"], changes["predictor"]
        for pred_key, enc_key in _PREDICTOR_INHERITS.items():
            if pred_key == "num_attention_heads":
                continue  # an explicit head count of the predictor is kept
            if enc_key in encoder_changes and pred_key not in predictor_changes:
                subs["predictor"][pred_key] = encoder_changes[enc_key]
        for prefix in ("encoder", "predictor"):
            if "hidden_size" in changes[prefix] and "intermediate_size" not in changes[prefix]:
                subs[prefix]["intermediate_size"] = None  # re-derive 4 * hidden_size rather than keep the old width
        return type(self).from_dict(data)

    def update_from_string(self, update_str: str) -> None:
        """Update fields in place from ``"key=value,..."`` (transformers' ``--config_overrides`` language): the
        command line's edge of :meth:`updated`, which does the work.

        Keys are top-level fields (``num_target_blocks``, ``min_keep``, ``mask_mode``, ...) or ``encoder.<field>``
        / ``predictor.<field>`` for the sub-configs. Values: ``true``/``false``, ``none``, ints, floats, bracketed
        lists (``target_scale=[0.15,0.2]``), otherwise strings.

        Raises:
            ValueError: a malformed item, an unknown prefix or key (with close matches), a value of the wrong type,
                or an invalid resulting config; the config is left unchanged.
        """
        if parse_config_overrides(update_str):
            self.__dict__.update(self.updated(**self.override_changes(update_str)).__dict__)

    def override_changes(self, update_str: str | None) -> dict[str, Any]:
        """The typed changes an override string (see :meth:`update_from_string`) makes to this config, not applied,
        as :meth:`updated`'s keyword arguments: ``{"encoder": {...}, "predictor": {...}, <top-level field>: value}``.
        A caller with changes of its own (a command line's ``--image_size``) adds them, so that the result is
        validated once: ``encoder.patch_size=12`` with an image size of 96 is valid though 12 does not divide the
        default 224.

        Raises:
            ValueError: a malformed item or an unknown prefix (unknown keys and invalid values: :meth:`updated`).
        """
        changes: dict[str, Any] = {"encoder": {}, "predictor": {}}
        current = {"encoder": self.encoder_config, "predictor": self.predictor_config}
        for key, value in parse_config_overrides(update_str).items():
            prefix, dot, name = key.partition(".")
            if key in current:
                raise ValueError(f"{key!r} is a sub-config, not a field: set its fields ({key}.<field>=...)")
            if not dot:
                changes[key] = _string_value(value, getattr(self, key, None))
            elif prefix in current:
                changes[prefix][name] = _string_value(value, getattr(current[prefix], name, None))
            else:
                raise ValueError(f"unknown config prefix {prefix!r} in {key!r}; use 'encoder.' or 'predictor.'")
        return changes

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "IJepaPretrainingConfig":
        """The configuration of a named preset (see `list_presets()`), e.g. ``"vit_huge_patch14_224"`` (the
        official IN-1k ViT-H/14 recipe) or ``"vit_tiny_patch16_224"``.

        ``overrides`` may contain ``encoder`` / ``predictor`` dicts (merged into the sub-configs) and any
        top-level field.
        """
        if name not in PRETRAINING_PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {list_presets()}.")
        preset = copy.deepcopy(PRETRAINING_PRESETS[name])
        encoder = {**preset.pop("encoder"), **overrides.pop("encoder", {})}
        predictor = {**preset.pop("predictor"), **overrides.pop("predictor", {})}
        return cls(encoder_config=encoder, predictor_config=predictor, **{**preset, **overrides})


# ----------------------------------------------------------------------------------------------------------------
# `--config_overrides` language
# ----------------------------------------------------------------------------------------------------------------


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets (so list values like ``[0.15,0.2]`` survive)."""
    parts, depth, current = [], 0, []
    for char in text:
        depth += (char in "[(") - (char in "])")
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _parse_override_value(text: str) -> Any:
    """``true``/``false``/``none``, int, float, a bracketed list or a bare string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    if text[:1] in "[(" and text[-1:] in "])":
        return [_parse_override_value(v) for v in _split_top_level(text[1:-1])]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip("'\"")


def parse_config_overrides(text: str | None) -> dict[str, Any]:
    """Parse ``"a=1,encoder.hidden_size=192,target_scale=[0.15,0.2]"`` into ``{key: value}`` (keys keep their
    ``encoder.`` / ``predictor.`` prefix); see `IJepaPretrainingConfig.update_from_string`."""
    overrides: dict[str, Any] = {}
    for item in _split_top_level(text or ""):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or not value.strip():
            raise ValueError(f"config override {item!r} is not of the form key=value (in {text!r})")
        if key in overrides:
            raise ValueError(f"config override {key!r} is given twice (in {text!r})")
        overrides[key] = _parse_override_value(value.strip())
    return overrides


def config_override_items(text: str | None) -> list[tuple[str, str]]:
    """``(key, "key=value")`` for each item of an override string, in order, checked as `parse_config_overrides`
    checks them."""
    parse_config_overrides(text)
    return [(item.partition("=")[0].strip(), item) for item in _split_top_level(text or "")]


def _string_value(value: Any, current: Any) -> Any:
    """What the strings need beyond their parse, judged by the field's current value: text stays text (``"1"``
    parses as a number) and a whole number given to a float field is that float (``layer_norm_eps=1``). Every other
    type check is the configs' own (``@strict``)."""
    if isinstance(current, str) and not isinstance(value, str):
        return str(value)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


# ----------------------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------------------

# Official encoder sizes (facebookresearch/ijepa src/models/vision_transformer.py); LayerNorm eps 1e-6, qkv bias.
ENCODER_SIZES: dict[str, dict[str, int]] = {
    "vit_tiny": dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768),
    "vit_small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
    "vit_base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "vit_large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "vit_huge": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120),
    "vit_giant": dict(hidden_size=1408, num_hidden_layers=40, num_attention_heads=16, intermediate_size=6144),
}


def _preset(size: str, patch: int, image: int, predictor_depth: int, **extra: Any) -> dict[str, Any]:
    encoder = dict(ENCODER_SIZES[size], patch_size=patch, image_size=image)
    # The official helper gives the predictor the encoder's head count; the width is 384 in every config.
    predictor = dict(hidden_size=384, num_hidden_layers=predictor_depth,
                     num_attention_heads=encoder["num_attention_heads"])
    return dict(encoder=encoder, predictor=predictor, **extra)


PRETRAINING_PRESETS: dict[str, dict[str, Any]] = {
    # Generic sizes with the official predictor (width 384, depth 12) at 224 px.
    **{f"{size}_patch{patch}_224": _preset(size, patch, 224, 12)
       for size in ENCODER_SIZES for patch in (14, 16)},
    # The four released recipes (configs/*.yaml of the official repository).
    "ijepa_vith14_in1k": _preset("vit_huge", 14, 224, 12),
    "ijepa_vith16_448_in1k": _preset("vit_huge", 16, 448, 12),
    "ijepa_vith14_in22k": _preset("vit_huge", 14, 224, 12),
    "ijepa_vitg16_in22k": _preset("vit_giant", 16, 224, 16),
}


def list_presets() -> list[str]:
    """Names accepted by `IJepaPretrainingConfig.from_preset`."""
    return sorted(PRETRAINING_PRESETS)
