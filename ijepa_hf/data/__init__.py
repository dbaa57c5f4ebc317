"""Data for I-JEPA: robust image loading, torchvision-free transforms, procedural shapes, Fashion-MNIST,
and a ``datasets.load_dataset`` wrapper.

Pretraining pipeline (:func:`build_pretraining_data`): :class:`EpochShuffleSampler` (a :class:`SampleKey` per
sample) -> :class:`PretrainImageDataset` (file -> :func:`load_image`, bad files -> ``None``, counted ->
:class:`PretrainTransform`, ``[3, S, S]``, ``uint8`` or float) -> :class:`MaskedBatchCollator` (drops ``None``
rows, attaches the masks) -> on the device :meth:`PretrainingData.model_inputs` (:func:`normalize_images`).
:func:`build_validation_data` gives the held-out images of a run's ``eval_loss`` through the same pipeline, in order.
"""

from .fashion_mnist import (
    DEFAULT_FASHION_MNIST_DIR,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ENV_VAR,
    IDXFormatError,
    fashion_mnist_dataset,
    load_fashion_mnist,
    read_idx,
)
from .folder import (BUILTIN_DATASETS, IMAGE_COLUMN_CANDIDATES, check_sample_limit, detect_image_column,
                     load_builtin_split, load_image_dataset)
from .loading import (
    IMAGE_EXTENSIONS,
    BadImageCounter,
    ImageFileDataset,
    SafeDataset,
    SkipBadCollator,
    default_bad_image_counter,
    is_bad_example,
    list_image_files,
    load_image,
    to_rgb,
)
from .pretraining import (
    EMBEDDED_DATASET_NAME,
    EMBEDDED_SCENES,
    EMBEDDED_VALIDATION_SEED,
    LOAD_SECONDS_KEY,
    EpochShuffleSampler,
    MaskedBatchCollator,
    OnlineProbeSet,
    PretrainImageDataset,
    PretrainingData,
    PretrainIterableImageDataset,
    SampleKey,
    build_online_probe_set,
    build_pretraining_data,
    build_validation_data,
    embedded_scenes,
    parse_embedded_scenes,
)
from .procedural import SHAPE_NAMES, TEXTURE_NAMES, ProceduralShapes, ShapeSpec, as_hf_dataset
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    PretrainTransform,
    RandomResizedCrop,
    make_transform_fn,
    normalize,
    normalize_images,
    pil_to_tensor,
    pil_to_uint8,
    set_image_transform,
)

__all__ = [
    # transforms
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RandomResizedCrop",
    "PretrainTransform",
    "EvalTransform",
    "pil_to_tensor",
    "pil_to_uint8",
    "normalize",
    "normalize_images",
    "make_transform_fn",
    "set_image_transform",
    # loading
    "IMAGE_EXTENSIONS",
    "BadImageCounter",
    "default_bad_image_counter",
    "to_rgb",
    "load_image",
    "list_image_files",
    "ImageFileDataset",
    "SafeDataset",
    "SkipBadCollator",
    "is_bad_example",
    # procedural
    "SHAPE_NAMES",
    "TEXTURE_NAMES",
    "ShapeSpec",
    "ProceduralShapes",
    "as_hf_dataset",
    # fashion-mnist
    "FASHION_MNIST_CLASSES",
    "DEFAULT_FASHION_MNIST_DIR",
    "FASHION_MNIST_ENV_VAR",
    "IDXFormatError",
    "read_idx",
    "load_fashion_mnist",
    "fashion_mnist_dataset",
    # folders / hub
    "BUILTIN_DATASETS",
    "load_builtin_split",
    "IMAGE_COLUMN_CANDIDATES",
    "check_sample_limit",
    "detect_image_column",
    "load_image_dataset",
    # the pretraining pipeline
    "EMBEDDED_DATASET_NAME",
    "EMBEDDED_SCENES",
    "EMBEDDED_VALIDATION_SEED",
    "embedded_scenes",
    "parse_embedded_scenes",
    "LOAD_SECONDS_KEY",
    "SampleKey",
    "EpochShuffleSampler",
    "PretrainImageDataset",
    "PretrainIterableImageDataset",
    "MaskedBatchCollator",
    "PretrainingData",
    "build_pretraining_data",
    "build_validation_data",
]
