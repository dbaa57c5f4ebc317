"""One-call evaluation of an encoder (:func:`evaluate_encoder`) and the results table (:func:`format_results_table`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from .features import LayerSpec, extract_features, parse_layers
from .probes import knn_probe, linear_probe, low_shot_linear_probe


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
        "layers": "last" if parse_layers(layers) == 0 else f"last {parse_layers(layers)}",
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
