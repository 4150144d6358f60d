"""The capacity knob `width=` (fxzip.matching.width): merged width as a multiple of one model's width.

* width = number of models keeps every feature apart: the merge is the ensemble's function
  (corrections off and on), at a stop point and at the full zip.
* A permuted self-merge stays exact at width 1 and above, for "zipit" and "permute".
* Parameters and FLOPs grow with the width; a dict gives each stop region its own width.
* Bad values are InputErrors that name the allowed values; merges are deterministic.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import fxzip
from fxzip.errors import InputError
from fxzip.matching.width import check_width, merged_size

try:
    from permute_util import permuted_by_analysis, rel_err, small_resnet
except ImportError:  # tests/ made a package
    from tests.permute_util import permuted_by_analysis, rel_err, small_resnet

pytestmark = pytest.mark.filterwarnings("ignore::fxzip.errors.CalibrationWarning")
WIDTHS = (1.0, 1.25, 1.5, 1.75, 2.0)


@pytest.fixture(scope="module")
def pair():
    x = torch.randn(96, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    return small_resnet(0), small_resnet(1), x


@pytest.fixture(scope="module")
def zipper(pair):
    a, b, x = pair
    return fxzip.Zipper([a, b], x, progress=False)


@pytest.mark.parametrize("stop_at", [None, "layer2"])
@pytest.mark.parametrize("corrections", [None, "default"])
def test_full_width_is_the_ensemble(pair, zipper, stop_at, corrections):
    a, b, x = pair
    merged = zipper.merge(stop_at, width=2.0, corrections=corrections, reset_bn=False)
    with torch.no_grad():
        outs, refs = merged(x), (a(x), b(x))
    for out, ref in zip(outs, refs):
        assert rel_err(out, ref) < 1e-5
    spaces = merged.fxzip_report.spaces
    assert spaces and all(s.merged_width == 2 * s.width for s in spaces)


def test_narrower_is_not_the_ensemble(pair, zipper):
    """The test above can fail: a real merge of two different models changes their function."""
    a, b, x = pair
    merged = zipper.merge(None, width=1.5, corrections=None, reset_bn=False)
    with torch.no_grad():
        assert rel_err(merged(x)[0], a(x)) > 1e-3


@pytest.mark.parametrize("method", ["zipit", "permute"])
@pytest.mark.parametrize("width", [1.0, 1.5])
def test_permuted_self_merge_is_exact(pair, method, width):
    a, _, x = pair
    other, count = permuted_by_analysis(a, x, seed=3)
    assert count >= 1
    merged = fxzip.merge(a, other, x, method=method, width=width, corrections=None,
                         reset_bn=False, progress=False)
    with torch.no_grad():
        ref = a(x)
        for out in merged(x):
            assert rel_err(out, ref) < 1e-5
    expected = [merged_size(s.width, width, 2) for s in merged.fxzip_report.spaces]
    assert [s.merged_width for s in merged.fxzip_report.spaces] == expected


def test_costs_grow_with_width(zipper):
    costs = [zipper.merge(None, width=w, corrections=None).fxzip_report.costs for w in WIDTHS]
    flops = [c["flops"] for c in costs]
    params = [c["parameters"] for c in costs]
    assert all(f0 < f1 for f0, f1 in zip(flops, flops[1:])), flops
    assert all(p0 < p1 for p0, p1 in zip(params, params[1:])), params


def test_width_per_stop_region(zipper):
    merged = zipper.merge("layer2", width={"layer1": 1.0, "*": 2.0}, corrections=None)
    by_node = {s.nodes[0]: s for s in merged.fxzip_report.spaces}
    assert by_node["layer1_0_conv1"].merged_width == by_node["layer1_0_conv1"].width
    assert by_node["layer2_0_conv1"].merged_width == 2 * by_node["layer2_0_conv1"].width
    same = zipper.merge("layer2", width={"layer1": 1.0, "layer2": 2.0}, corrections=None)
    assert [s.merged_width for s in same.fxzip_report.spaces] == \
        [s.merged_width for s in merged.fxzip_report.spaces]
    assert merged.fxzip_report.settings["width"] == {"layer1": 1.0, "*": 2.0}


def test_deterministic(pair, zipper):
    a, b, x = pair
    one = zipper.merge(None, width=1.5)
    two = fxzip.merge(a, b, x, width=1.5, progress=False)
    for (k, v), (k2, v2) in zip(one.state_dict().items(), two.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


@pytest.mark.parametrize("bad", [0.5, 2.5, 0, -1, float("nan"), float("inf"), "wide", True, None,
                                 [1.5], {}, {"layer1": 3.0}, {1.5: 1.5}])
def test_bad_width_is_an_input_error(pair, bad):
    a, b, x = pair
    with pytest.raises(InputError, match=r"\[1, 2\]|stop point|names no stop region"):
        fxzip.merge(a, b, x, width=bad, progress=False)


def test_unknown_stop_region_is_an_input_error(zipper):
    with pytest.raises(InputError, match="width\\['nope'\\] names no stop region"):
        zipper.merge(None, width={"nope": 1.5})


def test_average_cannot_widen(zipper):
    with pytest.raises(InputError, match="zipit"):
        zipper.merge(None, method="average", width=1.5)
    zipper.merge(None, method="average", width=1.0, corrections=None)  # width 1 is fine


def test_three_models_allow_width_three(pair):
    a, b, x = pair
    c = small_resnet(2)
    merged = fxzip.merge_all([a, b, c], x, width=3.0, corrections=None, reset_bn=False,
                             progress=False)
    with torch.no_grad():
        for out, model in zip(merged(x), (a, b, c)):
            assert rel_err(out, model(x)) < 1e-5
    with pytest.raises(InputError, match=r"\[1, 3\]"):
        fxzip.merge_all([a, b, c], x, width=3.5, progress=False)


def test_merged_size_rounds_half_up_within_bounds():
    assert merged_size(16, 1.0, 2) == 16
    assert merged_size(16, 1.25, 2) == 20
    assert merged_size(10, 1.25, 2) == 13  # 12.5 rounds up
    assert merged_size(16, 2.0, 2) == 32
    assert check_width({"layer1": 1}, 2) == {"layer1": 1.0}
    assert check_width(2, 3) == 2.0
