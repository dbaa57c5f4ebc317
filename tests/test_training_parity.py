"""Training parity over five official steps (tests/fixtures/official-tiny-steps.*, made by the official code with
its own optimizer groups, schedules and momentum generator), through the library's training step and through
IJepaTrainer; and the step's options (gradient accumulation, clipping, skipping non-finite updates)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from ijepa_hf.conversion import convert_official_checkpoint, infer_official_config, load_official_checkpoint
from ijepa_hf.training import PretrainingSchedule, PretrainingStep, build_optimizer

from tiny import FIXTURES, GOLDEN_CHECKPOINT, golden, golden_target_masks

ATOL = 1e-5
STEPS = json.loads((FIXTURES / "official-tiny-steps.json").read_text())


def _model_from(checkpoint: dict) -> torch.nn.Module:
    return convert_official_checkpoint(checkpoint, infer_official_config(checkpoint, num_heads=3))


def _official_schedule() -> PretrainingSchedule:
    s = STEPS["schedules"]
    total = int(s["ipe_scale"] * s["num_epochs"] * s["iterations_per_epoch"])
    return PretrainingSchedule(
        total_steps=total, warmup_steps=int(s["warmup_epochs"] * s["iterations_per_epoch"]), start_lr=s["start_lr"],
        peak_lr=s["ref_lr"], final_lr=s["final_lr"], start_weight_decay=s["wd"], final_weight_decay=s["final_wd"],
        ema_start=s["ema"][0], ema_end=s["ema"][1])


def _batch() -> dict[str, torch.Tensor]:
    g = golden()
    return {"pixel_values": g["pixel_values"], "context_mask": g["context_mask"],
            "target_masks": golden_target_masks(g)}


@pytest.fixture(scope="module")
def expected_state() -> dict[str, torch.Tensor]:
    """The official state after step 5, converted to this package's names (the converter is tested elsewhere)."""
    tensors = load_file(FIXTURES / "official-tiny-steps.safetensors")
    checkpoint = {part: {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
                  for part, prefix in (("encoder", "context_encoder"), ("predictor", "predictor"),
                                       ("target_encoder", "target_encoder"))}
    return _model_from(checkpoint).state_dict()


def _assert_matches(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == expected.keys()
    worst = max(((state[k].float() - expected[k].float()).abs().max().item(), k) for k in expected)
    assert worst[0] < ATOL, f"{worst[1]} differs from the official step 5 by {worst[0]:.2e}"
    assert len(expected) > 90  # every tensor of the three models, not a sample


def test_schedule_values_are_the_official_ones():
    schedule = _official_schedule()
    for row in STEPS["steps"]:
        values = schedule.values_at(row["step"])
        assert values["lr"] == pytest.approx(row["lr"], abs=1e-12)
        assert values["weight_decay"] == pytest.approx(row["wd"], abs=1e-12)
        assert values["momentum"] == pytest.approx(row["momentum"], abs=1e-12)


def test_five_official_steps_through_the_training_step(expected_state):
    from accelerate import Accelerator

    model = _model_from(load_official_checkpoint(GOLDEN_CHECKPOINT)).train()
    optimizer = build_optimizer(model)
    step = PretrainingStep(Accelerator(cpu=True), model, optimizer, _official_schedule())
    batch = _batch()
    losses = [step(batch, update).loss.item() for update in range(1, 6)]
    assert losses == pytest.approx([row["loss"] for row in STEPS["steps"]], abs=ATOL)
    step.check()
    _assert_matches(model, expected_state)


def test_five_official_steps_through_ijepa_trainer(tmp_path, expected_state):
    from transformers import TrainingArguments

    from ijepa_hf.training import IJepaTrainer

    s = STEPS["schedules"]
    model = _model_from(load_official_checkpoint(GOLDEN_CHECKPOINT))
    batch = _batch()
    losses: list[float] = []

    class Recording(IJepaTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = model(**inputs).loss
            losses.append(loss.item())
            return loss

    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=4, learning_rate=s["ref_lr"],
        lr_scheduler_type="cosine", lr_scheduler_kwargs={"start_lr": s["start_lr"], "final_lr": s["final_lr"]},
        warmup_steps=int(s["warmup_epochs"] * s["iterations_per_epoch"]), weight_decay=s["wd"], optim="adamw_torch",
        max_grad_norm=0.0, remove_unused_columns=False, use_cpu=True, report_to="none", save_strategy="no",
        logging_steps=1, dataloader_num_workers=0, seed=0,
    )
    trainer = Recording(model=model, args=args, train_dataset=[{}] * 4, data_collator=lambda rows: batch,
                        final_weight_decay=s["final_wd"], ema_momentum=s["ema"])
    trainer.train()
    assert losses == pytest.approx([row["loss"] for row in STEPS["steps"]], abs=ATOL)
    logged = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    assert logged == pytest.approx([row["lr"] for row in STEPS["steps"]], abs=1e-9)
    _assert_matches(model, expected_state)


def test_gradient_accumulation_equals_the_larger_batch():
    from accelerate import Accelerator

    results = []
    for accumulation in (1, 2):
        model = _model_from(load_official_checkpoint(GOLDEN_CHECKPOINT)).train()
        optimizer = build_optimizer(model)
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
        step = PretrainingStep(accelerator, model, optimizer, _official_schedule())
        batch = _batch()
        size = 4 // accumulation
        for update in (1, 2):
            outs = [step({k: v[i * size:(i + 1) * size] for k, v in batch.items()}, update)
                    for i in range(accumulation)]
            assert [o.updated for o in outs] == [False] * (accumulation - 1) + [True]
        results.append(model.state_dict())
    one, two = results
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst < 1e-5, f"accumulating 2 x 2 images differs from one batch of 4 by {worst}"


def test_gradient_clipping_bounds_the_gradients_the_optimizer_sees():
    from accelerate import Accelerator

    norms = {}
    for max_norm in (None, 1e-3, -1.0):
        model = _model_from(load_official_checkpoint(GOLDEN_CHECKPOINT)).train()
        optimizer = build_optimizer(model)
        seen = []
        original = optimizer.step

        def recording_step(*args, _original=original, _seen=seen, _model=model, **kwargs):
            grads = [p.grad for p in _model.parameters() if p.grad is not None]
            _seen.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
            return _original(*args, **kwargs)

        optimizer.step = recording_step
        PretrainingStep(Accelerator(cpu=True), model, optimizer, _official_schedule(), max_grad_norm=max_norm)(
            _batch(), 1)
        norms[max_norm] = seen[0]
    assert norms[None] > 1e-2  # the unclipped gradient is far above the bound
    assert norms[1e-3] == pytest.approx(1e-3, rel=1e-3)
    assert norms[-1.0] == norms[None]  # <= 0: no clipping (transformers' convention), never a reversed gradient


def test_a_nonfinite_update_is_recorded_without_a_sync_and_can_be_skipped():
    from accelerate import Accelerator

    from ijepa_hf.training import NonFiniteLossError

    bad = _batch()
    bad["pixel_values"] = bad["pixel_values"].clone()
    bad["pixel_values"][0, 0, 0, 0] = float("nan")
    for skip in (0, 1):
        model = _model_from(load_official_checkpoint(GOLDEN_CHECKPOINT)).train()
        optimizer = build_optimizer(model)
        step = PretrainingStep(Accelerator(cpu=True), model, optimizer, _official_schedule(),
                               skip_nonfinite_steps=skip)
        step(_batch(), 1)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        out = step(bad, 2)
        assert not math.isfinite(out.loss.item())
        if skip == 0:
            with pytest.raises(NonFiniteLossError, match="non-finite .* at step 2"):
                step.check()
            continue
        assert out.skipped and step.skipped_updates == 1
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "a skipped update changed weights"
        step(_batch(), 3)
        step.check()  # a skipped update is not an error
        assert all(torch.isfinite(v).all() for v in model.state_dict().values())
        with pytest.raises(NonFiniteLossError, match="--skip_nonfinite_steps 1"):
            step(bad, 4)
