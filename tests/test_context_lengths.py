"""Per-image context lengths (``context_lengths="per_image"``): the collator keeps each image's whole context and
pads, the model masks the padding, and a padded batch computes exactly what each image computes alone."""

from __future__ import annotations

import json

import pytest
import torch

from ijepa_hf import IJepaForPreTraining, IJepaPretrainingConfig
from ijepa_hf.data import MaskedBatchCollator
from ijepa_hf.masking import IJepaMaskCollator, MultiBlockMaskGenerator, masks_to_boolean

from tiny import MASKS_PER_IMAGE, grads_of, per_image_batch, per_image_config

# ----------------------------------------------------------------------------------------------------------------
# The model: a padded batch is each image alone
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padded_batch_equals_each_image_alone_outputs_loss_and_gradients(attn):
    torch.manual_seed(0)
    config = per_image_config()
    for sub in (config.encoder_config, config.predictor_config):
        sub._attn_implementation = attn
    model = IJepaForPreTraining(config)
    batch = per_image_batch()
    pixels, context, targets, lengths = (batch[k] for k in ("pixel_values", "context_mask", "target_masks",
                                                            "context_lengths"))
    size, blocks = len(pixels), targets.shape[1]

    out = model(**batch)
    out.loss.backward()
    batched = grads_of(model)
    model.zero_grad(set_to_none=True)

    # Each image alone, unpadded: its context is the first `length` indices of its row.
    losses = []
    for b in range(size):
        alone = model(pixels[b:b + 1], context_mask=context[b:b + 1, : lengths[b]], target_masks=targets[b:b + 1])
        (alone.loss / size).backward()
        losses.append(alone.loss.detach())
        length = int(lengths[b])
        torch.testing.assert_close(out.context_hidden_state[b, :length], alone.context_hidden_state[0],
                                   rtol=1e-6, atol=1e-6)
        for j in range(blocks):  # block-major rows: j * B + b
            torch.testing.assert_close(out.predictions[j * size + b], alone.predictions[j], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(out.targets[j * size + b], alone.targets[j], rtol=1e-6, atol=1e-6)
    alone_grads = grads_of(model)

    # The official loss (mean over all target elements) with one target size per batch is the mean of the
    # per-image losses.
    torch.testing.assert_close(out.loss, torch.stack(losses).mean(), rtol=1e-6, atol=1e-7)
    assert batched.keys() == alone_grads.keys() and len(batched) > 10
    for name, grad in batched.items():
        assert torch.isfinite(grad).all(), name
        torch.testing.assert_close(grad, alone_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    # Padding rows are zero in the output.
    padding = torch.arange(context.shape[1]) >= lengths[:, None]
    assert padding.any() and out.context_hidden_state[padding].abs().max() == 0

    # Counter-check: the same padded masks without their lengths are a different (wrong) computation.
    with torch.no_grad():
        unmasked = model(pixels, context_mask=context, target_masks=targets)
    assert (unmasked.predictions - out.predictions).abs().max() > 1e-2


def test_padding_content_does_not_reach_outputs_or_gradients():
    torch.manual_seed(1)
    model = IJepaForPreTraining(per_image_config())
    batch = per_image_batch()
    lengths, context = batch["context_lengths"], batch["context_mask"]
    out = model(**batch)
    out.loss.backward()
    grads = grads_of(model)
    model.zero_grad(set_to_none=True)

    # Point the padding at other patches (any valid index): nothing that is read may change.
    padding = torch.arange(context.shape[1]) >= lengths[:, None]
    moved = torch.where(padding, (context * 7 + 5) % 36, context)
    other = model(**{**batch, "context_mask": moved})
    other.loss.backward()
    torch.testing.assert_close(other.loss, out.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(other.predictions, out.predictions, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(other.context_hidden_state, out.context_hidden_state, rtol=1e-6, atol=1e-6)
    for name, grad in grads_of(model).items():
        torch.testing.assert_close(grad, grads[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_bf16_cpu_training_masks_padding_without_nan(attention):
    torch.manual_seed(2)
    model = IJepaForPreTraining(per_image_config())
    model.set_attn_implementation(attention)
    batch = per_image_batch()
    reference = model(**batch).loss.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(torch.isfinite(p.grad).all() for p in model.parameters()
                                            if p.grad is not None)
    torch.testing.assert_close(out.loss.float(), reference, rtol=3e-2, atol=0)


def test_encoder_pools_only_the_context_and_recorded_outputs_keep_their_shape():
    torch.manual_seed(3)
    model = IJepaForPreTraining(per_image_config()).context_encoder
    batch = per_image_batch()
    lengths = batch["context_lengths"]
    out = model(batch["pixel_values"], context_mask=batch["context_mask"], context_lengths=lengths,
                output_hidden_states=True)
    for b in range(len(lengths)):
        alone = model(batch["pixel_values"][b:b + 1], context_mask=batch["context_mask"][b:b + 1, : lengths[b]])
        torch.testing.assert_close(out.pooler_output[b], alone.pooler_output[0], rtol=1e-6, atol=1e-6)
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == out.last_hidden_state.shape


def test_bad_context_lengths_are_clear_errors():
    torch.manual_seed(4)
    model = IJepaForPreTraining(per_image_config())
    batch = per_image_batch()
    lengths, context = batch["context_lengths"], batch["context_mask"]
    cases = [
        (dict(context_lengths=lengths[:-1]), r"shape \[6\]"),
        (dict(context_lengths=lengths.float()), "integer tensor"),
        (dict(context_lengths=lengths.clone().fill_(0)), r"outside \[1, "),
        (dict(context_lengths=lengths + context.shape[1]), r"outside \[1, "),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            model(**{**batch, **change})
    with pytest.raises(ValueError, match="list of masks"):
        model.context_encoder(batch["pixel_values"], context_mask=[context, context], context_lengths=lengths)
    with pytest.raises(ValueError, match="pass both or neither"):
        model.context_encoder(batch["pixel_values"], context_lengths=lengths)
    with pytest.raises(ValueError, match="needs `context_mask` and `target_masks`"):
        model(batch["pixel_values"], context_lengths=lengths)
    # An attention implementation that cannot take the padding mask is refused, not silently unmasked.
    model.context_encoder.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="attn_implementation='sdpa' or 'eager'.*context_lengths='shortest'"):
        model(**batch)


# ----------------------------------------------------------------------------------------------------------------
# The collator: nothing cut, padding that repeats the last index
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fixed", "official"])
def test_per_image_keeps_each_whole_context_that_shortest_cuts(mode):
    settings = dict(MASKS_PER_IMAGE, mask_mode=mode)
    shortest = IJepaMaskCollator(48, 8, **settings)
    per_image = IJepaMaskCollator(48, 8, context_lengths="per_image", **settings)
    for index in range(6):
        cut_context, cut_targets = shortest.sample_masks(16, index)
        masks = per_image.sample_batch(16, index)
        context, targets, lengths = masks["context_mask"], masks["target_masks"], masks["context_lengths"]
        assert torch.equal(targets, cut_targets)  # the same draw; targets are never cut
        assert context.shape[1] == int(lengths.max()) and int(lengths.min()) == cut_context.shape[1]
        kept = masks_to_boolean(context, 36)
        assert torch.equal(kept.sum(1), lengths)  # padding repeats a context index: no extra patch
        assert not (kept & masks_to_boolean(targets.flatten(1), 36)).any()  # context minus the targets
        cut = masks_to_boolean(cut_context, 36)
        assert not (cut & ~kept).any()  # the shortest context is a subset of the whole one
        for row, length in zip(context, lengths.tolist()):
            assert (row[:length].diff() > 0).all() and (row[length:] == row[length - 1]).all()
        if mode == "official":  # the official cut keeps the first k indices in raster order
            assert torch.equal(cut_context, context[:, : cut_context.shape[1]])
        assert context.dtype == lengths.dtype == torch.long


def test_per_image_ranks_get_their_rows_padded_to_their_own_longest():
    whole = IJepaMaskCollator(48, 8, context_lengths="per_image", **MASKS_PER_IMAGE).sample_batch(16, 2)
    for rank in range(2):
        part = IJepaMaskCollator(48, 8, context_lengths="per_image", num_processes=2, process_index=rank,
                                 **MASKS_PER_IMAGE).sample_batch(8, 2)
        rows = slice(8 * rank, 8 * rank + 8)
        lengths = whole["context_lengths"][rows]
        assert torch.equal(part["context_lengths"], lengths)
        assert torch.equal(part["context_mask"], whole["context_mask"][rows, : int(lengths.max())])
        assert torch.equal(part["target_masks"], whole["target_masks"][rows])


def test_generator_per_image_is_a_pure_function_and_shortest_is_unchanged():
    common = dict(image_size=48, patch_size=8, context_scale=(0.85, 1.0), target_aspect_ratio=(0.75, 1.5),
                  allow_overlap=False, mask_mode="fixed", **{k: v for k, v in MASKS_PER_IMAGE.items()})
    default = MultiBlockMaskGenerator(**common)
    assert default.context_lengths == "shortest" and default.sample(8, seed=0, batch_index=0).context_lengths is None
    per_image = MultiBlockMaskGenerator(**common, context_lengths="per_image")
    a, b = per_image.sample(8, seed=1, batch_index=4), per_image.sample(8, seed=1, batch_index=4)
    assert all(torch.equal(x, y) for x, y in zip((a.context_mask, a.target_masks, a.context_lengths),
                                                 (b.context_mask, b.target_masks, b.context_lengths)))


def test_collator_refuses_the_lengthless_api_and_bad_values_and_keeps_its_state():
    collator = IJepaMaskCollator(48, 8, context_lengths="per_image", **MASKS_PER_IMAGE)
    with pytest.raises(ValueError, match="sample_batch"):
        collator.sample_masks(4)
    with pytest.raises(ValueError, match="context_lengths"):
        IJepaMaskCollator(48, 8, context_lengths="longest", **MASKS_PER_IMAGE)
    with pytest.raises(ValueError, match="context_lengths"):
        IJepaPretrainingConfig(context_lengths="packed")
    state = collator.state_dict()
    assert state["context_lengths"] == "per_image" and json.loads(json.dumps(state)) == state
    assert "context_lengths='per_image'" in repr(collator)
    with pytest.warns(UserWarning, match="context_lengths"):
        IJepaMaskCollator(48, 8, **MASKS_PER_IMAGE).load_state_dict(state)


def test_images_collate_with_their_lengths_and_bad_batches_keep_the_mask_stream():
    collator = IJepaMaskCollator(48, 8, context_lengths="per_image", **MASKS_PER_IMAGE)
    images = [{"pixel_values": torch.zeros(3, 48, 48)} for _ in range(4)]
    batch = MaskedBatchCollator(collator)(images)
    assert set(batch) == {"pixel_values", "context_mask", "target_masks", "context_lengths"}
    assert batch["context_lengths"].shape == (4,)
    assert MaskedBatchCollator(collator)([None, None]) is None and collator.step == 2  # the stream advanced


# ----------------------------------------------------------------------------------------------------------------
# Selected from the config, honoured by the training loop and IJepaTrainer
# ----------------------------------------------------------------------------------------------------------------


def test_config_field_reaches_the_collator_through_overrides_and_save_load(tmp_path):
    from ijepa_hf.training import PretrainingArguments, build_config

    args = PretrainingArguments(config_name="vit_tiny_patch16_224", output_dir=str(tmp_path),
                                config_overrides="context_lengths=per_image")
    config = build_config(args)
    assert config.context_lengths == "per_image" and config.mask_settings()["context_lengths"] == "per_image"
    assert IJepaMaskCollator.from_config(config).generator.context_lengths == "per_image"
    config.save_pretrained(tmp_path / "saved")
    assert IJepaPretrainingConfig.from_pretrained(tmp_path / "saved").context_lengths == "per_image"
    assert IJepaPretrainingConfig().context_lengths == "shortest"  # the default stays the official cut
    with pytest.raises(ValueError, match="context_lengths"):
        build_config(PretrainingArguments(config_name="vit_tiny_patch16_224", output_dir=str(tmp_path),
                                          config_overrides="context_lengths=longest"))


class _Spy:
    """Wraps `IJepaForPreTraining.forward` and records the `context_lengths` each call received."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seen: list[torch.Tensor | None] = []
        forward = IJepaForPreTraining.forward

        def spy(model, *args, **kwargs):
            self.seen.append(kwargs.get("context_lengths"))
            return forward(model, *args, **kwargs)

        monkeypatch.setattr(IJepaForPreTraining, "forward", spy)


@pytest.mark.usefixtures("one_thread")
def test_pretraining_loop_passes_context_lengths_through_accelerate(tmp_path, monkeypatch):
    from tiny import TINY_OVERRIDES, read_log
    from ijepa_hf.training import parse_args, pretrain

    spy = _Spy(monkeypatch)
    argv = ["--output_dir", str(tmp_path), "--config_overrides", TINY_OVERRIDES + ",context_lengths=per_image",
            "--embedded_num_images", "16", "--per_device_train_batch_size", "8", "--max_train_steps", "2",
            "--logging_steps", "1", "--warmup_steps", "1"]
    pretrain(parse_args(argv))
    assert len(spy.seen) >= 2 and all(isinstance(x, torch.Tensor) and x.shape == (8,) for x in spy.seen)
    rows = read_log(tmp_path)
    # The log reports the mean context length of the images, not the padded length.
    assert [row["context_patches"] for row in rows] == [float(x.double().mean()) for x in spy.seen[:len(rows)]]
    assert "per_image" in (tmp_path / "README.md").read_text()  # the card records the setting


@pytest.mark.usefixtures("one_thread")
def test_trainer_passes_context_lengths_to_the_model(tmp_path, monkeypatch):
    from transformers import TrainingArguments

    from ijepa_hf.data import PretrainTransform, ProceduralShapes
    from ijepa_hf.training.trainer import IJepaTrainer

    spy = _Spy(monkeypatch)
    torch.manual_seed(0)
    config = per_image_config()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2,
                             remove_unused_columns=False, report_to="none", use_cpu=True, save_strategy="no",
                             dataloader_num_workers=0)
    trainer = IJepaTrainer(model=IJepaForPreTraining(config), args=args,
                           train_dataset=ProceduralShapes(8, image_size=48, transform=PretrainTransform(48)),
                           data_collator=IJepaMaskCollator.from_config(config))
    trainer.train()
    assert len(spy.seen) == 2 and all(isinstance(x, torch.Tensor) and x.shape == (4,) for x in spy.seen)


def test_a_checkpoint_written_before_the_field_existed_resumes_with_the_default(tmp_path):
    from ijepa_hf.training import PretrainingArguments
    from ijepa_hf.training.resume import check_resume_compatible

    args = PretrainingArguments(config_name="vit_tiny_patch16_224", output_dir=str(tmp_path))
    config = IJepaPretrainingConfig.from_preset("vit_tiny_patch16_224")
    old = config.to_dict()
    del old["context_lengths"]  # what an older checkpoint's config holds
    saved = {"arguments": args.to_dict(), "config": old, "num_processes": 1, "total_steps": 10,
             "progress": {"completed_steps": 5}}
    check_resume_compatible(saved, args, config, 1, 10)  # the default: the run it trained
    config.context_lengths = "per_image"
    with pytest.raises(ValueError, match="config context_lengths is 'per_image'"):
        check_resume_compatible(saved, args, config, 1, 10)
