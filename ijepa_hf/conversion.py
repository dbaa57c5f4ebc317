"""Conversion between official I-JEPA checkpoints, ``ijepa_hf`` models and transformers' stock ``ijepa`` encoder.

Every conversion is strict: a missing, unexpected or mis-shaped key is an error that lists them, never a silent
partial load (the official ``load_checkpoint`` swallows errors and restarts from scratch; a ``strict=False`` load
left V-JEPA predictor blocks random).
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .configuration_ijepa_hf import ENCODER_CHOICES, IJepaEncoderConfig, IJepaPretrainingConfig
from .modeling_ijepa_hf import IJepaEncoderModel, IJepaForPreTraining

__all__ = [
    "CheckpointMismatchError",
    "load_official_checkpoint",
    "infer_official_config",
    "official_architecture",
    "OFFICIAL_NUM_HEADS",
    "official_num_heads",
    "official_encoder_to_ours",
    "official_predictor_to_ours",
    "convert_official_checkpoint",
    "encoder_to_transformers",
    "encoder_from_transformers",
    "transformers_config_from_ours",
]


class CheckpointMismatchError(ValueError):
    """A state dict does not fit the model it is loaded into; the message lists every offending key."""


def load_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """`load_state_dict` that raises `CheckpointMismatchError` listing missing, unexpected and mis-shaped keys.

    Persistent position tables are required too: they hold the exact values the weights were trained with.
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = sorted(
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in set(expected) & set(state_dict)
        if tuple(state_dict[key].shape) != tuple(expected[key].shape)
    )
    if missing or unexpected or misshaped:
        lines = [f"Cannot load {what}: the checkpoint does not match the architecture."]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {missing}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {unexpected}")
        if misshaped:
            lines.append(f"  mis-shaped keys ({len(misshaped)}): {misshaped}")
        lines.append("Check the architecture (size, patch, image size, predictor depth/width) given to the converter.")
        raise CheckpointMismatchError("\n".join(lines))
    module.load_state_dict(dict(state_dict), strict=True)


# ------------------------------------------------------------------------------------------------------------------
# Official checkpoints
# ------------------------------------------------------------------------------------------------------------------

_OFFICIAL_SECTIONS = ("encoder", "predictor", "target_encoder")


def _strip_ddp_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key[len("module."):] if key.startswith("module.") else key: value for key, value in state_dict.items()}


def _unreadable_because(path: Path, error: Exception) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in one line: torch's own message runs to a dozen lines,
    asks for an issue to be filed and suggests ``weights_only=False``, which would run any code the file holds."""
    with open(path, "rb") as handle:
        starts_as_zip = handle.read(4) == b"PK\x03\x04"  # torch.save writes a zip archive
    if starts_as_zip and not zipfile.is_zipfile(path):
        return ("it was cut off (it starts as a torch checkpoint, but its end is missing: a download or copy that did "
                "not finish?); fetch it again")
    if not starts_as_zip:
        return ("it is not a checkpoint torch wrote (the official files are .pth.tar archives saved by torch.save); "
                "check that the path names the checkpoint itself")
    found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(error))
    return ("it holds objects other than tensors and plain containers, which are not unpickled (an untrusted file "
            f"could run code that way){': ' + found.group(1).strip() if found else ''}")


def load_official_checkpoint(path: str | Path) -> dict[str, Any]:
    """Reads an official ``.pth.tar`` safely (``weights_only=True``) and strips the DDP ``module.`` prefixes.

    Returns the checkpoint dict with ``encoder``, ``predictor`` and ``target_encoder`` state dicts (those present)
    plus the metadata (``epoch``, ``batch_size``, ...).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means the same to the user
        raise ValueError(f"Could not read {path} ({path.stat().st_size:,} bytes) as an official I-JEPA checkpoint: "
                         f"{_unreadable_because(path, error)}") from None
    if not isinstance(checkpoint, Mapping) or not any(key in checkpoint for key in _OFFICIAL_SECTIONS):
        found = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise ValueError(
            f"{path} is not an official I-JEPA checkpoint: expected top-level keys {_OFFICIAL_SECTIONS}, found {found}."
        )
    result = dict(checkpoint)
    for section in _OFFICIAL_SECTIONS:
        if result.get(section) is not None:
            result[section] = _strip_ddp_prefix(result[section])
    return result


def official_encoder_to_ours(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames an official encoder state dict (prefix already stripped) to `IJepaEncoderModel` keys."""
    renamed = {}
    for key, value in state_dict.items():
        key = re.sub(r"^patch_embed\.proj\.", "patch_embed.", key)
        renamed[key] = value
    return renamed


_PREDICTOR_RENAMES = (
    (r"^predictor_embed\.", "embed."),
    (r"^predictor_pos_embed$", "pos_embed"),
    (r"^predictor_blocks\.", "blocks."),
    (r"^predictor_norm\.", "norm."),
    (r"^predictor_proj\.", "proj."),
)


def official_predictor_to_ours(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames an official predictor state dict (prefix already stripped) to `IJepaPredictorModel` keys."""
    renamed = {}
    for key, value in state_dict.items():
        for pattern, replacement in _PREDICTOR_RENAMES:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


# Heads per block of the official model sizes (facebookresearch/ijepa `vit_tiny` ... `vit_giant`), keyed by width.
# The head count is not stored in the weights; for any other width it cannot be known.
OFFICIAL_NUM_HEADS: dict[int, int] = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16}


def official_num_heads(hidden_size: int, num_heads: int | None = None) -> int:
    """The attention head count of an official-format encoder of width ``hidden_size``.

    ``num_heads`` when given (it must divide the width); else the official model table's count for the official
    widths (192/384/768/1024/1280/1408). Any other width without ``num_heads`` is a `ValueError`: the count is not in
    the weights, and a guess silently computes another function.
    """
    if num_heads is not None:
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
            raise ValueError(f"`num_heads` must be a positive integer, got {num_heads!r}.")
        if hidden_size % num_heads:
            raise ValueError(
                f"--num-heads {num_heads} does not divide the checkpoint's width {hidden_size}: give the head count "
                "the checkpoint was trained with."
            )
        return num_heads
    if hidden_size in OFFICIAL_NUM_HEADS:
        return OFFICIAL_NUM_HEADS[hidden_size]
    raise ValueError(
        f"The checkpoint's width {hidden_size} is not an official I-JEPA size "
        f"({', '.join(f'{w}: {h} heads' for w, h in OFFICIAL_NUM_HEADS.items())}), and the number of attention heads "
        "is not stored in the weights. Give the count it was trained with: `ijepa-hf convert ... --num-heads N` "
        "(Python: `num_heads=N`)."
    )


def official_architecture(checkpoint: Mapping[str, Any]) -> dict[str, dict[str, Any] | None]:
    """What the tensor shapes of an official checkpoint tell: ``{"encoder": {...}, "predictor": {...} or None}``
    with image/patch size, channels, widths, depths, MLP widths and qkv bias; not the head counts (not stored)."""
    encoder = checkpoint.get("target_encoder") or checkpoint.get("encoder")
    if encoder is None:
        raise ValueError("The checkpoint has neither `encoder` nor `target_encoder` weights.")
    patch = encoder["patch_embed.proj.weight"].shape[-1]
    num_positions = encoder["pos_embed"].shape[1]
    grid = int(round(num_positions**0.5))
    if grid * grid != num_positions:
        raise ValueError(f"Cannot infer a square grid from {num_positions} positions.")
    architecture: dict[str, dict[str, Any] | None] = {
        "encoder": dict(
            image_size=grid * patch,
            patch_size=patch,
            num_channels=encoder["patch_embed.proj.weight"].shape[1],
            hidden_size=encoder["patch_embed.proj.weight"].shape[0],
            num_hidden_layers=1 + max(int(k.split(".")[1]) for k in encoder if k.startswith("blocks.")),
            intermediate_size=encoder["blocks.0.mlp.fc1.weight"].shape[0],
            qkv_bias="blocks.0.attn.qkv.bias" in encoder,
        ),
        "predictor": None,
    }
    predictor = checkpoint.get("predictor")
    if predictor is not None:
        architecture["predictor"] = dict(
            hidden_size=predictor["predictor_embed.weight"].shape[0],
            num_hidden_layers=1 + max(int(k.split(".")[1]) for k in predictor if k.startswith("predictor_blocks.")),
            intermediate_size=predictor["predictor_blocks.0.mlp.fc1.weight"].shape[0],
            qkv_bias="predictor_blocks.0.attn.qkv.bias" in predictor,
        )
    return architecture


def infer_official_config(
    checkpoint: Mapping[str, Any], num_heads: int | None = None, layer_norm_eps: float = 1e-6
) -> IJepaPretrainingConfig:
    """Reads the architecture off the tensor shapes of an official checkpoint (`official_architecture`).

    Widths, depths, patch size, grid and MLP widths are exact. Head counts are not stored in the weights: they are
    ``num_heads`` when given, else the official table's (see `official_num_heads`); any other width without
    ``num_heads`` is a `ValueError` naming ``--num-heads``. The predictor gets the encoder's head count, as in the
    official code.
    """
    architecture = official_architecture(checkpoint)
    encoder = architecture["encoder"]
    heads = official_num_heads(encoder["hidden_size"], num_heads)
    encoder_config = dict(encoder, num_attention_heads=heads, layer_norm_eps=layer_norm_eps)
    predictor = architecture["predictor"]
    predictor_config = {} if predictor is None else dict(
        predictor, num_attention_heads=heads, layer_norm_eps=layer_norm_eps
    )
    return IJepaPretrainingConfig(encoder_config=encoder_config, predictor_config=predictor_config)


def convert_official_checkpoint(
    checkpoint: str | Path | Mapping[str, Any],
    config: IJepaPretrainingConfig | None = None,
    num_heads: int | None = None,
) -> IJepaForPreTraining:
    """Builds an `IJepaForPreTraining` holding the official context encoder, target encoder and predictor.

    Args:
        checkpoint: path to an official ``.pth.tar`` or the dict returned by `load_official_checkpoint`.
        config: the architecture; inferred from the tensor shapes when omitted (see `infer_official_config`).
        num_heads: attention heads of the encoder and the predictor when ``config`` is omitted; required unless
            the width is an official one (``--num-heads`` in the CLI).
    """
    if not isinstance(checkpoint, Mapping):
        checkpoint = load_official_checkpoint(checkpoint)
    missing_sections = [s for s in _OFFICIAL_SECTIONS if checkpoint.get(s) is None]
    if missing_sections:
        raise ValueError(
            f"The checkpoint lacks {missing_sections}: a pretraining model needs all of {_OFFICIAL_SECTIONS}. "
            "Use --encoder-only to convert just an encoder."
        )
    config = config or infer_official_config(checkpoint, num_heads=num_heads)
    model = IJepaForPreTraining(config)
    load_strict(model.context_encoder, official_encoder_to_ours(checkpoint["encoder"]), "the context encoder (`encoder`)")
    load_strict(model.target_encoder, official_encoder_to_ours(checkpoint["target_encoder"]), "the target encoder")
    load_strict(model.predictor, official_predictor_to_ours(checkpoint["predictor"]), "the predictor")
    return model


def convert_official_encoder(
    checkpoint: str | Path | Mapping[str, Any],
    encoder: str = "target",
    config: IJepaEncoderConfig | None = None,
    num_heads: int | None = None,
) -> IJepaEncoderModel:
    """An `IJepaEncoderModel` from one encoder of an official checkpoint: ``encoder="target"`` (default, the
    checkpoint's ``target_encoder``: the paper evaluates the target encoder) or ``"context"`` (its ``encoder``,
    which transformers' and timm's converters use).

    ``config`` is inferred from the shapes when omitted; ``num_heads`` is then required unless the width is an
    official one (see `official_num_heads`).
    """
    if encoder not in ENCODER_CHOICES:
        raise ValueError(f"`encoder` must be 'target' or 'context', got {encoder!r}.")
    which = "target_encoder" if encoder == "target" else "encoder"  # the official checkpoint's section
    if not isinstance(checkpoint, Mapping):
        checkpoint = load_official_checkpoint(checkpoint)
    if checkpoint.get(which) is None:
        raise ValueError(f"The checkpoint has no `{which}` weights; available: {[s for s in _OFFICIAL_SECTIONS if checkpoint.get(s) is not None]}.")
    config = config or infer_official_config({which: checkpoint[which]}, num_heads=num_heads).encoder_config
    model = IJepaEncoderModel(config)
    load_strict(model, official_encoder_to_ours(checkpoint[which]), f"the `{which}` weights")
    return model


# ------------------------------------------------------------------------------------------------------------------
# transformers' stock `ijepa` (IJepaModel)
# ------------------------------------------------------------------------------------------------------------------

# (ours, stock in-memory name in transformers 5.x) prefixes; "{n}" is a block index. qkv is split/fused apart.
_STOCK_NAME_PAIRS = (
    ("pos_embed", "embeddings.position_embeddings"),
    ("patch_embed.", "embeddings.patch_embeddings.projection."),
    ("blocks.{n}.norm1.", "layers.{n}.layernorm_before."),
    ("blocks.{n}.norm2.", "layers.{n}.layernorm_after."),
    ("blocks.{n}.attn.proj.", "layers.{n}.attention.o_proj."),
    ("blocks.{n}.mlp.fc1.", "layers.{n}.mlp.fc1."),
    ("blocks.{n}.mlp.fc2.", "layers.{n}.mlp.fc2."),
    ("norm.", "layernorm."),
)


def _rename_table(pairs: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """Anchored regexes for prefix renames ``source -> target``, "{n}" becoming a captured block index."""
    table = []
    for source, target in pairs:
        pattern = "^" + re.escape(source).replace(r"\{n\}", r"(\d+)") + ("$" if not source.endswith(".") else "")
        table.append((pattern, target.replace("{n}", r"\1")))
    return tuple(table)


_TO_STOCK = _rename_table(_STOCK_NAME_PAIRS)
_FROM_STOCK = _rename_table(tuple((stock, ours) for ours, stock in _STOCK_NAME_PAIRS))


def _rename(key: str, table: tuple[tuple[str, str], ...]) -> str:
    for pattern, replacement in table:
        new_key, count = re.subn(pattern, replacement, key)
        if count:
            return new_key
    return key


def transformers_config_from_ours(config: IJepaEncoderConfig):
    """The stock `transformers.IJepaConfig` describing the same encoder."""
    from transformers import IJepaConfig

    image_size = config.image_size
    if isinstance(image_size, (list, tuple)):
        if image_size[0] != image_size[1]:
            raise ValueError(f"transformers' IJepaModel supports square images only, got image_size {image_size}.")
        image_size = image_size[0]
    return IJepaConfig(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        hidden_act=config.hidden_act,
        layer_norm_eps=config.layer_norm_eps,
        image_size=image_size,
        patch_size=config.patch_size,
        num_channels=config.num_channels,
        qkv_bias=config.qkv_bias,
        initializer_range=config.initializer_range,
        hidden_dropout_prob=config.hidden_dropout,
        attention_probs_dropout_prob=config.attention_dropout,
    )


def encoder_to_transformers(encoder: IJepaEncoderModel):
    """A stock `transformers.IJepaModel` with the same weights (its ``save_pretrained`` repo loads with plain
    ``transformers.AutoModel``, without ``ijepa_hf``). Note that the stock model's pooler is the first token, so
    average-pool its ``last_hidden_state`` yourself."""
    from transformers import IJepaModel

    stock = IJepaModel(transformers_config_from_ours(encoder.config))
    state = {}
    for key, value in encoder.state_dict().items():
        match = re.match(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", key)
        if match:
            layer, kind = match.groups()
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                state[f"layers.{layer}.attention.{name}.{kind}"] = part.clone()
        else:
            state[_rename(key, _TO_STOCK)] = value.clone()
    load_strict(stock, state, "the stock transformers IJepaModel")
    return stock.to(device=encoder.pos_embed.device)


def encoder_from_transformers(stock: Any) -> IJepaEncoderModel:
    """An `IJepaEncoderModel` from a stock `transformers.IJepaModel` (or a path/repo id loadable by it)."""
    from transformers import IJepaModel

    if not isinstance(stock, IJepaModel):
        stock = IJepaModel.from_pretrained(stock)
    stock_config = stock.config
    config = IJepaEncoderConfig(
        image_size=stock_config.image_size,
        patch_size=stock_config.patch_size,
        num_channels=stock_config.num_channels,
        hidden_size=stock_config.hidden_size,
        num_hidden_layers=stock_config.num_hidden_layers,
        num_attention_heads=stock_config.num_attention_heads,
        intermediate_size=stock_config.intermediate_size,
        hidden_act=stock_config.hidden_act,
        layer_norm_eps=stock_config.layer_norm_eps,
        qkv_bias=stock_config.qkv_bias,
        initializer_range=stock_config.initializer_range,
    )
    source = {k: v for k, v in stock.state_dict().items() if not k.startswith(("pooler.", "embeddings.mask_token"))}
    state: dict[str, torch.Tensor] = {}
    for layer in range(stock_config.num_hidden_layers):
        for kind in ("weight", "bias"):
            parts = [source.pop(f"layers.{layer}.attention.{name}.{kind}", None) for name in ("q_proj", "k_proj", "v_proj")]
            if all(part is not None for part in parts):
                state[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat(parts, dim=0).clone()
    for key, value in source.items():
        state[_rename(key, _FROM_STOCK)] = value.detach().clone()
    encoder = IJepaEncoderModel(config)
    load_strict(encoder, state, "a stock transformers `ijepa` encoder")
    return encoder
