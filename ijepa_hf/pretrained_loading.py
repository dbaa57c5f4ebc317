# Copyright 2026 The ijepa-hf Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""What every I-JEPA class's ``from_pretrained`` does with the repo it is given: one policy for all of them.

Every class loads through transformers' own `PreTrainedModel.from_pretrained`, its keyword arguments passed on
untouched (Hub location, ``dtype``, ``device_map``, config fields such as ``num_labels``: transformers sorts them).
This module adds only what transformers cannot know:

- **The kind of repo** (its config's ``model_type``) is checked first. A class given the wrong kind gets a
  `ValueError` naming what the repo holds, what the class needs and the call that loads it; a raw official
  ``.pth.tar`` file gets the command that converts it, and a local folder that does not exist is named as such.
- **One encoder of a pretraining repo.** The encoder classes (encoder, classifier, backbone) given a pretraining
  repo load its target encoder (``encoder="target"``, the one the paper evaluates) or its context encoder
  (``encoder="context"``) through transformers' ``key_mapping`` (``target_encoder.`` -> the class's own names).
  The config is the repo's ``encoder_config`` (`IJepaEncoderConfig.base_config_key`), so config fields given as
  keyword arguments apply as for any repo.
  Saved afterwards, such a model is a repo of its own class: transformers reverses a load's ``key_mapping`` on save,
  so this renaming is taken back off the model (a caller's own ``key_mapping`` is still reversed).
- **A fresh head starts as every fresh head does**: a class that declares ``_fresh_head_config`` gets those config
  values when the repo was not saved by that class and the caller gave none; a head that class trained keeps its
  own (another value is refused: the trained head would see other inputs).
- **Strict keys**: missing or unexpected keys are an error listing them (transformers only warns, which silently
  leaves random weights); ``strict=False`` gives transformers' lenient behaviour. So are weights whose shape the
  config changes (a width or depth override of a saved model), named with both shapes; ``ignore_mismatched_sizes``
  is transformers' (those weights start afresh).
- **Another resolution.** A pretraining repo loaded with a config of another ``image_size`` (continued pretraining
  at another resolution) is loaded at its own and moved to the new one (`IJepaForPreTraining.set_input_size`): the
  only weights that follow the patch grid are the fixed sin-cos tables, recomputed for it.

Like the modelling file that calls it, this module imports only transformers (and safetensors, which transformers
requires) and the configuration module, so it ships beside them with ``trust_remote_code`` repos.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from transformers import PretrainedConfig

from .configuration_ijepa_hf import ENCODER_CHOICES, IJepaEncoderConfig, IJepaPretrainingConfig, _as_pair

__all__ = ["MismatchedWeightsError", "check_encoder_choice", "from_pretrained_policy", "check_model_path", "repo_config",
           "some_of"]

_PRETRAINING = IJepaPretrainingConfig.model_type

# model_type -> (what such a repo holds, the class that loads it).
_REPO_KINDS: dict[str, tuple[str, str]] = {
    "ijepa_hf_encoder": ("an I-JEPA encoder", "`IJepaEncoderModel` / `AutoModel`"),
    "ijepa_hf_predictor": ("an I-JEPA predictor", "`IJepaPredictorModel`"),
    _PRETRAINING: (
        "an I-JEPA pretraining model (context encoder, predictor, target encoder)",
        "`IJepaForPreTraining` / `AutoModelForPreTraining`",
    ),
    "ijepa_hf_backbone": ("an I-JEPA encoder as a backbone", "`IJepaBackbone` / `AutoBackbone`"),
    "ijepa": ("transformers' own I-JEPA encoder (`IJepaModel`)", "`transformers.AutoModel`"),
}


class MismatchedWeightsError(ValueError, RuntimeError):
    """Saved weights whose shape the config changes. A ``RuntimeError`` as transformers' own refusal of them (code
    that catches that still does), and a ``ValueError`` as every other mismatch of config and repo here."""


def _is_local_path(path: str) -> bool:
    """Whether ``path`` can only be a folder on this machine: absolute, relative from ``.`` / ``~``, or with more than
    one ``/`` (a Hub repo id is ``name`` or ``namespace/name``)."""
    return os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1 or os.sep != "/" and os.sep in path


def check_model_path(path: Any, caller: str, subfolder: str = "") -> None:
    """Raises a `ValueError` naming the problem and the fix where ``path`` cannot be a model: a file (an official
    ``.pth.tar``: the ``ijepa-hf convert`` command), a local folder that does not exist (which transformers would
    report as a malformed Hub repo id), or one without ``config.json`` (in its ``subfolder``, the keyword of
    ``from_pretrained``). ``caller`` names the function in the message."""
    if path is None or not isinstance(path, (str, os.PathLike)):
        return
    text = os.fspath(path)
    if Path(text).is_file():
        raise ValueError(
            f"{caller}({text!r}): that is a file, not a Hugging Face model folder or Hub repo (those hold "
            "config.json and the weights). An official I-JEPA checkpoint (.pth.tar) is converted with "
            f"`ijepa-hf convert {text} OUTPUT_DIR` (add --encoder-only for an encoder); then load OUTPUT_DIR."
        )
    expanded = os.path.expanduser(text)
    if not os.path.exists(expanded) and (isinstance(path, os.PathLike) or _is_local_path(text)):
        raise ValueError(
            f"{caller}({text!r}): there is no folder {os.path.abspath(expanded)!r}. A model folder "
            "holds config.json and the weights (what save_pretrained or a pretraining run writes); a Hub repo is "
            "named 'namespace/name'. Check the path."
        )
    reason = missing_config(text, subfolder)
    if reason is not None:  # transformers would say the config lacks a `model_type`, as if it were there
        raise ValueError(f"{caller}({text!r}): {os.path.join(os.path.abspath(expanded), subfolder or '')} {reason}")


# The file that makes a folder a training checkpoint of pretrain.py (ijepa_hf.training.checkpointing writes it). Kept
# here, not imported: this module ships as a model repo's remote code, which holds the model modules alone.
CHECKPOINT_MANIFEST_NAME = "checkpoint.json"


def missing_config(path: str | os.PathLike, subfolder: str = "") -> str | None:
    """``None``, or where ``path`` (with ``subfolder``) is a local folder without ``config.json``, what that means and
    what the folder may be instead (the rest of a sentence whose subject is the folder): a checkpoint of
    ``pretrain.py`` (its manifest) is continued with ``--resume_from_checkpoint``. Every loader and option that
    takes a saved model checks with it."""
    folder = os.path.join(os.path.expanduser(os.fspath(path)), subfolder or "")
    if not os.path.isdir(folder) or os.path.isfile(os.path.join(folder, "config.json")):
        return None
    if os.path.isfile(os.path.join(folder, CHECKPOINT_MANIFEST_NAME)):
        return (f"has no config.json: it is a training checkpoint of pretrain.py, not a saved model. Continue that "
                f"run with --resume_from_checkpoint {os.fspath(path)} (into its own folder), or start a new run from "
                "the run's final model (its output folder, once it has finished).")
    return ("has no config.json: not a saved model. A checkpoint of pretrain.py (step_N/: weights and optimizer "
            "state) is continued with --resume_from_checkpoint; the model a run saves is its output folder (the "
            "target encoder in its encoder/), and a Trainer's checkpoint-N/ loads as a model.")


def repo_config(path: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` of a folder or repo, ``{}`` when it cannot be read: transformers' own loading, which runs
    next, reports a missing repo, no network or a broken file in its own words. transformers' config reader takes
    the Hub keywords it knows out of a copy of ``kwargs`` and leaves the rest."""
    reading = {key: value for key, value in kwargs.items() if key != "config"}
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(path, **reading)
    except (OSError, ValueError):
        return {}
    return config_dict


def _wrong_kind_message(cls: type, path: Any, given: str) -> str:
    expected = cls.config_class.model_type
    held, loader = _REPO_KINDS.get(given, (f"a `{given}` model", "its own Auto class"))
    wanted = _REPO_KINDS.get(expected, (f"a `{expected}` model", ""))[0]
    message = (
        f"{cls.__name__}.from_pretrained({str(path)!r}): that repo holds {held} (model_type {given!r}), but "
        f"{cls.__name__} needs {wanted} (model_type {expected!r}). "
    )
    if given == "ijepa":
        message += (
            f"Load it with {loader}, or import it as an ijepa_hf encoder with "
            f"`ijepa_hf.conversion.encoder_from_transformers({str(path)!r})`."
        )
    elif given == _PRETRAINING and expected == "ijepa_hf_predictor":
        message += f"Load the whole model and take its predictor: `IJepaForPreTraining.from_pretrained({str(path)!r}).predictor`."
        return message
    else:
        message += f"Load it with {loader}."
    if expected == _PRETRAINING:
        message += " Pretraining repos come from `ijepa-hf convert CHECKPOINT.pth.tar OUTPUT_DIR` or from pretraining."
        if given == "ijepa_hf_encoder":
            message += " To pretrain at this encoder's size: `IJepaPretrainingConfig(encoder_config=AutoConfig.from_pretrained(repo))`."
    return message


def some_of(names: Sequence[str], shown: int = 5) -> str:
    """The first ``shown`` of ``names``, comma-separated, and how many more: for messages that name a long list."""
    more = f", ... ({len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _key_summary(label: str, keys: Sequence[str]) -> str:
    return f"{len(keys)} {label} ({some_of(keys)}); " if keys else ""


def _encoder_config_of(config: IJepaPretrainingConfig) -> IJepaEncoderConfig:
    """A pretraining config's encoder config, with the head fields the Auto classes set on the repo's config."""
    encoder_dict = config.encoder_config.to_dict()
    encoder_dict.pop("model_type", None)
    heads = {key: getattr(config, key) for key in ("id2label", "label2id", "problem_type")}
    return IJepaEncoderConfig.from_dict({**encoder_dict, **heads})


def _forget_renaming(model: Any, source_pattern: str) -> None:
    """Drops the renaming of ``source_pattern`` from the conversions transformers keeps on a loaded model to apply in
    reverse when it is saved. The model is an encoder now, and saves as one: with the renaming kept, every saved key
    would get the pretraining repo's prefix back and the saved encoder or classifier would not load as one. A caller's
    own ``key_mapping`` is left to transformers."""
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [
            conversion for conversion in conversions
            if list(getattr(conversion, "_original_source_patterns", conversion.source_patterns)) != [source_pattern]
        ]


def check_encoder_choice(caller: str, path: Any, encoder: str | None, held: str | None) -> None:
    """Refuses ``encoder="context"`` for a repo that is not a pretraining repo (``held``: its ``model_type``): only
    a pretraining repo holds two encoders to choose from; any other repo's encoder is what ``"target"`` means."""
    if encoder is not None and encoder not in ENCODER_CHOICES:
        raise ValueError(f"{caller}: encoder must be one of {ENCODER_CHOICES}, got {encoder!r}.")
    if encoder not in (None, "target") and held != _PRETRAINING:
        holds = _REPO_KINDS.get(held, (f"a `{held}` model",))[0]
        raise ValueError(
            f"{caller}({str(path)!r}, encoder={encoder!r}): the encoder choice applies to a pretraining repo, which "
            f"holds two; this repo holds {holds}. Leave `encoder` out."
        )


def from_pretrained_policy(
    cls: type,
    load: Callable[..., Any],
    path: Any,
    model_args: tuple,
    kwargs: dict[str, Any],
    strict: bool = True,
    encoder: str | None = None,
) -> Any:
    """``cls.from_pretrained(path, *model_args, strict=strict, encoder=encoder, **kwargs)``, where ``load`` is
    transformers' `PreTrainedModel.from_pretrained` bound to ``cls``. Returns what ``load`` returns (the model,
    or ``(model, loading_info)`` with ``output_loading_info=True``), after ``model._after_load()``."""
    caller = f"{cls.__name__}.from_pretrained"
    check_encoder_choice(caller, path, encoder, _PRETRAINING)  # the value itself; its fit to the repo below
    check_model_path(path, caller, kwargs.get("subfolder") or "")
    config = kwargs.get("config")
    repo = repo_config(path, kwargs) if path is not None else {}
    held = repo.get("model_type") or getattr(config, "model_type", None)
    expected = cls.config_class.model_type
    encoder_class = issubclass(cls.config_class, IJepaEncoderConfig)
    if encoder is not None and not encoder_class:
        raise ValueError(
            f"{caller}({str(path)!r}, encoder={encoder!r}): the encoder choice picks one encoder of a pretraining repo "
            f"for an encoder class (`IJepaEncoderModel`, `IJepaEncoderForImageClassification`, `IJepaBackbone`); "
            f"{cls.__name__} is not one ({'it loads both' if expected == _PRETRAINING else 'it holds no encoder'}). "
            "Leave `encoder` out, or load with one of those classes."
        )
    accepted = {expected} | ({"ijepa_hf_encoder", _PRETRAINING} if encoder_class else set())
    if held is not None and held not in accepted:
        raise ValueError(_wrong_kind_message(cls, path, held))
    picked = None  # the key_mapping entry that picks one encoder of a pretraining repo
    if held == _PRETRAINING and encoder_class:
        # One encoder of the repo: its keys lose their prefix (a classifier's `base_model_prefix` then adds
        # `encoder.`); the other encoder and the predictor are left aside (the encoder's
        # `_keys_to_ignore_on_load_unexpected`).
        picked = rf"^{encoder or 'target'}_encoder\."
        kwargs["key_mapping"] = {picked: "", **(kwargs.get("key_mapping") or {})}
        if isinstance(config, IJepaPretrainingConfig):
            kwargs["config"] = config = _encoder_config_of(config)
    else:
        check_encoder_choice(caller, path, encoder, held)
    resize_to = None  # the resolution the caller's pretraining config asks for, where the repo's is another
    if held == _PRETRAINING and isinstance(config, IJepaPretrainingConfig):
        saved = {name: (repo.get(f"{name}_config") or {}).get("image_size") for name in ("encoder", "predictor")}
        if None not in saved.values() and (_as_pair(saved["encoder"], "image_size")
                                           != _as_pair(config.encoder_config.image_size, "image_size")):
            # Loaded at its own resolution, then moved (the sin-cos tables are the only weights that follow the grid)
            resize_to = config.encoder_config.image_size
            kwargs["config"] = config = copy.deepcopy(config)
            config.encoder_config.image_size, config.predictor_config.image_size = saved["encoder"], saved["predictor"]
    fresh = getattr(cls, "_fresh_head_config", None)
    if fresh:
        architectures = repo.get("architectures") or getattr(config, "architectures", None) or []
        if cls.__name__ in architectures:  # a head this class trained keeps the settings it was trained with
            for key in fresh:
                # The Auto classes move the keyword into the config they pass
                given = kwargs.get(key, getattr(config, key, None) if isinstance(config, PretrainedConfig) else None)
                saved = repo.get(key)
                if given is not None and given != saved and not (given == "none" and saved is None):
                    raise ValueError(
                        f"{caller}({str(path)!r}, {key}={given!r}): this classifier's head was trained on pooled "
                        f"features normalised by {saved or 'none'!r}; another {key} would feed it other inputs. "
                        f"Leave {key} out (--{key} in the example scripts) to keep it, or start from the encoder "
                        "or pretraining repo for a new head."
                    )
        else:  # a head this class did not train
            if isinstance(config, PretrainedConfig):
                kwargs["config"] = config = copy.deepcopy(config)
                for key, value in fresh.items():
                    if getattr(config, key, None) is None:
                        setattr(config, key, value)
            else:
                for key, value in fresh.items():
                    if kwargs.get(key) is None:
                        kwargs[key] = value
    wants_info = kwargs.pop("output_loading_info", False)
    # Strict: weights of another shape are reported here, naming them (transformers' own error names an option)
    reinitialise = bool(kwargs.pop("ignore_mismatched_sizes", False))
    try:
        model, info = load(path, *model_args, output_loading_info=True,
                           ignore_mismatched_sizes=reinitialise or strict, **kwargs)
    except SafetensorError as error:  # its traceback would be the whole message
        raise ValueError(
            f"{caller}({str(path)!r}): a weights file of {path} cannot be read ({error}): it was cut off or changed "
            "after it was saved (a copy or a download that did not finish?); copy or download it again"
        ) from None
    if picked is not None:
        _forget_renaming(model, picked)
    if strict:
        missing, unexpected = sorted(info.get("missing_keys", [])), sorted(info.get("unexpected_keys", []))
        if missing or unexpected:
            raise ValueError(
                f"{caller}({str(path)!r}): the checkpoint does not match the config: "
                f"{_key_summary('missing keys', missing)}{_key_summary('unexpected keys', unexpected)}"
                "check that the config matches the weights (an official checkpoint is converted with "
                "`ijepa-hf convert`); strict=False loads anyway."
            )
        mismatched = sorted(info.get("mismatched_keys", []))
        if mismatched and not reinitialise:
            shown = "; ".join(f"{key}: {tuple(saved)} saved, {tuple(wanted)} by the config"
                              for key, saved, wanted in mismatched[:3])
            if all(key.split(".")[-1] == "pos_embed" for key, *_ in mismatched):
                fix = ("only the fixed sin-cos position tables differ (they follow image_size), and the model takes "
                       "any input size as saved: leave image_size out")
            else:
                fix = ("a saved model loads with its own architecture: leave out the config changes that size it "
                       "(widths, depths, patch size), or build a new model from a config; ignore_mismatched_sizes="
                       "True starts those weights afresh")
            raise MismatchedWeightsError(
                f"{caller}({str(path)!r}): the config changes the shape of the saved weights ({len(mismatched)} "
                f"tensors, e.g. {shown}); {fix}."
            )
    if resize_to is not None:
        model.set_input_size(resize_to)
    model._after_load()
    return (model, info) if wants_info else model
