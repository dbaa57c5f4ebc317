"""The pretraining data pipeline: sample order, seeded crops, bad-image handling and the masked batch.

Everything random is a pure function of the seed and of positions, never of a global RNG or of worker timing:

* the sample order of epoch ``e`` is a permutation seeded by ``(seed, e)`` (:class:`EpochShuffleSampler`);
* the random resized crop of sample ``i`` in epoch ``e`` uses a generator seeded by ``(seed, e, i)``;
* the masks of global batch ``k`` depend only on ``(seed, k)`` (``IJepaMaskCollator``).

For map-style data the sampler hands each index to the workers as a :class:`SampleKey` ``(epoch, index, batch)``:
the epoch seeds the crop and ``batch`` (the global batch index, from the sample's position in the epoch) picks the
masks. Nothing position-dependent is then kept in a worker's copy of the dataset or collator, so workers can live
for the whole run (``persistent_workers``) and the main process still decides every epoch. Streamed data has no
sampler: its workers get the epoch when they start, and the training loop calls the collator's ``set_step``.

So a resumed run sees bitwise the same images, crops and masks as an uninterrupted one, whatever the number of
DataLoader workers, and a ``P``-process run sees those of a 1-process run with the same global batch (streamed
datasets: the order is deterministic for a fixed number of workers only). Unreadable images are counted and
skipped (:func:`~ijepa_hf.data.load_image`); a batch whose images are all bad collates to ``None``.

Images can leave the workers as ``uint8`` (``uint8_images=True``): :meth:`PretrainingData.model_inputs` finishes
them on the device, and each batch carries the seconds its worker spent making it (``LOAD_SECONDS_KEY``), from
which the loop logs what the loader can deliver beside what the step consumes.
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from .folder import BUILTIN_DATASETS, check_sample_limit, load_builtin_split, load_image_dataset
from .loading import BadImageCounter, load_image
from .procedural import ProceduralShapes
from .transforms import EvalTransform, PretrainTransform, normalize_images

__all__ = [
    "OnlineProbeSet",
    "build_online_probe_set",
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

EMBEDDED_DATASET_NAME = "procedural-shapes"
# The generator settings of the embedded dataset (:class:`~ijepa_hf.data.ProceduralShapes` keyword arguments), used
# wherever the embedded scenes are drawn: pretraining without a data argument, its online probe, the main job's probe
# and mask picture, and the built-in ``procedural_shapes`` dataset of the probe / fine-tuning examples. Every object
# of a scene shares the largest one's shape class, so a hidden object can be predicted from the visible ones, and
# objects are mid-sized (the largest one's circumscribed radius 22-35% of the image side: 5-8 patches across in the
# demo's 96 px, patch 8): with the generator's defaults (independent classes, 14-30%) the shape label stayed near
# chance for every feature set, and larger objects made it easy for random init and raw pixels alike
# (benchmarks/README.md, "Procedural scenes: the object-shape label").
EMBEDDED_SCENES: dict[str, Any] = {"shared_shape": True, "radius_range": (0.22, 0.35)}
# Generator seed of the embedded held-out scenes (`build_validation_data`): the training scenes are seed 0 and the
# main job's probe draws seeds 1 and 2, so none of these is a training or probe image.
EMBEDDED_VALIDATION_SEED = 3
# Held-out embedded scenes drawn when none are counted (--max_eval_samples).
EMBEDDED_VALIDATION_IMAGES = 256


# The ProceduralShapes arguments a scene setting may change (the rest say which images, not what they show).
_SCENE_FIELDS = ("max_objects", "min_objects", "radius_range", "noise_std", "palette", "shared_shape")


def embedded_scenes(num_images: int, image_size: int = 64, seed: int = 0, **kwargs: Any) -> ProceduralShapes:
    """The embedded dataset: ``ProceduralShapes`` with :data:`EMBEDDED_SCENES` (``kwargs`` override them)."""
    return ProceduralShapes(num_images, image_size=image_size, seed=seed, **{**EMBEDDED_SCENES, **kwargs})


def parse_embedded_scenes(text: str | None) -> dict[str, Any]:
    """``"shared_shape=false,radius_range=[0.14,0.3]"`` (``--embedded_scenes``) as ``ProceduralShapes`` keyword
    arguments that change :data:`EMBEDDED_SCENES`; ``{}`` for ``None`` / ``""``. Unknown names and invalid values
    are errors naming the field."""
    from ..configuration_ijepa_hf import parse_config_overrides

    try:
        values = parse_config_overrides(text)
    except ValueError as error:
        raise ValueError(f"--embedded_scenes: {error}") from None
    unknown = sorted(set(values) - set(_SCENE_FIELDS))
    if unknown:
        raise ValueError(f"--embedded_scenes: unknown setting(s) {unknown}; the scene settings are "
                         f"{list(_SCENE_FIELDS)} (ijepa_hf.data.ProceduralShapes).")
    if isinstance(values.get("radius_range"), list):
        values["radius_range"] = tuple(values["radius_range"])
    try:
        embedded_scenes(1, **values)  # ProceduralShapes checks every value and names it
    except (TypeError, ValueError) as error:
        raise ValueError(f"--embedded_scenes {text!r}: {error}") from None
    return values


def _mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence hashing: nearby inputs give unrelated streams)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1, np.uint64)[0]) >> 1


# The key of an example, and of a batch, that holds the seconds a worker spent loading and cropping it (and, for a
# batch, collating it): a Python float, so reading it costs no device sync. Training code pops it before the forward
# (PretrainingData.model_inputs).
LOAD_SECONDS_KEY = "load_seconds"


class SampleKey(NamedTuple):
    """What a worker needs to make one sample, decided in the main process: the ``epoch`` (seeds the crop), the
    dataset row ``index`` and the global ``batch`` index the sample belongs to (picks the masks)."""

    epoch: int
    index: int
    batch: int


class EpochShuffleSampler(Sampler[Any]):
    """A random permutation per epoch that depends only on ``(seed, epoch)`` (``shuffle=False``: the rows in order,
    as held-out images are read).

    Unlike ``RandomSampler`` it consumes no global RNG state, so the order survives a resume and is the same
    for any number of processes (Accelerate shards the batches of this order across ranks).

    With ``batch_size`` (the per-process batch) it yields :class:`SampleKey` s instead of bare indices. The global
    batch index of position ``q`` of epoch ``e`` is ``e * batches_per_epoch + q // (batch_size * num_processes)``:
    the batches of this order are dealt round-robin to the ``num_processes`` ranks and incomplete rounds are dropped
    (``drop_last``), so each rank's ``k``-th batch of an epoch holds positions of round ``k``.
    """

    def __init__(self, num_samples: int, seed: int = 0, *, batch_size: int | None = None,
                 num_processes: int = 1, shuffle: bool = True) -> None:
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        if batch_size is not None and (int(batch_size) < 1 or int(num_processes) < 1):
            raise ValueError(f"batch_size and num_processes must be >= 1, got {batch_size} and {num_processes}")
        self.batch_size = None if batch_size is None else int(batch_size)
        self.num_processes = int(num_processes)

    @property
    def batches_per_epoch(self) -> int:
        """Batches each process draws per epoch (keyed samplers only)."""
        if self.batch_size is None:
            raise ValueError("batches_per_epoch needs a batch_size")
        return self.num_samples // (self.batch_size * self.num_processes)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[Any]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch, 0x5A3))
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        if self.batch_size is None:
            return iter(order)
        epoch, round_size = self.epoch, self.batch_size * self.num_processes
        first = epoch * self.batches_per_epoch
        return (SampleKey(epoch, index, first + position // round_size) for position, index in enumerate(order))

    def __len__(self) -> int:
        return self.num_samples


class _SeededTransform:
    """The pretraining transform with its own generator, reseeded for every sample (crops depend on position,
    not on which worker or process draws them)."""

    def __init__(self, image_size: int, crop_scale: tuple[float, float], seed: int, as_uint8: bool = False) -> None:
        self.generator = torch.Generator()
        self.transform = PretrainTransform(image_size, crop_scale=crop_scale, generator=self.generator,
                                           as_uint8=as_uint8)
        self.seed = int(seed)
        self.epoch = 0

    def __call__(self, image: Any, *position: int, epoch: int | None = None) -> torch.Tensor:
        self.generator.manual_seed(_mix_seed(self.seed, self.epoch if epoch is None else epoch, *position))
        return self.transform(image)


class _CroppedImageSource:
    """What both pretraining datasets share: an image source, the bad-image counter and the seeded crop."""

    def __init__(self, source: Any, image_size: int, *, image_key: str = "image",
                 crop_scale: tuple[float, float] = (0.3, 1.0), counter: BadImageCounter | None = None,
                 seed: int = 0, uint8_images: bool = False) -> None:
        self.source = source
        self.image_key = image_key
        self.counter = counter if counter is not None else BadImageCounter()
        self.transform = _SeededTransform(image_size, crop_scale, seed, as_uint8=uint8_images)

    def set_epoch(self, epoch: int) -> None:
        self.transform.epoch = int(epoch)

    @property
    def crop_scale(self) -> tuple[float, float]:
        """The area range of the random crop, ``(min, max)``."""
        return self.transform.transform.crop.scale

    @property
    def image_statistics(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(mean, std)`` of the crops' normalisation, with which ``uint8`` images are finished
        (:func:`~ijepa_hf.data.normalize_images`)."""
        transform = self.transform.transform
        return transform.mean, transform.std


class PretrainImageDataset(_CroppedImageSource, Dataset):
    """Map-style pretraining dataset: ``source[i][image_key]`` -> ``{"pixel_values": [3, S, S]}`` or ``None``.

    ``source`` is anything indexable whose items are dicts holding an image (a PIL image, a path, bytes or a
    ``datasets`` ``{"bytes", "path"}`` dict): a ``datasets.Dataset`` with an ``Image(decode=False)`` column or
    :class:`~ijepa_hf.data.ProceduralShapes`. Unreadable images (and any error reading the row) return ``None``
    and are counted in ``counter``; the crop of item ``i`` in epoch ``e`` is seeded by ``(seed, e, i)``.

    The item is a row index (the epoch is then the one last given to ``set_epoch``) or a :class:`SampleKey`, whose
    epoch wins and whose global batch index travels with the example as ``"batch_index"`` to the collator. The
    example also says how long it took to make (``LOAD_SECONDS_KEY``).
    ``uint8_images``: ``pixel_values`` stay ``uint8`` (:func:`~ijepa_hf.data.normalize_images` finishes them).
    """

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int | SampleKey) -> dict[str, Any] | None:
        started = time.perf_counter()
        epoch, index, batch = key if isinstance(key, tuple) else (None, key, None)
        try:
            item = self.source[index][self.image_key]
        except Exception as error:  # noqa: BLE001 - a broken row must not stop a long run
            self.counter.add(f"item {index}", error)
            return None
        image = load_image(item, counter=self.counter)
        if image is None:
            return None
        example: dict[str, Any] = {"pixel_values": self.transform(image, index, epoch=epoch)}
        if batch is not None:
            example["batch_index"] = batch
        example[LOAD_SECONDS_KEY] = time.perf_counter() - started
        return example


class PretrainIterableImageDataset(_CroppedImageSource, IterableDataset):
    """Streaming counterpart of :class:`PretrainImageDataset`: bad rows are skipped (counted), crops are seeded
    by ``(seed, epoch, worker, position)``. ``set_epoch`` is forwarded to the source (HF shuffling)."""

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        started = time.perf_counter()
        for position, row in enumerate(self.source):  # HF IterableDatasets shard themselves over workers
            image = load_image(row[self.image_key], counter=self.counter)
            if image is not None:
                pixels = self.transform(image, worker, position)
                yield {"pixel_values": pixels, LOAD_SECONDS_KEY: time.perf_counter() - started}
            started = time.perf_counter()


class MaskedBatchCollator:
    """Drop bad (``None``) examples, then collate with the mask collator.

    Examples made from :class:`SampleKey` s carry their global batch index, which picks the masks. Without it the
    mask collator's own counter does; a batch with no good example then still consumes its mask index, so the masks
    of later batches do not shift (the mask stream stays a function of the batch position). The batch gets
    ``LOAD_SECONDS_KEY``, the seconds spent making it, when its examples say how long each took.
    """

    def __init__(self, mask_collator: Any) -> None:
        self.mask_collator = mask_collator

    def set_step(self, step: int) -> None:
        """Forwarded to the mask collator (so step-aligning hooks can treat both alike)."""
        self.mask_collator.set_step(step)

    def __call__(self, examples: list[Any]) -> dict[str, Any] | None:
        started = time.perf_counter()
        good = [example for example in examples if example is not None and example.get("pixel_values") is not None]
        if not good:
            self.mask_collator.sample_batch(1)  # advance a counted mask stream; result unused
            return None
        indices = {example["batch_index"] for example in good if "batch_index" in example}
        if len(indices) > 1:
            raise ValueError(f"one batch holds samples of several global batches {sorted(indices)}: the sampler's "
                             "batch_size / num_processes differ from the DataLoader's")
        batch = self.mask_collator(good, batch_index=indices.pop() if indices else None)
        made = [example[LOAD_SECONDS_KEY] for example in good if LOAD_SECONDS_KEY in example]
        if made:  # the images' making plus this collation: the seconds a worker spent on the batch
            batch[LOAD_SECONDS_KEY] = sum(made) + time.perf_counter() - started
        return batch


@dataclass
class PretrainingData:
    """The training dataset of a run and how to describe it."""

    dataset: Dataset | IterableDataset
    sampler: EpochShuffleSampler | None  # None for streamed data
    description: str  # for logs and the model card
    hub_dataset: str | None  # Hub dataset id for the card metadata
    num_images: int | None  # None for streamed data
    root: str | None = None  # the local image folder, if the data is one
    _fingerprint: dict[str, Any] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def is_embedded(self) -> bool:
        return self.description.startswith(EMBEDDED_DATASET_NAME)

    def fingerprint(self) -> dict[str, Any] | None:
        """What identifies the training images, wherever they are: for an image folder its file count and a digest
        of the files' paths relative to the folder and their sizes (so the same data staged at another path matches,
        and an added, removed, renamed or resized file does not); for a Hub dataset its name, row count and
        ``datasets`` fingerprint; for the embedded scenes their description. ``None`` for streamed data (its order
        is not a function of the files alone). Computed once (one ``stat`` per file of a folder) and cached."""
        if self.num_images is None:
            return None
        if self._fingerprint is not None:
            return self._fingerprint
        source = self.dataset.source
        if self.root is not None:
            import hashlib
            import os

            digest = hashlib.sha256()
            root = os.path.abspath(self.root)
            entries = []
            for start in range(0, len(source), 10_000):
                for item in source[start:start + 10_000][self.dataset.image_key]:
                    path = item.get("path") if isinstance(item, dict) else item
                    entries.append((os.path.relpath(os.path.abspath(path), root), os.stat(path).st_size))
            for relative, size in sorted(entries):
                digest.update(f"{relative}\0{size}\n".encode())
            found = {"kind": "image folder", "files": len(entries), "digest": digest.hexdigest()}
        elif self.is_embedded:
            found = {"kind": "embedded", "description": self.description}
        else:
            found = {"kind": "dataset", "name": self.hub_dataset, "rows": self.num_images,
                     "datasets_fingerprint": getattr(source, "_fingerprint", None)}
        self._fingerprint = found
        return found

    def dataloader(self, batch_size: int, collate_fn: Any, *, num_workers: int = 0, prefetch_factor: int | None = None,
                   pin_memory: bool = False, worker_init_fn: Any = None) -> DataLoader:
        """The run's ``DataLoader`` (complete batches only). Workers persist across epochs when the data is map-style:
        its samples' keys carry the epoch and mask index, so nothing has to reach the workers at an epoch start. A
        stream's workers take the epoch when they start, so they are started anew each epoch. ``pin_memory``:
        page-locked batches, whose copies to a CUDA device can be non-blocking.

        The loader draws its workers' base seed from a generator of its own, not from torch's global one: a step
        that draws random numbers (DropPath, SIGReg's directions) then sees the same global stream in a resumed run,
        whose epoch iterator is made after the checkpoint's generator state is restored, as in the uninterrupted
        run, whose iterator was made at the epoch's start. The crops and masks do not depend on that seed."""
        return DataLoader(
            self.dataset, batch_size=batch_size, sampler=self.sampler, drop_last=True, collate_fn=collate_fn,
            num_workers=num_workers, pin_memory=pin_memory,
            persistent_workers=num_workers > 0 and self.num_images is not None,
            prefetch_factor=prefetch_factor if num_workers > 0 else None, worker_init_fn=worker_init_fn,
            generator=torch.Generator().manual_seed(0),
        )

    def model_inputs(self, batch: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        """A collated batch (already on the device) as the model's keyword arguments: its ``uint8`` images finished
        there with the transform's mean and std, ``LOAD_SECONDS_KEY`` removed. Returns ``batch`` itself."""
        batch.pop(LOAD_SECONDS_KEY, None)
        batch["pixel_values"] = normalize_images(batch["pixel_values"], *self.dataset.image_statistics)
        return batch


def build_pretraining_data(
    *,
    image_size: int,
    seed: int = 0,
    crop_scale: tuple[float, float] = (0.3, 1.0),
    counter: BadImageCounter | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    image_column_name: str | None = None,
    dataset_split: str = "train",
    streaming: bool = False,
    shuffle_buffer_size: int = 1000,
    max_train_samples: int | None = None,
    embedded_num_images: int = 4096,
    embedded_scene_settings: dict[str, Any] | None = None,
    embedded_seed: int = 0,
    cache_dir: str | None = None,
    token: str | None = None,
    uint8_images: bool = False,
    batch_size: int | None = None,
    num_processes: int = 1,
    shuffle: bool = True,
) -> PretrainingData:
    """The pretraining dataset: a Hub dataset / builder (``dataset_name``), an image folder (``train_dir``), or
    without either the embedded procedural scenes (rendered at ``image_size``, :data:`EMBEDDED_SCENES` changed by
    ``embedded_scene_settings``; their generator seed ``embedded_seed`` is apart from ``seed``, so that ``seed``
    varies only the training).

    ``uint8_images``: the workers return ``uint8`` images for :meth:`PretrainingData.model_inputs` to finish on
    the device. ``batch_size`` (per process) and ``num_processes``: the sampler of map-style data yields
    :class:`SampleKey` s for that batch layout (see :class:`EpochShuffleSampler`); ``shuffle=False`` keeps the rows
    in order (held-out images, :func:`build_validation_data`)."""
    check_sample_limit(max_train_samples, "max_train_samples")
    counter = counter if counter is not None else BadImageCounter()
    common = dict(image_size=image_size, crop_scale=crop_scale, counter=counter, seed=seed, uint8_images=uint8_images)
    keyed = dict(batch_size=batch_size, num_processes=num_processes, shuffle=shuffle)
    if dataset_name is None and train_dir is None:
        num = min(embedded_num_images, max_train_samples or embedded_num_images)
        source = embedded_scenes(num, image_size=image_size, seed=embedded_seed, **(embedded_scene_settings or {}))
        scenes = f"generator seed {embedded_seed}, " if embedded_seed else ""  # other scenes than the training ones
        if embedded_scene_settings:  # named in the description, which is also the data's fingerprint on resume
            scenes += "scenes changed: " + ", ".join(f"{key}={value}" for key, value in
                                                     sorted(embedded_scene_settings.items())) + ", "
        return PretrainingData(PretrainImageDataset(source, **common), EpochShuffleSampler(num, seed, **keyed),
                               f"{EMBEDDED_DATASET_NAME} (embedded, {scenes}{num} images at {image_size}px)", None, num)
    if dataset_name in BUILTIN_DATASETS:
        source = _builtin_source(dataset_name, dataset_split, max_train_samples, streaming)
    else:
        source = load_image_dataset(
            dataset_name=dataset_name, train_dir=train_dir, streaming=streaming, image_column=image_column_name,
            split=dataset_split, dataset_config_name=dataset_config_name, cache_dir=cache_dir, token=token,
            max_samples=max_train_samples, decode=False,
        )
    name = dataset_name if dataset_name not in (None, "imagefolder") else None
    description = name or f"image folder {train_dir}"
    if name is not None and dataset_split != "train":  # e.g. the held-out split of build_validation_data
        description += f", split {dataset_split!r}"
    if streaming:
        if shuffle_buffer_size > 0:
            source = source.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
        return PretrainingData(PretrainIterableImageDataset(source, **common), None, f"{description} (streamed)",
                               name, None)
    local = train_dir if dataset_name in (None, "imagefolder") else None
    return PretrainingData(PretrainImageDataset(source, **common), EpochShuffleSampler(len(source), seed, **keyed),
                           f"{description} ({len(source)} images)", name, len(source), local)


def _builtin_source(name: str, split: str, max_samples: int | None, streaming: bool) -> Any:
    """A :data:`BUILTIN_DATASETS` dataset's split, read without the Hub, as the probes and fine-tuning read it."""
    if name == "procedural_shapes":
        raise ValueError("procedural_shapes is the embedded data, which pretraining takes without --dataset_name "
                         "(--embedded_scenes changes its scenes, --embedded_num_images its size); drop --dataset_name")
    if streaming:
        raise ValueError(f"{name} is read from local files into memory, not streamed: drop --streaming")
    return load_builtin_split(name, split, max_samples=max_samples)


def build_validation_data(
    *,
    image_size: int,
    seed: int = 0,
    crop_scale: tuple[float, float] = (0.3, 1.0),
    counter: BadImageCounter | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    validation_dir: str | None = None,
    validation_split_name: str | None = None,
    image_column_name: str | None = None,
    max_eval_samples: int | None = None,
    embedded_scene_settings: dict[str, Any] | None = None,
    cache_dir: str | None = None,
    token: str | None = None,
    uint8_images: bool = False,
    batch_size: int | None = None,
    num_processes: int = 1,
) -> PretrainingData:
    """The held-out images of a run's ``eval_loss``: an image folder (``validation_dir``), a split of the training
    dataset (``validation_split_name``), or for the embedded scenes their generator's seed
    :data:`EMBEDDED_VALIDATION_SEED`. Read in order (``shuffle=False``) with the training crop and masks, both
    picked by each image's position and the run's ``seed``: every evaluation sees the same inputs, so two
    evaluations of the same weights give the same loss. Training images are never taken for it: data with no
    held-out images named is refused, naming the options that name them."""
    check_sample_limit(max_eval_samples, "max_eval_samples")
    if validation_dir is not None and validation_split_name is not None:
        raise ValueError("give either --validation_dir (an image folder) or --validation_split_name (a split of "
                         "--dataset_name) for the held-out images, not both")
    if validation_split_name is not None and dataset_name is None:
        raise ValueError(f"--validation_split_name {validation_split_name!r} names a split of --dataset_name, but "
                         "no --dataset_name is given; name a folder of held-out images with --validation_dir")
    embedded = dataset_name is None and train_dir is None
    if validation_dir is None and validation_split_name is None and not embedded:
        raise ValueError("the held-out loss (eval_loss) needs images the run does not train on: name a folder with "
                         "--validation_dir, or a split of --dataset_name with --validation_split_name (e.g. "
                         "'validation' or 'test')")
    common = dict(image_size=image_size, seed=seed, crop_scale=crop_scale, counter=counter, cache_dir=cache_dir,
                  token=token, uint8_images=uint8_images, batch_size=batch_size, num_processes=num_processes,
                  image_column_name=image_column_name, max_train_samples=max_eval_samples, shuffle=False)
    if embedded and validation_dir is None:
        data = build_pretraining_data(embedded_num_images=max_eval_samples or EMBEDDED_VALIDATION_IMAGES,
                                      embedded_scene_settings=embedded_scene_settings,
                                      embedded_seed=EMBEDDED_VALIDATION_SEED, **common)
    elif validation_dir is not None:
        data = build_pretraining_data(train_dir=validation_dir, **common)
    else:
        data = build_pretraining_data(dataset_name=dataset_name, dataset_config_name=dataset_config_name,
                                      dataset_split=validation_split_name, **common)
    batch = (batch_size or 1) * num_processes
    if data.num_images is not None and data.num_images < batch:
        raise ValueError(f"the held-out images ({data.description}) are fewer than one evaluation batch of {batch} "
                         "(the per-device eval batch times the processes); give more images or a smaller "
                         "--per_device_eval_batch_size")
    return data


@dataclass
class OnlineProbeSet:
    """A fixed labelled subset of the data for the online k-NN of a run (``ijepa_hf.training.metrics.online_probe``).

    ``pixel_values [N, C, S, S]`` (the deterministic evaluation transform: resized to ``S``, no crop) and
    ``labels [N]``; the first half is the k-NN's memory bank, the second half its queries, so every query is held
    out of the bank. Pretraining never sees the labels.
    """

    pixel_values: torch.Tensor
    labels: torch.Tensor
    label_name: str
    description: str


def _is_class_label(value: Any) -> bool:
    """An integer class id or a class name; not a measurement (a non-integer number) or a structure."""
    if isinstance(value, (str, bool, numbers.Integral)):
        return True
    return isinstance(value, numbers.Real) and float(value).is_integer()


def build_online_probe_set(
    data: PretrainingData, *, image_size: int, num_images: int, label_column: str | None = None, seed: int = 0
) -> OnlineProbeSet | None:
    """``num_images`` labelled images of the run's data for the online k-NN, or ``None`` when the data has no labels.

    ``label_column``: the label of each row (``None``: ``"label"`` when the rows have one: image folders with class
    sub-folders, Hub datasets with a ``label`` column, and the embedded scenes, whose ``label`` is the class of the
    largest shape). Naming a column the rows do not have is an error. The images are a seeded sample of the
    dataset (for streamed data, its first rows); unreadable ones are skipped.
    """
    if num_images < 2:
        raise ValueError(f"--online_probe_images must be >= 2 (a bank and queries), got {num_images}.")
    source = data.dataset.source
    image_key = data.dataset.image_key
    if data.num_images is not None:
        order = torch.randperm(data.num_images, generator=torch.Generator().manual_seed(seed)).tolist()
        rows: Any = (source[index] for index in order)
    else:
        rows = iter(source)
    transform = EvalTransform(image_size, resize_ratio=1.0)
    pixels, labels = [], []
    classes: dict[Any, int] = {}
    name = label_column
    for row in rows:
        if name is None:
            if "label" not in row:
                return None
            name = "label"
        if name not in row:
            raise ValueError(f"--online_probe_label_column {name!r} is not a column of the data (it has "
                             f"{sorted(row)}); name one of them, or leave it unset to use 'label'.")
        label = row[name]
        if label is not None and not _is_class_label(label):
            raise ValueError(f"--online_probe_label_column {name!r} holds {label!r}: the online k-NN needs class "
                             "labels (integers or names); name a column of classes, or set --online_probe_steps 0.")
        image = load_image(row[image_key])
        if image is None or label is None:
            continue
        pixels.append(transform(image))
        labels.append(classes.setdefault(label, len(classes)))  # class names or ids -> 0..C-1, in order seen
        if len(pixels) == num_images:
            break
    if len(pixels) < 2:
        return None
    return OnlineProbeSet(torch.stack(pixels), torch.tensor(labels), name,
                          f"{len(pixels)} images of the training data, labels {name!r}")
