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
"""Configuration of an I-JEPA encoder used as a transformers backbone (`AutoBackbone`, dense heads).

`IJepaBackboneConfig` is an `IJepaEncoderConfig` plus transformers' `BackboneConfigMixin` fields
(``out_features`` / ``out_indices`` over the stages ``stem, stage1 .. stageL``), ``apply_layernorm`` and
``reshape_hidden_states`` (as `Dinov2Config`). It lives in its own module, as a subclass, so that the encoder
configuration (`configuration_ijepa_hf.py`) stays free of backbone fields: an encoder repo does not carry them,
and `IJepaBackbone.from_pretrained(encoder_repo, out_indices=...)` / `AutoBackbone` build this config from the
encoder's. Its own ``model_type`` (``ijepa_hf_backbone``) lets dense-head configs (`UperNetConfig`, `DPTConfig`)
hold it as ``backbone_config`` and save and reload it.

Like the other configuration file, it only imports transformers and its sibling, so it can be shipped with the
weights for ``trust_remote_code=True`` loading.
"""

# Linter note (transformers' structural linter, `mlinter ijepa_hf`), for the `# trf-ignore` comments below:
# TRF057: `@auto_docstring` takes a model's name and intro from transformers' own model registry, which this package
# is not part of (it renders "a None model" and drops the hand-written text), so the configs document themselves.

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig
from transformers.backbone_utils import BackboneConfigMixin

from .configuration_ijepa_hf import IJepaEncoderConfig

__all__ = ["IJepaBackboneConfig"]

# Keys of an encoder config's dict that describe the saved model rather than the architecture.
_NOT_CARRIED = ("model_type", "architectures", "auto_map", "transformers_version")
BACKBONE_ARGUMENTS = ("out_features", "out_indices", "apply_layernorm", "reshape_hidden_states", "readout_token")
READOUT_TOKENS = (None, "mean")


# trf-ignore: TRF057 (linter note at the top of this file)
class IJepaBackboneConfig(BackboneConfigMixin, IJepaEncoderConfig):
    r"""An `IJepaEncoderConfig` for an I-JEPA encoder used as a backbone (`IJepaBackbone`).

    Args:
        out_features (`list[str]`, optional): stages to return as feature maps, among ``stage_names``
            (``"stem"``, the patch embeddings, then ``"stage1"`` .. ``"stage{num_hidden_layers}"``, the blocks).
        out_indices (`list[int]`, optional): the same as indices into ``stage_names`` (negative ones count from
            the end). Neither given: the last stage.
        apply_layernorm: pass each returned feature map through the encoder's final LayerNorm (so every stage
            is on the scale of the final output; DINO and timm's ``norm=True`` do the same).
        reshape_hidden_states: return feature maps as ``[B, D, h, w]`` (else the tokens ``[B, h * w, D]``).
        readout_token: with ``reshape_hidden_states=False``, ``"mean"`` puts the stage's mean token first
            (``[B, 1 + h * w, D]``), where ViT backbones have their CLS token: DPT's neck reads the first token as
            the readout of every stage (``readout_type`` ``"ignore"`` / ``"add"`` / ``"project"``), and I-JEPA,
            which has no CLS token, is evaluated on the mean of its patch tokens.
        kwargs: the `IJepaEncoderConfig` arguments.
    """

    model_type = "ijepa_hf_backbone"

    def __init__(
        self,
        out_features: list[str] | None = None,
        out_indices: list[int] | None = None,
        apply_layernorm: bool = True,
        reshape_hidden_states: bool = True,
        readout_token: str | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("stage_names", None)  # derived from the depth below (saved configs carry it)
        if readout_token not in READOUT_TOKENS:
            raise ValueError(f"readout_token must be one of {READOUT_TOKENS}, got {readout_token!r}")
        if readout_token is not None and reshape_hidden_states:
            raise ValueError("readout_token adds a token to the token sequences: it needs reshape_hidden_states=False "
                             "(feature maps have no place for it)")
        self.apply_layernorm = apply_layernorm
        self.reshape_hidden_states = reshape_hidden_states
        self.readout_token = readout_token
        super().__init__(**kwargs)
        self.stage_names = ["stem"] + [f"stage{index}" for index in range(1, self.num_hidden_layers + 1)]
        self.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """transformers' reading of a repo's config, where an encoder repo's config (or a pretraining repo's
        ``encoder_config``) reads as this backbone's with the default stages: `IJepaBackbone.from_pretrained` and
        ``AutoBackbone`` take those repos as they take backbone repos, backbone arguments given as keywords."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") == "ijepa_hf_pretraining":
            config_dict = config_dict.get("encoder_config", config_dict)
        if config_dict.get("model_type") == IJepaEncoderConfig.model_type:
            config_dict = {key: value for key, value in config_dict.items() if key not in _NOT_CARRIED}
            config_dict["model_type"] = cls.model_type
        return config_dict, kwargs

    @classmethod
    def from_encoder_config(cls, encoder_config: PretrainedConfig | dict[str, Any], **backbone_kwargs: Any):
        """The backbone config of an encoder (an `IJepaEncoderConfig` or its dict), with ``out_features`` /
        ``out_indices`` / ``apply_layernorm`` / ``reshape_hidden_states`` from ``backbone_kwargs``."""
        values = encoder_config.to_dict() if isinstance(encoder_config, PretrainedConfig) else dict(encoder_config)
        for key in _NOT_CARRIED:
            values.pop(key, None)
        unknown = set(backbone_kwargs) - set(BACKBONE_ARGUMENTS)
        if unknown:
            raise TypeError(f"unexpected backbone arguments {sorted(unknown)}; expected some of {BACKBONE_ARGUMENTS}.")
        values.update(backbone_kwargs)
        return cls(**values)
