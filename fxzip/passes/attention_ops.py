"""The fused attention ops that `fuse_attention` puts in a graph: `fused_qkv_attention` and
`AttentionCore`. Plain torch, so that merged models and the op rules use them without the pass."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F


def fused_qkv_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Multi-head self-attention from a fused projection (..., N, 3·H·d): per head
    softmax(q kᵀ / √d) v, the heads concatenated back to (..., N, H·d)."""
    *lead, tokens, width = qkv.shape
    head_dim = width // (3 * num_heads)
    q, k, v = qkv.reshape(-1, tokens, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(*lead, tokens, num_heads * head_dim)


torch.fx.wrap("fused_qkv_attention")  # a leaf when a merged model is traced again


class AttentionCore(nn.Module):
    """Attention that reads more than its fused projection — relative position biases, masks —
    kept as the traced subgraph itself (`body`, exact by construction). `head_axes[i]` is the
    axis of extra input i that runs along the heads (None: not a tensor, or broadcast over the
    heads); the analysis ties those axes to the pairing of heads."""

    def __init__(self, body: fx.GraphModule, heads: int, head_axes: tuple[int | None, ...]):
        super().__init__()
        self.body = body
        self.heads = heads
        self.head_axes = tuple(head_axes)

    def forward(self, qkv: torch.Tensor, *extras: Any) -> torch.Tensor:
        return self.body(qkv, *extras)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_axes={self.head_axes}"
