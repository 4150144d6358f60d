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


def _efficientnet():  # MBConv blocks with squeeze-excitation and stochastic depth
    setting = [MBConvConfig(1, 3, 1, 8, 8, 1), MBConvConfig(4, 3, 2, 8, 12, 2)]
    return EfficientNet(setting, dropout=0.2, stochastic_depth_prob=0.2, num_classes=3,
                        last_channel=24)


def _convnext():  # depthwise 7×7, channels-last LayerNorm, layer scale, stochastic depth
    return ConvNeXt([CNBlockConfig(8, 16, 2), CNBlockConfig(16, None, 1)],
                    stochastic_depth_prob=0.1, num_classes=3)


# name: (builder, input size, layers that must be zippable)
FAMILIES = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=3), 32, 21),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=3), 32, 51),
    "efficientnet (stochastic depth)": (_efficientnet, 32, 14),
    "convnext (stochastic depth)": (_convnext, 32, 12),
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
