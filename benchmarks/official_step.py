"""The official I-JEPA training step, rebuilt op for op as a same-run baseline for ``bench_train_step.py``.

The issue's official figures (2.58 s fp32, 0.81 s bf16 per step) were measured once, on a host whose speed drifts
between sessions (the bf16 matmul ceiling measured here has ranged from ~2.0 to ~2.6 TFLOP/s), so a ratio against
them moves with the host. This module runs the official step's computation in the same run instead. It is written
from the reference notes' description and a reading of the official source (facebookresearch/ijepa is CC BY-NC, so
none of its code is copied), keeping every choice that costs time:

- patch embedding as ``conv -> flatten -> transpose`` (a non-contiguous residual stream until the first add);
- attention as explicit ``q @ k^T * scale -> softmax -> @ v``, so under bf16 autocast the softmax runs in fp32, with
  q, k and v indexed out of the packed projection;
- the predictor's last block on every row, context rows included;
- ``torch.optim.AdamW`` with torch's CPU default (one parameter at a time) and the official four groups;
- the EMA as a Python loop, ``k.mul_(m).add_((1 - m) * q)``, and the per-step gradient statistics;
- glibc's default allocator (the caller runs it in a fresh process with nothing tuned).

Not reproduced, because they do nothing in a single CPU process: DDP, ``AllReduce`` of the loss, the CUDA
GradScaler (disabled without CUDA); nor the per-step learning-rate and weight-decay schedule writes (a few dict
entries) and the data loader's worker processes. Parameter names follow the official state dicts, so an official
checkpoint loads as is; ``tests/test_bench_official_step.py`` checks the loss before and after one AdamW + EMA step against golden
vectors made by the official code (to 1e-5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ijepa_hf.modeling_ijepa_hf import sincos_position_embeddings
from ijepa_hf.training import is_no_decay_param

LAYER_NORM_EPS = 1e-6


def gather_tokens(x: torch.Tensor, index_sets: Sequence[torch.Tensor]) -> torch.Tensor:
    """[B, N, D] gathered at each [B, K] index tensor, stacked set-major: [len(index_sets) * B, K, D]."""
    return torch.cat([torch.gather(x, 1, idx.unsqueeze(-1).repeat(1, 1, x.size(-1))) for idx in index_sets])


def repeat_chunks(x: torch.Tensor, chunk: int, repeat: int) -> torch.Tensor:
    """Each run of ``chunk`` rows repeated ``repeat`` times in place (the official ``repeat_interleave_batch``)."""
    return torch.cat([torch.cat([x[i * chunk:(i + 1) * chunk]] * repeat) for i in range(len(x) // chunk)])


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        # indexed, not unpacked: three `select`s, whose backward the official code pays (a zero-filled qkv-sized
        # gradient per select, then their sum) instead of one `stack`
        q, k, v = qkv[0], qkv[1], qkv[2]
        weights = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(batch, length, dim))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _frozen_sincos(dim: int, grid: int) -> nn.Parameter:
    # A frozen parameter, not a buffer: the official state dicts (and optimizer groups) hold it.
    return nn.Parameter(sincos_position_embeddings(dim, (grid, grid))[None], requires_grad=False)


class PatchEmbed(nn.Module):
    def __init__(self, channels: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)  # a transposed view, as the official code leaves it


class Encoder(nn.Module):
    """ViT without CLS token: [B, 3, H, W] -> [B, N, D], or [len(masks) * B, K, D] at the kept patches."""

    def __init__(self, image_size: int, patch_size: int, dim: int, depth: int, heads: int, channels: int = 3):
        super().__init__()
        grid = image_size // patch_size
        self.patch_embed = PatchEmbed(channels, dim, patch_size)
        self.pos_embed = _frozen_sincos(dim, grid)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    def forward(self, pixels: torch.Tensor, masks: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        x = self.patch_embed(pixels) + self.pos_embed
        if masks is not None:
            x = gather_tokens(x, masks)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class Predictor(nn.Module):
    """Context [B, Kc, D] -> predictions [len(target_masks) * B, Kt, D], one sequence per target block."""

    def __init__(self, num_patches: int, encoder_dim: int, dim: int, depth: int, heads: int):
        super().__init__()
        self.predictor_embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.predictor_pos_embed = _frozen_sincos(dim, math.isqrt(num_patches))
        self.predictor_blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.predictor_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.predictor_proj = nn.Linear(dim, encoder_dim)

    def forward(self, context: torch.Tensor, context_masks: Sequence[torch.Tensor],
                target_masks: Sequence[torch.Tensor]) -> torch.Tensor:
        batch = len(context) // len(context_masks)
        x = self.predictor_embed(context)
        x += gather_tokens(self.predictor_pos_embed.repeat(batch, 1, 1), context_masks)
        context_length = x.shape[1]
        target_pos = repeat_chunks(gather_tokens(self.predictor_pos_embed.repeat(batch, 1, 1), target_masks),
                                   batch, len(context_masks))
        queries = self.mask_token.repeat(target_pos.size(0), target_pos.size(1), 1)
        queries += target_pos
        x = torch.cat([x.repeat(len(target_masks), 1, 1), queries], dim=1)
        for block in self.predictor_blocks:
            x = block(x)
        return self.predictor_proj(self.predictor_norm(x)[:, context_length:])


def official_groups(encoder: nn.Module, predictor: nn.Module) -> list[dict]:
    """Decay groups (the optimizer's default weight decay): names without "bias" and not 1-D, frozen position tables
    included, as officially; then the rest, without decay."""
    def select(module: nn.Module, decay: bool) -> list[nn.Parameter]:
        return [p for n, p in module.named_parameters() if is_no_decay_param(n, p) != decay]

    return [{"params": select(encoder, True)}, {"params": select(predictor, True)},
            {"params": select(encoder, False), "WD_exclude": True, "weight_decay": 0.0},
            {"params": select(predictor, False), "WD_exclude": True, "weight_decay": 0.0}]


@dataclass
class OfficialStep:
    """Context encoder, EMA target encoder, predictor and their optimizer, stepped the official way."""

    encoder: Encoder
    target_encoder: Encoder
    predictor: Predictor
    optimizer: torch.optim.Optimizer

    @classmethod
    def build(cls, image_size: int, patch_size: int, dim: int, depth: int, heads: int, predictor_dim: int,
              predictor_depth: int, lr: float = 1e-3, weight_decay: float = 0.04) -> OfficialStep:
        encoder = Encoder(image_size, patch_size, dim, depth, heads)
        predictor = Predictor((image_size // patch_size) ** 2, dim, predictor_dim, predictor_depth, heads)
        for module in (*encoder.modules(), *predictor.modules()):
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(predictor.mask_token, std=0.02)
        target = Encoder(image_size, patch_size, dim, depth, heads)
        target.load_state_dict(encoder.state_dict())
        target.requires_grad_(False)
        optimizer = torch.optim.AdamW(official_groups(encoder, predictor), lr=lr,
                                      weight_decay=weight_decay)
        return cls(encoder, target, predictor, optimizer)

    def loss(self, pixels: torch.Tensor, context_mask: torch.Tensor, target_masks: Sequence[torch.Tensor]) -> torch.Tensor:
        """Smooth-L1 between predictions and the LayerNorm'ed target-encoder output at the target blocks."""
        context_masks = [context_mask]
        with torch.no_grad():
            targets = self.target_encoder(pixels)
            targets = F.layer_norm(targets, (targets.size(-1),))
            targets = repeat_chunks(gather_tokens(targets, target_masks), len(pixels), len(context_masks))
        predictions = self.predictor(self.encoder(pixels, context_masks), context_masks, target_masks)
        return F.smooth_l1_loss(predictions, targets)

    def step(self, pixels: torch.Tensor, context_mask: torch.Tensor, target_masks: Sequence[torch.Tensor],
             momentum: float = 0.996, autocast: bool = False) -> float:
        """One training step: forward (bf16 autocast if asked), backward, AdamW, gradient statistics, EMA."""
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = self.loss(pixels, context_mask, target_masks)
        loss.backward()
        self.optimizer.step()
        self.gradient_norms()
        self.optimizer.zero_grad()
        with torch.no_grad():
            for online, target in zip(self.encoder.parameters(), self.target_encoder.parameters()):
                target.data.mul_(momentum).add_((1.0 - momentum) * online.detach().data)
        return loss.detach().item()

    def gradient_norms(self) -> list[float]:
        """The official per-step gradient logging: the norm of every weight gradient of the context encoder."""
        return [float(p.grad.data.norm()) for n, p in self.encoder.named_parameters()
                if p.grad is not None and not n.endswith(".bias") and p.ndim != 1]
