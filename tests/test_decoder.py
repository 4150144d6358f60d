"""A small decoder of today's language models, in plain torch: token embedding, RMSNorm, rotary
embeddings on q and k, causal attention, SwiGLU, an output layer tied to the embedding. Fed
input_ids, it merges exactly with a copy whose hidden units (heads included) are permuted. Its
grouped-query variant (4 query heads, 2 key/value heads, repeated by `repeat_interleave` in one
layer and by `expand` + `reshape` in the other; or attention spelled out with matmuls, and
`scaled_dot_product_attention(..., enable_gqa=True)`) is fed a dict batch of `input_ids` and an
`attention_mask` (right padding) combined with the causal mask."""
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
    def __init__(self, dim: int, heads: int, hidden: int, kv_heads: int | None = None,
                 repeat: str = "interleave"):
        super().__init__()
        self.heads, self.d = heads, dim // heads
        self.kv_heads, self.repeat = kv_heads or heads, repeat
        self.attn_norm, self.mlp_norm = RMSNorm(dim), RMSNorm(dim)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj, self.v_proj = (nn.Linear(dim, self.kv_heads * self.d, bias=False)
                                    for _ in range(2))
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.gate, self.up = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def repeat_kv(self, t):
        """Each key/value head serves heads / kv_heads query heads in a row."""
        n = self.heads // self.kv_heads
        if n == 1:
            return t
        if self.repeat in ("interleave", "matmul"):
            return t.repeat_interleave(n, dim=1)
        if self.repeat == "enable_gqa":  # scaled_dot_product_attention repeats them itself
            return t
        B, K, N, d = t.shape  # transformers' repeat_kv
        return t[:, :, None, :, :].expand(B, K, n, N, d).reshape(B, K * n, N, d)

    def forward(self, h, cos, sin, mask=None):
        B, N, C = h.shape
        x = self.attn_norm(h)
        q = self.q_proj(x).view(B, N, self.heads, self.d).transpose(1, 2)
        k, v = (p(x).view(B, N, self.kv_heads, self.d).transpose(1, 2)
                for p in (self.k_proj, self.v_proj))
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = self.repeat_kv(k), self.repeat_kv(v)
        if self.repeat == "matmul":  # attention spelled out
            scores = (q @ k.transpose(-2, -1)) * self.d ** -0.5
            scores = scores.masked_fill(~mask, float("-inf")) if mask is not None else scores
            out = scores.softmax(-1) @ v
        elif self.repeat == "enable_gqa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        elif mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        h = h + self.o_proj(out.transpose(1, 2).reshape(B, N, C))
        x = self.mlp_norm(h)
        return h + self.down(F.silu(self.gate(x)) * self.up(x))


class TinyDecoder(nn.Module):
    def __init__(self, vocab=50, dim=32, heads=4, hidden=48, layers=2, max_len=16, kv_heads=None,
                 repeats=("interleave", "expand")):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(
            DecoderLayer(dim, heads, hidden, kv_heads, repeats[i % len(repeats)])
            for i in range(layers))
        self.norm = RMSNorm(dim)
        d = dim // heads
        inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
        freqs = torch.outer(torch.arange(max_len).float(), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        self.register_buffer("causal", torch.ones(max_len, max_len, dtype=torch.bool).tril(),
                             persistent=False)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)  # sequences of max_len tokens (the tables are used whole)
        mask = None
        if attention_mask is not None:  # (B, 1, N, N): causal, and no padded key
            mask = self.causal[None, None] & attention_mask[:, None, None, :].bool()
        for layer in self.layers:
            h = layer(h, self.cos, self.sin, mask)
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


@pytest.mark.filterwarnings("ignore::fxzip.errors.CalibrationWarning")
@pytest.mark.parametrize("repeats", [("interleave", "expand"), ("matmul", "enable_gqa")])
def test_grouped_query_decoder_with_padding_merges_its_permuted_copy_exactly(repeats):
    """4 query heads share 2 key/value heads: kv heads are paired across models, and the query
    heads within each kv head's group are paired alike (two levels); q and k keep their features
    in place (rotary), values match freely within paired heads. A dict batch with padding."""
    torch.manual_seed(0)
    model = TinyDecoder(kv_heads=2, repeats=repeats).eval()
    input_ids = torch.randint(0, 50, (64, 16))
    lengths = torch.randint(4, 17, (64,))
    attention_mask = (torch.arange(16)[None] < lengths[:, None]).long()  # right padding
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    analysis = fxzip.analyze(model, batch)
    assert not analysis.barriers, analysis
    assert len(analysis.head_groups) == 2, analysis
    for group in analysis.head_groups:
        assert group.heads == 2 and {f for _, f, _ in group.inner} == {2}, group
    permuted, count = permuted_by_analysis(model, batch, seed=2)
    with torch.no_grad():
        ref = model(**batch)
        torch.testing.assert_close(permuted(**batch), ref, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(permuted.layers[0].q_proj.weight, model.layers[0].q_proj.weight)
        assert not torch.allclose(permuted.layers[1].v_proj.weight, model.layers[1].v_proj.weight)
    for method in ("zipit", "permute"):
        merged = fxzip.merge(model, permuted, batch, method=method, reset_bn=False,
                             progress=False)
        with torch.no_grad():
            for out in merged(**batch):
                err = ((out - ref).norm() / ref.norm()).item()
                assert err < 1e-4, (method, err)
