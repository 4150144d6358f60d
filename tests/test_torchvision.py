"""A fast subset of torchvision's classification families at tiny sizes (the whole zoo is
`benchmarks/torchvision_zoo.py`): zipped up to the output layer, and a copy whose every space is
permuted by the analysis merges back exactly; a family with a barrier merges exactly with a copy
of itself."""
from __future__ import annotations


import pytest
import torch

import fxzip
from permute_util import assert_self_merge_exact

torchvision = pytest.importorskip("torchvision")
from torchvision.models.convnext import CNBlockConfig, ConvNeXt  # noqa: E402
from torchvision.models.efficientnet import EfficientNet, MBConvConfig  # noqa: E402
from torchvision.models.maxvit import MaxVit  # noqa: E402
from torchvision.models.swin_transformer import SwinTransformer  # noqa: E402

from fxzip.graph.capture import _matmul_form  # noqa: E402


def _efficientnet():  # MBConv blocks with squeeze-excitation and stochastic depth
    setting = [MBConvConfig(1, 3, 1, 8, 8, 1), MBConvConfig(4, 3, 2, 8, 12, 2)]
    return EfficientNet(setting, dropout=0.2, stochastic_depth_prob=0.2, num_classes=3,
                        last_channel=24)


def _convnext():  # depthwise 7×7, channels-last LayerNorm, layer scale, stochastic depth
    return ConvNeXt([CNBlockConfig(8, 16, 2), CNBlockConfig(16, None, 1)],
                    stochastic_depth_prob=0.1, num_classes=3)


def _swin():  # shifted windows on a padded 10 × 10 map, patch merging of an odd 5 × 5 map
    return SwinTransformer([4, 4], 16, [2, 2], [2, 4], [4, 4], stochastic_depth_prob=0.1,
                           num_classes=3)


# name: (builder, input size, layers that must be zippable)
FAMILIES = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=3), 32, 21),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=3), 32, 51),
    "efficientnet (stochastic depth)": (_efficientnet, 32, 14),
    "convnext (stochastic depth)": (_convnext, 32, 12),
    "swin (torch.fx.wrap-ed window attention traced through)": (_swin, 40, 19),
    "shufflenet_v2_x0_5 (channel shuffle: a barrier)": (
        lambda: torchvision.models.shufflenet_v2_x0_5(num_classes=3), 32, 1),
}


@pytest.mark.filterwarnings("ignore::fxzip.errors.CalibrationWarning")  # tiny inputs, on purpose
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_torchvision_family_merges_its_permuted_copy_exactly(family):
    build, size, zippable = FAMILIES[family]
    torch.manual_seed(0)
    x = torch.randn(32, 3, size, size)
    model = fxzip.reset_bn(build(), x, progress=False)  # BN statistics as after training
    analysis = fxzip.analyze(model, x)
    stops = set(analysis.stop_points)
    zipped = sum(1 for n in analysis.all_layers if n in stops)
    assert zipped >= zippable, (zipped, analysis.barriers[:1])
    if not analysis.barriers:
        assert zipped == len(analysis.all_layers)  # no barrier: zipped to the output layer
    assert_self_merge_exact(model, x, bool(analysis.barriers), family)


@pytest.mark.filterwarnings("ignore::fxzip.errors.CalibrationWarning")
def test_maxvit_attention_written_with_einsum_zips_and_merges_itself_exactly():
    """MaxViT's attention is written with einsum (rewritten as matmuls when traced): every layer
    zips. (Its relative position index is read as a tensor constant when traced, so the
    permuted-copy oracle cannot load its state: a plain copy.)"""
    torch.manual_seed(0)
    model = MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16, 32],
                   block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.1, num_classes=3)
    x = torch.randn(8, 3, 32, 32)
    model = fxzip.reset_bn(model, x, progress=False)
    analysis = fxzip.analyze(model, x)
    assert not analysis.barriers, analysis.barriers[:1]
    assert len(analysis.head_groups) >= 2
    assert_self_merge_exact(model, x, True, "maxvit")


@pytest.mark.parametrize("equation,form", [
    ("B G H I D, B G H J D -> B G H I J", (False, True)),
    ("B G H I J, B G H J D -> B G H I D", (False, False)),
    ("bdi,bdj->bij", (True, False)), ("ij,jk->ik", (False, False)),
    ("ii->i", None), ("bij,bjk->bki", None), ("bij,bjk,bkl->bil", None), ("...ij,...jk->...ik", None),
])
def test_einsum_matrix_products_are_recognised(equation, form):
    assert _matmul_form(equation) == form


def test_einsum_rewritten_as_matmul_computes_the_same():
    class Attn(torch.nn.Module):
        def forward(self, q, k):
            return torch.einsum("bhid,bhjd->bhij", q, k).softmax(-1)

    q, k = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 6, 5)
    gm = torch.fx.symbolic_trace(Attn())
    from fxzip.graph.capture import einsums_as_matmuls
    einsums_as_matmuls(gm)
    assert not any(n.target is torch.einsum for n in gm.graph.nodes)
    torch.testing.assert_close(gm(q, k), Attn()(q, k))
