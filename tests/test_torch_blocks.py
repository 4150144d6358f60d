"""torch's own building blocks between two weight layers zip through: RMSNorm, GroupNorm,
InstanceNorm, GLU, PixelShuffle/PixelUnshuffle, a softmax over the channels, the transformer
layers (traced into) and a Llama-style decoder. Each has no barrier, its permuted copy (the
analysis-driven oracle) computes the same function, and merging the model with that copy gives
the model back at every valid stop point."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxzip


def assert_zips_exactly(model: nn.Module, x: torch.Tensor) -> tuple[fxzip.Analysis, nn.Module]:
    """No barrier; the permuted copy computes the model's function; the merge of the model with
    it gives the model back (relative error < 1e-5) at every stop point and at None."""
    analysis = fxzip.analyze(model, x)
    assert not analysis.barriers, analysis
    permuted, count = fxzip.testing.permuted_copy(model, x, seed=1)
    assert count >= 1
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(permuted(x), ref, rtol=1e-4, atol=1e-5)
    zipper = fxzip.Zipper([model, permuted], x, progress=False)
    for stop in valid_stop_points(analysis) + [None]:
        merged = zipper.merge(stop, reset_bn=False)
        with torch.no_grad():
            for out in merged(x):
                err = ((out - ref).norm() / ref.norm()).item()
                assert err < 1e-5, (stop, err)
    return analysis, permuted


def valid_stop_points(analysis: fxzip.Analysis) -> list[str]:
    """The stop points whose trunk the analysis accepts. `stop_points` also lists nodes inside an
    attention that are not split into heads themselves (rotary's rotate-half slices, shape reads
    of q and k), whose trunk `Analysis.trunk` refuses for ending inside attention heads."""
    valid = []
    for stop in analysis.stop_points:
        try:
            analysis.trunk(stop)
        except fxzip.StopPointError as error:
            assert "inside attention heads" in str(error), error
            continue
        valid.append(stop)
    return valid


def _randomise(model: nn.Module) -> nn.Module:
    """Norm parameters and running statistics drawn at random (not the trivial initial ones),
    so that a permutation that misses them shows."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.GroupNorm, nn.RMSNorm, nn.LayerNorm,
                              nn.modules.instancenorm._InstanceNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.uniform_(0.5, 1.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.normal_()
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _rows_permuted(a: torch.Tensor, b: torch.Tensor) -> list[int]:
    """The permutation p with b[i] == a[p[i]] (rows of two 2-d tensors), asserting there is one."""
    perm = [int((a - row).abs().sum(1).argmin()) for row in b]
    torch.testing.assert_close(a[perm], b)
    assert sorted(perm) == list(range(len(a)))
    return perm


class Conv(nn.Module):
    """conv → block → conv → pooled head: a block over (N, C, H, W) maps."""

    def __init__(self, block: nn.Module, mid: int = 8, out: int = 8):
        super().__init__()
        self.c1, self.block = nn.Conv2d(3, mid, 3, padding=1), block
        self.c2, self.head = nn.Conv2d(out, 6, 3, padding=1), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(F.relu(self.c2(self.block(self.c1(x)))).mean((2, 3)))


class Tokens(nn.Module):
    """Linear → block → Linear → mean over tokens → head: a block over (N, T, C) tokens."""

    def __init__(self, block: nn.Module, mid: int = 8, out: int = 8):
        super().__init__()
        self.fc1, self.block = nn.Linear(5, mid), block
        self.fc2, self.head = nn.Linear(out, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(F.gelu(self.fc2(self.block(self.fc1(x)))).mean(1))


class Functional(nn.Module):
    """A functional form on get_attr parameters between two Linears."""

    def __init__(self, fn, width: int = 8, mid: int | None = None, params: int = 0):
        super().__init__()
        self.fn = fn
        self.fc1, self.fc2 = nn.Linear(5, mid or width), nn.Linear(width, 6)
        self.p = nn.ParameterList(nn.Parameter(torch.rand(width) + 0.5) for _ in range(params))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(F.gelu(self.fc2(self.fn(self.fc1(x), *self.p))).mean(1))


IMAGES = torch.randn(24, 3, 8, 8)
TOKENS = torch.randn(24, 7, 5)


# ---- norms ----------------------------------------------------------------------------------

def test_rms_norm_merges_its_weight_per_channel():
    torch.manual_seed(0)
    model = _randomise(Tokens(nn.RMSNorm(8, eps=1e-6)))
    analysis, permuted = assert_zips_exactly(model, TOKENS)
    (use,) = analysis.param_uses["block"]
    assert use.role == "M" and use.feat.blocks == analysis.feat("fc1").blocks
    perm = _rows_permuted(model.fc1.weight, permuted.fc1.weight)
    torch.testing.assert_close(permuted.block.weight, model.block.weight[perm])


def test_functional_rms_norm_with_and_without_weight():
    torch.manual_seed(0)
    model = Functional(lambda h, w: F.rms_norm(F.rms_norm(h, (8,)), (8,), w, 1e-6),
                       params=1).eval()
    analysis, _ = assert_zips_exactly(model, TOKENS)
    assert analysis.param_uses["p.0"][0].feat.blocks == analysis.feat("fc1").blocks


def test_group_norm_keeps_channels_within_their_groups():
    """GroupNorm(4, 16): four groups of 4 channels, permuted as wholes like attention heads,
    their channels free within."""
    torch.manual_seed(0)
    model = _randomise(Conv(nn.GroupNorm(4, 16), mid=16, out=16))
    analysis, permuted = assert_zips_exactly(model, IMAGES)
    (group,) = analysis.head_groups
    assert group.heads == 4 and group.kind == "group norm" and not group.fixed
    perm = _rows_permuted(model.c1.weight.flatten(1), permuted.c1.weight.flatten(1))
    runs = [sorted(q // 4 for q in perm[g * 4:(g + 1) * 4]) for g in range(4)]
    assert all(len(set(run)) == 1 for run in runs), perm      # each group from one group
    assert perm != list(range(16))
    torch.testing.assert_close(permuted.block.weight, model.block.weight[perm])


def test_group_norm_over_a_cat_splits_the_space_cut_by_a_group():
    """A cat of 6 and 10 channels under GroupNorm(4, 16): the second layer's 10 channels are cut
    at a group boundary (2 | 8): 2 in a group with the first layer's, 8 spanning two groups."""
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 10, 3, padding=1)
            self.gn, self.c = nn.GroupNorm(4, 16), nn.Conv2d(16, 3, 1)

        def forward(self, x):
            return self.c(F.silu(self.gn(torch.cat([self.a(x), self.b(x)], 1)))).mean((2, 3))

    torch.manual_seed(0)
    model = _randomise(Cat())
    analysis, _ = assert_zips_exactly(model, IMAGES)
    assert [b.size for b in analysis.feat("b").blocks] == [2, 8]
    assert [g.heads for g in analysis.head_groups] == [2]


@pytest.mark.parametrize("running", [False, True])
def test_instance_norm_is_per_channel(running):
    torch.manual_seed(0)
    norm = nn.InstanceNorm2d(8, affine=True, track_running_stats=running)
    model = _randomise(Conv(norm))
    analysis, permuted = assert_zips_exactly(model, IMAGES)
    assert len(analysis.param_uses["block"]) == (4 if running else 2)
    perm = _rows_permuted(model.c1.weight.flatten(1), permuted.c1.weight.flatten(1))
    torch.testing.assert_close(permuted.block.bias, model.block.bias[perm])


# ---- gates, shuffles, softmax ---------------------------------------------------------------

@pytest.mark.parametrize("form", ["module", "functional", "conv"])
def test_glu_pairs_the_halves_of_its_producer(form):
    """GLU's first half is gated by its second, element by element: the producer's two halves
    are opened as two blocks of ONE space, permuted alike."""
    torch.manual_seed(0)
    if form == "module":
        model, x, producer = Tokens(nn.GLU(), mid=16), TOKENS, "fc1"
    elif form == "functional":
        model, x, producer = Functional(lambda h: F.glu(h, dim=-1), mid=16), TOKENS, "fc1"
    else:
        model, x, producer = Conv(nn.GLU(dim=1), mid=16), IMAGES, "c1"
    analysis, permuted = assert_zips_exactly(model.eval(), x)
    first, second = analysis.feat(producer).blocks
    assert first == second and first.size == 8
    layer = getattr(model, producer).weight.flatten(1)
    perm = _rows_permuted(layer, getattr(permuted, producer).weight.flatten(1))
    assert perm[8:] == [p + 8 for p in perm[:8]] and perm[:8] != list(range(8))


def test_pixel_shuffle_moves_runs_of_channels_as_wholes():
    """PixelShuffle(2): 16 channels are 4 runs of 4, each run one output channel: runs are
    permuted as wholes, their 4 slots kept in place."""
    torch.manual_seed(0)
    model = Conv(nn.PixelShuffle(2), mid=16, out=4).eval()
    analysis, permuted = assert_zips_exactly(model, IMAGES)
    (group,) = analysis.head_groups
    assert group.heads == 4 and group.kind == "pixel shuffle"
    assert analysis.feat("c1").blocks[0].space in group.fixed
    perm = _rows_permuted(model.c1.weight.flatten(1), permuted.c1.weight.flatten(1))
    runs = [perm[r * 4:(r + 1) * 4] for r in range(4)]
    assert all(run == list(range(run[0], run[0] + 4)) and run[0] % 4 == 0 for run in runs)
    assert perm != list(range(16))


def test_pixel_unshuffle_repeats_each_channel_over_its_positions():
    """PixelUnshuffle(2): each of 4 channels becomes 4 consecutive channels (the space expanded
    4 times); a PixelShuffle(2) after it gives the channels back."""
    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(16, 8, 1)
            self.c3, self.head = nn.Conv2d(4, 5, 1), nn.Linear(13, 3)

        def forward(self, x):
            h = self.c1(x)
            down = F.relu(self.c2(F.pixel_unshuffle(h, 2)))
            up = F.relu(self.c3(F.pixel_shuffle(F.pixel_unshuffle(h, 2), 2)))
            return self.head(torch.cat([down.mean((2, 3)), up.mean((2, 3))], 1))

    torch.manual_seed(0)
    model = Both().eval()
    analysis, _ = assert_zips_exactly(model, IMAGES)
    (unshuffled,) = analysis.feat("pixel_unshuffle").blocks
    assert (unshuffled.size, unshuffled.expand) == (4, 4)
    assert analysis.feat("pixel_shuffle") == analysis.feat("c1") and not analysis.head_groups
    assert_zips_exactly(Conv(nn.PixelUnshuffle(2), mid=2, out=8).eval(), IMAGES)


@pytest.mark.parametrize("form", ["tokens", "conv", "log_softmax"])
def test_softmax_over_the_channels_keeps_the_space(form):
    """A softmax over the channel axis keeps each feature in place: permutation-equivariant."""
    torch.manual_seed(0)
    if form == "tokens":
        model, x = Tokens(nn.Softmax(dim=-1)), TOKENS
    elif form == "conv":
        model, x = Conv(nn.Softmax(dim=1)), IMAGES
    else:
        model, x = Functional(lambda h: torch.log_softmax(h, -1)), TOKENS
    analysis, _ = assert_zips_exactly(model.eval(), x)
    producer = "c1" if form == "conv" else "fc1"
    assert analysis.feat("block" if form != "log_softmax" else "log_softmax").blocks == \
        analysis.feat(producer).blocks


# ---- torch's transformer layers -------------------------------------------------------------

class TorchTransformer(nn.Module):
    """Tokens → Linear → nn.TransformerEncoderLayer or nn.TransformerDecoderLayer (over a memory
    of other tokens from another Linear) → Linear → head."""

    def __init__(self, decoder: bool, norm_first: bool, batch_first: bool):
        super().__init__()
        self.decoder, self.batch_first = decoder, batch_first
        self.embed, self.memory = nn.Linear(5, 12), nn.Linear(5, 12)
        layer = nn.TransformerDecoderLayer if decoder else nn.TransformerEncoderLayer
        self.layer = layer(12, 3, 20, dropout=0.1, batch_first=batch_first, norm_first=norm_first)
        self.out, self.head = nn.Linear(12, 6), nn.Linear(6, 3)

    def forward(self, x):
        h, args = self.embed(x), ()
        if self.decoder:
            args = (self.memory(x[:, :4]),)
        if not self.batch_first:
            h, args = h.transpose(0, 1), tuple(a.transpose(0, 1) for a in args)
        h = self.layer(h, *args)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(F.gelu(self.out(h)).mean(1))


@pytest.mark.parametrize("decoder", [False, True], ids=["encoder", "decoder"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_transformer_layers_are_traced_into(decoder, norm_first):
    """The layer's Linears, LayerNorms and attentions are zipped: self-attention fused from
    nn.MultiheadAttention, the decoder's cross-attention over the memory spelled out."""
    torch.manual_seed(0)
    model = _randomise(TorchTransformer(decoder, norm_first, batch_first=decoder))
    analysis, permuted = assert_zips_exactly(model, TOKENS)
    assert not any(n.op == "call_module" and n.target == "layer" for n in analysis.nodes)
    assert [g.heads for g in analysis.head_groups] == [3] * (2 if decoder else 1)
    # embed, [memory,] self-attention's in and out projections, [cross-attention's projection
    # of the queries and of the memory, its out projection,] linear1, linear2, out, head
    assert len(analysis.layers) == (11 if decoder else 7)
    assert not torch.allclose(permuted.layer.linear1.weight, model.layer.linear1.weight)
    assert not torch.allclose(permuted.layer.self_attn.in_proj_weight,
                              model.layer.self_attn.in_proj_weight)
    if decoder:
        assert not torch.allclose(permuted.layer.multihead_attn.in_proj_weight,
                                  model.layer.multihead_attn.in_proj_weight)


def test_transformer_layer_named_as_a_leaf_stays_one_call():
    """`leaf_modules=` still keeps a transformer layer whole (a barrier, as any unknown op)."""
    model = TorchTransformer(False, False, True).eval()
    analysis = fxzip.analyze(model, TOKENS, leaf_modules=(nn.TransformerEncoderLayer,))
    assert [b.op for b in analysis.barriers] == ["TransformerEncoderLayer"]


# ---- a Llama-style decoder ------------------------------------------------------------------

def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaLayer(nn.Module):
    """RMSNorm, grouped-query attention (4 query heads, 2 key/value heads) with rotary q and k
    through scaled_dot_product_attention and a causal mask, RMSNorm, SwiGLU."""

    def __init__(self, dim: int = 32, heads: int = 4, kv_heads: int = 2, hidden: int = 64):
        super().__init__()
        self.heads, self.kv_heads, self.d = heads, kv_heads, dim // heads
        self.attn_norm, self.mlp_norm = nn.RMSNorm(dim, eps=1e-6), nn.RMSNorm(dim, eps=1e-6)
        self.q_proj = nn.Linear(dim, heads * self.d, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.d, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.d, bias=False)
        self.o_proj = nn.Linear(heads * self.d, dim, bias=False)
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, h, cos, sin, mask):
        B, T, C = h.shape
        x = self.attn_norm(h)
        q = self.q_proj(x).view(B, T, self.heads, self.d).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.d).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.d).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        h = h + self.o_proj(out.transpose(1, 2).reshape(B, T, C))
        x = self.mlp_norm(h)
        return h + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Llama(nn.Module):
    """Embedding, 2 Llama layers, a final RMSNorm and an output layer, over sequences of max_len
    tokens (the rotary tables are used whole). The causal mask is one (T, T) tensor broadcast over
    batch and heads: made in forward (bool), or sliced from a buffer of additive -inf entries."""

    def __init__(self, mask: str, vocab: int = 64, dim: int = 32, layers: int = 2,
                 max_len: int = 12):
        super().__init__()
        self.mask = mask
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(LlamaLayer(dim) for _ in range(layers))
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        d = dim // 4
        inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
        freqs = torch.outer(torch.arange(max_len).float(), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        self.register_buffer("causal", torch.full((max_len, max_len), float("-inf")).triu(1),
                             persistent=False)

    def forward(self, ids):
        T = ids.shape[1]
        if self.mask == "buffer":
            mask = self.causal[:T, :T]
        else:
            pos = torch.arange(T)
            mask = pos[:, None] >= pos[None, :]
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h, self.cos, self.sin, mask)
        return self.lm_head(self.norm(h))


@pytest.mark.filterwarnings("ignore::fxzip.errors.CalibrationWarning")
@pytest.mark.parametrize("mask", ["bool", "buffer"])
def test_llama_decoder_zips_every_layer_but_its_output_layer(mask):
    torch.manual_seed(0)
    model = _randomise(Llama(mask))
    ids = torch.randint(0, 64, (24, 12))
    analysis, permuted = assert_zips_exactly(model, ids)
    assert len(analysis.head_groups) == 2
    for group in analysis.head_groups:
        assert group.heads == 2 and {f for _, f, _ in group.inner} == {2}, group
    assert set(valid_stop_points(analysis)) >= {n for n in analysis.layers if n != "lm_head"}
    merged = fxzip.merge(model, permuted, ids, reset_bn=False, progress=False)
    report = merged.fxzip_report
    assert report.layers_zipped == report.layers_total - 1 == len(analysis.all_layers) - 1
    assert not torch.allclose(permuted.layers[1].k_proj.weight, model.layers[1].k_proj.weight)
    assert not torch.allclose(permuted.norm.weight, model.norm.weight)


def test_transformer_decoder_layer_on_one_unbatched_sequence():
    """An (L, E) sequence without a batch axis, through a layer that is not batch_first: the
    spelled-out attentions swap no axes then."""
    class Unbatched(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.memory = nn.Linear(5, 12), nn.Linear(5, 12)
            self.layer = nn.TransformerDecoderLayer(12, 3, 20, dropout=0.0)
            self.head = nn.Linear(12, 3)

        def forward(self, x):  # x: (L, 5)
            return self.head(self.layer(self.embed(x), self.memory(x[:4])))

    torch.manual_seed(0)
    analysis, _ = assert_zips_exactly(_randomise(Unbatched()), torch.randn(48, 5))
    assert [g.heads for g in analysis.head_groups] == [3, 3]


class Blocks(nn.Module):
    """InstanceNorm, PixelShuffle, GLU and RMSNorm between weight layers, for both front ends."""

    def __init__(self):
        super().__init__()
        self.c1, self.norm = nn.Conv2d(3, 16, 3, padding=1), nn.InstanceNorm2d(16, affine=True)
        self.c2, self.shuffle = nn.Conv2d(16, 16, 3, padding=1), nn.PixelShuffle(2)
        self.c3, self.l1, self.glu = nn.Conv2d(4, 8, 3, padding=1), nn.Linear(8, 32), nn.GLU()
        self.rms, self.l2 = nn.RMSNorm(16), nn.Linear(16, 3)

    def forward(self, x):
        x = self.c3(self.shuffle(self.c2(torch.relu(self.norm(self.c1(x))))))
        return self.l2(self.rms(self.glu(self.l1(x.mean((2, 3))))))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_the_blocks_zip_through_under_either_front_end(capture):
    """torch.export writes these as ATen ops (rms_norm, instance_norm, pixel_shuffle, glu), which
    `fxzip.graph.aten` maps onto the rules of their functional forms."""
    torch.manual_seed(0)
    model, x = Blocks().eval(), torch.randn(8, 3, 8, 8)
    analysis = fxzip.analyze(model, x, capture=capture)
    assert not analysis.barriers and len(analysis.all_layers) == 5
    permuted, _ = fxzip.testing.permuted_copy(model, x, seed=1)
    merged = fxzip.merge(model, permuted, x, capture=capture, reset_bn=False, progress=False)
    assert merged.fxzip_report.settings["capture"] == capture
    with torch.no_grad():
        ref = model(x)
        for out in merged(x):
            assert ((out - ref).norm() / ref.norm()).item() < 1e-5
