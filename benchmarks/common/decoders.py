"""A Llama-style decoder in plain torch that fxzip captures with torch.fx: token embedding, blocks
of RMSNorm, grouped-query attention with rotary position embeddings and a SwiGLU MLP, a final
RMSNorm, and an output projection tied to the embedding (the same Parameter). Random weights from
a seed; `CONFIGS` names the sizes `benchmarks.memory` merges: tiny (20,640 parameters), 0.25B
(276,071,424) and 1B (1,038,682,112).

Sequences are `max_len` tokens long: the rotary tables are used whole (no slicing by the input's
length), as in the decoders of the tests.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

INIT_STD = 0.02  # Llama's initializer_range: every Linear and the embedding ~ N(0, 0.02²)


@dataclass(frozen=True)
class DecoderConfig:
    """The sizes of a decoder."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    max_len: int

    def parameters(self) -> int:
        """The parameter count (the tied output projection counted once), without building."""
        head = self.hidden // self.heads
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head
        block = attention + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return self.vocab * self.hidden + self.layers * block + self.hidden

    def with_layers(self, layers: int) -> DecoderConfig:
        """The same decoder with another number of blocks."""
        return replace(self, layers=layers)


CONFIGS = {
    "tiny": DecoderConfig(vocab=64, hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2,
                          max_len=16),
    "0.25B": DecoderConfig(vocab=32000, hidden=1024, intermediate=4096, layers=16, heads=16,
                           kv_heads=4, max_len=128),
    "1B": DecoderConfig(vocab=32000, hidden=2048, intermediate=8192, layers=16, heads=32,
                        kv_heads=8, max_len=128),
}


class RMSNorm(nn.Module):
    """x · rsqrt(mean(x²) + eps) · weight, written out (no fused kernel) as Llama computes it."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The second half of the last axis, negated, before the first: rotary's 90° turn."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    """Causal grouped-query attention: `kv_heads` key/value heads, each serving heads / kv_heads
    query heads; rotary position embeddings on queries and keys."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.heads, self.kv_heads = config.heads, config.kv_heads
        self.d = config.hidden // config.heads
        self.q_proj = nn.Linear(config.hidden, config.heads * self.d, bias=False)
        self.k_proj = nn.Linear(config.hidden, config.kv_heads * self.d, bias=False)
        self.v_proj = nn.Linear(config.hidden, config.kv_heads * self.d, bias=False)
        self.o_proj = nn.Linear(config.heads * self.d, config.hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q = self.q_proj(x).view(B, N, self.heads, self.d).transpose(1, 2)
        k = self.k_proj(x).view(B, N, self.kv_heads, self.d).transpose(1, 2)
        v = self.v_proj(x).view(B, N, self.kv_heads, self.d).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, N, self.heads * self.d))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x))."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden, config.intermediate, bias=False)
        self.up_proj = nn.Linear(config.hidden, config.intermediate, bias=False)
        self.down_proj = nn.Linear(config.intermediate, config.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: h + attention(norm(h)), then h + mlp(norm(h))."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.attn_norm, self.mlp_norm = RMSNorm(config.hidden), RMSNorm(config.hidden)
        self.attn, self.mlp = Attention(config), MLP(config)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.attn_norm(h), cos, sin)
        return h + self.mlp(self.mlp_norm(h))


class Decoder(nn.Module):
    """Token ids (B, max_len) in, logits (B, max_len, vocab) out."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab, config.hidden)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = RMSNorm(config.hidden)
        d = config.hidden // config.heads
        inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
        freqs = torch.outer(torch.arange(config.max_len).float(), inv)
        angles = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h, self.cos, self.sin)
        return F.linear(self.norm(h), self.embed.weight)  # the output tied to the embedding


def build_decoder(config: DecoderConfig | str, seed: int) -> Decoder:
    """A decoder with random weights from `seed` (Llama's init), in eval mode."""
    config = CONFIGS[config] if isinstance(config, str) else config
    generator = torch.Generator().manual_seed(seed)
    model = Decoder(config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, INIT_STD, generator=generator)
    return model.eval()


def random_tokens(config: DecoderConfig | str, sequences: int, seed: int = 0) -> torch.Tensor:
    """Random token ids (sequences, max_len), int64."""
    config = CONFIGS[config] if isinstance(config, str) else config
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab, (sequences, config.max_len), generator=generator)
