#!/usr/bin/env python
"""Fine-tune an image classifier with `transformers.Trainer`: an I-JEPA encoder (or pretraining) repo gets a new
linear head on average-pooled patch features; any transformers image classifier works too.

Follows the conventions of transformers' ``examples/pytorch/image-classification/run_image_classification.py``
(HfArgumentParser with a JSON-file alternative, imagefolder/Hub data, ``--train_val_split``, Trainer),
without torchvision. Extras: ``--layer_decay`` (layer-wise lr decay through a custom optimizer) and the
``procedural_shapes`` / ``fashion_mnist`` datasets that need no download, and the model card: for an I-JEPA model
the package's classifier card (what the run started from, its data, recipe and validation accuracy) instead of
Trainer's draft.

Example::

    python examples/finetune.py \\
        --model_name_or_path ./ijepa-encoder --train_dir ./images/train --validation_dir ./images/val \\
        --output_dir ./ijepa-finetuned --do_train --do_eval --num_train_epochs 10 \\
        --learning_rate 1e-3 --layer_decay 0.75 --weight_decay 0.05 --per_device_train_batch_size 64 \\
        --eval_strategy epoch --save_strategy epoch --load_best_model_at_end --metric_for_best_model accuracy

``--remove_unused_columns`` is forced to False (the transform, not the model, consumes the ``image`` column).
As in transformers' script, ``--do_train`` / ``--do_eval`` say what runs (an ``--eval_strategy`` without
``--do_train`` is refused: it would evaluate an untrained head); an ``--output_dir`` holding another run's results
needs ``--overwrite_output_dir``; ``--resume_from_checkpoint latest`` resumes the newest checkpoint there, under
the settings it was trained with (others are refused, naming them); a second run into a folder a live run holds
fails at once. SIGTERM or SIGUSR1 (a cluster's warning before it pre-empts the job) saves a checkpoint after the
current update and exits with code 75, which ``--resume_from_checkpoint latest`` continues.
Models derived from Meta's weights keep their CC BY-NC 4.0 licence (config and card, `ijepa_hf.licensing`).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import transformers
from transformers import HfArgumentParser, TrainingArguments, set_seed

from ijepa_hf.data import set_image_transform
from ijepa_hf.licensing import record_weights_license, weights_license
from ijepa_hf.finetuning import (
    BUILTIN_DATASETS,
    DEFAULT_TRAIN_VAL_SPLIT,
    FinetuningTrainer,
    build_layerwise_optimizer,
    classification_collate,
    describe_initialisation,
    finetune_run_settings,
    load_accuracy_metric,
    load_labeled_splits,
    make_compute_metrics,
    make_finetune_transforms,
)
from ijepa_hf.loading import load_image_classifier, load_image_processor
from ijepa_hf.scripts import (TRAINING_INTERRUPTED, check_trainer_length, quiet_http_logging, run_script,
                              trainer_run_folder)
from ijepa_hf.training import (PREEMPTED_EXIT_CODE, PreemptionCallback, check_batch_arguments,
                               check_mixed_precision)
from ijepa_hf.training.arguments import check_seed
from ijepa_hf.training.resume import RunSettingsCallback, check_trainer_resume_compatible
from ijepa_hf.training.trainer import TORCH_ADAMW_OPTIMIZERS

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """Which model to fine-tune."""

    model_name_or_path: str = field(
        metadata={"help": "Encoder, pretraining or classifier repo (Hub id or local folder)."}
    )
    encoder: str = field(
        default="target",
        metadata={"choices": ["target", "context"],
                  "help": "For an I-JEPA pretraining repo: the 'target' (default, as the paper) or 'context' encoder."},
    )
    layer_decay: float | None = field(
        default=None,
        metadata={"help": "Layer-wise lr decay (e.g. 0.75): block i gets lr * decay^(depth - i), the head lr. "
                          "Unset: one lr for all parameters (Trainer's default AdamW)."},
    )
    drop_path_rate: float | None = field(default=None, metadata={"help": "Stochastic depth for fine-tuning."})
    pooler_norm: str | None = field(
        default=None, metadata={"choices": ["batchnorm", "layernorm", "none"], "help": (
            "How a new head normalises the pooled features: 'batchnorm' (a new head's default; needs training "
            "batches of 2 or more images), 'layernorm' or 'none'. A classifier repo keeps the one it was trained with "
            "(another is refused).")},
    )
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Replace a classifier head whose number of labels differs."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start a new run in an --output_dir holding another run (its checkpoints and outputs are "
                          "moved to _replaced-<time>/)."},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache Hub downloads."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the model."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)."})


@dataclass
class DataTrainingArguments:
    """What data to fine-tune and evaluate on."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": f"Hub dataset, or one of {BUILTIN_DATASETS} (no download needed)."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    train_dir: str | None = field(default=None, metadata={"help": "Image folder (one sub-folder per class)."})
    validation_dir: str | None = field(default=None, metadata={"help": "Validation image folder."})
    train_val_split: float | None = field(
        default=None, metadata={"help": "Fraction of train held out when the data has no validation images (default "
                                        f"{DEFAULT_TRAIN_VAL_SPLIT}); refused where it has."}
    )
    image_column_name: str | None = field(default=None, metadata={"help": "Image column (auto-detected)."})
    label_column_name: str = field(default="label", metadata={"help": "Label column."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the validation set."})
    min_crop_scale: float = field(default=0.08, metadata={"help": "Smallest area of the random resized crop."})
    eval_resize_ratio: float = field(
        default=1.0, metadata={"help": "Eval: resize the shorter side to size * ratio, centre-crop (ImageNet: 1.143)."}
    )


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataTrainingArguments, TrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if data_args.dataset_name is None and data_args.train_dir is None:
        parser.error("give --dataset_name or --train_dir.")
    # As transformers' run_image_classification.py: --do_train and --do_eval say what runs. TrainingArguments turns
    # do_eval on by itself for any --eval_strategy other than "no"; evaluating during training without training
    # would evaluate a random head and exit 0, so that is refused.
    if not training_args.do_train and training_args.eval_strategy != "no":
        parser.error(
            f"--eval_strategy {training_args.eval_strategy.value} evaluates during training, but --do_train is not "
            "set: add --do_train (or, to only evaluate the model as it is, use --do_eval without --eval_strategy)."
        )
    if not (training_args.do_train or training_args.do_eval):
        parser.error("nothing to do: pass --do_train and/or --do_eval.")
    try:
        check_seed(training_args.seed)
    except ValueError as error:
        parser.error(str(error))
    if not 0 < data_args.min_crop_scale <= 1:
        parser.error(f"--min_crop_scale must be in (0, 1], got {data_args.min_crop_scale}.")
    if training_args.do_train:
        try:
            check_trainer_length(training_args)
        except ValueError as error:
            parser.error(f"{error}.")
    if not data_args.eval_resize_ratio >= 1:
        parser.error(f"--eval_resize_ratio must be >= 1 (resize, then centre-crop), got {data_args.eval_resize_ratio}.")
    if not (training_args.weight_decay >= 0 and math.isfinite(training_args.weight_decay)):
        # Trainer puts it in its parameter groups, which torch's own check (of its default only) does not see
        parser.error(f"--weight_decay must be a finite number >= 0, got {training_args.weight_decay}.")
    optim = getattr(training_args.optim, "value", training_args.optim)
    if model_args.layer_decay is not None and optim not in TORCH_ADAMW_OPTIMIZERS:
        parser.error(f"--optim {optim} would not be used: --layer_decay builds its own AdamW over layer-wise groups. "
                     "Drop --optim, or --layer_decay to train with that optimiser.")
    if model_args.layer_decay is not None and training_args.optim_args:
        parser.error(f"--optim_args {training_args.optim_args} would not be used: --layer_decay builds its own AdamW "
                     "(it takes --adam_beta1, --adam_beta2, --adam_epsilon and --weight_decay).")
    try:
        check_mixed_precision(training_args)
    except ValueError as error:
        parser.error(f"--fp16: {error}.")
    try:
        check_batch_arguments(training_args)
    except ValueError as error:
        parser.error(f"--{error}.")
    if not 0 <= training_args.label_smoothing_factor < 1:
        parser.error(f"--label_smoothing_factor must be in [0, 1), got {training_args.label_smoothing_factor}.")
    if training_args.resume_from_checkpoint is not None and not training_args.do_train:
        parser.error(  # it would be dropped: the run would evaluate --model_name_or_path, not the checkpoint
            f"--resume_from_checkpoint {training_args.resume_from_checkpoint} continues a training run, but --do_train "
            "is not set: add --do_train, or, to evaluate a checkpoint, give it as --model_name_or_path.")
    if training_args.remove_unused_columns:
        training_args.remove_unused_columns = False  # keep `image`: the transform consumes it, not the model
    return model_args, data_args, training_args


def setup_logging(training_args: TrainingArguments) -> None:
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    quiet_http_logging()
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


def main(argv: list[str] | None = None) -> FinetuningTrainer:
    """Runs the fine-tuning; returns the `Trainer` (for notebooks and tests)."""
    model_args, data_args, training_args = parse_args(argv)
    setup_logging(training_args)
    logger.info("Training/evaluation parameters %s", training_args)
    set_seed(training_args.seed)  # before the head is initialised

    hub_kwargs: dict[str, Any] = {"revision": model_args.model_revision}
    for key in ("cache_dir", "token"):
        if getattr(model_args, key) is not None:
            hub_kwargs[key] = getattr(model_args, key)

    splits = load_labeled_splits(
        dataset_name=data_args.dataset_name,
        dataset_config_name=data_args.dataset_config_name,
        train_dir=data_args.train_dir,
        validation_dir=data_args.validation_dir,
        train_val_split=data_args.train_val_split,
        image_column=data_args.image_column_name,
        label_column=data_args.label_column_name,
        max_train_samples=data_args.max_train_samples,
        max_eval_samples=data_args.max_eval_samples,
        seed=training_args.seed,
        **{k: v for k, v in hub_kwargs.items() if k in ("cache_dir", "token")},
    )
    names = splits["train"].features["label"].names
    id2label = {i: name for i, name in enumerate(names)}
    logger.info("%d classes, %d training and %d validation images.", len(names), len(splits["train"]),
                len(splits["validation"]))

    # The model is read before the output folder is prepared: an overwriting run into the model's own folder moves
    # the earlier outputs aside
    overrides = {key: getattr(model_args, key) for key in ("drop_path_rate", "pooler_norm")
                 if getattr(model_args, key) is not None}
    model = load_image_classifier(
        model_args.model_name_or_path,
        num_labels=len(id2label),
        id2label=id2label,
        label2id={name: i for i, name in id2label.items()},
        encoder=model_args.encoder,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        **overrides,
        **hub_kwargs,
    )
    # Weights derived from Meta's (CC BY-NC 4.0) keep that licence: recorded in the saved config and the card.
    licence = weights_license(model, source=model_args.model_name_or_path)
    record_weights_license(model, licence.license, licence.base_model)
    image_processor = load_image_processor(model_args.model_name_or_path, model.config, **hub_kwargs)
    # The card's facts, read now: an overwriting run into the model's own folder moves it aside
    card_info = dict(initialised_from=describe_initialisation(model_args.model_name_or_path, model_args.encoder,
                                                              **hub_kwargs),
                     licence=licence, dataset_name=data_args.dataset_name, train_dataset=splits["train"],
                     eval_dataset=splits["validation"], layer_decay=model_args.layer_decay,
                     min_crop_scale=data_args.min_crop_scale, eval_resize_ratio=data_args.eval_resize_ratio)

    # Recorded in every checkpoint; resuming under others is refused, naming them (Trainer would load the checkpoint's
    # learning rate over the new one, without a word), before the folder policy moves anything
    settings = RunSettingsCallback(finetune_run_settings(
        training_args, layer_decay=model_args.layer_decay, min_crop_scale=data_args.min_crop_scale,
        train_dataset=splits["train"]))

    def check_resume(checkpoint: Path) -> None:
        check_trainer_resume_compatible(checkpoint, settings.settings, model.config)

    # The folder's run lock for the whole run (a second job into it fails at once); another run's folder is refused
    with trainer_run_folder(training_args, model_args.overwrite_output_dir, check_resume) as resume:
        return _finetune(model_args, data_args, training_args, splits, model, image_processor, card_info, settings,
                         resume)


def _finetune(model_args: ModelArguments, data_args: DataTrainingArguments, training_args: TrainingArguments,
              splits: Any, model: Any, image_processor: Any, card_info: dict[str, Any], settings: RunSettingsCallback,
              resume: str | None) -> FinetuningTrainer:
    train_transform, eval_transform = make_finetune_transforms(
        image_processor, crop_scale=(data_args.min_crop_scale, 1.0), eval_resize_ratio=data_args.eval_resize_ratio
    )
    train_dataset = set_image_transform(splits["train"], train_transform) if training_args.do_train else None
    eval_dataset = set_image_transform(splits["validation"], eval_transform) if training_args.do_eval else None

    preemption = PreemptionCallback()  # SIGTERM / SIGUSR1: a checkpoint after this update, then exit code 75
    optimizers: tuple[Any, Any] = (None, None)
    if model_args.layer_decay is not None:
        optimizer = build_layerwise_optimizer(
            model,
            lr=training_args.learning_rate,
            weight_decay=training_args.weight_decay,
            layer_decay=model_args.layer_decay,
            betas=(training_args.adam_beta1, training_args.adam_beta2),
            eps=training_args.adam_epsilon,
        )
        optimizers = (optimizer, None)  # Trainer still builds the lr schedule, scaling each group's own lr

    trainer = FinetuningTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=image_processor,
        data_collator=classification_collate,
        compute_metrics=make_compute_metrics(load_accuracy_metric()),
        optimizers=optimizers,
        callbacks=[settings, preemption],
        card_info=card_info,  # README.md (what --push_to_hub uploads too): the package's classifier card
    )

    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=resume)
        if preemption.preempted is not None:  # a checkpoint of the last update is written; requeue to continue
            logger.warning("%s", preemption.preempted)
            raise SystemExit(PREEMPTED_EXIT_CODE)
        trainer.save_model()  # the model and, as processing_class, the image processor
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()

    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    if training_args.push_to_hub:
        trainer.push_to_hub()  # writes the card first
    else:
        trainer.create_model_card()
    return trainer


if __name__ == "__main__":
    run_script(main, on_interrupt=TRAINING_INTERRUPTED)
