"""What a finished pretraining run publishes: the pretraining model, the target encoder, image processors, model
cards with the recipe, and the Hub upload."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..configuration_ijepa_hf import IJepaPretrainingConfig
from .arguments import PretrainingArguments
from .checkpointing import LEGACY_NAMES, MANIFEST_NAME, NOT_PUBLISHED_PREFIX, TRAINER_STATE_NAME
from .schedules import PretrainingSchedule

logger = logging.getLogger(__name__)

__all__ = ["ENCODER_SUBFOLDER", "ExportError", "HubPushError", "measured_summary", "recipe_summary",
           "training_summary", "save_final_model",
           "write_encoder_and_cards", "mask_summary", "push_output_dir"]

ENCODER_SUBFOLDER = "encoder"
# What a push leaves out of a run's folder: the training checkpoints, the run file, and the run's bookkeeping named
# `_*` (the lock, checkpoints moved aside; as Trainer's push), under today's names and earlier ones. Trainer's: its
# checkpoints and training_args.bin (a pickle).
_NOT_PUBLISHED = ["step_*", "step_*/**", ".step_*", ".step_*/**", ".*.tmp", "checkpoint-*", "checkpoint-*/**",
                  "training_args.bin", f"{NOT_PUBLISHED_PREFIX}*", *LEGACY_NAMES,
                  *(f"{name}/**" for name in LEGACY_NAMES)]


class ExportError(RuntimeError):
    """The final model of a finished run could not be written; the message says why and how to write it again."""


class HubPushError(RuntimeError):
    """A finished run could not be uploaded; the message names the command that uploads it without training."""


def batch_summary(per_device: int, num_processes: int, accumulation: int) -> str:
    """The global batch as the model cards write it, with its three factors."""
    return (f"{per_device * num_processes * accumulation} ({per_device} per device x {num_processes} processes x "
            f"{accumulation} accumulation)")


def recipe_summary(schedule: PretrainingSchedule, *, crop_scale: Sequence[float] | None, betas: Sequence[float],
                   max_grad_norm: float | None, lr_schedule: str | None = None) -> dict[str, Any]:
    """The recipe rows of the model cards, one wording for ``pretrain()`` and ``IJepaTrainer``: the crop (when
    known), the optimiser, clipping and the three schedules of ``schedule`` (``lr_schedule`` describes a learning
    rate that does not follow it, e.g. another Trainer scheduler)."""
    rows: dict[str, Any] = {}
    if crop_scale is not None:
        low, high = (float(value) for value in crop_scale)
        rows["augmentations"] = f"random resized crop ({low}, {high}), ImageNet normalisation (official recipe)"
    rows["optimizer"] = f"AdamW (betas {betas[0]:g}, {betas[1]:g}), official parameter groups"
    rows["gradient_clipping"] = "none" if not max_grad_norm else f"norm {max_grad_norm:g}"
    rows["lr_schedule"] = lr_schedule or (
        f"linear warm-up {schedule.start_lr:g} -> {schedule.peak_lr:g} over {schedule.warmup_steps} steps, cosine to "
        f"{schedule.final_lr:g}")
    start, end = schedule.start_weight_decay, schedule.final_weight_decay
    rows["wd_schedule"] = f"constant {start:g}" if start == end else f"cosine {start:g} -> {end:g}"
    rows["ema_schedule"] = f"linear {schedule.ema_start:g} -> {schedule.ema_end:g}"
    return rows


def measured_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """What a run measured as it trained, for the model cards of both paths: the last held-out loss and the last
    online k-NN accuracy (raw pixels' beside it), from its log rows (``train_log.jsonl``, the Trainer's
    ``log_history``)."""
    found: dict[str, str] = {}
    evaluated = [row for row in rows if row.get("eval_loss") is not None]
    if evaluated:
        found["held_out_loss"] = f"{evaluated[-1]['eval_loss']:.5f} at step {evaluated[-1].get('step')}"
    probed = [row for row in rows if row.get("online_knn_accuracy") is not None]
    if probed:
        row, pixels = probed[-1], probed[-1].get("online_knn_pixels_accuracy")
        found["online_knn"] = (f"{row['online_knn_accuracy']:.3f} at step {row.get('step')}"
                               + ("" if pixels is None else f" (raw pixels {pixels:.3f})"))
    return found


def final_loss_summary(history: Sequence[Mapping[str, Any]]) -> float | str:
    """The final training loss a card states, from a Trainer's log history: the last logged loss, else the run's
    mean from the Trainer's closing row (a run shorter than ``logging_steps`` logs no loss row), else ``"n/a"``."""
    logged = [row["loss"] for row in history if "loss" in row]
    if logged:
        return round(logged[-1], 5)
    means = [row["train_loss"] for row in history if "train_loss" in row]
    return f"{means[-1]:.5f} (the run's mean: no step logged a loss)" if means else "n/a"


def training_summary(args: PretrainingArguments, config: IJepaPretrainingConfig, *, data_description: str,
                     schedule: PretrainingSchedule, completed_steps: int, num_processes: int, mixed_precision: str,
                     final_loss: float | None, bad_images: int, images_per_s: float,
                     log_rows: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The recipe of a ``pretrain()`` run as recorded in the model cards, with what it measured (``log_rows``)."""
    return {
        "data": data_description,
        "image_size": config.encoder_config.image_size,
        "steps": f"{completed_steps} of {schedule.total_steps}",
        "batch_size": batch_summary(args.per_device_train_batch_size, num_processes, args.gradient_accumulation_steps),
        "masks": mask_summary(config),
        **recipe_summary(schedule, crop_scale=args.crop_range, betas=(args.adam_beta1, args.adam_beta2),
                         max_grad_norm=args.clip_grad_norm),
        "mixed_precision": mixed_precision,
        "seed": args.seed,
        "final_loss": "n/a" if final_loss is None else round(final_loss, 5),
        "unreadable_images_skipped": bad_images,
        "throughput": f"{images_per_s:.1f} images/s",
        **measured_summary(log_rows),
    }


def mask_summary(config: IJepaPretrainingConfig) -> dict[str, Any]:
    """The masking recipe of ``config`` as the model cards record it: the mask fields under the config's names and
    the sampling scope that ran."""
    return {**config.mask_settings(), "mask_sampling": config.mask_sampling_scope}


def save_final_model(accelerator: Any, model: Any, config: IJepaPretrainingConfig, args: PretrainingArguments,
                     output_dir: Path, training: Mapping[str, Any], hub_dataset: str | None,
                     sharded: bool, run_id: str | None = None) -> Path:
    """Save the pretraining model, the target encoder (``output_dir/encoder``), image processors and model cards.

    Every rank must call it (sharded weights are gathered); only the main process writes, and every rank learns
    whether it did: a failure raises :class:`ExportError` on every rank (a full disk named as such, with the run's
    newest checkpoint (of run ``run_id``) to continue from). Returns the encoder folder.
    """
    from .distributed import run_on_main_process

    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # gathers sharded (FSDP/DeepSpeed) weights; all ranks call it

    def write() -> None:
        try:
            _write_final_model(accelerator, model, config, args, output_dir, training, hub_dataset, sharded,
                               state_dict)
        except Exception as error:  # noqa: BLE001 - translated for the user
            raise _export_error(error, output_dir, training, run_id) from error

    run_on_main_process(accelerator, write)
    return output_dir / ENCODER_SUBFOLDER


def _export_error(error: BaseException, output_dir: Path, training: Mapping[str, Any], run_id: str | None
                  ) -> ExportError:
    from .checkpointing import latest_checkpoint, write_failure

    found = latest_checkpoint(output_dir, run_id)
    then = (f"it continues from {found.path.name}, the run's newest complete checkpoint, and writes the final model "
            "again" if found is not None else "the run has no checkpoint, so it would train from the start")
    cause = write_failure(error, output_dir, f"the final model (training reached step {training['steps']})")
    return ExportError(f"{cause}. Fix that and run the same command with --resume_from_checkpoint latest: {then}.")


def _write_final_model(accelerator: Any, model: Any, config: IJepaPretrainingConfig, args: PretrainingArguments,
                       output_dir: Path, training: Mapping[str, Any], hub_dataset: str | None, sharded: bool,
                       state_dict: dict[str, Any]) -> None:
    from ..licensing import record_weights_license, weights_license
    from ..modeling_ijepa_hf import IJepaEncoderModel

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
    write_encoder_and_cards(unwrapped, encoder, output_dir, name=args.hub_model_id or output_dir.name,
                            weights=weights, training=training, hub_dataset=hub_dataset)


def write_encoder_and_cards(model: Any, encoder: Any, output_dir: Path, *, name: str, weights: Any,
                            training: Mapping[str, Any], hub_dataset: str | None) -> Path:
    """What every finished pretraining run publishes beside its pretraining model (``model``, already saved in
    ``output_dir`` with the licence of ``weights`` recorded): the target ``encoder`` in ``output_dir/encoder``, the
    image processor in both folders, and both model cards (``training``: the recipe; licence and base model from
    ``weights``, a :class:`~ijepa_hf.licensing.WeightsLicense`). Returns the encoder folder. The Accelerate loop
    and ``IJepaTrainer.save_run`` both write through it."""
    from .. import make_image_processor
    from ..cards import default_loading_code, make_model_card, summarize_config
    from ..licensing import record_weights_license

    encoder_dir = output_dir / ENCODER_SUBFOLDER
    record_weights_license(encoder, *weights)
    encoder.save_pretrained(encoder_dir)
    processor = make_image_processor(encoder.config)
    processor.save_pretrained(output_dir)
    processor.save_pretrained(encoder_dir)
    card_kwargs = dict(datasets=hub_dataset, training=training, tags=["ijepa-hf-pretraining"],
                       license=weights.license, base_model=weights.base_model)
    make_model_card(model_name=name, kind="pretraining", config_summary=summarize_config(model),
                    **card_kwargs).save(output_dir / "README.md")
    loading = default_loading_code(name, "encoder", custom_code=True, subfolder=ENCODER_SUBFOLDER)
    make_model_card(model_name=f"{name} (target encoder)", kind="encoder", config_summary=summarize_config(encoder),
                    loading_code=loading, **card_kwargs).save(encoder_dir / "README.md")
    return encoder_dir


def _not_a_finished_run(output_dir: Path) -> str:
    """Why ``output_dir`` cannot be pushed as a finished pretraining run, naming what it holds and what to push."""
    if not output_dir.is_dir():
        return f"there is no folder {output_dir.resolve()}: give the --output_dir of a finished pretraining run"
    if (output_dir / MANIFEST_NAME).is_file() or (
            output_dir.name.startswith("checkpoint-") and (output_dir / TRAINER_STATE_NAME).is_file()):
        return (f"{output_dir} is a training checkpoint, not a run's output folder: push the run that holds it "
                f"({output_dir.parent}) once it has finished (--resume_from_checkpoint latest continues it)")
    if (output_dir / "config.json").is_file():
        try:
            model_type = json.loads((output_dir / "config.json").read_text()).get("model_type")
        except (OSError, ValueError):
            model_type = None
        if model_type != IJepaPretrainingConfig.model_type:
            return (f"{output_dir} holds a model of type {model_type!r} without {ENCODER_SUBFOLDER}/, not a "
                    "pretraining run's output: finetune.py --push_to_hub uploads a fine-tuned classifier at the end "
                    "of its run, ijepa_hf.hub.push_model any loaded model")
    return (f"{output_dir} holds no finished run (no final model and {ENCODER_SUBFOLDER}/ in it): finish the "
            "training first (--resume_from_checkpoint latest continues it)")


def push_output_dir(output_dir: str | Path, repo_id: str | None = None, *, token: str | None = None,
                    private: bool | None = None) -> str:
    """Upload the finished run in ``output_dir`` (its final model, ``encoder/``, cards, log and curves; not the
    training checkpoints, the lock or the run file) to the Hub repo ``repo_id`` (default: the folder's name),
    creating it if needed. Returns the commit URL.

    Raises:
        ExportError: ``output_dir`` holds no final model (the run has not finished).
        HubPushError: the upload failed; its message names ``ijepa-hf push``, which retries it without training.
    """
    from huggingface_hub import HfApi

    from .checkpointing import RUN_FILE_NAME

    output_dir = Path(output_dir)
    if not (output_dir / "config.json").is_file() or not (output_dir / ENCODER_SUBFOLDER / "config.json").is_file():
        raise ExportError(_not_a_finished_run(output_dir))
    repo_id = repo_id or output_dir.name
    try:
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, exist_ok=True, private=private).repo_id
        commit = api.upload_folder(folder_path=str(output_dir), repo_id=repo_id, repo_type="model",
                                   commit_message="I-JEPA pretraining",
                                   ignore_patterns=[*_NOT_PUBLISHED, RUN_FILE_NAME])
    except Exception as error:  # noqa: BLE001 - any failure of the upload gets the same way out
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise HubPushError(
            f"Could not push {output_dir} to the Hub repo {repo_id} ({type(error).__name__}: {first_line}). The run "
            f"itself is complete on disk: upload it without training again with `ijepa-hf push {output_dir} "
            f"{repo_id}` once the Hub can be reached (and the token can write to the repo)."
        ) from error
    logger.info("Pushed %s to %s", output_dir, repo_id)
    return getattr(commit, "commit_url", None) or str(commit)
