"""Publishing I-JEPA models to the Hugging Face Hub.

:func:`save_model_repo`, :func:`save_with_remote_code`, :func:`push_folder` and :func:`push_model` write and upload
ready-to-use repos: weights and config, the image processor, the card (:mod:`ijepa_hf.cards`) and, optionally, the
modelling code itself (``auto_map`` + the self-contained source files), so that people without ``ijepa_hf``
can load the model with ``trust_remote_code=True``. ``model.push_to_hub`` and ``save_pretrained(push_to_hub=True)``
on ``ijepa_hf`` models upload the same card (:func:`replace_generic_card`) instead of transformers' generic one.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import CommitInfo, HfApi, ModelCard

from .cards import model_card_for

if TYPE_CHECKING:  # only for annotations: importing transformers here would make card writing slow
    from transformers import PreTrainedModel

__all__ = [
    "push_folder",
    "push_model",
    "remote_code_auto_map",
    "replace_generic_card",
    "save_model_repo",
    "save_with_remote_code",
]


# Model auto classes that `ijepa_hf/__init__.py` registers; the auto_map of a saved repo lists those of them that
# the model's config type is registered with, so remote code loads through the same Auto classes as local code.
_REMOTE_CODE_AUTO_CLASSES = ("AutoModel", "AutoModelForPreTraining", "AutoModelForImageClassification", "AutoBackbone")
_UNSET = object()


def remote_code_auto_map(model: "PreTrainedModel") -> dict[str, str]:
    """The ``auto_map`` that lets ``model`` be loaded with ``trust_remote_code=True``.

    ``{"AutoConfig": "configuration_ijepa_hf.<Config>", "AutoModel": "modeling_ijepa_hf.<Model>", ...}``: AutoConfig
    plus every model Auto class its config type is registered with in ``ijepa_hf`` (AutoModelForPreTraining for the
    pretraining model, AutoModelForImageClassification for encoder configs). Raises ``ValueError`` for models whose
    code is not the shippable ``ijepa_hf`` modelling file (stock transformers models need no remote code).
    """
    import transformers

    model_class, config_class = type(model), type(model.config)
    if not str(getattr(model.config, "model_type", "")).startswith("ijepa_hf_"):
        raise ValueError(
            f"{model_class.__name__} (model_type {model.config.model_type!r}) is not an ijepa_hf model: only "
            "ijepa_hf_* models need (and can ship) remote code; stock transformers models load without it."
        )
    module = model_class.__module__
    auto_map = {"AutoConfig": f"{config_class.__module__.rsplit('.', 1)[-1]}.{config_class.__name__}"}
    for auto_name in _REMOTE_CODE_AUTO_CLASSES:
        try:
            registered = getattr(transformers, auto_name)._model_mapping[config_class]
        except KeyError:
            continue
        # Only classes defined in the copied modelling file can be named in auto_map, and only for their own config
        # class (transformers re-registers remote classes and refuses other pairs, e.g. AutoBackbone for an encoder
        # config: backbone repos get that entry).
        if registered.__module__ == module and registered.config_class.__name__ == config_class.__name__:
            auto_map[auto_name] = f"{module.rsplit('.', 1)[-1]}.{registered.__name__}"
    if config_class.__name__ == "IJepaEncoderConfig" and model_class.__module__ == module:
        # AutoBackbone maps encoder configs to IJepaBackbone (whose config class is the backbone's): remote code
        # names its encoder-config twin, which transformers accepts for this config class.
        auto_map["AutoBackbone"] = f"{module.rsplit('.', 1)[-1]}.IJepaEncoderBackbone"
    if model_class.__name__ not in {v.rsplit(".", 1)[-1] for k, v in auto_map.items() if k != "AutoConfig"}:
        raise ValueError(
            f"{model_class.__module__}.{model_class.__name__} is not one of the ijepa_hf model classes registered "
            "with the Auto classes, so its code cannot be shipped as remote code; save an ijepa_hf class instead."
        )
    return auto_map


@contextlib.contextmanager
def _registered_for_auto_classes(model: "PreTrainedModel") -> Iterator[dict[str, str]]:
    """Temporarily register ``model``'s classes for remote code (``register_for_auto_class``) and give its config
    the full ``auto_map``; everything is restored on exit.

    ``register_for_auto_class`` sets a class attribute, which would make every later ``save_pretrained`` of any
    instance copy the source files too; restoring it keeps plain saves plain.
    """
    auto_map = remote_code_auto_map(model)
    model_class, config_class, config = type(model), type(model.config), model.config
    # transformers writes one auto_map entry per registered class (the one of `_auto_class`); we pre-fill the
    # config with the whole map so that every Auto class works, and register the model under its own entry.
    primary = next(k for k, v in auto_map.items() if k != "AutoConfig" and v.endswith(f".{model_class.__name__}"))
    saved_classes = [(cls, cls.__dict__.get("_auto_class", _UNSET)) for cls in (model_class, config_class)]
    saved_map = getattr(config, "auto_map", _UNSET)
    try:
        model_class.register_for_auto_class(primary)
        config_class.register_for_auto_class("AutoConfig")
        config.auto_map = dict(auto_map)
        yield auto_map
    finally:
        for cls, value in saved_classes:
            if value is _UNSET:
                if "_auto_class" in cls.__dict__:
                    delattr(cls, "_auto_class")  # falls back to the base classes' None
            else:
                cls._auto_class = value
        if saved_map is _UNSET:
            with contextlib.suppress(AttributeError):
                delattr(config, "auto_map")
        else:
            config.auto_map = saved_map


def save_model_repo(
    model: "PreTrainedModel",
    save_directory: str | Path,
    *,
    image_processor: Any | None = None,
    card: ModelCard | None = None,
    remote_code: bool = False,
    **save_kwargs: Any,
) -> Path:
    """Write a ready-to-push repo: ``config.json`` and weights, plus ``preprocessor_config.json`` (when
    ``image_processor`` is given, e.g. :func:`ijepa_hf.make_image_processor`), ``README.md`` (``card``) and, with
    ``remote_code``, the modelling code (see :func:`save_with_remote_code`). ``save_kwargs`` go to
    ``save_pretrained``. Returns the directory.
    """
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    with _registered_for_auto_classes(model) if remote_code else contextlib.nullcontext():
        model.save_pretrained(directory, **save_kwargs)
    if image_processor is not None:
        image_processor.save_pretrained(directory)
    if card is not None:
        card.save(directory / "README.md")
    return directory


def save_with_remote_code(
    model: "PreTrainedModel",
    save_directory: str | Path,
    image_processor: Any | None = None,
    **kwargs: Any,
) -> Path:
    """Save ``model`` so that it loads **without** ``ijepa_hf`` installed, with ``trust_remote_code=True``.

    Besides the config and weights, the directory gets ``modeling_ijepa_hf.py`` and the files it imports
    (``configuration_ijepa_hf.py``, ``configuration_ijepa_hf_backbone.py``, ``pretrained_loading.py``; together
    they import only torch and transformers) and ``config.json`` gets an ``auto_map`` (see
    :func:`remote_code_auto_map`), e.g. for a pretraining model::

        AutoModelForPreTraining.from_pretrained(repo, trust_remote_code=True)

    The classes are registered with ``register_for_auto_class`` only for the duration of the save: later plain
    ``save_pretrained`` calls do not ship code. ``kwargs`` are those of :func:`save_model_repo` (``card``, and
    ``save_pretrained`` options). Returns the directory.
    """
    return save_model_repo(model, save_directory, image_processor=image_processor, remote_code=True, **kwargs)


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    commit_message: str = "Upload I-JEPA model",
    token: str | None = None,
) -> CommitInfo:
    """Create ``repo_id`` if needed (``private`` only applies to a new repo) and upload ``folder`` as one commit.

    Uses ``HfApi`` with the process's Hub settings (``HF_ENDPOINT``, ``HF_TOKEN``). Returns the ``CommitInfo``
    (``.oid`` is the commit sha, usable as ``revision=``).
    """
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id  # resolves a missing namespace
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)


def push_model(
    model: "PreTrainedModel",
    repo_id: str,
    image_processor: Any | None = None,
    card: ModelCard | None = None,
    remote_code: bool = False,
    private: bool | None = None,
    commit_message: str = "Upload I-JEPA model",
    token: str | None = None,
) -> CommitInfo:
    """Push ``model`` (plus its image processor, card and, with ``remote_code``, its code) to ``repo_id`` in one
    commit.

    Unlike ``model.push_to_hub`` this uploads everything atomically and can ship the modelling code. Without
    ``card``, :func:`model_card_for` writes one, with the licence and base model of the weights (CC BY-NC 4.0 for
    anything derived from Meta's checkpoints). Returns the ``CommitInfo``.
    """
    card = card if card is not None else model_card_for(model, repo_id)
    with tempfile.TemporaryDirectory(prefix="ijepa_hf_push_") as tmp:
        save_model_repo(model, tmp, image_processor=image_processor, card=card, remote_code=remote_code)
        return push_folder(tmp, repo_id, private=private, commit_message=commit_message, token=token)


# The sentence that marks transformers' generic card (`transformers.utils.hub.create_and_tag_model_card`), written
# when the repo has no card yet.
_GENERIC_CARD_SENTENCE = "This model card has been automatically generated."


def replace_generic_card(model: "PreTrainedModel", folder: str | Path, repo_id: str) -> bool:
    """Replace transformers' generic ``README.md`` in ``folder`` by the card of :func:`ijepa_hf.cards.model_card_for`
    (kind, architecture, the licence and base model of the weights), keeping its tags (``model.model_tags`` and the
    ``tags`` of ``push_to_hub``). Returns whether it did.

    ``IJepaPreTrainedModel`` calls this on the folder that ``model.push_to_hub`` and ``save_pretrained(push_to_hub=
    True)`` are about to upload, so every push path writes our card. A card the repo already has is not generic and
    is kept, as transformers keeps it.
    """
    readme = Path(folder) / "README.md"
    if not readme.is_file() or _GENERIC_CARD_SENTENCE not in readme.read_text(encoding="utf-8"):
        return False
    tags = ModelCard.load(readme).data.tags or None
    model_card_for(model, repo_id, tags=tags).save(readme)
    return True

