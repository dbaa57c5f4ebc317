"""Loading a model or an image processor from a repo (a Hub id or a local folder), in one place.

* :func:`load_encoder`: the encoder to evaluate or extract features with, and its image processor, from any
  encoder, pretraining (its target or context encoder) or classifier repo, ours or transformers' stock ones;
* :func:`load_image_classifier`: an image classifier with a new head on a pretrained backbone, also from an I-JEPA
  pretraining repo;
* :func:`load_image_processor`: the repo's image processor, or ImageNet statistics at the model's resolution;
* :func:`resolve_encoder`: the encoder inside an already loaded model;
* :func:`route_local_backbone_folders`: ``AutoBackbone.from_pretrained(<a local folder of this package>)``.

Every loader refuses a raw official ``.pth.tar`` checkpoint with the command that converts it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["encoder_depth", "load_encoder", "load_image_classifier", "load_image_processor", "resolve_encoder",
           "route_local_backbone_folders"]

# The model types whose local folders AutoBackbone.from_pretrained is routed for (the encoder, classifier and
# pretraining repos' configs, and the backbone's own).
_BACKBONE_SOURCE_TYPES = ("ijepa_hf_encoder", "ijepa_hf_pretraining", "ijepa_hf_backbone")


def _local_model_type(name: Any) -> str | None:
    """The ``model_type`` of a local folder's ``config.json``, or None (not a folder, no readable config)."""
    import json
    import os

    if not isinstance(name, (str, os.PathLike)) or not os.path.isfile(os.path.join(name, "config.json")):
        return None
    try:
        with open(os.path.join(name, "config.json"), encoding="utf-8") as handle:
            model_type = json.load(handle).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return model_type if isinstance(model_type, str) else None


def route_local_backbone_folders() -> None:
    """Let ``AutoBackbone.from_pretrained`` take a local folder of this package's models.

    transformers (5.24 and 5.25 at least) asks the Hub whether a name is a repo before anything else, which fails
    for every local folder: an absolute path is not a valid repo id, a relative one needs the network. A folder
    whose ``config.json`` names one of this package's model types goes to ``IJepaBackbone.from_pretrained``
    instead, which is what ``AutoBackbone`` resolves such a repo to; every other name goes to transformers'
    ``from_pretrained`` unchanged. Called once, when ``ijepa_hf`` is imported."""
    from transformers import AutoBackbone

    original = AutoBackbone.from_pretrained
    if getattr(original, "_ijepa_hf_routes_local_folders", False):
        return

    def from_pretrained(pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any) -> Any:
        if _local_model_type(pretrained_model_name_or_path) in _BACKBONE_SOURCE_TYPES:
            from .modeling_ijepa_hf import IJepaBackbone

            kwargs.pop("use_timm_backbone", None)
            return IJepaBackbone.from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        return original(pretrained_model_name_or_path, *model_args, **kwargs)

    from_pretrained._ijepa_hf_routes_local_folders = True  # type: ignore[attr-defined]
    from_pretrained.__doc__ = original.__doc__
    AutoBackbone.from_pretrained = from_pretrained  # type: ignore[method-assign]


def resolve_encoder(model: nn.Module, encoder: Literal["target", "context"] = "target") -> nn.Module:
    """The encoder to evaluate inside ``model``.

    * an `IJepaForPreTraining` -> its target encoder (``encoder="target"``, the paper's choice) or context
      encoder (``encoder="context"``);
    * an image classifier (ours, transformers' ``IJepaForImageClassification``, ViT, ...) -> its backbone
      (``model.base_model``, e.g. ``.encoder`` / ``.ijepa``);
    * anything else (an `IJepaEncoderModel`, a stock ``IJepaModel``) is returned as is.
    """
    encoder_for = getattr(model, "encoder_for", None)
    if hasattr(model, "target_encoder") and callable(encoder_for):
        return encoder_for(encoder)
    base = getattr(model, "base_model", None)
    if isinstance(base, nn.Module) and base is not model:
        return base
    return model


def load_image_processor(model_name_or_path: str, config: Any | None = None, **kwargs: Any) -> Any:
    """The repo's saved image processor, or `make_image_processor(config)` (ImageNet statistics at the model's
    resolution) when the repo has none (e.g. a bare training output directory)."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(model_name_or_path, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        if config is None:
            raise
        from .image_processing import make_image_processor

        logger.info("No image processor in %s (%s); using ImageNet statistics.", model_name_or_path, error)
        return make_image_processor(config)


def load_encoder(
    model_name_or_path: str, encoder: Literal["target", "context"] = "target", **kwargs: Any
) -> tuple[nn.Module, Any]:
    """Loads the encoder to evaluate from a repo or folder, and its image processor.

    A pretraining repo gives its ``encoder`` (``"target"``, the one the paper evaluates, or ``"context"``) as an
    `IJepaEncoderModel`, the rest of the repo left unread. Our encoder and classifier repos and transformers' stock
    ``ijepa`` (and other vision) models load through the Auto classes: classifiers with
    ``AutoModelForImageClassification`` (their saved keys carry the backbone prefix), reduced to their backbone,
    everything else with ``AutoModel``. ``kwargs`` go to ``from_pretrained`` as they are (``revision``, ``token``,
    ``dtype``, ...).
    """
    # Importing this module imported `ijepa_hf`, which registered its model types with the Auto classes.
    from transformers import AutoModel, AutoModelForImageClassification

    from .configuration_ijepa_hf import IJepaPretrainingConfig
    from .modeling_ijepa_hf import IJepaEncoderModel
    from .pretrained_loading import check_encoder_choice, check_model_path, repo_config

    check_model_path(model_name_or_path, "load_encoder", kwargs.get("subfolder") or "")
    saved = repo_config(model_name_or_path, kwargs)
    if saved.get("model_type") == IJepaPretrainingConfig.model_type:
        network = IJepaEncoderModel.from_pretrained(model_name_or_path, encoder=encoder, **kwargs)
    else:
        check_encoder_choice("load_encoder", model_name_or_path, encoder, saved.get("model_type"))
        is_classifier = any(name.endswith("ForImageClassification") for name in (saved.get("architectures") or []))
        auto_class = AutoModelForImageClassification if is_classifier else AutoModel
        network = resolve_encoder(auto_class.from_pretrained(model_name_or_path, **kwargs), encoder)
    return network, load_image_processor(model_name_or_path, network.config, **kwargs)


def encoder_depth(model_name_or_path: str, **kwargs: Any) -> int | None:
    """The number of blocks of the encoder :func:`load_encoder` gives from the repo or folder, read from its
    ``config.json`` alone (no weights); ``None`` where the config does not say. Checks the path as
    :func:`load_encoder` does; ``kwargs`` are the Hub keywords of ``from_pretrained`` (``revision``, ``token``)."""
    from .configuration_ijepa_hf import IJepaPretrainingConfig
    from .pretrained_loading import check_model_path, repo_config

    check_model_path(model_name_or_path, "encoder_depth", kwargs.get("subfolder") or "")
    saved = repo_config(model_name_or_path, kwargs)
    if saved.get("model_type") == IJepaPretrainingConfig.model_type:  # both encoders have the encoder config's depth
        saved = saved.get("encoder_config") or {}
    depth = saved.get("num_hidden_layers")
    return depth if isinstance(depth, int) and not isinstance(depth, bool) else None


def _check_head_size(path: str, repo: Mapping[str, Any], num_labels: int, id2label: Mapping[int, str] | None,
                     kwargs: Mapping[str, Any]) -> None:
    """Refuses a classifier repo whose head has another number of labels than asked for, unless
    ``ignore_mismatched_sizes`` says to replace it: named in this package's words (labels held, labels asked for,
    the fix) rather than transformers' loading report and traceback."""
    held = repo.get("id2label") or {}
    is_classifier = any(name.endswith("ForImageClassification") for name in repo.get("architectures") or [])
    if not is_classifier or not held or len(held) == num_labels or kwargs.get("ignore_mismatched_sizes"):
        return
    from .pretrained_loading import some_of

    held_names = [str(held[key]) for key in sorted(held, key=int)]
    asked = f" ({some_of([str(id2label[key]) for key in sorted(id2label)])})" if id2label else ""
    raise ValueError(
        f"load_image_classifier({path!r}): that classifier has a head of {len(held)} labels ({some_of(held_names)}); "
        f"{num_labels} were asked for{asked}. Pass ignore_mismatched_sizes=True (--ignore_mismatched_sizes in "
        "examples/finetune.py) to give its encoder a new head, or use data with its labels."
    )


def load_image_classifier(
    model_name_or_path: str,
    *,
    num_labels: int,
    id2label: Mapping[int, str] | None = None,
    label2id: Mapping[str, int] | None = None,
    encoder: str = "target",
    **kwargs: Any,
) -> nn.Module:
    """An image classifier with a new ``num_labels`` head on a pretrained backbone.

    An I-JEPA pretraining repo gives an `IJepaEncoderForImageClassification` on its ``encoder`` (``"target"``,
    the one the paper evaluates, or ``"context"``); anything else (our encoder or classifier repos, stock
    transformers models) goes through ``AutoModelForImageClassification``. Both are `from_pretrained`, with
    ``kwargs`` passed as they are (``revision``, ``token``, ``ignore_mismatched_sizes``, ``dtype``, config fields
    such as ``drop_path_rate``).
    """
    from transformers import AutoModelForImageClassification

    from .configuration_ijepa_hf import IJepaPretrainingConfig
    from .modeling_ijepa_hf import IJepaEncoderForImageClassification
    from .pretrained_loading import check_encoder_choice, check_model_path, repo_config

    check_model_path(model_name_or_path, "load_image_classifier", kwargs.get("subfolder") or "")
    labels = dict(num_labels=num_labels, id2label=dict(id2label or {}), label2id=dict(label2id or {}))
    labels = {key: value for key, value in labels.items() if value or key == "num_labels"}
    repo = repo_config(model_name_or_path, kwargs)
    _check_head_size(model_name_or_path, repo, num_labels, labels.get("id2label"), kwargs)
    model_type = repo.get("model_type")
    if model_type == IJepaPretrainingConfig.model_type:
        return IJepaEncoderForImageClassification.from_pretrained(model_name_or_path, encoder=encoder, **labels,
                                                                  **kwargs)
    check_encoder_choice("load_image_classifier", model_name_or_path, encoder, model_type)
    return AutoModelForImageClassification.from_pretrained(model_name_or_path, **labels, **kwargs)
