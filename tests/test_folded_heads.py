"""Attention heads folded into the batch axis — (B, H, N, d) viewed as (B·H, N, d) for
`torch.bmm`, as Hugging Face DeBERTa-v2 and `F.multi_head_attention_forward` do — are still
heads (`Feat.folded`): products, softmax over positions, scaling, gathers by relative position
and masks broadcast over the heads act per (sample, head), heads are permuted as wholes and the
features within paired heads alike, and unfolding gives the head axis back. Each model merged
with a PERMUTED copy of itself (`fxzip.testing.permuted_copy`) must give its output back, under
torch.fx and torch.export alike; ops that mix the folded axis stay barriers."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxzip
from permute_util import rel_err as relative_error

pytestmark = pytest.mark.filterwarnings("ignore::fxzip.CalibrationWarning")


class FoldedAttention(nn.Module):
    """One encoder layer whose attention folds the heads into the batch axis DeBERTa's way:
    (B, N, H·d) -> (B, H, N, d) -> (B·H, N, d), `bmm` for the scores (scaled), unfolded to
    (B, H, N, N) for a padding mask broadcast over the heads and the softmax, folded again for
    `bmm` with the values, unfolded and merged back to (B, N, H·d).

    `relative`: plus DeBERTa's content-to-position term: a learned table of relative position
    embeddings (normalised), projected by the layer's own key projection, split into heads and
    tiled over the batch with `repeat`, multiplied with the queries and gathered by a relative
    position index shared by every sample and head. `sdpa`: the attention of the folded
    queries, keys and values by `F.scaled_dot_product_attention` instead."""

    def __init__(self, dim: int = 16, heads: int = 4, tokens: int = 6, relative: bool = False,
                 sdpa: bool = False):
        super().__init__()
        self.heads, self.relative, self.sdpa = heads, relative, sdpa
        self.scale = math.sqrt(dim // heads * (2 if relative else 1))
        self.embed = nn.Linear(5, dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 3)
        if relative:
            span = tokens  # relative positions -span+1 … span-1, clamped into 2·span rows
            self.rel = nn.Embedding(2 * span, dim)
            self.rel_norm = nn.LayerNorm(dim)
            position = torch.arange(tokens)
            index = (position[:, None] - position[None, :] + span).clamp(0, 2 * span - 1)
            self.register_buffer("rel_index", index[None])  # (1, N, N), the same for all

    def fold(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, H·d) -> (B·H, N, d)."""
        x = x.view(x.size(0), x.size(1), self.heads, -1)
        return x.permute(0, 2, 1, 3).contiguous().view(-1, x.size(1), x.size(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        B, N, C = h.shape
        keep = x[:, :, 0] > -1.5  # a padding mask of the inputs: the same in every model
        q, k, v = self.fold(self.q(h)), self.fold(self.k(h)), self.fold(self.v(h))
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            scores = torch.bmm(q, k.transpose(-1, -2) / self.scale)
            if self.relative:
                table = self.fold(self.k(self.rel_norm(self.rel.weight)).unsqueeze(0))
                table = table.repeat(B, 1, 1)  # (B·H, 2·span, d)
                c2p = torch.bmm(q, table.transpose(-1, -2))
                index = self.rel_index.expand(B * self.heads, N, N)
                scores = scores + torch.gather(c2p, -1, index) / self.scale
            scores = scores.view(-1, self.heads, N, N)
            scores = scores.masked_fill(~keep[:, None, None, :], torch.finfo(scores.dtype).min)
            probs = F.softmax(scores, dim=-1)
            out = torch.bmm(probs.view(-1, N, N), v)
        out = out.view(-1, self.heads, N, C // self.heads).permute(0, 2, 1, 3).contiguous()
        h = self.norm(h + self.proj(out.view(B, N, C)))
        h = h + self.mlp(h)
        return self.head(h.mean(1))


class TokenMajorAttention(nn.Module):
    """Attention in the style of `F.multi_head_attention_forward`: tokens first, (N, B, H·d)
    viewed as (N, B·H, d) — split into heads and folded into the batch at once — transposed
    to (B·H, N, d), softmax over the folded scores, and the heads merged back from
    (N, B·H, d) to (N, B, H·d)."""

    def __init__(self, dim: int = 16, heads: int = 4):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.embed = nn.Linear(5, dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x).transpose(0, 1)  # (N, B, C)
        N, B, C = h.shape
        d = C // self.heads

        def fold(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(N, B * self.heads, d).transpose(0, 1)

        q, k, v = fold(self.q(h)) * self.scale, fold(self.k(h)), fold(self.v(h))
        probs = torch.bmm(q, k.transpose(1, 2)).softmax(dim=-1)
        out = torch.bmm(probs, v).transpose(0, 1).reshape(N, B, C)
        h = self.norm(h + self.proj(out)).transpose(0, 1)
        return self.head(h.mean(1))


def _inputs(seed: int = 0, batch: int = 16, tokens: int = 6) -> torch.Tensor:
    return torch.randn(batch, tokens, 5, generator=torch.Generator().manual_seed(seed))


MODELS = {
    "bmm": lambda: FoldedAttention(),
    "bmm+relative": lambda: FoldedAttention(relative=True),
    "sdpa": lambda: FoldedAttention(sdpa=True),
    "token-major": lambda: TokenMajorAttention(),
}


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("name", MODELS)
def test_folded_heads_merge_a_permuted_copy_back(name, capture):
    torch.manual_seed(0)
    model, x = MODELS[name]().eval(), _inputs()
    analysis = fxzip.analyze(model, x, capture=capture)
    assert not analysis.barriers, analysis.barriers
    assert analysis.head_groups and all(g.heads == 4 for g in analysis.head_groups)
    assert not any(analysis.spaces[s].pinned for g in analysis.head_groups for s in g.spaces)
    permuted, count = fxzip.testing.permuted_copy(model, x, seed=1)
    assert count >= 4
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(permuted(x), ref, rtol=1e-4, atol=1e-5)
    merged = fxzip.merge(model, permuted, x, reset_bn=False, progress=False, capture=capture)
    report = merged.fxzip_report
    assert not report.barriers and report.layers_zipped == report.layers_total - 1
    with torch.no_grad():
        outs = merged(x)
        few = merged(x[:5])  # another batch size: the folded axis is B·H at run time
    for out, small in zip(outs, few):
        assert relative_error(out, ref) < 1e-5
        assert relative_error(small, ref[:5]) < 1e-5


def test_the_relative_position_table_follows_the_key_projection():
    """DeBERTa's shared position embeddings, read by the layer's own key projection: their
    columns run along the residual stream (merged, not pinned), the projected table's rows
    along the keys' space (queries, keys and position keys pair heads alike)."""
    model = FoldedAttention(relative=True).eval()
    analysis = fxzip.analyze(model, _inputs())
    residual = analysis.feat("embed").blocks[0].space
    table = [u for u in analysis.param_uses["rel.weight"] if u.axis == 1]
    assert [u.feat.blocks[0].space for u in table] == [residual]
    assert not analysis.spaces[residual].pinned
    keys = analysis.feat("k").blocks[0].space
    assert analysis.feat("q").blocks[0].space == keys
    assert any(keys in g.spaces for g in analysis.head_groups)


def test_no_stop_point_cuts_folded_heads():
    model, x = FoldedAttention().eval(), _inputs()
    analysis = fxzip.analyze(model, x)
    folded = [n.name for n in analysis.nodes if getattr(analysis.feat(n.name), "folded", False)]
    assert "bmm" in folded and "bmm_1" in folded
    assert not set(folded) & set(analysis.stop_points)
    with pytest.raises(fxzip.StopPointError, match="inside attention heads"):
        fxzip.merge(model, model, x, stop_at="bmm", progress=False)


def test_two_different_models_merge():
    torch.manual_seed(0)
    a, b = FoldedAttention(relative=True).eval(), FoldedAttention(relative=True).eval()
    merged = fxzip.merge(a, b, [_inputs(s) for s in range(3)], progress=False)
    assert merged.fxzip_report.layers_zipped == merged.fxzip_report.layers_total - 1
    with torch.no_grad():
        outs = merged(_inputs(5))
    assert len(outs) == 2 and all(torch.isfinite(o).all() for o in outs)


# --- what stays a barrier ---------------------------------------------------------------------

class MixesTheFoldedAxis(FoldedAttention):
    """Ops that mix the folded (sample, head) axis, which no pairing of heads can follow."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.register_buffer("per_head", torch.randn(16 * 4, 1, 1))  # fixed per (sample, head)

    def fold(self, x: torch.Tensor) -> torch.Tensor:
        if self.how != "heads outer":
            return super().fold(x)
        B, N, C = x.shape  # (H, B, N, d) -> (H·B, N, d): the heads outer, not a batch axis
        return x.view(B, N, self.heads, -1).permute(2, 0, 1, 3).reshape(-1, N, C // self.heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        B, N, C = h.shape
        q, k, v = self.fold(self.q(h)), self.fold(self.k(h)), self.fold(self.v(h))
        scores = torch.bmm(q, k.transpose(-1, -2))
        if self.how == "softmax over samples and heads":
            probs = scores.softmax(dim=0)
        elif self.how == "a value per sample and head":
            probs = (scores + self.per_head).softmax(dim=-1)
        else:
            probs = scores.softmax(dim=-1)
        out = torch.bmm(probs, v).view(-1, self.heads, N, C // self.heads).permute(0, 2, 1, 3)
        return self.head(self.proj(out.reshape(B, N, C)).mean(1))


@pytest.mark.parametrize("how, reason", [
    ("softmax over samples and heads", "holds samples and attention heads together"),
    ("a value per sample and head", "vary along that axis"),
    ("heads outer", "across its head axis"),
])
def test_ops_that_mix_the_folded_axis_stay_barriers(how, reason):
    analysis = fxzip.analyze(MixesTheFoldedAxis(how).eval(), _inputs())
    assert analysis.barriers and reason in analysis.barriers[0].reason


# --- Hugging Face DeBERTa-v2 ------------------------------------------------------------------

def _deberta(**relative):
    transformers = pytest.importorskip("transformers")
    from benchmarks.common import hf_families
    if not relative:
        return hf_families.build("deberta_v2"), hf_families.batch("deberta_v2")
    config = transformers.DebertaV2Config(**hf_families.FAMILIES["deberta_v2"][2], **relative)
    config.vocab_size = hf_families.VOCAB
    torch.manual_seed(0)
    model = transformers.DebertaV2ForSequenceClassification(config).eval()
    return model, hf_families.batch("deberta_v2")


# DeBERTa-v3's attention: content-to-position and position-to-content terms from relative
# position embeddings (log buckets, normalised) that the layer's own query and key
# projections read, no absolute positions
V3 = dict(relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8,
          norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False)


@pytest.mark.parametrize("relative", [{}, V3, dict(V3, share_att_key=False)],
                         ids=["deberta_v2", "v3-attention", "own-position-projections"])
def test_deberta_permuted_self_merge_gives_the_model_back(relative):
    model, batch = _deberta(**relative)
    analysis = fxzip.analyze(model, batch)
    assert not analysis.barriers, analysis.barriers
    zipped = analysis.layers_in(analysis.trunk(None))
    assert zipped >= 0.9 * len(analysis.all_layers)
    assert not any(s.pinned for s in analysis.spaces.values())
    permuted, count = fxzip.testing.permuted_copy(model, batch, seed=1)
    with torch.no_grad():
        ref = model(**batch).logits
        assert count >= 8 and relative_error(permuted(**batch).logits, ref) < 1e-5
    merged = fxzip.merge(model, permuted, [batch], reset_bn=False, progress=False)
    report = merged.fxzip_report
    assert not report.barriers and report.layers_zipped >= 0.9 * report.layers_total
    with torch.no_grad():
        outs = merged(**batch)
    assert len(outs) == 2
    for out in outs:
        assert type(out) is type(model(**batch))
        assert relative_error(out.logits, ref) < 1e-5


def test_two_different_debertas_merge_into_one_that_runs():
    from benchmarks.common import hf_families
    pytest.importorskip("transformers")
    a, b = hf_families.build("deberta_v2", seed=0), hf_families.build("deberta_v2", seed=1)
    batches = [hf_families.batch("deberta_v2", seed=s) for s in range(3)]
    merged = fxzip.merge(a, b, batches, progress=False)
    report = merged.fxzip_report
    assert not report.barriers and report.layers_zipped >= 0.9 * report.layers_total
    with torch.no_grad():
        outs = merged(**batches[0])
    assert len(outs) == 2 and all(torch.isfinite(o.logits).all() for o in outs)
