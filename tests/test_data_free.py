"""Data-free merges: `fxzip.merge(a, b, None, example_inputs=x)` reads no real sample (the example
gives only shapes). Checked with a model and a PERMUTED copy of it: the weight matching alone and
the whole data-free default (synthesised inputs, BN reset, corrections toward the parents as
given) give the model back; the synthesised inputs bring each BatchNorm's input statistics toward
its running statistics, deterministically; the models are not changed; bad input is a clear
error."""
from __future__ import annotations

import copy

import pytest
import torch

import fxzip
from fxzip.errors import InputError
from fxzip.runtime.synthetic_inputs import SyntheticBatches, batch_norms, synthesize_batch
from permute_util import rel_err, small_resnet
from fxzip.testing import permuted_copy

pytestmark = pytest.mark.filterwarnings("ignore::fxzip.CalibrationWarning")

FEW = fxzip.Synthesis(samples=512, batch_size=128, steps=3)


def _pair():
    model = small_resnet(0)
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    other, count = permuted_copy(model, x, seed=1)
    assert count >= 1
    return model, other, x


def test_weights_only_merge_reads_and_makes_nothing():
    model, other, x = _pair()
    merged = fxzip.merge(model, other, None, example_inputs=torch.zeros(2, 1, 8, 8),
                         reset_bn=False, corrections=None, progress=False)
    assert merged.fxzip_report.method == "weights"  # the data-free default method
    assert merged.fxzip_report.calibration["synthesized"] is False
    with torch.no_grad():
        ref = model(x)
        assert all(rel_err(out, ref) < 1e-5 for out in merged(x))


def test_data_free_default_merge_of_a_permuted_copy_is_exact():
    """Synthesised inputs, merged BatchNorms reset, every layer refitted toward the parents with
    their own statistics: a permuted copy still comes back (on inputs the merge never saw)."""
    model, other, x = _pair()
    state = copy.deepcopy(model.state_dict())
    merged = fxzip.merge(model, other, None, example_inputs=x[:2], synthesis=FEW, progress=False)
    report = merged.fxzip_report
    assert report.calibration["synthesized"] is True
    assert report.calibration["models_matched"] == 2
    assert report.corrections is not None and report.corrections.refitted
    assert "synthesis" in report.seconds
    with torch.no_grad():
        ref = model(x)
        assert all(rel_err(out, ref) < 1e-4 for out in merged(x))
    for key, value in model.state_dict().items():  # the user's model untouched
        assert torch.equal(value, state[key]), key
    assert not model.training


def _statistics_gap(model, x) -> float:
    """Mean over BatchNorms of |batch mean - running mean| + |batch var - running var| (norms)."""
    gaps = []

    def hook(module, args):
        v = args[0]
        dims = [0, *range(2, v.dim())]
        gaps.append(float((v.mean(dims) - module.running_mean).norm()
                          + (v.var(dims, unbiased=False) - module.running_var).norm()))

    hooks = [m.register_forward_pre_hook(hook) for m in batch_norms(model)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return sum(gaps) / len(gaps)


def test_synthesis_matches_batch_norm_statistics_deterministically():
    """BatchNorm statistics estimated on data unlike the noise (mean 1, std 3): the synthesised
    inputs bring every BatchNorm's input statistics far closer to them."""
    model = small_resnet(0)
    data = 1.0 + 3.0 * torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    model = fxzip.reset_bn(model, data, progress=False)
    example = torch.zeros(2, 1, 8, 8)
    plain = dict(batch_size=64, class_loss=0.0)  # the BatchNorm term alone
    noise = synthesize_batch(model, example, fxzip.Synthesis(steps=0, **plain), 0)
    fitted = synthesize_batch(model, example, fxzip.Synthesis(steps=30, **plain), 0)
    again = synthesize_batch(model, example, fxzip.Synthesis(steps=30, **plain), 0)
    assert fitted.shape == (64, 1, 8, 8) and not fitted.requires_grad
    assert torch.equal(fitted, again)
    assert _statistics_gap(model, fitted) < 0.3 * _statistics_gap(model, noise)
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_the_class_term_makes_a_classifier_without_batch_norms_confident():
    """A LayerNorm MLP gives no statistics; the class term fits inputs it classifies confidently
    (mean top softmax probability well above the noise's; the LayerNorm bounds the logits of
    this untrained MLP, so not near 1)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.LayerNorm(32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 6)).eval()
    example = torch.zeros(2, 10)
    noise = synthesize_batch(model, example, fxzip.Synthesis(steps=0), 0)
    fitted = synthesize_batch(model, example, fxzip.Synthesis(steps=30), 0)
    with torch.no_grad():
        top = [float(model(x).softmax(1).max(1).values.mean()) for x in (noise, fitted)]
        classes = model(fitted).argmax(1)
    assert top[1] > top[0] + 0.08
    assert len(classes.unique()) == 6  # a random class per input: every class is made


def test_batches_alternate_models_and_split_into_the_last_size():
    a, b = small_resnet(0), small_resnet(1)
    batches = SyntheticBatches([a, b], torch.zeros(2, 1, 8, 8),
                               fxzip.Synthesis(samples=100, batch_size=64, steps=0), None)
    assert not batches.synthesized and len(batches) == 2
    sizes = [len(x) for x in batches]
    assert sizes == [64, 36] and batches.synthesized


def test_integer_and_dict_inputs_are_drawn_from_the_example_range():
    from fxzip.runtime.synthetic_inputs import _noise
    example = {"input_ids": torch.tensor([[3, 9, 5]]), "mask": torch.ones(1, 3, dtype=torch.bool),
               "scale": 2.0}
    batch = _noise(example, 16, torch.Generator().manual_seed(0))
    ids = batch["input_ids"]
    assert ids.shape == (16, 3) and int(ids.min()) >= 3 and int(ids.max()) <= 9
    assert len(ids.unique()) > 3
    assert bool(batch["mask"].all()) and batch["scale"] == 2.0


def test_errors():
    model, other, x = _pair()
    with pytest.raises(InputError, match="example_inputs"):
        fxzip.merge(model, other, None, progress=False)
    with pytest.raises(InputError, match="not both"):
        fxzip.merge(model, other, x, example_inputs=x, progress=False)
    with pytest.raises(InputError, match="samples"):
        fxzip.Synthesis(samples=0)
    with pytest.raises(InputError, match="lr"):
        fxzip.Synthesis(lr=0.0)
    with pytest.raises(InputError, match="unknown field"):
        fxzip.merge(model, other, None, example_inputs=x, synthesis={"step": 3}, progress=False)
    assert fxzip.MergeOptions(synthesis={"steps": 3}).synthesis_options.steps == 3
