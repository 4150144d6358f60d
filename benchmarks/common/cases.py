"""Two models of one architecture and their calibration batches, built the same way in any process
(`benchmarks.speed` re-builds a case in fresh subprocesses; `benchmarks.scale` builds resnet50's):
ResNet-20×4 on the digits, timm resnet50 and ViT-S/16 (or ViT-Ti/16) on random images."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

import fxzip
from fxzip.demo.digits import ResNet20, load_digits_split

DIGITS_BATCH = 128


@dataclass(frozen=True)
class CaseSpec:
    """What to build; plain data so that a subprocess can build the same case."""

    kind: str  # "digits", "resnet50", "vit" (timm vit_small_patch16_224) or "vit_tiny"
    images: int = 0
    size: int = 0
    batch: int = 0

    @property
    def label(self) -> str:
        if self.kind == "digits":
            return "ResNet20x4 digits"
        name = {"vit": "ViT-S/16", "vit_tiny": "ViT-Ti/16"}.get(self.kind, "resnet50")
        return f"{name} {self.images}x{self.size}² (bs {self.batch})"


@dataclass
class Case:
    spec: CaseSpec
    models: list[nn.Module]
    batches: list[torch.Tensor]


def digits_case() -> Case:
    """Two randomly initialised ResNet-20×4 (seeds 0, 1) whose BatchNorm statistics are estimated
    on the digits' training images, which are also the calibration batches."""
    x = load_digits_split().x_train
    batches = list(x.split(DIGITS_BATCH))
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(fxzip.reset_bn(ResNet20(width=4), batches, progress=False))
    return Case(CaseSpec("digits"), models, batches)


def resnet50_case(images: int, size: int, batch: int) -> Case:
    """Two timm resnet50 (10 classes) from seeds 0 and 1 with BatchNorm statistics estimated on
    the batches, and random images."""
    import timm

    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        # zero_init_last=False: with timm's default the last BN of every residual branch is 0
        # at initialisation, so those features would all be constant.
        models.append(timm.create_model("resnet50", pretrained=False, num_classes=10,
                                        zero_init_last=False))
    generator = torch.Generator().manual_seed(0)
    batches = list(torch.randn(images, 3, size, size, generator=generator).split(batch))
    # BatchNorm statistics estimated on the images, as after training: with the initial running
    # statistics (mean 0, variance 1) activations grow through the 50 layers and most units die.
    models = [fxzip.reset_bn(m, batches, progress=False) for m in models]
    return Case(CaseSpec("resnet50", images, size, batch), models, batches)


def vit_case(images: int, size: int, batch: int, kind: str = "vit") -> Case:
    """Two timm vit_small_patch16_224 (or vit_tiny_patch16_224 for kind "vit_tiny"; 10 classes)
    from seeds 0 and 1, and random images."""
    import timm

    name = "vit_tiny_patch16_224" if kind == "vit_tiny" else "vit_small_patch16_224"
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(timm.create_model(name, pretrained=False, num_classes=10,
                                        img_size=size).eval())
    generator = torch.Generator().manual_seed(0)
    batches = list(torch.randn(images, 3, size, size, generator=generator).split(batch))
    return Case(CaseSpec(kind, images, size, batch), models, batches)


def build_case(spec: CaseSpec) -> Case:
    if spec.kind == "digits":
        return digits_case()
    if spec.kind in ("vit", "vit_tiny"):
        return vit_case(spec.images, spec.size, spec.batch, spec.kind)
    return resnet50_case(spec.images, spec.size, spec.batch)


def plain_forward(models: Sequence[nn.Module], batches: Sequence[torch.Tensor]) -> None:
    """Both models over every batch, as plain inference."""
    with torch.no_grad():
        for x in batches:
            for m in models:
                m(x)

