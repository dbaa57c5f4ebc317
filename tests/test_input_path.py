"""The pretraining input path as fast trainers build it, end to end through ``pretrain()`` and ``IJepaTrainer``:
uint8 images finished on the device with the float path's numbers, sample keys that let workers persist across
epochs with the same crops and masks, no host sync per step, the loader's figures in the log, and the end-to-end
benchmark at a tiny size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ijepa_hf.data import (
    LOAD_SECONDS_KEY,
    EpochShuffleSampler,
    MaskedBatchCollator,
    PretrainImageDataset,
    PretrainTransform,
    SampleKey,
    build_pretraining_data,
    embedded_scenes,
    normalize_images,
)
from ijepa_hf.masking import IJepaMaskCollator
from ijepa_hf.training import parse_args, pretrain
from ijepa_hf.training.host_syncs import HostSyncCounter

from tiny import assert_same_weights, read_log, tiny_argv

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: in-process runs on one thread


def _photo(seed: int, size: tuple[int, int] = (50, 37)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# ----------------------------------------------------------------------------------------------------------------
# uint8 across the bus, finished on the device
# ----------------------------------------------------------------------------------------------------------------


def test_uint8_images_finished_by_normalize_images_equal_the_float_transform():
    for seed in range(5):
        image = _photo(seed)
        float_path = PretrainTransform(24, generator=torch.Generator().manual_seed(seed))(image)
        uint8 = PretrainTransform(24, generator=torch.Generator().manual_seed(seed), as_uint8=True)(image)
        assert uint8.dtype == torch.uint8 and uint8.shape == (3, 24, 24)
        finished = normalize_images(uint8[None])[0]  # as a batch, the way the loop finishes it on the device
        assert finished.dtype == torch.float32
        assert torch.equal(finished, float_path)  # bitwise: the same operations in the same order
    assert normalize_images(float_path) is float_path  # finished images pass through
    with pytest.raises(TypeError, match="uint8"):
        normalize_images(torch.zeros(1, 3, 4, 4, dtype=torch.int32))


def test_model_refuses_unfinished_uint8_images():
    from ijepa_hf import IJepaEncoderModel
    from tiny import tiny_encoder_config

    model = IJepaEncoderModel(tiny_encoder_config())
    with pytest.raises(ValueError, match="normalize_images"):
        model(pixel_values=torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_masked_batch_collator_keeps_uint8_takes_the_keys_mask_index_and_times_the_batch():
    source = embedded_scenes(12, image_size=32)
    dataset = PretrainImageDataset(source, 32, seed=3, uint8_images=True)
    masks = IJepaMaskCollator(32, 8, min_keep=0, target_scale=(0.2, 0.3), num_target_blocks=2, seed=5)
    collate = MaskedBatchCollator(masks)
    keys = [SampleKey(epoch=1, index=i, batch=7) for i in range(4)]
    batch = collate([dataset[key] for key in keys])
    assert batch["pixel_values"].dtype == torch.uint8
    expected = masks.sample_batch(4, batch_index=7)
    assert torch.equal(batch["context_mask"], expected["context_mask"])
    assert torch.equal(batch["target_masks"], expected["target_masks"])
    assert isinstance(batch[LOAD_SECONDS_KEY], float) and batch[LOAD_SECONDS_KEY] > 0
    # the key's epoch seeds the crop, whatever set_epoch said
    dataset.set_epoch(0)
    assert torch.equal(dataset[SampleKey(1, 2, 7)]["pixel_values"], batch["pixel_values"][2])
    dataset.set_epoch(1)
    assert torch.equal(dataset[2]["pixel_values"], batch["pixel_values"][2])
    with pytest.raises(ValueError, match="several global batches"):
        collate([dataset[SampleKey(0, 0, 1)], dataset[SampleKey(0, 1, 2)]])


def test_keyed_sampler_gives_each_rank_the_mask_index_of_its_batch_counter():
    """The keys' batch index equals the local batch counter of every rank under Accelerate's sharding."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    for processes, batch_size, samples in ((1, 4, 22), (2, 4, 37), (3, 2, 20)):
        sampler = EpochShuffleSampler(samples, seed=1, batch_size=batch_size, num_processes=processes)
        plain = EpochShuffleSampler(samples, seed=1)
        for epoch in (0, 2):
            sampler.set_epoch(epoch)
            plain.set_epoch(epoch)
            assert [key.index for key in sampler] == list(plain)  # the same order as the unkeyed sampler
            for rank in range(processes):
                shard = BatchSamplerShard(BatchSampler(sampler, batch_size, drop_last=True), processes, rank)
                batches = list(shard)
                assert len(batches) == sampler.batches_per_epoch
                for counter, keys in enumerate(batches):
                    assert {key.batch for key in keys} == {epoch * sampler.batches_per_epoch + counter}
                    assert {key.epoch for key in keys} == {epoch}


# ----------------------------------------------------------------------------------------------------------------
# pretrain(): persistent workers, the log, no per-step host sync
# ----------------------------------------------------------------------------------------------------------------


def test_persistent_workers_across_uneven_epochs_and_resume_are_bitwise_the_in_process_run(tmp_path):
    # 40 images of batch 8: 5 batches an epoch, which 2 workers do not divide; 12 steps cross two epoch starts, and
    # the workers live through them (their copies of the dataset and collator never hear of the epoch).
    straight = tmp_path / "straight"
    run_args = dict(images=40, steps=12)
    pretrain(parse_args(tiny_argv(straight, "--checkpointing_steps", "6", **run_args)))
    workers = tmp_path / "workers"
    result = pretrain(parse_args(tiny_argv(workers, "--num_workers", "2", "--prefetch_factor", "3", **run_args)))
    assert result.global_step == 12
    assert_same_weights(straight, workers)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    import shutil

    shutil.copytree(straight / "step_6", resumed / "step_6")
    pretrain(parse_args(tiny_argv(resumed, "--resume_from_checkpoint", "latest", "--num_workers", "2", **run_args)))
    assert_same_weights(straight, resumed)


def test_log_rows_say_what_limits_the_throughput(tmp_path, caplog):
    with caplog.at_level("INFO", logger="ijepa_hf.training.loop"):
        pretrain(parse_args(tiny_argv(tmp_path / "run", "--num_workers", "1", images=48, steps=6)))
    rows = read_log(tmp_path / "run")
    assert rows
    for row in rows:
        assert 0.0 <= row["data_wait_fraction"] <= 1.0
        assert row["loader_images_per_s"] > 0 and row["images_per_s"] > 0
    assert "the loader can deliver" in caplog.text and "with 1 worker(s)" in caplog.text


def test_throughput_summary_names_the_limit():
    from ijepa_hf.training.metrics import throughput_summary

    def rows(wait: float) -> list[dict]:
        return [{"images_per_s": 100.0, "data_wait_fraction": wait, "loader_images_per_s": 120.0}] * 3

    assert "the data limits this run: raise --num_workers" in throughput_summary(rows(0.4), 2)
    assert "the training step limits" in throughput_summary(rows(0.01), 8)
    assert "helps only with cores the step does not use" in throughput_summary(rows(0.4), 0, on_accelerator=False)
    assert throughput_summary([], 0) is None


def _count_syncs(output_dir: Path, steps: int) -> HostSyncCounter:
    # One log row (the last step), no checkpoint, no online probe, no epoch end: only per-step work grows with steps.
    argv = tiny_argv(output_dir, "--logging_steps", "1000", "--online_probe_steps", "0", images=96, steps=steps)
    with HostSyncCounter("cpu") as counter:
        pretrain(parse_args(argv))
    return counter


def test_no_host_sync_per_step_at_default_settings(tmp_path):
    short, long = _count_syncs(tmp_path / "short", 3), _count_syncs(tmp_path / "long", 9)
    assert short.count > 0  # the final log row, the finite-weights check and the export read the device
    assert long.count == short.count, f"syncs grow with the steps: {long.sites - short.sites}"


def test_sync_counter_finds_a_planted_per_step_sync(tmp_path, monkeypatch):
    from ijepa_hf.training import step as step_module

    original = step_module.PretrainingStep.__call__

    def syncing(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if out.loss is not None:
            float(out.loss)  # what a careless progress bar would do
        return out

    monkeypatch.setattr(step_module.PretrainingStep, "__call__", syncing)
    short, long = _count_syncs(tmp_path / "short", 3), _count_syncs(tmp_path / "long", 9)
    assert long.count - short.count == 6
    assert any("test_input_path.py" in site for site in long.sites)


# ----------------------------------------------------------------------------------------------------------------
# IJepaTrainer: the same input path through TrainingArguments
# ----------------------------------------------------------------------------------------------------------------


def test_trainer_with_persistent_workers_trains_as_without_workers(tmp_path):
    from ijepa_hf import IJepaForPreTraining
    from ijepa_hf.training import official_training_arguments
    from ijepa_hf.training.distributed import mask_collator_for_process
    from ijepa_hf.training.trainer import IJepaTrainer
    from tiny import tiny_pretraining_config

    def train(name: str, **loader: object) -> dict[str, torch.Tensor]:
        config = tiny_pretraining_config(min_keep=0, target_scale=(0.2, 0.3), num_target_blocks=2)
        torch.manual_seed(0)
        model = IJepaForPreTraining(config)
        data = build_pretraining_data(image_size=32, seed=0, embedded_num_images=40, uint8_images=True)
        args = official_training_arguments(str(tmp_path / name), per_device_train_batch_size=8, max_steps=12,
                                           save_strategy="no", report_to="none", logging_steps=4, seed=0,
                                           use_cpu=True, **loader)
        trainer = IJepaTrainer(model=model, args=args, train_dataset=data.dataset,
                               data_collator=MaskedBatchCollator(mask_collator_for_process(
                                   config, seed=0, num_processes=1, process_index=0)))
        assert isinstance(trainer._get_train_sampler(), EpochShuffleSampler)
        trainer.train()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    alone = train("alone", dataloader_num_workers=0)
    workers = train("workers", dataloader_num_workers=2, dataloader_persistent_workers=True,
                    dataloader_prefetch_factor=2)
    different = [k for k in alone if not torch.equal(alone[k], workers[k])]
    assert not different, different[:3]


# ----------------------------------------------------------------------------------------------------------------
# The end-to-end benchmark, at a tiny size (no timing asserted)
# ----------------------------------------------------------------------------------------------------------------


def test_bench_end_to_end_runs_and_ends_with_its_json_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "bench_end_to_end.py"), "--device", "cpu", "--tiny",
         "--work-dir", str(tmp_path), "--trainer"],
        capture_output=True, text=True, timeout=600, cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("model", "batch", "device", "step_images_per_s", "loop_images_per_s", "loader_images_per_s", "ratio",
                "trainer_images_per_s", "host_syncs_per_step", "device_busy_fraction"):
        assert key in last, key
    assert last["device"] == "cpu" and last["host_syncs_per_step"] == 0
    assert last["step_images_per_s"] > 0 and last["loop_images_per_s"] > 0 and last["loader_images_per_s"] > 0
