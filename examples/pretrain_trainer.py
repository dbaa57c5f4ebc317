#!/usr/bin/env python
"""I-JEPA pretraining with ``transformers.Trainer`` (the alternative to the Accelerate loop of ``pretrain.py``).

    python examples/pretrain_trainer.py                                  # embedded data, a tiny model, 50 steps
    python examples/pretrain_trainer.py --train_dir ./images --config_name vit_small_patch16_224 \\
        --output_dir outputs/trainer --per_device_train_batch_size 64 --num_train_epochs 100 --bf16
    torchrun --nproc_per_node 8 examples/pretrain_trainer.py ...        # data parallel, as any Trainer script

What makes it I-JEPA (all in ``ijepa_hf.training.trainer.IJepaTrainer``):

* ``data_collator=IJepaMaskCollator``: the multi-block masks; ``remove_unused_columns=False`` so the Trainer keeps
  the ``pixel_values`` column the collator needs;
* the official AdamW parameter groups and warmup-cosine LR (``--learning_rate`` is the peak, ``--start_lr`` /
  ``--final_lr`` the ends) and the cosine weight-decay schedule (``--weight_decay`` -> ``--final_weight_decay``);
* ``EMACallback``: the target-encoder EMA after every optimizer step (``on_optimizer_step``);
* ``MaskCollatorStepCallback``: the collator's batch counter set at every epoch start, so masks do not depend on
  dataloader workers or on resuming.

Pass ``--max_grad_norm 0`` for the official recipe (no gradient clipping; the Trainer's default clips at 1.0).

The Trainer saves the whole pretraining model; the target encoder is exported to ``<output_dir>/encoder``.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser, TrainingArguments

from ijepa_hf import IJepaPretrainingModel, make_image_processor
from ijepa_hf.data import BadImageCounter, ProceduralShapes, load_image_dataset
from ijepa_hf.masking import IJepaMaskCollator
from ijepa_hf.training.loop import MaskedBatchCollator, PretrainingArguments, PretrainImageDataset, build_config
from ijepa_hf.training.trainer import IJepaTrainer

logger = logging.getLogger("pretrain_trainer")

# Used when the script is run without arguments: a tiny model on the embedded procedural shapes.
DEFAULT_ARGV = [
    "--output_dir", "outputs/pretrain-trainer", "--max_steps", "50", "--per_device_train_batch_size", "32",
    "--learning_rate", "1e-3", "--warmup_steps", "5", "--weight_decay", "0.04", "--logging_steps", "10",
    "--remove_unused_columns", "False", "--save_strategy", "no", "--report_to", "none",
    "--max_grad_norm", "0",  # the official recipe does not clip gradients (the Trainer clips at 1.0 by default)
    "--image_size", "64", "--config_overrides",
    "encoder.patch_size=8,encoder.hidden_size=96,encoder.num_hidden_layers=4,encoder.num_attention_heads=2,"
    "predictor.hidden_size=48,predictor.num_hidden_layers=2,predictor.num_attention_heads=2,min_keep=4",
]


@dataclass
class ScriptArguments:
    """Model and data arguments (the training ones are ``transformers.TrainingArguments``)."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset (or a datasets builder)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    train_dir: str | None = field(default=None, metadata={"help": "Local image folder."})
    image_column_name: str | None = field(default=None, metadata={"help": "Image column (auto-detected)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N images."})
    embedded_num_images: int = field(default=2048, metadata={"help": "Size of the embedded dataset."})
    config_name: str | None = field(default=None, metadata={"help": "Preset name or config path/repo."})
    config_overrides: str | None = field(default=None, metadata={"help": "'a=1,encoder.x=2,predictor.y=3'."})
    image_size: int | None = field(default=None, metadata={"help": "Training resolution."})
    mask_mode: str | None = field(default=None, metadata={"help": "'fixed' or 'official'."})
    start_lr: float = field(default=2e-4, metadata={"help": "LR at the start of the warmup."})
    final_lr: float = field(default=1e-6, metadata={"help": "LR at the end of the cosine."})
    final_weight_decay: float = field(default=0.4, metadata={"help": "Weight decay at the end."})
    ema_momentum: str | None = field(default=None, metadata={"help": "'start,end' (default: the config's)."})


def main(argv: list[str] | None = None) -> IJepaTrainer:
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    argv = list(sys.argv[1:] if argv is None else argv) or DEFAULT_ARGV
    parser = HfArgumentParser((ScriptArguments, TrainingArguments))
    if len(argv) == 1 and argv[0].endswith(".json"):
        script_args, training_args = parser.parse_json_file(argv[0])
    else:
        script_args, training_args = parser.parse_args_into_dataclasses(args=argv)

    # The config logic (presets, overrides with encoder./predictor. prefixes, image size) is the loop's.
    config = build_config(PretrainingArguments(
        config_name=script_args.config_name, config_overrides=script_args.config_overrides,
        image_size=script_args.image_size, mask_mode=script_args.mask_mode, ema_momentum=script_args.ema_momentum,
    ))
    image_size = config.encoder_config.image_size
    model = IJepaPretrainingModel(config)

    counter = BadImageCounter()
    if script_args.dataset_name is None and script_args.train_dir is None:
        source = ProceduralShapes(script_args.embedded_num_images, image_size=image_size, seed=0)
    else:
        source = load_image_dataset(
            dataset_name=script_args.dataset_name, train_dir=script_args.train_dir,
            dataset_config_name=script_args.dataset_config_name, image_column=script_args.image_column_name,
            max_samples=script_args.max_train_samples, decode=False,
        )
    # Unreadable images become None and are dropped by the collator (and counted).
    train_dataset = PretrainImageDataset(source, image_size, counter=counter, seed=training_args.seed)
    collator = MaskedBatchCollator(IJepaMaskCollator.from_config(
        config, seed=training_args.seed, num_processes=training_args.world_size,
        process_index=training_args.process_index,
    ))

    trainer = IJepaTrainer(
        model=model, args=training_args, train_dataset=train_dataset, data_collator=collator,
        processing_class=make_image_processor(config.encoder_config), start_lr=script_args.start_lr,
        final_lr=script_args.final_lr, final_weight_decay=script_args.final_weight_decay,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    if trainer.is_world_process_zero():
        encoder_dir = f"{training_args.output_dir}/encoder"
        trainer.model.export_encoder("target").save_pretrained(encoder_dir)
        make_image_processor(config.encoder_config).save_pretrained(encoder_dir)
        logger.info("Saved the pretraining model to %s and the target encoder to %s (%s)",
                    training_args.output_dir, encoder_dir, counter)
    return trainer


if __name__ == "__main__":
    main()
