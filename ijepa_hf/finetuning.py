"""Helpers for fine-tuning image classifiers (I-JEPA or any ViT-style transformers model) with `Trainer`.

* :func:`layerwise_lr_groups` / :func:`build_layerwise_optimizer`: layer-wise learning-rate decay (BEiT/MAE
  fine-tuning recipe): block ``i`` of a depth-``L`` encoder trains at ``lr * decay ** (L - i)``, the patch
  embedding at ``lr * decay ** (L + 1)``, the final norm and the head at ``lr``. Pass the optimizer to
  ``Trainer(optimizers=(optimizer, None))``; Trainer's scheduler multiplies every group's own lr, so the ratios
  hold for the whole run.
* :class:`FinetuneTrainTransform` and :func:`make_finetune_transforms`: torchvision-free training (random
  resized crop + horizontal flip + normalise) and evaluation (resize + centre crop + normalise) transforms.
* :func:`load_accuracy_metric`: ``evaluate.load("accuracy")`` when it can be loaded, else :class:`LocalAccuracy`
  (same ``compute(predictions=, references=)`` interface), which is what happens offline; and
  :func:`make_compute_metrics` for `Trainer`.
* :func:`classification_collate`: stacks ``pixel_values`` and ``labels`` and drops unreadable images.
* :func:`load_labeled_splits`: train/validation ``datasets`` splits with one consistent ``ClassLabel`` column,
  from an image folder, the Hub, or the embedded ``procedural_shapes`` / local ``fashion_mnist`` data (shared by
  the fine-tuning and probing examples).
* :func:`finetune_run_settings`: what defines a fine-tuning run, recorded in its checkpoints so that resuming under
  other settings is refused (``ijepa_hf.training.resume.check_trainer_resume_compatible``).
* :class:`FinetuningTrainer` and :func:`finetuned_classifier_card`: the run's model card is the package's classifier
  card (what it started from, its data, recipe and measured accuracy) rather than Trainer's generated draft.

Loading the classifier to fine-tune is :func:`ijepa_hf.loading.load_image_classifier`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import Trainer

from .cards import make_model_card, summarize_config
from .data import (BUILTIN_DATASETS, IMAGENET_MEAN, IMAGENET_STD, EvalTransform, RandomResizedCrop,
                   check_sample_limit, load_builtin_split, normalize, pil_to_tensor, to_rgb)
from .licensing import WeightsLicense, _is_hub_id
from .modeling_ijepa_hf import is_no_decay_param

logger = logging.getLogger(__name__)

__all__ = [
    "parameter_layer_id",
    "layerwise_lr_groups",
    "build_layerwise_optimizer",
    "FinetuneTrainTransform",
    "make_finetune_transforms",
    "processor_image_size",
    "LocalAccuracy",
    "load_accuracy_metric",
    "make_compute_metrics",
    "classification_collate",
    "BUILTIN_DATASETS",
    "DEFAULT_TRAIN_VAL_SPLIT",
    "load_builtin_split",
    "load_labeled_splits",
    "finetune_run_settings",
    "describe_initialisation",
    "finetuned_classifier_card",
    "FinetuningTrainer",
]

# One stack of transformer blocks: ours (`blocks.3.`), transformers' ViT/I-JEPA in memory (`layers.3.`) and
# on disk / older models (`encoder.layer.3.`).
_BLOCK_PATTERN = re.compile(r"(?:^|\.)(?:blocks|layers|layer)\.(\d+)(?:\.|$)")
# Everything that comes before the first block.
_EMBEDDING_PATTERN = re.compile(
    r"(?:^|\.)(?:patch_embed|pos_embed|embeddings|cls_token|mask_token|register_tokens)(?:\.|$)"
)
# Position tables and special tokens are not decayed in the MAE/BEiT fine-tuning recipes (they are not weights
# of a linear map; shrinking them only erases information), on top of the usual biases and norm weights.
_NO_DECAY_PATTERN = re.compile(r"(?:^|\.)(?:pos_embed|position_embeddings|cls_token|mask_token|register_tokens)$")


# ----------------------------------------------------------------------------------------------------------------
# Layer-wise learning-rate decay
# ----------------------------------------------------------------------------------------------------------------


def parameter_layer_id(name: str, num_layers: int) -> int:
    """Depth of a parameter for layer-wise lr decay: 0 for the embeddings, ``i + 1`` for block ``i``, and
    ``num_layers + 1`` for everything after the blocks (final norm, pooler, classification head)."""
    if _EMBEDDING_PATTERN.search(name):
        return 0
    match = _BLOCK_PATTERN.search(name)
    if match:
        return min(int(match.group(1)), num_layers - 1) + 1
    return num_layers + 1


def _num_layers(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for attribute in ("num_hidden_layers", "depth", "num_layers"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    blocks = [int(m.group(1)) for name, _ in model.named_parameters() if (m := _BLOCK_PATTERN.search(name))]
    if not blocks:
        raise ValueError(
            f"cannot find the depth of {type(model).__name__}: no `config.num_hidden_layers` and no parameters "
            "named like `blocks.<i>.` / `layers.<i>.`; pass num_layers=."
        )
    return max(blocks) + 1


def layerwise_lr_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    layer_decay: float,
    *,
    num_layers: int | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with layer-wise learning-rate decay.

    With ``L = num_layers`` blocks (default ``model.config.num_hidden_layers``), a parameter at depth ``d``
    (:func:`parameter_layer_id`: 0 = patch/position embeddings, ``i + 1`` = block ``i``, ``L + 1`` = final
    norm and head) gets ``lr * layer_decay ** (L + 1 - d)``: block ``i`` -> ``lr * decay ** (L - i)``, the
    embeddings the smallest lr, the head the full ``lr``. ``layer_decay = 1`` gives one lr everywhere.

    Weight decay applies to weight matrices only: biases, 1-D parameters (norms) and position tables / special
    tokens get 0. Frozen parameters are left out.

    Returns:
        Groups from the head down to the embeddings (so the first group, whose lr `Trainer` logs, has the full
        ``lr``), each ``{"params", "lr", "weight_decay", "lr_scale", "layer_id", "group_name"}``
        (``group_name`` like ``"layer_3.decay"``), ready for ``torch.optim.AdamW``.
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}.")
    num_layers = num_layers if num_layers is not None else _num_layers(model)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer_id = parameter_layer_id(name, num_layers)
        no_decay = is_no_decay_param(name, param) or bool(_NO_DECAY_PATTERN.search(name))
        key = (layer_id, no_decay)
        if key not in groups:
            scale = layer_decay ** (num_layers + 1 - layer_id)
            groups[key] = {
                "params": [],
                "lr": lr * scale,
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": scale,
                "layer_id": layer_id,
                "group_name": f"layer_{layer_id}.{'no_decay' if no_decay else 'decay'}",
            }
        groups[key]["params"].append(param)
    if not groups:
        raise ValueError("the model has no trainable parameters.")
    return [groups[key] for key in sorted(groups, key=lambda key: (-key[0], key[1]))]


def build_layerwise_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.05,
    layer_decay: float = 0.75,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    num_layers: int | None = None,
) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over :func:`layerwise_lr_groups` (for ``Trainer(optimizers=(optimizer, None))``)."""
    groups = layerwise_lr_groups(model, lr, weight_decay, layer_decay, num_layers=num_layers)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


# ----------------------------------------------------------------------------------------------------------------
# Transforms and collation
# ----------------------------------------------------------------------------------------------------------------


class FinetuneTrainTransform:
    """Random resized crop -> random horizontal flip -> to-tensor -> normalise (the usual fine-tuning recipe,
    without torchvision). ``__call__(PIL.Image) -> FloatTensor [3, S, S]``; the flip uses torch's global RNG
    (seeded by ``Trainer`` and DataLoader workers) like torchvision."""

    def __init__(
        self,
        image_size: int,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        flip_probability: float = 0.5,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        interpolation: str = "bicubic",
    ) -> None:
        self.crop = RandomResizedCrop(image_size, scale=crop_scale, interpolation=interpolation)
        self.flip_probability = float(flip_probability)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = self.crop(to_rgb(image) if image.mode != "RGB" else image)
        if torch.rand(()).item() < self.flip_probability:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return normalize(pil_to_tensor(image), self.mean, self.std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(crop={self.crop!r}, flip_probability={self.flip_probability})"


def processor_image_size(image_processor: Any) -> int:
    """The square input side an image processor produces (``crop_size``, else ``size``)."""
    for attribute in ("crop_size", "size"):
        size = getattr(image_processor, attribute, None)
        if isinstance(size, int):
            return size
        # A dict in older processors, a `SizeDict` (attributes) in transformers 5.
        for key in ("height", "shortest_edge"):
            value = size.get(key) if isinstance(size, Mapping) else getattr(size, key, None)
            if value:
                return int(value)
    raise ValueError(f"cannot read an image size from {type(image_processor).__name__}; pass image_size=.")


def make_finetune_transforms(
    image_processor: Any | None = None,
    *,
    image_size: int | None = None,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    eval_resize_ratio: float = 1.0,
) -> tuple[FinetuneTrainTransform, EvalTransform]:
    """Training and evaluation transforms matching an image processor's size and normalisation.

    Training: :class:`FinetuneTrainTransform`. Evaluation: shorter side resized to
    ``image_size * eval_resize_ratio`` then centre-cropped to ``image_size`` (1.0 by default; the ImageNet
    protocol uses 256/224). Mean and std come from the processor (ImageNet when it has none).
    """
    if image_size is None:
        if image_processor is None:
            raise ValueError("give an image_processor or image_size.")
        image_size = processor_image_size(image_processor)
    mean = getattr(image_processor, "image_mean", None) or IMAGENET_MEAN
    std = getattr(image_processor, "image_std", None) or IMAGENET_STD
    train = FinetuneTrainTransform(image_size, crop_scale=crop_scale, mean=mean, std=std)
    evaluation = EvalTransform(image_size, resize_ratio=eval_resize_ratio, mean=mean, std=std)
    return train, evaluation


def classification_collate(examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """``[{"pixel_values": [3, H, W] or None, "label": int}, ...]`` -> ``{"pixel_values": [B, 3, H, W],
    "labels": [B]}``. Rows whose image could not be read (``pixel_values=None``, see
    `ijepa_hf.data.set_image_transform`) are dropped."""
    good = [example for example in examples if example.get("pixel_values") is not None]
    if not good:
        raise ValueError("every image of this batch was unreadable; check the dataset files.")
    label_key = "labels" if "labels" in good[0] else "label"
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in good]),
        "labels": torch.tensor([int(example[label_key]) for example in good], dtype=torch.long),
    }


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------


class LocalAccuracy:
    """Drop-in for ``evaluate.load("accuracy")`` that needs no download (and no scikit-learn).

    ``compute(predictions=[...], references=[...], normalize=True, sample_weight=None) -> {"accuracy": x}``;
    ``add_batch`` accumulates like an ``evaluate`` module, then ``compute()`` uses what was added.
    """

    name = "accuracy"

    def __init__(self) -> None:
        self._predictions: list[np.ndarray] = []
        self._references: list[np.ndarray] = []

    def add_batch(self, *, predictions: Any, references: Any) -> None:
        self._predictions.append(np.asarray(predictions).reshape(-1))
        self._references.append(np.asarray(references).reshape(-1))

    def compute(
        self,
        *,
        predictions: Any = None,
        references: Any = None,
        normalize: bool = True,
        sample_weight: Any = None,
    ) -> dict[str, float]:
        if predictions is None and references is None:
            if not self._predictions:
                raise ValueError("nothing to compute: pass predictions/references or call add_batch first.")
            predictions, references = np.concatenate(self._predictions), np.concatenate(self._references)
            self._predictions, self._references = [], []
        predictions = np.asarray(predictions).reshape(-1)
        references = np.asarray(references).reshape(-1)
        if predictions.shape != references.shape:
            raise ValueError(f"{predictions.shape[0]} predictions but {references.shape[0]} references.")
        weights = np.ones(len(predictions)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
        correct = float(((predictions == references) * weights).sum())
        if not normalize:
            return {"accuracy": correct}
        return {"accuracy": correct / float(weights.sum()) if len(predictions) else float("nan")}


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def load_accuracy_metric(prefer_local: bool = False) -> Any:
    """``evaluate.load("accuracy")`` if it loads, else :class:`LocalAccuracy`.

    The Hub metric is a Space, so offline (or without scikit-learn, which it imports) loading fails; we catch
    that and fall back. With ``HF_HUB_OFFLINE=1`` evaluate is told to stay offline too (it only reads its own
    ``HF_EVALUATE_OFFLINE``), so it answers from its cache at once instead of waiting on network timeouts.
    ``prefer_local=True`` skips evaluate altogether.
    """
    if prefer_local:
        return LocalAccuracy()
    try:
        import evaluate
        from evaluate import config as evaluate_config

        saved = evaluate_config.HF_EVALUATE_OFFLINE
        evaluate_config.HF_EVALUATE_OFFLINE = saved or _offline()
        try:
            return evaluate.load("accuracy")
        finally:
            evaluate_config.HF_EVALUATE_OFFLINE = saved
    except Exception as error:  # noqa: BLE001 - FileNotFoundError offline, ImportError without sklearn, ...
        logger.info("evaluate.load('accuracy') failed (%s: %s); using the local accuracy.", type(error).__name__, error)
        return LocalAccuracy()


def make_compute_metrics(metric: Any | None = None) -> Callable[[Any], dict[str, float]]:
    """A `Trainer` ``compute_metrics``: argmax of the logits vs. the labels, scored by ``metric``
    (default :func:`load_accuracy_metric`)."""
    metric = metric if metric is not None else load_accuracy_metric()

    def compute_metrics(eval_prediction: Any) -> dict[str, float]:
        logits = eval_prediction.predictions
        logits = logits[0] if isinstance(logits, tuple) else logits
        return metric.compute(predictions=np.argmax(logits, axis=-1), references=eval_prediction.label_ids)

    return compute_metrics


# ----------------------------------------------------------------------------------------------------------------
# Labelled data and models
# ----------------------------------------------------------------------------------------------------------------

DEFAULT_TRAIN_VAL_SPLIT = 0.15  # held out of train where the data has no validation images (as transformers' example)


def _check_split_unused(train_val_split: float | None, why: str) -> None:
    if train_val_split is not None:
        raise ValueError(f"train_val_split={train_val_split} asks to hold out part of the training images, but "
                         f"{why}, which is used for validation: drop train_val_split (--train_val_split), or give "
                         "only training data to hold a fraction of it out.")


def _builtin_splits(name: str, max_train: int | None, max_eval: int | None, image_size: int, seed: int) -> Any:
    import datasets

    return datasets.DatasetDict(
        train=load_builtin_split(name, "train", max_samples=max_train, image_size=image_size, seed=seed),
        validation=load_builtin_split(name, "test", max_samples=max_eval, image_size=image_size, seed=seed))


def _load_split(split: str, **kwargs: Any) -> Any | None:
    """One split through `load_image_dataset`, or ``None`` when the dataset has no such split."""
    from .data import load_image_dataset

    try:
        return load_image_dataset(split=split, **kwargs)
    except ValueError as error:  # datasets: 'Unknown split "validation". Should be one of [...]'
        if "split" not in str(error).lower():
            raise
        return None


def load_labeled_splits(
    *,
    dataset_name: str | None = None,
    train_dir: str | None = None,
    validation_dir: str | None = None,
    dataset_config_name: str | None = None,
    train_val_split: float | None = None,
    image_column: str | None = None,
    label_column: str = "label",
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 0,
    procedural_image_size: int = 64,
    **load_kwargs: Any,
) -> Any:
    """Train and validation splits of a labelled image dataset.

    Sources: ``dataset_name`` in :data:`BUILTIN_DATASETS`; a Hub dataset; a local ``train_dir`` (imagefolder:
    class sub-folders become labels); with ``validation_dir`` for the validation images. Without a
    validation source, the Hub's ``validation`` (else ``test``) split is used, else ``train_val_split`` of the
    training set is held out (stratified when possible; default :data:`DEFAULT_TRAIN_VAL_SPLIT`).
    ``train_val_split`` given where the data has validation images of its own is an error: it would not be applied.

    Returns:
        ``datasets.DatasetDict(train=..., validation=...)`` with an ``image`` column and a ``label`` column
        that is a ``ClassLabel`` shared by both splits (string or integer labels are encoded). The validation
        split's ``info.description`` says where its images come from (the run's model card quotes it).
        ``load_kwargs`` (``cache_dir``, ``token``, ...) go to `ijepa_hf.data.load_image_dataset`.
    """
    import datasets

    check_sample_limit(max_train_samples, "max_train_samples")
    check_sample_limit(max_eval_samples, "max_eval_samples")
    if train_val_split is not None and not 0.0 < train_val_split < 1.0:
        raise ValueError(f"train_val_split={train_val_split} is not in (0, 1): it is the fraction of the training "
                         "images held out for validation.")
    if dataset_name in BUILTIN_DATASETS:
        _check_split_unused(train_val_split, f"{dataset_name} has a held-out split of its own")
        splits = _builtin_splits(dataset_name, max_train_samples, max_eval_samples, procedural_image_size, seed)
        splits["validation"].info.description = f"of the 'test' split of {dataset_name}"
        return splits
    common = dict(dataset_config_name=dataset_config_name, image_column=image_column, **load_kwargs)
    train = _load_split("train", dataset_name=dataset_name, train_dir=train_dir, **common)
    if train is None:
        raise ValueError(f"{dataset_name or train_dir} has no 'train' split.")
    validation, validation_source = None, None
    if validation_dir is not None:
        validation = _load_split("train", train_dir=validation_dir, **common)
        validation_source, description = "validation_dir is given", "of the validation folder (validation_dir)"
    elif train_dir is None:
        for split in ("validation", "test"):
            validation = _load_split(split, dataset_name=dataset_name, **common)
            if validation is not None:
                validation_source = f"{dataset_name} has a {split!r} split"
                description = f"of the {split!r} split of {dataset_name}"
                break

    def prepare(dataset: Any) -> Any:
        if label_column not in dataset.column_names:
            raise ValueError(
                f"label column {label_column!r} not found in {dataset.column_names}; name one of them with "
                "label_column= (--label_column_name in the example scripts); an image folder needs one sub-folder "
                "per class."
            )
        if label_column != "label":
            dataset = dataset.remove_columns([c for c in ["label"] if c in dataset.column_names])
            dataset = dataset.rename_column(label_column, "label")
        return dataset.select_columns(["image", "label"])

    train = prepare(train)
    if not isinstance(train.features["label"], datasets.ClassLabel):
        train = train.class_encode_column("label")
    if validation is None:
        train_val_split = DEFAULT_TRAIN_VAL_SPLIT if train_val_split is None else train_val_split
        how = "stratified by class"
        try:
            splits = train.train_test_split(test_size=train_val_split, seed=seed, stratify_by_column="label")
        except ValueError:  # a class too small to stratify
            splits, how = train.train_test_split(test_size=train_val_split, seed=seed), "not stratified"
        train, validation = splits["train"], splits["test"]
        description = f"held out of the training images (train_val_split {train_val_split:g}, seed {seed}, {how})"
    else:
        _check_split_unused(train_val_split, validation_source)
        # Cast, not re-encode: the validation ids must follow the training names.
        validation = prepare(validation).cast_column("label", train.features["label"])
    if max_train_samples is not None:
        train = train.select(range(min(max_train_samples, len(train))))
    if max_eval_samples is not None:
        validation = validation.select(range(min(max_eval_samples, len(validation))))
    validation.info.description = description
    return datasets.DatasetDict(train=train, validation=validation)


def finetune_run_settings(training_args: Any, *, layer_decay: float | None, min_crop_scale: float,
                          train_dataset: Any) -> dict[str, Any]:
    """What defines a fine-tuning run, for :class:`~ijepa_hf.training.resume.RunSettingsCallback`: the Trainer's
    settings (:func:`~ijepa_hf.training.resume.trainer_run_settings`), the label smoothing, the layer decay, the
    crop, and what identifies the training images without their path (their number and the class names: the same
    images staged elsewhere resume). Trainer restores a checkpoint's optimizer and scheduler over new ones, so a
    resume under another learning rate or layer decay would go on with the checkpoint's without a word."""
    from .training.resume import trainer_run_settings

    return {**trainer_run_settings(training_args), "label_smoothing_factor": training_args.label_smoothing_factor,
            "layer_decay": layer_decay, "min_crop_scale": min_crop_scale,
            "data": {"images": len(train_dataset), "classes": list(train_dataset.features["label"].names)}}


# ----------------------------------------------------------------------------------------------------------------
# The fine-tuned model's card


def describe_initialisation(model_name_or_path: str, encoder: str = "target", **hub_kwargs: Any) -> str:
    """What a fine-tuning run starts from, as its card names it: the kind of model (an I-JEPA encoder, one encoder
    of a pretraining model, an image classifier, another transformers model) and where it is: its Hub
    repo, or a local folder by its name only (the author's path says nothing to a reader of the card)."""
    from .pretrained_loading import repo_config

    repo = repo_config(model_name_or_path, dict(hub_kwargs))
    model_type, architectures = repo.get("model_type"), repo.get("architectures") or []
    classifiers = [name for name in architectures if name.endswith("ForImageClassification")]
    if classifiers:
        kind = f"an image classifier (`{classifiers[0]}`)"
    elif model_type == "ijepa_hf_pretraining":
        kind = f"the {encoder} encoder of an I-JEPA pretraining model"
    elif model_type in ("ijepa_hf_encoder", "ijepa"):
        kind = "an I-JEPA encoder"
    else:
        kind = f"a `{model_type}` model" if model_type else "a model"
    path = str(model_name_or_path)
    return f"{kind}: " + (f"`{path}`" if _is_hub_id(path) else f"the local folder `{Path(path).name}`")


def _plural(count: int, noun: str, plural: str | None = None) -> str:
    return f"{count:,} " + (noun if count == 1 else plural or f"{noun}s")


def _recipe_rows(trainer: Trainer, initialised_from: str, dataset_name: str | None, train_dataset: Any, *,
                 layer_decay: float | None, min_crop_scale: float, eval_resize_ratio: float) -> dict[str, Any]:
    """The training table of a fine-tuning run's card (:func:`finetuned_classifier_card`)."""
    from .training.export import batch_summary, final_loss_summary

    args, state = trainer.args, trainer.state
    classes = train_dataset.features["label"].names
    optim = getattr(args.optim, "value", args.optim)
    if layer_decay is not None:  # build_layerwise_optimizer's AdamW (finetune.py refuses another --optim with it)
        optimiser = (f"AdamW (betas {args.adam_beta1:g}, {args.adam_beta2:g}), weight decay {args.weight_decay:g}, "
                     f"layer-wise learning-rate decay {layer_decay:g}")
    else:
        betas = f", betas {args.adam_beta1:g}, {args.adam_beta2:g}" if "adam" in optim else ""
        optimiser = (f"`{optim}` (Trainer's --optim){betas}, weight decay {args.weight_decay:g}, one learning rate "
                     "for all parameters")
    scheduler = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    warmup = args.get_warmup_steps(state.max_steps)
    return {
        "initialised_from": initialised_from,
        "data": f"{dataset_name or 'a local image folder'}: {_plural(len(train_dataset), 'training image')}, "
                f"{_plural(len(classes), 'class', 'classes')}",
        "image_size": processor_image_size(trainer.processing_class),
        "augmentations": f"random resized crop ({min_crop_scale:g}, 1.0) and horizontal flip; evaluation: the "
                         f"shorter side resized to {eval_resize_ratio:g} x the image size, centre crop",
        "steps": str(state.global_step),
        "epochs": round(state.epoch or 0.0, 2),
        "batch_size": batch_summary(args.per_device_train_batch_size, args.world_size,
                                    args.gradient_accumulation_steps),
        "optimizer": optimiser,
        "lr_schedule": f"peak {args.learning_rate:g} after {_plural(warmup, 'warm-up step')}, Trainer's `{scheduler}` "
                       "schedule",
        "label_smoothing": args.label_smoothing_factor,
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "seed": args.seed,
        "final_loss": final_loss_summary(state.log_history),
    }


def finetuned_classifier_card(
    trainer: Trainer,
    *,
    initialised_from: str,
    licence: WeightsLicense,
    dataset_name: str | None,
    train_dataset: Any,
    eval_dataset: Any,
    layer_decay: float | None,
    min_crop_scale: float,
    eval_resize_ratio: float,
    model_name: str | None = None,
    tags: Sequence[str] | None = None,
) -> Any:
    """The model card of a fine-tuned I-JEPA classifier (:func:`ijepa_hf.cards.make_model_card`,
    ``kind="classifier"``): architecture, licence and base model of the weights, what the run started from
    (:func:`describe_initialisation`), its data, recipe and final training loss, and the last validation accuracy
    it measured (also in the ``model-index`` metadata), with Trainer's table of its evaluations during training.

    A run that trained nothing (evaluation only) names the model it evaluated and no recipe.

    Args:
        trainer: the `Trainer` after the run (its arguments, state and log history are read).
        initialised_from: from :func:`describe_initialisation`.
        licence: the weights' licence and Hub base model (:func:`ijepa_hf.licensing.weights_license`).
        dataset_name: the data's Hub id or built-in name; ``None`` for a local image folder.
        train_dataset, eval_dataset: the splits of :func:`load_labeled_splits` (their sizes, class names and where
            the validation images come from).
        layer_decay, min_crop_scale, eval_resize_ratio: the recipe's options beyond `TrainingArguments`.
        model_name: the card's repo id where the trainer pushes to no Hub repo (default: the output folder's name);
            the Hub repo's id wins, as the card's loading code needs it.
        tags: extra Hub tags.
    """
    from transformers.modelcard import make_markdown_table, parse_log_history

    args, history = trainer.args, trainer.state.log_history
    model_name = getattr(trainer, "hub_model_id", None) or args.hub_model_id or model_name or Path(
        args.output_dir).name
    if trainer.state.global_step:
        training = _recipe_rows(trainer, initialised_from, dataset_name, train_dataset, layer_decay=layer_decay,
                                min_crop_scale=min_crop_scale, eval_resize_ratio=eval_resize_ratio)
    else:  # an evaluation-only run: no recipe ran
        training = {"evaluated_model": f"not trained by this run: {initialised_from}"}
    evaluated = [row for row in history if row.get("eval_accuracy") is not None]
    if evaluated:  # the images behind the accuracy below
        training["validation_data"] = f"{_plural(len(eval_dataset), 'image')} {eval_dataset.info.description}"
    results = [{
        "task_name": "Image classification (fine-tuned)", "dataset_name": dataset_name or "image folder",
        "dataset_type": dataset_name or "imagefolder", "dataset_split": "validation", "metric_type": "accuracy",
        "metric_name": "Top-1 accuracy (%)", "metric_value": round(100 * evaluated[-1]["eval_accuracy"], 2),
    }] if evaluated else []
    _, lines, _ = parse_log_history(history)
    extra = ("## Training results\n\nThe evaluations during training (Trainer's log):\n\n" + make_markdown_table(lines)
             if lines else None)
    hub_dataset = dataset_name if dataset_name is not None and dataset_name not in BUILTIN_DATASETS else None
    return make_model_card(
        model_name=model_name, kind="classifier", config_summary=summarize_config(trainer.model),
        license=licence.license, base_model=licence.base_model, datasets=hub_dataset,
        tags=["image-classification", *(tags or [])], training=training, eval_results=results, extra=extra)


class FinetuningTrainer(Trainer):
    """`Trainer` whose model card, written by ``create_model_card`` and so by ``push_to_hub``, is the package's
    classifier card (:func:`finetuned_classifier_card`) for an I-JEPA model. Trainer's generated draft calls a model
    fine-tuned from a local folder "trained from scratch" and says nothing of the encoder or the recipe. Any other
    model (finetune.py fine-tunes any transformers image classifier) gets Trainer's draft, with the licence, base
    model and data of ``card_info``.

    Args:
        card_info: the keyword arguments of :func:`finetuned_classifier_card` but ``trainer``, ``model_name`` and
            ``tags``.
    """

    def __init__(self, *args: Any, card_info: Mapping[str, Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.card_info = dict(card_info)

    def create_model_card(self, model_name: str | None = None, tags: str | list[str] | None = None,
                          **unused: Any) -> None:
        if unused:  # honoured by Trainer's draft, not by this card: refused rather than dropped
            raise TypeError(f"FinetuningTrainer.create_model_card: {', '.join(sorted(unused))} would not reach the "
                            "card; its licence, base model, data and task come from the run (card_info).")
        if not self.is_world_process_zero():
            return
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        if not str(self.model.config.model_type).startswith("ijepa"):
            info = self.card_info
            super().create_model_card(
                model_name=model_name, license=info["licence"].license, finetuned_from=info["licence"].base_model,
                tasks="image-classification", tags=["image-classification", "vision", *tags],
                dataset=info.get("dataset_name"))
            return
        card = finetuned_classifier_card(self, model_name=model_name, tags=tags, **self.card_info)
        card.save(str(Path(self.args.output_dir) / "README.md"))
