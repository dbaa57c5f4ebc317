"""``benchmarks/bench_gpu.py`` (the prepared GPU throughput / MFU / bf16-agreement job) at toy sizes on CPU, so that
the script a device session runs is known to work before device time is spent on it. No timings are asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
MODEL = "vit_tiny_patch16_224@144"  # the smallest preset on a 9x9 grid, the smallest the official masks sample
TOY = ["--device", "cpu", "--models", MODEL, "--min-batch", "2", "--max-batch", "2", "--steps", "1",
       "--agreement-models", MODEL, "--agreement-batch", "2", "--matmul-size", "128", "--profile-model", MODEL,
       "--context-lengths-model", MODEL, "--context-lengths-batch", "4", "--target-copy-models", MODEL]


@pytest.fixture(scope="module")
def bench_gpu(load_benchmark):
    return load_benchmark("bench_gpu")  # it imports its sibling bench_train_step.py, as `python benchmarks/...` does


def test_toy_run_writes_throughput_and_agreement(bench_gpu, tmp_path):
    output = tmp_path / "gpu.json"
    results = bench_gpu.main(TOY + ["--output", str(output)])
    assert json.loads(output.read_text())["throughput"] == results["throughput"]
    (row,) = results["throughput"]
    assert row["batch_size"] == 2 and row["model"] == MODEL
    # vit_tiny/16 + predictor 384x12 at two images of 144 px: tens of GFLOP per step, counted, not guessed.
    assert 0.01 < row["tflop_per_step"] < 0.3
    assert row["achieved_tflops"] == pytest.approx(row["tflop_per_step"] / row["seconds_per_step"])
    assert row["mfu_datasheet"] is None  # no data-sheet peak for a CPU
    (agree,) = results["agreement"]
    # bf16 autocast against fp32 on identical weights and batch: close, but not identical.
    assert 0 < agree["loss_relative_difference"] < 1e-2
    assert 0.999 < agree["gradient_cosine"] < 1.0
    assert 0 < agree["predictions_relative_error"] < 0.05
    assert MODEL in results["table"]
    profile = results["profile"]
    assert profile["model"] == MODEL and profile["wall_seconds_per_step"] > 0
    assert "aten::" in profile["top_kernels"]  # the profiler's table of the busiest ops
    assert json.loads(output.read_text())["profile"]["top_kernels"] == profile["top_kernels"]
    # Cut, padded and packed contexts of the same model: padded and packed keep every image's whole context (more
    # real tokens than cut), and the packed step (reference attention on CPU) agrees with the padded one.
    cut, padded, packed = results["context_lengths"]
    assert [cut["mode"], padded["mode"], packed["mode"]] == ["cut", "padded", "packed"]
    assert padded["context_tokens"] == packed["context_tokens"] > cut["context_tokens"]
    assert packed["attention"].startswith("reference")
    assert packed["loss_relative_difference_to_padded"] < 1e-2 and packed["gradient_cosine_to_padded"] > 0.999
    assert cut["per_token_cost_vs_cut"] == 1.0
    assert "packed (reference" in results["table"]
    (copy_row,) = results["target_copy"]  # at the timed batch of its preset
    assert copy_row["batch_size"] == 2 and copy_row["targets_max_abs_difference"] == 0.0
    assert "saved ms per step" in results["table"]


def test_batch_search_stops_at_the_first_out_of_memory(bench_gpu, monkeypatch):
    real_mask_batch = bench_gpu.mask_batch

    def mask_batch(config, batch_size, device, seed=0):
        if batch_size > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_mask_batch(config, batch_size, device, seed)

    monkeypatch.setattr(bench_gpu, "mask_batch", mask_batch)
    best, log = bench_gpu.largest_batch(MODEL, torch.device("cpu"), min_batch=2, max_batch=64)
    assert best == 4
    assert log == ["batch 2: ok", "batch 4: ok", "batch 8: out of memory"]


def test_other_errors_are_not_taken_for_out_of_memory(bench_gpu, monkeypatch):
    def mask_batch(config, batch_size, device, seed=0):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(bench_gpu, "mask_batch", mask_batch)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        bench_gpu.largest_batch(MODEL, torch.device("cpu"), min_batch=2, max_batch=4)


def test_datasheet_peaks_match_the_most_specific_name(bench_gpu):
    assert bench_gpu.datasheet_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench_gpu.datasheet_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert bench_gpu.datasheet_peak_tflops("NVIDIA H200") == 989.4
    assert bench_gpu.datasheet_peak_tflops("Intel(R) Xeon(R) Processor") is None


@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_compiled_step_is_timed_after_a_recompile_for_a_second_mask_shape(bench_gpu, scope):
    # backend="eager": dynamo traces (and recompiles for the second shape) without inductor's minutes of codegen.
    row = bench_gpu.compiled_speedup(MODEL, torch.device("cpu"), batch_size=2, steps=1,
                                     backend="eager", scope=scope)
    first, second = row["mask_shapes"]
    assert first["context_mask"] != second["context_mask"] and row["scope"] == scope
    assert row["graphs"] >= (2 if scope == "model" else 1)  # model: one graph per shape seen before timing
    assert row["loss_relative_difference"] < 1e-6  # the eager backend runs the same ops on the same weights
    assert row["speed_up"] == pytest.approx(row["eager_seconds_per_step"] / row["compiled_seconds_per_step"])


def test_target_copy_lever_is_timed_on_a_copy_that_gives_the_same_targets(bench_gpu):
    # The lever of a bf16 copy of the target encoder's matmul weights, refreshed after the EMA, against autocast
    # casting the fp32 weights at every use: the copy must give the targets autocast gives, bit for bit (autocast's
    # cast is the same rounding), and the row prices the forward it saves against the refresh it adds.
    row = bench_gpu.target_copy_row(MODEL, torch.device("cpu"), batch_size=2, steps=1)
    assert row["model"] == MODEL and row["batch_size"] == 2
    assert row["targets_max_abs_difference"] == 0.0
    assert row["ema_seconds"] > 0 and row["refresh_seconds"] > 0
    assert row["saving_seconds_per_step"] == pytest.approx(
        row["forward_seconds_autocast"] - row["forward_seconds_copy"] - row["refresh_seconds"])
    # vit_tiny/16: about 5.5 M parameters, all but the LayerNorms' in the copy, two bytes each.
    assert 9 < row["copy_megabytes"] < 11.5


def test_low_precision_copy_keeps_layer_norms_and_buffers_in_float32(bench_gpu):
    model, _ = bench_gpu.build("vit_tiny_patch16_224", torch.device("cpu"))
    copy = bench_gpu.low_precision_copy(model.target_encoder, torch.bfloat16)
    dtypes = {name: p.dtype for name, p in copy.named_parameters()}
    assert dtypes["blocks.0.attn.qkv.weight"] == dtypes["patch_embed.weight"] == torch.bfloat16
    assert dtypes["blocks.0.norm1.weight"] == dtypes["norm.weight"] == torch.float32
    assert all(b.dtype == torch.float32 for b in copy.buffers() if b.is_floating_point())
    assert model.target_encoder.blocks[0].attn.qkv.weight.dtype == torch.float32  # the master is untouched


@pytest.mark.parametrize("option", ["target-copy", "compile"])
def test_a_later_stage_without_a_batch_is_refused_with_the_option_to_pass(bench_gpu, option):
    with pytest.raises(SystemExit, match=f"--{option}-models vit_tiny_patch16_224: pass --{option}-batch"):
        bench_gpu.main(["--device", "cpu", "--models", "", "--agreement-models", "", "--profile-model", "",
                        "--context-lengths-model", "", "--matmul-size", "64", f"--{option}-models",
                        "vit_tiny_patch16_224"])


def test_a_preset_at_another_size_is_built_at_that_size(bench_gpu):
    config = bench_gpu.preset_config("vit_tiny_patch16_224@144")
    assert config.encoder_config.image_size == config.predictor_config.image_size == 144
    assert bench_gpu.preset_config("vit_tiny_patch16_224").encoder_config.image_size == 224
    with pytest.raises(SystemExit, match="vit_tiny_patch16_224@96"):
        bench_gpu.preset_config("vit_tiny_patch16_224@large")
