"""Image decoding that survives bad files.

A long pretraining run should not die on the one corrupt JPEG in a million. Everything here turns a bad file
into ``None`` plus a count, and the collator drops the ``None`` rows:

* :func:`to_rgb` converts any PIL mode to RGB (alpha is composited on white by default);
* :func:`load_image` decodes a path / bytes / PIL image / ``{"bytes", "path"}`` dict, forces the full decode
  (so truncated files fail here and not later inside a transform), and returns ``None`` on failure;
* :class:`BadImageCounter` counts failures, keeps a few example names, logs a warning naming the file for
  the first few, and is shared with DataLoader worker processes (see its docstring);
* :class:`ImageFileDataset` (files or a folder) and :class:`SafeDataset` (wraps any map-style dataset)
  return ``None`` for bad items; :class:`SkipBadCollator` drops them, so a batch simply has fewer examples.

Note: PIL's global ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone. If some other code sets it to
``True``, truncated files decode partially (grey bottom) instead of being reported as bad.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "BadImageCounter",
    "default_bad_image_counter",
    "to_rgb",
    "load_image",
    "ImageFileDataset",
    "SafeDataset",
    "SkipBadCollator",
    "is_bad_example",
    "list_image_files",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff", ".webp",
)  # fmt: skip

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | dict | np.ndarray


# --------------------------------------------------------------------------------------------------------
# Counter
# --------------------------------------------------------------------------------------------------------


class BadImageCounter:
    """Thread-safe count of images that failed to decode, with a few example names.

    The count lives in a small shared-memory ``int64`` tensor with one slot per process (slot 0 for the main
    process, slot ``1 + worker_id`` for a DataLoader worker). Workers therefore write to memory the parent
    reads, whether they are forked or spawned (torch shares the storage when pickling the dataset), and no
    cross-process lock is needed because each process only writes its own slot. Within a process a
    ``threading.Lock`` guards the slot. With more than ``num_slots - 1`` workers, slots are reused modulo
    and a simultaneous increment can (rarely) be lost.

    The example names (:attr:`examples`) and the warning budget are per process: a worker's examples are
    not visible in the parent, but its warnings are logged (they name the file).

    Args:
        max_examples: how many example descriptions to keep (in this process).
        max_warnings: how many per-file warnings to log (in this process) before going quiet.
        num_slots: size of the shared count tensor.
    """

    def __init__(self, max_examples: int = 5, max_warnings: int = 5, num_slots: int = 64) -> None:
        if num_slots < 2:
            raise ValueError("num_slots must be >= 2 (main process + at least one worker slot)")
        self.max_examples = int(max_examples)
        self.max_warnings = int(max_warnings)
        self._counts = torch.zeros(int(num_slots), dtype=torch.int64).share_memory_()
        self._lock = threading.Lock()
        self._examples: list[str] = []
        self._sources: set[str] = set()  # the sources seen in this process
        self._warned = 0

    # Locks cannot be pickled (spawned workers, deepcopy): recreate one on the other side.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _slot(self) -> int:
        info = torch.utils.data.get_worker_info()
        if info is None:
            return 0
        return 1 + info.id % (self._counts.numel() - 1)

    def add(self, source: str, error: BaseException | str | None = None) -> None:
        """Record one bad image; ``source`` names it (a path or a short description)."""
        reason = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else (error or "")
        with self._lock:
            self._counts[self._slot()] += 1
            # Each read counts (a bad file is read again every epoch), but a file is named and reported once.
            new = source not in self._sources
            self._sources.add(source)
            if new and len(self._examples) < self.max_examples:
                self._examples.append(f"{source} ({reason})" if reason else source)
            warn = new and self._warned < self.max_warnings
            if warn:
                self._warned += 1
                last = self._warned == self.max_warnings
        if warn:
            logger.warning(
                "Skipping unreadable image %s%s%s",
                source,
                f": {reason}" if reason else "",
                "; further bad images are counted but not reported one by one" if last else "",
            )

    @property
    def count(self) -> int:
        """Total bad images seen by this process and its DataLoader workers."""
        return int(self._counts.sum().item())

    def __len__(self) -> int:
        return self.count

    def get(self) -> int:
        return self.count

    @property
    def examples(self) -> list[str]:
        """Up to ``max_examples`` descriptions (``"path (Error: message)"``) seen in this process."""
        with self._lock:
            return list(self._examples)

    def reset(self) -> None:
        """Zero the count and forget the examples and the warning budget."""
        with self._lock:
            self._counts.zero_()
            self._examples.clear()
            self._sources.clear()
            self._warned = 0

    def __str__(self) -> str:
        return self.describe()

    def describe(self, count: int | None = None) -> str:
        """``"N bad images skipped (e.g. ...)"``: ``count`` (default: :attr:`count`) is the number, e.g. a sum over
        data-parallel processes; the examples are this process's."""
        n = self.count if count is None else count
        if n == 0:
            return "0 bad images"
        examples = self.examples
        tail = f" (e.g. {'; '.join(examples)})" if examples else ""
        return f"{n} bad image{'s' if n != 1 else ''} skipped{tail}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(count={self.count})"


# Created at import (not lazily) so that DataLoader workers forked later share its count with the parent.
_DEFAULT_COUNTER = BadImageCounter()


def default_bad_image_counter() -> BadImageCounter:
    """The process-wide counter used when no counter is passed."""
    return _DEFAULT_COUNTER


# --------------------------------------------------------------------------------------------------------
# Mode conversion
# --------------------------------------------------------------------------------------------------------

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _wide_to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    """Map a 16/32-bit integer or float single-channel array to uint8.

    * ``I;16*`` (16-bit): divide by 257 so 65535 -> 255 (full range kept, not clipped).
    * ``I`` (32-bit int): already in [0, 255] -> as is; in [0, 65535] -> treated as 16-bit; else min-max.
    * ``F`` (float): in [0, 1] -> x 255; in [0, 255] -> as is; else min-max. NaN -> 0.

    (PIL's own ``convert`` clips ``I``/``F`` to [0, 255], which turns most 16-bit images white.)
    """
    a = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode.startswith("I;16"):
        scaled = a / 257.0
    elif mode == "F" and lo >= 0.0 and hi <= 1.0:
        scaled = a * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        scaled = a
    elif mode == "I" and lo >= 0.0 and hi <= 65535.0:
        scaled = a / 257.0
    else:
        scaled = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_rgb(
    image: Image.Image, background: tuple[int, int, int] | None = (255, 255, 255)
) -> Image.Image:
    """Convert a PIL image of any mode to ``RGB``.

    * ``RGB``: returned unchanged (same object).
    * ``L``, ``1``, ``CMYK``, ``YCbCr``, ``HSV``, ...: PIL's conversion. CMYK uses PIL's naive formula, not an
      embedded ICC profile.
    * ``P``: through ``RGBA`` when the palette has transparency, else straight to ``RGB``.
    * ``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``: alpha-composited on ``background`` (white by default, how
      viewers show transparent images); ``background=None`` drops the alpha channel instead (the colour
      under fully transparent pixels is then whatever the file stored, often black).
    * ``I;16*``, ``I``, ``F`` (16/32-bit grey): rescaled to 8 bits (see :func:`_wide_to_uint8`), then grey
      -> RGB.

    Raises ``ValueError`` for a mode PIL cannot convert (:func:`load_image` counts it as a bad image).
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _WIDE_MODES:
        array = np.asarray(image)
        return Image.fromarray(_wide_to_uint8(array, mode)).convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        if image.mode == "RGB":
            return image
        mode = "RGBA"
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        if background is None:
            return rgba.convert("RGB")
        canvas = Image.new("RGB", rgba.size, tuple(background))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    try:
        return image.convert("RGB")
    except ValueError as e:  # e.g. LAB in some Pillow builds
        raise ValueError(f"cannot convert PIL mode {mode!r} to RGB: {e}") from e


# --------------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------------


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, dict):
        if source.get("path"):
            return str(source["path"])
        data = source.get("bytes")
        return f"<{len(data)} bytes>" if data is not None else "<empty image dict>"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or f"<PIL image {source.mode} {source.size}>"
    return f"<{type(source).__name__}>"


def _decode(source: Any) -> Image.Image:
    """Open and fully decode ``source``; raises on any failure."""
    if isinstance(source, Image.Image):
        source.load()  # lazily opened images decode here; a no-op for in-memory images
        return source
    if isinstance(source, np.ndarray):
        return Image.fromarray(source)
    if isinstance(source, dict):  # datasets.Image(decode=False) rows: {"bytes": ..., "path": ...}
        if source.get("bytes") is not None:
            return _decode(source["bytes"])
        if source.get("path"):
            return _decode(source["path"])
        raise ValueError("image dict has neither 'bytes' nor 'path'")
    if isinstance(source, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(bytes(source)))
        image.load()
        return image
    with open(os.fspath(source), "rb") as f:
        image = Image.open(f)
        # load() inside the `with`: it reads the whole file now, so truncation raises here and the file
        # handle can be closed.
        image.load()
    return image


def load_image(
    source: ImageSource,
    counter: BadImageCounter | None = None,
    *,
    convert_rgb: bool = True,
    exif_transpose: bool = False,
    background: tuple[int, int, int] | None = (255, 255, 255),
) -> Image.Image | None:
    """Decode an image, or return ``None`` (counted and warned about) if it cannot be read.

    Args:
        source: a path, encoded bytes, a PIL image, a ``{"bytes", "path"}`` dict (a ``datasets``
            ``Image(decode=False)`` value) or an ``HxW[xC] uint8`` array.
        counter: where to count failures (default: :func:`default_bad_image_counter`).
        convert_rgb: convert with :func:`to_rgb` (default). A conversion failure also counts as bad.
        exif_transpose: apply the EXIF orientation tag. Off by default because torchvision's ImageFolder
            (the official pipeline) ignores it.
        background: alpha compositing colour, see :func:`to_rgb`.

    Returns:
        The decoded (RGB) image, or ``None`` for a missing, unreadable, truncated or otherwise corrupt
        source.
    """
    if source is None:
        raise TypeError("load_image got None; expected a path, bytes, a PIL image or an image dict")
    try:
        image = _decode(source)
        if exif_transpose:
            image = ImageOps.exif_transpose(image)
        return to_rgb(image, background=background) if convert_rgb else image
    except Exception as e:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, struct.error...)
        (counter if counter is not None else default_bad_image_counter()).add(_describe(source), e)
        return None


# --------------------------------------------------------------------------------------------------------
# Datasets and collation
# --------------------------------------------------------------------------------------------------------


def list_image_files(
    root: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS, recursive: bool = True
) -> list[Path]:
    """Sorted image files under ``root`` (by extension, case-insensitive; hidden files skipped)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    exts = tuple(e.lower() for e in extensions)
    pattern = "**/*" if recursive else "*"
    files = [
        p
        for p in root.glob(pattern)
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in exts
    ]
    return sorted(files)


class ImageFileDataset(torch.utils.data.Dataset):
    """A map-style dataset of image files (or bytes) that returns ``None`` for bad items.

    ``__getitem__(i)`` returns ``{"pixel_values": transform(image)}`` (or the PIL image when ``transform`` is
    ``None``), plus ``"label"`` when labels are known, or ``None`` when item ``i`` cannot be decoded. Use it
    with :class:`SkipBadCollator` so the DataLoader drops those rows.

    Args:
        items: paths, bytes, or anything :func:`load_image` accepts.
        labels: optional integer label per item.
        transform: per-image transform (PIL RGB -> tensor), e.g. ``PretrainTransform``.
        counter: where bad images are counted (default: a fresh counter, available as ``.counter``).
        class_names: optional names for the labels.
    """

    def __init__(
        self,
        items: Sequence[ImageSource],
        labels: Sequence[int] | None = None,
        transform: Callable[[Image.Image], Any] | None = None,
        counter: BadImageCounter | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if labels is not None and len(labels) != len(items):
            raise ValueError(f"got {len(items)} items but {len(labels)} labels")
        self.items = list(items)
        self.labels = list(labels) if labels is not None else None
        self.transform = transform
        self.counter = counter if counter is not None else BadImageCounter()
        self.class_names = list(class_names) if class_names is not None else None

    @classmethod
    def from_folder(
        cls,
        root: str | os.PathLike,
        transform: Callable[[Image.Image], Any] | None = None,
        counter: BadImageCounter | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        with_labels: bool = True,
    ) -> ImageFileDataset:
        """All images under ``root``.

        With ``with_labels`` and class sub-folders (``root/<class>/...``, the ImageFolder layout), the label
        is the index of the sorted class folder and files directly in ``root`` are ignored; otherwise every
        image under ``root`` is used, without labels.
        """
        root = Path(root)
        files = list_image_files(root, extensions)
        if not files:
            raise FileNotFoundError(f"no image files with extensions {tuple(extensions)} under {root}")
        class_dirs = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
        if with_labels and class_dirs:
            index = {name: i for i, name in enumerate(class_dirs)}
            files = [p for p in files if len(p.relative_to(root).parts) > 1]
            labels = [index[p.relative_to(root).parts[0]] for p in files]
            return cls(files, labels, transform=transform, counter=counter, class_names=class_dirs)
        return cls(files, None, transform=transform, counter=counter)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        image = load_image(self.items[index], counter=self.counter)
        if image is None:
            return None
        out: dict[str, Any] = {"pixel_values": self.transform(image) if self.transform is not None else image}
        if self.labels is not None:
            out["label"] = self.labels[index]
        return out


class SafeDataset(torch.utils.data.Dataset):
    """Wrap a map-style dataset so that an exception in ``__getitem__`` yields ``None`` (counted).

    For datasets whose decoding you do not control (e.g. a ``datasets.Dataset`` with a decoding
    ``Image()`` column). Only the exception types in ``errors`` are caught, so genuine bugs can still be
    surfaced by narrowing it.
    """

    def __init__(
        self,
        dataset: Any,
        counter: BadImageCounter | None = None,
        errors: tuple[type[BaseException], ...] = (Exception,),
    ) -> None:
        self.dataset = dataset
        self.counter = counter if counter is not None else BadImageCounter()
        self.errors = errors

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except self.errors as e:
            self.counter.add(f"item {index}", e)
            return None


def is_bad_example(example: Any, keys: Sequence[str] = ("pixel_values", "image")) -> bool:
    """``True`` for ``None`` or a dict whose first present key among ``keys`` is ``None``."""
    if example is None:
        return True
    if isinstance(example, dict):
        for key in keys:
            if key in example:
                return example[key] is None
    return False


class SkipBadCollator:
    """Collator wrapper that drops bad examples before calling the real collator.

    ``__call__(list of examples) -> collate_fn(good examples)``, or ``None`` when every example of the batch
    was bad (a training loop should ``continue`` on ``None``). The wrapped collator (e.g. the multi-block
    mask collator) simply sees a smaller batch.

    Args:
        collate_fn: the real collator (default ``torch.utils.data.default_collate``).
        keys: example keys checked for ``None`` (see :func:`is_bad_example`).
    """

    def __init__(
        self,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        keys: Sequence[str] = ("pixel_values", "image"),
    ) -> None:
        self.collate_fn = collate_fn if collate_fn is not None else torch.utils.data.default_collate
        self.keys = tuple(keys)

    def __call__(self, batch: list[Any]) -> Any:
        good = [example for example in batch if not is_bad_example(example, self.keys)]
        if not good:
            return None
        return self.collate_fn(good)
