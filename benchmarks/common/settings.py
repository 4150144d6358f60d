"""The accuracy protocol's settings (a)-(e): data, model, stop points and epochs of each
(`benchmarks.accuracy`; `benchmarks.corrections` and `benchmarks.width` reuse them). Every pair:
one architecture, two different initialisations, task A = classes 0–4, task B = classes 5–9."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxzip.demo.digits import ResNet20

from .data import TaskData, load_digits, load_mnist1d
from .models import Conv1dNet, DigitsVGG

EMBED_DIM = 32
TEMPERATURE = 0.07


def class_embeddings(dim: int = EMBED_DIM, seed: int = 1234) -> torch.Tensor:
    """10 fixed random unit vectors (one per class), seeded: the shared output space of (d)."""
    vectors = torch.randn(10, dim, generator=torch.Generator().manual_seed(seed))
    return F.normalize(vectors, dim=1)


@dataclass(frozen=True)
class Stop:
    """One stop point: its table label and the `Zipper.merge` arguments."""

    label: str
    stop_at: str | int | None
    shared_output: bool = False


@dataclass
class Setting:
    key: str
    title: str
    load: Callable[[], TaskData]
    make_model: Callable[[], nn.Module]
    stops: list[Stop]
    epochs: int
    quick_epochs: int = 10
    embedding: bool = False
    note: str = ""


RESNET_STOPS = [Stop("layer1", "layer1"), Stop("layer2", "layer2"), Stop("layer3", "layer3"),
                Stop("full", None)]
POOL_NOTE = ("'{last}' and 'full' zip the same layers (only parameter-free global pooling and "
             "flatten lie between them), so their rows agree.")


def make_settings(width: int) -> dict[str, Setting]:
    """The five settings; `width` is the ResNet-20 width multiplier of (a) and (d)."""
    return {
        "a": Setting("a", f"digits 5+5, ResNet-20x{width}, cross-entropy heads", load_digits,
                     lambda: ResNet20(width=width), RESNET_STOPS, epochs=20,
                     note=POOL_NOTE.format(last="layer3")),
        "b": Setting("b", "digits 5+5, VGG-style CNN with a flatten(C*2*2) classifier",
                     load_digits, lambda: DigitsVGG(width=32, hidden=128),
                     [Stop("stage1", "stage1"), Stop("stage2", "stage2"), Stop("full", None)],
                     epochs=30),
        "e": Setting("e", "digits 5+5, the VGG-style CNN of (b) without BatchNorm (norm-free)",
                     load_digits, lambda: DigitsVGG(width=32, hidden=128, norm=False),
                     [Stop("stage1", "stage1"), Stop("stage2", "stage2"), Stop("full", None)],
                     epochs=30),
        "c": Setting("c", "mnist1d 5+5, 1-D CNN", load_mnist1d, lambda: Conv1dNet(width=32),
                     [Stop("stage1", "stage1"), Stop("stage2", "stage2"),
                      Stop("stage3", "stage3"), Stop("full", None)], epochs=30,
                     note=POOL_NOTE.format(last="stage3")),
        "d": Setting("d", f"digits 5+5, ResNet-20x{width} into a shared d={EMBED_DIM} "
                          f"cosine-embedding space (T={TEMPERATURE})", load_digits,
                     lambda: ResNet20(width=width, num_classes=EMBED_DIM),
                     RESNET_STOPS + [Stop("shared", None, shared_output=True)], epochs=20,
                     embedding=True, note=POOL_NOTE.format(last="layer3")),
    }
