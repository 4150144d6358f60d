"""Head-aware attention: fused into one op only when exact, heads matched to heads, and a ViT
whose heads and features are permuted merges back exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

import fxzip
from fxzip.matching.heads import match_heads, pair_heads
from fxzip.passes.fuse_attention import fuse_attention
from fxzip.graph.capture import trace
from permute_util import permuted_by_analysis


def tiny_vit(**kwargs) -> nn.Module:
    config = dict(img_size=8, patch_size=2, in_chans=1, num_classes=5, embed_dim=24, depth=2,
                  num_heads=3, mlp_ratio=2.0)
    config.update(kwargs)
    return VisionTransformer(**config).eval()


@pytest.mark.parametrize("fused", [True, False])
def test_attention_is_fused_into_one_op(fused):
    torch.manual_seed(0)
    model = tiny_vit()
    for block in model.blocks:
        block.attn.fused_attn = fused  # scaled_dot_product_attention, or matmul + softmax
    x = torch.randn(4, 1, 8, 8)
    gm, fused_at = fuse_attention(trace(model, x), x)
    assert fused_at == ["blocks_0_attn_qkv", "blocks_1_attn_qkv"]
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)
    analysis = fxzip.analyze(model, x)
    assert not analysis.barriers
    assert [(g.heads, [analysis.spaces[s].size for s in g.spaces])
            for g in analysis.head_groups] == [(3, [24, 24])] * 2
    qkv = analysis.feat("blocks_0_attn_qkv")
    assert qkv.blocks[0].space == qkv.blocks[1].space != qkv.blocks[2].space


def test_qk_norm_keeps_features_in_place_within_heads():
    torch.manual_seed(0)
    model = tiny_vit(qk_norm=True)  # LayerNorm over the head dimension, shared by all heads
    x = torch.randn(32, 1, 8, 8)
    assert fuse_attention(trace(model, x), x)[1] == []  # not one fused op: followed op by op
    analysis = fxzip.analyze(model, x)
    assert not analysis.barriers
    assert [(g.heads, len(g.spaces), len(g.fixed)) for g in analysis.head_groups] == [(3, 3, 1)] * 2
    _merges_its_permuted_copy_exactly(model, x)


def _merges_its_permuted_copy_exactly(model, x, seed=3):
    permuted, count = permuted_by_analysis(model, x, seed=seed)
    assert count >= 1
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(permuted(x), ref, rtol=1e-4, atol=1e-5)
    for method in ("zipit", "permute"):
        merged = fxzip.merge(model, permuted, x, method=method, reset_bn=False, progress=False)
        with torch.no_grad():
            for out in merged(x):
                err = ((out - ref).norm() / ref.norm()).item()
                assert err < 1e-4, (method, err)


def _rot_interleaved(x):  # timm's rot: pairs (2i, 2i+1) rotated
    return torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)


def _rotate_half(x):  # HF-style: halves rotated
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class HeadsBlock(nn.Module):
    """Tokens → attention written op by op, one mechanism per option → MLP → pooled head.

    qkv: "fused" (reshape (B, N, 3, H, d), q/v biases concatenated with a zero k bias),
    "separate" (q_proj, k_proj, v_proj), "interleaved" ((B, N, H, 3d) split within each head,
    MaxViT/LeViT), "reduced" (keys and values from a strided conv of the tokens, PVT-v2's sr),
    "channels" (attention over head_dim, EdgeNeXt/XCiT's XCA); extras: "rope_interleaved",
    "rope_half" (rotary embeddings on q and k), "talking" (CaiT's talking heads),
    "bias" (a learned per-head table added to the scores), "qk_rms" (an RMS norm over head_dim
    with a weight shared by heads)."""

    def __init__(self, qkv="fused", extras=(), dim=24, heads=3, tokens=16):
        super().__init__()
        self.qkv_kind, self.extras, self.heads, self.d = qkv, set(extras), heads, dim // heads
        self.embed = nn.Linear(6, dim)
        if qkv == "fused":
            self.qkv = nn.Linear(dim, 3 * dim, bias=False)
            self.q_bias, self.v_bias = nn.Parameter(torch.randn(dim)), nn.Parameter(torch.randn(dim))
            self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        elif qkv == "interleaved":
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        if qkv == "reduced":
            self.sr = nn.Conv1d(dim, dim, 2, stride=2)
            self.sr_norm = nn.LayerNorm(dim)
        if qkv == "channels":
            self.temperature = nn.Parameter(torch.rand(heads, 1, 1) + 0.5)
        if "bias" in extras:
            self.table = nn.Parameter(torch.randn(heads, tokens, tokens))
        if "talking" in extras:
            self.talk_l, self.talk_w = nn.Linear(heads, heads), nn.Linear(heads, heads)
        if "qk_rms" in extras:
            self.rms_weight = nn.Parameter(torch.rand(self.d) + 0.5)
        freqs = torch.arange(tokens)[:, None] / (10 ** (torch.arange(self.d // 2) / self.d))
        freqs = freqs.repeat_interleave(2, -1) if "rope_interleaved" in extras else freqs.repeat(1, 2)
        self.register_buffer("sin", freqs.sin(), persistent=False)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(),
                                 nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 4)

    def split(self, t):  # (B, N, H·d) -> (B, H, N, d)
        return t.reshape(t.shape[0], t.shape[1], self.heads, self.d).transpose(1, 2)

    def forward(self, x):
        h = self.embed(x)
        B, N, C = h.shape
        if self.qkv_kind == "fused":
            bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
            qkv = nn.functional.linear(h, self.qkv.weight, bias)
            q, k, v = qkv.reshape(B, N, 3, self.heads, self.d).permute(2, 0, 3, 1, 4).unbind(0)
        elif self.qkv_kind == "interleaved":
            q, k, v = self.qkv(h).view(B, N, self.heads, 3 * self.d).transpose(1, 2).chunk(3, dim=3)
        elif self.qkv_kind == "reduced":
            r = self.sr_norm(self.sr(h.transpose(1, 2)).transpose(1, 2))
            q, k, v = self.split(self.q_proj(h)), self.split(self.k_proj(r)), self.split(self.v_proj(r))
        else:
            q, k, v = (self.split(p(h)) for p in (self.q_proj, self.k_proj, self.v_proj))
        if "qk_rms" in self.extras:
            q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) * self.rms_weight
            k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + 1e-6) * self.rms_weight
        if "rope_interleaved" in self.extras or "rope_half" in self.extras:
            rot = _rot_interleaved if "rope_interleaved" in self.extras else _rotate_half
            q = q * self.cos + rot(q) * self.sin
            k = k * self.cos + rot(k) * self.sin
        if self.qkv_kind == "channels":  # attention over head_dim: (B, H, d, N)
            q, k, v = (nn.functional.normalize(t.transpose(-2, -1), dim=-1) for t in (q, k, v))
            attn = (q @ k.transpose(-2, -1)) * self.temperature
            out = (attn.softmax(-1) @ v).permute(0, 3, 1, 2).reshape(B, N, C)
        else:
            attn = q @ k.transpose(-2, -1) / self.d ** 0.5
            if "bias" in self.extras:
                attn = attn + self.table
            if "talking" in self.extras:
                attn = self.talk_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
                attn = self.talk_w(attn.softmax(-1).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            else:
                attn = attn.softmax(-1)
            out = (attn @ v).transpose(1, 2).reshape(B, N, C)
        h = h + self.proj(out)
        h = h + self.mlp(h)
        return self.head(h.mean(1))


HEADS_CASES = {  # name: (options, head groups with spaces fixed within heads)
    "fused, concatenated biases": (dict(qkv="fused"), 0),
    "separate projections": (dict(qkv="separate"), 0),
    "interleaved [q | k | v] per head": (dict(qkv="interleaved"), 1),
    "reduced keys and values": (dict(qkv="reduced"), 0),
    "channel attention": (dict(qkv="channels"), 1),
    "per-head bias table": (dict(qkv="separate", extras=("bias",)), 0),
    "talking heads": (dict(qkv="fused", extras=("talking",)), 0),
    "rotary, interleaved pairs": (dict(qkv="separate", extras=("rope_interleaved",)), 1),
    "rotary, halves": (dict(qkv="fused", extras=("rope_half",)), 1),
    "qk rms norm": (dict(qkv="separate", extras=("qk_rms",)), 1),
}


@pytest.mark.parametrize("case", sorted(HEADS_CASES))
def test_heads_followed_op_by_op_merge_exactly(case):
    options, fixed = HEADS_CASES[case]
    torch.manual_seed(0)
    model = HeadsBlock(**options).eval()
    x = torch.randn(48, 16, 6)
    analysis = fxzip.analyze(model, x)
    assert not analysis.barriers, analysis
    groups = analysis.head_groups
    assert len(groups) >= 1 and all(g.heads == 3 for g in groups), analysis
    assert sum(1 for g in groups if g.fixed) == fixed, analysis
    _merges_its_permuted_copy_exactly(model, x)


@pytest.mark.parametrize("method", ["zipit", "permute"])
def test_vit_with_permuted_heads_merges_exactly(method):
    torch.manual_seed(0)
    model = tiny_vit()
    x = torch.randn(32, 1, 8, 8)
    permuted, count = permuted_by_analysis(model, x, seed=3)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(permuted(x), ref, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(permuted.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    zipper = fxzip.Zipper([model, permuted], x, progress=False)
    stops = ["blocks_0_attn_qkv", "fused_qkv_attention", "blocks_0_attn_proj", "add_2", None]
    for stop in stops:
        merged = zipper.merge(stop, method=method, reset_bn=False)
        with torch.no_grad():
            for out in merged(x):
                err = ((out - ref).norm() / ref.norm()).item()
                assert err < 1e-4, (stop, err)


def test_head_pairing_recovers_planted_heads():
    rng = np.random.default_rng(0)
    heads, d, n = 4, 5, 4000
    size = heads * d
    data_a = rng.standard_normal((n, size))
    head_perm = np.array([2, 0, 3, 1])  # model B's head j is model A's head head_perm[j]
    within = [rng.permutation(d) for _ in range(heads)]
    cols = np.concatenate([head_perm[j] * d + within[j] for j in range(heads)])
    data_b = data_a[:, cols] + 0.3 * rng.standard_normal((n, size))
    corr = np.corrcoef(np.concatenate([data_a, data_b], axis=1), rowvar=False)
    pairs = pair_heads([corr], [size], heads, 2)
    assert pairs[1][head_perm].tolist() == list(range(heads))  # A head i pairs with B's copy
    (match,) = match_heads([corr], [size], heads, 2, "zipit", alpha=0.5, beta=0.0)
    # every B feature lands in the cluster of the A feature it copies, heads kept whole
    np.testing.assert_array_equal(match.assign[1], match.assign[0][cols])
    assert (match.assign[0] // d == np.arange(size) // d).all()


class MHABlock(nn.Module):
    """Tokens → nn.MultiheadAttention (self-attention) with a residual, LayerNorm, MLP, head."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(8, 12)
        self.attn = nn.MultiheadAttention(12, 3, batch_first=batch_first)
        self.norm = nn.LayerNorm(12)
        self.mlp = nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 12))
        self.head = nn.Linear(12, 4)

    def forward(self, x):  # x: (batch, 8, 8) = 8 tokens of 8 features
        h = self.embed(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = h + self.attn(h, h, h)[0]
        h = h + self.mlp(self.norm(h))
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h.mean(1))


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_module_merges_exactly(batch_first):
    torch.manual_seed(0)
    model = MHABlock(batch_first).eval()
    x = torch.randn(32, 8, 8)
    analysis = fxzip.analyze(model, x)
    assert not analysis.barriers, analysis
    assert [g.heads for g in analysis.head_groups] == [3]
    permuted, _ = permuted_by_analysis(model, x, seed=5)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(permuted(x), ref, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(permuted.attn.in_proj_weight, model.attn.in_proj_weight)
    merged = fxzip.merge(model, permuted, x, reset_bn=False, progress=False)
    with torch.no_grad():
        for out in merged(x):
            assert ((out - ref).norm() / ref.norm()).item() < 1e-4


def test_multihead_attention_with_a_mask_stays_a_barrier():
    class Masked(MHABlock):
        def forward(self, x):
            h = self.embed(x)
            mask = torch.ones(8, 8, dtype=torch.bool).triu(1)
            return self.head((h + self.attn(h, h, h, attn_mask=mask)[0]).mean(1))

    torch.manual_seed(0)
    analysis = fxzip.analyze(Masked(True).eval(), torch.randn(4, 8, 8))
    assert not analysis.head_groups
    assert any(b.op == "MultiheadAttention" for b in analysis.barriers)


class _FixedBatch(nn.Module):
    """A graph that only runs on batches of 4 (the size is written into a reshape)."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return x.reshape(4, -1).sum(1) * self.scale


def test_fused_graph_is_checked_on_the_whole_example_when_the_batch_size_is_fixed():
    import torch.fx as fx
    from fxzip.passes.fuse_attention import _same_on

    x = torch.randn(4, 3)
    fixed, scaled = fx.symbolic_trace(_FixedBatch()), fx.symbolic_trace(_FixedBatch(1.5))
    assert _same_on(fixed, fx.symbolic_trace(_FixedBatch()), x)  # [:2] fails, whole example used
    assert not _same_on(fixed, scaled, x)
    free, changed = nn.Linear(3, 2), nn.Linear(3, 2)
    assert _same_on(fx.symbolic_trace(free), fx.symbolic_trace(free), x)
    assert not _same_on(fx.symbolic_trace(free), fx.symbolic_trace(changed), x)
