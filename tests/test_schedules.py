"""Tests for ijepa_hf.training: official schedules and AdamW parameter groups."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from ijepa_hf.training import PretrainingSchedule, applies_weight_decay, build_optimizer, official_param_groups

# Official config values (reference §3/§4): start 2e-4, ref 1e-3, final 1e-6; wd 0.04 -> 0.4; ema 0.996 -> 1.
START, REF, FINAL = 2e-4, 1e-3, 1e-6
WARMUP, TOTAL = 10, 110


def ref_lr(step: int) -> float:
    """The reference formula, written independently of the implementation."""
    if step < WARMUP:
        return START + step / WARMUP * (REF - START)
    progress = (step - WARMUP) / (TOTAL - WARMUP)
    return max(FINAL, FINAL + (REF - FINAL) * 0.5 * (1 + math.cos(math.pi * progress)))


def ref_wd(step: int, ref: float = 0.04, final: float = 0.4) -> float:
    return final + (ref - final) * 0.5 * (1 + math.cos(math.pi * step / TOTAL))


def _optimizer(n_groups_excluded: int = 1) -> torch.optim.Optimizer:
    groups = [{"params": [nn.Parameter(torch.zeros(2, 2))], "weight_decay": 0.04}]
    groups += [
        {"params": [nn.Parameter(torch.zeros(2))], "weight_decay": 0.0, "WD_exclude": True}
        for _ in range(n_groups_excluded)
    ]
    groups.append({"params": [nn.Parameter(torch.zeros(3))], "weight_decay": 0.0, "apply_weight_decay": False})
    return torch.optim.AdamW(groups, lr=123.0)


SCHEDULE = PretrainingSchedule(total_steps=TOTAL, warmup_steps=WARMUP, start_lr=START, peak_lr=REF, final_lr=FINAL,
                               start_weight_decay=0.04, final_weight_decay=0.4, ema_start=0.996, ema_end=1.0)


def test_learning_rate_of_update_k_is_official_index_k():
    used = [SCHEDULE.lr_at(k) for k in range(1, TOTAL + 1)]
    # Official order: scheduler.step() before the update -> the first update uses index 1, the last index T.
    assert used[0] == pytest.approx(START + (REF - START) / WARMUP)
    assert used[WARMUP - 1] == pytest.approx(REF)  # index W: warm-up end = peak
    mid = WARMUP + (TOTAL - WARMUP) // 2
    assert used[mid - 1] == pytest.approx(FINAL + 0.5 * (REF - FINAL))  # cosine midpoint
    assert used[-1] == pytest.approx(FINAL)
    assert used == pytest.approx([ref_lr(i) for i in range(1, TOTAL + 1)], rel=1e-12)
    assert SCHEDULE.lr_at(2 * TOTAL) == pytest.approx(FINAL)  # past T: stays at the final value
    # warmup_steps=0 starts at the peak without dividing by zero.
    assert PretrainingSchedule(total_steps=10, start_lr=START, peak_lr=REF).lr_at(1) < REF
    assert dataclasses.replace(SCHEDULE, warmup_steps=0).lr_at(1) == pytest.approx(ref_lr_no_warmup(1))


def ref_lr_no_warmup(step: int) -> float:
    return max(FINAL, FINAL + (REF - FINAL) * 0.5 * (1 + math.cos(math.pi * step / TOTAL)))


def test_weight_decay_of_update_k_is_official_index_k_and_respects_exclusion():
    values = [SCHEDULE.weight_decay_at(k) for k in range(1, TOTAL + 1)]
    assert values == pytest.approx([ref_wd(i) for i in range(1, TOTAL + 1)], rel=1e-12)
    assert values[TOTAL // 2 - 1] == pytest.approx(0.22)  # midpoint (0.04 + 0.4) / 2
    assert values[-1] == pytest.approx(0.4) and SCHEDULE.weight_decay_at(TOTAL + 9) == pytest.approx(0.4)
    assert all(b >= a for a, b in zip(values, values[1:]))  # an increase, monotone
    decreasing = PretrainingSchedule(total_steps=10, start_weight_decay=0.4, final_weight_decay=0.04)
    assert decreasing.weight_decay_at(5) == pytest.approx(0.22) and decreasing.weight_decay_at(50) == pytest.approx(0.04)

    opt = _optimizer(n_groups_excluded=2)
    SCHEDULE.apply(opt, 7)
    assert all(g["lr"] == SCHEDULE.lr_at(7) for g in opt.param_groups)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(ref_wd(7))
    # WD_exclude groups and, without flags, groups created with weight decay 0 are untouched.
    assert [g["weight_decay"] for g in opt.param_groups[1:]] == [0.0, 0.0, 0.0]
    SCHEDULE.apply(opt, 8, lr=False)
    assert opt.param_groups[0]["lr"] == SCHEDULE.lr_at(7) and opt.param_groups[0]["weight_decay"] == ref_wd(8)
    assert applies_weight_decay({"WD_exclude": False, "weight_decay": 0.0})  # flagged decay group starting at 0


def test_ema_momentum_of_update_k_is_official_index_k_minus_1():
    values = [SCHEDULE.momentum_at(k) for k in range(1, TOTAL + 1)]
    # Official generator, consumed after the optimizer step: the k-th update uses start + (k-1) * (end-start) / T.
    assert values[0] == 0.996
    assert values == pytest.approx([0.996 + i * 0.004 / TOTAL for i in range(TOTAL)], rel=1e-12)
    assert SCHEDULE.momentum_at(TOTAL + 1) == pytest.approx(1.0) and SCHEDULE.momentum_at(TOTAL + 5) == 1.0


def test_schedule_is_stateless_and_validates():
    assert SCHEDULE.values_at(3) == SCHEDULE.values_at(3) == {
        "lr": SCHEDULE.lr_at(3), "weight_decay": SCHEDULE.weight_decay_at(3), "momentum": SCHEDULE.momentum_at(3)}
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="1-based"):
            SCHEDULE.lr_at(bad)
    with pytest.raises(ValueError, match="warmup_steps"):
        PretrainingSchedule(total_steps=5, warmup_steps=6)
    with pytest.raises(ValueError, match="total_steps"):
        PretrainingSchedule(total_steps=0)
    with pytest.raises(ValueError, match="EMA momentum"):
        PretrainingSchedule(total_steps=5, ema_start=0.9, ema_end=0.8)
    with pytest.raises(ValueError, match="peak_lr"):
        PretrainingSchedule(total_steps=5, peak_lr=float("nan"))


# ----------------------------------------------------------------------------------------------------------
# parameter groups
# ----------------------------------------------------------------------------------------------------------


class _Toy(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))  # 3-D: decayed, as official
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, dim), requires_grad=False)  # frozen: skipped
        self.proj = nn.Linear(dim, dim)  # weight decayed, bias not
        self.norm = nn.LayerNorm(dim)  # both 1-D: not decayed
        self.scale = nn.Parameter(torch.ones(dim))  # 1-D without "bias" in the name: not decayed
        self.bias_table = nn.Parameter(torch.zeros(3, 3))  # 2-D but "bias" in the name: not decayed


def test_official_param_groups():
    enc, pred = _Toy(), _Toy()
    groups = official_param_groups({"encoder": enc, "predictor": pred}, weight_decay=0.04)
    assert [g["group_name"] for g in groups] == [
        "encoder.decay",
        "predictor.decay",
        "encoder.no_decay",
        "predictor.no_decay",
    ]
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    for g, m in zip(groups[:2], (enc, pred)):
        assert ids(g["params"]) == ids([m.mask_token, m.proj.weight])
        assert g["weight_decay"] == 0.04 and not g.get("WD_exclude", False)
    for g, m in zip(groups[2:], (enc, pred)):
        assert ids(g["params"]) == ids([m.proj.bias, m.norm.weight, m.norm.bias, m.scale, m.bias_table])
        assert g["weight_decay"] == 0.0 and g["WD_exclude"] is True
    all_ids = set().union(*(ids(g["params"]) for g in groups))
    assert id(enc.pos_embed) not in all_ids and id(pred.pos_embed) not in all_ids
    # Same result from a list of pairs; a shared parameter appears once.
    pred.proj = enc.proj
    groups = official_param_groups([("encoder", enc), ("predictor", pred)])
    flat = [id(p) for g in groups for p in g["params"]]
    assert len(flat) == len(set(flat)) and id(enc.proj.weight) in ids(groups[0]["params"])


def test_fused_optimizer_matches_the_reference_adamw():
    torch.manual_seed(0)
    fused, reference = _Toy(), _Toy()
    reference.load_state_dict(fused.state_dict())
    optimizers = [build_optimizer({"encoder": fused}), build_optimizer({"encoder": reference}, foreach=False)]
    assert optimizers[0].defaults.get("fused") and not optimizers[1].defaults.get("fused")
    for model, optimizer in zip((fused, reference), optimizers):
        for _ in range(3):
            loss = sum((p.float() ** 2).sum() for p in model.parameters())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(fused.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_build_optimizer_with_schedules():
    enc, pred = _Toy(), _Toy()
    opt = build_optimizer({"encoder": enc, "predictor": pred}, lr=1e-3, weight_decay=0.04)
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 4
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8
    assert opt.defaults.get("fused")  # floating-point CPU parameters: torch's fused kernel
    schedule = PretrainingSchedule(total_steps=10, warmup_steps=2, start_lr=START, peak_lr=REF, final_lr=FINAL)
    schedule.apply(opt, 1)
    wd = schedule.weight_decay_at(1)
    assert [g["weight_decay"] for g in opt.param_groups] == pytest.approx([wd, wd, 0.0, 0.0])
    loss = sum((p.float() ** 2).sum() for g in opt.param_groups for p in g["params"]) + enc.proj(torch.ones(8)).sum()
    loss.backward()
    opt.step()  # runs with the extra group keys
    with pytest.raises(ValueError, match="no trainable"):
        official_param_groups({"frozen": nn.Linear(2, 2).requires_grad_(False)})


def test_a_start_or_end_above_the_peak_is_refused_in_both_paths(tmp_path):
    """`pretrain.py --final_lr 1` ran a cosine that climbed from the peak 1e-3 to 1 (the loss went to 11), and
    `--start_lr` above the peak a warm-up that went down, while IJepaTrainer refused the same values: one rule now
    refuses them for `PretrainingSchedule`, `pretrain()`'s options (before any data is read) and the trainer."""
    from ijepa_hf.training import parse_args
    from tiny import tiny_argv

    with pytest.raises(ValueError, match=r"final_lr=1 is above peak_lr=0.001 \(the peak\): the cosine would go up"):
        PretrainingSchedule(total_steps=10, final_lr=1.0)
    with pytest.raises(ValueError, match=r"start_lr=0.002 is above peak_lr=0.001 \(the peak\): the warm-up would go "
                                         r"down"):
        PretrainingSchedule(total_steps=10, start_lr=2e-3)
    for option, value, words in (("--final_lr", "1", "the cosine would go up"),
                                 ("--start_lr", "0.01", "the warm-up would go down")):
        with pytest.raises(ValueError, match=rf"{option}={value} is above --learning_rate=0.001 \(the peak\): {words}"):
            parse_args(tiny_argv(tmp_path / "run", "--learning_rate", "1e-3", option, value))
    assert not (tmp_path / "run").exists()
