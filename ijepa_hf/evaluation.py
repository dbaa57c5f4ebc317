"""Frozen-feature evaluation of I-JEPA encoders: feature extraction, linear probe, k-NN probe, results table.

The paper evaluates the **target encoder** with **average-pooled patch features** (I-JEPA has no [CLS] token;
maintainer in facebookresearch/ijepa#36) and releases no evaluation code. This module implements that protocol
and the common "last 4 layers" variant (DINO/iBOT-style: the outputs of the last four blocks, each passed
through the encoder's final LayerNorm, average-pooled over patches and concatenated).

All probes run in plain torch (no scikit-learn), are deterministic for a given ``seed`` and work on CPU or GPU:

* :func:`extract_features` -> ``(features [N, D] or [N, k*D], labels [N])``;
* :func:`linear_probe`: multinomial logistic regression on standardised features, L2 strength chosen on a
  held-out part of the training set, solved with full-batch L-BFGS (or mini-batch AdamW for very large sets);
* :func:`knn_probe`: cosine-similarity k-NN with the DINO temperature-weighted vote;
* :func:`attentive_probe`: a learned query cross-attending over the frozen patch tokens
  (``extract_features(..., pool=False)``), then a linear head (V-JEPA 2's attentive probe);
* :func:`evaluate_encoder`: both probes for one model and one layer choice, as a row of
  :func:`format_results_table`.

Accuracies are fractions in ``[0, 1]``; the table shows percentages.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .loading import resolve_encoder

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_WEIGHT_DECAY_GRID",
    "extract_features",
    "linear_probe",
    "knn_probe",
    "AttentiveClassifier",
    "attentive_probe",
    "low_shot_indices",
    "low_shot_linear_probe",
    "evaluate_encoder",
    "format_results_table",
]

# L2 strengths tried by `linear_probe` (penalty 0.5 * wd * ||W||^2 on top of the mean cross-entropy): from almost
# no shrinkage to strong shrinkage of a head on standardised (unit-variance) features.
DEFAULT_WEIGHT_DECAY_GRID: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)

LayerSpec = str | int


# ----------------------------------------------------------------------------------------------------------------
# Feature extraction
# ----------------------------------------------------------------------------------------------------------------


def _final_norm(encoder: nn.Module) -> nn.Module:
    """The LayerNorm applied after the last block (``norm`` in ours and timm, ``layernorm`` in transformers)."""
    for name in ("norm", "layernorm", "layer_norm", "post_layernorm"):
        module = getattr(encoder, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(
        f"{type(encoder).__name__} has no final norm attribute (`norm` or `layernorm`); multi-layer features "
        "need it. Use layers='last'."
    )


def _num_blocks(encoder: nn.Module) -> int | None:
    config = getattr(encoder, "config", None)
    return getattr(config, "num_hidden_layers", None)


def _last_layers(
    encoder: nn.Module, pixel_values: torch.Tensor, num_layers: int, norm: nn.Module | None
) -> list[torch.Tensor]:
    """The outputs ``[B, N, D]`` of the last ``num_layers`` blocks, each through the final LayerNorm.

    Our encoders have timm's ``get_intermediate_layers`` (it stops after the last block asked for); other models
    (transformers' stock ``IJepaModel``, ViT) give them through ``output_hidden_states``.
    """
    num_blocks = _num_blocks(encoder)
    if num_blocks is not None and num_layers > num_blocks:
        raise ValueError(f"layers={num_layers} but the encoder has {num_blocks} blocks.")
    if hasattr(encoder, "get_intermediate_layers"):
        return list(encoder.get_intermediate_layers(pixel_values, n=num_layers, norm=True))
    hidden_states = encoder(pixel_values=pixel_values, output_hidden_states=True).hidden_states
    # hidden_states = (embeddings, block 1, ..., block L): only the last L are block outputs.
    num_blocks = 0 if hidden_states is None else len(hidden_states) - 1
    if num_layers > num_blocks:
        raise ValueError(f"layers={num_layers} but the encoder has {num_blocks} blocks.")
    return [norm(h) for h in hidden_states[-num_layers:]]


def _parse_layers(layers: LayerSpec) -> int:
    """``"last"`` -> 0 (the final output); a positive int k -> k (the last k blocks)."""
    if layers == "last":
        return 0
    if isinstance(layers, str) and layers.isdigit():
        layers = int(layers)
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ValueError(f"`layers` must be 'last' or a positive number of blocks (e.g. 4), got {layers!r}.")
    return layers


def _to_label(value: Any) -> int:
    if value is None:
        return -1
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"labels must be scalars, got a tensor of shape {tuple(value.shape)}.")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ValueError(
            f"labels must be integer class ids, got {value!r}; encode string labels first (e.g. with "
            "`dataset.class_encode_column(...)`)."
        )
    return int(value)


class _BatchBuilder:
    """Turns a list of examples into ``(pixel_values [B, C, H, W], labels [B])``.

    An example is a dict (with ``pixel_values`` already transformed, or an image under ``image_column``), an
    ``(image, label)`` pair, or a bare image. Images may be PIL images, paths, bytes, ``{"bytes", "path"}`` dicts
    or arrays; unreadable ones are dropped (counted and warned about by `ijepa_hf.data.load_image`).
    A module-level class so DataLoader workers can pickle it.
    """

    def __init__(
        self,
        image_processor: Any | None,
        transform: Callable[[Any], torch.Tensor] | None,
        image_column: str,
        label_column: str | None,
    ) -> None:
        self.image_processor = image_processor
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column

    def _split(self, example: Any) -> tuple[Any, Any]:
        if isinstance(example, Mapping):
            label = example.get(self.label_column) if self.label_column else None
            if "pixel_values" in example:
                return example["pixel_values"], label
            if self.image_column not in example:
                raise KeyError(
                    f"example has neither 'pixel_values' nor the image column {self.image_column!r} "
                    f"(keys: {sorted(example)}); pass image_column=."
                )
            return example[self.image_column], label
        if isinstance(example, (tuple, list)) and len(example) == 2:
            return example[0], example[1]
        return example, None

    def __call__(self, examples: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(pixel_values, labels, kept)``, ``kept`` the positions in ``examples`` of the readable ones."""
        from .data import load_image

        tensors: list[torch.Tensor] = []
        images: list[Any] = []
        labels: list[int] = []
        kept: list[int] = []
        for position, example in enumerate(examples):
            item, label = self._split(example)
            if item is None:
                continue  # a row that failed in an upstream robust transform (pixel_values=None)
            if isinstance(item, torch.Tensor) and item.dim() == 3:
                tensors.append(item)  # already a transformed [C, H, W] tensor
            else:
                image = load_image(item)
                if image is None:
                    continue
                images.append(image)
            labels.append(_to_label(label))
            kept.append(position)
        if tensors and images:
            raise ValueError("a batch mixes pre-transformed tensors and raw images; use one or the other.")
        if not labels:
            return None
        if tensors:
            pixel_values = torch.stack(tensors)
        elif self.transform is not None:
            pixel_values = torch.stack([self.transform(image) for image in images])
        else:
            pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return pixel_values.float(), torch.tensor(labels, dtype=torch.long), torch.tensor(kept, dtype=torch.long)


def _batches(
    dataset: Any, collate: _BatchBuilder, batch_size: int, num_workers: int
) -> tuple[Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None], int | None]:
    """Batches of ``dataset`` and their number (``None`` when the length is unknown).

    Map-style data (``datasets.Dataset``, torch ``Dataset``, lists) and torch ``IterableDataset`` go through a
    ``DataLoader`` (workers, ``__getitems__``); other iterables (``datasets.IterableDataset``, generators) are
    chunked in this process.
    """
    try:
        num_batches = math.ceil(len(dataset) / batch_size)
    except TypeError:
        num_batches = None
    map_style = hasattr(dataset, "__getitem__") and num_batches is not None
    if map_style or isinstance(dataset, torch.utils.data.IterableDataset):
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate
        )
        return loader, num_batches

    def chunks() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
        iterator = iter(dataset)
        while chunk := list(itertools.islice(iterator, batch_size)):
            yield collate(chunk)

    return chunks(), num_batches


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset: Any,
    *,
    image_processor: Any | None = None,
    transform: Callable[[Any], torch.Tensor] | None = None,
    image_column: str = "image",
    label_column: str | None = "label",
    batch_size: int = 64,
    layers: LayerSpec = "last",
    device: str | torch.device | None = None,
    num_workers: int = 0,
    progress: bool = True,
    encoder: Literal["target", "context"] = "target",
    return_indices: bool = False,
    pool: bool = True,
) -> tuple[torch.FloatTensor, torch.LongTensor] | tuple[torch.FloatTensor, torch.LongTensor, torch.LongTensor]:
    """Average-pooled patch features of every image of ``dataset`` (the paper's evaluation features), or with
    ``pool=False`` the final patch tokens themselves (for :func:`attentive_probe`).

    Args:
        model: an `IJepaEncoderModel`, an `IJepaForPreTraining` (its target encoder is used, or the context
            encoder with ``encoder="context"``), a classifier (its backbone is used), or a stock transformers
            ``IJepaModel``; see :func:`ijepa_hf.loading.resolve_encoder`.
        dataset: a ``datasets.Dataset`` / ``IterableDataset``, a torch ``Dataset`` or any iterable of examples:
            dicts with an image under ``image_column`` (PIL, path, bytes, ``{"bytes", "path"}``) or already
            transformed ``pixel_values [C, H, W]``, ``(image, label)`` pairs, or bare images.
        image_processor: turns raw images into ``pixel_values`` (converts grayscale/RGBA to RGB, resizes,
            normalises). Default: `make_image_processor(encoder.config)` (ImageNet statistics at the model's
            resolution). Ignored when ``transform`` is given or the examples carry ``pixel_values``.
        transform: alternatively a per-image ``PIL -> FloatTensor [3, H, W]`` callable (e.g.
            `ijepa_hf.data.EvalTransform`).
        image_column, label_column: column names; a missing label (or ``label_column=None``) is returned as -1.
        batch_size: images per forward pass.
        layers: ``"last"``: mean over patches of the final (LayerNorm'ed) output -> ``[N, D]``. An int ``k``:
            the outputs of the last ``k`` blocks, **each passed through the encoder's final LayerNorm** (the
            norm the last block's output gets, so every layer is on the same scale; DINO's
            ``get_intermediate_layers`` does the same), average-pooled and concatenated in depth order ->
            ``[N, k * D]``. ``k = 1`` equals ``"last"``.
        device: where to run; default: the model's device. Features are returned on the CPU.
        num_workers: DataLoader workers for map-style datasets.
        progress: show a tqdm progress bar.
        encoder: for pretraining models, ``"target"`` (default) or ``"context"`` encoder.
        return_indices: also return, for every feature row, the position of its example in ``dataset``.
        pool: ``False`` returns the final patch tokens ``[N, T, D]`` instead of their mean (only with
            ``layers="last"``; memory grows with ``T``: subsample large datasets).

    Returns:
        ``features`` FloatTensor ``[N, D]`` (or ``[N, k * D]``) in float32 and ``labels`` LongTensor ``[N]``, plus
        with ``return_indices`` the source positions LongTensor ``[N]``. Unreadable images are skipped, so N can be
        smaller than ``len(dataset)``: the indices keep every row matched to its example (file, id).

    The encoder is run in eval mode under ``torch.no_grad``; its previous train/eval mode is restored.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    num_layers = _parse_layers(layers)
    if not pool and num_layers:
        raise ValueError("pool=False returns the final patch tokens: use it with layers='last'.")
    network = resolve_encoder(model, encoder)
    norm = _final_norm(network) if num_layers and not hasattr(network, "get_intermediate_layers") else None
    if transform is None and image_processor is None:
        from .image_processing import make_image_processor

        image_processor = make_image_processor(network.config)
    parameter = next(network.parameters(), None)
    device = torch.device(device) if device is not None else (parameter.device if parameter is not None else "cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32

    collate = _BatchBuilder(image_processor, transform, image_column, label_column)
    batches, total = _batches(dataset, collate, batch_size, num_workers)
    was_training = network.training
    network.eval()
    features: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    indices: list[torch.Tensor] = []
    try:
        batch_iterator = tqdm(batches, total=total, desc="Extracting features", disable=not progress, unit="batch")
        for batch_index, batch in enumerate(batch_iterator):
            if batch is None:
                continue
            pixel_values, batch_labels, kept = batch
            indices.append(kept + batch_index * batch_size)  # batches are consecutive, of batch_size examples
            pixel_values = pixel_values.to(device=device, dtype=dtype)
            if num_layers:
                pooled = torch.cat([h.mean(dim=1) for h in _last_layers(network, pixel_values, num_layers, norm)], -1)
            else:
                # Mean of the final patch tokens (not `pooler_output`: transformers' stock I-JEPA pooler is a
                # tanh layer on the first patch, and ours equals this mean anyway).
                tokens = network(pixel_values=pixel_values).last_hidden_state
                pooled = tokens.mean(dim=1) if pool else tokens
            features.append(pooled.float().cpu())
            labels.append(batch_labels)
    finally:
        network.train(was_training)
    if not features:
        raise ValueError("the dataset yielded no (readable) images.")
    if return_indices:
        return torch.cat(features), torch.cat(labels), torch.cat(indices)
    return torch.cat(features), torch.cat(labels)


# ----------------------------------------------------------------------------------------------------------------
# Probes
# ----------------------------------------------------------------------------------------------------------------


def _check_features(features: torch.Tensor, labels: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    features = torch.as_tensor(features)
    labels = torch.as_tensor(labels)
    if features.dim() != 2:
        raise ValueError(f"{name}_features must be [N, D], got shape {tuple(features.shape)}.")
    if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"{name}_labels must be [N] with N = {features.shape[0]}, got shape {tuple(labels.shape)}."
        )
    if features.shape[0] == 0:
        raise ValueError(f"{name}_features is empty.")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"{name}_labels must be integer class ids, got dtype {labels.dtype}.")
    if (labels < 0).any():
        raise ValueError(f"{name}_labels has negative (missing) labels; probes need labelled data.")
    return features.float(), labels.long()


def _encode_labels(train_labels: torch.Tensor, test_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Maps arbitrary class ids of both splits onto ``0 .. C-1`` (C = number of distinct ids)."""
    classes = torch.unique(torch.cat([train_labels, test_labels]))
    return torch.searchsorted(classes, train_labels), torch.searchsorted(classes, test_labels), len(classes)


def _standardizer(features: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-dimension z-scoring with the statistics of ``features`` (constant dimensions are left centred)."""
    mean = features.mean(dim=0)
    std = features.std(dim=0, unbiased=False).clamp_min(1e-6)
    return lambda x: (x - mean) / std


def _fit_softmax_regression(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    l2: float,
    *,
    optimizer: str,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
) -> nn.Linear:
    """Minimises ``mean CE(x W + b, y) + 0.5 * l2 * ||W||^2`` (bias unpenalised) from a zero start.

    The objective is convex, so zero init plus a deterministic solver gives seed-independent weights with
    L-BFGS; AdamW (mini-batch, cosine-decayed lr, the L2 term inside the loss rather than decoupled, so both
    solvers optimise the same objective) is for sets too large for full-batch steps.
    """
    head = nn.Linear(features.shape[1], num_classes).to(features.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)

    def objective(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(x), y) + 0.5 * l2 * head.weight.pow(2).sum()

    if optimizer == "lbfgs":
        solver = torch.optim.LBFGS(
            head.parameters(), lr=lr, max_iter=epochs, history_size=20, line_search_fn="strong_wolfe",
            tolerance_grad=1e-7, tolerance_change=1e-10,
        )

        def closure() -> torch.Tensor:
            solver.zero_grad()
            loss = objective(features, labels)
            loss.backward()
            return loss

        solver.step(closure)
        return head

    solver = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(features.shape[0] / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(solver, T_max=max(1, epochs * steps_per_epoch))
    for _ in range(epochs):
        order = torch.randperm(features.shape[0], generator=generator).to(features.device)
        for index in order.split(batch_size):
            solver.zero_grad()
            objective(features[index], labels[index]).backward()
            solver.step()
            schedule.step()
    return head


@torch.no_grad()
def _accuracy(head: nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> float:
    return (head(features).argmax(dim=1) == labels).sum().item() / len(labels) if len(labels) else float("nan")


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    epochs: int = 100,
    lr: float | None = None,
    weight_decay: float | Sequence[float] | None = None,
    batch_size: int = 1024,
    standardize: bool = True,
    seed: int = 0,
    optimizer: Literal["lbfgs", "adamw"] = "lbfgs",
    val_fraction: float = 0.2,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Multinomial logistic regression on frozen features.

    Args:
        train_features, test_features: ``[N_train, D]`` and ``[N_test, D]``.
        train_labels, test_labels: LongTensor ``[N_train]``, ``[N_test]`` (any non-negative class ids).
        epochs: L-BFGS iterations (full batch), or AdamW epochs.
        lr: L-BFGS step length (default 1.0, scaled by the line search) or AdamW learning rate (default 1e-3).
        weight_decay: L2 strength ``wd`` of the penalty ``0.5 * wd * ||W||^2``. A float is used as is; a
            sequence (default :data:`DEFAULT_WEIGHT_DECAY_GRID`) is searched: each value is fitted on
            ``1 - val_fraction`` of the training set and scored on the rest; the best (ties: the stronger
            penalty) is then refitted on the whole training set. The test set is never used for the choice.
        batch_size: AdamW mini-batch size (L-BFGS is full batch).
        standardize: z-score every dimension with the statistics of the data the head is fitted on (features of
            different layers and models then share one sensible L2 grid).
        seed: seeds the train/validation split (and AdamW's shuffling); results are deterministic.
        optimizer: ``"lbfgs"`` (default) or ``"adamw"``.
        val_fraction: held-out fraction for the weight-decay search.
        device: where to fit; default: the features' device.

    Returns:
        ``{"accuracy": test accuracy, "train_accuracy", "val_accuracy" (of the chosen wd, or None without a
        search), "weight_decay" (chosen), "weight_decay_search" ({wd: val accuracy}), "num_classes",
        "num_train", "num_test", "feature_dim", "optimizer"}``; accuracies are fractions in [0, 1].
    """
    train_features, train_labels = _check_features(train_features, train_labels, "train")
    test_features, test_labels = _check_features(test_features, test_labels, "test")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"feature widths differ: train {train_features.shape[1]}, test {test_features.shape[1]}.")
    if optimizer not in ("lbfgs", "adamw"):
        raise ValueError(f"optimizer must be 'lbfgs' or 'adamw', got {optimizer!r}.")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    device = torch.device(device) if device is not None else train_features.device
    train_features, test_features = train_features.to(device), test_features.to(device)
    train_labels, test_labels, num_classes = _encode_labels(train_labels.to(device), test_labels.to(device))
    generator = torch.Generator().manual_seed(seed)
    fit_kwargs = dict(
        optimizer=optimizer,
        epochs=epochs,
        lr=lr if lr is not None else (1.0 if optimizer == "lbfgs" else 1e-3),
        batch_size=batch_size,
        generator=generator,
    )

    def fit(x: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[nn.Linear, Callable[[torch.Tensor], torch.Tensor]]:
        scale = _standardizer(x) if standardize else (lambda t: t)
        return _fit_softmax_regression(scale(x), y, num_classes, l2, **fit_kwargs), scale

    grid = [float(weight_decay)] if isinstance(weight_decay, (int, float)) else list(
        weight_decay if weight_decay is not None else DEFAULT_WEIGHT_DECAY_GRID
    )
    if not grid or any(w < 0 for w in grid):
        raise ValueError(f"weight_decay must be >= 0 (or a non-empty sequence of such), got {weight_decay!r}.")
    search: dict[float, float] = {}
    num_val = int(round(val_fraction * len(train_labels)))
    if len(grid) > 1 and num_val >= 2 and len(train_labels) - num_val >= 2:
        order = torch.randperm(len(train_labels), generator=generator).to(device)
        val_index, fit_index = order[:num_val], order[num_val:]
        for l2 in grid:
            head, scale = fit(train_features[fit_index], train_labels[fit_index], l2)
            search[l2] = _accuracy(head, scale(train_features[val_index]), train_labels[val_index])
        # Highest validation accuracy; among ties the strongest penalty (the simplest model).
        chosen = max(grid, key=lambda l2: (search[l2], l2))
    else:
        if len(grid) > 1:
            logger.warning("Too few training examples for a weight-decay search; using the median of the grid.")
        chosen = sorted(grid)[len(grid) // 2]

    head, scale = fit(train_features, train_labels, chosen)
    return {
        "accuracy": _accuracy(head, scale(test_features), test_labels),
        "train_accuracy": _accuracy(head, scale(train_features), train_labels),
        "val_accuracy": search.get(chosen),
        "weight_decay": chosen,
        "weight_decay_search": search,
        "num_classes": num_classes,
        "num_train": len(train_labels),
        "num_test": len(test_labels),
        "feature_dim": train_features.shape[1],
        "optimizer": optimizer,
    }


@torch.no_grad()
def knn_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    weighted: bool = True,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Cosine-similarity k-nearest-neighbour classification (the DINO protocol).

    Features are L2-normalised; each test point takes its ``k`` most similar training points, which vote for
    their class with weight ``exp(similarity / temperature)`` (``weighted=True``) or 1. Ties go to the
    smallest class id.

    Args:
        train_features, test_features: ``[N_train, D]`` and ``[N_test, D]``.
        train_labels, test_labels: LongTensor ``[N_train]``, ``[N_test]``.
        k: neighbours (clamped to ``N_train``).
        temperature: vote temperature (DINO: 0.07).
        weighted: temperature-weighted (True) or majority (False) vote.
        chunk_size: test points per similarity block ``[chunk, N_train]``; default keeps a block near 16M
            elements (64 MB in float32) so large training sets fit in memory.
        device: where to compute; default: the features' device.

    Returns:
        ``{"accuracy", "k" (effective), "temperature", "weighted", "num_train", "num_test"}``.
    """
    train_features, train_labels = _check_features(train_features, train_labels, "train")
    test_features, test_labels = _check_features(test_features, test_labels, "test")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"feature widths differ: train {train_features.shape[1]}, test {test_features.shape[1]}.")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    device = torch.device(device) if device is not None else train_features.device
    train_labels, test_labels, num_classes = _encode_labels(train_labels.to(device), test_labels.to(device))
    train = F.normalize(train_features.to(device), dim=1)
    test = F.normalize(test_features.to(device), dim=1)
    k = min(k, train.shape[0])
    chunk_size = chunk_size or max(1, (1 << 24) // train.shape[0])

    correct = 0
    for start in range(0, test.shape[0], chunk_size):
        similarity = test[start : start + chunk_size] @ train.T  # [chunk, N_train]
        top_similarity, top_index = similarity.topk(k, dim=1)
        weights = (top_similarity / temperature).exp() if weighted else torch.ones_like(top_similarity)
        votes = torch.zeros(similarity.shape[0], num_classes, device=device)
        votes.scatter_add_(1, train_labels[top_index], weights)
        correct += (votes.argmax(dim=1) == test_labels[start : start + chunk_size]).sum().item()
    return {
        "accuracy": correct / test.shape[0],
        "k": k,
        "temperature": temperature,
        "weighted": weighted,
        "num_train": train.shape[0],
        "num_test": test.shape[0],
    }


def low_shot_indices(labels: torch.Tensor, num_labels: int, seed: int = 0) -> torch.LongTensor:
    """A class-balanced random subset of ``num_labels`` training examples (the low-shot protocols' labelled split,
    e.g. the paper's 1% of ImageNet; 600 of Fashion-MNIST's 60,000).

    Every class gets ``num_labels // num_classes`` examples, and the remainder goes one each to the classes first
    in a seeded random order, so the split is balanced and deterministic given ``seed``.

    Args:
        labels: LongTensor ``[N]`` of class ids.
        num_labels: size of the subset (at least one per class, at most what every class can give).
        seed: seeds the draw; different seeds give the different splits that a mean over draws averages.

    Returns:
        LongTensor ``[num_labels]`` of positions in ``labels``, sorted.
    """
    labels = torch.as_tensor(labels)
    if labels.dim() != 1:
        raise ValueError(f"labels must be [N], got shape {tuple(labels.shape)}.")
    classes, counts = labels.unique(return_counts=True)
    if num_labels < len(classes):
        raise ValueError(f"num_labels={num_labels} is fewer than the {len(classes)} classes: give at least one "
                         "label per class.")
    generator = torch.Generator().manual_seed(seed)
    per_class = torch.full((len(classes),), num_labels // len(classes), dtype=torch.long)
    per_class[torch.randperm(len(classes), generator=generator)[: num_labels % len(classes)]] += 1
    short = per_class > counts
    if short.any():
        name = classes[short][0].item()
        raise ValueError(f"class {name} has {counts[short][0].item()} examples, fewer than the "
                         f"{per_class[short][0].item()} a balanced subset of {num_labels} needs: lower num_labels.")
    chosen = []
    for value, take in zip(classes.tolist(), per_class.tolist()):
        members = (labels == value).nonzero().squeeze(1)
        chosen.append(members[torch.randperm(len(members), generator=generator)[:take]])
    return torch.cat(chosen).sort().values


def low_shot_linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_labels: int,
    seeds: Sequence[int] = (0, 1, 2),
    **linear_kwargs: Any,
) -> dict[str, Any]:
    """:func:`linear_probe` trained on a class-balanced subset of ``num_labels`` training examples
    (:func:`low_shot_indices`), once per seed in ``seeds`` (a different subset each), tested on the full test set.

    Args:
        train_features, test_features: ``[N_train, D]`` and ``[N_test, D]``.
        train_labels, test_labels: LongTensor ``[N_train]``, ``[N_test]``.
        num_labels: labelled training examples per draw.
        seeds: one draw per seed (its subset and its weight-decay split).
        linear_kwargs: passed on to :func:`linear_probe`.

    Returns:
        ``{"accuracy": mean test accuracy over the draws, "accuracy_std" (0 for one draw), "accuracies" (per
        draw), "num_labels", "seeds", "weight_decays" (chosen per draw)}``.
    """
    if not seeds:
        raise ValueError("seeds is empty: give at least one draw.")
    train_labels = torch.as_tensor(train_labels)
    accuracies, decays = [], []
    for seed in seeds:
        index = low_shot_indices(train_labels, num_labels, seed=seed)
        result = linear_probe(train_features[index], train_labels[index], test_features, test_labels, seed=seed,
                              **linear_kwargs)
        accuracies.append(result["accuracy"])
        decays.append(result["weight_decay"])
    values = torch.tensor(accuracies, dtype=torch.float64)
    return {
        "accuracy": values.mean().item(),
        "accuracy_std": values.std().item() if len(values) > 1 else 0.0,
        "accuracies": accuracies,
        "num_labels": num_labels,
        "seeds": list(seeds),
        "weight_decays": decays,
    }


class AttentiveClassifier(nn.Module):
    """An attentive probe (as V-JEPA 2's evaluation): one learned query cross-attends over frozen patch tokens, a
    residual MLP refines it, and a linear head classifies it.

    Shapes: ``tokens [B, T, D]`` -> ``logits [B, num_classes]``.
    """

    def __init__(self, dim: int, num_classes: int, num_heads: int | None = None, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if num_heads is None:
            num_heads = next(h for h in (16, 12, 8, 6, 4, 3, 2, 1) if dim % h == 0 and dim // h >= 8) \
                if dim >= 8 else 1
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the feature width {dim}.")
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.norm_tokens = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.norm_head = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, T, D]`` -> the attended query ``[B, D]``."""
        keys = self.norm_tokens(tokens)
        query = self.query.expand(tokens.shape[0], -1, -1)
        pooled = query + self.attention(query, keys, keys, need_weights=False)[0]
        pooled = pooled + self.mlp(self.norm_mlp(pooled))
        return pooled[:, 0]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm_head(self.pool(tokens)))


def attentive_probe(
    train_tokens: torch.Tensor,
    train_labels: torch.Tensor,
    test_tokens: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    epochs: int = 20,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    batch_size: int = 64,
    num_heads: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Train an :class:`AttentiveClassifier` on frozen patch tokens (``extract_features(..., pool=False)``).

    Args:
        train_tokens, test_tokens: ``[N_train, T, D]`` and ``[N_test, T, D]``.
        train_labels, test_labels: LongTensor ``[N_train]``, ``[N_test]`` (any non-negative class ids).
        epochs, lr, weight_decay, batch_size: AdamW with a cosine learning rate over ``epochs`` passes.
        num_heads: attention heads of the pooling (default: a divisor of ``D`` with heads of at least 8 dims).
        seed: seeds the initialisation and the shuffling; results are deterministic on one device.
        device: where to fit; default: the tokens' device.

    Returns:
        ``{"accuracy": test accuracy, "train_accuracy", "num_classes", "num_train", "num_test", "feature_dim",
        "num_tokens", "epochs"}``; accuracies are fractions in [0, 1].
    """
    for name, tokens, labels in (("train", train_tokens, train_labels), ("test", test_tokens, test_labels)):
        if tokens.ndim != 3:
            raise ValueError(f"{name}_tokens must be [N, T, D] patch tokens (extract_features(..., pool=False)), "
                             f"got shape {tuple(tokens.shape)}.")
        if labels.ndim != 1 or len(labels) != len(tokens):
            raise ValueError(f"{name}_labels must be [N] with N = {len(tokens)}, got shape {tuple(labels.shape)}.")
    if train_tokens.shape[1:] != test_tokens.shape[1:]:
        raise ValueError(f"token shapes differ: train {tuple(train_tokens.shape[1:])}, "
                         f"test {tuple(test_tokens.shape[1:])}.")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}.")
    device = torch.device(device) if device is not None else train_tokens.device
    train_labels, test_labels, num_classes = _encode_labels(train_labels.to(device), test_labels.to(device))
    train_tokens, test_tokens = train_tokens.to(device).float(), test_tokens.to(device).float()
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = AttentiveClassifier(train_tokens.shape[-1], num_classes, num_heads).to(device)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_tokens) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    probe.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_tokens), generator=generator).to(device)
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            loss = F.cross_entropy(probe(train_tokens[index]), train_labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    probe.eval()

    @torch.no_grad()
    def accuracy(tokens: torch.Tensor, labels: torch.Tensor) -> float:
        predictions = torch.cat([probe(tokens[i:i + batch_size]).argmax(-1) for i in range(0, len(tokens), batch_size)])
        return float((predictions == labels).float().mean())

    return {
        "accuracy": accuracy(test_tokens, test_labels),
        "train_accuracy": accuracy(train_tokens, train_labels),
        "num_classes": num_classes,
        "num_train": len(train_tokens),
        "num_test": len(test_tokens),
        "feature_dim": train_tokens.shape[-1],
        "num_tokens": train_tokens.shape[1],
        "epochs": epochs,
    }


# ----------------------------------------------------------------------------------------------------------------
# One-call evaluation and reporting
# ----------------------------------------------------------------------------------------------------------------


def evaluate_encoder(
    model: nn.Module,
    train_dataset: Any,
    test_dataset: Any,
    *,
    layers: LayerSpec = "last",
    name: str | None = None,
    linear_kwargs: Mapping[str, Any] | None = None,
    knn_kwargs: Mapping[str, Any] | None = None,
    low_shot_labels: int | None = None,
    low_shot_seeds: Sequence[int] = (0, 1, 2),
    **extract_kwargs: Any,
) -> dict[str, Any]:
    """Extracts features of both splits and runs :func:`linear_probe` and :func:`knn_probe`, and with
    ``low_shot_labels`` also :func:`low_shot_linear_probe` (that many class-balanced labels, one draw per seed in
    ``low_shot_seeds``) on the same features.

    ``extract_kwargs`` go to :func:`extract_features` (``image_processor``, ``batch_size``, ``encoder``, ...).

    Returns a row for :func:`format_results_table`: ``{"model", "layers", "linear_accuracy", "knn_accuracy",
    "feature_dim", "num_train", "num_test", "linear": <linear_probe dict>, "knn": <knn_probe dict>}``, plus
    ``"low_shot_accuracy"`` and ``"low_shot"`` with ``low_shot_labels``.
    """
    train_x, train_y = extract_features(model, train_dataset, layers=layers, **extract_kwargs)
    test_x, test_y = extract_features(model, test_dataset, layers=layers, **extract_kwargs)
    linear = linear_probe(train_x, train_y, test_x, test_y, **dict(linear_kwargs or {}))
    knn = knn_probe(train_x, train_y, test_x, test_y, **dict(knn_kwargs or {}))
    low_shot = {}
    if low_shot_labels:
        result = low_shot_linear_probe(train_x, train_y, test_x, test_y, num_labels=low_shot_labels,
                                       seeds=low_shot_seeds, **{k: v for k, v in dict(linear_kwargs or {}).items()
                                                               if k != "seed"})
        low_shot = {"low_shot_accuracy": result["accuracy"], "low_shot": result}
    return {
        "model": name if name is not None else _model_name(model),
        "layers": "last" if _parse_layers(layers) == 0 else f"last {_parse_layers(layers)}",
        "linear_accuracy": linear["accuracy"],
        "knn_accuracy": knn["accuracy"],
        "feature_dim": train_x.shape[1],
        "num_train": train_x.shape[0],
        "num_test": test_x.shape[0],
        "linear": linear,
        "knn": knn,
        **low_shot,
    }


def _model_name(model: nn.Module) -> str:
    """The path or Hub id a model was loaded from, else its class name."""
    return getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__


# Known row keys -> column headers, in display order. Keys ending in "accuracy" are shown as percentages.
_COLUMN_HEADERS: dict[str, str] = {
    "model": "model",
    "layers": "layers",
    "linear_accuracy": "linear acc (%)",
    "knn_accuracy": "k-NN acc (%)",
    "low_shot_accuracy": "low-shot linear acc (%)",
    "attentive_accuracy": "attentive acc (%)",
    "feature_dim": "dim",
    "num_train": "train",
    "num_test": "test",
}


def _format_cell(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float) and key.endswith("accuracy"):
        return f"{100.0 * value:.1f}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def format_results_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of evaluation rows (e.g. from :func:`evaluate_encoder`).

    Columns: the known keys (model, layers, linear acc, k-NN acc, dim, train, test) present in any row, then
    any other scalar keys in first-seen order; nested values (dicts, lists) are left out. Accuracies (keys
    ending in ``accuracy``, fractions) are shown as percentages with one decimal; missing cells as ``–``.
    """
    if not rows:
        raise ValueError("no rows to format.")
    present: list[str] = []
    for row in rows:
        for key, value in row.items():
            if key not in present and not isinstance(value, (Mapping, list, tuple, set)):
                present.append(key)
    columns = [key for key in _COLUMN_HEADERS if key in present] + [k for k in present if k not in _COLUMN_HEADERS]
    headers = [_COLUMN_HEADERS.get(key, key.replace("_", " ")) for key in columns]
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" if key in ("model", "layers") else "---:" for key in columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_format_cell(key, row.get(key)) for key in columns) + " |")
    return "\n".join(lines)
