"""ijepa_hf: I-JEPA (Assran et al., 2023) as Hugging Face models.

Importing the package registers its model types (``ijepa_hf_encoder``, ``ijepa_hf_predictor``,
``ijepa_hf_pretraining``, ``ijepa_hf_backbone``) with transformers' Auto classes; `AutoBackbone` also takes encoder
and pretraining repos (their target encoder). transformers' own ``ijepa`` type is never touched.
"""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
)

from .configuration_ijepa_hf import (
    ENCODER_SIZES,
    PRETRAINING_PRESETS,
    IJepaEncoderConfig,
    IJepaPredictorConfig,
    IJepaPretrainingConfig,
    list_presets,
)
from .configuration_ijepa_hf_backbone import IJepaBackboneConfig
from .image_processing import make_image_processor
from .loading import route_local_backbone_folders
from .masking import IJepaMaskCollator, masks_to_boolean
from .modeling_ijepa_hf import (
    IJepaBackbone,
    IJepaEncoderForImageClassification,
    IJepaEncoderModel,
    IJepaPredictorModel,
    IJepaPredictorOutput,
    IJepaPreTrainedModel,
    IJepaForPreTraining,
    IJepaForPreTrainingOutput,
    sincos_position_embeddings,
)

__version__ = "0.1.0"


def _register() -> None:
    from transformers import ViTImageProcessorPil

    for config_class in (IJepaEncoderConfig, IJepaPredictorConfig, IJepaPretrainingConfig, IJepaBackboneConfig):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModel.register(IJepaEncoderConfig, IJepaEncoderModel, exist_ok=True)
    AutoModel.register(IJepaPredictorConfig, IJepaPredictorModel, exist_ok=True)
    AutoModel.register(IJepaPretrainingConfig, IJepaForPreTraining, exist_ok=True)
    AutoModelForPreTraining.register(IJepaPretrainingConfig, IJepaForPreTraining, exist_ok=True)
    AutoModelForImageClassification.register(IJepaEncoderConfig, IJepaEncoderForImageClassification, exist_ok=True)
    AutoBackbone.register(IJepaBackboneConfig, IJepaBackbone, exist_ok=True)
    # `AutoBackbone.from_pretrained(<encoder or pretraining repo>, out_indices=...)` builds the backbone config from
    # the encoder's (`IJepaBackbone.from_pretrained`); `register` would refuse these pairs only because the class's
    # `config_class` is the backbone config, hence the mapping itself.
    for config_class in (IJepaEncoderConfig, IJepaPretrainingConfig):
        AutoBackbone._model_mapping.register(config_class, IJepaBackbone, exist_ok=True)
    # The same for a classifier on a pretraining repo's target encoder (`IJepaEncoderForImageClassification`).
    AutoModelForImageClassification._model_mapping.register(IJepaPretrainingConfig,
                                                            IJepaEncoderForImageClassification, exist_ok=True)
    route_local_backbone_folders()  # transformers' AutoBackbone refuses every local folder (ijepa_hf.loading)
    for config_class in (IJepaEncoderConfig, IJepaPretrainingConfig, IJepaBackboneConfig):
        AutoImageProcessor.register(
            config_class,
            image_processor_classes={"pil": ViTImageProcessorPil},
            exist_ok=True,
        )


_register()

# Deprecated names (0.1.0), kept one release because model cards already pushed to the Hub show them in their code
# snippets (`IJepaPretrainingModel.from_pretrained(...)`); saved repos themselves never name them (Auto classes go by
# model_type). Accessing one warns; remove in 0.2.
_RENAMED = {"IJepaPretrainingModel": "IJepaForPreTraining", "IJepaPretrainingOutput": "IJepaForPreTrainingOutput"}


def __getattr__(name: str):
    if name in _RENAMED:
        import warnings

        warnings.warn(
            f"`ijepa_hf.{name}` is renamed `ijepa_hf.{_RENAMED[name]}` (transformers' naming, as ViTMAEForPreTraining); "
            "the old name goes away in ijepa_hf 0.2.",
            FutureWarning,
            stacklevel=2,
        )
        return globals()[_RENAMED[name]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ENCODER_SIZES",
    "PRETRAINING_PRESETS",
    "IJepaEncoderConfig",
    "IJepaPredictorConfig",
    "IJepaPretrainingConfig",
    "IJepaBackboneConfig",
    "IJepaPreTrainedModel",
    "IJepaEncoderModel",
    "IJepaPredictorModel",
    "IJepaForPreTraining",
    "IJepaEncoderForImageClassification",
    "IJepaBackbone",
    "IJepaPredictorOutput",
    "IJepaForPreTrainingOutput",
    "IJepaMaskCollator",
    "masks_to_boolean",
    "list_presets",
    "make_image_processor",
    "sincos_position_embeddings",
]
