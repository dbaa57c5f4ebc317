"""Resuming a run, in one place: what a checkpoint's loop state holds (:func:`loop_state`), whether this run may
continue it (:func:`check_resume_compatible`) and putting the run back where it stopped (:func:`resume_run`).

The files themselves (atomic writes, digests, the run folder and ``latest``) are :mod:`.checkpointing`'s; the
distributed strategies' part of a load (the EMA's view of sharded parameters) is :mod:`.distributed`'s.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig, TrainerCallback
from transformers.trainer_callback import ExportableState

from ..configuration_ijepa_hf import IJepaPretrainingConfig
from ..masking import IJepaMaskCollator
from .arguments import OPERATIONAL_FIELDS, SCHEDULE_LENGTH_FIELDS, PretrainingArguments
from .checkpointing import TRAINER_STATE_NAME, load_checkpoint, read_manifest
from .distributed import after_checkpoint_load
from .schedules import PretrainingSchedule

logger = logging.getLogger(__name__)

__all__ = ["Progress", "RunSettingsCallback", "check_resume_compatible", "check_run_may_resume",
           "check_trainer_resume_compatible", "loop_state", "resume_run", "trainer_run_settings"]


@dataclass
class Progress:
    """The loop's position, saved (as JSON) in every checkpoint."""

    completed_steps: int = 0  # optimizer updates done
    epoch: int = 0  # current epoch
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    batches_seen: int = 0  # micro-batches consumed in the whole run = index of the next global batch's masks
    images_seen: int = 0  # good images consumed by this process


def _distributed_type(accelerator: Any) -> str:
    """The run's distributed strategy as checkpoints record it (``NO``, ``MULTI_GPU``, ``FSDP``, ``DEEPSPEED``...)."""
    value = accelerator.distributed_type
    return str(getattr(value, "value", value))


def loop_state(accelerator: Any, args: PretrainingArguments, config: IJepaPretrainingConfig, total_steps: int,
               schedule: PretrainingSchedule, progress: Progress, mask_collator: IJepaMaskCollator,
               data_fingerprint: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint records beside the weights and optimizer: the settings it trained with (compared on
    resume), the loop's position and the mask collator's state."""
    return {"arguments": args.to_dict(), "config": config.to_dict(), "num_processes": accelerator.num_processes,
            "total_steps": total_steps, "schedule": schedule.to_dict(),
            "progress": dataclasses.asdict(progress), "mask_collator": mask_collator.state_dict(),
            # what ran, whichever way it was set (flag, launcher, accelerate config, environment)
            "mixed_precision": accelerator.mixed_precision, "distributed_type": _distributed_type(accelerator),
            "data": data_fingerprint}


def check_run_may_resume(accelerator: Any, path: Path, args: PretrainingArguments, config: IJepaPretrainingConfig,
                         mask_collator: IJepaMaskCollator, data_fingerprint: dict[str, Any],
                         total_steps: int) -> dict[str, Any]:
    """Refuse (``ValueError`` naming every difference) to continue the checkpoint at ``path`` under this run's
    settings, before anything is loaded or moved; returns the checkpoint's loop state."""
    saved = read_manifest(path)["state"]
    check_resume_compatible(saved, args, config, accelerator.num_processes, total_steps,
                            mixed_precision=accelerator.mixed_precision,
                            distributed_type=_distributed_type(accelerator), data=data_fingerprint)
    # Where earlier checkpoints recorded the sampling: beside the collator's state (ijepa-hf 0.1.0 from 2026-12-01
    # to 2026-12-05), or nowhere (before 2026-12-01: they sampled globally).
    saved_sampling = saved["mask_collator"].get("mask_sampling", saved.get("mask_sampling", "global"))
    if accelerator.num_processes > 1 and saved_sampling != mask_collator.mask_sampling:
        raise ValueError(f"Cannot resume exactly: the checkpoint's masks were sampled {saved_sampling}, this run "
                         f"samples them {mask_collator.mask_sampling} (mask_sampling); continue with the "
                         "settings or the version that wrote it, or start anew")
    return saved


def resume_run(accelerator: Any, model: Any, path: Path, args: PretrainingArguments,
               config: IJepaPretrainingConfig, mask_collator: IJepaMaskCollator, data_fingerprint: dict[str, Any],
               schedule: PretrainingSchedule, total_steps: int, batches_per_epoch: int | None) -> Progress:
    """Checks that this run may continue the checkpoint at ``path`` (:func:`check_run_may_resume`, before loading
    anything), loads it into the prepared ``model`` and optimizer, and returns the loop's position;
    ``mask_collator`` continues its sequence. ``batches_per_epoch``: None for streamed data."""
    logger.info("Resuming from %s", path)
    saved = check_run_may_resume(accelerator, path, args, config, mask_collator, data_fingerprint, total_steps)
    load_checkpoint(accelerator, path)
    after_checkpoint_load(accelerator, model)
    progress = Progress(**saved["progress"])
    mask_collator.load_state_dict(saved["mask_collator"])
    if batches_per_epoch is not None and progress.batch_in_epoch >= batches_per_epoch:
        progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0  # saved on an epoch's last batch
    if saved["total_steps"] != total_steps:
        logger.warning("--extend_run: the schedules are recomputed for %d steps (were %d); step %d continues on "
                       "the new curves (lr %.3g)", total_steps, saved["total_steps"],
                       progress.completed_steps + 1, schedule.lr_at(progress.completed_steps + 1))
    return progress


def _comparable_config(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in ("transformers_version", "_name_or_path", "architectures",
                                                          "dtype", "torch_dtype")}


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# Strategies that keep the whole model on every process: a checkpoint of one resumes under another.
_REPLICATED = frozenset({"NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_MUSA",
                         "MULTI_HPU", "MULTI_SDAA", None})


def _process_count_problems(saved: dict[str, Any], args: PretrainingArguments, num_processes: int) -> list[str]:
    """What stops ``--allow_process_count_change`` from continuing ``saved`` on ``num_processes`` processes."""
    old_args = saved["arguments"]
    if saved.get("distributed_type") not in _REPLICATED:
        return [f"a {saved['distributed_type']} checkpoint continues on its own process count only "
                f"({saved['num_processes']}; --allow_process_count_change applies to one-process and data-parallel "
                "runs, whose checkpoints hold the whole model)"]
    old_batch = old_args["per_device_train_batch_size"] * saved["num_processes"]
    new_batch = args.per_device_train_batch_size * num_processes
    if old_batch == new_batch:
        return []
    per_device, rest = divmod(old_batch, num_processes)
    fix = (f"with {num_processes} processes set --per_device_train_batch_size {per_device}" if not rest else
           f"{num_processes} processes cannot share it evenly")
    return [f"the global batch would be {new_batch * args.gradient_accumulation_steps}, the checkpoint's is "
            f"{old_batch * old_args.get('gradient_accumulation_steps', 1)} ({fix})"]


def check_resume_compatible(saved: dict[str, Any], args: PretrainingArguments, config: IJepaPretrainingConfig,
                            num_processes: int, total_steps: int, *, mixed_precision: str | None = None,
                            distributed_type: str | None = None, data: dict[str, Any] | None = None) -> None:
    """Refuse to resume a checkpoint under other settings than it was trained with.

    ``saved`` is the loop state of the checkpoint (its ``arguments``, ``config``, ``num_processes`` and
    ``total_steps``, and the ``mixed_precision`` and ``distributed_type`` that ran: checkpoints written before
    those were recorded lack them, and then the ``--mixed_precision`` flags are compared). Only
    :data:`OPERATIONAL_FIELDS` may differ, and with ``args.extend_run`` a longer run (:data:`SCHEDULE_LENGTH_FIELDS`). ``mixed_precision`` / ``distributed_type``: what this run has, however it was
    set; compared with what the checkpoint ran, rather than the ``--mixed_precision`` flag alone (unset and ``no``
    are the same fp32; a launcher's bf16 is bf16). ``data``: this run's data fingerprint
    (``PretrainingData.fingerprint``): when the checkpoint has one, the images are compared rather than the
    folder's path, so the same data staged elsewhere (a job's local scratch) resumes and changed data does not.
    Another process count is refused unless ``args.allow_process_count_change`` and the global batch is the
    checkpoint's, for one-process and data-parallel checkpoints (which then count as the same strategy).
    Raises ``ValueError`` naming every differing field.
    """
    problems = []
    old_args, new_args = saved["arguments"], args.to_dict()
    ran = {"mixed_precision": saved.get("mixed_precision"), "distributed_type": saved.get("distributed_type")}
    now = {"mixed_precision": mixed_precision, "distributed_type": distributed_type}
    moved = saved["num_processes"] != num_processes and args.allow_process_count_change
    if moved:
        problems += _process_count_problems(saved, args, num_processes)
    for name, value in now.items():
        if name == "distributed_type" and moved and {ran[name], value} <= _REPLICATED:
            continue  # one process and data parallel keep the same whole model on every process
        if ran[name] is not None and value is not None and ran[name] != value:
            problems.append(f"the {name.replace('_', ' ')} is {value!r}, the checkpoint ran with {ran[name]!r}")
    old_data = saved.get("data")
    if old_data is not None and data is not None and old_data != data:
        changed = ", ".join(f"{key} {data.get(key)!r} (was {old_data.get(key)!r})"
                            for key in sorted(set(old_data) | set(data)) if old_data.get(key) != data.get(key))
        problems.append(f"the training data differ from the checkpoint's: {changed}")
    for name, new in new_args.items():
        if name in OPERATIONAL_FIELDS or name not in old_args or old_args[name] == new:
            continue
        if name == "mixed_precision" and ran["mixed_precision"] is not None and mixed_precision is not None:
            continue  # compared as what ran, above
        if name == "train_dir" and old_data is not None and data == old_data and new is not None:
            continue  # the same images at another path
        if name in SCHEDULE_LENGTH_FIELDS and args.extend_run:
            continue
        if name == "per_device_train_batch_size" and moved:
            continue  # compared as the global batch, above
        problems.append(f"--{name} is {new!r}, the checkpoint was trained with {old_args[name]!r}")
    if saved["num_processes"] != num_processes and not moved:
        problems.append(f"{num_processes} processes, the checkpoint was trained on {saved['num_processes']} (with the "
                        "same global batch, --allow_process_count_change continues it on another process count)")
    problems += _config_problems(saved["config"], config)
    if saved["total_steps"] != total_steps:
        if not args.extend_run:
            problems.append(f"the run would last {total_steps} steps, the checkpoint's run {saved['total_steps']} "
                            "(add --extend_run to recompute the schedules for the new length)")
        elif total_steps < saved["progress"]["completed_steps"]:
            problems.append(f"--extend_run: the new length ({total_steps} steps) is shorter than the "
                            f"{saved['progress']['completed_steps']} steps already done")
    _refuse(problems)


def _refuse(problems: list[str]) -> None:
    if problems:
        raise ValueError("Cannot resume exactly: " + "; ".join(problems) + ". Resume with the checkpoint's settings, "
                         "or start a new run (another --output_dir or --overwrite_output_dir).")


# Config fields a model or Trainer fills in while training when they were left unset (a classifier infers its
# problem_type from the labels at its first forward; Trainer turns use_cache off): unset, they match what was saved.
_SET_WHILE_TRAINING = frozenset({"problem_type", "use_cache"})


def _config_problems(saved: dict[str, Any], config: PretrainedConfig) -> list[str]:
    """The fields in which ``config`` differs from a checkpoint's config (``saved``, its ``to_dict()``)."""
    old_config = _flatten(_comparable_config(saved))
    new_config = _flatten(_comparable_config(config.to_dict()))
    # A field added to the config after the checkpoint was written: the checkpoint trained with its default.
    defaults = _flatten(_comparable_config(type(config)().to_dict()))
    return [f"config {key} is {new_config.get(key)!r}, the checkpoint's is {old_config.get(key)!r}"
            for key in sorted(set(old_config) | set(new_config))
            if not (key not in old_config and key in defaults and new_config.get(key) == defaults[key])
            and not (key in _SET_WHILE_TRAINING and new_config.get(key) is None)
            and old_config.get(key) != new_config.get(key)]


def trainer_run_settings(args: Any) -> dict[str, Any]:
    """What defines a ``Trainer`` run among its ``TrainingArguments`` (the learning rate and its schedule, weight
    decay, optimizer, gradient clipping, global batch, seed, precision), as JSON values: resuming under others would
    silently continue another run (Trainer restores the checkpoint's learning rate into its scheduler over a new one,
    for one; another global batch or seed changes which images it skips). Logging, saving and evaluation settings
    may change, and so may the length (``max_steps``, ``num_train_epochs``): the schedule is then recomputed for the
    new length, as ``pretrain()``'s ``--extend_run`` does. A trainer adds its own settings to these."""
    return {
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type),
        "lr_scheduler_kwargs": args.lr_scheduler_kwargs, "warmup_steps": args.warmup_steps,
        "weight_decay": args.weight_decay, "optim": getattr(args.optim, "value", args.optim),
        "adam_beta1": args.adam_beta1, "adam_beta2": args.adam_beta2, "adam_epsilon": args.adam_epsilon,
        "max_grad_norm": args.max_grad_norm,
        "global_batch": args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps,
        "seed": args.seed, "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
    }


class RunSettingsCallback(TrainerCallback, ExportableState):
    """Records the settings that define a ``Trainer`` run (:func:`trainer_run_settings` and the trainer's own: the
    EMA of ``IJepaTrainer``, the layer decay of ``finetune.py``) in every checkpoint's ``trainer_state.json`` (its
    ``stateful_callbacks`` entry under this class's name), where :func:`check_trainer_resume_compatible` compares them
    with the resuming run's. JSON, no pickle."""

    def __init__(self, settings: dict[str, Any] | None = None) -> None:
        self.settings = dict(settings or {})

    def state(self) -> dict[str, Any]:
        return {"args": {"settings": self.settings}, "attributes": {}}


def check_trainer_resume_compatible(checkpoint: str | os.PathLike, settings: dict[str, Any],
                                    config: PretrainedConfig) -> None:
    """Refuse to resume the Trainer checkpoint ``checkpoint`` under other settings than it was trained with (whether
    it can be resumed at all is :func:`~ijepa_hf.training.checkpointing.check_trainer_checkpoint`'s): the model
    config (its ``config.json``) and ``settings`` (what :class:`RunSettingsCallback` records in its
    ``trainer_state.json``; a checkpoint without them, from another trainer, has its config compared only). Raises
    ``ValueError`` naming every differing field, as :func:`check_resume_compatible`."""
    checkpoint = Path(checkpoint)
    saved_config = (json.loads((checkpoint / "config.json").read_text()) if (checkpoint / "config.json").is_file()
                    else None)
    if saved_config is not None:
        held = saved_config.get("model_type")
        if held != config.model_type:  # every field would differ: say what does
            script = {"ijepa_hf_pretraining": "pretrain_trainer.py"}.get(held, "finetune.py")
            raise ValueError(f"Cannot resume {checkpoint}: it holds a model of type {held!r}; this run trains one of "
                             f"type {config.model_type!r}. Continue it with the script that made it ({script} "
                             "--resume_from_checkpoint), or start this run without --resume_from_checkpoint.")
    problems = []
    state = json.loads((checkpoint / TRAINER_STATE_NAME).read_text())
    saved = state.get("stateful_callbacks", {}).get(RunSettingsCallback.__name__)
    if isinstance(saved, list):
        saved = saved[-1] if saved else None
    if saved is not None:
        old, new = saved.get("args", {}).get("settings", {}), json.loads(json.dumps(settings))
        for name in sorted(set(old) & set(new)):  # a setting recorded on one side only is not compared
            if old[name] == new[name]:
                continue
            problems.append(f"the global batch is {new[name]}, the checkpoint's {old[name]}" if name == "global_batch"
                            else f"{name} is {new[name]!r}, the checkpoint was trained with {old[name]!r}")
    if saved_config is not None:
        problems += _config_problems(saved_config, config)
    _refuse(problems)
