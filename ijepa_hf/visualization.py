"""Pictures for I-JEPA: multi-block masks, training curves, PCA maps of patch features.

Everything draws on standalone ``matplotlib.figure.Figure`` objects with the Agg canvas, never ``pyplot``: no
display is needed, the caller's pyplot backend and global state are left alone, and it is safe in threads and
headless jobs. Every ``plot_*`` function writes a PNG and returns its path. Pictures are saved without
``bbox_inches="tight"``, so a figure is exactly ``figsize * dpi`` pixels.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .data import IMAGENET_MEAN, IMAGENET_STD
from .training.metrics import LOSS_KEY, THROUGHPUT_KEY, read_train_log

logger = logging.getLogger(__name__)

__all__ = [
    "plot_masks",
    "plot_mask_grid",
    "plot_training_curves",
    "pca_rgb",
    "plot_pca_features",
]

PathLike = str | os.PathLike
ImageLike = Image.Image | torch.Tensor | np.ndarray

_CONTEXT_RGBA = (0.25, 0.55, 1.0, 0.35)  # context patches: light blue tint
_HIDDEN_RGBA = (0.0, 0.0, 0.0, 0.6)  # patches in neither context nor targets: darkened
# Target colours: tab10 without its blue (the context colour).
_TARGET_COLORS = ("#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")


def _new_figure(figsize: tuple[float, float], dpi: int) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: PathLike, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, format="png", facecolor="white")
    return path


def _display_array(
    image: ImageLike,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    normalized: bool | None = None,
) -> np.ndarray:
    """Any image -> float ``[H, W, 3]`` in [0, 1] for ``imshow``.

    A tensor ``[3, H, W]`` normalised with ``mean``/``std`` is un-normalised. ``normalized=None`` guesses:
    values outside [0, 1] mean normalised. PIL images and ``uint8`` arrays are scaled by 1/255.
    """
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    if isinstance(image, np.ndarray):
        array = image.astype(np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)
        return np.repeat(array[..., None], 3, axis=-1) if array.ndim == 2 else array[..., :3]
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected a PIL image, an array or a [3, H, W] tensor, got {type(image).__name__} "
                         f"{tuple(getattr(image, 'shape', ()))}.")
    tensor = image.detach().float().cpu().expand(3, -1, -1)
    if normalized or (normalized is None and (tensor.min() < 0 or tensor.max() > 1)):
        tensor = tensor * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return tensor.clamp(0, 1).permute(1, 2, 0).numpy()


def _as_indices(mask: Any, num_patches: int) -> np.ndarray:
    """Patch indices from an index tensor ``[K]`` or a boolean mask ``[N]``."""
    mask = torch.as_tensor(mask).detach().cpu()
    if mask.dtype == torch.bool:
        if mask.numel() != num_patches:
            raise ValueError(f"a boolean mask must have {num_patches} entries, got {mask.numel()}.")
        mask = mask.nonzero().flatten()
    indices = mask.long().flatten().numpy()
    if indices.size and (indices.min() < 0 or indices.max() >= num_patches):
        raise ValueError(f"patch indices must be in [0, {num_patches}), got [{indices.min()}, {indices.max()}].")
    return indices


def _draw_masks(
    axes: Any,
    image: np.ndarray,
    context_mask: Any,
    target_masks: Any,
    patch_size: int,
) -> None:
    """Draws ``image [H, W, 3]``, its context (tinted) and target blocks (coloured, outlined) on ``axes``."""
    from matplotlib.patches import Rectangle

    height, width = image.shape[:2]
    rows, cols = height // patch_size, width // patch_size
    if rows == 0 or cols == 0:
        raise ValueError(f"image {height}x{width} is smaller than one {patch_size}px patch.")
    num_patches = rows * cols
    targets = torch.as_tensor(target_masks)
    targets = targets.unsqueeze(0) if targets.dim() == 1 else targets  # [M, Kt]

    overlay = np.zeros((num_patches, 4), dtype=np.float32)
    overlay[:] = _HIDDEN_RGBA
    overlay[_as_indices(context_mask, num_patches)] = _CONTEXT_RGBA
    axes.imshow(image, extent=(0, width, height, 0), interpolation="nearest")
    for block, indices in enumerate(targets):
        indices = _as_indices(indices, num_patches)
        color = _TARGET_COLORS[block % len(_TARGET_COLORS)]
        overlay[indices] = (*_hex_to_rgb(color), 0.45)
        # Blocks are rectangles: outline their bounding box (for other index sets it is still the extent).
        r, c = indices // cols, indices % cols
        axes.add_patch(Rectangle(
            (c.min() * patch_size, r.min() * patch_size), (c.max() - c.min() + 1) * patch_size,
            (r.max() - r.min() + 1) * patch_size, fill=False, edgecolor=color, linewidth=2,
        ))
    axes.imshow(overlay.reshape(rows, cols, 4), extent=(0, cols * patch_size, rows * patch_size, 0),
                interpolation="nearest")
    # A faint patch grid, so single patches can be counted.
    axes.vlines(np.arange(1, cols) * patch_size, 0, rows * patch_size, colors="white", linewidth=0.3, alpha=0.5)
    axes.hlines(np.arange(1, rows) * patch_size, 0, cols * patch_size, colors="white", linewidth=0.3, alpha=0.5)
    axes.set_xlim(0, width)
    axes.set_ylim(height, 0)
    axes.set_axis_off()


def _hex_to_rgb(color: str) -> tuple[float, float, float]:
    return tuple(int(color[i : i + 2], 16) / 255.0 for i in (1, 3, 5))  # type: ignore[return-value]


def _legend_layout(num_blocks: int, width_inches: float) -> tuple[int, float]:
    """Columns of the mask legend that fit the figure width, and the height (inches) it needs."""
    items = num_blocks + 2
    ncol = max(1, min(items, int(width_inches // 1.15)))
    return ncol, 0.22 * math.ceil(items / ncol) + 0.15


def _mask_legend(figure: Any, num_blocks: int) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=_CONTEXT_RGBA, edgecolor="none", label="context"),
               Patch(facecolor=_HIDDEN_RGBA, edgecolor="none", label="unused")]
    handles += [Patch(facecolor=_TARGET_COLORS[j % len(_TARGET_COLORS)], label=f"target {j + 1}")
                for j in range(num_blocks)]
    ncol, _ = _legend_layout(num_blocks, figure.get_figwidth())
    figure.legend(handles=handles, loc="lower center", ncol=ncol, fontsize="small", frameon=False,
                  borderaxespad=0.2, handlelength=1.2, columnspacing=1.0)


def plot_masks(
    image: ImageLike,
    context_mask: torch.Tensor,
    target_masks: torch.Tensor,
    patch_size: int,
    path: PathLike,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    normalized: bool | None = None,
    title: str | None = None,
    figsize: tuple[float, float] = (4.0, 4.6),
    dpi: int = 100,
) -> Path:
    """One image with its I-JEPA masks: context patches tinted blue, each target block in its own colour
    and outlined, patches in neither darkened; a legend below.

    Args:
        image: PIL image, ``uint8``/float array ``[H, W, 3]``, or tensor ``[3, H, W]``: normalised with
            ``mean``/``std`` (e.g. a collator batch row) or in [0, 1]; ``normalized=None`` guesses which.
        context_mask: patch indices ``[Kc]`` (raster order) or a boolean ``[N]`` mask.
        target_masks: ``[M, Kt]`` indices (one row per block), or ``[Kt]`` for a single block.
        patch_size: patch side in pixels of ``image``.
        path: where to write the PNG (``figsize * dpi`` pixels).
    """
    targets = torch.as_tensor(target_masks)
    num_blocks = 1 if targets.dim() == 1 else targets.shape[0]
    figure = _new_figure(figsize, dpi)
    bottom = _legend_layout(num_blocks, figsize[0])[1] / figsize[1]
    top = 1.0 - (0.35 / figsize[1] if title else 0.02)
    axes = figure.add_axes((0.02, bottom, 0.96, top - bottom))
    _draw_masks(axes, _display_array(image, mean, std, normalized), context_mask, targets, patch_size)
    _mask_legend(figure, num_blocks)
    if title:
        figure.suptitle(title, fontsize="medium")
    return _save(figure, path, dpi)


def plot_mask_grid(
    images: torch.Tensor | Sequence[ImageLike],
    context_masks: torch.Tensor,
    target_masks: torch.Tensor,
    patch_size: int,
    path: PathLike,
    *,
    max_images: int = 8,
    ncols: int = 4,
    panel_size: float = 2.5,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    normalized: bool | None = None,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """The masks of the first ``max_images`` images of a batch, in a grid (one legend for all).

    Args:
        images: ``[B, 3, H, W]`` (a collator's ``pixel_values``) or a list of images.
        context_masks: ``[B, Kc]``; target_masks: ``[B, M, Kt]`` (the collator's outputs).
        ncols, panel_size: grid columns and the side of one panel in inches. The PNG is
            ``min(ncols, n) * panel_size * dpi`` pixels wide; its height adds the legend (and title) rows.
    """
    count = min(len(images), max_images)
    if count == 0:
        raise ValueError("no images to plot.")
    if len(context_masks) < count or len(target_masks) < count:
        raise ValueError(f"{count} images but {len(context_masks)} context / {len(target_masks)} target masks.")
    ncols = min(ncols, count)
    nrows = math.ceil(count / ncols)
    first_targets = torch.as_tensor(target_masks[0])
    num_blocks = first_targets.shape[0] if first_targets.dim() == 2 else 1
    legend_height = _legend_layout(num_blocks, ncols * panel_size)[1]
    figsize = (ncols * panel_size, nrows * panel_size + legend_height + (0.3 if title else 0.0))
    figure = _new_figure(figsize, dpi)
    bottom = legend_height / figsize[1]
    top = 1.0 - (0.3 / figsize[1] if title else 0.0)
    grid = figure.add_gridspec(nrows, ncols, left=0.01, right=0.99, bottom=bottom, top=top, wspace=0.04, hspace=0.04)
    for i in range(count):
        axes = figure.add_subplot(grid[i // ncols, i % ncols])
        image = _display_array(images[i], mean, std, normalized)
        _draw_masks(axes, image, context_masks[i], target_masks[i], patch_size)
    _mask_legend(figure, num_blocks)
    if title:
        figure.suptitle(title, fontsize="medium")
    return _save(figure, path, dpi)


# ----------------------------------------------------------------------------------------------------------------
# Training curves
# ----------------------------------------------------------------------------------------------------------------


# Inches of figure height per row of panels in `plot_training_curves` (title, axes, tick labels and x label).
PANEL_ROW_HEIGHT = 2.5

# Panels: (title, keys on the left axis, keys on a right twin axis, log scale). A panel is drawn when any of
# its keys has data; every key is optional so logs of other scripts (or older runs) still plot.
_PANELS: tuple[tuple[str, tuple[str, ...], tuple[str, ...], bool], ...] = (
    ("loss", (LOSS_KEY, "prediction_loss", "train_loss", "eval_loss", "val_loss"), (), True),
    ("regulariser terms, unweighted: SIGReg / VICReg", ("sigreg_loss",), ("variance_loss", "covariance_loss"),
     False),
    ("learning rate / weight decay", ("lr", "learning_rate"), ("weight_decay", "wd"), False),
    ("EMA momentum", ("momentum", "ema_momentum"), (), False),
    ("feature std (collapse if -> 0)", ("target_std", "target_token_std", "pred_std"), (), False),
    ("pooled targets: cosine of images (collapse: 1) / rank", ("target_cosine",), ("target_rankme",), False),
    ("online probe: k-NN accuracy (encoder, raw pixels) / rank", ("online_knn_accuracy", "online_knn_pixels_accuracy"),
     ("online_rankme",), False),
    ("images/s: training, loader capacity / data wait share", (THROUGHPUT_KEY, "loader_images_per_s"),
     ("data_wait_fraction",), False),
)


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of the rows that have a finite number under ``key`` (x = ``step``, else row index)."""
    steps, values = [], []
    for index, row in enumerate(rows):
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            steps.append(row.get("step", index))
            values.append(float(value))
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def _panels_with_data(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, tuple[str, ...], tuple[str, ...], bool]]:
    """The panels of `_PANELS` that have a finite value under one of their keys in ``rows``."""
    return [panel for panel in _PANELS if any(_series(rows, key)[0].size for key in panel[1] + panel[2])]


def plot_training_curves(
    log_path_or_rows: PathLike | Iterable[Mapping[str, Any]],
    path: PathLike,
    *,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: int = 100,
) -> Path:
    """Training curves of a run from its ``train_log.jsonl`` (or the rows themselves), two panels a row; the
    default ``figsize`` is 12 inches wide and :data:`PANEL_ROW_HEIGHT` inches per row of panels.

    Panels (each only if its keys are logged): loss (log scale; ``eval_loss`` and a regularised run's
    ``prediction_loss`` too), the anti-collapse regulariser's terms, lr with wd on a twin axis,
    EMA momentum, ``target_std`` / ``target_token_std`` / ``pred_std`` (spreads of target and predicted
    features: a drop towards 0 signals representation collapse), the online probe's k-NN accuracy with its RankMe
    on a twin axis, and ``images_per_s`` beside ``loader_images_per_s`` with ``data_wait_fraction`` on a twin axis
    (which of the step and the data limits the run). The x axis is ``step``
    (the row number when absent). Non-finite values are skipped; non-positive losses are dropped from the
    log-scale panel.

    Raises:
        ValueError: no row has a finite value under any of the known keys (the message lists the keys found).
    """
    rows = (read_train_log(log_path_or_rows) if isinstance(log_path_or_rows, (str, os.PathLike))
            else [dict(row) for row in log_path_or_rows])
    panels = _panels_with_data(rows)
    if not panels:
        known = [k for p in _PANELS for k in p[1] + p[2]]
        found = sorted({key for row in rows for key in row})
        non_finite = [key for key in found if key in known]  # logged, but never as a finite number
        raise ValueError(f"nothing to plot: no finite value under any of {known}; keys found: {found}"
                         + (f"; of the known keys found, each non-finite in every row: {non_finite}" if non_finite
                            else "") + ".")
    ncols = 1 if len(panels) == 1 else 2
    nrows = math.ceil(len(panels) / ncols)
    if figsize is None:
        figsize = (12.0, max(3.5, PANEL_ROW_HEIGHT * nrows + (0.4 if title else 0.0)))
    figure = _new_figure(figsize, dpi)
    series = {key: _series(rows, key) for _, left_keys, right_keys, _ in panels for key in left_keys + right_keys}
    for index, (name, left_keys, right_keys, log_scale) in enumerate(panels):
        axes = figure.add_subplot(nrows, ncols, index + 1)
        lines = []
        if not any(series[key][0].size for key in left_keys):  # e.g. VICReg's terms without SIGReg's
            left_keys, right_keys = right_keys, ()
        has_right = any(series[key][0].size for key in right_keys)
        for keys, target in ((left_keys, axes), (right_keys, axes.twinx() if has_right else None)):
            if target is None:
                continue
            drawn = []
            for key in keys:
                steps, values = series[key]
                if log_scale:
                    steps, values = steps[values > 0], values[values > 0]
                if steps.size:
                    # Colours continue across both axes so a twin-axis curve is told apart in the legend.
                    (line,) = target.plot(steps, values, label=key, color=f"C{len(lines)}", linewidth=1.2,
                                          marker="o" if steps.size < 3 else None)
                    lines.append(line)
                    drawn.append(key)
            if drawn:
                if len(drawn) == 1:  # several curves: the legend names them (joined names overran the panel)
                    target.set_ylabel(drawn[0])
                if log_scale:
                    target.set_yscale("log")
        if len(lines) > 1:
            axes.legend(handles=lines, fontsize="small")
        axes.set_title(name, fontsize="medium")
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return _save(figure, path, dpi)


# ----------------------------------------------------------------------------------------------------------------
# PCA of patch features
# ----------------------------------------------------------------------------------------------------------------


def pca_rgb(features: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """The first three principal components of patch features as colours.

    Args:
        features: ``[N, D]`` patch features (``N = rows * cols``, raster order).
        grid_size: ``(rows, cols)``.

    Returns:
        FloatTensor ``[rows, cols, 3]`` in [0, 1]: component ``c`` -> channel ``c`` (R, G, B), each scaled
        between its 1st and 99th percentile. An exact SVD (not the randomised ``pca_lowrank``) keeps the
        picture deterministic; each component's sign is fixed so its largest loading is positive.
    """
    features = features.detach().float().cpu()
    rows, cols = grid_size
    if features.dim() != 2 or features.shape[0] != rows * cols:
        raise ValueError(f"features must be [{rows * cols}, D] for a {rows}x{cols} grid, got {tuple(features.shape)}.")
    centred = features - features.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    components = vh[:3]  # [<=3, D]
    signs = torch.sign(components.gather(1, components.abs().argmax(dim=1, keepdim=True)))
    projection = centred @ (components * signs).T  # [N, <=3]
    if projection.shape[1] < 3:  # fewer than 3 patches or dims: pad with a neutral channel
        projection = F.pad(projection, (0, 3 - projection.shape[1]))
    low = projection.quantile(0.01, dim=0)
    high = projection.quantile(0.99, dim=0)
    scaled = ((projection - low) / (high - low).clamp_min(1e-8)).clamp(0, 1)
    return scaled.reshape(rows, cols, 3)


@torch.no_grad()
def plot_pca_features(
    model: torch.nn.Module,
    image: ImageLike,
    path: PathLike,
    image_processor: Any | None = None,
    *,
    encoder: str = "target",
    interpolation: str = "nearest",
    figsize: tuple[float, float] = (8.0, 4.2),
    dpi: int = 100,
) -> Path:
    """The input image next to an RGB map of the first three principal components of its patch features.

    Args:
        model: an encoder, a pretraining model (its ``encoder``: ``"target"`` or ``"context"``) or a classifier (its backbone).
        image: a PIL image or array (preprocessed with ``image_processor``, default
            `make_image_processor(config)`), or a ``[3, H, W]`` tensor taken as ready ``pixel_values``.
        path: where to write the PNG (``figsize * dpi`` pixels).
        interpolation: how the ``rows x cols`` map is upsampled to the image size (``"nearest"`` keeps patch
            borders visible; ``"bilinear"`` is smoother).
    """
    from .loading import resolve_encoder
    from .image_processing import make_image_processor

    network = resolve_encoder(model, encoder)  # type: ignore[arg-type]
    if image_processor is None:
        image_processor = make_image_processor(network.config)
    mean = getattr(image_processor, "image_mean", None) or IMAGENET_MEAN
    std = getattr(image_processor, "image_std", None) or IMAGENET_STD
    if isinstance(image, torch.Tensor):
        pixel_values = image.unsqueeze(0) if image.dim() == 3 else image
    else:
        pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        pixel_values = image_processor(images=pil.convert("RGB"), return_tensors="pt")["pixel_values"]
    parameter = next(network.parameters())
    was_training = network.training
    network.eval()
    try:
        features = network(pixel_values=pixel_values.to(parameter.device, parameter.dtype)).last_hidden_state[0]
    finally:
        network.train(was_training)
    patch = network.config.patch_size
    height, width = pixel_values.shape[-2:]
    grid = (height // patch, width // patch)
    colours = pca_rgb(features, grid).permute(2, 0, 1)[None]  # [1, 3, rows, cols]
    colours = F.interpolate(colours, size=(height, width), mode=interpolation)[0].permute(1, 2, 0).numpy()

    figure = _new_figure(figsize, dpi)
    for index, (picture, name) in enumerate(
        ((_display_array(pixel_values[0], mean, std, normalized=True), "input"),
         (colours, "PCA of patch features (RGB = PC1-3)"))
    ):
        axes = figure.add_subplot(1, 2, index + 1)
        axes.imshow(picture, interpolation="nearest")
        axes.set_title(name, fontsize="medium")
        axes.set_axis_off()
    figure.tight_layout()
    return _save(figure, path, dpi)
