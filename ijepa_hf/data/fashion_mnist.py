"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (IDX files, no download).

Install with ``sudo apt-get install dataset-fashion-mnist``; the files land in
``/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``. Set the environment
variable ``FASHION_MNIST_DIR`` (or pass ``root=``) to read them from elsewhere; gzipped or plain IDX files
are both accepted.

IDX format: a 4-byte big-endian magic ``0x00 0x00 <type> <ndim>`` (type ``0x08`` = unsigned byte), then
``ndim`` big-endian ``int32`` sizes, then the data in C order. Every header field is validated, so a
truncated or foreign file raises :class:`IDXFormatError` instead of producing garbage.
"""

from __future__ import annotations

import gzip
import io
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FASHION_MNIST_CLASSES",
    "DEFAULT_FASHION_MNIST_DIR",
    "FASHION_MNIST_ENV_VAR",
    "IDXFormatError",
    "read_idx",
    "load_fashion_mnist",
    "fashion_mnist_dataset",
]

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV_VAR = "FASHION_MNIST_DIR"
_INSTALL_HINT = (
    "Install it with `sudo apt-get install dataset-fashion-mnist` (files go to "
    f"{DEFAULT_FASHION_MNIST_DIR}), or set {FASHION_MNIST_ENV_VAR}=/path/to/dir (or pass root=) to a folder "
    "holding {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]."
)
_SPLIT_PREFIX = {"train": "train", "test": "t10k", "t10k": "t10k"}

# IDX type codes -> numpy dtypes (big-endian where it matters).
_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}  # fmt: skip


class IDXFormatError(ValueError):
    """An IDX file is corrupt, truncated or not the expected kind."""


def read_idx(path: str | os.PathLike, expected_ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (``.gz`` or plain) into a numpy array of its native shape.

    Raises:
        FileNotFoundError: the file does not exist.
        IDXFormatError: bad gzip stream, bad magic, wrong ``ndim``, or a data size that does not match the
            header.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise IDXFormatError(f"{path}: not a valid gzip stream ({type(e).__name__}: {e})") from e
    if len(raw) < 4:
        raise IDXFormatError(f"{path}: file too short for an IDX header ({len(raw)} bytes)")
    zero, type_code, ndim = int.from_bytes(raw[0:2], "big"), raw[2], raw[3]
    if zero != 0 or type_code not in _IDX_DTYPES:
        raise IDXFormatError(
            f"{path}: bad IDX magic 0x{raw[:4].hex()} (expected 0x0000<type><ndim> with type in "
            f"{[hex(t) for t in _IDX_DTYPES]})"
        )
    if expected_ndim is not None and ndim != expected_ndim:
        raise IDXFormatError(f"{path}: IDX has {ndim} dimensions, expected {expected_ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IDXFormatError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise IDXFormatError(
            f"{path}: IDX header says shape {shape} ({expected} data bytes) but the file holds "
            f"{len(raw) - header} data bytes (truncated or corrupt)"
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def _resolve_root(root: str | os.PathLike | None) -> Path:
    if root is not None:
        return Path(root)
    return Path(os.environ.get(FASHION_MNIST_ENV_VAR) or DEFAULT_FASHION_MNIST_DIR)


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"Fashion-MNIST file {stem}[.gz] not found in {root}. {_INSTALL_HINT}")


def load_fashion_mnist(
    split: str = "train", root: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load a Fashion-MNIST split.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000; ``"t10k"`` also accepted).
        root: folder with the IDX files; default ``$FASHION_MNIST_DIR`` or
            ``/usr/share/datasets/fashion-mnist``.

    Returns:
        ``(images, labels)``: ``uint8 [N, 28, 28]`` (0 = background) and ``int64 [N]`` in ``[0, 10)``.

    Raises:
        FileNotFoundError: with the ``apt-get`` command and the env var to use.
        IDXFormatError: a corrupt file, or images/labels that do not match.
    """
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    base = _resolve_root(root)
    if not base.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST folder {base} does not exist. {_INSTALL_HINT}")
    prefix = _SPLIT_PREFIX[split]
    images = read_idx(_find(base, f"{prefix}-images-idx3-ubyte"), expected_ndim=3)
    labels = read_idx(_find(base, f"{prefix}-labels-idx1-ubyte"), expected_ndim=1)
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise IDXFormatError(f"expected unsigned-byte IDX files, got {images.dtype} images, {labels.dtype} labels")
    if images.shape[1:] != (28, 28):
        raise IDXFormatError(f"expected 28x28 images, got {images.shape[1:]}")
    if images.shape[0] != labels.shape[0]:
        raise IDXFormatError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise IDXFormatError(f"label {int(labels.max())} out of range [0, {len(FASHION_MNIST_CLASSES)})")
    return images, labels.astype(np.int64)


def fashion_mnist_dataset(
    split: str = "train",
    root: str | os.PathLike | None = None,
    rgb: bool = False,
    max_samples: int | None = None,
) -> Any:
    """Fashion-MNIST as an in-memory ``datasets.Dataset``.

    Columns: ``image`` (``datasets.Image``; PIL ``L`` mode 28x28, or ``RGB`` when ``rgb=True``) and
    ``label`` (``ClassLabel`` with :data:`FASHION_MNIST_CLASSES`). ``max_samples`` keeps the first ``n``.
    The transforms in :mod:`ijepa_hf.data.transforms` convert ``L`` to RGB themselves, so ``rgb=False``
    (3x smaller) is fine for training.
    """
    import datasets
    from PIL import Image

    images, labels = load_fashion_mnist(split, root)
    if max_samples is not None:
        images, labels = images[:max_samples], labels[:max_samples]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(FASHION_MNIST_CLASSES))}
    )

    def encode(array: np.ndarray) -> dict[str, Any]:
        # Encode ourselves with fast PNG compression (lossless either way): ~1.5x faster than letting
        # `datasets` encode PIL images with the default level, which matters for 60k images.
        image = Image.fromarray(array)  # mode "L"
        if rgb:
            image = image.convert("RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)
        return {"bytes": buffer.getvalue(), "path": None}

    column = [encode(img) for img in images]
    return datasets.Dataset.from_dict({"image": column, "label": labels.tolist()}, features=features)
