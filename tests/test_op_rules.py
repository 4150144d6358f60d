"""One small model per op rule: no barrier, the analysis-driven permutation keeps the function,
and merging the model with its permuted copy is exact at every valid stop point."""
import copy
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxzip
from permute_util import permuted_by_analysis


def bn(c, dims=2):
    layer = (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(c)
    _randomise_bn(layer)
    return layer


def _randomise_bn(layer: nn.modules.batchnorm._BatchNorm) -> None:
    with torch.no_grad():
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2.0)
        layer.weight.normal_()
        layer.bias.normal_()


def _fresh(module: nn.Module) -> nn.Module:
    """A copy of `module` initialised anew from the current RNG state (the test's seed), so that a
    case's weights do not depend on what other test files drew at collection time."""
    module = copy.deepcopy(module)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            _randomise_bn(m)
        elif hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return module


def conv_model(body, extra=None, head_in=6):
    """conv(3→6) → body(x) → pooled linear head."""
    modules = dict(c1=nn.Conv2d(3, 6, 3, padding=1), b1=bn(6), head=nn.Linear(head_in, 3))
    modules.update(extra or {})

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            for name, m in modules.items():
                setattr(self, name, _fresh(m))

        def forward(self, x):
            return self.head(body(self, F.relu(self.b1(self.c1(x)))))

    return Model


def pooled(x):
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


CASES = {
    # activations (modules and functions), dropout, identity
    **{f"act_{cls.__name__}": conv_model(lambda s, x: pooled(s.act(s.c2(x))),
                                         dict(c2=nn.Conv2d(6, 6, 1), act=cls()))
       for cls in (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.Hardswish,
                   nn.ELU, nn.Dropout, nn.Identity)},
    **{f"fn_{fn.__name__}": conv_model(lambda s, x, fn=fn: pooled(fn(s.c2(x))), dict(c2=nn.Conv2d(6, 6, 1)))
       for fn in (F.gelu, F.silu, torch.tanh, torch.sigmoid, F.leaky_relu, F.hardswish, F.elu)},
    "conv1d_bn1d": None,  # built below
    "maxpool_avgpool": conv_model(lambda s, x: pooled(F.avg_pool2d(s.mp(s.c2(x)), 2)),
                                  dict(c2=nn.Conv2d(6, 6, 3, padding=1), mp=nn.MaxPool2d(2))),
    "interpolate": conv_model(lambda s, x: pooled(s.c2(F.interpolate(x, scale_factor=2.0))),
                              dict(c2=nn.Conv2d(6, 6, 3))),
    "add_mul_sub_scalar_inplace": conv_model(
        lambda s, x: pooled(operator.iadd(s.c2(x) * 0.5 - x, x.mul(2.0)).sub_(1.0)),
        dict(c2=nn.Conv2d(6, 6, 1))),
    "residual_projection": conv_model(
        lambda s, x: pooled(F.relu(s.b3(s.c3(F.relu(s.b2(s.c2(x))))) + s.bp(s.proj(x)))),
        dict(c2=nn.Conv2d(6, 5, 3, padding=1), b2=bn(5), c3=nn.Conv2d(5, 7, 3, padding=1), b3=bn(7),
             proj=nn.Conv2d(6, 7, 1), bp=bn(7)), head_in=7),
    "cat_unequal": conv_model(
        lambda s, x: pooled(s.b3(torch.cat([s.c2(x), F.relu(s.c3(x))], dim=1))),
        dict(c2=nn.Conv2d(6, 2, 3, padding=1), c3=nn.Conv2d(6, 5, 1), b3=bn(7)), head_in=7),
    "flatten_chw": conv_model(lambda s, x: torch.flatten(s.c2(x), 1),
                              dict(c2=nn.Conv2d(6, 4, 3, stride=2, padding=1)), head_in=4 * 4 * 4),
    "view_size": conv_model(lambda s, x: s.c2(x).view(x.size(0), -1),
                            dict(c2=nn.Conv2d(6, 4, 3, stride=2, padding=1)), head_in=4 * 4 * 4),
    "mean_spatial": conv_model(lambda s, x: s.c2(x).mean((2, 3)), dict(c2=nn.Conv2d(6, 6, 1))),
    "mean_keepdim_reshape": conv_model(lambda s, x: s.c2(x).mean(dim=(-1, -2), keepdim=True).reshape(x.shape[0], -1),
                                       dict(c2=nn.Conv2d(6, 6, 1))),
    "permute_layernorm": conv_model(
        lambda s, x: pooled(s.ln(s.c2(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)),
        dict(c2=nn.Conv2d(6, 6, 1), ln=nn.LayerNorm(6))),
    "transpose_tokens_linear": conv_model(
        lambda s, x: s.fc(s.ln(s.c2(x).flatten(2).transpose(1, 2))).mean(1),
        dict(c2=nn.Conv2d(6, 6, 1), ln=nn.LayerNorm(6), fc=nn.Linear(6, 6))),
    "gate_mul_broadcast": conv_model(
        lambda s, x: pooled(x * torch.sigmoid(s.g(F.adaptive_avg_pool2d(x, 1)))),
        dict(g=nn.Conv2d(6, 6, 1))),
}


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv1d(3, 6, 3, padding=1), bn(6, dims=1)
        self.c2, self.b2 = nn.Conv1d(6, 6, 3, padding=1), bn(6, dims=1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = F.max_pool1d(F.relu(self.b1(self.c1(x.flatten(2)))), 2)
        x = F.relu(self.b2(self.c2(x)))
        return self.head(F.adaptive_avg_pool1d(x, 1).squeeze(-1))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(3 * 8 * 8, 10), bn(10, dims=1)
        self.fc2, self.ln2 = nn.Linear(10, 10), nn.LayerNorm(10)
        self.fc3 = nn.Linear(10, 3)

    def forward(self, x):
        h = F.relu(self.bn1(self.fc1(x.reshape(x.shape[0], -1))))
        h = h + F.gelu(self.ln2(self.fc2(h)))
        return self.fc3(h)


CASES["conv1d_bn1d"] = Conv1dNet
CASES["mlp_bn_ln_residual"] = MLP


def test_space_structure_of_a_residual_cat_model():
    torch.manual_seed(0)
    model = CASES["cat_unequal"]().eval()
    analysis = fxzip.analyze(model, torch.randn(4, 3, 8, 8))
    cat = analysis.feat("cat")
    assert [b.size for b in cat.blocks] == [2, 5]
    assert analysis.feat("b3") == cat
    flat = fxzip.analyze(CASES["flatten_chw"]().eval(), torch.randn(4, 3, 8, 8)).feat("flatten")
    assert flat.axis == 1 and [(b.size, b.expand) for b in flat.blocks] == [(4, 16)]


def test_residual_add_ties_the_stream():
    torch.manual_seed(0)
    model = CASES["residual_projection"]().eval()
    analysis = fxzip.analyze(model, torch.randn(4, 3, 8, 8))
    stream = analysis.feat("add").blocks[0].space
    assert analysis.feat("b3").blocks[0].space == stream == analysis.feat("bp").blocks[0].space
    assert set(analysis.spaces[stream].producers) == {"c3", "proj"}


def test_shared_output_averages_the_aligned_output_layer():
    torch.manual_seed(0)
    model = CASES["residual_projection"]().eval()
    x = torch.randn(24, 3, 8, 8)
    permuted, _ = permuted_by_analysis(model, x, seed=2)
    merged = fxzip.merge(model, permuted, x, shared_output=True, reset_bn=False, progress=False)
    with torch.no_grad():
        out = merged(x)
        assert isinstance(out, torch.Tensor)
        torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)
    assert merged.fxzip_report.layers_zipped == merged.fxzip_report.layers_total
    with pytest.raises(fxzip.StopPointError, match="stop_at=None"):
        fxzip.merge(model, permuted, x, stop_at="c2", shared_output=True, progress=False)


# ---- rules for timm-style models: depthwise, functional layers, parameters via get_attr ----

class Functional(nn.Module):
    """Layers called as functions on get_attr parameters (as timm and hand-written code do)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1, self.b1 = nn.Parameter(torch.randn(6, 3, 3, 3, generator=g)), nn.Parameter(torch.randn(6, generator=g))
        self.register_buffer("mean", torch.randn(6, generator=g))
        self.register_buffer("var", torch.rand(6, generator=g) + 0.5)
        self.gamma, self.beta = nn.Parameter(torch.randn(6, generator=g)), nn.Parameter(torch.randn(6, generator=g))
        self.wd = nn.Parameter(torch.randn(12, 1, 3, 3, generator=g))
        self.ln_w, self.ln_b = nn.Parameter(torch.randn(12, generator=g)), nn.Parameter(torch.randn(12, generator=g))
        self.w2 = nn.Parameter(torch.randn(5, 12, generator=g))
        self.scale = nn.Parameter(torch.rand(12, generator=g) + 0.5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        x = F.conv2d(x, self.w1, self.b1, padding=1)
        x = F.relu(F.batch_norm(x, self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-5))
        x = F.conv2d(x, self.wd, None, 1, 1, 1, 6)  # depthwise with multiplier 2
        x = x * self.scale.view(1, -1, 1, 1)       # layer scale through a reshape
        x = F.layer_norm(x.permute(0, 2, 3, 1), (12,), self.ln_w, self.ln_b).permute(0, 3, 1, 2)
        x = F.gelu(F.linear(x.mean((2, 3)), self.w2))
        return self.head(x)


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 6, 1), bn(6)
        self.dw, self.gn = nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.GroupNorm(1, 6)
        self.se1, self.se2 = nn.Conv2d(6, 3, 1), nn.Conv2d(3, 6, 1)
        self.pw, self.gn2 = nn.Conv2d(6, 8, 1), nn.GroupNorm(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = F.silu(self.b1(self.c1(x)))
        x = F.silu(self.gn(self.dw(x)))
        x = x * torch.sigmoid(self.se2(F.relu(self.se1(x.mean((2, 3), keepdim=True)))))  # SE gate
        return self.head(self.gn2(self.pw(x)).mean((2, 3)))


class Tokens(nn.Module):
    """Patch embedding, cls token (expand + token cat), position embedding, split, unbind."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 8, generator=g))
        self.pos_embed = nn.Parameter(torch.randn(1, 5, 8, generator=g))
        self.norm = nn.LayerNorm(8)
        self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 6)
        self.mlp = nn.Linear(10, 8)
        self.ls = nn.Parameter(torch.rand(8, generator=g) + 0.5)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        h = torch.cat([self.a(self.norm(x)), self.b(self.norm(x))], dim=-1)
        left, right = torch.split(h, [4, 6], dim=-1)
        h = torch.cat([F.gelu(left), right.tanh()], dim=-1)
        x = x + self.ls * self.mlp(h)
        first = x.unbind(1)[0]
        return self.head(first)


class TokenMixer(nn.Module):
    """MLP-Mixer: token mixing (a Linear over the token axis) and channel mixing, windowed pad,
    a global-response-norm gate (norm over positions, mean over channels)."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)            # 4 tokens of 8 channels
        self.norm1, self.norm2 = nn.LayerNorm(8), nn.LayerNorm(8)
        self.tok1, self.tok2 = nn.Linear(4, 6), nn.Linear(6, 4)
        self.ch1, self.ch2 = nn.Linear(8, 12), nn.Linear(12, 8)
        g = torch.Generator().manual_seed(0)
        self.gamma = nn.Parameter(torch.randn(8, generator=g))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.patch(x)
        gx = x.norm(p=2, dim=(2, 3), keepdim=True)           # global response norm (ConvNeXt-V2)
        x = x + self.gamma.view(1, -1, 1, 1) * x * (gx / (gx.mean(dim=1, keepdim=True) + 1e-6))
        x = F.pad(x, (0, 1, 0, 1))[:, :, :2, :2]              # pad and crop positions only
        x = x.flatten(2).transpose(1, 2)                      # (B, tokens, channels)
        t = self.norm1(x).transpose(1, 2)                     # (B, channels, tokens)
        x = x + self.tok2(F.gelu(self.tok1(t))).transpose(1, 2)
        x = x + self.ch2(F.gelu(self.ch1(self.norm2(x))))
        return self.head(x.mean(1))


CASES.update(functional_layers=Functional, depthwise_se_groupnorm=Depthwise, tokens=Tokens,
             token_mixer_pad_grn=TokenMixer)


class Windows(nn.Module):
    """Swin-style shapes: channels-last map, cyclic shift (roll), windows partitioned with
    view/permute and put back with timm's `window_reverse`, patch merging ((…, 2, 2, C) flattened
    into 4·C channels: the space four times in a row) and its LayerNorm + reduction Linear."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 6, 2, stride=2)              # (B, 6, 4, 4)
        self.norm1 = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 6)
        self.merge_norm, self.reduce = nn.LayerNorm(24), nn.Linear(24, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        from timm.models.swin_transformer import window_reverse

        x = self.patch(x).permute(0, 2, 3, 1)                 # (B, 4, 4, 6)
        B = x.shape[0]
        s = torch.roll(self.norm1(x), shifts=(-1, -1), dims=(1, 2))
        w = s.view(B, 2, 2, 2, 2, 6).permute(0, 1, 3, 2, 4, 5).reshape(-1, 2, 2, 6)
        w = F.gelu(self.fc(w))
        s = torch.roll(window_reverse(w, (2, 2), 4, 4), shifts=(1, 1), dims=(1, 2))
        x = x + s
        x = x.reshape(B, 2, 2, 2, 2, 6).permute(0, 1, 3, 4, 2, 5).flatten(3)  # (B, 2, 2, 24)
        x = self.reduce(self.merge_norm(x))
        return self.head(x.mean((1, 2)))


class RelPosAttention(nn.Module):
    """Window attention with a relative position bias gathered from a (positions × heads) table
    by an index buffer, added to the scores (matmul + softmax): the table's head axis must
    follow the pairing of heads (`AttentionCore`)."""

    def __init__(self, heads=2, dim=8, tokens=16):
        super().__init__()
        self.heads = heads
        self.patch = nn.Conv2d(3, dim, 2, stride=2)            # 16 tokens
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        g = torch.Generator().manual_seed(0)
        self.table = nn.Parameter(torch.randn(2 * tokens - 1, heads, generator=g))
        pos = torch.arange(tokens)
        self.register_buffer("index", (pos[:, None] - pos[None, :] + tokens - 1).reshape(-1))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)           # (B, N, C)
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.table[self.index].view(N, N, -1).permute(2, 0, 1).unsqueeze(0)
        attn = ((q * 0.5) @ k.transpose(-2, -1) + bias).softmax(dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
        return self.head(x.mean(1))


CASES.update(windows_roll_patch_merging=Windows, attention_relative_position_bias=RelPosAttention)


def test_relative_position_bias_follows_the_heads():
    """The bias table's head axis is a one-feature-per-head space of the attention's head group."""
    model = RelPosAttention().eval()
    analysis = fxzip.analyze(model, torch.randn(2, 3, 8, 8))
    assert not analysis.barriers
    (group,) = analysis.head_groups
    assert sorted(analysis.spaces[s].size for s in group.spaces) == [2, 8, 8]
    (use,) = analysis.param_uses["table"]
    assert use.axis == 1 and use.feat.blocks[0].space in group.spaces


def test_per_head_values_from_outside_the_parameters_are_a_barrier():
    """A per-head bias computed from the input cannot follow a pairing of heads."""
    class InputBias(RelPosAttention):
        def forward(self, x):
            t = self.patch(x).flatten(2).transpose(1, 2)
            B, N, C = t.shape
            q, k, v = self.qkv(t).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
            bias = t[..., :self.heads].permute(0, 2, 1).unsqueeze(-1)   # (B, H, N, 1)
            attn = (q @ k.transpose(-2, -1) + bias).softmax(dim=-1)
            return self.head(self.proj((attn @ v).transpose(1, 2).reshape(B, N, C)).mean(1))

    analysis = fxzip.analyze(InputBias().eval(), torch.randn(2, 3, 8, 8))
    assert [b.op for b in analysis.barriers] == ["AttentionCore"]
    assert "per head" in analysis.barriers[0].reason and not analysis.head_groups


def test_token_mixing_weights_are_averaged_not_matched():
    torch.manual_seed(0)
    a, b = TokenMixer().eval(), TokenMixer().eval()
    x = torch.randn(64, 3, 8, 8)
    analysis = fxzip.analyze(a, x)
    tok = analysis.param_uses["tok1"]
    assert all(analysis.spaces[u.feat.blocks[0].space].pinned for u in tok)
    merged = fxzip.merge(a, b, x, method="zipit", reset_bn=False, progress=False, corrections=None)
    torch.testing.assert_close(merged.tok1.weight, (a.tok1.weight + b.tok1.weight) / 2)


class Grouped(nn.Module):
    """ResNeXt-style bottleneck: 1×1, grouped 3×3 and grouped 1×1 (4 groups), with a residual:
    the residual stream is split into the same 4 groups."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 1), bn(8)
        self.c2, self.b2 = nn.Conv2d(8, 12, 3, padding=1, groups=4), bn(12)
        self.c3, self.b3 = nn.Conv2d(12, 8, 1, groups=4), bn(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.b1(self.c1(x)))
        h = h + self.b3(self.c3(F.relu(self.b2(self.c2(h)))))
        return self.head(F.relu(h).mean((2, 3)))


CASES["grouped_conv"] = Grouped


class FunctionalGrouped(nn.Module):
    """The grouped and token-mixing forms of the functional layers on get_attr weights (one rule
    per op: what a module does, its functional form does too)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.c1, self.b1 = nn.Conv2d(3, 8, 1), bn(8)
        self.wg = nn.Parameter(torch.randn(12, 2, 3, 3, generator=g) * 0.3)  # 4 groups
        self.bg = nn.Parameter(torch.randn(12, generator=g))
        self.wt = nn.Parameter(torch.randn(16, 16, generator=g) * 0.25)  # mixes 4×4 positions
        self.bt = nn.Parameter(torch.randn(16, generator=g))
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        h = F.relu(self.b1(self.c1(x)))
        h = F.relu(F.conv2d(h, self.wg, self.bg, 1, 1, 1, 4))
        t = F.linear(F.avg_pool2d(h, 2).flatten(2), self.wt, self.bt)  # (B, channels, tokens)
        return self.head(t.mean(2))


CASES["functional_grouped_token_mixing"] = FunctionalGrouped


class CrossStage(nn.Module):
    """CSPNet/Res2Net/DPN-style splits of ONE layer's output: split, slice and a residual add
    that ties unequal layouts; the layers' spaces are opened as pieces where they are cut."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 10, 1), bn(10)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1), bn(4)
        self.c3, self.b3 = nn.Conv2d(10, 10, 1), bn(10)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        h = F.relu(self.b1(self.c1(x)))
        left, right = h.split([4, 6], dim=1)                 # a cut inside c1's space
        h2 = torch.cat([F.relu(self.b2(self.c2(left))), right], dim=1)
        h = h2 + self.b3(self.c3(h2))                        # c3's layout must follow [4 | 6]
        return self.head(h[:, 3:].mean((2, 3)))              # a slice cutting the first piece


CASES["split_slice_cross_stage"] = CrossStage


def test_split_spaces_are_opened_as_pieces():
    torch.manual_seed(0)
    analysis = fxzip.analyze(CrossStage().eval(), torch.randn(2, 3, 8, 8))
    assert not analysis.barriers
    assert [b.size for b in analysis.feat("c1").blocks] == [4, 6]  # split
    assert [b.size for b in analysis.feat("c2").blocks] == [3, 1]  # slice, through the add
    assert [b.size for b in analysis.feat("c3").blocks] == [3, 1, 6]  # add, then slice


def test_grouped_convolutions_pair_groups_alike():
    torch.manual_seed(0)
    analysis = fxzip.analyze(Grouped().eval(), torch.randn(2, 3, 8, 8))
    (group,) = analysis.head_groups
    assert group.heads == 4 and len(group.spaces) == 2 and not analysis.barriers
    assert group.kind == "grouped convolution"


def test_grouped_convolutions_disagreeing_on_groups_are_a_barrier():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 8, 1, groups=4),
                          nn.Flatten(), nn.LazyLinear(3))
    model(torch.randn(1, 3, 8, 8))
    analysis = fxzip.analyze(model.eval(), torch.randn(2, 3, 8, 8))
    assert [b.node for b in analysis.barriers] == ["_2"]
    assert "groups" in analysis.barriers[0].reason


# Defined last, so that every case added above is collected.
@pytest.mark.parametrize("name", sorted(CASES))
def test_op_rule_is_exact(name):
    torch.manual_seed(0)
    model = CASES[name]().eval()
    x = torch.randn(24, 3, 8, 8)
    analysis = fxzip.analyze(model, x)
    assert not analysis.barriers, analysis
    permuted, count = permuted_by_analysis(model, x, seed=1)
    assert count >= 1
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(permuted(x), ref, rtol=1e-4, atol=1e-5)
    zipper = fxzip.Zipper([model, permuted], x, progress=False)
    for stop in analysis.stop_points + [None]:
        merged = zipper.merge(stop, reset_bn=False)
        with torch.no_grad():
            for out in merged(x):
                err = ((out - ref).norm() / ref.norm()).item()
                assert err < 1e-4, (name, stop, err)


def test_repeat_over_other_axes_keeps_the_space():
    class Tiled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)
            self.pos = nn.Parameter(torch.randn(1, 1, 6))

        def forward(self, x):  # x: (B, N, 4)
            h = self.fc1(x) + self.pos.repeat(x.shape[0], x.shape[1], 1)
            return self.fc2(h.repeat(1, 2, 1).relu()).mean(1)

    torch.manual_seed(0)
    model = Tiled().eval()
    x = torch.randn(32, 5, 4)
    analysis = fxzip.analyze(model, x)
    assert not analysis.barriers, analysis
    permuted, _ = permuted_by_analysis(model, x, seed=1)
    merged = fxzip.merge(model, permuted, x, reset_bn=False, progress=False)
    with torch.no_grad():
        ref = model(x)
        for out in merged(x):
            assert ((out - ref).norm() / ref.norm()).item() < 1e-5


def test_permuted_copy_keeps_the_state_the_graph_does_not_read():
    """`fxzip.testing.permuted_copy` fills the copy's own state: a module registered under two
    names (the graph reads one) and timm's BatchNormAct2d, whose num_batches_tracked the traced
    graph never reads, still give a permuted copy that computes the model's function."""
    import timm

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(4, 8)
            self.alias = self.fc1
            self.fc2 = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc2(torch.relu(self.alias(x)))

    torch.manual_seed(0)
    x = torch.randn(16, 4)
    model = Shared().eval()
    permuted, count = fxzip.testing.permuted_copy(model, x, seed=1)
    assert count == 1 and not torch.equal(permuted.fc1.weight, model.fc1.weight)
    assert permuted.alias is permuted.fc1
    torch.testing.assert_close(permuted(x), model(x))
    images = torch.randn(8, 3, 32, 32)
    net = fxzip.reset_bn(timm.create_model("mobilenetv2_050", num_classes=3), images,
                         progress=False)
    copy_, count = fxzip.testing.permuted_copy(net, images, seed=1)
    assert count > 10
    with torch.no_grad():  # float32 rounding of a random-init net: exact in float64
        out, ref = copy_(images), net(images)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4
    assert int(copy_.bn1.num_batches_tracked) == int(net.bn1.num_batches_tracked)


class ReadsWeightDtype(nn.Module):
    """A forward that reads a layer's weight for its dtype before calling the layer (as XCiT's
    Fourier position encoding and Hugging Face's patch embeddings do): the get_attr of the weight
    and the module call must see one merged tensor."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        dtype = self.b.weight.dtype
        h = torch.relu(self.a(x))
        return self.c(torch.relu(self.b(h.to(dtype))))


def test_a_weight_read_for_its_dtype_is_the_merged_weight():
    """Permuted copy (the oracle fills its weights from a rewrite) and permuted self-merge both
    exact; before, the get_attr's plain copy of the weight replaced the merged module's."""
    torch.manual_seed(0)
    model, x = ReadsWeightDtype().eval(), torch.randn(16, 4)
    permuted, count = fxzip.testing.permuted_copy(model, x, seed=1)
    assert count == 2 and not torch.equal(permuted.b.weight, model.b.weight)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(permuted(x), ref)
        for stop in (None, "b"):
            merged = fxzip.merge(model, permuted, x, stop_at=stop, reset_bn=False, progress=False)
            for out in merged(x):
                torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


class _ScaledNoise(nn.Module):
    """A SinGAN-style step: an input's channels times a per-channel buffer, added to features.
    The sum carries the input's own channel order, so its space must keep identity matching."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 3, 3, padding=1)
        self.c3, self.c4 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 3, 3, padding=1)
        self.out = nn.Conv2d(3, 5, 1)
        self.register_buffer("amplitude", torch.rand(1, 3, 1, 1) + 0.5)

    def forward(self, z):
        x = self.c2(torch.relu(self.c1(z[:, :3])))
        x = x + z[:, 3:6] * self.amplitude
        return self.out(self.c4(torch.relu(self.c3(x))) + x)


def test_a_parameter_times_an_input_pins_the_space_it_meets():
    """A permuted copy (every unpinned space permuted) computes the same function only if the
    image space is pinned; the merge with it is then exact and the buffer is kept."""
    torch.manual_seed(0)
    model = _ScaledNoise().eval()
    z = torch.randn(4, 6, 8, 8)
    analysis = fxzip.analyze(model, z)
    pinned = [s for s in analysis.spaces.values() if s.pinned]
    assert sorted(s.size for s in pinned) == [3, 3]  # the input slice and the image stream
    other, count = permuted_by_analysis(model, z, seed=1)
    assert count >= 2
    merged = fxzip.merge(model, other, z, reset_bn=False, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(other(z), model(z), rtol=1e-4, atol=1e-5)
        for out in merged(z):
            torch.testing.assert_close(out, model(z), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merged.get_buffer("amplitude"), model.amplitude)
