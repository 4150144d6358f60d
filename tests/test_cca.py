"""method="cca": every model aligned to model 0 by an invertible map from regularised CCA (Horoi
et al., ICML 2024), carried through the rewrite as a dense Match (`Match.maps`).

* On a permuted copy the map IS the permutation, so a permuted self-merge is exact (corrections
  off and on, split heads at every stop point, a ViT's heads included).
* On two different models the map is dense, invertible, and the merge differs from the parents.
* Bad uses are clear errors: width above 1, malformed dense maps. Grouped convolutions and
  attention heads keep permutations.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxzip
from fxzip.errors import InputError, MatchingError
from fxzip.matching.match import Match
from fxzip.matching.cca import cca_match, cca_transform
from fxzip.matching.registry import METHODS

try:
    from permute_util import permuted_by_analysis, rel_err, small_resnet
except ImportError:  # tests/ made a package
    from tests.permute_util import permuted_by_analysis, rel_err, small_resnet

pytestmark = pytest.mark.filterwarnings("ignore::fxzip.errors.CalibrationWarning")


@pytest.fixture(scope="module")
def data():
    return small_resnet(0), torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(5))


def test_cca_map_of_a_permuted_copy_is_the_permutation():
    rng = np.random.default_rng(0)
    n = 10
    x = rng.normal(size=(400, n)) @ rng.normal(size=(n, n))
    perm = rng.permutation(n)
    cov = np.cov(np.concatenate([x, x[:, perm]], 1), rowvar=False)
    T = cca_transform(cov, n, 1, regularization=3.0)
    expected = np.zeros((n, n))
    expected[perm, np.arange(n)] = 1.0  # feature j of the copy is feature perm[j] of model 0
    np.testing.assert_allclose(T, expected, atol=1e-9)
    match = cca_match(cov, [n, n])
    np.testing.assert_array_equal(match.assign[1], perm)


def test_cca_map_of_different_features_is_dense_and_inverted():
    rng = np.random.default_rng(1)
    n = 8
    a = rng.normal(size=(300, n))
    b = a @ rng.normal(size=(n, n)) + 0.3 * rng.normal(size=(300, n))
    match = cca_match(np.cov(np.concatenate([a, b], 1), rowvar=False), [n, n])
    (m0, u0), (m1, u1) = match.maps
    np.testing.assert_allclose(m0, np.eye(n) / 2)
    np.testing.assert_allclose(u0, np.eye(n))
    np.testing.assert_allclose(2 * m1 @ u1, np.eye(n), atol=1e-8)
    assert (np.abs(m1) > 1e-3).sum() > 2 * n  # not a permutation
    assert match.dense and match.size == n


@pytest.mark.parametrize("corrections", [None, "default"])
def test_permuted_self_merge_is_exact(data, corrections):
    model, x = data
    other, count = permuted_by_analysis(model, x, seed=2)
    assert count >= 1
    zipper = fxzip.Zipper([model, other], x, progress=False, statistics_precision="float32")
    with torch.no_grad():
        ref = model(x)
        for stop in ("layer1", "layer2", None):
            merged = zipper.merge(stop, method="cca", corrections=corrections, reset_bn=False)
            for out in merged(x):
                assert rel_err(out, ref) < 1e-5, (stop, rel_err(out, ref))


def test_vit_with_permuted_heads_merges_exactly():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=5, embed_dim=24,
                              depth=2, num_heads=3, mlp_ratio=2.0).eval()
    x = torch.randn(32, 1, 8, 8)
    permuted, _ = permuted_by_analysis(model, x, seed=3)
    merged = fxzip.merge(model, permuted, x, method="cca", corrections=None, reset_bn=False,
                         progress=False, statistics_precision="float32")
    with torch.no_grad():
        ref = model(x)
        for out in merged(x):
            assert rel_err(out, ref) < 1e-4


def test_two_models_merge_into_a_new_function(data):
    model, x = data
    other = small_resnet(1)
    merged = fxzip.merge(model, other, x, method="cca", corrections=None, progress=False)
    assert merged.fxzip_report.method == "cca"
    with torch.no_grad():
        out_a, out_b = merged(x)
        assert torch.isfinite(out_a).all() and torch.isfinite(out_b).all()
        assert rel_err(out_a, model(x)) > 1e-3
    again = fxzip.merge(model, other, x, method="cca", corrections=None, progress=False)
    for (k, v), (_, w) in zip(merged.state_dict().items(), again.state_dict().items()):
        assert torch.equal(v, w), k  # deterministic


def test_cca_keeps_one_models_width(data):
    model, x = data
    with pytest.raises(InputError, match="zipit"):
        fxzip.merge(model, small_resnet(1), x, method="cca", width=1.5, progress=False)
    with pytest.raises(MatchingError, match="out_size must be 4"):
        METHODS["cca"].match(np.eye(8), [4, 4], out_size=5)


def test_malformed_dense_maps_are_rejected():
    eye = np.eye(3)
    assign = (np.arange(3), np.arange(3))
    with pytest.raises(MatchingError, match="maps"):
        Match(assign, 3, np.full(3, 2), maps=((eye, eye),))
    with pytest.raises(MatchingError, match=r"\(3, 3\)"):
        Match(assign, 3, np.full(3, 2), maps=((eye, eye), (np.eye(2), eye)))
    with pytest.raises(MatchingError, match="NaN"):
        Match(assign, 3, np.full(3, 2), maps=((eye, eye), (eye * np.nan, eye)))


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.depthwise(torch.relu(self.conv(x))))
        return self.head(x.mean((2, 3)))


def test_grouped_convolution_keeps_a_permutation_and_merges_exactly():
    """Groups are matched like attention heads: the spaces a grouped convolution reads and writes
    get the permutation closest to the CCA map (a dense map would mix the groups)."""
    torch.manual_seed(0)
    model = Depthwise().eval()
    x = torch.randn(64, 1, 8, 8)
    other, _ = permuted_by_analysis(model, x, seed=1)
    merged = fxzip.merge(model, other, x, method="cca", corrections=None, progress=False,
                         statistics_precision="float32")
    grouped = [s for s in merged.fxzip_report.spaces if any("depthwise" in n for n in s.nodes)]
    assert grouped
    with torch.no_grad():
        ref = model(x)
        for out in merged(x):
            assert rel_err(out, ref) < 1e-5
