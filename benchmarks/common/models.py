"""The settings' small model definitions (`benchmarks.common.settings`, `benchmarks.vit_digits`).

Every model is `torch.fx`-traceable and groups its layers into named stages (containers), so that
a stage name such as ``"stage1"`` is a valid fxzip stop point (the container's output). The
setting (a) and (d) models come from `fxzip.demo.digits.ResNet20`.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def conv_bn_relu_2d(width_in: int, width_out: int, norm: bool = True) -> list[nn.Module]:
    """A 3×3 conv (no bias), BatchNorm and ReLU; without `norm`, a conv with a bias and ReLU."""
    if not norm:
        return [nn.Conv2d(width_in, width_out, 3, padding=1), nn.ReLU()]
    return [nn.Conv2d(width_in, width_out, 3, padding=1, bias=False), nn.BatchNorm2d(width_out),
            nn.ReLU()]


def conv_bn_relu_1d(width_in: int, width_out: int, stride: int = 1) -> list[nn.Module]:
    """A width-5 1-D conv (no bias), BatchNorm and ReLU."""
    return [nn.Conv1d(width_in, width_out, 5, stride=stride, padding=2, bias=False),
            nn.BatchNorm1d(width_out), nn.ReLU()]


class DigitsVGG(nn.Module):
    """A VGG-style CNN for 8×8 digits whose classifier reads the flattened C×H×W maps.

    stage1: (conv-BN-ReLU)×2 at `width` channels, max-pool 8×8 → 4×4;
    stage2: (conv-BN-ReLU)×2 at 2·`width` channels, max-pool 4×4 → 2×2;
    classifier: flatten (2·width·2·2) → Linear(`hidden`) → ReLU → Linear(`num_classes`).
    `norm=False`: no BatchNorm anywhere (a norm-free network: BN reset cannot repair it).
    """

    def __init__(self, width: int = 32, hidden: int = 128, num_classes: int = 5,
                 norm: bool = True):
        super().__init__()
        self.stage1 = nn.Sequential(*conv_bn_relu_2d(1, width, norm),
                                    *conv_bn_relu_2d(width, width, norm), nn.MaxPool2d(2))
        self.stage2 = nn.Sequential(*conv_bn_relu_2d(width, 2 * width, norm),
                                    *conv_bn_relu_2d(2 * width, 2 * width, norm), nn.MaxPool2d(2))
        self.hidden = nn.Sequential(nn.Linear(2 * width * 2 * 2, hidden), nn.ReLU())
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.stage1(x))
        return self.fc(self.hidden(torch.flatten(x, 1)))


class Conv1dNet(nn.Module):
    """A 1-D CNN for mnist1d sequences (N, 1, 40): three stages of two Conv1d-BN-ReLU each (the
    first conv of stages 2 and 3 has stride 2: lengths 40 → 20 → 10), global average pooling and
    one linear head."""

    def __init__(self, width: int = 32, num_classes: int = 5):
        super().__init__()
        widths = [width, 2 * width, 2 * width]
        self.stage1 = nn.Sequential(*conv_bn_relu_1d(1, widths[0]),
                                    *conv_bn_relu_1d(widths[0], widths[0]))
        self.stage2 = nn.Sequential(*conv_bn_relu_1d(widths[0], widths[1], stride=2),
                                    *conv_bn_relu_1d(widths[1], widths[1]))
        self.stage3 = nn.Sequential(*conv_bn_relu_1d(widths[1], widths[2], stride=2),
                                    *conv_bn_relu_1d(widths[2], widths[2]))
        self.fc = nn.Linear(widths[2], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.fc(x.mean(dim=-1))


def digits_vit(num_classes: int = 5) -> nn.Module:
    """A small timm VisionTransformer for the 8×8 digits (`benchmarks.vit_digits`): 2×2 patches
    (16 tokens + a cls token), width 64, 4 blocks of 4 heads, MLP ratio 2."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=num_classes,
                             embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0)
