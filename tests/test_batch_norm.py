"""One BatchNorm re-estimation (`fxzip.corrections.batch_norm`): `fxzip.reset_bn` and the corrections
pass with no layer corrected write the same running statistics where a BatchNorm's inputs are the
same either way, both the mean over batches of the per-batch means and unbiased variances (by
hand), and `reset_bn` still gives what torch's cumulative average (train mode, momentum=None) gave,
to the last bit.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxzip
from fxzip.corrections import Corrections, correct
from fxzip.corrections.batch_norm import BatchNormStatistics

pytestmark = pytest.mark.filterwarnings("ignore::fxzip.errors.CalibrationWarning")


class TwoNorms(nn.Module):
    """conv → BN → relu → conv → BN → (BN without running statistics) → pool → linear."""

    def __init__(self, width: int = 6, out: int = 4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, width, 3, padding=1), nn.BatchNorm2d(width, momentum=0.3)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.free = nn.BatchNorm2d(width, track_running_stats=False)
        self.fc = nn.Linear(width, out)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.free(self.bn2(self.conv2(x))))
        return self.fc(x.mean((2, 3)))


def _batches(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 2, 6, 6, generator=g) * 3 + 1 for n in (7, 12, 5, 9)]  # unequal sizes


def _by_hand(inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean over batches of each batch's per-channel mean and unbiased variance (float64)."""
    means = torch.stack([x.double().mean((0, 2, 3)) for x in inputs])
    variances = torch.stack([x.double().var((0, 2, 3), unbiased=True) for x in inputs])
    return means.mean(0), variances.mean(0)


def _torch_cumulative(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    """The former `reset_bn`: BatchNorms reset, momentum=None (torch's cumulative average), train
    mode, one forward pass over the batches."""
    model = copy.deepcopy(model).eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            m.reset_running_stats()
            m.momentum = None
            m.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    return model.eval()


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-6) -> bool:
    a, b = a.double(), b.double()
    return float((a - b).abs().max()) <= rel * float(b.abs().max())


def test_reset_bn_is_the_average_of_batch_statistics_as_torch_computed_it():
    torch.manual_seed(0)
    model = TwoNorms().eval()
    batches = _batches()
    reference = _torch_cumulative(model, batches)
    reset = fxzip.reset_bn(copy.deepcopy(model), batches, progress=False)
    assert not reset.training and not any(m.training for m in reset.modules())
    assert reset.bn1.momentum == 0.3 and reset.bn2.momentum == 0.1  # restored
    assert reset.free.running_mean is None  # no running statistics: left alone
    with torch.no_grad():  # the first BN reads conv1's output either way: by hand
        mean, var = _by_hand([model.conv1(x) for x in batches])
    assert _close(reset.bn1.running_mean, mean) and _close(reset.bn1.running_var, var)
    for name in ("bn1", "bn2"):  # bn2 reads inputs normalised by bn1's batch statistics
        ours, torchs = getattr(reset, name), getattr(reference, name)  # torch's own update: exact
        assert torch.equal(ours.running_mean, torchs.running_mean), name
        assert torch.equal(ours.running_var, torchs.running_var), name
        assert int(ours.num_batches_tracked) == int(torchs.num_batches_tracked) == len(batches)
    # the statistics moved far from the reset ones (mean 0, variance 1): the check can fail
    assert float(reset.bn1.running_var.min()) > 1.5


def test_corrections_pass_and_reset_bn_write_the_same_statistics():
    """A merged model's first BatchNorm reads the merged stem conv's output in both paths."""
    torch.manual_seed(1)
    models = [TwoNorms().eval(), TwoNorms().eval()]
    batches = _batches(1)
    zipper = fxzip.Zipper(models, batches, progress=False)
    merged = zipper.merge(None, reset_bn=False, corrections=None)
    trunk = zipper.analysis.trunk(None)
    matches = {s: zipper.match(s, "zipit", 0.5, 1.0) for s in zipper.analysis.spaces_of(trunk)}
    first = next(n for n in merged.graph.nodes if n.op == "call_module"
                 and isinstance(merged.get_submodule(n.target), nn.BatchNorm2d))
    conv = merged.get_submodule(first.args[0].target)
    with torch.no_grad():
        mean, var = _by_hand([conv(x) for x in batches])

    reset = fxzip.reset_bn(copy.deepcopy(merged), batches, progress=False)
    corrected = copy.deepcopy(merged)
    options = Corrections(refit_trunk=False, refit_heads="none", repair=False)
    assert not options.active  # a BatchNorm reset only
    report = correct(corrected, zipper.graphs, zipper.analysis, matches, batches, options)
    assert not report.refitted and not report.repaired
    a, b = reset.get_submodule(first.target), corrected.get_submodule(first.target)
    assert _close(a.running_mean, b.running_mean) and _close(a.running_var, b.running_var)
    assert _close(a.running_mean, mean) and _close(a.running_var, var)
    assert _close(b.running_mean, mean) and _close(b.running_var, var)
    assert int(a.num_batches_tracked) == int(b.num_batches_tracked) == len(batches)
    before = merged.get_submodule(first.target)
    assert not _close(before.running_var, var, rel=1e-2)  # the merge alone did not set them


def test_accumulator_weighs_batches_equally_and_skips_no_batch():
    stats = BatchNormStatistics(3)
    assert stats.mean_var() is None
    bn = nn.BatchNorm1d(3)
    bn.running_mean.fill_(5.0)
    stats.write(bn)  # no batch: nothing written
    assert torch.equal(bn.running_mean, torch.full((3,), 5.0))
    small = torch.tensor([[0.0, 1.0, 2.0], [2.0, 3.0, 6.0]])  # means 1, 2, 4; variances 2, 2, 8
    large = torch.full((10, 3), 3.0)  # means 3; variances 0
    stats.add(small)
    stats.add(large)
    stats.write(bn)
    assert torch.allclose(bn.running_mean, torch.tensor([2.0, 2.5, 3.5]))
    assert torch.allclose(bn.running_var, torch.tensor([1.0, 1.0, 4.0]))
    assert int(bn.num_batches_tracked) == 2
