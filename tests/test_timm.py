"""A fast subset of timm families at tiny sizes: traced, zipped as far as the analysis says, and a
copy whose every space is permuted (heads of attention included) merges back exactly; a family
with a barrier merges with a copy of itself exactly."""
from __future__ import annotations


import pytest
import torch
import torch.nn as nn

import fxzip
from permute_util import as_trained_timm, assert_self_merge_exact


def _timm(name: str, **kwargs) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, num_classes=3, **kwargs)


def _vit():
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=16, patch_size=4, num_classes=3, embed_dim=24, depth=2,
                             num_heads=3, mlp_ratio=2.0)


def _swin():
    from timm.models.swin_transformer import SwinTransformer
    return SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=12, depths=(2, 1),
                           num_heads=(3, 3), num_classes=3)  # a shifted window block (mask, roll)


def _mixer():
    from timm.models.mlp_mixer import MlpMixer
    return MlpMixer(num_classes=3, img_size=32, patch_size=8, num_blocks=2, embed_dim=16)


def _vgg():  # its ConvMlp head branches on the input size: traced with the example's shapes
    from timm.models.vgg import VGG
    return VGG(cfg=[8, "M", 16, "M"], num_classes=3, mlp_ratio=0.01)


def _pvt():  # a single-head stage: keys and values split as (…, 2, 1, d)
    from timm.models.pvt_v2 import PyramidVisionTransformerV2
    return PyramidVisionTransformerV2(depths=(1, 1), embed_dims=(16, 32), num_heads=(1, 2),
                                      sr_ratios=(2, 1), mlp_ratios=(2, 2), num_classes=3)


def _focalnet():  # one-channel gates broadcast over the context channels
    from timm.models.focalnet import FocalNet
    return FocalNet(depths=(1, 1), embed_dim=16, num_classes=3)


# name: (builder, input size, layers that must be zippable, attentions merged head-aware)
FAMILIES = {
    "resnet18": (lambda: _timm("resnet18"), 32, 21, 0),
    "mobilenetv3 (depthwise + SE)": (lambda: _timm("mobilenetv3_small_050"), 32, 43, 0),
    "convnext": (lambda: _timm("convnext_atto"), 32, 29, 0),
    "vit": (_vit, 16, 10, 2),
    "swin": (_swin, 32, 15, 3),  # relative position biases follow the pairing of heads
    "mixer": (_mixer, 32, 6, 0),  # channel MLPs zipped; token-mixing Linears averaged
    "vgg (size branch)": (_vgg, 16, 5, 0),
    "pvt_v2 (single head)": (_pvt, 32, 16, 2),
    "focalnet (gates)": (_focalnet, 32, 17, 0),
}


@pytest.mark.filterwarnings("ignore::fxzip.errors.CalibrationWarning")  # tiny inputs, on purpose
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_timm_family_merges_its_permuted_copy_exactly(family):
    build, size, zippable, heads = FAMILIES[family]
    torch.manual_seed(0)
    x = torch.randn(48, 3, size, size)
    model = as_trained_timm(build(), x)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias" in name:  # as after training: heads differ clearly
                p.normal_(0.0, 1.0)
    analysis = fxzip.analyze(model, x)
    stops = set(analysis.stop_points)
    assert sum(1 for n in analysis.all_layers if n in stops) >= zippable, analysis
    assert len(analysis.head_groups) == heads
    assert_self_merge_exact(model, x, bool(analysis.barriers), family)
