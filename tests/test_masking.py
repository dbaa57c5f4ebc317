"""Tests for ijepa_hf.masking (multi-block mask sampler + collator).

The sampler is seeded, so every statistic below is deterministic for a given torch version; the
thresholds still leave room for the sampling noise of the fixture itself (official-mask-stats.json:
3000 images for batch 1, only 150 batches for batch 64).
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

try:
    from ijepa_hf.masking import IJepaMaskCollator, masks_to_boolean
except ImportError:  # running without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ijepa_hf.masking import IJepaMaskCollator, masks_to_boolean

FIXTURE = Path(__file__).parent / "fixtures" / "official-mask-stats.json"
OFFICIAL_STATS = json.loads(FIXTURE.read_text())["stats"]


def _block_shape(block: torch.Tensor, width: int) -> tuple[int, int]:
    """(h, w) of a rectangular block given its raster indices."""
    h = int((block.max() - block.min()) // width) + 1
    return h, block.numel() // h


def _official_stats(collator: IJepaMaskCollator, batch_size: int, iters: int) -> dict:
    g = collator.generator
    n, H, W, M = g.num_patches, g.height, g.width, g.num_target_blocks
    ctx_cov = torch.zeros(n)
    tgt_cov = torch.zeros(n)
    ctx_len, tgt_len, freq = [], [], {}
    for i in range(iters):
        ctx, tgt = collator.sample_masks(batch_size, i)
        ctx_cov += masks_to_boolean(ctx, n).sum(0)
        tgt_cov += masks_to_boolean(tgt, n).sum((0, 1))
        ctx_len.append(ctx.shape[1])
        tgt_len.append(tgt.shape[2])
        h, w = _block_shape(tgt[0, 0], W)
        freq[f"{h}x{w}"] = freq.get(f"{h}x{w}", 0) + 1
    return {
        "context_len_mean": float(np.mean(ctx_len)),
        "target_len_mean": float(np.mean(tgt_len)),
        "context_coverage": (ctx_cov / (iters * batch_size)).view(H, W).numpy(),
        "target_coverage": (tgt_cov / (iters * batch_size * M)).view(H, W).numpy(),
        "freq": {k: v / iters for k, v in freq.items()},
    }


def _tv(p: dict, q: dict) -> float:
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


# --------------------------------------------------------------------------------------------
# official mode vs the official sampler's statistics
@pytest.mark.parametrize("key", sorted(OFFICIAL_STATS))
def test_official_mode_matches_fixture(key):
    ref = OFFICIAL_STATS[key]
    collator = IJepaMaskCollator(ref["image_size"], ref["patch_size"], mask_mode="official",
                                 num_target_blocks=ref["npred"], context_scale=tuple(ref["enc_mask_scale"]),
                                 target_scale=tuple(ref["pred_mask_scale"]),
                                 target_aspect_ratio=tuple(ref["aspect_ratio"]), min_keep=ref["min_keep"])
    assert collator.possible_block_sizes("context") == [
        tuple(int(x) for x in s.split("x")) for s in ref["context_block_size_freq"]]
    batch = ref["batch_size"]
    # 4000 single images (fixture: 3000) / 800 batches of 64 (fixture: 150): ~0.5 s each
    got = _official_stats(collator, batch, 4000 if batch == 1 else 800)
    # block sizes: the fixture's batch-64 entry holds only 150 size draws (TV noise ~0.06)
    assert _tv(got["freq"], ref["target_block_size_freq"]) < (0.05 if batch == 1 else 0.12)
    assert got["target_len_mean"] == pytest.approx(ref["target_len_mean"], rel=0.03)
    assert got["context_len_mean"] == pytest.approx(ref["context_len_mean"], rel=0.02 if batch == 1 else 0.05)
    ref_ctx = np.array(ref["context_coverage"])
    ref_tgt = np.array(ref["target_coverage_per_block"])
    assert np.abs(got["context_coverage"] - ref_ctx).max() < (0.05 if batch == 1 else 0.08)
    assert np.abs(got["target_coverage"] - ref_tgt).max() < 0.04
    # official defect: the last patch row and column are never covered
    for cov in (got["context_coverage"], got["target_coverage"]):
        assert cov[-1].max() == 0 and cov[:, -1].max() == 0


def test_official_scale_and_aspect_fully_correlated():
    # large grid so that rounding does not hide the shared random number
    official = IJepaMaskCollator(448, 8, mask_mode="official")
    fixed = IJepaMaskCollator(448, 8, mask_mode="fixed")
    corr = {}
    for name, c in (("official", official), ("fixed", fixed)):
        shapes = [_block_shape(c.sample_masks(1, i)[1][0, 0], c.generator.width) for i in range(400)]
        area = [h * w for h, w in shapes]
        ratio = [h / w for h, w in shapes]
        corr[name] = np.corrcoef(area, ratio)[0, 1]
    assert corr["official"] > 0.95
    assert abs(corr["fixed"]) < 0.2


# --------------------------------------------------------------------------------------------
# fixed mode
def test_fixed_mode_unbiased_coverage():
    c = IJepaMaskCollator(224, 16)
    n, iters = c.generator.num_patches, 300
    ctx_cov = torch.zeros(n)
    tgt_cov = torch.zeros(n)
    for i in range(iters):
        ctx, tgt = c.sample_masks(64, i)
        ctx_cov += masks_to_boolean(ctx, n).float().mean(0)
        tgt_cov += masks_to_boolean(tgt, n).float().mean((0, 1))
    ctx_cov = (ctx_cov / iters).view(14, 14)
    tgt_cov = (tgt_cov / iters).view(14, 14)
    # last row/column can be context and target
    assert ctx_cov[-1].min() > 0.2 and ctx_cov[:, -1].min() > 0.2
    assert tgt_cov[-1].min() > 0.01 and tgt_cov[:, -1].min() > 0.01
    # equalisation keeps a random subset: no top/bottom (or left/right) bias after truncation
    assert ctx_cov[:7].mean() / ctx_cov[7:].mean() == pytest.approx(1.0, abs=0.05)
    assert ctx_cov[:, :7].mean() / ctx_cov[:, 7:].mean() == pytest.approx(1.0, abs=0.05)
    # blocks can reach the full grid
    assert (14, 14) in c.possible_block_sizes("context")


def test_official_equalisation_biased_to_top():
    c = IJepaMaskCollator(224, 16, mask_mode="official")
    cov = torch.zeros(196)
    for i in range(100):
        cov += masks_to_boolean(c.sample_masks(64, i)[0], 196).float().mean(0)
    cov = cov.view(14, 14)
    assert cov[:7].mean() / cov[7:].mean() > 2.0


# --------------------------------------------------------------------------------------------
# shapes, ranges, constraints
@pytest.mark.parametrize("mode", ["fixed", "official"])
@pytest.mark.parametrize("image_size,patch_size", [(224, 16), (224, 14), (96, 8), ((192, 256), 16)])
def test_shapes_and_constraints(mode, image_size, patch_size):
    c = IJepaMaskCollator(image_size, patch_size, mask_mode=mode, min_keep=4)
    n = c.generator.num_patches
    for i in range(20):
        ctx, tgt = c.sample_masks(16, i)
        assert ctx.dtype == torch.int64 and tgt.dtype == torch.int64
        assert ctx.ndim == 2 and ctx.shape[0] == 16
        assert tgt.ndim == 3 and tgt.shape[:2] == (16, 4)
        assert ctx.shape[1] > c.generator.min_keep and tgt.shape[2] > c.generator.min_keep
        for t in (ctx, tgt):
            assert t.min() >= 0 and t.max() < n
            assert (t[..., 1:] > t[..., :-1]).all()  # sorted ascending, hence unique
        ctx_b = masks_to_boolean(ctx, n)
        tgt_b = masks_to_boolean(tgt, n).any(1)
        assert not (ctx_b & tgt_b).any()  # disjoint (allow_overlap=False)
        # targets are rectangles of one shared size
        h, w = _block_shape(tgt[0, 0], c.generator.width)
        assert h * w == tgt.shape[2]
        blocks = tgt.view(16, 4, h, w)
        assert (blocks[..., 1:, :] - blocks[..., :-1, :] == c.generator.width).all()
        assert (blocks[..., :, 1:] - blocks[..., :, :-1] == 1).all()


def test_allow_overlap_context_is_rectangle():
    c = IJepaMaskCollator(224, 16, allow_overlap=True)
    ctx, tgt = c.sample_masks(8, 0)
    side = int(round(ctx.shape[1] ** 0.5))
    assert side * side == ctx.shape[1] and side in (13, 14)


def test_small_grid_fallback_does_not_hang():
    # 8x8 grid, four 3x3..4x4 targets: contexts often need the overlap fallback
    for mode in ("fixed", "official"):
        c = IJepaMaskCollator(32, 4, mask_mode=mode, min_keep=4, target_scale=(0.2, 0.25))
        for i in range(20):
            ctx, tgt = c.sample_masks(32, i)
            assert ctx.shape[1] > 4 and tgt.shape[:2] == (32, 4)


def test_masks_to_boolean():
    m = masks_to_boolean(torch.tensor([[0, 3], [1, 2]]), 5)
    assert m.tolist() == [[True, False, False, True, False], [False, True, True, False, False]]
    assert masks_to_boolean(torch.zeros(2, 3, 4, dtype=torch.long), 9).shape == (2, 3, 9)


# --------------------------------------------------------------------------------------------
# collation
def test_collate_inputs():
    c = IJepaMaskCollator(32, 4, min_keep=4, num_target_blocks=2)
    imgs = torch.randn(3, 3, 32, 32)
    expected = IJepaMaskCollator(32, 4, min_keep=4, num_target_blocks=2).sample_masks(3, 0)
    for examples in ([{"pixel_values": x, "label": 1} for x in imgs], list(imgs), [(x, 0) for x in imgs]):
        c.set_step(0)
        out = c(examples)
        assert set(out) == {"pixel_values", "context_mask", "target_masks"}
        assert torch.equal(out["pixel_values"], imgs)
        assert torch.equal(out["context_mask"], expected[0])
        assert torch.equal(out["target_masks"], expected[1])
    assert c.step == 1
    # uint8 images stay uint8 (finished on the device by normalize_images); other integer images are refused
    assert c([x.to(torch.uint8) for x in imgs])["pixel_values"].dtype == torch.uint8
    with pytest.raises(ValueError, match="uint8"):
        c([x.to(torch.int64) for x in imgs])
    with pytest.raises(ValueError, match="shape"):
        c([torch.randn(3, 16, 16)])


def test_from_config():
    cfg = SimpleNamespace(image_size=96, patch_size=8, num_target_blocks=3, context_scale=[0.8, 1.0],
                          target_scale=(0.1, 0.2), target_aspect_ratio=(0.5, 2.0), min_keep=4,
                          allow_overlap=False, mask_mode="official", hidden_size=384)
    c = IJepaMaskCollator.from_config(cfg, seed=5)
    g = c.generator
    assert (g.height, g.width, g.num_target_blocks, g.mask_mode, c.seed) == (12, 12, 3, "official", 5)
    assert c.generator.context_scale == (0.8, 1.0) and c.generator.min_keep == 4
    assert IJepaMaskCollator.from_config(SimpleNamespace()).generator.mask_mode == "fixed"


# --------------------------------------------------------------------------------------------
# determinism, resume, workers, multi-process
@pytest.mark.parametrize("mode", ["fixed", "official"])
def test_deterministic(mode):
    a = IJepaMaskCollator(224, 16, mask_mode=mode, seed=3)
    b = IJepaMaskCollator(224, 16, mask_mode=mode, seed=3)
    seq_a = [a.sample_masks(8) for _ in range(4)]
    seq_b = [b.sample_masks(8, i) for i in range(4)]  # explicit indices == counter
    for (ca, ta), (cb, tb) in zip(seq_a, seq_b):
        assert torch.equal(ca, cb) and torch.equal(ta, tb)
    assert a.step == 4
    assert torch.equal(b.sample_masks(8, 2)[1], seq_a[2][1])  # pure function of the index
    other = IJepaMaskCollator(224, 16, mask_mode=mode, seed=4).sample_masks(8, 0)
    assert not (other[0].shape == seq_a[0][0].shape and torch.equal(other[0], seq_a[0][0]))


def test_state_dict_resume():
    a = IJepaMaskCollator(224, 16, seed=7)
    full = [a.sample_masks(4) for _ in range(5)]
    b = IJepaMaskCollator(224, 16, seed=7)
    b.sample_masks(4)
    b.sample_masks(4)
    state = b.state_dict()
    assert state["seed"] == 7 and state["step"] == 2 and state["mask_mode"] == "fixed"
    json.dumps(state)  # plain types
    c = IJepaMaskCollator(224, 16, seed=0)
    c.load_state_dict(state)
    assert c.seed == 7 and c.step == 2
    for i in range(2, 5):
        ctx, tgt = c.sample_masks(4)
        assert torch.equal(ctx, full[i][0]) and torch.equal(tgt, full[i][1])
    with pytest.warns(UserWarning, match="min_keep"):
        IJepaMaskCollator(224, 16, min_keep=5).load_state_dict(state)


def test_dataloader_workers_match_single_process():
    data = TensorDataset(torch.randn(14, 3, 32, 32), torch.zeros(14))
    c = IJepaMaskCollator(32, 4, min_keep=4, seed=11)
    ref = list(DataLoader(data, batch_size=2, collate_fn=c, num_workers=0))
    assert c.step == 7
    c.set_step(0)
    got = list(DataLoader(data, batch_size=2, collate_fn=c, num_workers=2))
    assert len(got) == len(ref)
    for r, g in zip(ref, got):
        assert torch.equal(r["pixel_values"], g["pixel_values"])
        assert torch.equal(r["context_mask"], g["context_mask"])
        assert torch.equal(r["target_masks"], g["target_masks"])


@pytest.mark.parametrize("mode", ["fixed", "official"])
def test_multiprocess_slices_global_batch(mode):
    single = IJepaMaskCollator(224, 16, mask_mode=mode, seed=2)
    ranks = [IJepaMaskCollator(224, 16, mask_mode=mode, seed=2, num_processes=2, process_index=p,
                               mask_sampling="global") for p in range(2)]
    for _ in range(3):
        ctx, tgt = single.sample_masks(16)
        parts = [r.sample_masks(8) for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), ctx)
        assert torch.equal(torch.cat([p[1] for p in parts]), tgt)


def test_sampling_scope_is_a_setting_of_its_own_with_the_mode_as_default():
    """``mask_sampling``: the global batch (rows of a 1-process run) or each process's own batch (the official
    code); not given, the mask mode's own, and the config's field reaches the collator."""
    from ijepa_hf import IJepaPretrainingConfig

    assert IJepaMaskCollator(224, 16).mask_sampling == "global"
    assert IJepaMaskCollator(224, 16, mask_mode="official").mask_sampling == "per_process"
    own = [IJepaMaskCollator(224, 16, seed=2, num_processes=2, process_index=p, mask_sampling="per_process")
           for p in range(2)]
    alone = IJepaMaskCollator(224, 16, seed=2)  # per process: each samples its 8 as a 1-process run of 8 would
    for index in range(3):
        expected = alone.sample_masks(8, index)
        for rank in own:
            assert all(torch.equal(x, y) for x, y in zip(rank.sample_masks(8, index), expected))
    config = IJepaPretrainingConfig(mask_mode="official", mask_sampling="global")
    assert config.mask_sampling_scope == "global" and IJepaMaskCollator.from_config(config).mask_sampling == "global"
    assert IJepaPretrainingConfig(mask_mode="official").mask_sampling_scope == "per_process"
    with pytest.raises(ValueError, match="mask_sampling"):
        IJepaPretrainingConfig(mask_sampling="per_node")
    with pytest.raises(ValueError, match="mask_sampling"):
        IJepaMaskCollator(224, 16, mask_sampling="per_node")


def test_collator_states_of_earlier_versions_still_load():
    """States written before the settings took the config's names call the mask mode "mode"."""
    collator = IJepaMaskCollator(224, 16, seed=1)
    collator.sample_masks(4)
    state = collator.state_dict()
    state["mode"] = "official"
    del state["mask_mode"], state["mask_sampling"]
    restored = IJepaMaskCollator(224, 16)
    restored.load_state_dict(state)
    assert restored.generator.mask_mode == "official" and restored.step == 1 and restored.seed == 1


# --------------------------------------------------------------------------------------------
# errors
class _Timeout:
    """Fail instead of hanging (the official sampler loops forever on these settings)."""

    def __enter__(self):
        signal.signal(signal.SIGALRM, self._raise)
        signal.alarm(10)

    def __exit__(self, *exc):
        signal.alarm(0)

    @staticmethod
    def _raise(*_):
        raise TimeoutError("mask sampler hung")


@pytest.mark.parametrize("mode", ["official", "fixed"])
def test_too_small_grid_raises(mode):
    # official config values on 32 px CIFAR images with patch 4: the official collator hangs
    with _Timeout(), pytest.raises(ValueError) as err:
        IJepaMaskCollator(32, 4, mask_mode=mode, min_keep=10)
    msg = str(err.value)
    for word in ("min_keep=10", "patch_size", "image_size", "8x8", "target_scale"):
        assert word in msg
    # ...and works once min_keep is lowered
    with _Timeout():
        ctx, _ = IJepaMaskCollator(32, 4, mask_mode=mode, min_keep=4).sample_masks(64, 0)
    assert ctx.shape[1] > 4


def test_context_too_small_raises():
    with pytest.raises(ValueError, match="context_scale"):
        IJepaMaskCollator(32, 8, min_keep=1, target_scale=(0.5, 0.5), context_scale=(0.1, 0.1))


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"image_size": 225}, "image_size"),
        ({"patch_size": 0}, "patch_size"),
        ({"image_size": "224"}, "image_size"),
        ({"num_target_blocks": 0}, "num_target_blocks"),
        ({"num_target_blocks": 2.5}, "num_target_blocks"),
        ({"context_scale": (0.0, 1.0)}, "context_scale"),
        ({"context_scale": (0.9, 0.8)}, "context_scale"),
        ({"target_scale": (0.1, 1.5)}, "target_scale"),
        ({"target_scale": 0.2}, "target_scale"),
        ({"target_aspect_ratio": (0.0, 1.0)}, "target_aspect_ratio"),
        ({"target_aspect_ratio": (2.0, 1.0)}, "target_aspect_ratio"),
        ({"min_keep": -1}, "min_keep"),
        ({"mask_mode": "paper"}, "mask_mode"),
        ({"allow_overlap": "no"}, "allow_overlap"),
        ({"num_processes": 0}, "num_processes"),
        ({"num_processes": 2, "process_index": 2}, "process_index"),
        ({"max_tries": 0}, "max_tries"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_invalid_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        IJepaMaskCollator(**kwargs)


def test_invalid_runtime_args():
    c = IJepaMaskCollator(224, 16)
    with pytest.raises(ValueError, match="batch_size"):
        c.sample_masks(0)
    with pytest.raises(ValueError, match="step"):
        c.set_step(-1)


# --------------------------------------------------------------------------------------------
# the pure generator under the collator
GOLDEN_MASKS = json.loads((Path(__file__).parent / "fixtures" / "golden-masks.json").read_text())["cases"]


@pytest.mark.parametrize("case", GOLDEN_MASKS, ids=lambda c: f"{c['mode']}-{c['kwargs']}-{c['seed']}-{c['batch_index']}")
def test_same_masks_as_before_the_refactor(case):
    import hashlib

    # The cases were recorded when a collator always sampled the global batch of its processes.
    c = IJepaMaskCollator(mask_mode=case["mode"], seed=case["seed"], mask_sampling="global", **case["kwargs"])
    ctx, tgt = c.sample_masks(case["batch_size"], case["batch_index"])
    assert list(ctx.shape) == case["context_shape"] and list(tgt.shape) == case["target_shape"]
    assert ctx[0].tolist() == case["context_row0"]
    assert hashlib.sha256(ctx.numpy().tobytes() + tgt.numpy().tobytes()).hexdigest() == case["sha256"]
    assert c.num_fallbacks == case["fallbacks"]


def test_generator_is_pure_and_stateless():
    import dataclasses
    import pickle

    from ijepa_hf.masking import MultiBlockMaskGenerator

    gen = MultiBlockMaskGenerator(image_size=32, patch_size=4, num_target_blocks=4, context_scale=(0.6, 0.8),
                                  target_scale=(0.2, 0.3), target_aspect_ratio=(0.75, 1.5), min_keep=8,
                                  allow_overlap=False, mask_mode="official")
    assert dataclasses.is_dataclass(gen) and (gen.height, gen.width) == (8, 8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        gen.min_keep = 2
    state = dict(vars(gen))
    first = [gen.sample(32, seed=0, batch_index=i) for i in range(6)]
    backwards = [gen.sample(32, seed=0, batch_index=i) for i in reversed(range(6))][::-1]
    assert vars(gen) == state  # sampling changed nothing
    assert sum(b.num_fallbacks for b in first) > 0  # the fallback path is exercised
    for a, b in zip(first, backwards):
        assert torch.equal(a.context_mask, b.context_mask) and torch.equal(a.target_masks, b.target_masks)
        assert a.num_fallbacks == b.num_fallbacks
    clone = pickle.loads(pickle.dumps(gen))
    assert clone == gen and torch.equal(clone.sample(32, seed=0, batch_index=3).context_mask, first[3].context_mask)
    # the collator's masks are the generator's, sliced per rank when sampled globally
    collator = IJepaMaskCollator(32, 4, mask_mode="official", min_keep=8, context_scale=(0.6, 0.8),
                                 target_scale=(0.2, 0.3), num_processes=2, process_index=1, mask_sampling="global")
    assert collator.generator == gen
    ctx, tgt = collator.sample_masks(16, 2)
    assert torch.equal(ctx, first[2].context_mask[16:]) and torch.equal(tgt, first[2].target_masks[16:])
    with pytest.raises(ValueError, match="batch_index"):
        gen.sample(4, seed=0, batch_index=-1)


def test_generator_from_a_pretraining_config():
    from ijepa_hf import IJepaPretrainingConfig
    from ijepa_hf.masking import MultiBlockMaskGenerator

    config = IJepaPretrainingConfig(
        encoder_config=dict(image_size=96, patch_size=8, hidden_size=96, num_hidden_layers=3, num_attention_heads=3),
        num_target_blocks=3, min_keep=4, mask_mode="official", target_aspect_ratio=(0.5, 2.0))
    gen = MultiBlockMaskGenerator.from_config(config)
    collator = IJepaMaskCollator.from_config(config, seed=5)
    assert gen == collator.generator and gen.mask_mode == "official" and gen.target_aspect_ratio == (0.5, 2.0)
    assert torch.equal(gen.sample(8, seed=5, batch_index=1).target_masks, collator.sample_masks(8, 1)[1])


def test_mask_settings_have_one_rule_set_and_the_config_defaults():
    from ijepa_hf import IJepaPretrainingConfig

    defaults = IJepaPretrainingConfig.default_mask_settings()
    c = IJepaMaskCollator(224, 16)
    assert tuple(getattr(c.generator, name) for name in defaults) == tuple(defaults.values())
    # the same values are refused by the config and by the collator (the config used to accept an infinite ratio)
    for field, value in (("target_aspect_ratio", (0.5, float("inf"))), ("target_scale", (0.1, 1.5)),
                         ("context_scale", (0.0, 1.0)), ("min_keep", -1), ("num_target_blocks", 0)):
        with pytest.raises(ValueError, match=field):
            IJepaPretrainingConfig(**{field: value})
        with pytest.raises(ValueError, match=field):
            IJepaMaskCollator(224, 16, **{field: value})
    with pytest.raises(ValueError, match="mask_mode"):
        IJepaPretrainingConfig(mask_mode="paper")
    with pytest.raises(ValueError, match="`mask_mode`"):  # one name everywhere
        IJepaMaskCollator(224, 16, mask_mode="paper")
    with pytest.raises(TypeError, match="`mode` is called `mask_mode`"):
        IJepaMaskCollator(224, 16, mode="official")
    with pytest.raises(TypeError, match="unknown mask settings"):
        IJepaMaskCollator(224, 16, min_keeps=4)


def test_untransformed_examples_are_refused_naming_the_dataset_that_transforms_them():
    """A `datasets.Dataset` of images handed to the collator (README's IJepaTrainer snippet with one's own data) was
    refused with "example dict has no 'pixel_values' key" and no word of the fix; the error names the dataset
    wrapper that crops and tensorises them, which then trains."""
    import numpy as np
    from PIL import Image

    from ijepa_hf.data import PretrainImageDataset

    collator = IJepaMaskCollator(64, 16, min_keep=0, seed=0)
    image = Image.fromarray(np.zeros((70, 80, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"no 'pixel_values' key \(keys: \['image', 'label'\]\).*"
                                         r"PretrainImageDataset\(dataset, image_size=64\)"):
        collator([{"image": image, "label": 0}])
    batch = collator([PretrainImageDataset([{"image": image, "label": 0}], image_size=64)[0]])
    assert batch["pixel_values"].shape == (1, 3, 64, 64)
