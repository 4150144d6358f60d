"""Exactness under torch.export (`capture="export"`): merging a model with a permuted copy of
itself gives the model back, for the patterns that gave a silently wrong merge (or a needless
barrier) on exported graphs of torchvision's Swin and MaxViT.

- A producer whose output holds several spaces side by side ([q | k | v], or the two halves of a
  chunk) where no layer reads a later space (only a barrier does): that space's statistics are
  its own block of the producer's output, not the output's first channels (Swin-T and MaxViT-T
  under torch.export merged with a relative error of 7e-3 and 0.5).
- `select(qkv, 0, i)` of a stack of attention parts, which torch.export spells `qkv[(i,)]`: the
  part, as `qkv[i]` (Swin's window attention).
- `einsum` as torch.export records it (`aten.einsum`, operands in a list): batched matrix
  products become matmuls, others stay a barrier; `swapaxes` is a transpose (MaxViT).
- `unflatten` (`aten.unflatten`), a reshape.
- A shared tensor written in place through views (Swin's shifted-window mask: `new_zeros`, then
  `fill_`/`add_` of slices that nothing reads): a stop point past it zips the writes with it
  (left to the heads, they wrote into each head's copy and the trunk read the tensor unwritten;
  both front ends, relative error 0.9 before).

Each case: the analysis-driven permuted copy computes the same function, and merging the model
with it gives the model back (relative error < 1e-5) on both front ends."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxzip
from permute_util import rel_err as relative_error

TOKENS = torch.randn(32, 16, 8, generator=torch.Generator().manual_seed(0))


def merged_back(model: nn.Module, x: torch.Tensor, capture: str, **options) -> list[float]:
    """The analysis' barriers and each head's relative error of a merge of `model` with its
    permuted copy (after checking that the copy computes the same function)."""
    torch.manual_seed(0)
    model = model.eval()
    permuted, count = fxzip.testing.permuted_copy(model, x, seed=1)
    assert count >= 1
    with torch.no_grad():
        ref = model(x)
        assert relative_error(permuted(x), ref) < 1e-5
        merged = fxzip.merge(model, permuted, x, progress=False, reset_bn=False, capture=capture,
                             **options)
        return [relative_error(out, ref) for out in merged(x)]


def barriers(model: nn.Module, x: torch.Tensor, capture: str) -> list[str]:
    return [f"{b.node} ({b.op}): {b.reason}"
            for b in fxzip.analyze(model.eval(), x, capture=capture).barriers]


# ---------------------------------------------------------------------------------------------
# a producer's later spaces read only by a barrier
# ---------------------------------------------------------------------------------------------
# The permuted copies here are written by hand: a space that only a barrier reads keeps its
# order (permuting it would change the function), the spaces before it are permuted. A merge
# that takes the unpermuted space's statistics from the permuted first block matches it wrongly.

def merged_with(model: nn.Module, permuted: nn.Module, x: torch.Tensor, capture: str
                ) -> list[float]:
    """Each head's relative error of a merge of `model` with `permuted` (checked to compute the
    same function first)."""
    with torch.no_grad():
        ref = model(x)
        assert relative_error(permuted(x), ref) < 1e-5
        merged = fxzip.merge(model, permuted, x, progress=False, reset_bn=False, capture=capture)
        return [relative_error(out, ref) for out in merged(x)]


def permute_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    """`linear`'s output features reordered: output i is the old output rows[i]."""
    with torch.no_grad():
        linear.weight.copy_(linear.weight[rows])
        linear.bias.copy_(linear.bias[rows])


class HalfBehindBarrier(nn.Module):
    """fc1's output is two spaces side by side (chunked); the first is read by fc2, the second
    only by a cumulative sum over the channels (a barrier), so no layer of the trunk reads it:
    its statistics must come from fc1's second half."""

    def __init__(self, dim=8, mid=12):
        super().__init__()
        self.mid = mid
        self.fc1, self.fc2 = nn.Linear(dim, 2 * mid), nn.Linear(mid, 4)
        self.fc3 = nn.Linear(mid, 4)

    def forward(self, x):
        a, b = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(torch.relu(a)) + self.fc3(torch.cumsum(b, dim=-1))

    def permuted(self, seed: int) -> nn.Module:
        """A copy with the first half permuted (fc1's rows, fc2's columns), the second kept."""
        copy_ = copy.deepcopy(self)
        perm = torch.randperm(self.mid, generator=torch.Generator().manual_seed(seed))
        permute_rows(copy_.fc1, torch.cat([perm, torch.arange(self.mid, 2 * self.mid)]))
        with torch.no_grad():
            copy_.fc2.weight.copy_(copy_.fc2.weight[:, perm])
        return copy_


@pytest.mark.parametrize("capture", ["export", "fx"])
def test_space_read_only_by_a_barrier_takes_its_own_block(capture):
    torch.manual_seed(0)
    model = HalfBehindBarrier().eval()
    found = barriers(model, TOKENS, capture)
    assert found and "cumsum" in found[0]
    assert max(merged_with(model, model.permuted(1), TOKENS, capture)) < 1e-5


class StackBehindBarrier(nn.Module):
    """Swin's pattern under torch.export: a fused [q | k | v] projection reshaped into a stack of
    parts split into heads, (3, B, H, N, d), read by an op outside the table (here a flip of
    head_dim, torch.export's Swin: `select`): no layer of the trunk reads q, k or v; each must get
    the statistics of its own third of the projection, not q's."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads, self.dim = heads, dim
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, 4)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.flip(-1).unbind(0)
        attn = (q @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))

    def permuted(self, seed: int) -> nn.Module:
        """A copy with q and k permuted alike within each head (their dot products unchanged),
        v kept."""
        copy_ = copy.deepcopy(self)
        g, d = torch.Generator().manual_seed(seed), self.dim // self.heads
        within = torch.cat([h * d + torch.randperm(d, generator=g) for h in range(self.heads)])
        permute_rows(copy_.qkv, torch.cat([within, self.dim + within,
                                           torch.arange(2 * self.dim, 3 * self.dim)]))
        return copy_


@pytest.mark.parametrize("capture", ["export", "fx"])
def test_stack_of_parts_behind_a_barrier_takes_its_own_blocks(capture):
    torch.manual_seed(0)
    model = StackBehindBarrier().eval()
    found = barriers(model, TOKENS, capture)
    assert found and "flip" in found[0]
    assert max(merged_with(model, model.permuted(1), TOKENS, capture)) < 1e-5


# ---------------------------------------------------------------------------------------------
# Swin's window attention: qkv[0], qkv[1], qkv[2] of a stack (torch.export: select)
# ---------------------------------------------------------------------------------------------

class WindowAttention(nn.Module):
    """torchvision's `shifted_window_attention` without the shift: a fused qkv projection
    reshaped to (3, B, H, N, d), its parts picked by `qkv[0]`, `qkv[1]`, `qkv[2]`, a relative
    position bias gathered from a table by an integer buffer, and an MLP after."""

    def __init__(self, dim=8, heads=2, tokens=16):
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.randn(2 * tokens - 1, heads))
        pos = torch.arange(tokens)
        self.register_buffer("index", (pos[:, None] - pos[None, :] + tokens - 1).flatten())
        self.mlp = nn.Sequential(nn.Linear(dim, 16), nn.GELU(), nn.Linear(16, dim))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x)
        B, N, C = x.shape
        qkv = F.linear(self.norm(x), self.qkv.weight, self.qkv.bias)
        qkv = qkv.reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * (C // self.heads) ** -0.5
        bias = self.table[self.index].view(N, N, -1).permute(2, 0, 1).contiguous()
        attn = F.softmax(q.matmul(k.transpose(-2, -1)) + bias.unsqueeze(0), dim=-1)
        x = x + self.proj(attn.matmul(v).transpose(1, 2).reshape(B, N, C))
        x = x + self.mlp(x)
        return self.head(x.mean(1))


@pytest.mark.parametrize("capture", ["export", "fx"])
def test_parts_of_a_stack_picked_by_select_zip(capture):
    model = WindowAttention()
    assert not barriers(model, TOKENS, capture)
    assert max(merged_back(model, TOKENS, capture)) < 1e-5
    if capture == "export":  # a stop point inside the trunk, past the attention
        assert max(merged_back(model, TOKENS, capture, stop_at="mlp")) < 1e-5


# ---------------------------------------------------------------------------------------------
# MaxViT's attention: einsum and swapaxes
# ---------------------------------------------------------------------------------------------

class EinsumAttention(nn.Module):
    """MaxViT's relative attention: q·kᵀ and scores·v written with einsum, heads merged back
    with swapaxes."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 16), nn.GELU(), nn.Linear(16, dim))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = torch.chunk(self.qkv(x), 3, dim=-1)
        q, k, v = (t.reshape(B, N, self.heads, -1).swapaxes(1, 2) for t in (q, k, v))
        attn = torch.einsum("bhid,bhjd->bhij", q * 0.5, k).softmax(-1)
        out = torch.einsum("bhij,bhjd->bhid", attn, v).swapaxes(1, 2).reshape(B, N, C)
        x = x + self.proj(out)
        x = x + self.mlp(x)
        return self.head(x.mean(1))


@pytest.mark.parametrize("capture", ["export", "fx"])
def test_einsum_attention_zips(capture):
    model = EinsumAttention()
    assert not barriers(model, TOKENS, capture)
    assert max(merged_back(model, TOKENS, capture)) < 1e-5


class OtherEinsum(nn.Module):
    """An einsum that is no batched matrix product (a per-token dot product of two branches):
    a barrier, and the merge is still exact."""

    def __init__(self, dim=8):
        super().__init__()
        self.a, self.b = nn.Linear(dim, 12), nn.Linear(dim, 12)
        self.head = nn.Linear(1, 3)

    def forward(self, x):
        return self.head(torch.einsum("bnc,bnc->bn", self.a(x), self.b(x)).mean(1, keepdim=True))

    def permuted(self, seed: int) -> nn.Module:
        """A copy with both branches permuted alike (their dot products unchanged)."""
        copy_ = copy.deepcopy(self)
        perm = torch.randperm(12, generator=torch.Generator().manual_seed(seed))
        permute_rows(copy_.a, perm)
        permute_rows(copy_.b, perm)
        return copy_


@pytest.mark.parametrize("capture", ["export", "fx"])
def test_other_einsum_is_a_barrier(capture):
    torch.manual_seed(0)
    model = OtherEinsum().eval()
    found = barriers(model, TOKENS, capture)
    assert found and "einsum" in found[0]
    assert max(merged_with(model, model.permuted(1), TOKENS, capture)) < 1e-5


# ---------------------------------------------------------------------------------------------
# unflatten
# ---------------------------------------------------------------------------------------------

class Unflattened(nn.Module):
    """timm-style attention whose heads are split by `unflatten` (`aten.unflatten` under
    torch.export)."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1) * 0.5).softmax(-1)
        x = x + self.proj((attn @ v).transpose(1, 2).flatten(2))
        return self.head(x.mean(1))


@pytest.mark.parametrize("capture", ["export", "fx"])
def test_unflatten_splits_heads(capture):
    model = Unflattened()
    assert not barriers(model, TOKENS, capture)
    assert max(merged_back(model, TOKENS, capture)) < 1e-5


# ---------------------------------------------------------------------------------------------
# a shared tensor written in place through views (Swin's shifted-window mask)
# ---------------------------------------------------------------------------------------------

class WrittenMask(nn.Module):
    """A per-position offset built as Swin builds its mask: `new_zeros`, then regions written in
    place through slices (torch.export: `fill_`/`add_` of a slice, no reader of the write), then
    read. A stop point past the mask must zip the writes with it: left to the heads, they
    would write into each head's copy, and the trunk would read the mask unwritten."""

    def __init__(self, dim=8):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(dim, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = self.fc1(x)
        n = x.shape[1]
        mask = h.new_zeros((n, n))
        mask[:, : n // 2].add_(1.0)
        mask[n // 2:, n // 2:].add_(2.0)
        h = torch.relu(h + mask.sum(-1)[:, None])
        return self.fc3(torch.relu(self.fc2(h)))


@pytest.mark.parametrize("capture", ["export", "fx"])
@pytest.mark.parametrize("stop_at", [None, "fc2", 2, 1])
def test_writes_into_a_shared_tensor_stay_with_it(capture, stop_at):
    model = WrittenMask()
    assert not barriers(model, TOKENS, capture)
    assert max(merged_back(model, TOKENS, capture, stop_at=stop_at)) < 1e-5


# ---------------------------------------------------------------------------------------------
# ATen ops that symbolic traces spell otherwise (timm's GRN, ResMLP's affine, ECA, ConViT)
# ---------------------------------------------------------------------------------------------

class SpelledOtherwise(nn.Module):
    """A global response norm (`linalg_vector_norm`), an affine `addcmul`, `1 - x` (`rsub`), a
    gate broadcast with `expand_as`, a 1-D average pool and `F.normalize` (`clamp_min`) over the
    tokens, between weight layers."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.gamma, self.beta = nn.Parameter(torch.rand(16) + 0.5), nn.Parameter(torch.randn(16))
        self.head = nn.Linear(16, 3)

    def forward(self, x):  # x: (B, N, 8)
        h = F.gelu(self.fc1(x))
        norm = h.norm(p=2, dim=1, keepdim=True)
        h = h * (norm / (norm.mean(dim=-1, keepdim=True) + 1e-6)) + h
        h = torch.addcmul(self.beta, self.gamma, self.fc2(h))
        gate = torch.sigmoid(h.mean(1, keepdim=True))
        h = self.fc3(h * (1 - gate).expand_as(h))
        h = F.avg_pool1d(h.transpose(1, 2), 2).transpose(1, 2)
        h = F.normalize(h, dim=1) + h  # over the tokens: norm, clamp_min, expand_as, div
        return self.head(h.mean(1))


@pytest.mark.parametrize("capture", ["export", "fx"])
def test_ops_spelled_otherwise_by_aten_zip(capture):
    model = SpelledOtherwise()
    assert not barriers(model, TOKENS, capture)
    assert max(merged_back(model, TOKENS, capture)) < 1e-5


class Caching(nn.Module):
    """Caches a tensor attribute in its first forward (timm's ConViT `rel_indices`)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 3)
        self.cache = None

    def forward(self, x):
        if self.cache is None or self.cache.shape[0] != x.shape[1]:
            self.cache = torch.linspace(0.5, 1.5, x.shape[1])
        return self.fc2(F.relu(self.fc1(x)) * self.cache[:, None]).mean(1)


def test_a_model_that_ran_merges_with_one_that_did_not():
    """Both models exported in the same state (each private copy runs once first): a model that
    has run (its cache set) and a fresh one pair, and the merge runs."""
    torch.manual_seed(0)
    ran, fresh = Caching().eval(), Caching().eval()
    with torch.no_grad():
        ran(TOKENS)
    merged = fxzip.merge(ran, fresh, TOKENS, capture="export", progress=False)
    assert fresh.cache is None  # the fresh model itself was not run
    with torch.no_grad():
        assert all(torch.isfinite(out).all() for out in merged(TOKENS))
    assert merged.fxzip_report.layers_zipped == 1
