"""A small decoder of today's language models, in plain torch: token embedding, RMSNorm, rotary
embeddings on q and k, causal attention, SwiGLU, an output layer tied to the embedding. Fed
input_ids, it merges exactly with a copy whose hidden units (heads included) are permuted."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxzip
from permute_util import permuted_by_analysis


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.heads, self.d = heads, dim // heads
        self.attn_norm, self.mlp_norm = RMSNorm(dim), RMSNorm(dim)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.gate, self.up = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, h, cos, sin):
        B, N, C = h.shape
        x = self.attn_norm(h)
        q, k, v = (p(x).view(B, N, self.heads, self.d).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.o_proj(out.transpose(1, 2).reshape(B, N, C))
        x = self.mlp_norm(h)
        return h + self.down(F.silu(self.gate(x)) * self.up(x))


class TinyDecoder(nn.Module):
    def __init__(self, vocab=50, dim=32, heads=4, hidden=48, layers=2, max_len=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(DecoderLayer(dim, heads, hidden) for _ in range(layers))
        self.norm = RMSNorm(dim)
        d = dim // heads
        inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
        freqs = torch.outer(torch.arange(max_len).float(), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, input_ids):
        h = self.embed(input_ids)  # sequences of max_len tokens (the tables are used whole)
        for layer in self.layers:
            h = layer(h, self.cos, self.sin)
        return F.linear(self.norm(h), self.embed.weight)  # output layer tied to the embedding


@pytest.mark.filterwarnings("ignore::fxzip.errors.CalibrationWarning")
def test_decoder_merges_its_permuted_copy_exactly():
    torch.manual_seed(0)
    model = TinyDecoder().eval()
    input_ids = torch.randint(0, 50, (64, 16))
    analysis = fxzip.analyze(model, input_ids)
    assert not analysis.barriers, analysis
    assert len(analysis.head_groups) == 2 and all(len(g.fixed) == 1 for g in analysis.head_groups)
    permuted, count = permuted_by_analysis(model, input_ids, seed=2)
    with torch.no_grad():
        ref = model(input_ids)
        torch.testing.assert_close(permuted(input_ids), ref, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(permuted.layers[0].v_proj.weight, model.layers[0].v_proj.weight)
    for method in ("zipit", "permute"):
        merged = fxzip.merge(model, permuted, input_ids, method=method, reset_bn=False,
                             progress=False)
        with torch.no_grad():
            for out in merged(input_ids):
                err = ((out - ref).norm() / ref.norm()).item()
                assert err < 1e-4, (method, err)
