"""timm modules that timm marks as not traceable (shape-dependent Python in forward), traced
through with the example's values (fxzip.graph.value_tracing), and multi-query attention: zipped
completely, a permuted copy merges back exactly. Tiny configurations; each test asserts the zip
reaches the output."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxzip
from fxzip.graph.capture import trace
from permute_util import as_trained_timm, assert_self_merge_exact


def _mobilevitv2() -> nn.Module:  # MobileVitV2Block: unfold with math.ceil and a size branch
    from timm.models.byobnet import ByobNet, ByoModelCfg
    from timm.models.mobilevit import _inverted_residual_block, _mobilevitv2_block
    cfg = ByoModelCfg(blocks=(_inverted_residual_block(d=1, c=8, s=2, br=2.0),
                              _mobilevitv2_block(d=1, c=16, s=2, transformer_depth=1)),
                      stem_chs=8, stem_type="3x3", stem_pool="", downsample="", act_layer="silu")
    return ByobNet(cfg, num_classes=3)


def _twins() -> nn.Module:  # LocallyGroupedAttn: windows padded where the size needs it
    from timm.models.twins import Twins
    return Twins(img_size=40, patch_size=4, embed_dims=(16, 32), num_heads=(2, 2),
                 mlp_ratios=(2, 2), depths=(2, 1), wss=(4, 4), sr_ratios=(2, 1), num_classes=3)


def _convit() -> nn.Module:  # GPSA: relative positions built for N patches, a Linear over them
    from timm.models.convit import ConVit
    model = ConVit(img_size=32, patch_size=8, embed_dim=24, num_heads=4, depth=3,
                   local_up_to_layer=2, num_classes=3)
    with torch.no_grad():
        for block in model.blocks[:2]:
            block.attn.gating_param.normal_()  # as after training: both attentions matter
    return model


class _MultiQuery(nn.Module):
    """A conv stem and timm's MultiQueryAttention2d (MobileNet-v4's hybrid blocks: H query heads,
    one key/value head with a size-1 head axis, keys and values downsampled) in a residual."""

    def __init__(self):
        super().__init__()
        from timm.layers.attention2d import MultiQueryAttention2d
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.attn = MultiQueryAttention2d(16, num_heads=4, key_dim=8, value_dim=8, kv_stride=2)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.attn(x)
        return self.head(x.mean((2, 3)))

    def get_classifier(self) -> nn.Module:
        return self.head


# name: (builder, input size, attentions merged head-aware at least)
FAMILIES = {
    "mobilevitv2 (MobileVitV2Block)": (_mobilevitv2, 20, 0),
    "twins (LocallyGroupedAttn, padded windows)": (_twins, 40, 3),
    "convit (GPSA)": (_convit, 32, 3),
    "multi-query attention (MobileNet-v4)": (_MultiQuery, 16, 1),
}


def _prepared(build, size: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(16, 3, size, size)
    return as_trained_timm(build(), x), x


@pytest.mark.filterwarnings("ignore::fxzip.errors.CalibrationWarning")  # tiny inputs, on purpose
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_not_traceable_module_is_traced_through_and_zips(family):
    build, size, heads = FAMILIES[family]
    model, x = _prepared(build, size)
    gm = trace(model, x)
    leaves = {type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes
              if n.op == "call_module"}
    assert not leaves & {"MobileVitV2Block", "LocallyGroupedAttn", "GPSA"}, leaves
    analysis = fxzip.analyze(model, x)
    assert not analysis.barriers, analysis.barriers[:1]
    assert len(analysis.head_groups) >= heads
    assert_self_merge_exact(model, x, False, family)


def test_traced_with_values_keeps_the_batch_size_symbolic():
    """The graph traced on a batch of 16 runs on a batch of 3 (sizes used in reshapes stay graph
    values) and computes what the model computes."""
    model, x = _prepared(_twins, 40)
    gm = trace(model, x)
    y = x[:3]
    with torch.no_grad():
        torch.testing.assert_close(gm(y), model(y), rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore::fxzip.errors.CalibrationWarning")
def test_buffer_filled_in_forward_traces_alike_whether_filled_or_not():
    """ConViT fills its relative positions in forward: a model that ran already (buffer filled)
    and a fresh copy (filled while traced) get one graph, and merge back to the model exactly."""
    import copy

    model, x = _prepared(_convit, 32)
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        ref = model(x)  # fills model's buffers; fresh keeps the placeholder
    assert model.blocks[0].attn.rel_indices.shape != fresh.blocks[0].attn.rel_indices.shape
    merged = fxzip.merge(model, fresh, x, reset_bn=False, progress=False)
    with torch.no_grad():
        for out in merged(x):
            assert ((out - ref).norm() / ref.norm()).item() < 1e-4


class _BranchOnData(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        if x.mean().item() > 0:  # a branch on data: tracing must not keep one side silently
            return self.fc(x)
        return -self.fc(x)


def test_control_flow_on_tensor_data_is_still_refused():
    with pytest.raises(fxzip.TraceError, match="data-dependent control flow"):
        trace(_BranchOnData(), torch.randn(8, 4))
