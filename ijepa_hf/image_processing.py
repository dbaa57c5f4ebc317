"""The image processor of I-JEPA models: a stock transformers ViT processor with the official ImageNet statistics.

A stock class (rather than a subclass) keeps saved repos loadable with plain ``AutoImageProcessor`` anywhere.
transformers' I-JEPA conversion saved ViT's 0.5/0.5 defaults; the official training normalises with ImageNet's
mean and std, which is what these features were learned on.
"""

from __future__ import annotations

from typing import Any

from .data.transforms import IMAGENET_MEAN, IMAGENET_STD


def make_image_processor(image_size: int | tuple[int, int] | list[int] = 224, **overrides: Any):
    """A `ViTImageProcessorPil` (no torchvision needed) that converts to RGB, resizes (bicubic) to ``image_size``,
    rescales to [0, 1] and normalises with ImageNet statistics. Accepts a config (its ``image_size`` is used)."""
    from transformers import ViTImageProcessorPil
    from transformers.image_utils import PILImageResampling

    image_size = getattr(image_size, "image_size", image_size)
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    kwargs = dict(
        do_resize=True,
        size={"height": height, "width": width},
        resample=PILImageResampling.BICUBIC,
        do_rescale=True,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )
    kwargs.update(overrides)
    return ViTImageProcessorPil(**kwargs)
