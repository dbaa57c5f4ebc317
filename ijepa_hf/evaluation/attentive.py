"""The attentive probe (V-JEPA 2's evaluation): a learned query cross-attending over frozen patch tokens."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .probes import check_finite, encode_labels


class AttentiveClassifier(nn.Module):
    """An attentive probe (as V-JEPA 2's evaluation): one learned query cross-attends over frozen patch tokens, a
    residual MLP refines it, and a linear head classifies it.

    Shapes: ``tokens [B, T, D]`` -> ``logits [B, num_classes]``.
    """

    def __init__(self, dim: int, num_classes: int, num_heads: int | None = None, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if num_heads is None:
            num_heads = next(h for h in (16, 12, 8, 6, 4, 3, 2, 1) if dim % h == 0 and dim // h >= 8) \
                if dim >= 8 else 1
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the feature width {dim}.")
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.norm_tokens = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.norm_head = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, T, D]`` -> the attended query ``[B, D]``."""
        keys = self.norm_tokens(tokens)
        query = self.query.expand(tokens.shape[0], -1, -1)
        pooled = query + self.attention(query, keys, keys, need_weights=False)[0]
        pooled = pooled + self.mlp(self.norm_mlp(pooled))
        return pooled[:, 0]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm_head(self.pool(tokens)))


def attentive_probe(
    train_tokens: torch.Tensor,
    train_labels: torch.Tensor,
    test_tokens: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    epochs: int = 20,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    batch_size: int = 64,
    num_heads: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Train an :class:`AttentiveClassifier` on frozen patch tokens (``extract_features(..., pool=False)``).

    Args:
        train_tokens, test_tokens: ``[N_train, T, D]`` and ``[N_test, T, D]``.
        train_labels, test_labels: LongTensor ``[N_train]``, ``[N_test]`` (any non-negative class ids).
        epochs, lr, weight_decay, batch_size: AdamW with a cosine learning rate over ``epochs`` passes.
        num_heads: attention heads of the pooling (default: a divisor of ``D`` with heads of at least 8 dims).
        seed: seeds the initialisation and the shuffling; results are deterministic on one device.
        device: where to fit; default: the tokens' device.

    Returns:
        ``{"accuracy": test accuracy, "train_accuracy", "num_classes", "num_train", "num_test", "feature_dim",
        "num_tokens", "epochs"}``; accuracies are fractions in [0, 1].
    """
    for name, tokens, labels in (("train", train_tokens, train_labels), ("test", test_tokens, test_labels)):
        if tokens.ndim != 3:
            raise ValueError(f"{name}_tokens must be [N, T, D] patch tokens (extract_features(..., pool=False)), "
                             f"got shape {tuple(tokens.shape)}.")
        if labels.ndim != 1 or len(labels) != len(tokens):
            raise ValueError(f"{name}_labels must be [N] with N = {len(tokens)}, got shape {tuple(labels.shape)}.")
        check_finite(tokens, f"{name}_tokens")
    if train_tokens.shape[1:] != test_tokens.shape[1:]:
        raise ValueError(f"token shapes differ: train {tuple(train_tokens.shape[1:])}, "
                         f"test {tuple(test_tokens.shape[1:])}.")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}.")
    device = torch.device(device) if device is not None else train_tokens.device
    train_labels, test_labels, num_classes = encode_labels(train_labels.to(device), test_labels.to(device))
    train_tokens, test_tokens = train_tokens.to(device).float(), test_tokens.to(device).float()
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = AttentiveClassifier(train_tokens.shape[-1], num_classes, num_heads).to(device)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_tokens) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    probe.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_tokens), generator=generator).to(device)
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            loss = F.cross_entropy(probe(train_tokens[index]), train_labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    probe.eval()

    @torch.no_grad()
    def accuracy(tokens: torch.Tensor, labels: torch.Tensor) -> float:
        predictions = torch.cat([probe(tokens[i:i + batch_size]).argmax(-1) for i in range(0, len(tokens), batch_size)])
        return float((predictions == labels).float().mean())

    return {
        "accuracy": accuracy(test_tokens, test_labels),
        "train_accuracy": accuracy(train_tokens, train_labels),
        "num_classes": num_classes,
        "num_train": len(train_tokens),
        "num_test": len(test_tokens),
        "feature_dim": train_tokens.shape[-1],
        "num_tokens": train_tokens.shape[1],
        "epochs": epochs,
    }
