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
