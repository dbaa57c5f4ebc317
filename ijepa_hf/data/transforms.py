"""Image transforms built on PIL and torch only (no torchvision).

torchvision does not import next to every torch build (it does not on our CPU CI machine), so the
pretraining and evaluation transforms are re-implemented here with the same semantics:

* :class:`RandomResizedCrop` samples its box exactly like ``torchvision.transforms.RandomResizedCrop``
  (10 tries in log-aspect space, then a central fallback), so with the global RNG and the same seed it draws
  the same boxes as torchvision;
* :class:`PretrainTransform` is the official I-JEPA recipe: random resized crop, to-tensor, normalise.
  There is deliberately no flip, no colour jitter and no blur: none of the official configs use them;
* :class:`EvalTransform` is the usual resize-shorter-side + centre crop + normalise.

Tensors follow the torchvision ``ToTensor`` convention: ``float32`` in ``[0, 1]``, shape ``[C, H, W]``,
then normalised channel-wise. The pretraining transform can instead stop at ``uint8`` (``as_uint8=True``): images
then cross to the accelerator at a quarter of the bytes and :func:`normalize_images` finishes them there with the
same operations, so the numbers are those of the float path.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from .loading import BadImageCounter, default_bad_image_counter, load_image, to_rgb

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_INTERPOLATIONS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

__all__ = [
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
]


def _as_size(size: int | Sequence[int]) -> tuple[int, int]:
    """``int`` -> square ``(h, w)``; a pair is taken as ``(h, w)`` like torchvision."""
    if isinstance(size, int):
        return (size, size)
    if len(size) == 1:
        return (int(size[0]), int(size[0]))
    if len(size) != 2:
        raise ValueError(f"size must be an int or a (height, width) pair, got {size!r}")
    return (int(size[0]), int(size[1]))


def _as_resample(interpolation: str | int | Image.Resampling) -> Image.Resampling:
    if isinstance(interpolation, str):
        try:
            return _INTERPOLATIONS[interpolation.lower()]
        except KeyError:
            raise ValueError(
                f"unknown interpolation {interpolation!r}; expected one of {sorted(_INTERPOLATIONS)}"
            ) from None
    return Image.Resampling(int(interpolation))


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """PIL image -> ``ByteTensor [3, H, W]`` (RGB, contiguous)."""
    if image.mode != "RGB":
        image = to_rgb(image)
    # np.array (not asarray) gives a writable copy, which torch.from_numpy needs to avoid a warning.
    array = np.array(image, dtype=np.uint8)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """``uint8`` -> ``float32`` in ``[0, 1]``: the one conversion both the host and the device path use."""
    return pixels.float().div_(255.0)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB image -> ``FloatTensor [3, H, W]`` in ``[0, 1]`` (torchvision ``ToTensor`` semantics)."""
    return _unit_range(pil_to_uint8(image))


def normalize(tensor: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Channel-wise ``(x - mean) / std`` on ``[C, H, W]`` (or ``[B, C, H, W]``); returns a new tensor."""
    mean_t = torch.as_tensor(mean, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    return (tensor - mean_t) / std_t


def normalize_images(pixel_values: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Finish ``uint8`` images where they are (e.g. on the accelerator, after a copy of a quarter of the bytes):
    ``[..., C, H, W]`` -> ``float32`` in ``[0, 1]``, normalised channel-wise. The operations and their order are
    :class:`PretrainTransform`'s, so the result equals the float path's. Floating-point input is returned as it is
    (already finished)."""
    if pixel_values.is_floating_point():
        return pixel_values
    if pixel_values.dtype != torch.uint8:
        raise TypeError(f"pixel_values must be uint8 images (0-255) or finished float images, got "
                        f"{pixel_values.dtype}")
    mean_t, std_t = _statistics_on(tuple(float(m) for m in mean), tuple(float(s) for s in std), pixel_values.device)
    return normalize(_unit_range(pixel_values), mean_t, std_t)


@functools.lru_cache(maxsize=16)
def _statistics_on(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean`` and ``std`` as float32 tensors on ``device``, made once: a training step finishing its images on
    the accelerator copies nothing from the host for them."""
    return (torch.tensor(mean, dtype=torch.float32, device=device),
            torch.tensor(std, dtype=torch.float32, device=device))


class RandomResizedCrop:
    """Crop a random box of random area and aspect ratio, then resize it to ``size``.

    The box sampling is the torchvision algorithm: up to 10 tries of
    ``area ~ U(scale) * H * W`` and ``log(aspect) ~ U(log ratio)``; the first box that fits is placed
    uniformly; if none fits, fall back to a central crop clipped to the ratio range.

    Args:
        size: output size, ``int`` (square) or ``(height, width)``.
        scale: range of the crop area as a fraction of the image area. I-JEPA uses ``(0.3, 1.0)``.
        ratio: range of the crop aspect ratio (width / height).
        interpolation: PIL resampling filter (name such as ``"bicubic"`` or a ``PIL.Image.Resampling``).
        generator: optional ``torch.Generator``; ``None`` uses torch's global RNG (so seeding torch, or
            DataLoader worker seeding, controls it, exactly like torchvision).

    Input: a PIL image (any size) or a tensor ``[C, H, W]``. Output: same type, spatial size ``size``.
    """

    def __init__(
        self,
        size: int | Sequence[int],
        scale: tuple[float, float] = (0.3, 1.0),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        interpolation: str | int | Image.Resampling = "bicubic",
        generator: torch.Generator | None = None,
    ) -> None:
        self.size = _as_size(size)
        if scale[0] > scale[1] or ratio[0] > ratio[1]:
            raise ValueError(f"scale and ratio must be (min, max), got scale={scale}, ratio={ratio}")
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.interpolation = _as_resample(interpolation)
        self.generator = generator

    @staticmethod
    def get_params(
        height: int,
        width: int,
        scale: tuple[float, float],
        ratio: tuple[float, float],
        generator: torch.Generator | None = None,
    ) -> tuple[int, int, int, int]:
        """Sample a crop box ``(top, left, height, width)`` for an image of ``height x width``.

        The order and kind of random draws match torchvision's, so the global-RNG stream is consumed the
        same way (parity with the official data pipeline under the same seed).
        """
        area = height * width
        # float32 log/exp like torchvision, so the rounded box sizes match it bit for bit.
        log_ratio = torch.log(torch.tensor(ratio, dtype=torch.float32)).tolist()
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
            aspect_ratio = torch.exp(
                torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)
            ).item()
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
                left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
                return top, left, h, w

        # Fallback: the largest central crop whose aspect ratio lies inside `ratio`.
        in_ratio = float(width) / float(height)
        if in_ratio < min(ratio):
            w = width
            h = int(round(w / min(ratio)))
        elif in_ratio > max(ratio):
            h = height
            w = int(round(h * max(ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
        if isinstance(image, torch.Tensor):
            height, width = int(image.shape[-2]), int(image.shape[-1])
        else:
            width, height = image.size
        top, left, h, w = self.get_params(height, width, self.scale, self.ratio, self.generator)
        if isinstance(image, torch.Tensor):
            crop = image[..., top : top + h, left : left + w]
            mode = {Image.Resampling.NEAREST: "nearest", Image.Resampling.BILINEAR: "bilinear"}.get(
                self.interpolation, "bicubic"
            )
            batched = crop.unsqueeze(0) if crop.ndim == 3 else crop
            out = torch.nn.functional.interpolate(
                batched.float(),
                size=self.size,
                mode=mode,
                antialias=mode != "nearest",
                **({} if mode == "nearest" else {"align_corners": False}),
            )
            return out[0] if crop.ndim == 3 else out
        # Crop then resize (not resize(box=...)): PIL's box mode reads pixels outside the box for the
        # filter support, torchvision's crop-then-resize does not. PIL's resize takes (width, height).
        crop = image.crop((left, top, left + w, top + h))
        return crop.resize((self.size[1], self.size[0]), resample=self.interpolation)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
            f"interpolation={self.interpolation.name.lower()})"
        )


class PretrainTransform:
    """The official I-JEPA pretraining transform: random resized crop -> to-tensor -> normalise.

    No horizontal flip, colour jitter or blur (none of the official configs enable them).

    Args:
        image_size: output side ``S``.
        crop_scale: area range of the random crop (official ``(0.3, 1.0)``).
        mean, std: normalisation statistics (ImageNet by default, as the official code).
        interpolation: resampling filter of the crop resize. Defaults to ``"bilinear"``, torchvision's
            default, which the official code uses (it passes no interpolation); ``"bicubic"`` is what the HF
            MAE example uses.
        generator: optional ``torch.Generator`` for reproducible crops.
        as_uint8: stop before the float conversion: ``__call__`` returns the cropped image as ``ByteTensor
            [3, S, S]``, for :func:`normalize_images` (with this transform's ``mean`` / ``std``) to finish on the
            device.

    ``__call__(PIL.Image) -> FloatTensor [3, S, S]`` (``ByteTensor`` with ``as_uint8``). Any PIL mode is accepted
    (converted with :func:`~ijepa_hf.data.loading.to_rgb`).
    """

    def __init__(
        self,
        image_size: int,
        crop_scale: tuple[float, float] = (0.3, 1.0),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        interpolation: str | int | Image.Resampling = "bilinear",
        generator: torch.Generator | None = None,
        as_uint8: bool = False,
    ) -> None:
        self.image_size = int(image_size)
        self.as_uint8 = bool(as_uint8)
        self.crop = RandomResizedCrop(
            self.image_size, scale=crop_scale, interpolation=interpolation, generator=generator
        )
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode != "RGB":
            image = to_rgb(image)
        pixels = pil_to_uint8(self.crop(image))
        return pixels if self.as_uint8 else normalize_images(pixels, self.mean, self.std)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(crop={self.crop!r}, mean={self.mean}, std={self.std}"
                f"{', as_uint8=True' if self.as_uint8 else ''})")


class EvalTransform:
    """Deterministic evaluation transform: resize shorter side -> centre crop -> to-tensor -> normalise.

    The shorter side is resized to ``int(image_size * resize_ratio)`` (``256/224`` by default, the classic
    ImageNet protocol; pass ``1.0`` to resize straight to ``image_size``, e.g. for small synthetic images),
    then the central ``image_size x image_size`` crop is kept.

    ``__call__(PIL.Image) -> FloatTensor [3, S, S]``.
    """

    def __init__(
        self,
        image_size: int,
        resize_ratio: float = 256.0 / 224.0,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        interpolation: str | int | Image.Resampling = "bicubic",
    ) -> None:
        if resize_ratio < 1.0:
            raise ValueError(f"resize_ratio must be >= 1 (resize then crop), got {resize_ratio}")
        self.image_size = int(image_size)
        self.resize_size = max(self.image_size, int(self.image_size * resize_ratio))
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.interpolation = _as_resample(interpolation)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode != "RGB":
            image = to_rgb(image)
        width, height = image.size
        # Shorter side -> resize_size, longer side scaled and truncated (torchvision's Resize(int) rule).
        if width <= height:
            new_w, new_h = self.resize_size, int(self.resize_size * height / width)
        else:
            new_w, new_h = int(self.resize_size * width / height), self.resize_size
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), resample=self.interpolation)
        # Centre crop with torchvision's rounding.
        top = int(round((new_h - self.image_size) / 2.0))
        left = int(round((new_w - self.image_size) / 2.0))
        image = image.crop((left, top, left + self.image_size, top + self.image_size))
        return normalize(pil_to_tensor(image), self.mean, self.std)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_size={self.image_size}, resize_size={self.resize_size}, "
            f"mean={self.mean}, std={self.std})"
        )


def make_transform_fn(
    transform: Callable[[Image.Image], torch.Tensor],
    image_column: str = "image",
    keep_columns: Iterable[str] = ("label", "labels"),
    counter: BadImageCounter | None = None,
    drop_bad: bool = False,
) -> Callable[[dict[str, list[Any]]], dict[str, list[Any]]]:
    """Build a batch function for ``datasets.Dataset.set_transform`` / ``IterableDataset.map(batched=True)``.

    The returned function maps ``{image_column: [...], ...}`` to ``{"pixel_values": [FloatTensor [3,S,S]
    | None, ...], <kept columns>}``. Each image may be a PIL image, a path, bytes, or the
    ``{"bytes", "path"}`` dict that an ``Image(decode=False)`` column yields; it goes through
    :func:`~ijepa_hf.data.loading.load_image`, so a corrupt file is counted and warned about instead of
    raising.

    Bad images:
        * ``drop_bad=False`` (default): the bad row keeps its place with ``pixel_values=None``. This keeps
          every column the same length, which ``set_transform`` needs for single-row access (``ds[i]``);
          wrap the DataLoader's collator in :class:`~ijepa_hf.data.loading.SkipBadCollator` to drop it.
        * ``drop_bad=True``: the bad row is removed from every returned column (only valid for batched
          access such as ``ds[a:b]``, ``ds.__getitems__`` or ``map(batched=True)``).

    Note: a ``datasets.Image()`` column with ``decode=True`` decodes *before* this function runs, and
    ``datasets`` raises on a corrupt file. Use :func:`set_image_transform` (which casts the column to
    ``Image(decode=False)``) to survive bad files.

    Args:
        transform: per-image transform, e.g. :class:`PretrainTransform`.
        image_column: name of the image column.
        keep_columns: columns passed through unchanged when present (missing ones are ignored).
        counter: where bad images are counted (default: the process-wide counter).
        drop_bad: see above.
    """
    keep = tuple(keep_columns)
    counter = counter if counter is not None else default_bad_image_counter()

    def transform_fn(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if image_column not in batch:
            raise KeyError(f"image column {image_column!r} not in batch columns {sorted(batch)}")
        pixel_values: list[torch.Tensor | None] = []
        for item in batch[image_column]:
            image = load_image(item, counter=counter)
            pixel_values.append(transform(image) if image is not None else None)
        out: dict[str, list[Any]] = {"pixel_values": pixel_values}
        for column in keep:
            if column in batch:
                out[column] = list(batch[column])
        if drop_bad:
            good = [i for i, pv in enumerate(pixel_values) if pv is not None]
            out = {k: [v[i] for i in good] for k, v in out.items()}
        return out

    return transform_fn


def set_image_transform(
    dataset: Any,
    transform: Callable[[Image.Image], torch.Tensor],
    image_column: str = "image",
    keep_columns: Iterable[str] = ("label", "labels"),
    counter: BadImageCounter | None = None,
) -> Any:
    """Attach ``transform`` to a ``datasets`` dataset so that bad files never raise.

    * ``datasets.Dataset``: casts ``image_column`` to ``Image(decode=False)`` (decoding then happens in our
      robust loader) and calls ``set_transform``; returns the (new) dataset. Rows whose image is bad get
      ``pixel_values=None``.
    * ``datasets.IterableDataset``: same cast, then a lazy ``map(batched=True)`` that drops bad rows.

    Returns the dataset to use (``cast_column`` returns a new object).
    """
    import datasets

    features = getattr(dataset, "features", None)
    if features is not None and isinstance(features.get(image_column), datasets.Image):
        if features[image_column].decode:
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    if isinstance(dataset, datasets.IterableDataset):
        fn = make_transform_fn(transform, image_column, keep_columns, counter, drop_bad=True)
        columns = list(dataset.column_names) if dataset.column_names is not None else None
        return dataset.map(fn, batched=True, remove_columns=columns)
    fn = make_transform_fn(transform, image_column, keep_columns, counter, drop_bad=False)
    dataset.set_transform(fn)
    return dataset
