"""Index values never carry features: an integer buffer (position ids, a relative position index)
is the same in every model, like an input's ids, and ops on such values stay shared — also ops
that return several tensors (meshgrid). A parameter table sliced, resized and put back together
(HF BEiT's interpolated relative position bias) still runs along the heads where it is added to
attention scores; `torch.gather` by such an index, the same for every channel, moves positions
only (DeBERTa's relative-position scores). Each case: no barrier, the analysis-driven permuted copy computes the same
function, and merging the model with it gives the model back."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxzip
from permute_util import rel_err as relative_error
from fxzip.rules.layout import SHARED


class PositionIds(nn.Module):
    """BERT's embeddings: position ids and token-type ids from integer buffers, sliced to the
    sequence, expanded over the batch, looked up in their tables."""

    def __init__(self, vocab=20, dim=16, positions=32):
        super().__init__()
        self.words = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(positions, dim)
        self.types = nn.Embedding(2, dim)
        self.register_buffer("position_ids", torch.arange(positions)[None], persistent=False)
        self.register_buffer("token_type_ids", torch.zeros(1, positions, dtype=torch.long),
                             persistent=False)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 24), nn.GELU(), nn.Linear(24, dim))
        self.head = nn.Linear(dim, 3)

    def forward(self, ids):
        n = ids.shape[1]
        types = self.token_type_ids[:, :n].expand(ids.shape[0], n)
        x = self.words(ids) + self.types(types) + self.positions(self.position_ids[:, :n])
        x = self.norm(x)
        x = x + self.mlp(x)
        return self.head(x.mean(1))


class Heads(nn.Module):
    """Attention over 16 patch tokens whose scores get a per-head relative position bias
    (`bias(n)`, (H, N, N)), for the subclasses to build."""

    def __init__(self, heads=2, dim=8, side=4):
        super().__init__()
        self.heads, self.side = heads, side
        self.patch = nn.Conv2d(3, dim, 2, stride=2)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1) * 0.5 + self.bias(N).unsqueeze(0)).softmax(dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
        return self.head(x.mean(1))


class MeshgridIndex(Heads):
    """The relative position index computed on the fly from a meshgrid of aranges (an op that
    returns two tensors), as transformers' vision models do."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(2 * 16 - 1, self.heads))

    def bias(self, n):
        pos = torch.arange(n)
        rows, cols = torch.meshgrid(pos, pos, indexing="ij")
        grid = torch.stack([rows, cols]).flatten(1)  # (2, N): each position's coordinates
        rel = grid[0] - grid[1]
        index = torch.sign(rel) * rel.abs() + n - 1  # an op outside the table (DeBERTa's buckets)
        return self.table[index.reshape(-1)].view(n, n, -1).permute(2, 0, 1)


class InterpolatedTable(Heads):
    """HF BEiT's relative position bias: the table's grid rows sliced off, reshaped to a grid,
    interpolated, put back in front of its extra rows, gathered by an integer index buffer."""

    def __init__(self):
        super().__init__()
        grid = 2 * self.side - 1
        self.table = nn.Parameter(torch.randn(grid * grid + 3, self.heads))
        coords = torch.stack(torch.meshgrid(torch.arange(self.side), torch.arange(self.side),
                                            indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + self.side - 1
        self.register_buffer("index", (rel[..., 0] * grid + rel[..., 1]).reshape(-1))

    def bias(self, n):
        grid = 2 * self.side - 1
        rows = self.table[:grid * grid].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        rows = F.interpolate(rows, size=(grid, grid), mode="bilinear", align_corners=False)
        rows = rows.permute(0, 2, 3, 1).reshape(grid * grid, -1)
        table = torch.cat([rows, self.table[grid * grid:]])
        return table[self.index].view(n, n, -1).permute(2, 0, 1).contiguous()


class ExportedScale(nn.Module):
    """A scale made in forward from a Python number (`torch.tensor`): torch.export lifts it as a
    constant and detaches it in place (`aten.detach_`), as DeBERTa's attention does."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = self.a(x)
        scale = torch.sqrt(torch.tensor(h.size(-1), dtype=torch.float) * 2)
        return self.b(torch.relu(h) / scale.to(dtype=h.dtype))


class TokenOrder(nn.Module):
    """Tokens reordered by `torch.gather` with a fixed order buffer, the same for every channel."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 2, stride=2)
        self.register_buffer("order", torch.randperm(16))
        self.mix, self.head = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        B, N, C = x.shape
        x = torch.gather(x, 1, self.order.view(1, -1, 1).expand(B, N, C))
        x = x + torch.relu(self.mix(x))
        return self.head(x[:, :4].mean(1))


class ContentToPosition(nn.Module):
    """DeBERTa's content-to-position scores, heads on their own axis: queries times the keys of a
    (normalised) relative position table, gathered per query by relative position
    (`torch.gather` along the keys with an index expanded over the heads), added per head."""

    def __init__(self, heads=2, dim=8, tokens=16, span=4):
        super().__init__()
        self.heads = heads
        self.patch = nn.Conv2d(3, dim, 2, stride=2)
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))
        self.rel, self.rel_norm = nn.Parameter(torch.randn(2 * span, dim)), nn.LayerNorm(dim)
        pos = torch.arange(tokens)
        rel = (pos[:, None] - pos[None, :]).clamp(-span, span - 1) + span
        self.register_buffer("c2p_index", rel[None, None])
        self.head = nn.Linear(dim, 3)

    def split(self, t):
        return t.view(*t.shape[:-1], self.heads, -1).transpose(-3, -2)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        B, N, C = x.shape
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        pos_k = self.split(self.k(self.rel_norm(self.rel)))  # (H, 2·span, d)
        c2p = torch.gather(q @ pos_k.transpose(-1, -2), -1,
                           self.c2p_index.expand(B, self.heads, N, N))
        attn = (q @ k.transpose(-1, -2) + c2p).softmax(-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
        return self.head(x.mean(1))


CASES = {"position_ids": (PositionIds, lambda: torch.randint(0, 20, (16, 12)), "fx"),
         "gather_tokens": (TokenOrder, lambda: torch.randn(32, 3, 8, 8), "fx"),
         "gather_content_to_position": (ContentToPosition, lambda: torch.randn(32, 3, 8, 8),
                                        "fx"),
         "meshgrid_index": (MeshgridIndex, lambda: torch.randn(16, 3, 8, 8), "fx"),
         "interpolated_table": (InterpolatedTable, lambda: torch.randn(16, 3, 8, 8), "fx"),
         "exported_scale": (ExportedScale, lambda: torch.randn(64, 8), "export")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_permuted_self_merge_is_exact(name):
    build, example, capture = CASES[name]
    torch.manual_seed(0)
    model, x = build().eval(), example()
    analysis = fxzip.analyze(model, x, capture=capture)
    assert not analysis.barriers, analysis
    permuted, count = fxzip.testing.permuted_copy(model, x, seed=1)
    assert count >= 1
    merged = fxzip.merge(model, permuted, x, reset_bn=False, progress=False, capture=capture)
    assert not merged.fxzip_report.barriers
    with torch.no_grad():
        ref = model(x)
        assert relative_error(permuted(x), ref) < 1e-5
        for out in merged(x):
            assert relative_error(out, ref) < 1e-5


def test_integer_buffers_are_shared():
    """The buffers of ids are shared values, not parameters: no space runs along them."""
    analysis = fxzip.analyze(PositionIds().eval(), torch.randint(0, 20, (4, 12)))
    reads = {n.target: n.name for n in analysis.nodes if n.op == "get_attr"}
    assert analysis.infos[reads["position_ids"]] is SHARED
    assert analysis.infos[reads["token_type_ids"]] is SHARED
    assert "position_ids" not in analysis.param_uses


def test_the_interpolated_table_runs_along_the_heads():
    """The table's head axis is the head space of the attention's head group (merged per head),
    its positions axis is merged by nothing."""
    analysis = fxzip.analyze(InterpolatedTable().eval(), torch.randn(2, 3, 8, 8))
    (group,) = analysis.head_groups
    uses = analysis.param_uses["table"]
    assert {u.axis for u in uses} == {1}
    assert all(u.feat.blocks[0].space in group.spaces for u in uses)


def test_gather_by_an_index_that_differs_per_channel_is_a_barrier():
    """Each channel picking its own positions would move with a permutation of the channels."""
    class PerChannel(TokenOrder):
        def forward(self, x):
            x = self.patch(x).flatten(2).transpose(1, 2)
            index = torch.stack([self.order.roll(c) for c in range(8)], -1).expand(x.shape[0], -1, -1)
            return self.head(torch.gather(x, 1, index).mean(1))

    analysis = fxzip.analyze(PerChannel().eval(), torch.randn(2, 3, 8, 8))
    assert [b.op for b in analysis.barriers] == ["gather"]
    assert "differs from channel to channel" in analysis.barriers[0].reason
