"""Packed sequences (issue 27): a padded per-image-context batch run as one sequence of its real tokens, through
variable-length attention, computes what the padded path computes. On CPU the packed path runs with its reference
attention and with a stand-in for the kernel that reads only what a variable-length kernel reads (the packed
tensors and ``cu_seqlens``); the kernel itself is checked on GPU (benchmarks/bench_gpu.py --context-lengths)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ijepa_hf.modeling_ijepa_hf as modeling
from ijepa_hf import IJepaForPreTraining
from ijepa_hf.modeling_ijepa_hf import SequencePacking, packed_sequences

from tiny import grads_of, per_image_batch, per_image_config


def _varlen_stand_in(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None):
    """A variable-length attention that sees only the packed tensors and the cumulative lengths, as the kernel."""
    assert cu_seq_q.dtype == torch.int32 and torch.equal(cu_seq_q, cu_seq_k) and max_q == max_k
    out = torch.empty_like(query)
    for start, end in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist()):
        assert end - start <= max_q
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))  # [H, L, Dh]
        out[start:end] = F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(0, 1)
    return out


def test_packing_keeps_the_real_tokens_in_order_wherever_the_padding_is():
    mask = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    packing = SequencePacking(mask)
    assert packing.cu_seqlens.tolist() == [0, 3, 4, 8] and packing.cu_seqlens.dtype == torch.int32
    assert packing.max_seqlen == 4
    padded = torch.arange(3 * 4 * 2, dtype=torch.float32).reshape(3, 4, 2)
    packed = packing.pack(padded)
    assert torch.equal(packed, padded[mask])
    restored = packing.unpack(packed)
    assert torch.equal(restored, padded * mask[..., None])


@pytest.mark.parametrize("kernel", ["reference", "varlen stand-in"])
def test_packed_model_equals_padded_outputs_loss_and_gradients(kernel, monkeypatch):
    torch.manual_seed(0)
    model = IJepaForPreTraining(per_image_config())
    batch = per_image_batch()

    with packed_sequences(False):
        padded = model(**batch)
        padded.loss.backward()
    padded_grads = grads_of(model)
    model.zero_grad()

    calls = []
    if kernel == "varlen stand-in":
        def stand_in(device, dtype):
            calls.append(dtype)
            return _varlen_stand_in
        monkeypatch.setattr(modeling, "_varlen_kernel", stand_in)
    with packed_sequences(True):
        packed = model(**batch)
        packed.loss.backward()
    packed_grads = grads_of(model)

    if kernel == "varlen stand-in":  # every attention of both encoders' and the predictor's blocks went through it
        config = model.config
        assert len(calls) == config.encoder_config.num_hidden_layers + config.predictor_config.num_hidden_layers
    torch.testing.assert_close(packed.predictions, padded.predictions, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed.loss, padded.loss, atol=1e-6, rtol=0)
    assert packed_grads.keys() == padded_grads.keys()
    for name in padded_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], atol=1e-5, rtol=1e-5, msg=name)


def test_packed_encoder_output_is_zero_at_the_padding_and_pools_the_context_only():
    torch.manual_seed(0)
    model = IJepaForPreTraining(per_image_config())
    batch = per_image_batch()
    encoder = model.context_encoder
    inputs = dict(context_mask=batch["context_mask"], context_lengths=batch["context_lengths"])
    with torch.no_grad(), packed_sequences(False):
        padded = encoder(batch["pixel_values"], **inputs)
    with torch.no_grad(), packed_sequences(True):
        packed = encoder(batch["pixel_values"], **inputs)
    torch.testing.assert_close(packed.last_hidden_state, padded.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed.pooler_output, padded.pooler_output, atol=1e-5, rtol=0)
    lengths = batch["context_lengths"]
    padding = torch.arange(packed.last_hidden_state.shape[1]) >= lengths[:, None]
    assert packed.last_hidden_state[padding].abs().max() == 0


def test_recorded_layers_and_stochastic_depth_keep_the_padded_layout(monkeypatch):
    """Recorded hidden states and attention maps are read per image, and drop-path draws per image: those runs
    stay padded even when packing is asked for."""
    torch.manual_seed(0)
    model = IJepaForPreTraining(per_image_config())
    batch = per_image_batch()
    inputs = dict(context_mask=batch["context_mask"], context_lengths=batch["context_lengths"])
    packed_runs = []
    original = SequencePacking.__init__

    def counting(self, mask):
        packed_runs.append(mask.shape)
        original(self, mask)

    monkeypatch.setattr(SequencePacking, "__init__", counting)
    with torch.no_grad(), packed_sequences(True):
        out = model.context_encoder(batch["pixel_values"], output_hidden_states=True, **inputs)
        assert all(h.shape[:2] == batch["context_mask"].shape for h in out.hidden_states)
        assert packed_runs == []
        model.context_encoder.config.drop_path_rate = 0.1
        model.context_encoder.train()
        model.context_encoder(batch["pixel_values"], **inputs)
        assert packed_runs == []
        model.context_encoder.eval()  # no stochastic depth at evaluation: packed again
        model.context_encoder(batch["pixel_values"], **inputs)
        assert len(packed_runs) == 1


def test_the_default_packs_only_where_a_kernel_runs():
    """CPU has no variable-length kernel: by default the padded path runs, as before packing existed."""
    torch.manual_seed(0)
    model = IJepaForPreTraining(per_image_config())
    assert modeling._varlen_kernel(torch.device("cpu"), torch.bfloat16) is None
    assert not modeling._should_pack(model.context_encoder, torch.zeros(2, 3, 8))
    with packed_sequences(True):
        assert modeling._should_pack(model.context_encoder, torch.zeros(2, 3, 8))
    assert modeling._PACKING[0] is None  # restored on leaving
