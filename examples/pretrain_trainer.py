#!/usr/bin/env python
"""I-JEPA pretraining with ``transformers.Trainer`` (the alternative to the Accelerate loop of ``pretrain.py``).

    python examples/pretrain_trainer.py                                  # embedded data, a tiny model, 50 steps
    python examples/pretrain_trainer.py --train_dir ./images --config_name vit_small_patch16_224 \\
        --output_dir outputs/trainer --per_device_train_batch_size 64 --num_train_epochs 100 --bf16
    python examples/pretrain_trainer.py --model_name_or_path ijepa-vith14 --train_dir ./images ...  # continue one
    torchrun --nproc_per_node 8 examples/pretrain_trainer.py ...        # data parallel, as any Trainer script
    python examples/pretrain_trainer.py args.json                        # the same options from a JSON file

The training options are ``transformers.TrainingArguments``, with the official I-JEPA recipe as their defaults
(``ijepa_hf.training.official_training_arguments``: peak lr 1e-3, ``lr_scheduler_type cosine`` from 2e-4 to 1e-6,
warm-up 40/300, weight decay 0.04 -> ``--final_weight_decay`` 0.4, AdamW over the official groups, no gradient
clipping, ``remove_unused_columns False``) — with or without other arguments, and the same from a JSON file;
``--help`` shows them. Without a data argument the embedded procedural scenes are used with a tiny model and a
50-step budget, for the options not given. ``IJepaTrainer`` refuses ``TrainingArguments`` it cannot honour.

At the end the output folder holds what ``pretrain.py`` writes (``IJepaTrainer.save_run``): the pretraining model,
the target encoder in ``<output_dir>/encoder``, both model cards (licence, base model, recipe), ``train_log.jsonl``
and ``training_curves.png``; ``--push_to_hub`` uploads them (not the Trainer checkpoints), and
``--resume_from_checkpoint latest`` continues from the newest complete ``checkpoint-*``; an ``--output_dir`` holding
another run is refused unless ``--overwrite_output_dir`` is given.

``--eval_strategy steps --eval_steps N`` (and ``--do_eval``, once at the end) log the prediction loss on held-out
images as ``eval_loss``: ``--validation_dir`` or ``--validation_split_name`` name them (the embedded data has its own
held-out scenes); every evaluation sees the same crops and masks, so the curve follows the weights alone.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from transformers import HfArgumentParser, TrainingArguments, set_seed

from ijepa_hf import IJepaForPreTraining, make_image_processor
from ijepa_hf.configuration_ijepa_hf import parse_config_overrides
from ijepa_hf.data import (BadImageCounter, MaskedBatchCollator, build_online_probe_set, build_pretraining_data,
                           build_validation_data)
from ijepa_hf.scripts import (TRAINING_INTERRUPTED, check_trainer_length, configure_logging, run_script,
                              trainer_run_folder)
from ijepa_hf.training import (
    PREEMPTED_EXIT_CODE,
    OnlineProbeCallback,
    PreemptionCallback,
    build_pretraining_config,
    get_recipe,
)
from ijepa_hf.training.arguments import (MODEL_SOURCE_OPTIONS, check_online_probe_options, check_seed,
                                        check_streaming_options, demo_model_options, explicit_options,
                                        parse_crop_scale, parse_ema_momentum, parse_embedded_scene_option)
from ijepa_hf.training.distributed import mask_collator_for_process
from ijepa_hf.training.kernels import check_attention_choice, set_attention_implementation
from ijepa_hf.training.export import push_output_dir
from ijepa_hf.training.metrics import DEFAULT_ONLINE_PROBE_IMAGES, CollapseMonitor, default_online_probe_steps
from ijepa_hf.training.trainer import (OFFICIAL_FINAL_WEIGHT_DECAY, IJepaTrainer, check_training_arguments,
                                       official_training_arguments, recipe_scheduler_kwargs)

logger = logging.getLogger("pretrain_trainer")

# The official recipe as the TrainingArguments defaults of this script: every field official_training_arguments
# sets (its hyperparameters and its input pipeline's), as plain values.
_OFFICIAL = official_training_arguments("outputs/pretrain-trainer").to_dict()
_PLAIN = TrainingArguments("outputs/pretrain-trainer").to_dict()
RECIPE_DEFAULTS: dict[str, Any] = {name: value for name, value in _OFFICIAL.items()
                                   if value != _PLAIN[name] and name != "output_dir"}
# Used without a data argument, for the options not given: a tiny model on the embedded procedural shapes.
EMBEDDED_DEMO: dict[str, Any] = {
    "output_dir": "outputs/pretrain-trainer", "max_steps": 50, "per_device_train_batch_size": 32,
    "warmup_steps": 0.1, "logging_steps": 10, "save_strategy": "no", "report_to": "none",  # warm-up: a tenth of the run
}
# Its model: --config_name replaces it, --config_overrides changes it (as examples/pretrain.py's demo).
EMBEDDED_DEMO_MODEL: dict[str, Any] = {
    "image_size": 64,
    "config_overrides": "encoder.patch_size=8,encoder.hidden_size=96,encoder.num_hidden_layers=4,"
                        "encoder.num_attention_heads=2,predictor.hidden_size=48,predictor.num_hidden_layers=2,"
                        "predictor.num_attention_heads=2,min_keep=4",
}


@dataclass
class ScriptArguments:
    """Model and data arguments (the training ones are ``transformers.TrainingArguments``)."""

    dataset_name: str | None = field(default=None, metadata={"help": (
        "Hub dataset (or a datasets builder), or 'fashion_mnist': Debian's copy, read locally.")})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    train_dir: str | None = field(default=None, metadata={"help": "Local image folder."})
    image_column_name: str | None = field(default=None, metadata={"help": "Image column (auto-detected)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N images."})
    streaming: bool = field(default=False, metadata={"help": (
        "Stream the dataset (nothing downloaded up front); needs --max_steps.")})
    shuffle_buffer_size: int = field(default=1000, metadata={"help": (
        "Shuffle buffer of a streamed dataset (0 disables shuffling).")})
    validation_dir: str | None = field(default=None, metadata={"help": (
        "Folder of held-out images for the prediction loss eval_loss (--eval_strategy steps / --do_eval).")})
    validation_split_name: str | None = field(default=None, metadata={"help": (
        "Split of --dataset_name with held-out images for eval_loss, e.g. 'validation'. The embedded data has its "
        "own held-out scenes.")})
    max_eval_samples: int | None = field(default=None, metadata={"help": (
        "Keep the first N held-out images (embedded data: 256 by default).")})
    overwrite_output_dir: bool = field(default=False, metadata={"help": (
        "Start a new run in an --output_dir holding another run (its checkpoints and outputs are moved to "
        "_replaced-<time>/).")})
    embedded_num_images: int = field(default=2048, metadata={"help": "Size of the embedded dataset."})
    embedded_scenes: str | None = field(default=None, metadata={"help": (
        "Changes to the embedded scenes' generator settings (ijepa_hf.data.EMBEDDED_SCENES), 'key=value,...', as "
        "pretrain.py's --embedded_scenes; only without a data argument.")})
    config_name: str | None = field(default=None, metadata={"help": "Preset name or config path/repo."})
    model_name_or_path: str | None = field(default=None, metadata={"help": (
        "Continue pretraining a saved model (a folder or Hub repo with context, target encoder and predictor: an "
        "earlier run, or official weights converted with `ijepa-hf convert`), with its config.")})
    config_overrides: str | None = field(default=None, metadata={"help": "'a=1,encoder.x=2,predictor.y=3'."})
    image_size: int | None = field(default=None, metadata={"help": "Training resolution."})
    mask_mode: str | None = field(default=None, metadata={"help": "'fixed' or 'official'."})
    crop_scale: str = field(default="0.3,1.0", metadata={"help": (
        "Area range 'min,max' of the random resized crop (official 0.3,1.0).")})
    final_weight_decay: float = field(default=OFFICIAL_FINAL_WEIGHT_DECAY, metadata={
        "help": "Weight decay at the end of the cosine ramp from --weight_decay (official 0.4)."})
    ema_momentum: str | None = field(default=None, metadata={"help": "'start,end' (default: the config's)."})
    recipe: str = field(default="official", metadata={"help": (
        "'official' or 'small' (a one-block predictor as wide as the encoder, a warm-up of a quarter of the run; "
        "ijepa_hf.training.recipes). Explicit --warmup_steps and predictor.* overrides win over it.")})
    online_probe_steps: int | None = field(default=None, metadata={"help": (
        "Online k-NN + RankMe of the target encoder every N updates (default: 10 per run when the data has "
        "labels; 0: off).")})
    online_probe_images: int = field(default=DEFAULT_ONLINE_PROBE_IMAGES, metadata={"help": (
        "Images of the online probe set (half bank, half queries).")})
    online_probe_label_column: str | None = field(default=None, metadata={"help": (
        "Label column of the online probe (default 'label': image folders with class sub-folders, datasets with a "
        "label column, the embedded scenes' largest shape); integer ids or class names.")})
    online_probe_k: int = field(default=20, metadata={"help": "Neighbours of the online k-NN."})
    collapse_threshold: float = field(default=0.01, metadata={"help": (
        "Collapse warning when the batch std of the pooled, normalised target features falls below this.")})
    collapse_max_cosine: float = field(default=0.999, metadata={"help": (
        "Collapse warning when the mean pairwise cosine of different images' pooled target features exceeds this.")})
    attn_implementation: str = field(default="sdpa", metadata={"help": (
        "Attention kernel: 'sdpa', 'eager' or 'auto' (time both on this run's model, batch and precision at "
        "start-up and keep the faster, logged), as pretrain.py's.")})
    skip_nonfinite_steps: int = field(default=0, metadata={"help": (
        "Updates with a non-finite loss to skip (no optimizer step, no EMA) before stopping; 0: stop at the next log "
        "row. Syncs with the host at every update when > 0.")})

    def __post_init__(self) -> None:  # the script's own options, checked before any data is read
        check_online_probe_options(self.online_probe_steps, self.online_probe_images, self.online_probe_k)
        CollapseMonitor(self.collapse_threshold, self.collapse_max_cosine)
        self.crop_range, self.ema_range, self.embedded_scene_settings  # noqa: B018 - parse: a bad value fails here
        check_attention_choice(self.attn_implementation)
        if self.skip_nonfinite_steps < 0:
            raise ValueError(f"--skip_nonfinite_steps must be >= 0, got {self.skip_nonfinite_steps}")
        if self.embedded_num_images < 1:
            raise ValueError(f"--embedded_num_images must be a positive integer, got {self.embedded_num_images}")

    @property
    def crop_range(self) -> tuple[float, float]:
        return parse_crop_scale(self.crop_scale)

    @property
    def ema_range(self) -> tuple[float, float] | None:
        return parse_ema_momentum(self.ema_momentum or None)

    @property
    def embedded_scene_settings(self) -> dict[str, Any]:
        return parse_embedded_scene_option(self.embedded_scenes, self.uses_embedded_data)

    @property
    def uses_embedded_data(self) -> bool:
        return self.dataset_name is None and self.train_dir is None


def parse(argv: list[str]) -> tuple[ScriptArguments, TrainingArguments]:
    """Command line or one JSON file -> arguments, with the recipe defaults and (without data) the demo's."""
    parser = HfArgumentParser((ScriptArguments, TrainingArguments))
    parser.set_defaults(**RECIPE_DEFAULTS)  # so that --help shows them
    if len(argv) == 1 and argv[0].endswith(".json"):
        with open(argv[0], encoding="utf-8") as handle:
            given = json.load(handle)
    else:
        explicit = explicit_options(argv)
        given = {name: value for name, value in vars(parser.parse_args(argv)).items() if name in explicit}
    values = {**RECIPE_DEFAULTS, **given}
    if "lr_scheduler_kwargs" not in given:  # the recipe's start_lr / final_lr belong to the I-JEPA cosine alone
        values["lr_scheduler_kwargs"] = recipe_scheduler_kwargs(values["lr_scheduler_type"])
    if "warmup_steps" not in given:  # the recipe's warm-up (official: 40/300 of the run)
        values["warmup_steps"] = get_recipe(given.get("recipe", "official")).warmup_ratio
    if "dataset_name" not in given and "train_dir" not in given:
        demo = {k: v for k, v in EMBEDDED_DEMO.items() if k not in given}
        if not set(MODEL_SOURCE_OPTIONS) & set(given):
            demo.update(demo_model_options(EMBEDDED_DEMO_MODEL, set(given), given.get("config_overrides"))[0])
        if "num_train_epochs" in given:
            demo.pop("max_steps", None)
        if given.get("recipe", "official") != "official":
            demo.pop("warmup_steps", None)
        if not {"output_dir", "overwrite_output_dir", "resume_from_checkpoint"} & set(given):
            demo["overwrite_output_dir"] = True  # the demo's own folder: running the demo again replaces it
        values.update(demo)
    script_args, training_args = parser.parse_dict(values)
    check_seed(training_args.seed)
    check_trainer_length(training_args)
    check_streaming_options(script_args.streaming, training_args.max_steps > 0, script_args.uses_embedded_data,
                            "--max_steps", shuffle_buffer_size=script_args.shuffle_buffer_size)
    check_training_arguments(training_args, script_args.final_weight_decay)  # the trainer's checks, before any data
    script_args.user_overrides = set(parse_config_overrides(given.get("config_overrides")))
    return script_args, training_args


def _summed_over_processes(trainer: IJepaTrainer, counter: BadImageCounter | None) -> int:
    """The bad images ``counter`` counted in every process (each counts its own reads); every process calls it."""
    count = torch.tensor([0 if counter is None else counter.count], device=trainer.args.device)
    return int(trainer.accelerator.reduce(count, "sum").item())


def main(argv: list[str] | None = None) -> IJepaTrainer:
    configure_logging()
    script_args, training_args = parse(list(sys.argv[1:] if argv is None else argv))
    # The main process logs from --log_level on (info unless given), the others from --log_level_replica (warning)
    # on: each line once, not once per process
    if not training_args.should_log or training_args.log_level != "passive":
        log_level = training_args.get_process_log_level()
        logging.getLogger().setLevel(log_level)
        transformers.utils.logging.set_verbosity(log_level)
    ema, crop = script_args.ema_range, script_args.crop_range
    keep = script_args.user_overrides | ({"ema_momentum"} if ema is not None else set())
    # Read before the output folder is prepared: an overwriting run moves the earlier run's config.json aside
    config = build_pretraining_config(
        config_name=script_args.config_name, model_name_or_path=script_args.model_name_or_path,
        config_overrides=script_args.config_overrides, image_size=script_args.image_size,
        mask_mode=script_args.mask_mode, ema_momentum=ema, recipe=script_args.recipe, keep=keep,
        token=training_args.hub_token,
    )
    set_seed(training_args.seed)  # the model's initial weights too (Trainer seeds only once it is built)
    model = (IJepaForPreTraining(config) if script_args.model_name_or_path is None else
             IJepaForPreTraining.from_pretrained(script_args.model_name_or_path, config=config,
                                                 token=training_args.hub_token))
    # --push_to_hub uploads at the end what pretrain.py uploads (the package's cards, encoder/, log and curves),
    # rather than Trainer's generic card at every save.
    push, training_args.push_to_hub = training_args.push_to_hub, False
    run = _prepare(script_args, training_args, model, ema, crop)
    # The folder's run lock for the whole run; another run's folder is refused, and so is a checkpoint the run
    # cannot continue, before the folder policy moves anything
    with trainer_run_folder(training_args, script_args.overwrite_output_dir, run.trainer.check_resume) as resume:
        return _pretrain(script_args, training_args, run, push, resume)


@dataclass
class _Run:
    """What a run trains with, made before anything is written into its output folder."""

    trainer: IJepaTrainer
    data: Any
    counter: BadImageCounter
    validation: Any
    preemption: PreemptionCallback


def _prepare(script_args: ScriptArguments, training_args: TrainingArguments, model: IJepaForPreTraining,
             ema: tuple[float, float] | None, crop: tuple[float, float]) -> _Run:
    config = model.config
    image_size = config.encoder_config.image_size
    image_size = image_size if isinstance(image_size, int) else image_size[0]

    # The masks first: a grid the sampler cannot work on is refused before any image is indexed
    collator = MaskedBatchCollator(mask_collator_for_process(
        config, seed=training_args.seed, num_processes=training_args.world_size,
        process_index=training_args.process_index,
    ))
    counter = BadImageCounter()  # unreadable images become None, dropped by the collator and counted
    data = build_pretraining_data(
        image_size=image_size, seed=training_args.seed, crop_scale=crop, counter=counter,
        dataset_name=script_args.dataset_name, dataset_config_name=script_args.dataset_config_name,
        train_dir=script_args.train_dir, image_column_name=script_args.image_column_name,
        max_train_samples=script_args.max_train_samples, streaming=script_args.streaming,
        shuffle_buffer_size=script_args.shuffle_buffer_size,
        embedded_num_images=script_args.embedded_num_images, uint8_images=True,  # IJepaTrainer finishes them
        embedded_scene_settings=script_args.embedded_scene_settings,
    )
    logger.info("Training data: %s", data.description)
    preemption = PreemptionCallback()  # SIGTERM / SIGUSR1: a checkpoint after this update, then exit code 75
    callbacks: list[Any] = [preemption]
    if script_args.online_probe_steps != 0:
        probe_set = build_online_probe_set(data, image_size=image_size, num_images=script_args.online_probe_images,
                                           label_column=script_args.online_probe_label_column, seed=training_args.seed)
        if probe_set is None and script_args.online_probe_steps is not None:
            raise ValueError(f"--online_probe_steps needs labels, but {data.description} has none; set it to 0.")
        if probe_set is not None:
            global_batch = (training_args.per_device_train_batch_size * training_args.world_size
                            * training_args.gradient_accumulation_steps)
            total = training_args.max_steps if training_args.max_steps > 0 else math.ceil(
                training_args.num_train_epochs * len(data.dataset) // global_batch)
            every = script_args.online_probe_steps or default_online_probe_steps(total)
            logger.info("Online probe every %d updates: %s", every, probe_set.description)
            callbacks.append(OnlineProbeCallback(probe_set, every, k=script_args.online_probe_k))
    validation = None
    evaluating = training_args.do_eval or getattr(training_args.eval_strategy, "value", "no") != "no"
    if evaluating:
        validation = build_validation_data(  # its own counter: the last line counts the training images alone
            image_size=image_size, seed=training_args.seed, crop_scale=crop, counter=BadImageCounter(),
            dataset_name=script_args.dataset_name,
            dataset_config_name=script_args.dataset_config_name, train_dir=script_args.train_dir,
            validation_dir=script_args.validation_dir, validation_split_name=script_args.validation_split_name,
            image_column_name=script_args.image_column_name, max_eval_samples=script_args.max_eval_samples,
            embedded_scene_settings=script_args.embedded_scene_settings, uint8_images=True,
            batch_size=training_args.per_device_eval_batch_size, num_processes=training_args.world_size)
        logger.info("Held-out data (eval_loss): %s", validation.description)
    elif {script_args.validation_dir, script_args.validation_split_name, script_args.max_eval_samples} != {None}:
        raise ValueError("held-out images are named (--validation_dir / --validation_split_name / "
                         "--max_eval_samples) but nothing evaluates them: add --eval_strategy steps --eval_steps N, "
                         "or --do_eval")
    trainer = IJepaTrainer(
        model=model, args=training_args, train_dataset=data.dataset, data_collator=collator,
        eval_dataset=None if validation is None else validation.dataset,
        processing_class=make_image_processor(config.encoder_config),
        final_weight_decay=script_args.final_weight_decay, ema_momentum=ema, callbacks=callbacks,
        collapse_threshold=script_args.collapse_threshold, collapse_max_cosine=script_args.collapse_max_cosine,
        data_fingerprint=data.fingerprint(),  # resuming on other images is refused
        skip_nonfinite_steps=script_args.skip_nonfinite_steps,
    )
    set_attention_implementation(  # before train() wraps the model: no gradient all-reduce runs while timing
        trainer.model, script_args.attn_implementation, collator.mask_collator,
        batch_size=training_args.per_device_train_batch_size, seed=training_args.seed, device=training_args.device,
        autocast=trainer.accelerator.autocast, num_processes=training_args.world_size)
    return _Run(trainer, data, counter, validation, preemption)


def _pretrain(script_args: ScriptArguments, training_args: TrainingArguments, run: _Run, push: bool,
              resume: str | None) -> IJepaTrainer:
    trainer, data, counter, validation, preemption = (run.trainer, run.data, run.counter, run.validation,
                                                      run.preemption)
    trainer.train(resume_from_checkpoint=resume)
    if preemption.preempted is not None:
        logger.warning("%s", preemption.preempted)
        raise SystemExit(PREEMPTED_EXIT_CODE)
    if training_args.do_eval:  # once at the end, unless --eval_strategy has just evaluated these weights
        evaluated = [row for row in trainer.state.log_history if "eval_loss" in row]
        current = (evaluated and evaluated[-1]["step"] == trainer.state.global_step
                   and not training_args.load_best_model_at_end)  # the best checkpoint's weights were loaded
        metrics = evaluated[-1] if current else trainer.evaluate()
        metrics = {name: value for name, value in metrics.items() if name.startswith("eval_")}
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    encoder_dir = trainer.save_run(data_description=data.description, hub_dataset=data.hub_dataset,
                                   source=script_args.model_name_or_path)
    held_out_counter = None if validation is None else validation.dataset.counter
    bad, held_out_bad = (_summed_over_processes(trainer, c) for c in (counter, held_out_counter))
    if trainer.is_world_process_zero():
        if held_out_bad:
            logger.warning("Skipped %d unreadable held-out image(s) over the evaluations: %s", held_out_bad,
                           held_out_counter.describe(held_out_bad))
        logger.info("Saved the pretraining model to %s and the target encoder to %s (training images: %s)",
                    training_args.output_dir, encoder_dir, counter.describe(bad))
        if push:
            url = push_output_dir(training_args.output_dir, training_args.hub_model_id, token=training_args.hub_token,
                                  private=training_args.hub_private_repo)
            logger.info("Pushed %s (%s)", training_args.output_dir, url)
    return trainer


if __name__ == "__main__":
    run_script(main, on_interrupt=TRAINING_INTERRUPTED)
