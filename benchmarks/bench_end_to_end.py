"""Pretraining end to end against its own step: does ``pretrain()`` on a JPEG folder run at the bare step's speed?

In one process, on the same model, batch, precision and masks (official masks by default), with a folder of
generated JPEGs of ImageNet's typical size (500 x 375 px):

* **step**: the bare training step through the public API, on batches already on the device (images decoded,
  cropped and normalised beforehand): ``model(**batch).loss``, backward, AdamW over ``build_optimizer``'s official
  groups, ``update_target_encoder``;
* **loader**: the run's data pipeline alone (``build_pretraining_data`` on the folder, ``PretrainingData.dataloader``
  with the mask collator, copies to the device), images/s;
* **loop**: ``pretrain()`` (``ijepa_hf.training``, the function behind ``examples/pretrain.py``) on the folder, its
  steady-state images/s read from its own log (the first window, with start-up, left out), with the share of time it
  waited for data; on CPU also its rate with that wait taken out (the data excluded), to set against the step;
* **trainer** (``--trainer``): ``IJepaTrainer`` with the same data through ``TrainingArguments``;
* **official** (when ``$IJEPA_OFFICIAL_ROOT`` / ``--official-root`` names a facebookresearch/ijepa checkout and the
  model is an official size): the official code's bare step (its ``train_step`` body, imported from the checkout at
  run time, ``official_code.py``) on the same batches;
* **host syncs per step** of ``pretrain()``: counted by ``ijepa_hf.training.host_syncs.HostSyncCounter`` in two runs
  that differ only in their number of steps (CUDA's sync report on a GPU); **device busy**: on CUDA the driver's
  utilisation sampled during the loop (needs ``pynvml``), on CPU the loop's share of time not waiting for data.

The last line printed is one JSON object (``model``, ``batch``, ``device``, ``step_images_per_s``,
``loop_images_per_s``, ``loader_images_per_s``, ``ratio`` = loop / step, and the rest).

    python benchmarks/bench_end_to_end.py --device cpu                       # the main job's model, batch 16
    python benchmarks/bench_end_to_end.py --device cpu --model vit_small_patch16_224 --batch 16
    python benchmarks/bench_end_to_end.py --device cuda --model ijepa_vith14_in1k --batch 128 --num-workers 14 \\
        --trainer                                                            # see benchmarks/gpu_check.sh
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
import torch
from PIL import Image

from ijepa_hf import IJepaForPreTraining
from ijepa_hf.data import MaskedBatchCollator, build_pretraining_data
from ijepa_hf.training import build_config, build_optimizer, keep_freed_memory_for_reuse, parse_args, pretrain
from ijepa_hf.training.arguments import EMBEDDED_DEMO_MODEL
from ijepa_hf.training.distributed import mask_collator_for_process
from ijepa_hf.training.host_syncs import HostSyncCounter
from ijepa_hf.training.metrics import read_train_log

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_description  # noqa: E402  benchmarks/machine.py, beside this script

MAIN_JOB = "main"
# Official model names of the official code's vision_transformer.py, by width.
OFFICIAL_NAMES = {192: "vit_tiny", 384: "vit_small", 768: "vit_base", 1024: "vit_large", 1280: "vit_huge",
                  1408: "vit_giant"}


# ---------------------------------------------------------------------------------------------------------------
# The JPEG folder
# ---------------------------------------------------------------------------------------------------------------


def _write_jpeg(job: tuple[str, int, int, int]) -> int:
    path, seed, width, height = job
    rng = np.random.default_rng(seed)
    # Smooth colour fields plus grain: about ImageNet's bytes per image at JPEG quality 90.
    low = rng.integers(0, 256, (height // 12, width // 12, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(low).resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    image += rng.normal(0.0, 10.0, image.shape)
    Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return os.path.getsize(path)


def jpeg_folder(root: Path, count: int, size: tuple[int, int] = (500, 375)) -> tuple[Path, float]:
    """``count`` JPEGs under ``root/images/class0`` (written once, reused); returns the folder and the mean KB."""
    folder = root / "images" / "class0"
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(str(folder / f"{i:06d}.jpg"), i, *size) for i in range(count)
            if not (folder / f"{i:06d}.jpg").exists()]
    if jobs:
        with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
            list(pool.map(_write_jpeg, jobs, chunksize=64))
    sizes = [p.stat().st_size for p in sorted(folder.iterdir())[:count]]
    return folder.parent, sum(sizes) / len(sizes) / 1024


# ---------------------------------------------------------------------------------------------------------------
# The rows
# ---------------------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_argv(args: argparse.Namespace) -> list[str]:
    """The model's options of examples/pretrain.py: the main job's model, or a preset with the official predictor."""
    if args.model == MAIN_JOB:
        model = EMBEDDED_DEMO_MODEL
        return ["--image_size", str(model["image_size"]), "--recipe", model["recipe"], "--config_overrides",
                model["config_overrides"], "--ema_momentum", model["ema_momentum"], "--mask_mode", args.mask_mode]
    overrides = f"predictor.hidden_size={args.predictor_width},predictor.num_hidden_layers={args.predictor_depth}"
    if args.tiny:
        overrides += ",encoder.num_hidden_layers=1,predictor.num_attention_heads=2,min_keep=4"
    argv = ["--config_name", args.model, "--config_overrides", overrides, "--mask_mode", args.mask_mode]
    return argv + (["--image_size", "128"] if args.tiny else [])


def loop_argv(args: argparse.Namespace, train_dir: Path, output_dir: Path, steps: int, logging_steps: int
              ) -> list[str]:
    argv = [*model_argv(args), "--train_dir", str(train_dir), "--output_dir", str(output_dir),
            "--overwrite_output_dir", "--per_device_train_batch_size", str(args.batch), "--max_train_steps",
            str(steps), "--logging_steps", str(logging_steps), "--online_probe_steps", "0",
            "--num_workers", str(args.num_workers), "--prefetch_factor", str(args.prefetch_factor), "--seed", "0"]
    if args.precision != "no":
        argv += ["--mixed_precision", args.precision]
    return argv


def device_batches(config: Any, batch_size: int, device: torch.device, indices: range
                   ) -> list[dict[str, torch.Tensor]]:
    """Decoded, cropped and normalised batches of random images already on the device, with the masks pretrain()
    draws for global batches ``indices`` (the same collator and seed): the step does the loop's work."""
    collator = mask_collator_for_process(config, seed=0, num_processes=1, process_index=0)
    size = config.encoder_config.image_size
    size = size if isinstance(size, int) else size[0]
    generator = torch.Generator().manual_seed(0)
    batches = []
    for index in indices:
        pixels = torch.randn(batch_size, 3, size, size, generator=generator)
        masks = collator.sample_batch(batch_size, batch_index=index)
        batches.append({k: v.to(device) for k, v in {"pixel_values": pixels, **masks}.items()})
    return batches


def timed_steps(step: Any, warmup: list[dict], timed: list[dict], device: torch.device) -> float:
    """Images/s of ``step`` over the ``timed`` batches, after the ``warmup`` ones."""
    for batch in warmup:
        step(batch)
    synchronize(device)
    start = time.perf_counter()
    for batch in timed:
        step(batch)
    synchronize(device)
    return sum(int(b["pixel_values"].shape[0]) for b in timed) / (time.perf_counter() - start)


def step_row(args: argparse.Namespace, config: Any, device: torch.device, warmup: list[dict], timed: list[dict]
             ) -> float:
    """The bare step's images/s (AdamW as pretrain() builds it: build_optimizer's default kernel)."""
    torch.manual_seed(0)
    model = IJepaForPreTraining(config).to(device).train()
    optimizer = build_optimizer(model)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step(batch: dict[str, torch.Tensor]) -> None:
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_target_encoder(0.996)

    return timed_steps(step, warmup, timed, device)


def official_row(args: argparse.Namespace, config: Any, device: torch.device, warmup: list[dict], timed: list[dict]
                 ) -> float | None:
    """The official code's bare step on the same batches, or None without a checkout / for a non-official size."""
    from official_code import OfficialCodeStep, import_official, resolve_root

    root = resolve_root(args.official_root)
    name = OFFICIAL_NAMES.get(config.encoder_config.hidden_size)
    if root is None or name is None:
        return None
    size = config.encoder_config.image_size
    torch.manual_seed(0)
    code = OfficialCodeStep(import_official(root), name, config.encoder_config.patch_size,
                            size if isinstance(size, int) else size[0], config.predictor_config.hidden_size,
                            config.predictor_config.num_hidden_layers)
    for module in (code.encoder, code.predictor, code.target_encoder):
        module.to(device)  # in place: the optimizer keeps its parameters

    def step(batch: dict[str, torch.Tensor]) -> None:
        code.step(batch["pixel_values"], [batch["context_mask"]], list(batch["target_masks"].unbind(1)),
                  autocast=args.precision == "bf16")

    return timed_steps(step, warmup, timed, device)


def loader_row(args: argparse.Namespace, config: Any, train_dir: Path, device: torch.device) -> float:
    """The data pipeline alone, as the loop builds it, batches copied to the device: images/s."""
    size = config.encoder_config.image_size
    data = build_pretraining_data(image_size=size if isinstance(size, int) else size[0], seed=0,
                                  train_dir=str(train_dir), uint8_images=True, batch_size=args.batch)
    collator = MaskedBatchCollator(mask_collator_for_process(config, seed=0, num_processes=1, process_index=0))
    loader = data.dataloader(args.batch, collator, num_workers=args.num_workers, prefetch_factor=args.prefetch_factor,
                             pin_memory=device.type == "cuda")
    warmup, wanted = args.log_window, args.log_window * (1 + args.windows)
    seen, start, counted = 0, None, 0
    while seen < wanted:
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            seen += 1
            if seen == warmup:
                synchronize(device)
                start = time.perf_counter()
            elif seen > warmup:
                counted += int(batch["pixel_values"].shape[0])
            if seen >= wanted:
                break
        data.sampler.set_epoch(data.sampler.epoch + 1)
    synchronize(device)
    return counted / (time.perf_counter() - start)


class UtilisationSampler:
    """The CUDA driver's utilisation (share of time a kernel ran), sampled in a thread; None without pynvml."""

    def __init__(self, device: torch.device, period: float = 0.1) -> None:
        self.device, self.period, self.samples = device, period, []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> UtilisationSampler:
        if self.device.type == "cuda":
            try:
                torch.cuda.utilization(self.device)
            except Exception:  # noqa: BLE001 - pynvml missing or not usable: no figure
                return self
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.samples.append((time.perf_counter(), torch.cuda.utilization(self.device) / 100))

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def busy_after(self, start: float) -> float | None:
        values = [value for when, value in self.samples if when >= start]
        return sum(values) / len(values) if values else None


def loop_row(args: argparse.Namespace, train_dir: Path, work: Path, device: torch.device) -> dict[str, Any]:
    """pretrain() on the folder; steady-state figures from its log rows after the first window."""
    window = args.log_window
    steps = window * (1 + args.windows)
    started = time.perf_counter()
    with UtilisationSampler(device) as sampler:
        result = pretrain(parse_args(loop_argv(args, train_dir, work / "loop", steps, window)))
    rows = read_train_log(result.log_file)[1:]
    steady = [row["images_per_s"] for row in rows]
    waits = [row["data_wait_fraction"] for row in rows]
    compute = [row["images_per_s"] / max(1e-9, 1 - row["data_wait_fraction"]) for row in rows]
    # The first row's window ends after about 1 / (1 + windows) of the training time.
    busy = sampler.busy_after(started + (time.perf_counter() - started) / (1 + args.windows))
    return {"loop_images_per_s": median(steady), "loop_data_wait_fraction": median(waits),
            "loop_images_per_s_data_excluded": median(compute),
            "loop_loader_images_per_s": median(row["loader_images_per_s"] for row in rows),
            "device_busy_fraction": busy if device.type == "cuda" else 1 - median(waits),
            "device_busy_source": ("nvml utilisation" if busy is not None else "unavailable (no pynvml)")
            if device.type == "cuda" else "loop time not waiting for data"}


def trainer_row(args: argparse.Namespace, config: Any, train_dir: Path, work: Path, device: torch.device) -> float:
    """IJepaTrainer on the same data and model through TrainingArguments: steady-state images/s."""
    from transformers import TrainerCallback

    from ijepa_hf.training import official_training_arguments
    from ijepa_hf.training.trainer import IJepaTrainer

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_end(self, *unused: Any, **kwargs: Any) -> None:
            self.times.append(time.perf_counter())

    size = config.encoder_config.image_size
    data = build_pretraining_data(image_size=size if isinstance(size, int) else size[0], seed=0,
                                  train_dir=str(train_dir), uint8_images=True)
    torch.manual_seed(0)
    model = IJepaForPreTraining(config)
    warmup, steps = args.log_window, args.log_window * (1 + args.windows)
    workers = args.num_workers
    training = official_training_arguments(
        str(work / "trainer"), per_device_train_batch_size=args.batch, max_steps=steps, save_strategy="no",
        report_to="none", logging_steps=args.log_window, seed=0, bf16=args.precision == "bf16",
        use_cpu=device.type == "cpu", dataloader_num_workers=workers, dataloader_persistent_workers=workers > 0,
        dataloader_prefetch_factor=args.prefetch_factor if workers > 0 else None,
        dataloader_pin_memory=device.type == "cuda", disable_tqdm=True)
    times = StepTimes()
    collator = MaskedBatchCollator(mask_collator_for_process(config, seed=0, num_processes=1, process_index=0))
    trainer = IJepaTrainer(model=model, args=training, train_dataset=data.dataset, data_collator=collator,
                           callbacks=[times])
    trainer.train()
    synchronize(device)
    return (steps - warmup) * args.batch / (times.times[-1] - times.times[warmup - 1])


def host_syncs_per_step(args: argparse.Namespace, train_dir: Path, work: Path, device: torch.device) -> float:
    """Host syncs that grow with the steps of pretrain(): two runs of n and 2n steps, one log row each."""
    counts = []
    for steps in (args.sync_steps, 2 * args.sync_steps):
        argv = loop_argv(args, train_dir, work / f"syncs{steps}", steps, logging_steps=10 ** 9)
        with HostSyncCounter(device) as counter:
            pretrain(parse_args(argv))
        counts.append(counter.count)
    return (counts[1] - counts[0]) / args.sync_steps


# ---------------------------------------------------------------------------------------------------------------


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=MAIN_JOB, help="'main' (the main job's model) or a preset name")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--precision", choices=("no", "bf16"), default=None,
                        help="default: bf16 on CUDA, no (fp32) on CPU")
    parser.add_argument("--mask-mode", default="official", choices=("official", "fixed"))
    parser.add_argument("--predictor-width", type=int, default=384)
    parser.add_argument("--predictor-depth", type=int, default=12)
    parser.add_argument("--num-workers", type=int, default=None, help="default: 0 on CPU, CPUs - 2 on CUDA")
    parser.add_argument("--prefetch-factor", type=int, default=4)
    parser.add_argument("--images", type=int, default=2048, help="JPEGs in the generated folder")
    parser.add_argument("--log-window", type=int, default=10, help="the loop's logging_steps; every row runs this "
                        "many steps untimed first (the loop's first log window: start-up)")
    parser.add_argument("--windows", type=int, default=4, help="timed windows of that many steps after it")
    parser.add_argument("--rounds", type=int, default=None, help="bare step and loop timed in turn this many times "
                        "(the machine's speed drifts; medians are quoted). Default: 3 on CPU, 1 on CUDA")
    parser.add_argument("--sync-steps", type=int, default=3)
    parser.add_argument("--trainer", action="store_true", help="also time IJepaTrainer")
    parser.add_argument("--official-root", default=None, help="a facebookresearch/ijepa checkout (or "
                        "$IJEPA_OFFICIAL_ROOT): also time the official code's bare step")
    parser.add_argument("--work-dir", default=None, help="where the JPEGs and runs go (default: a temporary folder)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes for the test suite (nothing to conclude)")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    args.precision = args.precision or ("bf16" if args.device.type == "cuda" else "no")
    if args.rounds is None:
        args.rounds = 3 if args.device.type == "cpu" else 1
    if args.num_workers is None:
        args.num_workers = 0 if args.device.type == "cpu" else max(1, (os.cpu_count() or 2) - 2)
    if args.tiny:
        args.model, args.predictor_width, args.predictor_depth = "vit_tiny_patch16_224", 32, 1
        args.images, args.batch, args.log_window, args.windows, args.sync_steps, args.rounds = 16, 4, 2, 1, 2, 1
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    device = args.device
    if device.type == "cpu":
        keep_freed_memory_for_reuse()  # what pretrain() does on CPU (process-wide): every row runs alike
    torch.manual_seed(0)
    with contextlib.ExitStack() as stack:
        work = Path(args.work_dir) if args.work_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        train_dir, kilobytes = jpeg_folder(work, args.images)
        config = build_config(parse_args(loop_argv(args, train_dir, work / "config", 1, 1)))  # pretrain()'s own
        window, steps = args.log_window, args.log_window * (1 + args.windows)
        warmup = device_batches(config, args.batch, device, range(window))
        timed = device_batches(config, args.batch, device, range(window, steps))
        figures: dict[str, Any] = {"model": args.model, "batch": args.batch, "device": device.type,
                                   "precision": args.precision, "num_workers": args.num_workers,
                                   "mask_mode": args.mask_mode, "timed_steps": steps - window, "rounds": args.rounds}
        rounds: list[dict[str, Any]] = []
        for _ in range(args.rounds):  # in turn, so that a drift of the machine's speed hits both alike
            row = {"step_images_per_s": step_row(args, config, device, warmup, timed)}
            row.update(loop_row(args, train_dir, work, device))
            row["ratio"] = row["loop_images_per_s"] / row["step_images_per_s"]
            row["ratio_data_excluded"] = row["loop_images_per_s_data_excluded"] / row["step_images_per_s"]
            rounds.append(row)
        for key in rounds[0]:
            if isinstance(rounds[0][key], (int, float)):
                figures[key] = median(row[key] for row in rounds)
            else:
                figures[key] = rounds[0][key]
        figures["rounds_ratio"] = [row["ratio"] for row in rounds]
        figures["rounds_ratio_data_excluded"] = [row["ratio_data_excluded"] for row in rounds]
        figures["official_step_images_per_s"] = None if args.tiny else official_row(args, config, device, warmup,
                                                                                      timed)
        figures["loader_images_per_s"] = loader_row(args, config, train_dir, device)
        figures["trainer_images_per_s"] = trainer_row(args, config, train_dir, work, device) if args.trainer else None
        figures["host_syncs_per_step"] = host_syncs_per_step(args, train_dir, work, device)
    step = figures["step_images_per_s"]
    figures["loop_overhead_data_excluded"] = 1 / figures["ratio_data_excluded"] - 1
    if figures["trainer_images_per_s"] is not None:
        figures["trainer_ratio"] = figures["trainer_images_per_s"] / step
    figures["jpeg_kb"] = kilobytes
    figures["machine"] = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description()
    figures["torch"] = torch.__version__
    figures["threads"] = torch.get_num_threads()
    print_table(figures)
    print(json.dumps(figures))
    return figures


def print_table(figures: dict[str, Any]) -> None:
    def rate(key: str) -> str:
        value = figures.get(key)
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.1f}"

    print(f"\n{figures['model']}, batch {figures['batch']}, {figures['precision']}, {figures['mask_mode']} masks, "
          f"{figures['num_workers']} workers on {figures['machine']}, torch {figures['torch']}; "
          f"{figures['timed_steps']} timed steps, median of {figures['rounds']} round(s)")
    print("| | images/s | of the step |\n|---|---:|---:|")
    step = figures["step_images_per_s"]
    for label, key in (("bare step (public API, data on the device)", "step_images_per_s"),
                       ("official code, bare step", "official_step_images_per_s"),
                       ("pretrain() end to end", "loop_images_per_s"),
                       ("pretrain(), data wait taken out", "loop_images_per_s_data_excluded"),
                       ("IJepaTrainer end to end", "trainer_images_per_s"),
                       ("data loader alone", "loader_images_per_s")):
        value = figures.get(key)
        # The loop's rows: the median of the per-round ratios (each round timed the step and the loop in turn).
        ratio = {"loop_images_per_s": "ratio", "loop_images_per_s_data_excluded": "ratio_data_excluded"}.get(key)
        share = "-" if value is None else f"{(figures[ratio] if ratio else value / step):.2f}x"
        print(f"| {label} | {rate(key)} | {share} |")
    busy = figures.get("device_busy_fraction")
    print(f"\nloop waiting for data: {figures['loop_data_wait_fraction']:.1%} of its time; device busy: "
          f"{'-' if busy is None else f'{busy:.1%}'} ({figures['device_busy_source']}); host syncs per step: "
          f"{figures['host_syncs_per_step']:g}; JPEGs {figures['jpeg_kb']:.0f} KB on average")


if __name__ == "__main__":
    main()
