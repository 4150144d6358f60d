"""The corrections with few calibration samples (`fxzip.Corrections`: `ridge_rows`, `min_rows`,
`bn_prior`).

* The rule itself: the relative ridge ``ridge + ridge_rows · d / rows``, no refit below
  ``min_rows · d`` rows, BatchNorm statistics weighted N / (N + bn_prior) against the given ones.
* Why: with fewer rows than inputs, the fixed ridge interpolates the calibration rows and fits
  their noise; the ridge that grows with d / rows predicts held-out rows better.
* A permuted self-merge stays exact on 2 and 4 images (every refit and blend is an identity
  there), and the report says which ridge each refit used and which refits were skipped.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

import fxzip
from fxzip.corrections import CorrectionReport, Corrections
from fxzip.corrections.batch_norm import BatchNormStatistics, batch_norm_statistics
from fxzip.corrections.regression import ridge_change
from fxzip.errors import InputError

try:
    from permute_util import permuted_by_analysis, rel_err, small_resnet
except ImportError:  # tests/ made a package
    from tests.permute_util import permuted_by_analysis, rel_err, small_resnet

pytestmark = pytest.mark.filterwarnings("ignore::fxzip.errors.CalibrationWarning")


def test_the_ridge_grows_with_inputs_per_row_and_small_fits_are_skipped():
    options = Corrections(ridge=1e-2, ridge_rows=0.5, min_rows=0.25)
    assert options.ridge_for(4096, 256) == pytest.approx(1e-2 + 0.5 * 256 / 4096)
    assert options.ridge_for(256, 256) == pytest.approx(0.51)
    assert options.ridge_for(64, 256) == pytest.approx(1e-2 + 2.0)  # exactly min_rows · d
    assert options.ridge_for(63, 256) is None  # fewer rows than min_rows · d: not refitted
    assert options.ridge_for(0, 256) is None
    assert Corrections(ridge_rows=0.0, min_rows=0.0).ridge_for(1, 10_000) == 1e-2  # the old rule


def test_the_defaults():
    """Chosen on the validation split (`benchmarks/results/scarce_data_validation.md`): the
    BatchNorm prior on (16 samples: weight 0.2 on 4 calibration samples, 0.98 on 1,000); the row
    rule off (its ridge and skips lost accuracy there)."""
    options = Corrections()
    assert options.bn_prior == 16.0 and options.ridge_rows == 0.0 and options.min_rows == 0.0
    assert options.bn_weight(4) == pytest.approx(0.2) and options.bn_weight(1024) > 0.98
    assert options.ridge_for(16, 2304) == options.ridge  # layer3 of ResNet-20×4 on 4 digits


def test_batch_norm_statistics_blend_toward_the_given_ones():
    options = Corrections(bn_prior=12.0)
    assert options.bn_weight(4) == pytest.approx(0.25)
    assert Corrections(bn_prior=0.0).bn_weight(4) == 1.0
    assert Corrections(bn_prior=math.inf).bn_weight(10 ** 6) == 0.0
    bn = nn.BatchNorm2d(3)
    bn.running_mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
    bn.running_var.copy_(torch.tensor([4.0, 4.0, 4.0]))
    stats = BatchNormStatistics(3)
    stats.add(torch.randn(5, 3, 2, 2, generator=torch.Generator().manual_seed(0)))
    mean, var = stats.mean.clone(), stats.var.clone()
    stats.toward(bn, 0.25)
    torch.testing.assert_close(stats.mean, 0.25 * mean + 0.75 * bn.running_mean)
    torch.testing.assert_close(stats.var, 0.25 * var + 0.75 * bn.running_var)


@pytest.mark.parametrize("kwargs", [dict(ridge_rows=-1.0), dict(ridge_rows=math.inf),
                                    dict(min_rows=True), dict(min_rows=float("nan")),
                                    dict(bn_prior=-1), dict(bn_prior="32")])
def test_bad_values_are_input_errors(kwargs):
    with pytest.raises(InputError, match=next(iter(kwargs))):
        Corrections(**kwargs)


def test_a_ridge_growing_with_inputs_per_row_predicts_held_out_rows_better():
    """What `ridge_rows` is for: a linear layer with 256 inputs refitted on 32 rows toward
    targets that hold noise (what a linear layer cannot reproduce) besides a map near its
    weights. The fixed ridge interpolates the rows and fits their noise: on 4,096 held-out rows
    its map is further from the targets' than the row-aware ridge's (which shrinks toward the
    merged weights)."""
    g = torch.Generator().manual_seed(0)
    d, width, rows = 256, 16, 32
    layer = nn.Linear(d, width, bias=False)
    true = layer.weight.detach() + 0.02 * torch.randn(width, d, generator=g)  # the target map
    x = torch.randn(rows, d, generator=g)
    t = x @ true.T + 0.5 * torch.randn(rows, width, generator=g)
    x_test = torch.randn(4096, d, generator=g).double()
    errors = {}
    for name, options in (("fixed", Corrections()), ("rule", Corrections(ridge_rows=0.5))):
        with torch.no_grad():
            delta, _, _ = ridge_change(layer, [x], [layer(x)], [t], [torch.rand(rows)],
                                       ridge=options.ridge_for(rows, d), max_rows=None,
                                       intercept=False)
            fitted = layer.weight.detach().double() + delta.T
            errors[name] = rel_err(x_test @ fitted.T, x_test @ true.double().T)
    assert errors["rule"] < 0.95 * errors["fixed"], errors


def blended_parent(model: nn.Module, x: torch.Tensor, weight: float, head: str) -> nn.Module:
    """A copy of `model` whose BatchNorms hold their statistics on `x` (eval-mode inputs, in graph
    order), those of the head (module names starting with `head`) blended with their given ones,
    `weight` on the new: the function the default merge's targets compute, so what a permuted
    self-merge must give back."""
    model = copy.deepcopy(model).eval()
    for name, bn in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]:
        seen = []
        hook = bn.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        with torch.no_grad():
            model(x)
        hook.remove()
        stats = batch_norm_statistics(seen, bn.num_features)
        stats.toward(bn, weight if name.startswith(head) else 1.0).write(bn)
    return model


@pytest.mark.parametrize("images", [2, 64])
@pytest.mark.parametrize("stop_at, head", [("layer1", ("layer2", "layer3")), ("layer2", "layer3")])
def test_permuted_self_merge_is_exact_on_a_few_images(images, stop_at, head):
    """The parents' BatchNorm statistics (from a random batch) differ from the calibration
    images': the heads' statistics are blended with their given ones, the zipped trunk's taken
    from the images alone, on both sides, so the self-merge gives back that parent exactly —
    neither the given model nor the BN-reset one."""
    model = small_resnet(0)
    x = torch.randn(images, 1, 8, 8, generator=torch.Generator().manual_seed(images))
    other, _ = permuted_by_analysis(model, x, seed=1)
    merged = fxzip.merge(model, other, x, stop_at=stop_at, progress=False)
    report = merged.fxzip_report.corrections
    weight = Corrections().bn_weight(images)
    assert report.refitted and report.bn_weight == pytest.approx(weight) and weight < 1
    with torch.no_grad():
        ref = blended_parent(model, x, weight, head)(x)
        for given in (model, fxzip.reset_bn(copy.deepcopy(model), x, progress=False)):
            assert rel_err(given(x), ref) > 1e-3  # the blend is not a no-op here
        for out in merged(x):
            assert rel_err(out, ref) < 1e-5


def test_the_prior_steadies_the_heads_on_two_images():
    """The parents' statistics come from 128 images of the distribution the calibration images
    are drawn from; re-estimated on 2 images they are noisy. A permuted self-merge at layer1 (the
    heads hold most BatchNorms) is compared with the given model on 256 held-out images: the
    heads blended with their given statistics are closer to it than the heads re-estimated
    alone."""
    model = small_resnet(0)
    g = torch.Generator().manual_seed(7)
    x, held_out = torch.randn(2, 1, 8, 8, generator=g), torch.randn(256, 1, 8, 8, generator=g)
    other, _ = permuted_by_analysis(model, x, seed=1)
    with torch.no_grad():
        ref = model(held_out)
    errors = {}
    for prior in (0.0, 16.0):
        merged = fxzip.merge(model, other, x, stop_at="layer1", progress=False,
                             corrections=Corrections(bn_prior=prior))
        with torch.no_grad():
            errors[prior] = max(rel_err(out, ref) for out in merged(held_out))
    assert errors[16.0] < 0.8 * errors[0.0], errors


def test_the_report_lists_ridges_and_skipped_refits():
    model = small_resnet(0)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    other = small_resnet(1)
    merged = fxzip.merge(model, other, x, progress=False,
                         corrections=Corrections(min_rows=4.0))
    report = merged.fxzip_report.corrections
    skipped = {k: v for k, v in report.skipped.items() if v.startswith("refit skipped")}
    assert skipped  # 2 images: layer3 (2 × 2 positions) has 8 rows for 144+ inputs
    assert not set(skipped) & set(report.refitted)
    assert "refit skipped" in str(report)
    back = CorrectionReport.from_dict(report.to_dict())
    assert back.ridges == pytest.approx(report.ridges) and back.skipped == report.skipped
