"""I-JEPA pretraining with Accelerate: :func:`pretrain`, the library behind ``examples/pretrain.py``.

It reads top to bottom like transformers' ``run_mim_no_trainer.py``: arguments (:mod:`.arguments`), config,
model, data (:mod:`ijepa_hf.data.pretraining`), optimizer and schedules (:mod:`.schedules`), resume
(:mod:`.resume`), the training step (:mod:`.step`), logging (:mod:`.metrics`), export (:mod:`.export`).

A run is safe to leave alone for days:

* checkpoints are atomic, ``--resume_from_checkpoint latest`` takes the newest *complete* checkpoint of *this*
  run, a full disk says so and keeps the earlier checkpoints, and resuming loads no pickled code;
* a resumed run is bitwise the run that was not interrupted (data order, crops and masks are functions of the
  seed and positions; schedules are functions of the update number), and a resume under other settings is refused;
* a folder holding another run is refused, and a second process training into the same folder fails at once;
* a non-finite loss or gradient stops the run at the next log row or checkpoint, naming the step, before any
  non-finite weights are saved; a rank that died makes the others fail after ``--ddp_timeout`` seconds;
* a pre-emption signal (``--preemption_signals``, :mod:`.preemption`) stops every process after the same update
  with a complete checkpoint: :class:`~ijepa_hf.training.preemption.TrainingPreempted`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import DistributedType, InitProcessGroupKwargs, broadcast_object_list, set_seed
from tqdm.auto import tqdm

from ..data import (LOAD_SECONDS_KEY, BadImageCounter, MaskedBatchCollator, build_pretraining_data,
                    build_validation_data)
from ..masking import IJepaMaskCollator
from .arguments import PretrainingArguments, build_config, parse_args
from .checkpointing import (
    OutputDirLock,
    RunFolder,
    prepare_output_dir,
    save_checkpoint,
    write_run_file,
)
from .distributed import (
    EmaMode,
    configure_distributed,
    mask_collator_for_process,
    match_deepspeed_config,
    run_on_main_process,
)
from .export import push_output_dir, save_final_model, training_summary
from .kernels import set_attention_implementation
from .metrics import (
    HELD_OUT_KEYS,
    TRAIN_LOG_NAME,
    CollapseMonitor,
    LogWindow,
    append_train_log,
    read_train_log,
    throughput_summary,
    truncate_train_log,
)
from .optim import build_optimizer
from .preemption import PreemptionHandler, TrainingPreempted, ignore_signals, parse_signals
from .recipes import predictor_size_note
from .resume import Progress, check_run_may_resume, loop_state, resume_run
from .schedules import PretrainingSchedule
from .step import NonFiniteLossError, PretrainingStep, dummy_batch_factory, weights_are_finite

logger = logging.getLogger(__name__)

__all__ = ["PretrainingArguments", "PretrainingResult", "pretrain", "parse_args"]

TRACKER_PROJECT_NAME = "ijepa_pretraining"


@dataclass
class PretrainingResult:
    """What :func:`pretrain` returns (on every process; paths are those written by the main process)."""

    final_loss: float | None
    global_step: int
    total_steps: int
    epochs_completed: float
    output_dir: str
    encoder_dir: str
    log_file: str
    bad_images: int
    images_per_s: float
    train_runtime_s: float
    resumed_from: str | None = None
    hub_url: str | None = None
    # Seconds spent in the online probe (inside train_runtime_s) and its last k-NN accuracy (None: no probe ran).
    online_probe_s: float = 0.0
    online_knn_accuracy: float | None = None
    # The loss on the held-out images at the end (None: no held-out loss asked for).
    eval_loss: float | None = None
    # The trained (unwrapped) model, for in-process use, e.g. checks in a notebook; not part of to_dict().
    model: Any = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}


def pretrain(args: PretrainingArguments) -> PretrainingResult:
    """Run I-JEPA pretraining (see the module docstring); returns a :class:`PretrainingResult`.

    Works under plain ``python`` (one process) and ``accelerate launch`` (DDP; FSDP / DeepSpeed configs: see
    ``docs/distributed.md``). Writes to ``args.output_dir``: ``train_log.jsonl``, ``step_<N>/`` checkpoints,
    TensorBoard logs (``--with_tracking``), and at the end the pretraining model (``config.json``,
    ``model.safetensors``, ``preprocessor_config.json``, ``README.md``) plus ``encoder/`` (the target encoder as a
    standalone ``IJepaEncoderModel`` with its image processor and card).
    """
    from .compilation import configure_inductor_for_variable_masks
    from .cpu_allocator import keep_freed_memory_for_reuse

    output_dir = Path(args.output_dir)
    if args.torch_compile:
        configure_inductor_for_variable_masks()
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=[t.strip() for t in args.report_to.split(",")] if args.with_tracking else None,
        project_dir=str(output_dir),
        # Each rank collates its own rows of the global batch (the mask collator knows its rank); dispatching
        # would run the collator once on rank 0 with the wrong batch size. Non-blocking copies from pinned memory
        # (on CUDA) let the host queue the next step while the device still runs this one; a blocking copy waits
        # for every kernel queued before it.
        dataloader_config=DataLoaderConfiguration(dispatch_batches=False, split_batches=False,
                                                  non_blocking=True),
        dynamo_backend="inductor" if args.torch_compile and args.torch_compile_scope == "model" else None,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout))],
    )
    if accelerator.device.type == "cpu" and accelerator.mixed_precision == "fp16":
        # Accelerate would train in fp32 and report fp16: refused rather than silently reinterpreted.
        raise ValueError("fp16 mixed precision is not applied on CPU (the weights would be fp32's while the log and the "
                         "card said fp16): use --mixed_precision bf16, or no, on CPU")
    ema = configure_distributed(accelerator)  # before any prepare(): may turn an FSDP2 config on CPUs into FSDP2
    _configure_logging(accelerator.is_main_process)
    if accelerator.device.type == "cpu":
        keep_freed_memory_for_reuse()
    _require_process_group(accelerator)
    logger.info("Accelerator: %s", accelerator.state)
    logger.info("EMA target encoder update: %s", ema.value)
    if args.demo_defaults_applied:
        logger.info("No data source given: training on the embedded demo data with its settings %s (any of them "
                    "can be set explicitly)", args.demo_defaults_applied)

    # ---- what the run is: config, data and model, checked before anything is written into output_dir, so that a
    # failed start (a typo in an override, a missing image column, a wrong model path) leaves the folder as it was
    config = build_config(args)
    # The masks first: a grid the sampler cannot work on is refused before any image is indexed (minutes for a
    # large folder)
    mask_collator = mask_collator_for_process(config, seed=args.seed, num_processes=accelerator.num_processes,
                                              process_index=accelerator.process_index)
    counter = BadImageCounter()
    data = build_pretraining_data(
        image_size=_square(config.encoder_config.image_size), seed=args.seed, crop_scale=args.crop_range,
        counter=counter, dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name,
        train_dir=args.train_dir, image_column_name=args.image_column_name, dataset_split=args.dataset_split,
        streaming=args.streaming, shuffle_buffer_size=args.shuffle_buffer_size,
        max_train_samples=args.max_train_samples, embedded_num_images=args.embedded_num_images,
        embedded_scene_settings=args.embedded_scene_settings, cache_dir=args.cache_dir, token=args.hub_token,
        # uint8 images leave the workers (a quarter of the bytes to pin and copy) and are finished on the device
        # (data.model_inputs); every sample's epoch and mask index travel with its key (SampleKey)
        uint8_images=True, batch_size=args.per_device_train_batch_size, num_processes=accelerator.num_processes,
    )
    validation = None
    if args.evaluates:  # the held-out images of eval_loss, read in order with the training crop and masks
        validation = build_validation_data(
            image_size=_square(config.encoder_config.image_size), seed=args.seed, crop_scale=args.crop_range,
            counter=BadImageCounter(), dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name,
            train_dir=args.train_dir, validation_dir=args.validation_dir,
            validation_split_name=args.validation_split_name, image_column_name=args.image_column_name,
            max_eval_samples=args.max_eval_samples, embedded_scene_settings=args.embedded_scene_settings,
            cache_dir=args.cache_dir, token=args.hub_token, uint8_images=True, batch_size=args.eval_batch_size,
            num_processes=accelerator.num_processes)
    length = RunLength.of(args, data.num_images, accelerator.num_processes)
    set_seed(args.seed)  # the same init on every rank: seeded right before construction
    model = _build_model(args, config)
    if args.gradient_checkpointing:
        # transformers 5.x renamed the method (the old name warns and goes away in v6).
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    if args.torch_compile and args.torch_compile_scope == "blocks":
        from .compilation import compile_blocks

        logger.info("torch.compile: %d transformer blocks compiled (one graph for every layer)", compile_blocks(model))

    def check_resume(checkpoint: Path) -> None:  # before the policy moves anything (a later branch, set aside)
        check_run_may_resume(accelerator, checkpoint, args, config, mask_collator, data.fingerprint(),
                             length.total_steps)

    # ---- output folder: lock, policy, run identity (the main process decides, every rank learns the outcome)
    lock: OutputDirLock | None = None
    outcome: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            lock = OutputDirLock(output_dir).acquire()
            outcome = [prepare_output_dir(output_dir, resume_from_checkpoint=args.resume_from_checkpoint,
                                          overwrite_output_dir=args.overwrite_output_dir, check_resume=check_resume)]
        except Exception as error:  # noqa: BLE001 - re-raised on every rank below
            outcome = [error]
    if accelerator.num_processes > 1:
        outcome = broadcast_object_list(outcome)
    # The processes agree on a stop after every update on the host (gloo), never waiting for the device.
    handler = PreemptionHandler.for_this_process(parse_signals(args.preemption_signals), args.ddp_timeout)
    try:
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        folder = _OutputFolder(accelerator, output_dir, lock, outcome[0].run_id)
        with handler as preemption:
            return _train(args, accelerator, folder, outcome[0], ema, preemption, config, model, data, counter,
                          length, validation, mask_collator)
    finally:
        if lock is not None:
            lock.release()


@dataclass(frozen=True)
class RunLength:
    """How long the run is, known before anything is written (a warm-up longer than the run is refused then)."""

    batches_per_epoch: int | None  # micro-batches per process and epoch (None: streamed data)
    steps_per_epoch: int | None
    total_steps: int
    num_epochs: int | None
    warmup_steps: int

    @classmethod
    def of(cls, args: PretrainingArguments, num_images: int | None, num_processes: int) -> RunLength:
        batches = None
        if num_images is not None:
            # Complete global batches only (the sampler's and the loader's drop_last)
            batches = num_images // (args.per_device_train_batch_size * num_processes)
            if batches == 0:
                raise ValueError(
                    f"{num_images} images are fewer than one global batch ({args.per_device_train_batch_size} x "
                    f"{num_processes} processes); lower --per_device_train_batch_size or add data")
        steps_per_epoch = None if batches is None else math.ceil(batches / args.gradient_accumulation_steps)
        total = args.max_train_steps or args.num_train_epochs * steps_per_epoch
        if args.warmup_steps is not None and args.warmup_steps > total:
            raise ValueError(f"--warmup_steps {args.warmup_steps} is longer than the run ({total} steps): the "
                             "learning rate would never reach its peak; lower it, or use --warmup_ratio")
        warmup = args.warmup_steps if args.warmup_steps is not None else int(args.warmup_fraction * total)
        return cls(batches, steps_per_epoch, total, None if batches is None else math.ceil(total / steps_per_epoch),
                   warmup)


class _OutputFolder:
    """The run's output folder as the training loop uses it: its path, its run id, and the guard of its lock.

    :meth:`guard` runs before the loop writes there (log rows, checkpoints, the export): a folder deleted, or moved
    away, while the run trains is recreated with a new lock and ``run.json`` (with a warning: what was in it is
    gone), and when another run holds it by then, every rank stops with :class:`OutputDirInUseError` rather than
    write into that run's folder."""

    def __init__(self, accelerator: Accelerator, path: Path, lock: OutputDirLock | None, run_id: str) -> None:
        self.accelerator, self.path, self.lock, self.run_id = accelerator, path, lock, run_id

    def guard(self, step: int) -> None:
        def restore() -> None:
            if self.lock is not None and not self.lock.still_held():
                self.lock.reacquire()
                write_run_file(self.path, self.run_id)
                logger.warning("%s was deleted while the run was training (its lock file went with it): recreated "
                               "it with a new lock and run.json at step %d; the checkpoints and log rows written "
                               "there before are lost", self.path, step)

        run_on_main_process(self.accelerator, restore)


def _train(args: PretrainingArguments, accelerator: Accelerator, folder: _OutputFolder, run: RunFolder,
           ema: EmaMode, preemption: PreemptionHandler, config: Any, model: Any, data: Any,
           counter: BadImageCounter, length: RunLength, validation: Any,
           mask_collator: IJepaMaskCollator) -> PretrainingResult:
    image_size = _square(config.encoder_config.image_size)
    output_dir = folder.path

    # ---- data
    dataloader = data.dataloader(args.per_device_train_batch_size, MaskedBatchCollator(mask_collator),
                                 num_workers=args.num_workers, prefetch_factor=args.prefetch_factor,
                                 pin_memory=accelerator.device.type == "cuda",
                                 worker_init_fn=functools.partial(ignore_signals, preemption.signals))

    # ---- optimizer
    optimizer = build_optimizer(
        model, lr=args.learning_rate,
        weight_decay=args.weight_decay, betas=(args.adam_beta1, args.adam_beta2),
    )
    set_attention_implementation(model, args.attn_implementation, mask_collator,
                                 batch_size=args.per_device_train_batch_size, seed=args.seed,
                                 device=accelerator.device, autocast=accelerator.autocast,
                                 num_processes=accelerator.num_processes)  # before prepare(): no all-reduce runs
    match_deepspeed_config(accelerator, gradient_accumulation_steps=args.gradient_accumulation_steps,
                           max_grad_norm=args.clip_grad_norm, skip_nonfinite_steps=args.skip_nonfinite_steps)
    model, optimizer, dataloader = accelerator.prepare(model, optimizer, dataloader)

    # ---- run length (computed before anything was written) and schedules
    sized = data.num_images is not None
    batches_per_epoch, total_steps, num_epochs = length.batches_per_epoch, length.total_steps, length.num_epochs
    if sized and len(dataloader) != batches_per_epoch:  # the prepared loader's length is per process
        raise RuntimeError(f"internal: the prepared loader has {len(dataloader)} batches per epoch, the run "
                           f"length was computed for {batches_per_epoch}")
    schedule = PretrainingSchedule(
        total_steps=total_steps, warmup_steps=length.warmup_steps, start_lr=args.start_lr,
        peak_lr=args.learning_rate, final_lr=args.final_lr, start_weight_decay=args.weight_decay,
        final_weight_decay=args.final_weight_decay, ema_start=config.ema_momentum[0], ema_end=config.ema_momentum[1],
    )

    # ---- resume
    progress = Progress()
    if run.resume_from is not None:
        progress = resume_run(accelerator, model, run.resume_from, args, config, mask_collator, data.fingerprint(),
                              schedule, total_steps, batches_per_epoch)
    log_path = output_dir / TRAIN_LOG_NAME
    if accelerator.is_main_process:
        if run.resume_from is None:
            log_path.unlink(missing_ok=True)
        else:
            truncate_train_log(log_path, progress.completed_steps)

    global_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    run_info = {"total_steps": total_steps, "warmup_steps": schedule.warmup_steps, "global_batch_size": global_batch,
                "num_processes": accelerator.num_processes, "data": data.description,
                "mixed_precision": accelerator.mixed_precision}
    if args.with_tracking:
        accelerator.init_trackers(TRACKER_PROJECT_NAME, _tracker_config(args, run_info))
    logger.info("***** Running I-JEPA pretraining *****")
    logger.info("  Data = %s", data.description)
    logger.info("  Model = %s parameters (%s trainable)", f"{_unwrap(accelerator, model).num_parameters():,}",
                f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,}")
    logger.info("  Batch per device = %d, processes = %d, accumulation = %d, global batch = %d",
                args.per_device_train_batch_size, accelerator.num_processes, args.gradient_accumulation_steps,
                global_batch)
    logger.info("  Optimizer steps = %d (warmup %d), epochs = %s, starting at step %d", total_steps,
                schedule.warmup_steps, num_epochs if sized else "streamed", progress.completed_steps)
    logger.info("  Masks: %r", mask_collator)
    predictor_note = predictor_size_note(_unwrap(accelerator, model).config)
    if predictor_note:
        logger.warning(predictor_note)

    saved: list[Path] = []

    def save(step: int) -> None:
        step_fn.check()  # never save after a non-finite update
        if not _all_finite(accelerator, model):
            raise NonFiniteLossError(step, schedule.lr_at(step), ": the weights are no longer finite")
        folder.guard(step)
        state = loop_state(accelerator, args, config, total_steps, schedule, progress, mask_collator,
                           data.fingerprint())
        saved.append(save_checkpoint(accelerator, output_dir, step, run.run_id, state, args.checkpoints_total_limit))

    # ---- train
    step_fn = PretrainingStep(accelerator, model, optimizer, schedule, max_grad_norm=args.clip_grad_norm,
                              dummy_batch=dummy_batch_factory(mask_collator, config, accelerator.device),
                              skip_nonfinite_steps=args.skip_nonfinite_steps, ema_mode=ema)
    window = LogWindow(accelerator.device, loader_workers=max(1, args.num_workers))
    monitor = CollapseMonitor(min_std=args.collapse_threshold, max_cosine=args.collapse_max_cosine)
    probe = _OnlineProbe.build(args, data, image_size, total_steps, ema)
    held_out = _HeldOutLoss.build(args, accelerator, config, validation, total_steps)
    final_loss: float | None = None
    bar = tqdm(total=total_steps, initial=progress.completed_steps, desc="pretraining", dynamic_ncols=True,
               disable=args.disable_tqdm or not accelerator.is_local_main_process)
    start_time, start_images = time.perf_counter(), progress.images_seen
    good_batches = 0  # batches with at least one readable image, in this invocation
    model.train()
    while progress.completed_steps < total_steps and (not sized or progress.epoch < num_epochs):
        for source in (data.sampler, data.dataset):
            if hasattr(source, "set_epoch"):
                source.set_epoch(progress.epoch)
        # Map-style data: the sampler's keys carry each sample's epoch and mask index to the workers. A stream's
        # batches are counted by the collator, whose workers are started anew each epoch from this count.
        mask_collator.set_step(progress.batches_seen)
        epoch_loader = (accelerator.skip_first_batches(dataloader, progress.batch_in_epoch)
                        if progress.batch_in_epoch else dataloader)
        # Accelerate's loaders call set_epoch(<their own iteration counter>) when iterated; a skip-loader made on
        # resume starts that counter at 0, so pin it to the real epoch.
        epoch_loader.set_epoch(progress.epoch)
        for batch in _timed(epoch_loader, window):
            progress.batch_in_epoch += 1
            progress.batches_seen += 1
            update = progress.completed_steps + 1
            is_log_step = (update % args.logging_steps == 0 or update == total_steps or probe.due(update)
                           or held_out.due(update))
            out = step_fn(None if batch is None else data.model_inputs(batch), update, want_stats=is_log_step)
            progress.images_seen += out.num_images
            good_batches += out.loss is not None
            window.add(out.loss, out.num_images, out.context_patches, out.target_patches, out.stats, out.terms)
            if not out.updated:
                continue
            progress.completed_steps = step = update
            bar.update(1)
            if is_log_step:
                step_fn.check()  # the log row syncs anyway: a non-finite update stops the run here
                epoch = progress.epoch + (progress.batch_in_epoch / batches_per_epoch if sized else 0)
                row = window.flush(accelerator, step=step, epoch=epoch, **schedule.values_at(step))
                if row is not None and probe.due(step):
                    row.update(probe.run(model, _unwrap(accelerator, model).target_encoder, accelerator))
                    window.exclude(row["online_probe_seconds"])
                if row is not None and held_out.due(step):
                    row.update(held_out.run(model, accelerator))
                    window.exclude(row["eval_seconds"])
                if row is not None:
                    final_loss = float(row["loss"])
                    folder.guard(step)
                    _log_row(accelerator, args, log_path, row, bar)
                    monitor.check(row)
            if args.checkpointing_steps not in (None, "epoch") and step % int(args.checkpointing_steps) == 0:
                save(step)
            if step >= total_steps:
                break
            if preemption.stop_requested():
                if not saved or saved[-1].name != f"step_{step}":
                    save(step)
                bar.close()
                if args.with_tracking:
                    accelerator.end_training()
                raise TrainingPreempted(step, str(saved[-1]), preemption.received.name)
        else:  # the epoch ran to its end
            # Without readable images the run would only make zero-loss steps (forever, if streamed).
            _require_good_batches(accelerator, good_batches, data.description, counter)
            progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
            if args.checkpointing_steps == "epoch":
                save(progress.completed_steps)
            continue
        _require_good_batches(accelerator, good_batches, data.description, counter)
        break
    bar.close()
    step_fn.check()
    if not _all_finite(accelerator, model):
        raise NonFiniteLossError(progress.completed_steps, schedule.lr_at(max(1, progress.completed_steps)),
                                 ": the final weights are not finite; they were not saved")
    runtime = time.perf_counter() - start_time
    images_per_s = (progress.images_seen - start_images) * accelerator.num_processes / max(runtime, 1e-9)

    # ---- bad images (summed over ranks; the counter also sees DataLoader workers)
    bad = int(accelerator.reduce(torch.tensor([counter.count], device=accelerator.device), "sum").item())
    if bad:
        logger.warning("Skipped %d unreadable image(s) during training: %s", bad, counter)
    else:
        logger.info("No unreadable images.")
    if step_fn.skipped_updates:
        logger.warning("Skipped %d non-finite update(s) (--skip_nonfinite_steps)", step_fn.skipped_updates)
    # the main process writes the log; its rows give the throughput line and the card's measured rows
    log_rows = read_train_log(log_path) if accelerator.is_main_process and log_path.exists() else []
    if log_rows:
        limits = throughput_summary(log_rows, args.num_workers, accelerator.device.type != "cpu")
        if limits:
            logger.info(limits)
    if held_out.data is not None:
        held_out.report()
    if probe.seconds:
        logger.info("Online probe: %.1f s of %.1f s of training (%.1f%%), last k-NN accuracy %.3f (raw pixels: %.3f)",
                    probe.seconds, runtime, 100 * probe.seconds / max(runtime, 1e-9), probe.last_accuracy,
                    probe.pixels_accuracy)

    # ---- export
    summary = training_summary(
        args, config, data_description=data.description, schedule=schedule,
        completed_steps=progress.completed_steps, num_processes=accelerator.num_processes,
        mixed_precision=accelerator.mixed_precision, final_loss=final_loss, bad_images=bad, images_per_s=images_per_s,
        log_rows=log_rows)
    folder.guard(progress.completed_steps)
    encoder_dir = save_final_model(
        accelerator, model, config, args, output_dir, summary, data.hub_dataset,
        sharded=accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED), run_id=run.run_id)
    hub_url = None
    if accelerator.is_main_process:
        # A run that finished is not trained again by --resume_from_checkpoint latest (e.g. to retry a push)
        write_run_file(output_dir, run.run_id, finished_step=progress.completed_steps)
    if args.push_to_hub:
        hub_url = run_on_main_process(accelerator, functools.partial(
            push_output_dir, output_dir, args.hub_model_id, token=args.hub_token, private=args.hub_private_repo))
    accelerator.wait_for_everyone()
    if args.with_tracking:
        accelerator.end_training()
    return PretrainingResult(
        final_loss=final_loss, global_step=progress.completed_steps, total_steps=total_steps,
        epochs_completed=(progress.epoch + progress.batch_in_epoch / batches_per_epoch) if sized else 0.0,
        output_dir=str(output_dir), encoder_dir=str(encoder_dir), log_file=str(log_path), bad_images=bad,
        images_per_s=images_per_s, train_runtime_s=runtime,
        resumed_from=None if run.resume_from is None else str(run.resume_from), hub_url=hub_url,
        online_probe_s=probe.seconds, online_knn_accuracy=probe.last_accuracy, eval_loss=held_out.last,
        model=_unwrap(accelerator, model),
    )


# --------------------------------------------------------------------------------------------------------------
# Helpers of pretrain()
# --------------------------------------------------------------------------------------------------------------


def _configure_logging(is_main: bool) -> None:
    """Quiet datasets/transformers on non-main processes (the example-script convention)."""
    import datasets
    import transformers

    if logging.getLogger().handlers == []:
        logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                            level=logging.INFO if is_main else logging.ERROR)
    for name in ("ijepa_hf.training", "ijepa_hf.data"):
        logging.getLogger(name).setLevel(logging.INFO if is_main else logging.ERROR)
    if is_main:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()


def _timed(loader: Any, window: LogWindow) -> Any:
    """Iterate ``loader``, telling ``window`` how long each batch was waited for and how long it took to make."""
    iterator = iter(loader)
    while True:
        started = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        made, images = (None, 0) if batch is None else (batch.get(LOAD_SECONDS_KEY), len(batch["pixel_values"]))
        window.add_loading(time.perf_counter() - started, made, images)
        yield batch


def _require_process_group(accelerator: Any) -> None:
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:
        # Accelerate only builds a CPU process group when asked to use the CPU; otherwise every launched process
        # would train alone and all of them would write to the same output_dir.
        raise RuntimeError(
            f"{launched} processes were launched (WORLD_SIZE={launched}) but Accelerate set up no process group. "
            "On a machine without GPUs set ACCELERATE_USE_CPU=1 for data-parallel CPU training (gloo), e.g. "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ...` (see docs/distributed.md)."
        )


def _square(image_size: int | list[int]) -> int:
    if isinstance(image_size, int):
        return image_size
    if image_size[0] != image_size[1]:
        raise ValueError(f"only square training images are supported, got image_size {image_size}")
    return image_size[0]


def _build_model(args: PretrainingArguments, config: Any) -> Any:
    from ..modeling_ijepa_hf import IJepaForPreTraining

    if args.model_name_or_path is None:
        return IJepaForPreTraining(config)
    return IJepaForPreTraining.from_pretrained(args.model_name_or_path, config=config, cache_dir=args.cache_dir,
                                                 token=args.hub_token)


def _unwrap(accelerator: Any, model: Any) -> Any:
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def _all_finite(accelerator: Any, model: Any) -> bool:
    """Whether the weights are finite on every rank (a collective)."""
    finite = torch.tensor([float(weights_are_finite(model))], device=accelerator.device)
    return bool(accelerator.reduce(finite, "sum").item() == accelerator.num_processes)


class _OnlineProbe:
    """``--online_probe_*``: the labelled probe set and when to run :func:`online_probe` on the target encoder.

    Every rank runs it (a sharded target encoder needs all ranks in its forward); the main process logs it."""

    def __init__(self, probe_set: Any, every: int, total_steps: int, k: int) -> None:
        self.probe_set, self.every, self.total_steps, self.k = probe_set, every, total_steps, k
        self.seconds = 0.0
        self.last_accuracy: float | None = None
        self.pixels_accuracy: float | None = None  # the same k-NN on the probe set's raw pixels

    @classmethod
    def build(cls, args: PretrainingArguments, data: Any, image_size: int, total_steps: int, ema: Any
              ) -> _OnlineProbe:
        from ..data import build_online_probe_set
        from .distributed import EmaMode

        explicit = args.online_probe_steps is not None
        if args.online_probe_steps == 0:
            return cls(None, 0, total_steps, args.online_probe_k)
        if ema == EmaMode.GATHERED:
            if explicit:
                raise ValueError("--online_probe_steps is not supported under DeepSpeed ZeRO-3 (the target encoder "
                                 "is partitioned outside any engine forward); leave it unset or use FSDP2.")
            logger.info("Online probe off: not supported under DeepSpeed ZeRO-3.")
            return cls(None, 0, total_steps, args.online_probe_k)
        probe_set = build_online_probe_set(data, image_size=image_size, num_images=args.online_probe_images,
                                           label_column=args.online_probe_label_column, seed=args.seed)
        if probe_set is None:
            if explicit:
                raise ValueError(f"--online_probe_steps needs labels, but {data.description} has no 'label' "
                                 "column; name one with --online_probe_label_column, or set --online_probe_steps 0.")
            logger.info("Online probe off: %s has no labels (name a column with --online_probe_label_column).",
                        data.description)
            return cls(None, 0, total_steps, args.online_probe_k)
        from .metrics import default_online_probe_steps

        every = args.online_probe_steps if explicit else default_online_probe_steps(total_steps, args.logging_steps)
        logger.info("Online probe every %d updates: %s", every, probe_set.description)
        return cls(probe_set, every, total_steps, args.online_probe_k)

    def due(self, step: int) -> bool:
        return self.probe_set is not None and (step % self.every == 0 or step == self.total_steps)

    def run(self, model: torch.nn.Module, encoder: torch.nn.Module, accelerator: Accelerator) -> dict[str, float]:
        """``model``: the prepared model; ``encoder``: its target encoder. Under FSDP2 the root module's own
        parameters (patch embedding, final norm) are gathered by the root's forward, which the probe bypasses, so the
        root is unsharded around it; the blocks gather themselves."""
        from .metrics import online_probe

        unshard = getattr(model, "unshard", None)
        if unshard is not None:
            unshard()
        try:
            values = online_probe(encoder, self.probe_set.pixel_values, self.probe_set.labels, k=self.k,
                                  autocast=accelerator.autocast)
        finally:
            if unshard is not None:
                model.reshard()
        self.seconds += values["online_probe_seconds"]
        self.last_accuracy = values["online_knn_accuracy"]
        self.pixels_accuracy = values["online_knn_pixels_accuracy"]
        return values


class _HeldOutLoss:
    """``--eval_steps`` / ``--validation_*``: the loss the run minimises, on held-out images
    (:func:`~ijepa_hf.data.build_validation_data`), every ``every`` updates and at the end. The images are read in
    order and their crops and masks are picked by their position, so every evaluation sees the same inputs; the
    training's mask collator, data order and RNG are not touched, so evaluating does not change the training."""

    def __init__(self, data: Any, loader: Any, every: int, total_steps: int) -> None:
        self.data, self.loader, self.every, self.total_steps = data, loader, every, total_steps
        self.last: float | None = None

    @classmethod
    def build(cls, args: PretrainingArguments, accelerator: Accelerator, config: Any, data: Any, total_steps: int
              ) -> _HeldOutLoss:
        if data is None:
            return cls(None, None, 0, total_steps)
        collator = mask_collator_for_process(config, seed=args.seed, num_processes=accelerator.num_processes,
                                             process_index=accelerator.process_index)
        loader = data.dataloader(args.eval_batch_size, MaskedBatchCollator(collator),
                                 pin_memory=accelerator.device.type == "cuda")
        every = args.eval_steps or total_steps  # held-out images named without --eval_steps: at the end only
        logger.info("Held-out loss every %d updates and at the end: %s", every, data.description)
        return cls(data, accelerator.prepare_data_loader(loader), every, total_steps)

    def due(self, step: int) -> bool:
        return self.data is not None and (step % self.every == 0 or step == self.total_steps)

    def run(self, model: torch.nn.Module, accelerator: Accelerator) -> dict[str, float]:
        """Every rank takes part: the mean loss over the held-out batches of all ranks (images of an incomplete
        last batch are left out, as in training). Unreadable images are skipped and counted; with none readable the
        row has no ``eval_loss`` and a warning says why."""
        started = time.perf_counter()
        total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
        # Accelerate's loader passes its own iteration count to the sampler and dataset as their epoch, which would
        # give every evaluation other crops and masks: pinned to epoch 0.
        self.loader.set_epoch(0)
        model.eval()
        try:
            with torch.no_grad():
                for batch in self.loader:
                    if batch is None:  # no readable image in it
                        continue
                    inputs = self.data.model_inputs(batch)
                    count = inputs["pixel_values"].shape[0]
                    total += torch.stack([model(**inputs).loss.double() * count,
                                          torch.tensor(count, dtype=torch.float64, device=total.device)])
        finally:
            model.train()
        loss_sum, count = accelerator.reduce(total, "sum").tolist()
        if count == 0:  # a broken copy or a lost mount: said, but a long run is not stopped for its yardstick
            logger.warning("No readable image among the held-out images (%s): no eval_loss this time; the unreadable "
                           "files are named above.", self.data.description)
            self.last = None
            return {"eval_seconds": time.perf_counter() - started}
        self.last = loss_sum / count
        return {"eval_loss": self.last, "eval_seconds": time.perf_counter() - started}

    def report(self) -> None:
        bad = self.data.dataset.counter
        if bad.count:
            logger.warning("Skipped %d unreadable held-out image(s) over the evaluations: %s", bad.count, bad)
        if self.last is not None:
            logger.info("Held-out loss at the end: %.5f (%s)", self.last, self.data.description)


def _require_good_batches(accelerator: Any, good_batches: int, description: str, counter: BadImageCounter) -> None:
    """Raise (on every rank alike) when no rank has had a single readable image so far."""
    if accelerator.reduce(torch.tensor([good_batches], device=accelerator.device), "sum").item() == 0:
        raise RuntimeError(f"the training data ({description}) yielded no readable image in a whole epoch "
                           f"or run ({counter}): check the data and --image_column_name")


def _tracker_config(args: PretrainingArguments, extra: dict[str, Any]) -> dict[str, Any]:
    """Flat hparams for trackers (TensorBoard accepts only int/float/str/bool); no secrets."""
    values = {**args.to_dict(), **extra}
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()}


def _log_row(accelerator: Any, args: PretrainingArguments, log_path: Path, row: dict[str, Any], bar: Any) -> None:
    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
    if args.with_tracking:
        # the held-out loss under eval/, as transformers' Trainer names it
        accelerator.log({(f"eval/{k[len('eval_'):]}" if k in HELD_OUT_KEYS else f"train/{k}"): v
                         for k, v in row.items() if k != "step" and v == v}, step=row["step"])
    if accelerator.is_main_process:
        append_train_log(log_path, row)
