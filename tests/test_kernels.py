"""Kernel choices: the model does what ``attn_implementation`` says, and ``auto`` picks by timing on the run's own
model and batch (``ijepa_hf.training.kernels``), never by a guess from the hardware."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ijepa_hf import IJepaForPreTraining
from ijepa_hf.training.kernels import choose_attention_implementation

from tiny import random_masks, run, tiny_pretraining_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _slow_attention(*args, **kwargs):
    time.sleep(0.02)  # per call: several times the whole tiny step
    return sdpa_attention_forward(*args, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def slow_implementation():
    AttentionInterface.register("test_slow", _slow_attention)
    yield "test_slow"


def _model_and_batch():
    torch.manual_seed(0)
    model = IJepaForPreTraining(tiny_pretraining_config(encoder={"drop_path_rate": 0.1})).train()
    pixels = torch.randn(4, 3, 32, 32)
    context, targets = random_masks(4, 16, 8, 2, 3)
    return model, {"pixel_values": pixels, "context_mask": context, "target_masks": targets}


@pytest.mark.parametrize("candidates", [("test_slow", "sdpa"), ("sdpa", "test_slow")])
def test_auto_keeps_the_faster_kernel_and_leaves_the_model_as_it_was(candidates):
    model, batch = _model_and_batch()
    weights = {name: value.clone() for name, value in model.state_dict().items()}
    rng = torch.get_rng_state()
    choice, seconds = choose_attention_implementation(model, batch, candidates=candidates)
    assert choice == "sdpa" and set(seconds) == set(candidates)
    assert seconds["test_slow"] > seconds["sdpa"]
    assert {m.config._attn_implementation for m in (model.context_encoder, model.target_encoder,
                                                    model.predictor)} == {"sdpa"}
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(weights[name], value) for name, value in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)  # drop path drew random numbers during the timing


def test_no_candidates_is_an_error():
    model, batch = _model_and_batch()
    with pytest.raises(ValueError, match="at least one attn_implementation"):
        choose_attention_implementation(model, batch, candidates=())


def test_pretrain_honours_attn_implementation_and_auto_logs_its_measured_choice(tmp_path, monkeypatch, caplog):
    used = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: used.append(1) or real(*a, **k))
    run(tmp_path / "eager", "--attn_implementation", "eager", steps=2)
    assert not used  # eager: no SDPA call in any forward
    run(tmp_path / "sdpa", steps=2)  # the default
    assert used
    with caplog.at_level(logging.INFO, logger="ijepa_hf.training"):
        run(tmp_path / "auto", "--attn_implementation", "auto", steps=2)
    message = next(r.getMessage() for r in caplog.records if "--attn_implementation auto" in r.getMessage())
    assert "sdpa" in message and "eager" in message and "to pin it" in message
    with pytest.raises(ValueError, match="--attn_implementation must be auto, sdpa or eager"):
        run(tmp_path / "bad", "--attn_implementation", "flash")


def test_auto_times_per_image_context_batches_too(tmp_path):
    result = run(tmp_path / "auto", "--attn_implementation", "auto", "--config_overrides",
                 __import__("test_pretraining").TINY_OVERRIDES + ",context_lengths=per_image", steps=2)
    assert result.global_step == 2


def test_pretrain_trainer_honours_attn_implementation_and_auto_as_pretrain_does(tmp_path, load_example, caplog):
    """pretrain_trainer.py had no --attn_implementation: the Trainer path ran SDPA whatever the CPU, where pretrain.py
    can pin eager or time both (eager is the faster in bf16 training on some CPUs)."""
    example = load_example("pretrain_trainer")
    argv = ["--max_steps", "1", "--use_cpu", "--report_to", "none", "--online_probe_steps", "0",
            "--embedded_num_images", "64"]
    trainer = example.main([*argv, "--output_dir", str(tmp_path / "eager"), "--attn_implementation", "eager"])
    assert {m.config._attn_implementation for m in (trainer.model.context_encoder, trainer.model.target_encoder,
                                                    trainer.model.predictor)} == {"eager"}
    with caplog.at_level(logging.INFO, logger="ijepa_hf.training"):
        trainer = example.main([*argv, "--output_dir", str(tmp_path / "auto"), "--attn_implementation", "auto"])
    message = next(r.getMessage() for r in caplog.records if "--attn_implementation auto" in r.getMessage())
    assert trainer.model.context_encoder.config._attn_implementation in message.split(":")[1]
    with pytest.raises(ValueError, match="--attn_implementation must be auto, sdpa or eager"):
        example.parse(["--attn_implementation", "flash"])
