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
"""I-JEPA models: encoder, predictor, pretraining model (context + EMA target encoder + predictor + loss) and an
image-classification head.

Index conventions, fixed once for the whole package:
- patches are numbered in raster order, ``index = row * grid_width + column``;
- a context mask is a LongTensor ``[B, Kc]`` of patch indices, target masks are ``[B, M, Kt]`` (M blocks per image,
  or a list of M ``[B, Kt]`` tensors as the official code passes them);
- predictions and targets are ordered block-major: row ``j * B + b`` is target block ``j`` of image ``b``
  (the official layout);
- optional ``context_lengths`` LongTensor ``[B]``: only the first ``context_lengths[b]`` entries of row ``b`` of the
  context mask are context, the rest is padding (`IJepaMaskCollator(context_lengths="per_image")`). Padding tokens
  are never attended to (their keys are masked in every attention of the context encoder and the predictor), are
  zero in the outputs and get no gradient, so a padded batch computes what each image computes alone.

This file only imports torch, transformers, its sibling configuration files and `pretrained_loading` (what
``from_pretrained`` does with a repo), which import nothing else, so the four can be shipped with the weights for
``trust_remote_code=True`` loading (pushing imports ``ijepa_hf.hub`` for the card, when installed).
"""

# Linter note (transformers' structural linter, `mlinter ijepa_hf`), for the `# trf-ignore` comments below:
# - TRF057: `@auto_docstring` takes a model's name and intro from transformers' own model registry, which this package
#   is not part of (it renders "a None model" and drops the hand-written text), so the classes document themselves.
# - TRF001: `IJepaConfig` is the config of transformers' own `ijepa` type, which this package must not shadow.
# - TRF002: the predictor's empty prefix keeps the base class's `encoder.` off its weights; the pretraining model
#   holds three models (two encoders and the predictor) and no one base model to prefix.
# - TRF018: the official initialisation replaces transformers' default for every module these models hold.
# - TRF013: the base class's `__init__` only checks the config; each model's own `__init__` calls `post_init`.
# - TRF033: `IJepaForPreTraining.set_input_size` moves a model to another resolution (timm's method of that name):
#   it sets the config's `image_size` and recomputes what follows from it, the grid and the fixed sin-cos tables.

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.backbone_utils import BackboneMixin, filter_output_hidden_states
from transformers.modeling_outputs import BackboneOutput, BaseModelOutputWithPooling, ImageClassifierOutput, ModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_ijepa_hf import (
    ENCODER_CHOICES,
    NEW_HEAD_POOLER_NORM,
    IJepaEncoderConfig,
    IJepaPredictorConfig,
    IJepaPretrainingConfig,
)
from .configuration_ijepa_hf_backbone import BACKBONE_ARGUMENTS, IJepaBackboneConfig
from .pretrained_loading import from_pretrained_policy

__all__ = [
    "IJepaPreTrainedModel",
    "IJepaEncoderModel",
    "IJepaPredictorModel",
    "IJepaForPreTraining",
    "IJepaEncoderForImageClassification",
    "IJepaBackbone",
    "IJepaEncoderBackbone",
    "IJepaPredictorOutput",
    "IJepaForPreTrainingOutput",
    "sincos_position_embeddings",
    "gather_patches",
    "context_padding_mask",
    "SequencePacking",
    "packed_attention",
    "packed_sequences",
]


# ----------------------------------------------------------------------------------------------------------------
# Position embeddings and index helpers
# ----------------------------------------------------------------------------------------------------------------


def sincos_position_embeddings(embed_dim: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """Fixed 2-D sin-cos position table of the official code (MAE layout), float32 ``[rows * cols, embed_dim]``.

    The first ``embed_dim / 2`` channels encode the column index, the last half the row index; each half is
    ``[sin(pos * w_i), cos(pos * w_i)]`` with ``w_i = 10000 ** (-i / (embed_dim / 4))``. Computed in float64 and
    cast, as the official numpy code.
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {embed_dim}.")
    rows, cols = grid_size
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4.0))

    def one_axis(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    row_index, col_index = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64), indexing="ij"
    )
    table = torch.cat([one_axis(col_index), one_axis(row_index)], dim=1)
    return table.to(torch.float32)


def gather_patches(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Selects patches per image: ``tokens [B, N, D]``, ``indices [B, K]`` -> ``[B, K, D]``.

    ``tokens`` may also be a single table ``[1, N, D]`` shared by the batch (position embeddings).
    """
    if tokens.shape[0] == 1 and indices.shape[0] != 1:
        return tokens[0][indices]
    return torch.gather(tokens, 1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def _stack_target_masks(target_masks: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Normalises target masks to ``[B, M, Kt]``."""
    if isinstance(target_masks, torch.Tensor):
        if target_masks.dim() == 2:
            return target_masks.unsqueeze(1)
        if target_masks.dim() != 3:
            raise ValueError(f"`target_masks` must be [B, M, Kt] indices, got shape {tuple(target_masks.shape)}.")
        return target_masks
    return torch.stack(list(target_masks), dim=1)


def _check_context_lengths(context_lengths: torch.Tensor, context_mask: Any, batch_size: int) -> None:
    """Refuses ``context_lengths`` that do not describe the rows of ``context_mask [B, Kc]``."""
    if not isinstance(context_mask, torch.Tensor):
        raise ValueError(
            "`context_lengths` needs `context_mask` as one [B, Kc] tensor of padded rows, got a list of masks: pass "
            "one padded mask, or no `context_lengths` with a list of equal-length masks."
        )
    if not isinstance(context_lengths, torch.Tensor) or context_lengths.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"`context_lengths` must be an integer tensor [B], got {type(context_lengths).__name__} "
                         f"{getattr(context_lengths, 'dtype', '')}.")
    if tuple(context_lengths.shape) != (batch_size,):
        raise ValueError(f"`context_lengths` must have shape [{batch_size}] (one length per image), got "
                         f"{tuple(context_lengths.shape)}.")
    _require_in_range(
        context_lengths, 1, context_mask.shape[1],
        lambda found: f"`context_lengths` holds lengths {found}, outside [1, {context_mask.shape[1]}] (the padded "
                      "context length): each image needs at least one context patch, and no more than its row holds.")


def _require_in_range(values: torch.Tensor, low: int, high: int, message: Callable[[str], str]) -> None:
    """Raise ``ValueError(message("in [min, max]"))`` unless every element of ``values`` lies in ``[low, high]``.

    The host never reads a device value to decide: that would make it wait for the device at every forward. The
    assertion runs where the values are (on an accelerator it fails the run at its next sync, with a device-side
    assertion); only a failure is read back, to name the range found."""
    if values.numel() == 0 or torch.compiler.is_compiling():
        return
    try:
        torch._assert_async(((values >= low) & (values <= high)).all(), message("out of range"))
    except RuntimeError:
        found, top = torch.stack(torch.aminmax(values)).tolist()
        raise ValueError(message(f"in [{found}, {top}]")) from None


def context_padding_mask(context_lengths: torch.Tensor, length: int) -> torch.Tensor:
    """``BoolTensor[B, length]``, True at the first ``context_lengths[b]`` positions of row ``b`` (the real context
    tokens), False at the padding."""
    return torch.arange(length, device=context_lengths.device) < context_lengths[:, None]


# ----------------------------------------------------------------------------------------------------------------
# Packed sequences: padded batches (per-image context lengths) without the padding, through variable-length attention
# ----------------------------------------------------------------------------------------------------------------

_HALF_TYPES = (torch.float16, torch.bfloat16)
# None: pack where a variable-length attention kernel runs; True / False: always / never (`packed_sequences`).
_PACKING: list[bool | None] = [None]


@contextlib.contextmanager
def packed_sequences(enabled: bool | None) -> Iterator[None]:
    """Within the block, padded batches (``context_lengths``) run as one packed sequence of their real tokens
    (``True``), on the padded layout (``False``), or packed only where variable-length attention has a kernel
    (``None``, the default: CUDA in half precision). Packed and padded compute the same function; packing saves
    the padding's share of every matrix product and attention. Where no kernel runs, packed attention unpacks for
    its own step, which is the reference the kernel is tested against."""
    previous, _PACKING[0] = _PACKING[0], enabled
    try:
        yield
    finally:
        _PACKING[0] = previous


def _varlen_kernel(device: torch.device, dtype: torch.dtype) -> Callable[..., torch.Tensor] | None:
    """torch's variable-length (flash) attention when it runs on tensors of ``device`` and ``dtype`` (CUDA, half
    types), else None."""
    if device.type != "cuda" or dtype not in _HALF_TYPES:
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _should_pack(module: nn.Module, hidden_states: torch.Tensor) -> bool:
    """Whether ``module`` (an encoder or predictor) runs a padded batch packed (see `packed_sequences`)."""
    if module.training and module.config.drop_path_rate > 0:
        return False  # stochastic depth draws per image; a packed sequence has no image axis to draw along
    if _PACKING[0] is not None:
        return _PACKING[0]
    dtype = hidden_states.dtype
    if hidden_states.is_cuda and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
    return _varlen_kernel(hidden_states.device, dtype) is not None


class SequencePacking:
    """The real tokens of a padded batch ``[B, N, ...]`` as one packed sequence ``[T, ...]`` (row by row, in order;
    ``T`` real tokens in all), with the cumulative lengths ``cu_seqlens [B + 1]`` (int32) that variable-length
    attention reads. ``mask`` (bool ``[B, N]``, True = real token) may put padding anywhere in a row (the
    predictor's rows are context, padding, then target tokens).

    Building it reads the packed length on the host (one device sync: it is a shape). ``max_seqlen`` is the padded
    length ``N``, a bound that serves the kernel as well as the exact maximum without a second sync."""

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = mask
        self.batch_size, self.max_seqlen = mask.shape
        self.index = mask.flatten().nonzero().squeeze(1)
        lengths = mask.sum(dim=1, dtype=torch.int32)
        self.cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """``[B, N, ...]`` -> ``[T, ...]``."""
        return padded.flatten(0, 1).index_select(0, self.index)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """``[T, ...]`` -> ``[B, N, ...]``, zeros at the padding (and no gradient to it)."""
        flat = packed.new_zeros((self.batch_size * self.max_seqlen, *packed.shape[1:]))
        return flat.index_copy(0, self.index, packed).unflatten(0, (self.batch_size, self.max_seqlen))


def packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, packing: SequencePacking,
                     scaling: float, dropout: float = 0.0) -> torch.Tensor:
    """Attention within each sequence of a packed batch: ``query/key/value [T, H, Dh]`` -> ``[T, H, Dh]``.

    torch's variable-length kernel where it runs (`_varlen_kernel`, no dropout); elsewhere the same attention on
    the padded layout with the padding masked out of the keys, which is the padded path's own computation."""
    kernel = _varlen_kernel(query.device, query.dtype)
    if kernel is not None and dropout == 0.0:
        cu, longest = packing.cu_seqlens, packing.max_seqlen
        return kernel(query, key, value, cu, cu, longest, longest, scale=scaling)
    query, key, value = (packing.unpack(tensor).transpose(1, 2) for tensor in (query, key, value))  # [B, H, N, Dh]
    output = F.scaled_dot_product_attention(query, key, value, attn_mask=packing.mask[:, None, None, :],
                                            dropout_p=dropout, scale=scaling)
    return packing.pack(output.transpose(1, 2))


# ----------------------------------------------------------------------------------------------------------------
# Anti-collapse regularisers (off by default; `IJepaPretrainingConfig.sigreg_weight` / `vicreg_*_weight`)
# ----------------------------------------------------------------------------------------------------------------

# Where SIGReg compares characteristic functions: 17 points on [-5, 5], the LeJEPA paper's choice. Beyond |t| = 5
# the Gaussian weight exp(-t^2 / 2) leaves nothing to compare.
_SIGREG_POINTS = (-5.0, 5.0, 17)


def _row_weights(embeddings: torch.Tensor, weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``weights [N]`` as float32 (1 for every row when ``None``) and their sum, both on the device (no host sync:
    padded rows are weighted out rather than indexed out)."""
    if weights is None:
        weights = torch.ones(embeddings.shape[0], device=embeddings.device)
    weights = weights.to(torch.float32)
    return weights, weights.sum()


def sigreg_loss(embeddings: torch.Tensor, num_slices: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """SIGReg (LeJEPA): how far ``embeddings [N, D]`` are from an isotropic standard Gaussian, as the mean over
    ``num_slices`` random unit directions of the Epps-Pulley statistic of the 1-D projections,
    ``N * integral |ecf(t) - exp(-t^2/2)|^2 exp(-t^2/2) dt`` (trapezoid rule on `_SIGREG_POINTS`).

    A standard normal on every direction is what the Cramer-Wold theorem needs for the whole distribution, and no
    collapsed (constant, or low-rank) set of embeddings has it. The directions are drawn from torch's generator at
    every call, so a run stays reproducible and a resumed run draws what the uninterrupted one would. ``weights
    [N]`` (0 or 1) leave rows out, e.g. padding. Computed in float32; returns a scalar.
    """
    x = embeddings.float()
    weights, count = _row_weights(x, weights)
    directions = torch.randn(x.shape[1], num_slices, device=x.device)
    directions = directions / directions.norm(dim=0, keepdim=True)
    t = torch.linspace(*_SIGREG_POINTS, device=x.device)
    gaussian = torch.exp(-0.5 * t**2)  # the characteristic function of N(0, 1), and the integral's weight
    angles = (x @ directions).unsqueeze(-1) * t  # [N, slices, points]
    row = weights[:, None, None] / count
    real, imag = (row * angles.cos()).sum(0), (row * angles.sin()).sum(0)  # the empirical characteristic function
    error = ((real - gaussian) ** 2 + imag**2) * gaussian
    return (torch.trapezoid(error, t, dim=-1) * count).mean()


def vicreg_losses(embeddings: torch.Tensor, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """VICReg's variance and covariance terms of ``embeddings [N, D]`` (rows weighted by ``weights [N]``, 0 or 1):
    ``mean_d max(0, 1 - sqrt(var_d + 1e-4))`` — every dimension keeps a spread — and ``sum_{i != j} cov_ij^2 / D``
    — dimensions carry different information. Computed in float32."""
    x = embeddings.float()
    weights, count = _row_weights(x, weights)
    mean = (weights[:, None] * x).sum(0) / count
    centred = (x - mean) * weights[:, None]
    covariance = centred.T @ centred / (count - 1).clamp_min(1.0)
    variances = covariance.diagonal()
    variance_term = F.relu(1.0 - torch.sqrt(variances + 1e-4)).mean()
    off_diagonal = covariance - torch.diag_embed(variances)
    return variance_term, off_diagonal.pow(2).sum() / x.shape[1]


def is_no_decay_param(name: str, param: torch.Tensor) -> bool:
    """The official weight-decay rule, for every optimizer of these models (pretraining and fine-tuning): no decay
    for names containing ``"bias"`` or for 1-D parameters (norms)."""
    return "bias" in name or param.ndim == 1


def _check_indices(indices: torch.Tensor, num_patches: int, name: str, batch_size: int) -> None:
    if indices.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"`{name}` must hold integer patch indices, got dtype {indices.dtype}.")
    if indices.shape[0] != batch_size:
        raise ValueError(f"`{name}` has batch size {indices.shape[0]} but the input has {batch_size}.")
    _require_in_range(indices, 0, num_patches - 1,
                      lambda found: f"`{name}` holds patch indices {found}, outside [0, {num_patches - 1}].")


def take_indices(num_blocks: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """Block indices as timm's ``feature_take_indices``: ``None`` -> every block, an int ``n`` -> the last ``n``,
    a sequence -> those blocks (negative ones count from the end). Returns them (0-based, in the given order)
    and the largest."""
    if indices is None:
        chosen = list(range(num_blocks))
    elif isinstance(indices, int) and not isinstance(indices, bool):
        if not 1 <= indices <= num_blocks:
            raise ValueError(f"`indices`={indices} asks for the last {indices} blocks, but the encoder has {num_blocks}.")
        chosen = list(range(num_blocks - indices, num_blocks))
    else:
        chosen = []
        for index in indices:
            if isinstance(index, bool) or not isinstance(index, int) or not -num_blocks <= index < num_blocks:
                raise ValueError(f"`indices` must be block indices in [{-num_blocks}, {num_blocks - 1}], got {indices!r}.")
            chosen.append(index % num_blocks)
        if not chosen:
            raise ValueError("`indices` selects no block.")
    return chosen, max(chosen)


def tokens_to_feature_map(tokens: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """Patch tokens ``[B, rows * cols, D]`` (raster order) -> a feature map ``[B, D, rows, cols]``."""
    batch_size, length, width = tokens.shape
    rows, cols = grid_size
    if length != rows * cols:
        raise ValueError(f"{length} tokens do not fill a {rows}x{cols} patch grid.")
    return tokens.reshape(batch_size, rows, cols, width).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention that also returns the probabilities. ``query/key/value [B, H, N, Dh]``."""
    weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    # torch's softmax kernels accumulate half types in fp32 already; an explicit fp32 round trip would only add two
    # N x N copies (forward and backward) for the same result up to the last bit.
    weights = F.softmax(weights, dim=-1)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


# Attention implementations that take the key-padding mask of per-image context lengths as a dense mask.
_PADDING_MASK_ATTENTION = ("sdpa", "eager")


class IJepaAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (official key layout ``attn.qkv``/``attn.proj``)."""

    def __init__(self, config: IJepaEncoderConfig | IJepaPredictorConfig) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        # transformers' SDPA wrapper is causal unless told otherwise; I-JEPA attention is bidirectional.
        self.is_causal = False
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        need_weights: bool = False,
        query_start: int = 0,
        key_padding_mask: torch.Tensor | None = None,
        packing: SequencePacking | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``hidden_states [B, N, D]`` -> ``[B, N - query_start, D]``: every token is a key and a value, only the
        tokens from ``query_start`` on are queries (all of them by default). ``key_padding_mask`` (bool ``[B, N]``,
        True = real token) keeps padding tokens out of every query's keys; each row must keep at least one key.
        With ``packing``, ``hidden_states`` is the packed sequence ``[T, D]`` and each row attends within itself."""
        if packing is not None:
            total, width = hidden_states.shape
            query, key, value = self.qkv(hidden_states).reshape(total, 3, self.num_heads, self.head_dim).unbind(1)
            output = packed_attention(query, key, value, packing, self.scaling,
                                      self.config.attention_dropout if self.training else 0.0)
            return self.proj(output.reshape(total, width)), None
        batch_size, length, width = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch_size, length, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        query = query[:, :, query_start:]
        # The implementation the user chose (``attn_implementation``, transformers' own option), never a guess from
        # the hardware: which kernel is faster depends on the machine, the precision and the sequence length, so the
        # training loop can measure it (``--attn_implementation auto``, `ijepa_hf.training.kernels`). The
        # probabilities exist only in the eager path.
        implementation = self.config._attn_implementation or "sdpa"
        eager = need_weights or implementation == "eager"
        mask = None
        if key_padding_mask is not None:
            if not eager and implementation not in _PADDING_MASK_ATTENTION:
                raise ValueError(
                    f"Per-image context lengths (`context_lengths`) mask padding keys, which attn_implementation="
                    f"{implementation!r} does not take here: load the model with attn_implementation='sdpa' or 'eager' "
                    "(`from_pretrained(..., attn_implementation='sdpa')`), or use equal-length contexts "
                    "(context_lengths='shortest')."
                )
            # [B, 1, 1, N], broadcast over heads and queries. SDPA takes the boolean mask (True = attend) into its
            # fused kernels; the matmul path adds -inf. Every row keeps a real key, so no softmax row is empty.
            mask = key_padding_mask[:, None, None, :]
            if eager:
                mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(~mask, -torch.inf)
        attention: Callable = (
            eager_attention_forward if eager
            else ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        )
        output, weights = attention(
            self,
            query,
            key,
            value,
            mask,
            scaling=self.scaling,
            dropout=self.config.attention_dropout if self.training else 0.0,
        )
        output = self.proj(output.reshape(batch_size, length - query_start, width))
        return output, weights


class IJepaMLP(nn.Module):
    def __init__(self, config: IJepaEncoderConfig | IJepaPredictorConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(self.act(self.fc1(hidden_states)))))


class DropPath(nn.Module):
    """Stochastic depth per sample (off in the official pretraining, useful for fine-tuning)."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return hidden_states
        keep = 1.0 - self.rate
        mask = hidden_states.new_empty((hidden_states.shape[0],) + (1,) * (hidden_states.dim() - 1)).bernoulli_(keep)
        return hidden_states * mask / keep


class IJepaBlock(GradientCheckpointingLayer):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, config: IJepaEncoderConfig | IJepaPredictorConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = IJepaAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = IJepaMLP(config)
        self.drop_path = DropPath(drop_path)

    def forward(
        self,
        hidden_states: torch.Tensor,
        need_weights: bool = False,
        query_start: int = 0,
        key_padding_mask: torch.Tensor | None = None,
        packing: SequencePacking | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[B, N, D]`` -> ``[B, N - query_start, D]``: with ``query_start > 0`` only the later tokens are updated
        (attending to all), for a last block whose earlier outputs nobody reads. ``key_padding_mask`` (bool
        ``[B, N]``) hides padding tokens from attention; every other operation is per token, so with ``packing``
        the block runs on the packed sequence ``[T, D]`` as it is (``query_start`` 0)."""
        attended, weights = self.attn(
            self.norm1(hidden_states), need_weights=need_weights, query_start=query_start,
            key_padding_mask=key_padding_mask, packing=packing,
        )
        hidden_states = hidden_states[:, query_start:] + self.drop_path(attended)
        hidden_states = hidden_states + self.drop_path(self.mlp(self.norm2(hidden_states)))
        return hidden_states, weights


def build_blocks(config: IJepaEncoderConfig | IJepaPredictorConfig) -> nn.ModuleList:
    """``num_hidden_layers`` blocks with stochastic-depth rates rising linearly to ``drop_path_rate``."""
    depth = config.num_hidden_layers
    # Plain Python so that models can be built on the meta device.
    rates = [config.drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
    return nn.ModuleList(IJepaBlock(config, rate) for rate in rates)


def run_blocks(
    blocks: nn.ModuleList,
    hidden_states: torch.Tensor,
    need_weights: bool = False,
    last_query_start: int = 0,
    key_padding_mask: torch.Tensor | None = None,
    packed: bool = False,
) -> torch.Tensor:
    """Runs the blocks. Their outputs and attention maps are recorded by transformers' `capture_outputs` hooks
    (`_can_record_outputs`), not collected here; ``need_weights`` (while `output_attentions` is recorded) makes
    attention compute its probabilities, which only the eager path has.

    ``last_query_start``: the last block updates only the tokens from there on and the result has only those
    (the predictor's context tokens are never read after the last block). Callers pass 0 while hidden states or
    attentions are being recorded, so that every recorded layer has every token.

    ``key_padding_mask`` (bool ``[B, N]``, True = real token): padding tokens are no key of any attention.
    ``packed``: the blocks run on the real tokens of the padded batch as one sequence (`SequencePacking`); the
    result is unpacked, zero at the padding. A packed sequence has no per-row query start, so the last block then
    updates every token.
    """
    if packed:
        packing = SequencePacking(key_padding_mask)
        hidden_states = packing.pack(hidden_states)
        for block in blocks:
            hidden_states, _ = block(hidden_states, packing=packing)
        return packing.unpack(hidden_states)
    for index, block in enumerate(blocks):
        query_start = last_query_start if index == len(blocks) - 1 else 0
        hidden_states, _ = block(
            hidden_states, need_weights=need_weights, query_start=query_start, key_padding_mask=key_padding_mask,
        )
    return hidden_states


# What transformers itself passes to a forward's **kwargs (output flags, Trainer's loss arguments, attention
# backends' arguments, and the config defaults `merge_with_config_defaults` fills in, e.g. the `use_cache` that
# Trainer sets on every config): anything else is a caller's mistake, refused rather than silently ignored.
_TRANSFORMERS_KWARGS = frozenset({*TransformersKwargs.__annotations__, "return_dict", "use_cache",
                                  "vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio"})
_HINTS = {"bool_masked_pos": "I-JEPA drops masked patches instead of replacing them: pass the indices of the patches "
                             "to keep as `context_mask` ([B, K] long)"}


def _refuse_unknown_kwargs(model: torch.nn.Module, kwargs: dict[str, Any]) -> None:
    unknown = sorted(set(kwargs) - _TRANSFORMERS_KWARGS)
    if unknown:
        hints = "".join(f"; {_HINTS[name]}" for name in unknown if name in _HINTS)
        raise TypeError(f"{type(model).__name__}.forward() got unexpected keyword argument(s) {unknown}{hints}")


def _records(model: PreTrainedModel, kwargs: dict[str, Any], name: str) -> bool:
    """Whether `capture_outputs` records ``name`` (``"hidden_states"``, ``"attentions"``) in this call: the call's
    ``output_<name>`` (a flag, or hidden-state indices), else the config's, as the decorator decides."""
    value = kwargs.get(f"output_{name}", getattr(model.config, f"output_{name}", False))
    return value is not None and value is not False


# ----------------------------------------------------------------------------------------------------------------
# Output dataclasses
# ----------------------------------------------------------------------------------------------------------------


# trf-ignore: TRF057 (linter note at the top of this file)
@dataclass
class IJepaPredictorOutput(ModelOutput):
    """
    Args:
        predictions (`[M * B, Kt, D]`): predicted target-encoder features, block-major (row ``j * B + b`` is block
            ``j`` of image ``b``), in the encoder's width D.
        hidden_states (tuple of `[M * B, Kc + Kt, Dp]`, optional): the predictor's hidden states.
        attentions (tuple of `[M * B, H, Kc + Kt, Kc + Kt]`, optional).
    """

    predictions: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


# trf-ignore: TRF057 (linter note at the top of this file)
@dataclass
class IJepaForPreTrainingOutput(ModelOutput):
    """
    Args:
        loss (scalar): smooth L1 (or MSE) between predictions and targets, computed in float32.
        predictions (`[M * B, Kt, D]`): predictor output, block-major.
        targets (`[M * B, Kt, D]`): target-encoder features (LayerNorm'ed unless disabled) at the target blocks.
        context_hidden_state (`[B, Kc, D]`): context-encoder output on the context patches (zero at padding
            positions when `context_lengths` is given).
        target_hidden_state (`[B, N, D]`): target-encoder output on all patches (before the target LayerNorm).
        prediction_loss (scalar): the prediction term of `loss` alone; with `sigreg_loss`, `variance_loss` and
            `covariance_loss` (the unweighted regulariser terms) set only when the config turns a regulariser on,
            and then `loss` is the prediction loss plus each term times its weight.
    """

    loss: torch.FloatTensor | None = None
    predictions: torch.FloatTensor | None = None
    targets: torch.FloatTensor | None = None
    context_hidden_state: torch.FloatTensor | None = None
    target_hidden_state: torch.FloatTensor | None = None
    prediction_loss: torch.FloatTensor | None = None
    sigreg_loss: torch.FloatTensor | None = None
    variance_loss: torch.FloatTensor | None = None
    covariance_loss: torch.FloatTensor | None = None


# The one vocabulary for "which encoder of a pretraining model": API keyword `encoder=`, CLI `--encoder`.
# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


# trf-ignore: TRF001, trf-ignore: TRF013, trf-ignore: TRF057 (linter note at the top of this file)
class IJepaPreTrainedModel(PreTrainedModel):
    """Weight init (official: truncated normal 0.02 on linear/conv weights, zero biases, unit LayerNorms, no depth
    rescaling since the official ``init_model`` overwrites it) and strict loading."""

    config_class = IJepaEncoderConfig
    base_model_prefix = "encoder"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["IJepaBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # `output_hidden_states` / `output_attentions` are recorded by `capture_outputs` hooks on these modules: the
    # input of the first block and every block's output (before the final norm), and each attention's weights.
    _can_record_outputs = {
        "hidden_states": OutputRecorder(IJepaBlock, index=0),
        "attentions": OutputRecorder(IJepaAttention, index=1),
    }
    # Keys a checkpoint may lack (transformers filters them out of its missing-key report): the sin-cos tables are
    # recomputed from the config. Subclasses add freshly initialised heads.
    _keys_to_ignore_on_load_missing = [r"(^|\.)pos_embed$"]

    def __init__(self, config: PretrainedConfig, *inputs: Any, **kwargs: Any) -> None:
        # `from_pretrained(repo, name=value)` sets each value on the loaded config by assignment, which checks its
        # type only: the config's rules run here, so that no model is built from a config its constructor refuses.
        config.validate()
        super().__init__(config, *inputs, **kwargs)

    def _upload_modified_files(self, working_dir: str | os.PathLike, repo_id: str, *args: Any, **kwargs: Any) -> Any:
        # Both of transformers' push paths (`push_to_hub`, `save_pretrained(push_to_hub=True)`) write a card into
        # `working_dir` just before this upload; a generic one (the repo had none) becomes ijepa_hf's card, with the
        # licence and base model of the weights. Shipped as remote code to a process without ijepa_hf, it stays.
        try:
            from ijepa_hf.hub import replace_generic_card
        except ImportError:
            pass
        else:
            replace_generic_card(self, working_dir, repo_id)
        return super()._upload_modified_files(working_dir, repo_id, *args, **kwargs)

    # trf-ignore: TRF018 (linter note at the top of this file)
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm1d):
            # A classifier's pooler norm (no affine parameters): its running statistics start as torch's, never as
            # the empty memory a checkpoint without them (an encoder repo) would leave.
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)
        elif isinstance(module, (IJepaEncoderModel, IJepaPredictorModel)):
            # The sin-cos table is a persistent buffer: recomputed here whenever a checkpoint does not provide it
            # (construction from a config, or a file without it), so it is never left empty or zero.
            init.copy_(module.pos_embed, sincos_position_embeddings(module.pos_embed.shape[-1], module.grid_size)[None])
            if isinstance(module, IJepaPredictorModel):
                init.trunc_normal_(module.mask_token, mean=0.0, std=std)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        """`PreTrainedModel.save_pretrained`; a config whose ``auto_map`` names this class (the model came from a repo
        saved with its code, e.g. ``ijepa-hf convert --remote-code``) gets that code saved beside it, as
        transformers does for classes loaded as remote code. Otherwise the saved folder (a fine-tuned classifier
        pushed by `Trainer`, ...) would point at code files it does not have, and load nowhere without ijepa_hf."""
        auto_map = getattr(self.config, "auto_map", None) or {}
        named = f"{__name__.rsplit('.', 1)[-1]}.{type(self).__name__}"
        auto_class = next((key for key, value in auto_map.items() if value == named), None)
        cls = type(self)
        if auto_class is None or cls._auto_class is not None:
            return super().save_pretrained(save_directory, *args, **kwargs)
        cls._auto_class = auto_class  # what `register_for_auto_class` sets; for this save only
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            del cls._auto_class  # back to the base class's None

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: Any, *model_args: Any, strict: bool = True, encoder: str | None = None,
        **kwargs: Any,
    ):
        """`PreTrainedModel.from_pretrained` (every keyword argument is transformers'), with the kind of repo checked
        and a checkpoint that does not fit the architecture an error (`pretrained_loading` says how).

        - ``strict``: missing or unexpected keys raise `ValueError` listing them (keys in
          ``_keys_to_ignore_on_load_missing``, recomputed sin-cos tables and heads meant to be trained, may be
          missing); ``strict=False`` gives transformers' lenient behaviour. Mis-shaped keys are transformers'
          business: an error, or with ``ignore_mismatched_sizes=True`` re-initialised and reported.
        - ``encoder``: an encoder, classifier or backbone class given a pretraining repo loads its ``"target"``
          encoder (the default, the one the paper evaluates) or its ``"context"`` encoder.
        - A raw official checkpoint file, transformers' own ``ijepa`` repo or another kind of ``ijepa_hf`` repo is a
          short `ValueError` naming what was given, what was expected and how to load it.
        """
        return from_pretrained_policy(cls, super().from_pretrained, pretrained_model_name_or_path, model_args, kwargs,
                                      strict=strict, encoder=encoder)

    def _after_load(self) -> None:
        """Hook run after `from_pretrained` (the pretraining model re-freezes its target encoder here)."""



# trf-ignore: TRF057 (linter note at the top of this file)
class IJepaEncoderModel(IJepaPreTrainedModel):
    """The I-JEPA vision transformer (context or target encoder): patch embedding, fixed 2-D sin-cos positions
    (no CLS token), pre-norm blocks, final LayerNorm. Returns average-pooled patch features as `pooler_output`
    (the paper's evaluation protocol)."""

    config_class = IJepaEncoderConfig
    # The attribute under which classifiers hold the encoder: their checkpoints load as this encoder (AutoModel).
    base_model_prefix = "encoder"
    # What this encoder leaves aside when loaded from a classifier (its head: the linear layer and the norm of the
    # pooled features) or a pretraining repo (everything but the target encoder).
    _keys_to_ignore_on_load_unexpected = [
        r"^classifier\.", r"^pooler_norm\.", r"^context_encoder\.", r"^target_encoder\.", r"^predictor\."
    ]

    def __init__(self, config: IJepaEncoderConfig) -> None:
        super().__init__(config)
        self.grid_size = config.grid_size
        self.patch_embed = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.pos_embed = nn.Buffer(sincos_position_embeddings(config.hidden_size, self.grid_size)[None], persistent=True)
        self.blocks = build_blocks(config)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.patch_embed

    def position_embeddings(self, grid_size: tuple[int, int]) -> torch.Tensor:
        """``[1, rows * cols, D]``: the stored table at the trained grid, the same sin-cos formula elsewhere (fixed
        sin-cos positions extend to any grid, so no interpolation is needed)."""
        if tuple(grid_size) == tuple(self.grid_size):
            return self.pos_embed
        table = sincos_position_embeddings(self.config.hidden_size, grid_size)
        return table[None].to(device=self.pos_embed.device, dtype=self.pos_embed.dtype)

    def embed(self, pixel_values: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Patch embedding plus positions: ``pixel_values [B, C, H, W]`` -> ``[B, N, D]``, or ``[B, K, D]`` for the
        patches ``keep [B, K]`` only (then only those patches are embedded: the official code embeds all of them)."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"`pixel_values` must be [batch, {self.config.num_channels}, height, width], got shape "
                f"{tuple(pixel_values.shape)}. Convert grayscale/RGBA images to RGB first (the image processor does)."
            )
        if not pixel_values.is_floating_point():
            # Casting would feed 0-255 values to weights trained on normalised images.
            raise ValueError(
                f"`pixel_values` must be normalised float images, got {pixel_values.dtype}: finish uint8 images with "
                "ijepa_hf.data.normalize_images (or use the image processor)."
            )
        batch_size, channels, height, width = pixel_values.shape
        patch = self.config.patch_size
        if height % patch or width % patch:
            raise ValueError(
                f"Input size {height}x{width} is not divisible by the patch size {patch}: resize or crop to a "
                f"multiple of {patch} (e.g. {height // patch * patch}x{width // patch * patch})."
            )
        grid = (height // patch, width // patch)
        # The sin-cos table is a float32 buffer that from_pretrained(dtype=...) leaves as it is. It is added in the
        # dtype of the LayerNorms, the residual stream's: a bf16 model gets a bf16 stream its LayerNorms take, and
        # fp32 LayerNorms keep an fp32 stream (under autocast, as the official code, also where the matrix
        # products' weights alone are bf16).
        positions = self.position_embeddings(grid).to(self.norm.weight.dtype)
        pixel_values = pixel_values.to(self.patch_embed.weight.dtype)
        if keep is None:
            # contiguous(): the transposed view would make the whole residual stream [B, N, D] with stride 1 along N,
            # and every later LayerNorm, add and linear would pay for the strided layout.
            return self.patch_embed(pixel_values).flatten(2).transpose(1, 2).contiguous() + positions
        _check_indices(keep, grid[0] * grid[1], "context_mask", batch_size)
        # A stride-p convolution is a linear map of each flattened (C, p, p) patch: apply it to the kept ones.
        patches = pixel_values.reshape(batch_size, channels, grid[0], patch, grid[1], patch)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(batch_size, grid[0] * grid[1], channels * patch * patch)
        tokens = F.linear(gather_patches(patches, keep), self.patch_embed.weight.flatten(1), self.patch_embed.bias)
        return tokens + gather_patches(positions, keep)

    # trf-ignore: TRF057 (linter note at the top of this file)
    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor,
        context_mask: torch.Tensor | Sequence[torch.Tensor] | None = None,
        context_lengths: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        r"""
        Args:
            pixel_values (`[B, C, H, W]`): normalised images; H and W multiples of the patch size (any resolution).
            context_mask (`[B, K]` long, optional): patch indices to keep (raster order). All other tokens are
                dropped before the blocks, so compute scales with K. A list of such tensors runs each and stacks the
                results along the batch, mask-major (the official multi-mask layout).
            context_lengths (`[B]` long, optional): with a padded `context_mask`, how many of each row's indices are
                real (`IJepaMaskCollator(context_lengths="per_image")`); the padding tokens are masked out of every
                attention, zeroed in `last_hidden_state` and left out of `pooler_output`.

        Returns:
            `BaseModelOutputWithPooling` with `last_hidden_state [B, K or N, D]` (after the final LayerNorm),
            `pooler_output [B, D]` (mean over the returned patches), and with `output_hidden_states=True`
            `hidden_states` (embeddings then each block, before the final norm; padding rows not zeroed), with
            `output_attentions=True` `attentions` (both recorded by `capture_outputs`); a tuple with
            `return_dict=False`.
        """
        _refuse_unknown_kwargs(self, kwargs)
        padding = None
        if context_lengths is not None:
            if context_mask is None:
                raise ValueError("`context_lengths` describes the rows of `context_mask`; pass both or neither.")
            _check_context_lengths(context_lengths, context_mask, pixel_values.shape[0])
            padding = context_padding_mask(context_lengths, context_mask.shape[1])
        if context_mask is None:
            hidden_states = self.embed(pixel_values)
        elif isinstance(context_mask, torch.Tensor):
            hidden_states = self.embed(pixel_values, context_mask)
        else:
            hidden_states = torch.cat([self.embed(pixel_values, mask) for mask in context_mask], dim=0)
        need_weights = _records(self, kwargs, "attentions")
        recording = need_weights or _records(self, kwargs, "hidden_states")
        # Recorded layers keep the padded layout their readers expect, so only unrecorded runs pack.
        packed = padding is not None and not recording and _should_pack(self, hidden_states)
        hidden_states = self.norm(run_blocks(self.blocks, hidden_states, need_weights=need_weights,
                                             key_padding_mask=padding, packed=packed))
        if padding is None:
            pooled = hidden_states.mean(dim=1)
        else:
            # Padding rows are zero from here on (also for their gradient), so a sum over a row is over its context.
            hidden_states = hidden_states.masked_fill(~padding[..., None], 0.0)
            pooled = hidden_states.sum(dim=1) / context_lengths[:, None].to(hidden_states.dtype)
        return BaseModelOutputWithPooling(last_hidden_state=hidden_states, pooler_output=pooled)


    def forward_intermediates(
        self,
        pixel_values: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        r"""The outputs of chosen blocks, as timm's ``forward_intermediates``.

        Args:
            pixel_values (`[B, C, H, W]`): normalised images (any resolution that is a multiple of the patch size).
            indices: ``None``: every block; an int ``n``: the last ``n`` blocks; a list: those blocks (0-based,
                negative from the end).
            norm: pass each intermediate through the final LayerNorm (the norm the last block's output gets).
            stop_early: do not run the blocks after the last chosen one (the final output is then that block's).
            output_fmt: ``"NCHW"``: feature maps ``[B, D, H / p, W / p]``; ``"NLC"``: tokens ``[B, N, D]``.
            intermediates_only: return only the intermediates (and stop after the last chosen block).

        Returns:
            The list of intermediates in block order, or ``(final, intermediates)`` where ``final`` is the
            normalised output ``[B, N, D]`` (`last_hidden_state`).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"`output_fmt` must be 'NCHW' or 'NLC', got {output_fmt!r}.")
        chosen, last = take_indices(len(self.blocks), indices)
        grid = (pixel_values.shape[-2] // self.config.patch_size, pixel_values.shape[-1] // self.config.patch_size)
        hidden_states = self.embed(pixel_values)
        taken: dict[int, torch.Tensor] = {}
        blocks = self.blocks[: last + 1] if stop_early or intermediates_only else self.blocks
        for index, block in enumerate(blocks):
            hidden_states, _ = block(hidden_states)
            if index in chosen:
                taken[index] = self.norm(hidden_states) if norm else hidden_states
        intermediates = [taken[index] for index in sorted(set(chosen))]
        if output_fmt == "NCHW":
            intermediates = [tokens_to_feature_map(tokens, grid) for tokens in intermediates]
        if intermediates_only:
            return intermediates
        return self.norm(hidden_states), intermediates

    def get_intermediate_layers(
        self,
        pixel_values: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        norm: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """timm's / DINO's ``get_intermediate_layers``: the last ``n`` blocks (or the blocks listed in ``n``),
        optionally normalised (``norm``) and reshaped to ``[B, D, h, w]`` (``reshape``; else ``[B, N, D]``)."""
        return tuple(
            self.forward_intermediates(
                pixel_values, indices=n, norm=norm, output_fmt="NCHW" if reshape else "NLC", intermediates_only=True
            )
        )


# trf-ignore: TRF002, trf-ignore: TRF057 (linter note at the top of this file)
class IJepaPredictorModel(IJepaPreTrainedModel):
    """The I-JEPA predictor: projects context features to its width, appends one learned mask token (plus its
    fixed sin-cos position) per target patch, runs its blocks and projects the target tokens back to the encoder
    width. As in the official code, each target block of each image is predicted from the full context in its own
    sequence."""

    config_class = IJepaPredictorConfig
    base_model_prefix = ""

    def __init__(self, config: IJepaPredictorConfig) -> None:
        super().__init__(config)
        self.grid_size = config.grid_size
        self.embed = nn.Linear(config.encoder_hidden_size, config.hidden_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.pos_embed = nn.Buffer(sincos_position_embeddings(config.hidden_size, self.grid_size)[None], persistent=True)
        self.blocks = build_blocks(config)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.proj = nn.Linear(config.hidden_size, config.encoder_hidden_size)
        self.post_init()

    # trf-ignore: TRF057 (linter note at the top of this file)
    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        encoder_hidden_states: torch.Tensor,
        context_mask: torch.Tensor,
        target_masks: torch.Tensor | Sequence[torch.Tensor],
        context_lengths: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> IJepaPredictorOutput:
        r"""
        Args:
            encoder_hidden_states (`[B, Kc, D]`): context-encoder output on the context patches.
            context_mask (`[B, Kc]` long): the patch index of each context token.
            target_masks (`[B, M, Kt]` long, or a list of M `[B, Kt]`): the patches of each target block.
            context_lengths (`[B]` long, optional): real context tokens per image of a padded `context_mask`; the
                padding tokens are no key of any of the predictor's attentions.

        Returns:
            `IJepaPredictorOutput` with `predictions [M * B, Kt, D]` (block-major), and the recorded
            `hidden_states` / `attentions` on request.
        """
        _refuse_unknown_kwargs(self, kwargs)
        batch_size, num_context, _ = encoder_hidden_states.shape
        target_masks = _stack_target_masks(target_masks)
        num_patches = self.pos_embed.shape[1]
        _check_indices(context_mask, num_patches, "context_mask", batch_size)
        _check_indices(target_masks, num_patches, "target_masks", batch_size)
        if context_mask.shape[1] != num_context:
            raise ValueError(
                f"`context_mask` selects {context_mask.shape[1]} patches but `encoder_hidden_states` has {num_context}."
            )
        num_blocks, num_targets = target_masks.shape[1], target_masks.shape[2]
        padding = None
        if context_lengths is not None:
            _check_context_lengths(context_lengths, context_mask, batch_size)
            # Block-major like the sequences below; the mask tokens are always real.
            padding = torch.cat([
                context_padding_mask(context_lengths, num_context).repeat(num_blocks, 1),
                torch.ones(num_blocks * batch_size, num_targets, dtype=torch.bool, device=context_lengths.device),
            ], dim=1)

        positions = self.pos_embed.to(self.norm.weight.dtype)  # the residual stream's dtype, as the encoder's (embed)
        context = self.embed(encoder_hidden_states) + gather_patches(positions, context_mask)
        # Block-major layout [M * B, ...]: block j of every image, then block j + 1, as the official code.
        target_index = target_masks.transpose(0, 1).reshape(num_blocks * batch_size, num_targets)
        queries = self.mask_token.to(context.dtype) + gather_patches(positions, target_index)
        context = context.repeat(num_blocks, 1, 1)
        hidden_states = torch.cat([context, queries], dim=1)

        # The context tokens' last-block outputs are never read: their MLP and attention rows are skipped, unless
        # the layers are being recorded (then every recorded layer keeps every token).
        need_weights = _records(self, kwargs, "attentions")
        recording = need_weights or _records(self, kwargs, "hidden_states")
        hidden_states = run_blocks(
            self.blocks, hidden_states, need_weights, last_query_start=0 if recording else num_context,
            key_padding_mask=padding,
            packed=padding is not None and not recording and _should_pack(self, hidden_states),
        )
        predictions = self.proj(self.norm(hidden_states[:, -num_targets:]))
        return IJepaPredictorOutput(predictions=predictions)


def _matching_local_shards(name: str, target: torch.Tensor, context: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The tensors the EMA updates element-wise for one parameter pair: the tensors themselves, or for ``DTensor``
    (FSDP2) parameters their local shards, after checking both are laid out the same way (same shape, mesh and
    placements, hence the same slice of the parameter on this rank)."""
    if not torch.distributed.is_available():  # builds without distributed support have no DTensor
        return target, context
    from torch.distributed.tensor import DTensor

    sharded = isinstance(target, DTensor), isinstance(context, DTensor)
    if not any(sharded):
        return target, context
    if not all(sharded) or target.shape != context.shape or target.device_mesh != context.device_mesh \
            or target.placements != context.placements:
        describe = (lambda t: f"{type(t).__name__}{tuple(t.shape)} "
                    f"{getattr(t, 'placements', 'unsharded')} on {getattr(t, 'device_mesh', t.device)}")
        raise RuntimeError(
            f"EMA: target_encoder.{name} is laid out as {describe(target)} but its context twin as "
            f"{describe(context)}; the element-wise EMA needs both encoders sharded identically (wrap the whole "
            "IJepaForPreTraining with one FSDP2 policy; do not ignore, offload or re-wrap one encoder alone)."
        )
    return target.to_local(), context.to_local()


# trf-ignore: TRF002, trf-ignore: TRF057 (linter note at the top of this file)
class IJepaForPreTraining(IJepaPreTrainedModel):
    """I-JEPA pretraining: a context encoder on the context patches, a predictor for each target block, and an
    EMA target encoder (no gradients; saved and loaded with the model) that provides the targets on the full image.

    Call `update_target_encoder(momentum)` after each optimizer step.
    """

    config_class = IJepaPretrainingConfig
    base_model_prefix = ""
    _no_split_modules = ["IJepaBlock"]
    # The loss is a mean over tokens that knows nothing of gradient accumulation: let Trainer scale it.
    accepts_loss_kwargs = False

    def __init__(self, config: IJepaPretrainingConfig) -> None:
        super().__init__(config)
        self.context_encoder = IJepaEncoderModel(config.encoder_config)
        self.target_encoder = IJepaEncoderModel(config.encoder_config)
        self.predictor = IJepaPredictorModel(config.predictor_config)
        self.post_init()
        # The target starts as an exact copy of the context encoder (official: deepcopy after init).
        self.target_encoder.load_state_dict(self.context_encoder.state_dict())
        self._freeze_target_encoder()

    def _freeze_target_encoder(self) -> None:
        # transformers 5.x re-enables gradients of frozen parameters on load, hence a method called after loading.
        self.target_encoder.requires_grad_(False)
        self.target_encoder.eval()

    def _after_load(self) -> None:
        self._freeze_target_encoder()

    def get_input_embeddings(self) -> None:
        """``None``: the two encoders each have a patch embedding and neither is *the* input embedding. (Accelerate's
        FSDP2 preparation gives a model's input embedding its own shard group; answering ``None`` keeps the context
        and target encoders wrapped alike.)"""
        return None

    def train(self, mode: bool = True) -> "IJepaForPreTraining":
        super().train(mode)
        self.target_encoder.eval()  # its outputs must be deterministic targets (no dropout / drop-path)
        return self

    # trf-ignore: TRF033 (linter note at the top of this file)
    def set_input_size(self, image_size: int | Sequence[int]) -> None:
        """Train at another resolution (timm's name): the config's ``image_size`` (the encoders' and the
        predictor's) becomes ``image_size``, and the patch grid and the three fixed sin-cos tables follow it.
        Nothing learned depends on the grid. ``from_pretrained`` with a config of another ``image_size`` loads the
        saved model at its own and calls this.

        Raises:
            ValueError: ``image_size`` is not a multiple of the patch size (the config's message).
        """
        encoder_config, predictor_config = self.config.encoder_config, self.config.predictor_config
        before = (encoder_config.image_size, predictor_config.image_size)
        size = int(image_size) if isinstance(image_size, int) else [int(side) for side in image_size]
        encoder_config.image_size = predictor_config.image_size = size
        try:
            self.config.validate()
        except ValueError:
            encoder_config.image_size, predictor_config.image_size = before
            raise
        for module in (self.context_encoder, self.target_encoder, self.predictor):
            table = module.pos_embed
            module.grid_size = module.config.grid_size
            module.pos_embed = nn.Buffer(sincos_position_embeddings(table.shape[-1], module.grid_size)[None].to(
                device=table.device, dtype=table.dtype), persistent=True)

    @torch.no_grad()
    def update_target_encoder(self, momentum: float) -> None:
        """EMA update ``target = momentum * target + (1 - momentum) * context`` of every parameter.

        Under FSDP2 (parameters are ``DTensor`` shards) the update runs on each rank's local shards
        (``to_local()``): the EMA is element-wise and a target parameter is sharded like its context twin, so no
        communication is needed. A pair sharded differently is refused instead of being mixed up.
        """
        target, context = [], []
        for (name, t), c in zip(self.target_encoder.named_parameters(), self.context_encoder.parameters()):
            local_t, local_c = _matching_local_shards(name, t, c.detach())
            target.append(local_t)
            context.append(local_c)
        torch._foreach_mul_(target, momentum)
        torch._foreach_add_(target, context, alpha=1.0 - momentum)

    @torch.no_grad()
    def compute_targets(self, pixel_values: torch.Tensor, target_masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Target-encoder features of the full image gathered at the target blocks.

        Returns ``targets [M * B, Kt, D]`` (block-major) and the full output ``[B, N, D]``.
        """
        full = self.target_encoder(pixel_values).last_hidden_state
        # CODEPATH: normalize_targets — True for every official release and the presets (the official code's
        # LayerNorm of the targets); False only for configs that ask for raw targets.
        normed = F.layer_norm(full, (full.shape[-1],)) if self.config.normalize_targets else full
        batch_size, num_blocks, num_targets = target_masks.shape
        index = target_masks.transpose(0, 1).reshape(num_blocks * batch_size, num_targets)
        targets = gather_patches(normed.repeat(num_blocks, 1, 1), index)
        return targets, full

    def loss_fn(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        predictions, targets = predictions.float(), targets.float()
        # CODEPATH: loss — "smooth_l1" for every official release and preset (the official loss); "mse" for configs
        # that choose it.
        if self.config.loss == "mse":
            return F.mse_loss(predictions, targets)
        return F.smooth_l1_loss(predictions, targets, beta=self.config.smooth_l1_beta)

    # trf-ignore: TRF057 (linter note at the top of this file)
    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        target_masks: torch.Tensor | Sequence[torch.Tensor] | None = None,
        context_lengths: torch.Tensor | None = None,
        return_loss: bool = True,
        **kwargs: Any,
    ) -> IJepaForPreTrainingOutput | BaseModelOutputWithPooling:
        r"""
        Args:
            pixel_values (`[B, C, H, W]`): normalised images.
            context_mask (`[B, Kc]` long): context patch indices (from `IJepaMaskCollator`).
            target_masks (`[B, M, Kt]` long, or a list of M `[B, Kt]`): target blocks.
            context_lengths (`[B]` long, optional): each image's own context length when `context_mask` rows are
                padded (`IJepaMaskCollator(context_lengths="per_image")`). The padding is masked in the context
                encoder and the predictor, so every output, the loss and the gradients are those of computing each
                image alone and averaging. The loss needs no change for that: target blocks have one size per batch,
                so the official mean over all target elements is the mean over images of each image's own loss.
            return_loss: compute the loss (also lets `Trainer` report an eval loss without labels).

        Returns:
            `IJepaForPreTrainingOutput`; called with images only (neither mask), the target encoder's
            `BaseModelOutputWithPooling` (patch features and their average), so that a pretraining repo serves
            feature extraction (`AutoModel`, `pipeline("image-feature-extraction")`).
        """
        _refuse_unknown_kwargs(self, kwargs)
        if context_mask is None and target_masks is None and context_lengths is None:
            # Images only: feature extraction with the target encoder, the one the paper evaluates (this is what
            # `AutoModel` and `pipeline("image-feature-extraction")` run on a pretraining repo).
            flags = {k: kwargs[k] for k in ("output_hidden_states", "output_attentions") if k in kwargs}
            return self.target_encoder(pixel_values, **flags)
        if context_mask is None or target_masks is None:
            raise ValueError(
                "I-JEPA pretraining needs `context_mask` and `target_masks`: build batches with "
                "`ijepa_hf.IJepaMaskCollator` (or pass patch indices of shape [B, Kc] and [B, M, Kt])."
            )
        target_masks = _stack_target_masks(target_masks)
        targets, target_full = self.compute_targets(pixel_values, target_masks)
        context = self.context_encoder(
            pixel_values, context_mask=context_mask, context_lengths=context_lengths
        ).last_hidden_state
        predictions = self.predictor(context, context_mask, target_masks, context_lengths=context_lengths).predictions
        loss = self.loss_fn(predictions, targets) if return_loss else None
        # CODEPATH: regularized — False for every official release and preset (the official objective); True for
        # configs that give sigreg_weight / vicreg_*_weight above 0.
        terms = self.regularizer_terms(context, context_lengths) if loss is not None and self.config.regularized else {}
        if terms:
            terms["prediction_loss"] = loss
            loss = loss + sum(weight * terms[name] for name, weight in self._regularizer_weights().items())
        return IJepaForPreTrainingOutput(
            loss=loss,
            predictions=predictions,
            targets=targets,
            context_hidden_state=context,
            target_hidden_state=target_full,
            **terms,
        )

    def _regularizer_weights(self) -> dict[str, float]:
        """``{output field: weight}`` of the regulariser terms that are on."""
        config = self.config
        weights = {"sigreg_loss": config.sigreg_weight, "variance_loss": config.vicreg_variance_weight,
                   "covariance_loss": config.vicreg_covariance_weight}
        return {name: float(weight) for name, weight in weights.items() if float(weight) > 0}

    def regularizer_terms(self, context: torch.Tensor, context_lengths: torch.Tensor | None = None
                          ) -> dict[str, torch.Tensor]:
        """The unweighted anti-collapse terms that are on, of the context encoder's output ``context [B, Kc, D]``
        (padding rows zero, excluded through ``context_lengths``), as ``{output field: scalar}``."""
        config = self.config
        weights = None
        # CODEPATH: regularized_embeddings — "context_pooled" (default) or "context_tokens"; read only when a
        # regulariser weight is above 0, which no official release or preset sets.
        if config.regularized_embeddings == "context_pooled":
            if context_lengths is None:
                embeddings = context.mean(1)
            else:  # the padding rows of the context encoder's output are zero: a sum over the real tokens
                embeddings = context.sum(1) / context_lengths[:, None].to(context.dtype)
        else:
            embeddings = context.flatten(0, 1)
            if context_lengths is not None:
                weights = context_padding_mask(context_lengths, context.shape[1]).flatten()
        wanted = self._regularizer_weights()
        terms: dict[str, torch.Tensor] = {}
        # float32 throughout, mixed precision or not: the statistics sum many small terms.
        with torch.autocast(device_type=context.device.type, enabled=False):
            if "sigreg_loss" in wanted:
                terms["sigreg_loss"] = sigreg_loss(embeddings, config.sigreg_num_slices, weights)
            if "variance_loss" in wanted or "covariance_loss" in wanted:
                variance, covariance = vicreg_losses(embeddings, weights)
                terms.update({name: value for name, value in
                              (("variance_loss", variance), ("covariance_loss", covariance)) if name in wanted})
        return terms

    def encoder_for(self, encoder: str = "target") -> IJepaEncoderModel:
        """The target encoder (``"target"``, what the paper evaluates) or the context encoder (``"context"``).

        (Not `get_encoder`: `PreTrainedModel.get_encoder(modality)` means something else in transformers.)
        """
        if encoder not in ENCODER_CHOICES:
            raise ValueError(f"`encoder` must be 'target' or 'context', got {encoder!r}.")
        return self.target_encoder if encoder == "target" else self.context_encoder

    def optimized_modules(self) -> dict[str, nn.Module]:
        """What the optimizer trains, under the names of the official parameter groups (``encoder.decay``,
        ``predictor.no_decay``, ...): the context encoder and the predictor. The target encoder takes no gradient;
        it follows the context encoder by EMA."""
        return {"encoder": self.context_encoder, "predictor": self.predictor}

    def export_encoder(self, encoder: str = "target") -> IJepaEncoderModel:
        """A standalone, trainable copy of one encoder (``"target"`` or ``"context"``), ready for
        `save_pretrained`/`push_to_hub`."""
        source = self.encoder_for(encoder)
        exported = IJepaEncoderModel(IJepaEncoderConfig.from_dict(source.config.to_dict()))
        exported.load_state_dict(source.state_dict())
        return exported.to(device=source.pos_embed.device)


class PooledFeatureBatchNorm(nn.BatchNorm1d):
    """The classifier's ``pooler_norm="batchnorm"``: a BatchNorm without affine parameters over the pooled features
    ``[B, D]``. A training batch of one image has no batch statistics (`nn.BatchNorm1d` raises): it is standardised
    with the running statistics instead, which it leaves as they are. This is the last batch of an epoch whose size
    leaves one image over. Before any batch of two or more images there are no statistics to use, and the batch is
    refused with the fix."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not (self.training and features.shape[0] == 1):
            return super().forward(features)
        if int(self.num_batches_tracked) == 0:  # a host read, on this rare path only
            raise ValueError(
                "pooler_norm='batchnorm' standardises the pooled features with statistics of each training batch, "
                "and needs batches of at least 2 images per process; this one has 1 and no earlier batch gave "
                "statistics. Train with a per-device batch of 2 or more, or make the head with "
                "pooler_norm='layernorm' (from_pretrained(..., pooler_norm='layernorm'); examples/finetune.py "
                "--pooler_norm layernorm)."
            )
        return F.batch_norm(features, self.running_mean, self.running_var, training=False, eps=self.eps)


# trf-ignore: TRF057 (linter note at the top of this file)
class IJepaEncoderForImageClassification(IJepaPreTrainedModel):
    """An I-JEPA encoder, average pooling over patches and a linear head. ``labels`` give a cross-entropy loss
    (or MSE / BCE following `config.problem_type`, as transformers' classifiers)."""

    config_class = IJepaEncoderConfig
    base_model_prefix = "encoder"
    # A head on top of an encoder checkpoint starts fresh (its pooler norm too).
    _keys_to_ignore_on_load_missing = [r"(^|\.)pos_embed$", r"^classifier\.", r"^pooler_norm\."]
    # A head this class did not train (on an encoder or pretraining repo) standardises the pooled features unless
    # the caller says otherwise; a classifier repo keeps what it was trained with.
    _fresh_head_config = {"pooler_norm": NEW_HEAD_POOLER_NORM}

    def __init__(self, config: IJepaEncoderConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.encoder = IJepaEncoderModel(config)
        # `config.pooler_norm` (see IJepaEncoderConfig): the pooled features standardised before the head.
        # CODEPATH: pooler_norm — "batchnorm": every head made on an encoder or pretraining repo since the option
        # exists; "layernorm": heads that ask for it; None / "none": classifier repos saved before it.
        if config.pooler_norm == "batchnorm":
            self.pooler_norm = PooledFeatureBatchNorm(config.hidden_size, affine=False, eps=config.layer_norm_eps)
        elif config.pooler_norm == "layernorm":  # CODEPATH: pooler_norm (above)
            self.pooler_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        else:
            self.pooler_norm = nn.Identity()
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    # trf-ignore: TRF057 (linter note at the top of this file)
    @can_return_tuple
    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs: Any
    ) -> ImageClassifierOutput:
        r"""
        Args:
            pixel_values (`[B, C, H, W]`): normalised images.
            labels (`[B]` long, optional): class indices.

        Returns:
            `ImageClassifierOutput` with `logits [B, num_labels]` and `loss` when labels are given.
        """
        _refuse_unknown_kwargs(self, kwargs)
        outputs = self.encoder(pixel_values, return_dict=True, **kwargs)
        logits = self.classifier(self.pooler_norm(outputs.pooler_output))
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config)
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


def _as_backbone_config(config: PretrainedConfig, **backbone_kwargs: Any) -> IJepaBackboneConfig:
    """``config`` as an `IJepaBackboneConfig`. A dense head that names an encoder or pretraining repo as its backbone
    (``UperNetConfig(backbone=<repo>, backbone_kwargs={"out_indices": ...})``, or ``backbone_config=`` that repo's
    config) holds the repo's own config with the backbone arguments set on it; the backbone is then its encoder
    (a pretraining repo's target encoder) with those arguments (``backbone_kwargs`` win over them)."""
    if isinstance(config, IJepaBackboneConfig):
        if backbone_kwargs:  # the arguments override the saved choice (out_indices realigns out_features)
            config = copy.deepcopy(config)
            for key, value in backbone_kwargs.items():
                setattr(config, key, value)
        return config
    arguments = {key: getattr(config, key) for key in BACKBONE_ARGUMENTS if key in config.to_dict()}
    arguments.update(backbone_kwargs)
    if isinstance(config, IJepaPretrainingConfig):
        config = config.encoder_config
    if not isinstance(config, IJepaEncoderConfig):
        raise TypeError(f"IJepaBackbone needs an I-JEPA encoder, pretraining or backbone config, got "
                        f"{type(config).__name__}")
    return IJepaBackboneConfig.from_encoder_config(config, **arguments)


# trf-ignore: TRF057 (linter note at the top of this file)
class IJepaBackbone(BackboneMixin, IJepaEncoderModel):
    """An I-JEPA encoder as a transformers backbone (`AutoBackbone`, as `Dinov2Backbone`): the stages are the patch
    embeddings (``"stem"``) and the blocks (``"stage1"`` ..), and ``feature_maps`` holds those in
    ``config.out_features`` as ``[B, D, H / p, W / p]`` maps (through the final LayerNorm unless
    ``config.apply_layernorm=False``; tokens ``[B, N, D]`` with ``reshape_hidden_states=False``). Dense heads built
    on `load_backbone` (`UperNetForSemanticSegmentation`, ...) take it as their ``backbone_config``; they build the
    backbone from the config alone, so the pretrained weights go in afterwards
    (``head.backbone.load_state_dict(backbone.state_dict())``).

    Its weights are an encoder's (same module names): `from_pretrained` loads encoder, classifier and pretraining
    repos (the target encoder) as well as backbone repos, with ``out_features`` / ``out_indices`` /
    ``apply_layernorm`` / ``reshape_hidden_states`` as keyword arguments.
    """

    config_class = IJepaBackboneConfig

    def __init__(self, config: IJepaBackboneConfig | IJepaEncoderConfig | IJepaPretrainingConfig) -> None:
        super().__init__(_as_backbone_config(config))
        self.num_features = [self.config.hidden_size] * (self.config.num_hidden_layers + 1)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any):
        """`IJepaPreTrainedModel.from_pretrained`, the backbone arguments (``out_indices``, ...) set on the config
        however it comes: read from the repo (`IJepaBackboneConfig` reads encoder and pretraining repos too) or
        given as an encoder, pretraining or backbone config (the Auto classes give the repo's own)."""
        config = kwargs.get("config")
        if isinstance(config, PretrainedConfig):
            backbone_kwargs = {key: kwargs.pop(key) for key in BACKBONE_ARGUMENTS if key in kwargs}
            kwargs["config"] = _as_backbone_config(config, **backbone_kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    # trf-ignore: TRF057 (linter note at the top of this file)
    @can_return_tuple
    @filter_output_hidden_states
    def forward(self, pixel_values: torch.Tensor, **kwargs: Any) -> BackboneOutput:
        r"""
        Args:
            pixel_values (`[B, C, H, W]`): normalised images; H and W multiples of the patch size.

        Returns:
            `BackboneOutput` with `feature_maps` (one per `out_features` stage, `[B, D, H / p, W / p]`), and
            `hidden_states` / `attentions` on request.
        """
        kwargs.pop("context_mask", None)  # dense features need every patch
        kwargs.pop("context_lengths", None)
        # The encoder forward (BackboneMixin.forward comes first in the MRO).
        outputs = IJepaEncoderModel.forward(self, pixel_values, return_dict=True, **kwargs)
        grid = (pixel_values.shape[-2] // self.config.patch_size, pixel_values.shape[-1] // self.config.patch_size)
        feature_maps = ()
        for stage, hidden_state in zip(self.stage_names, outputs.hidden_states):
            if stage in self.out_features:
                # CODEPATH: apply_layernorm — True for backbones by default (every stage on the final output's
                # scale, as Dinov2Backbone); False for backbone configs that ask for the raw block outputs.
                if self.config.apply_layernorm:
                    hidden_state = self.norm(hidden_state)
                # CODEPATH: reshape_hidden_states / readout_token — maps [B, D, h, w] by default (UperNet and other
                # heads on feature maps); token sequences for heads that read tokens, with the mean token first
                # for DPT (readout_token="mean").
                if self.config.reshape_hidden_states:
                    hidden_state = tokens_to_feature_map(hidden_state, grid)
                elif self.config.readout_token == "mean":  # CODEPATH: readout_token (above); a CLS token's place
                    hidden_state = torch.cat([hidden_state.mean(dim=1, keepdim=True), hidden_state], dim=1)
                feature_maps += (hidden_state,)
        return BackboneOutput(
            feature_maps=feature_maps, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


# trf-ignore: TRF057 (linter note at the top of this file)
class IJepaEncoderBackbone(IJepaBackbone):
    """`IJepaBackbone` under the encoder's config class: the class an encoder repo shipped with its code names for
    ``AutoBackbone`` in its ``auto_map``, because transformers registers a remote class only for its own
    ``config_class`` (``AutoBackbone.from_pretrained(<encoder repo>, trust_remote_code=True, out_indices=...)``).
    Loading gives an `IJepaBackbone`; with ijepa_hf installed, ``AutoBackbone`` gives `IJepaBackbone` directly."""

    config_class = IJepaEncoderConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any):
        return IJepaBackbone.from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
