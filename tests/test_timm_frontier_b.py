"""timm modules that timm marks as not traceable (shape-dependent Python in forward), traced
through with the example's values (fxzip.value_tracing) and zipped completely: a permuted copy
merges back exactly. Tiny configurations; each test asserts the zip reaches the output."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxzip
from fxzip.tracing import trace
from permute_util import assert_self_merge_exact


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


# name: (builder, input size, attentions merged head-aware at least)
FAMILIES = {
    "mobilevitv2 (MobileVitV2Block)": (_mobilevitv2, 20, 0),
    "twins (LocallyGroupedAttn, padded windows)": (_twins, 40, 3),
}


def _prepared(build, size: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(16, 3, size, size)
    model = fxzip.reset_bn(build(), x, progress=False)  # BN statistics as after training
    with torch.no_grad():
        for p in model.get_classifier().parameters():
            if p.dim() > 1 and not p.any():  # timm zero-initialises some heads
                p.normal_(0.0, 0.1)
    return model, x


@pytest.mark.filterwarnings("ignore::fxzip.errors.CalibrationWarning")  # tiny inputs, on purpose
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_not_traceable_module_is_traced_through_and_zips(family):
    build, size, heads = FAMILIES[family]
    model, x = _prepared(build, size)
    gm = trace(model, x)
    leaves = {type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes
              if n.op == "call_module"}
    assert not leaves & {"MobileVitV2Block", "LocallyGroupedAttn"}, leaves
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
