"""Probes on frozen features, in plain torch: :func:`linear_probe` (multinomial logistic regression, L2 chosen on a
held-out part), :func:`knn_probe` (DINO's weighted k-NN) and :func:`low_shot_linear_probe` (the paper's 1% protocol)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# L2 strengths tried by `linear_probe` (penalty 0.5 * wd * ||W||^2 on top of the mean cross-entropy): from almost
# no shrinkage to strong shrinkage of a head on standardised (unit-variance) features.
DEFAULT_WEIGHT_DECAY_GRID: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def check_finite(values: torch.Tensor, name: str) -> None:
    """Refuses features with NaN or infinite values (a diverged run, an fp16 overflow), naming the rows; the
    solvers would fail deep inside, or fit to them."""
    finite = torch.isfinite(values.reshape(values.shape[0], -1)).all(dim=1)
    if not bool(finite.all()):
        rows = (~finite).nonzero().flatten().tolist()
        shown = ", ".join(str(row) for row in rows[:5]) + (", ..." if len(rows) > 5 else "")
        raise ValueError(
            f"{name} has {len(rows)} row{'s' if len(rows) != 1 else ''} with NaN or infinite values (rows {shown}): "
            "the encoder's outputs are not finite there (a diverged run, or an overflow in reduced precision). "
            "Probes need finite features."
        )


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
    check_finite(features, f"{name}_features")
    return features.float(), labels.long()


def encode_labels(train_labels: torch.Tensor, test_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
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
    if epochs < 1:  # an untrained head's accuracy is no probe's
        raise ValueError(f"epochs must be >= 1, got {epochs}.")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    device = torch.device(device) if device is not None else train_features.device
    train_features, test_features = train_features.to(device), test_features.to(device)
    train_labels, test_labels, num_classes = encode_labels(train_labels.to(device), test_labels.to(device))
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
    train_labels, test_labels, num_classes = encode_labels(train_labels.to(device), test_labels.to(device))
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
        raise ValueError(f"{num_labels} labels are fewer than the {len(classes)} classes: give at least one label "
                         "per class.")
    generator = torch.Generator().manual_seed(seed)
    per_class = torch.full((len(classes),), num_labels // len(classes), dtype=torch.long)
    per_class[torch.randperm(len(classes), generator=generator)[: num_labels % len(classes)]] += 1
    short = per_class > counts
    if short.any():
        name = classes[short][0].item()
        raise ValueError(f"class {name} has {counts[short][0].item()} examples, fewer than the "
                         f"{per_class[short][0].item()} a balanced subset of {num_labels} labels needs: ask for fewer "
                         "labels.")
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
    train_features, train_labels = _check_features(train_features, train_labels, "train")  # rows named as given
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
