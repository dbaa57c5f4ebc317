"""Which licence and base model the weights of a model carry.

Meta's official I-JEPA checkpoints are CC BY-NC 4.0, and so is everything derived from them: a conversion, a model
pretrained further from one, a classifier fine-tuned from one. The licence is recorded in the model's config
(``weights_license`` and ``weights_base_model``, on the config and every sub-config, so it survives
``save_pretrained``/``from_pretrained``, `IJepaForPreTraining.export_encoder` and loading an encoder or a
classifier out of a pretraining repo). Every writer of a card asks :func:`weights_license`:

    from ijepa_hf.licensing import weights_license, record_weights_license

    info = weights_license(model, source=args.model_name_or_path)   # WeightsLicense(license=..., base_model=...)
    record_weights_license(model, info.license, info.base_model)    # so the saved config carries it on
    card = make_model_card(..., license=info.license, base_model=info.base_model)

Repos converted before the field existed are recognised by the licence in their model card.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "BASE_MODEL_FIELD",
    "DEFAULT_LICENSE",
    "LICENSE_FIELD",
    "META_WEIGHTS_LICENSE",
    "WeightsLicense",
    "record_weights_license",
    "weights_license",
]

# Licence of the official checkpoints in facebookresearch/ijepa; anything converted, pretrained further or
# fine-tuned from them inherits it.
META_WEIGHTS_LICENSE = "cc-by-nc-4.0"
# Licence of weights trained from scratch with this package (the package's own licence).
DEFAULT_LICENSE = "apache-2.0"
LICENSE_FIELD = "weights_license"
BASE_MODEL_FIELD = "weights_base_model"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class WeightsLicense(NamedTuple):
    """The licence id (Hub metadata spelling) and the Hub repo the weights derive from (``None`` when unknown)."""

    license: str
    base_model: str | None


def _configs(model_or_config: Any) -> list[Any]:
    """The config of a model (or the config itself) and its sub-configs (``encoder_config``, ...)."""
    config = getattr(model_or_config, "config", model_or_config)
    configs = [config]
    for name in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            configs.append(sub)
    return configs


def record_weights_license(model_or_config: Any, license: str, base_model: str | None = None) -> None:
    """Records the licence (and the Hub repo the weights derive from) in the config and its sub-configs; saved
    with ``save_pretrained`` and read back by :func:`weights_license`."""
    if not isinstance(license, str) or not license:
        raise ValueError(f"`license` must be a Hub licence id such as {META_WEIGHTS_LICENSE!r}, got {license!r}.")
    for config in _configs(model_or_config):
        setattr(config, LICENSE_FIELD, license)
        setattr(config, BASE_MODEL_FIELD, base_model)


def _is_hub_id(source: Any) -> bool:
    return isinstance(source, str) and bool(_HUB_ID.match(source)) and not Path(source).exists()


def _card_metadata(source: str | os.PathLike) -> tuple[str | None, str | None]:
    """(licence, base_model) from the model card of a local folder or Hub repo; (None, None) when there is none."""
    try:
        from huggingface_hub import ModelCard

        path = Path(os.fspath(source))
        if path.is_dir():
            readme = path / "README.md"
            if not readme.is_file():
                return None, None
            data = ModelCard.load(readme).data
        elif _is_hub_id(str(source)):
            data = ModelCard.load(str(source)).data
        else:
            return None, None
    except Exception:  # noqa: BLE001 - offline, no card, unreadable card: nothing is known
        return None, None
    base = data.get("base_model")
    if isinstance(base, list):
        base = base[0] if base else None
    return data.get("license"), base


def weights_license(model_or_config: Any, source: str | os.PathLike | None = None) -> WeightsLicense:
    """The licence and base model that a card of ``model_or_config`` (a model or its config) must state.

    Args:
        model_or_config: a loaded (or freshly built) model, or its config.
        source: where it was loaded from (Hub id or folder); default: the config's ``_name_or_path``.

    Returns:
        `WeightsLicense`: the licence recorded in the config (see :func:`record_weights_license`), else the one of
        the source's model card (repos converted before the field existed), else :data:`DEFAULT_LICENSE` (weights
        trained from scratch). ``base_model`` is the source when it is a Hub repo (the model derives from it), else
        the recorded base (e.g. ``facebook/ijepa_vith14_1k`` for a conversion of an official release), else the
        card's.
    """
    config = getattr(model_or_config, "config", model_or_config)
    source = source if source not in (None, "") else (getattr(config, "_name_or_path", None) or None)
    recorded_license = getattr(config, LICENSE_FIELD, None)
    recorded_base = getattr(config, BASE_MODEL_FIELD, None)
    card_license, card_base = (None, None)
    if source is not None and (recorded_license is None or recorded_base is None):
        card_license, card_base = _card_metadata(source)
    license = recorded_license or card_license or DEFAULT_LICENSE
    base = (str(source) if _is_hub_id(str(source)) else None) if source is not None else None
    return WeightsLicense(license=license, base_model=base or recorded_base or card_base)
