"""Frozen features of an encoder for the probes: :func:`extract_features` (average-pooled patches of the last
block, or of the last k blocks concatenated; or the patch tokens themselves for the attentive probe)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from ..loading import resolve_encoder


LayerSpec = str | int


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
    check_layers(num_layers, _num_blocks(encoder))
    if hasattr(encoder, "get_intermediate_layers"):
        return list(encoder.get_intermediate_layers(pixel_values, n=num_layers, norm=True))
    hidden_states = encoder(pixel_values=pixel_values, output_hidden_states=True).hidden_states
    # hidden_states = (embeddings, block 1, ..., block L): only the last L are block outputs.
    check_layers(num_layers, 0 if hidden_states is None else len(hidden_states) - 1)
    return [norm(h) for h in hidden_states[-num_layers:]]


def parse_layers(layers: LayerSpec) -> int:
    """``"last"`` -> 0 (the final output); a positive int k -> k (the last k blocks)."""
    if layers == "last":
        return 0
    if isinstance(layers, str) and layers.isdigit():
        layers = int(layers)
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ValueError(f"`layers` must be 'last' or a positive number of blocks (e.g. 4), got {layers!r}.")
    return layers


def check_layers(layers: LayerSpec, num_blocks: int | None, owner: str = "the encoder") -> int:
    """:func:`parse_layers`, refused where it asks for more blocks than ``owner`` has (``num_blocks``; ``None``: not
    known, not checked)."""
    num_layers = parse_layers(layers)
    if num_blocks is not None and num_layers > num_blocks:
        raise ValueError(f"layers={num_layers} asks for the last {num_layers} blocks, but {owner} has {num_blocks} "
                         f"blocks: ask for 1 to {num_blocks}, or 'last'.")
    return num_layers


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
                    f"(keys: {sorted(example)}); pass image_column= (--image_column_name in the example scripts)."
                )
            return example[self.image_column], label
        if isinstance(example, (tuple, list)) and len(example) == 2:
            return example[0], example[1]
        return example, None

    def __call__(self, examples: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(pixel_values, labels, kept)``, ``kept`` the positions in ``examples`` of the readable ones."""
        from ..data import load_image

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
    num_layers = parse_layers(layers)
    if not pool and num_layers:
        raise ValueError("pool=False returns the final patch tokens: use it with layers='last'.")
    network = resolve_encoder(model, encoder)
    check_layers(layers, _num_blocks(network))  # before any image is read
    norm = _final_norm(network) if num_layers and not hasattr(network, "get_intermediate_layers") else None
    if transform is None and image_processor is None:
        from ..image_processing import make_image_processor

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
