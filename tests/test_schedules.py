"""Tests for ijepa_hf.training: official schedules and AdamW parameter groups."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from ijepa_hf.training import (
    CosineWeightDecay,
    EMAMomentum,
    WarmupCosineLR,
    build_optimizer,
    official_param_groups,
)

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


def test_warmup_cosine_lr_values():
    opt = _optimizer()
    sched = WarmupCosineLR(opt, WARMUP, TOTAL, START, REF, FINAL)
    # Construction applies index 0 to every group.
    assert sched.value == START and all(g["lr"] == START for g in opt.param_groups)
    # Official order: step() before the update -> the first update uses index 1.
    used = []
    for _ in range(TOTAL):
        used.append(sched.step())
        assert all(g["lr"] == used[-1] for g in opt.param_groups)
    assert used[0] == pytest.approx(START + (REF - START) / WARMUP)  # index 1
    assert used[WARMUP - 1] == pytest.approx(REF)  # index W: warmup end = ref_lr
    mid = WARMUP + (TOTAL - WARMUP) // 2
    assert used[mid - 1] == pytest.approx(FINAL + 0.5 * (REF - FINAL))  # cosine midpoint
    assert used[-1] == pytest.approx(FINAL)  # index T
    assert used == pytest.approx([ref_lr(i) for i in range(1, TOTAL + 1)], rel=1e-12)
    assert sched.get_last_lr() == [used[-1]] * 3 and sched.get() == used[-1]
    # Past T: stays at final_lr (clamped progress).
    assert sched.step() == pytest.approx(FINAL) and sched.value_at(2 * TOTAL) == pytest.approx(FINAL)
    # warmup_steps=0 starts at ref_lr without dividing by zero.
    assert WarmupCosineLR(_optimizer(), 0, 10, START, REF, FINAL).value == REF


def test_cosine_weight_decay_values_and_exclusion():
    opt = _optimizer(n_groups_excluded=2)
    sched = CosineWeightDecay(opt, TOTAL, ref_wd=0.04, final_wd=0.4)
    assert sched.value == pytest.approx(0.04) and opt.param_groups[0]["weight_decay"] == pytest.approx(0.04)
    values = [sched.step() for _ in range(TOTAL)]
    assert values == pytest.approx([ref_wd(i) for i in range(1, TOTAL + 1)], rel=1e-12)
    assert values[TOTAL // 2 - 1] == pytest.approx(0.22)  # midpoint (0.04 + 0.4) / 2
    assert values[-1] == pytest.approx(0.4)
    assert all(b >= a for a, b in zip(values, values[1:]))  # an increase, monotone
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.4)
    # WD_exclude / apply_weight_decay=False groups untouched.
    assert [g["weight_decay"] for g in opt.param_groups[1:]] == [0.0, 0.0, 0.0]
    assert sched.step() == pytest.approx(0.4)  # clamped past T
    # Decreasing schedules clamp on the other side.
    dec = CosineWeightDecay(_optimizer(), 10, ref_wd=0.4, final_wd=0.04)
    assert dec.value_at(5) == pytest.approx(0.22) and dec.value_at(50) == pytest.approx(0.04)


def test_ema_momentum():
    sched = EMAMomentum(TOTAL, start=0.996, end=1.0)
    assert sched.value == 0.996
    values = [sched.step() for _ in range(TOTAL)]
    # Official generator: the k-th value is start + (k-1) * (end - start) / T.
    assert values[0] == 0.996
    assert values == pytest.approx([0.996 + i * 0.004 / TOTAL for i in range(TOTAL)], rel=1e-12)
    assert values[-1] == pytest.approx(1.0 - 0.004 / TOTAL)
    assert sched.value == values[-1]
    assert sched.value_at(TOTAL) == pytest.approx(1.0) and sched.value_at(TOTAL + 5) == pytest.approx(1.0)
    assert sched.step() == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["lr", "wd", "ema"])
def test_state_dict_round_trip(kind):
    def make(opt):
        if kind == "lr":
            return WarmupCosineLR(opt, WARMUP, TOTAL, START, REF, FINAL)
        if kind == "wd":
            return CosineWeightDecay(opt, TOTAL)
        return EMAMomentum(TOTAL)

    opt_a = _optimizer()
    a = make(opt_a)
    for _ in range(37):
        a.step()
    state = a.state_dict()
    assert state["step_count"] == 37
    # Plain numbers only: a weights_only torch.load (what Accelerate uses) accepts it.
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    opt_b = _optimizer()
    b = make(opt_b)
    b.load_state_dict(state)
    assert b.value == a.value and b.step_count == 37
    if kind != "ema":  # the current value is re-applied to the new optimizer
        key = "lr" if kind == "lr" else "weight_decay"
        assert opt_b.param_groups[0][key] == opt_a.param_groups[0][key]
    assert [b.step() for _ in range(5)] == [a.step() for _ in range(5)]


def test_accelerate_checkpointing(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    acc = accelerate.Accelerator(cpu=True)
    opt = _optimizer()
    lr, ema = WarmupCosineLR(opt, WARMUP, TOTAL, START, REF, FINAL), EMAMomentum(TOTAL)
    acc.register_for_checkpointing(lr, ema)
    for _ in range(12):
        lr.step(), ema.step()
    acc.save_state(str(tmp_path / "ckpt"))
    expected = (lr.value, ema.value)
    for _ in range(3):
        lr.step(), ema.step()
    acc.load_state(str(tmp_path / "ckpt"))
    assert (lr.value, ema.value) == expected and lr.step_count == ema.step_count == 12


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
    lr = WarmupCosineLR(opt, 2, 10, START, REF, FINAL)
    wd = CosineWeightDecay(opt, 10)
    lr.step(), wd.step()
    assert [g["weight_decay"] for g in opt.param_groups] == pytest.approx([wd.value, wd.value, 0.0, 0.0])
    loss = sum((p.float() ** 2).sum() for g in opt.param_groups for p in g["params"]) + enc.proj(torch.ones(8)).sum()
    loss.backward()
    opt.step()  # runs with the extra group keys
    with pytest.raises(ValueError, match="no trainable"):
        official_param_groups({"frozen": nn.Linear(2, 2).requires_grad_(False)})
