"""Merging a model with a permuted copy of itself gives the model back exactly even when a space
sees far fewer calibration samples than it has features (issue 10).

With few samples, many features look exactly alike on the data: sparse ReLU units active on the
same single image correlate exactly 1, units dead on every image are equal constants. The
correlation alone then cannot tell a feature's counterpart in the other model from its look-alikes
in its own model, and the greedy pairs them arbitrarily (the tests show it: without the weight
similarity the merge is off). fxzip mixes in the weight similarity of the features
(`fxzip.matching.similarity`, `weight_similarity=0.01`): a feature and its counterpart have equal weight
signatures, look-alikes do not, so the counterpart is the unique best match."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fxzip
from permute_util import permuted_by_analysis

pytestmark = pytest.mark.filterwarnings("ignore::fxzip.errors.CalibrationWarning")  # on purpose


class WideHead(nn.Module):
    """A small CNN with a wide, sparse MLP head: its hidden spaces (256 wide) see one sample per
    image."""

    def __init__(self, width: int = 256):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, width), nn.Linear(width, width), nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _sparse_model(images: int, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A WideHead whose hidden units are mostly off (as after training): many are active on one
    image only or on none; BatchNorm statistics estimated on the images."""
    torch.manual_seed(seed)
    model = WideHead()
    with torch.no_grad():
        model.fc1.bias.sub_(0.15)
        model.fc2.bias.sub_(0.075)
    x = torch.randn(images, 3, 8, 8)
    return fxzip.reset_bn(model, x, progress=False).eval(), x


def _error(model: nn.Module, other: nn.Module, x: torch.Tensor, **options) -> float:
    merged = fxzip.merge(model, other, x, reset_bn=False, progress=False, **options)
    with torch.no_grad():
        ref = model(x)
        return max(((out - ref).norm() / ref.norm()).item() for out in merged(x))


def _single_image_units(model: WideHead, x: torch.Tensor) -> int:
    with torch.no_grad():
        hidden = torch.relu(model.fc1(torch.relu(model.bn(model.conv(x))).mean((2, 3))))
    return int(((hidden > 0).sum(0) == 1).sum())


@pytest.mark.parametrize("images", [1, 4, 16])
@pytest.mark.parametrize("corrections", [None, "default"])
def test_permuted_self_merge_is_exact_with_fewer_samples_than_features(images, corrections):
    model, x = _sparse_model(images)
    assert _single_image_units(model, x) >= 4  # exact correlation ties exist
    other, _ = permuted_by_analysis(model, x, seed=1)
    assert _error(model, other, x, corrections=corrections) < 1e-6


def test_without_the_weight_similarity_the_ties_are_paired_arbitrarily():
    """The control: correlation alone (weight_similarity=0) mispairs the tied features."""
    model, x = _sparse_model(8)
    other, _ = permuted_by_analysis(model, x, seed=1)
    assert _error(model, other, x, corrections=None, weight_similarity=0.0) > 1e-3
    assert _error(model, other, x, corrections=None) < 1e-6


def test_plain_copy_self_merge_is_exact_with_two_images():
    model, x = _sparse_model(2)
    assert _error(model, copy.deepcopy(model), x) < 1e-6


@pytest.mark.slow
def test_timm_resnet50_pooled_space_self_merge_is_exact_with_32_images():
    """Issue 10's case: timm's resnet50 (a 2,048-wide pooled head space), 32 random images of 64
    pixels (128 samples of layer4's 2 × 2 maps for 4,096 features of both models)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    x = torch.randn(32, 3, 64, 64)
    model = fxzip.reset_bn(timm.create_model("resnet50", num_classes=10), x, progress=False)
    other, _ = permuted_by_analysis(model, x, seed=1)
    assert _error(model, other, x, corrections=None) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["regnet_y_400mf", "alexnet"])
def test_torchvision_permuted_self_merge_is_exact_with_32_images(name):
    """The torchvision zoo's cases (`benchmarks/torchvision_zoo.py`: 32 random images of 64
    pixels): RegNetY-400MF and AlexNet were off by 1.1e-3 and 3.5e-4 with correlation alone."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    x = torch.randn(32, 3, 64, 64)
    model = torchvision.models.get_model(name, weights=None, num_classes=5)
    model = fxzip.reset_bn(model, x, progress=False).eval()
    other, _ = permuted_by_analysis(model, x, seed=1)
    assert _error(model, other, x, corrections=None) < 1e-5


@pytest.mark.parametrize("rows_count,width", [(9, 3), (9, 16), (9, 17), (9, 1000),
                                              (1500, 1000)])  # the last sorted on threads
def test_signature_quantiles_equal_torch_quantile_bit_for_bit(rows_count, width):
    """The weight signatures sort with numpy (about ten times faster than torch on the CPU; a
    large slice in row blocks on several threads) and interpolate as `torch.quantile` does: the
    same float64 values, so matchings do not move."""
    from fxzip.matching.similarity import QUANTILES, _summary

    rows = torch.randn(rows_count, width, generator=torch.Generator().manual_seed(width))
    rows[0, : width // 2] = 0.5  # ties
    if width <= QUANTILES:
        expected = rows.double().sort(dim=1).values
    else:
        expected = torch.quantile(rows.double(), torch.linspace(0, 1, QUANTILES,
                                                                dtype=torch.float64), dim=1).T
    assert torch.equal(_summary(rows), expected)
