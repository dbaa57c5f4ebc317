"""Multi-block masking for I-JEPA pretraining (Assran et al., 2023).

Two layers, as V-JEPA 2 splits its ``src/masks/multiseq_multiblock3d.py`` into a mask generator and a collator:

* :class:`MultiBlockMaskGenerator`: a pure, stateless (frozen) sampler. Given the geometry and the mask settings it
  maps ``(batch_size, seed, batch_index)`` to the context and target indices of that batch, and nothing else: no
  step counter, no ranks, no logging.
* :class:`IJepaMaskCollator`: a thin data collator for ``torch.utils.data.DataLoader`` and ``transformers.Trainer``
  around a generator: it stacks the images, counts batches (``step``, ``set_step``, DataLoader workers), keeps a
  JSON-friendly ``state_dict`` and hands each data-parallel rank its rows of the global batch.

The mask settings (``num_target_blocks``, ``context_scale``, ``target_scale``, ``target_aspect_ratio``,
``min_keep``, ``allow_overlap``, ``mask_mode``, ``context_lengths``) are defined and validated in one place,
:class:`~ijepa_hf.IJepaPretrainingConfig` (:func:`~ijepa_hf.configuration_ijepa_hf.check_mask_settings`); the
generator applies the same rules to the values it is given and adds the one check that needs the sampler: that
the smallest block it can draw keeps more than ``min_keep`` patches on this grid.

It is an independent reimplementation of the sampling scheme described in the paper and in the reference notes
(``official-ijepa.md`` section 1); no code was copied from the official repository.

Conventions (shared with the model, loss and visualisation code):

* The image is split into an ``H x W`` grid of patches, ``H = image_h // patch_size``,
  ``W = image_w // patch_size``. A patch is named by its **raster index** ``row * W + col``.
* ``context_mask``: ``LongTensor[B, Kc]``, the context patch indices of each image, sorted ascending.
* ``context_lengths`` (only with ``context_lengths="per_image"``): ``LongTensor[B]``, how many entries of each
  ``context_mask`` row are the image's context; the rest of the row is padding that repeats the row's last context
  index (so the row is still non-decreasing and :func:`masks_to_boolean` still gives exactly the context).
* ``target_masks``: ``LongTensor[B, M, Kt]``, ``M = num_target_blocks`` rectangles per image, each
  listed in raster order (so also sorted ascending).

Sampling (one batch):

1. ONE target block size ``(th, tw)`` and ONE context block size ``(ch, cw)`` are drawn for the
   whole batch (the predictor then works on equal-length sequences without padding).
2. Per image, ``M`` target rectangles of that size are placed uniformly at random, and one context
   rectangle; the context is the rectangle minus the union of that image's targets (unless
   ``allow_overlap``). A context that keeps ``<= min_keep`` patches is redrawn; after ``max_tries``
   failed draws the overlap constraint with the most recently drawn target is dropped, and so on
   (the official fallback). This is done for all failing rows at once.
3. Context lengths differ per image. With ``context_lengths="shortest"`` (default, the official collator) they
   are equalised to the shortest one in the (global) batch; with ``context_lengths="per_image"`` every image keeps
   its whole context and the rows are padded to the longest one (``context_lengths`` says where each ends).
   Target blocks need neither: all of a batch have the one drawn size.

Two modes:

* ``mask_mode="official"`` reproduces the *distribution* of the official sampler, defects included:
  one uniform number drives both scale and aspect ratio; blocks are at most ``(H-1) x (W-1)`` and
  never touch the last patch row/column; equalisation keeps the FIRST ``k`` indices in raster order
  (which starves the bottom of the image of context; with ``context_lengths="per_image"`` nothing is cut).
* ``mask_mode="fixed"`` (default) draws scale and aspect ratio independently, lets blocks reach the full
  grid and every row/column, and equalises by keeping a uniformly random subset of each context.

Determinism: the masks of batch number ``i`` are a pure function of ``(seed, i, mask_mode, params)``
(:meth:`MultiBlockMaskGenerator.sample`); the collator counts batches in :attr:`IJepaMaskCollator.step` and
maps DataLoader worker calls to global batch indices, so results do not depend on ``num_workers`` or worker
timing.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch.utils.data import get_worker_info

from .configuration_ijepa_hf import (
    CONTEXT_LENGTHS,
    MASK_FIELDS,
    MASK_MODES,
    MASK_SAMPLINGS,
    IJepaPretrainingConfig,
    check_grid,
    check_mask_settings,
    default_mask_sampling,
)

logger = logging.getLogger(__name__)

__all__ = ["IJepaMaskCollator", "MultiBlockMaskGenerator", "MaskBatch", "masks_to_boolean", "MASK_MODES",
           "MASK_SAMPLINGS", "CONTEXT_LENGTHS"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One step of the SplitMix64 mixer (a bijection on 64-bit ints with good avalanche)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _batch_seed(seed: int, batch_index: int) -> int:
    # Mixing (seed, index) through SplitMix64 avoids the overlapping streams one would get from
    # e.g. ``seed + index`` (run with seed 0 at batch 1 == run with seed 1 at batch 0).
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (batch_index & _MASK64)) >> 1  # 63 bits


def masks_to_boolean(indices: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Convert patch-index masks to boolean masks.

    Args:
        indices: ``LongTensor[..., K]`` of patch indices in ``[0, num_patches)`` (e.g. a context
            mask ``[B, Kc]`` or target masks ``[B, M, Kt]``).
        num_patches: ``H * W``.

    Returns:
        ``BoolTensor[..., num_patches]``, True at the listed indices. Reshape the last dimension to
        ``(H, W)`` for a picture of the mask.
    """
    indices = torch.as_tensor(indices, dtype=torch.long)
    out = torch.zeros((*indices.shape[:-1], num_patches), dtype=torch.bool, device=indices.device)
    return out.scatter_(-1, indices, True)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_int(value: Any, name: str, low: int) -> int:
    if not _is_int(value) or value < low:
        raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}")
    return int(value)


def _pair(value: Any) -> Any:
    """An int or a 2-sequence of ints as the config's rules expect them (numpy ints included)."""
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        return tuple(int(v) if isinstance(v, np.integer) else v for v in value)
    return int(value) if isinstance(value, np.integer) else value


def _block_hw(max_keep: np.ndarray, ar: np.ndarray, h_max: int, w_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Block height/width for a patch budget and aspect ratio ``ar = h / w`` (vectorised).

    ``np.round`` rounds half to even exactly like Python's ``round`` used by the official code, so
    the scalar path (:meth:`MultiBlockMaskGenerator._block_size`) and the feasibility scan agree.
    """
    h = np.round(np.sqrt(max_keep * ar)).astype(np.int64)
    w = np.round(np.sqrt(max_keep / ar)).astype(np.int64)
    return np.minimum(h, h_max), np.minimum(w, w_max)


class MaskBatch(NamedTuple):
    """Masks of one global batch of ``n`` images."""

    context_mask: torch.Tensor  # LongTensor[n, Kc], sorted ascending (padded rows: non-decreasing)
    target_masks: torch.Tensor  # LongTensor[n, M, Kt], each block in raster order
    num_fallbacks: int  # contexts of this batch that needed the overlap fallback (diagnostic)
    # LongTensor[n]: context patches of each row (context_lengths="per_image"); None when all rows are cut to Kc.
    context_lengths: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class MultiBlockMaskGenerator:
    """The multi-block mask sampler of I-JEPA as a pure function of ``(batch_size, seed, batch_index)``.

    Frozen and stateless: :meth:`sample` draws from a fresh generator seeded by ``(seed, batch_index)``, so the
    same call always returns the same masks, in any order, process or DataLoader worker.

    Args:
        image_size: input resolution, an int (square) or ``(height, width)``.
        patch_size: patch side in pixels (int or ``(ph, pw)``); must divide ``image_size``.
        num_target_blocks, context_scale, target_scale, target_aspect_ratio, min_keep, allow_overlap: the mask
            settings of `IJepaPretrainingConfig` (same rules: `check_mask_settings`).
        mask_mode: ``"fixed"`` or ``"official"`` (see the module docstring).
        context_lengths: ``"shortest"`` (default, official) or ``"per_image"`` (see the module docstring).
        max_tries: failed context draws per constraint level before the overlap constraint with the most recent
            target is dropped (the official value is 20).

    Raises:
        ValueError: an invalid setting (named), or a grid on which the smallest block the sampler can draw keeps
            no more than ``min_keep`` patches (where the official sampler would loop forever).
    """

    image_size: tuple[int, int]
    patch_size: tuple[int, int]
    num_target_blocks: int
    context_scale: tuple[float, float]
    target_scale: tuple[float, float]
    target_aspect_ratio: tuple[float, float]
    min_keep: int
    allow_overlap: bool
    mask_mode: str
    context_lengths: str = "shortest"
    max_tries: int = 20

    def __post_init__(self) -> None:
        check_grid(_pair(self.image_size), _pair(self.patch_size))
        allow_overlap = bool(self.allow_overlap) if isinstance(self.allow_overlap, np.bool_) else self.allow_overlap
        settings = check_mask_settings(
            num_target_blocks=self.num_target_blocks, context_scale=self.context_scale,
            target_scale=self.target_scale, target_aspect_ratio=self.target_aspect_ratio, min_keep=self.min_keep,
            allow_overlap=allow_overlap, mask_mode=self.mask_mode, context_lengths=self.context_lengths)
        settings["image_size"] = _as_int_pair(self.image_size)
        settings["patch_size"] = _as_int_pair(self.patch_size)
        settings["max_tries"] = _check_int(self.max_tries, "max_tries", 1)
        for name, value in settings.items():
            object.__setattr__(self, name, value)
        self._check_feasible()

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> MultiBlockMaskGenerator:
        """The generator of a pretraining config's geometry and mask settings (``overrides`` win)."""
        settings = {**config.mask_settings(), "image_size": config.image_size, "patch_size": config.patch_size}
        return cls(**{**settings, **overrides})

    # ------------------------------------------------------------------------------------------
    # geometry
    @property
    def height(self) -> int:
        return self.image_size[0] // self.patch_size[0]

    @property
    def width(self) -> int:
        return self.image_size[1] // self.patch_size[1]

    @property
    def num_patches(self) -> int:
        return self.height * self.width

    # ------------------------------------------------------------------------------------------
    # block sizes
    def _block_size(self, generator: torch.Generator, scale: tuple[float, float],
                    aspect: tuple[float, float] | None) -> tuple[int, int]:
        """Draw one block size ``(h, w)`` (``aspect=None`` means aspect ratio 1, no draw)."""
        if self.mask_mode == "official":
            # Official defect: ONE uniform number drives scale and aspect ratio (and the context
            # "aspect range" (1, 1) still consumes that same number, no extra draw).
            r = torch.rand(1, generator=generator).item()
            s = scale[0] + r * (scale[1] - scale[0])
            ar = 1.0 if aspect is None else aspect[0] + r * (aspect[1] - aspect[0])
            h_max, w_max = self.height - 1, self.width - 1  # official clamp: h < H, w < W
        else:
            r = torch.rand(1 if aspect is None else 2, generator=generator).tolist()
            s = scale[0] + r[0] * (scale[1] - scale[0])
            ar = 1.0 if aspect is None else aspect[0] + r[1] * (aspect[1] - aspect[0])
            h_max, w_max = self.height, self.width
        max_keep = int(self.num_patches * s)
        h = min(int(round(math.sqrt(max_keep * ar))), h_max)
        w = min(int(round(math.sqrt(max_keep / ar))), w_max)
        if self.mask_mode == "fixed":
            h, w = max(h, 1), max(w, 1)
        return h, w

    def possible_block_sizes(self, block: Literal["target", "context"] = "target") -> list[tuple[int, int]]:
        """All block sizes ``(h, w)`` the sampler can draw for a ``block`` ("target" or "context").

        Computed by a dense scan of the random draws (exact in the integer patch budget), used for
        the feasibility check at construction.
        """
        if block not in ("target", "context"):
            raise ValueError(f"block must be 'target' or 'context', got {block!r}")
        scale = self.target_scale if block == "target" else self.context_scale
        aspect = self.target_aspect_ratio if block == "target" else (1.0, 1.0)
        n = self.num_patches
        if self.mask_mode == "official":
            r = np.linspace(0.0, 1.0 - 2.0**-24, 20001)  # torch.rand (float32) is < 1
            max_keep = np.floor(n * (scale[0] + r * (scale[1] - scale[0])))
            ar = aspect[0] + r * (aspect[1] - aspect[0])
            h, w = _block_hw(max_keep, ar, self.height - 1, self.width - 1)
        else:
            # h and w only depend on the integer budget int(n * s), so enumerate budgets exactly
            # and scan the aspect ratio densely.
            budgets = np.arange(int(n * scale[0]), int(n * scale[1]) + 1, dtype=np.float64)
            ar = np.linspace(aspect[0], aspect[1], 4097)
            h, w = _block_hw(budgets[:, None], ar[None, :], self.height, self.width)
            h, w = np.maximum(h, 1).ravel(), np.maximum(w, 1).ravel()
        return sorted({(int(a), int(b)) for a, b in zip(h, w)})

    def _check_feasible(self) -> None:
        grid = (f"image_size={self.image_size}, patch_size={self.patch_size} "
                f"({self.height}x{self.width} patch grid)")
        hang = " (the official sampler would loop forever here)" if self.mask_mode == "official" else ""
        tsizes = self.possible_block_sizes("target")
        th, tw = min(tsizes, key=lambda s: s[0] * s[1])
        if th * tw <= self.min_keep:
            raise ValueError(
                f"Mask sampler cannot work with {grid}, target_scale={self.target_scale}, "
                f"target_aspect_ratio={self.target_aspect_ratio}, mask_mode={self.mask_mode!r}: the smallest "
                f"target block is {th}x{tw} = {th * tw} patches, not more than min_keep="
                f"{self.min_keep}{hang}. Fix: min_keep={th * tw - 1}{' or lower' if th * tw > 1 else ''}, a larger "
                f"image_size or a smaller patch_size, or a larger target_scale."
            )
        csizes = self.possible_block_sizes("context")
        ch, cw = min(csizes, key=lambda s: s[0] * s[1])
        if ch * cw <= self.min_keep:
            raise ValueError(
                f"Mask sampler cannot work with {grid}, context_scale={self.context_scale}, "
                f"mask_mode={self.mask_mode!r}: the smallest context block is {ch}x{cw} = {ch * cw} patches, "
                f"not more than min_keep={self.min_keep}{hang}. Fix: lower min_keep, use a larger "
                f"image_size or a smaller patch_size, or a larger context_scale."
            )

    # ------------------------------------------------------------------------------------------
    # sampling
    def sample(self, batch_size: int, *, seed: int, batch_index: int) -> MaskBatch:
        """The masks of global batch ``batch_index`` of a run with ``seed``: ``([n, Kc], [n, M, Kt], fallbacks,
        lengths)`` for ``n = batch_size`` images (``lengths [n]`` with ``context_lengths="per_image"``, else
        ``None``). A pure function of its arguments and the generator's fields."""
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"`batch_size` must be an int >= 1, got {batch_size!r}")
        if not _is_int(seed):
            raise ValueError(f"`seed` must be an int, got {seed!r}")
        if not _is_int(batch_index) or batch_index < 0:
            raise ValueError(f"`batch_index` must be an int >= 0, got {batch_index!r}")
        n = int(batch_size)
        H, W, M = self.height, self.width, self.num_target_blocks
        official = self.mask_mode == "official"
        g = torch.Generator()
        g.manual_seed(_batch_seed(int(seed), int(batch_index)))

        # 1) one target size and one context size for the whole batch (target first, as official)
        th, tw = self._block_size(g, self.target_scale, self.target_aspect_ratio)
        ch, cw = self._block_size(g, self.context_scale, None)
        if th * tw <= self.min_keep or ch * cw <= self.min_keep:  # excluded by _check_feasible
            raise ValueError(f"drew a {th}x{tw} target / {ch}x{cw} context block, not more than "
                             f"min_keep={self.min_keep}; lower min_keep or use a larger grid")

        # 2) target positions. Official: randint(0, H - h) excludes H - h, so the last row/column
        # is never covered; fixed: every position with the block inside the grid.
        extra = 0 if official else 1
        top = torch.randint(0, H - th + extra, (n, M), generator=g)
        left = torch.randint(0, W - tw + extra, (n, M), generator=g)
        rows, cols = torch.arange(H), torch.arange(W)
        t_rows = (rows >= top[..., None]) & (rows < top[..., None] + th)  # [n, M, H]
        t_cols = (cols >= left[..., None]) & (cols < left[..., None] + tw)  # [n, M, W]

        # 3) context rectangle minus the union of the targets
        c_top = torch.randint(0, H - ch + extra, (n,), generator=g)
        c_left = torch.randint(0, W - cw + extra, (n,), generator=g)
        ctx = ((rows >= c_top[:, None]) & (rows < c_top[:, None] + ch))[:, :, None] & (
            (cols >= c_left[:, None]) & (cols < c_left[:, None] + cw))[:, None, :]  # [n, H, W]
        if not self.allow_overlap:
            union = t_rows[:, 0, :, None] & t_cols[:, 0, None, :]
            for m in range(1, M):
                union |= t_rows[:, m, :, None] & t_cols[:, m, None, :]
            ctx &= ~union
        ctx = ctx.view(n, H * W)
        counts = ctx.sum(1)
        bad = (counts <= self.min_keep).nonzero().squeeze(1)
        fallbacks = self._redraw_contexts(ctx, counts, bad, t_rows, t_cols, ch, cw, extra, g) if bad.numel() else 0

        # 5) target indices, raster order inside each block: (top + i) * W + (left + j)
        t_idx = ((top[..., None] + torch.arange(th)) * W)[..., :, None] + (
            left[..., None] + torch.arange(tw))[..., None, :]  # [n, M, th, tw]
        targets = t_idx.view(n, M, th * tw)

        if self.context_lengths == "per_image":
            # 4') keep every image's context; pad each row to the longest by repeating its last index. Context
            # patches first in raster order (keys < H * W), the rest after (keys >= H * W), in one sort.
            k = int(counts.max())
            position = torch.arange(H * W)
            order = torch.where(ctx, position, position + H * W).sort(dim=1).values[:, :k]
            last = order.gather(1, (counts - 1)[:, None])
            context = torch.where(torch.arange(k) < counts[:, None], order, last)
            return MaskBatch(context, targets, fallbacks, counts)

        # 4) equalise context lengths to the shortest in the (global) batch
        k = int(counts.min())
        if official:
            # official defect: keep the FIRST k indices in raster order
            keep = ctx & (ctx.cumsum(1) <= k)
            context = keep.nonzero()[:, 1].view(n, k)
        elif bool((counts == k).all()):
            context = ctx.nonzero()[:, 1].view(n, k)
        else:
            # uniform random k-subset of each context: top-k of random scores, restricted to the
            # context (scores in [1, 2) there, [0, 1) elsewhere; every row has >= k context patches)
            scores = torch.rand(n, H * W, generator=g).add_(ctx)
            context = scores.topk(k, dim=1, sorted=False).indices.sort(dim=1).values
        return MaskBatch(context, targets, fallbacks)

    def _redraw_contexts(self, ctx: torch.Tensor, counts: torch.Tensor, bad: torch.Tensor,
                         t_rows: torch.Tensor, t_cols: torch.Tensor, ch: int, cw: int, extra: int,
                         g: torch.Generator) -> int:
        """Redraw invalid contexts in place (all failing rows at once), official fallback included; returns the
        number of contexts that needed the fallback.

        Each failing row is redrawn; after ``max_tries`` consecutive failures at one level the
        overlap constraint with its most recent remaining target is dropped. Bounded by
        ``max_tries * (M + 1)`` rounds because a bare context rectangle is always valid.
        """
        H, W, M = self.height, self.width, self.num_target_blocks
        rows, cols = torch.arange(H), torch.arange(W)
        n = ctx.shape[0]
        fails = torch.zeros(n, dtype=torch.long)
        dropped = torch.zeros(n, dtype=torch.long)  # constraints dropped (official "tries")
        for _ in range(self.max_tries * (M + 1) + 1):
            if bad.numel() == 0:
                break
            fails[bad] += 1
            bump = bad[fails[bad] >= self.max_tries]
            dropped[bump] += 1
            fails[bump] = 0
            nb = bad.numel()
            c_top = torch.randint(0, H - ch + extra, (nb,), generator=g)
            c_left = torch.randint(0, W - cw + extra, (nb,), generator=g)
            rect = ((rows >= c_top[:, None]) & (rows < c_top[:, None] + ch))[:, :, None] & (
                (cols >= c_left[:, None]) & (cols < c_left[:, None] + cw))[:, None, :]
            active = torch.arange(M) < (M - dropped[bad])[:, None]  # [nb, M] constraints kept
            blocks = t_rows[bad][:, :, :, None] & t_cols[bad][:, :, None, :]  # [nb, M, H, W]
            union = (blocks & active[:, :, None, None]).any(1)
            new = (rect & ~union).view(nb, H * W)
            ctx[bad] = new
            counts[bad] = new.sum(1)
            bad = bad[counts[bad] <= self.min_keep]
        else:
            if bad.numel():
                raise ValueError("could not draw a valid context mask; lower min_keep or use a larger grid")
        return int((dropped > 0).sum())


def _as_int_pair(value: Any) -> tuple[int, int]:
    """``image_size`` / ``patch_size`` (already validated by `check_grid`) as a ``(height, width)`` tuple."""
    value = _pair(value)
    return (int(value), int(value)) if _is_int(value) else (int(value[0]), int(value[1]))


class IJepaMaskCollator:
    """Data collator for I-JEPA pretraining: stacks the images and attaches the multi-block masks of a
    :class:`MultiBlockMaskGenerator` (:attr:`generator`, which holds the geometry and the mask settings), counting
    batches so that batch ``i`` always gets the masks of index ``i``.

    Args:
        image_size: input resolution, an int (square) or ``(height, width)``.
        patch_size: patch side in pixels (int or ``(ph, pw)``); must divide ``image_size``.
        **mask_settings: any of the mask fields of `IJepaPretrainingConfig` (`MASK_FIELDS`: ``num_target_blocks``,
            ``context_scale``, ``target_scale``, ``target_aspect_ratio``, ``min_keep``, ``allow_overlap``,
            ``mask_mode``, ``context_lengths``), under the config's names; one not given (or ``None``) takes the
            config's default, which is also where its meaning and rules are documented. ``context_lengths=
            "per_image"`` pads ``context_mask`` to the longest context of this process's rows and adds
            ``"context_lengths"`` ``LongTensor[B]`` to the batch, which `IJepaForPreTraining` uses to mask the
            padding; ``benchmarks/README.md`` measures what it costs.
        seed: base seed; masks of batch ``i`` depend only on ``(seed, i, mask_mode, settings)``.
        num_processes, process_index: for data-parallel runs (every process with the same ``seed``).
        mask_sampling: the config's ``mask_sampling``: ``"global"`` — each call with a local batch of ``B`` samples
            the masks of the global batch of ``num_processes * B`` images and returns this process's rows, so a
            P-process run sees the masks of a 1-process run; ``"per_process"`` — each process samples its own ``B``
            (the official code). ``None`` (default): the mask mode's own (``"per_process"`` for ``"official"``).
        max_tries: failed context draws per constraint level before the overlap constraint with
            the most recent target is dropped (the official value is 20).

    Example::

        collator = IJepaMaskCollator(224, 16)
        loader = DataLoader(dataset, batch_size=64, collate_fn=collator, num_workers=4)
        batch = next(iter(loader))
        # batch["pixel_values"] [64,3,224,224], batch["context_mask"] [64,Kc],
        # batch["target_masks"] [64,4,Kt]
        # with context_lengths="per_image" also batch["context_lengths"] [64]

    With ``num_workers > 0`` the DataLoader works on copies of the collator, so the main-process
    :attr:`step` does not advance: call :meth:`set_step` with the number of batches already drawn
    at each epoch start and on resume (e.g. ``collator.set_step(epoch * len(loader))``), or keep
    ``persistent_workers=True`` (worker copies then keep counting; ``set_step`` no longer reaches
    them).
    """

    def __init__(
        self,
        image_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        *,
        seed: int = 0,
        num_processes: int = 1,
        process_index: int = 0,
        mask_sampling: str | None = None,
        max_tries: int = 20,
        **mask_settings: Any,
    ) -> None:
        if "mode" in mask_settings:
            raise TypeError("IJepaMaskCollator: `mode` is called `mask_mode`, as in the config "
                            f"(IJepaMaskCollator(..., mask_mode={mask_settings['mode']!r})).")
        unknown = sorted(set(mask_settings) - set(MASK_FIELDS))
        if unknown:
            raise TypeError(f"IJepaMaskCollator got unknown mask settings {unknown}; the settings are {MASK_FIELDS}.")
        settings = {**IJepaPretrainingConfig.default_mask_settings(),
                    **{name: value for name, value in mask_settings.items() if value is not None}}
        self.num_processes = _check_int(num_processes, "num_processes", 1)
        self.process_index = _check_int(process_index, "process_index", 0)
        if self.process_index >= self.num_processes:
            raise ValueError(
                f"`process_index` must be < num_processes ({self.num_processes}), got {process_index}"
            )
        if not _is_int(seed):
            raise ValueError(f"`seed` must be an int, got {seed!r}")
        self.seed = int(seed)
        self.generator = MultiBlockMaskGenerator(image_size=image_size, patch_size=patch_size, max_tries=max_tries,
                                                 **settings)
        if mask_sampling is not None and mask_sampling not in MASK_SAMPLINGS:
            raise ValueError(f"`mask_sampling` must be one of {MASK_SAMPLINGS} or None, got {mask_sampling!r}")
        self.mask_sampling = default_mask_sampling(settings["mask_mode"]) if mask_sampling is None else mask_sampling
        self._step = 0  # batches drawn so far (main-process view)
        self._worker_calls = 0  # calls made by this copy inside a DataLoader worker
        self.num_fallbacks = 0  # contexts that needed the overlap fallback (diagnostic)

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> IJepaMaskCollator:
        """Build a collator from a pretraining config: its geometry, its mask fields (`MASK_FIELDS`),
        ``mask_sampling`` and ``mask_seed`` (as ``seed``), read with ``getattr`` (or keys for a mapping); missing
        fields keep the defaults. ``overrides`` (any ``__init__`` argument) win."""
        names = ("image_size", "patch_size", *MASK_FIELDS, "mask_sampling")
        kwargs: dict[str, Any] = {}
        for name in (*names, "mask_seed"):
            value = config.get(name, None) if isinstance(config, Mapping) else getattr(config, name, None)
            if value is not None:
                kwargs["seed" if name == "mask_seed" else name] = tuple(value) if isinstance(value, list) else value
        kwargs.update(overrides)
        return cls(**kwargs)

    @property
    def image_size(self) -> tuple[int, int]:
        """The generator's ``(height, width)`` in pixels (what the collated images must have)."""
        return self.generator.image_size

    def possible_block_sizes(self, block: Literal["target", "context"] = "target") -> list[tuple[int, int]]:
        """All block sizes ``(h, w)`` the sampler can draw for a ``block`` ("target" or "context")."""
        return self.generator.possible_block_sizes(block)

    def settings(self) -> dict[str, Any]:
        """The generator's fields (geometry, mask settings, ``max_tries``) and ``mask_sampling``, as plain Python
        values (lists for pairs), for checkpoints and logs."""
        values = {f.name: _normalise(getattr(self.generator, f.name)) for f in dataclasses.fields(self.generator)}
        return {**values, "mask_sampling": self.mask_sampling}

    def __repr__(self) -> str:
        p = {**self.settings(), "seed": self.seed, "step": self._step, "num_processes": self.num_processes,
             "process_index": self.process_index}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in p.items())})"

    # ------------------------------------------------------------------------------------------
    # step counter and state
    @property
    def step(self) -> int:
        """Number of batches drawn so far (the next batch index in the main process)."""
        return self._step

    def set_step(self, step: int) -> None:
        """Set the number of batches already drawn (call at epoch start / on resume)."""
        if not _is_int(step) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        self._step = int(step)
        self._worker_calls = 0

    def state_dict(self) -> dict[str, Any]:
        """``{"seed", "step", **settings()}``; plain Python types (JSON/pickle friendly)."""
        return {"seed": self.seed, "step": self._step, **self.settings()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``seed``, ``step`` and ``mask_mode``; warn if the other settings differ. States written before
        the settings took the config's names (ijepa-hf 0.1.0 up to 2026-12-05) name the mask mode ``"mode"``."""
        for key in ("seed", "step"):
            if key not in state:
                raise ValueError(f"state dict has no {key!r} entry")
        mask_mode = state.get("mask_mode", state.get("mode", self.generator.mask_mode))
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
        mine = {k: v for k, v in self.settings().items() if k not in ("mask_mode", "mask_sampling")}
        diff = [k for k, v in mine.items() if k in state and _normalise(state[k]) != v]
        if diff:
            warnings.warn(f"Mask collator parameters differ from the saved state: {diff}; the mask "
                          f"sequence will not continue the saved run exactly.", stacklevel=2)
        if mask_mode != self.generator.mask_mode:
            self.generator = dataclasses.replace(self.generator, mask_mode=mask_mode)  # re-checks feasibility
        self.seed = int(state["seed"])
        self.set_step(int(state["step"]))

    def _next_batch_index(self) -> int:
        info = get_worker_info()
        if info is None:
            index = self._step
            self._step += 1
            return index
        # Inside a DataLoader worker (a copy of the collator made when the workers started):
        # the DataLoader hands batches to workers round-robin, so the k-th batch of worker w is
        # global batch step + k * num_workers + w, independent of worker timing.
        index = self._step + self._worker_calls * info.num_workers + info.id
        self._worker_calls += 1
        return index

    # ------------------------------------------------------------------------------------------
    # sampling
    def sample_masks(self, batch_size: int, batch_index: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample the masks of one (local) batch (``context_lengths="shortest"``; :meth:`sample_batch` serves both).

        Args:
            batch_size: local batch size ``B`` (with ``mask_sampling="global"`` the global batch is
                ``num_processes * B``).
            batch_index: global batch number; ``None`` takes the next one from the step counter
                (and advances it).

        Returns:
            ``context_mask`` ``LongTensor[B, Kc]`` (sorted ascending, equal length over the sampled
            batch) and ``target_masks`` ``LongTensor[B, M, Kt]`` (each block in raster order).

        Raises:
            ValueError: with ``context_lengths="per_image"``, whose padded contexts mean nothing without their
                lengths: use :meth:`sample_batch`.
        """
        if self.generator.context_lengths != "shortest":
            raise ValueError(
                f"sample_masks() returns equal-length contexts only, but this collator has context_lengths="
                f"{self.generator.context_lengths!r}: use sample_batch(), which also returns the 'context_lengths' "
                "of the padded contexts."
            )
        masks = self.sample_batch(batch_size, batch_index)
        return masks["context_mask"], masks["target_masks"]

    def sample_batch(self, batch_size: int, batch_index: int | None = None) -> dict[str, torch.Tensor]:
        """The masks of one (local) batch as the model's keyword arguments.

        Args:
            batch_size: local batch size ``B`` (the global batch is ``num_processes * B``).
            batch_index: global batch number; ``None`` takes the next one from the step counter (and advances it).

        Returns:
            ``{"context_mask": LongTensor[B, Kc], "target_masks": LongTensor[B, M, Kt]}``, plus with
            ``context_lengths="per_image"`` ``"context_lengths": LongTensor[B]`` (``Kc`` is then the longest
            context among these ``B`` rows; each row is padded after its own length).
        """
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if batch_index is None:
            batch_index = self._next_batch_index()
        elif batch_index < 0:
            raise ValueError(f"batch_index must be >= 0, got {batch_index}")
        sharing = self.num_processes if self.mask_sampling == "global" else 1  # processes whose rows are drawn
        ctx, tgt, fallbacks, lengths = self.generator.sample(batch_size * sharing, seed=self.seed,
                                                             batch_index=int(batch_index))
        if fallbacks:
            self._log_fallbacks(fallbacks)
        lo = self.process_index * batch_size
        if sharing > 1:
            ctx, tgt = ctx[lo:lo + batch_size], tgt[lo:lo + batch_size].contiguous()
            if lengths is not None:
                # Padding to this process's longest context is enough: each image's result does not depend on it.
                lengths = lengths[lo:lo + batch_size]
                ctx = ctx[:, : int(lengths.max())]
            ctx = ctx.contiguous()
        masks = {"context_mask": ctx, "target_masks": tgt}
        if lengths is not None:
            masks["context_lengths"] = lengths
        return masks

    def _log_fallbacks(self, count: int) -> None:
        self.num_fallbacks += count
        log = logger.warning if self.num_fallbacks == count else logger.debug
        log("Mask sampler: %d context(s) in this batch needed the overlap fallback (%d so far); "
            "consider fewer/smaller target blocks, a lower min_keep or a larger grid.", count, self.num_fallbacks)

    # ------------------------------------------------------------------------------------------
    # collation
    def __call__(self, examples: Sequence[Any], batch_index: int | None = None) -> dict[str, torch.Tensor]:
        """Collate examples and attach masks.

        Args:
            examples: a list of dicts with a ``"pixel_values"`` tensor ``[C, H, W]``, of tensors, or
                of ``(tensor, label)`` tuples (labels are dropped).
            batch_index: the global batch number whose masks to attach; ``None`` takes the next one from the step
                counter (and advances it).

        Returns:
            ``{"pixel_values": Tensor[B, C, H, W], "context_mask": LongTensor[B, Kc],
            "target_masks": LongTensor[B, M, Kt]}``, with ``context_lengths="per_image"`` also
            ``"context_lengths": LongTensor[B]``. Images keep their dtype: float images as they are, ``uint8``
            images as ``uint8`` (to cross to the device at a quarter of the bytes; finish them there with
            ``ijepa_hf.data.normalize_images``).
        """
        if len(examples) == 0:
            raise ValueError("cannot collate an empty list of examples")
        images = []
        for ex in examples:
            if isinstance(ex, Mapping):
                if "pixel_values" not in ex:
                    raise ValueError(
                        f"example dict has no 'pixel_values' key (keys: {list(ex)}): the collator batches cropped "
                        "image tensors. Wrap an image dataset (a datasets.Dataset with an image column, a list of "
                        "dicts) as ijepa_hf.data.PretrainImageDataset(dataset, image_size="
                        f"{self.image_size[0]}) (the official crop; image_key= names another column), or give it a "
                        "transform that returns 'pixel_values'.")
                ex = ex["pixel_values"]
            elif isinstance(ex, (tuple, list)):
                ex = ex[0]
            images.append(torch.as_tensor(ex))
        pixel_values = torch.stack(images)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[-2:]) != self.image_size:
            raise ValueError(f"expected images of shape [C, {self.image_size[0]}, {self.image_size[1]}], "
                             f"got {tuple(images[0].shape)}")
        if not (pixel_values.is_floating_point() or pixel_values.dtype == torch.uint8):
            raise ValueError(f"images must be float tensors or uint8 tensors (0-255), got {pixel_values.dtype}")
        return {"pixel_values": pixel_values, **self.sample_batch(len(images), batch_index)}


def _normalise(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_normalise(x) for x in v]
    return v
