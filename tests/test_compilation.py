"""The inductor setting that ``--torch_compile`` / ``IJepaTrainer(torch_compile=True)`` apply for I-JEPA's varying
mask lengths (the crash it avoids needs a CUDA GPU; benchmarks/README.md records it)."""

from __future__ import annotations

import pytest
from torch._inductor import config as inductor_config
from transformers import TrainingArguments

from ijepa_hf import IJepaForPreTraining
from ijepa_hf.training import IJepaTrainer
from ijepa_hf.training.compilation import MIX_ORDER_REDUCTION_ENV, configure_inductor_for_variable_masks

from tiny import tiny_pretraining_config


@pytest.fixture
def mix_order_on(monkeypatch):
    monkeypatch.delenv(MIX_ORDER_REDUCTION_ENV, raising=False)
    with inductor_config.patch({"triton.mix_order_reduction": True}):  # torch's own patching restores it after
        yield


def test_turns_mix_order_reduction_off(mix_order_on):
    assert configure_inductor_for_variable_masks() is True
    assert inductor_config.triton.mix_order_reduction is False
    assert configure_inductor_for_variable_masks() is False  # already off: nothing to change


def test_an_explicit_environment_choice_wins(mix_order_on, monkeypatch):
    monkeypatch.setenv(MIX_ORDER_REDUCTION_ENV, "1")
    assert configure_inductor_for_variable_masks() is False
    assert inductor_config.triton.mix_order_reduction is True


@pytest.mark.parametrize("torch_compile", [True, False])
def test_trainer_applies_it_only_when_compiling(mix_order_on, tmp_path, torch_compile):
    args = TrainingArguments(output_dir=str(tmp_path), torch_compile=torch_compile, use_cpu=True, report_to="none",
                             remove_unused_columns=False)
    IJepaTrainer(model=IJepaForPreTraining(tiny_pretraining_config()), args=args)
    assert inductor_config.triton.mix_order_reduction is (not torch_compile)


def test_compile_blocks_is_eager_on_any_mask_length_with_one_graph_for_every_layer():
    """Regional compilation: every block but the predictor's last compiled with dynamic shapes; two batches of
    other context lengths give eager's loss and gradients, from a handful of graphs for all the layers."""
    import copy

    import torch

    from ijepa_hf.training.compilation import compile_blocks

    from tiny import random_masks

    torch.manual_seed(0)
    model = IJepaForPreTraining(tiny_pretraining_config())
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    assert compile_blocks(model) == len(model.context_encoder.blocks) * 2 + len(model.predictor.blocks) - 1
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    pixels = torch.randn(2, 3, 32, 32)
    for num_context in (8, 11):
        context, targets = random_masks(2, 16, num_context=num_context, num_blocks=2, num_targets=3)
        compiled_loss, eager_loss = model(pixels, context, targets).loss, eager(pixels, context, targets).loss
        compiled_loss.backward()
        eager_loss.backward()
        torch.testing.assert_close(compiled_loss, eager_loss, atol=1e-6, rtol=0)
    for (name, ours), theirs in zip(model.named_parameters(), eager.parameters()):
        if theirs.grad is not None:
            torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-6, rtol=1e-5, msg=name)
    # One graph for the encoders' and the predictor's blocks, plus a recompile for dynamic sizes: not one per layer.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs <= 4
    assert set(model.state_dict()) == set(eager.state_dict())  # checkpoints keep their names
    torch._dynamo.reset()


def test_pretrain_compiles_the_blocks_on_request(tmp_path):
    from tiny import read_log, run

    with pytest.raises(ValueError, match="--torch_compile_scope must be one of"):
        run(tmp_path / "bad", "--torch_compile", "--torch_compile_scope", "layers", steps=2, images=16)
    result = run(tmp_path / "out", "--torch_compile", "--torch_compile_scope", "blocks", steps=2, images=16)
    assert result.global_step == 2 and [row["step"] for row in read_log(tmp_path / "out")] == [2]
    blocks = list(result.model.context_encoder.blocks) + list(result.model.predictor.blocks)
    assert [block._compiled_call_impl is not None for block in blocks][-2:] == [True, False]  # the last stays eager
    assert all(block._compiled_call_impl is not None for block in blocks[:-1])
