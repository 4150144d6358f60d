"""Head-aware attention: fused into one op only when exact, heads matched to heads, and a ViT
whose heads and features are permuted merges back exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

import fxzip
from fxzip.head_matching import match_heads, pair_heads
from fxzip.passes.attention_fusion import fuse_attention
from fxzip.tracing import trace
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


def test_attention_with_parameters_inside_stays_a_barrier():
    torch.manual_seed(0)
    model = tiny_vit(qk_norm=True)  # LayerNorm over the head dimension, shared by all heads
    x = torch.randn(4, 1, 8, 8)
    assert fuse_attention(trace(model, x), x)[1] == []
    analysis = fxzip.analyze(model, x)
    assert analysis.barriers and not analysis.head_groups
    with pytest.raises(fxzip.StopPointError, match="barrier"):
        fxzip.merge(model, model, x, stop_at="head", progress=False)


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
    from fxzip.passes.attention_fusion import _same_on

    x = torch.randn(4, 3)
    fixed, scaled = fx.symbolic_trace(_FixedBatch()), fx.symbolic_trace(_FixedBatch(1.5))
    assert _same_on(fixed, fx.symbolic_trace(_FixedBatch()), x)  # [:2] fails, whole example used
    assert not _same_on(fixed, scaled, x)
    free, changed = nn.Linear(3, 2), nn.Linear(3, 2)
    assert _same_on(fx.symbolic_trace(free), fx.symbolic_trace(free), x)
    assert not _same_on(fx.symbolic_trace(free), fx.symbolic_trace(changed), x)
