"""What a finished pretraining run publishes: the pretraining model, the target encoder, image processors, model
cards with the recipe, and the Hub upload."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..configuration_ijepa_hf import IJepaPretrainingConfig
from .arguments import PretrainingArguments

logger = logging.getLogger(__name__)

__all__ = ["ENCODER_SUBFOLDER", "training_summary", "save_final_model", "push_output_dir"]

ENCODER_SUBFOLDER = "encoder"


def training_summary(args: PretrainingArguments, config: IJepaPretrainingConfig, *, data_description: str,
                     total_steps: int, completed_steps: int, warmup_steps: int, global_batch_size: int,
                     num_processes: int, mixed_precision: str, final_loss: float | None, bad_images: int,
                     images_per_s: float) -> dict[str, Any]:
    """The recipe as recorded in the model cards."""
    return {
        "data": data_description,
        "image_size": config.encoder_config.image_size,
        "augmentations": f"random resized crop {args.crop_range}, ImageNet normalisation (official recipe)",
        "steps": f"{completed_steps} of {total_steps}",
        "batch_size": (f"{global_batch_size} ({args.per_device_train_batch_size} per device x {num_processes} "
                       f"processes x {args.gradient_accumulation_steps} accumulation)"),
        "masks": {"num_target_blocks": config.num_target_blocks, "target_scale": config.target_scale,
                  "target_aspect_ratio": config.target_aspect_ratio, "context_scale": config.context_scale,
                  "min_keep": config.min_keep, "allow_overlap": config.allow_overlap, "mode": config.mask_mode,
                  "context_lengths": config.context_lengths},
        "optimizer": f"AdamW (betas {args.adam_beta1}, {args.adam_beta2}), official parameter groups",
        "gradient_clipping": "none" if args.clip_grad_norm is None else f"norm {args.clip_grad_norm:g}",
        "lr_schedule": (f"linear warm-up {args.start_lr:g} -> {args.learning_rate:g} over {warmup_steps} steps, "
                        f"cosine to {args.final_lr:g}"),
        "wd_schedule": f"cosine {args.weight_decay:g} -> {args.final_weight_decay:g}",
        "ema_schedule": f"linear {config.ema_momentum[0]:g} -> {config.ema_momentum[1]:g}",
        "mixed_precision": mixed_precision,
        "seed": args.seed,
        "final_loss": "n/a" if final_loss is None else round(final_loss, 5),
        "unreadable_images_skipped": bad_images,
        "throughput": f"{images_per_s:.1f} images/s",
    }


def save_final_model(accelerator: Any, model: Any, config: IJepaPretrainingConfig, args: PretrainingArguments,
                     output_dir: Path, training: Mapping[str, Any], hub_dataset: str | None,
                     sharded: bool) -> Path:
    """Save the pretraining model, the target encoder (``output_dir/encoder``), image processors and model cards.

    Every rank must call it (sharded weights are gathered); only the main process writes. Returns the encoder
    folder.
    """
    from .. import make_image_processor
    from ..cards import default_loading_code, make_model_card, summarize_config
    from ..licensing import record_weights_license, weights_license
    from ..modeling_ijepa_hf import IJepaEncoderModel

    encoder_dir = output_dir / ENCODER_SUBFOLDER
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # gathers sharded (FSDP/DeepSpeed) weights; all ranks call it
    if not accelerator.is_main_process:
        return encoder_dir
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    # Weights continued from others (e.g. Meta's, CC BY-NC 4.0) keep their licence and name their base model.
    weights = weights_license(unwrapped, source=args.model_name_or_path)
    record_weights_license(unwrapped, *weights)
    prefix = "target_encoder."
    # Taken before save_pretrained, which empties the dict it is given as it writes.
    target_state = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    unwrapped.save_pretrained(output_dir, state_dict=state_dict, save_function=accelerator.save)
    if sharded:  # the unwrapped modules hold shards: rebuild the encoder from the gathered weights
        encoder = IJepaEncoderModel(config.encoder_config)
        encoder.load_state_dict(target_state)
    else:
        encoder = unwrapped.export_encoder("target")
    record_weights_license(encoder, *weights)
    encoder.save_pretrained(encoder_dir)
    processor = make_image_processor(config.encoder_config)
    processor.save_pretrained(output_dir)
    processor.save_pretrained(encoder_dir)

    name = args.hub_model_id or output_dir.name
    card_kwargs = dict(datasets=hub_dataset, training=training, tags=["ijepa-hf-pretraining"],
                       license=weights.license, base_model=weights.base_model)
    make_model_card(model_name=name, kind="pretraining", config_summary=summarize_config(unwrapped),
                    **card_kwargs).save(output_dir / "README.md")
    loading = default_loading_code(name, "encoder", custom_code=True, subfolder=ENCODER_SUBFOLDER)
    make_model_card(model_name=f"{name} (target encoder)", kind="encoder", config_summary=summarize_config(encoder),
                    loading_code=loading, **card_kwargs).save(encoder_dir / "README.md")
    return encoder_dir


def push_output_dir(args: PretrainingArguments, output_dir: Path) -> str:
    """Upload ``output_dir`` (without the training checkpoints, the lock and the run file) to the Hub."""
    from huggingface_hub import HfApi

    from .checkpointing import LOCK_FILE_NAME, RUN_FILE_NAME

    api = HfApi(token=args.hub_token)
    repo_id = args.hub_model_id or output_dir.name
    repo_id = api.create_repo(repo_id, exist_ok=True, private=args.hub_private_repo).repo_id
    commit = api.upload_folder(folder_path=str(output_dir), repo_id=repo_id, repo_type="model",
                               commit_message="I-JEPA pretraining",
                               ignore_patterns=["step_*", "step_*/**", ".step_*", ".step_*/**", LOCK_FILE_NAME,
                                                RUN_FILE_NAME])
    logger.info("Pushed %s to %s", output_dir, repo_id)
    return getattr(commit, "commit_url", None) or str(commit)
