"""timm layers that used to stop zipping, in small plain-torch models: weight standardisation
(NF-Nets' ScaledStdConv2d, BiT's StdConv2d), split attention (ResNeSt's radix groups), selective
kernels (SKNet) and ECA's channel convolution. Each zips to the output layer and merges a copy
whose every space is permuted (the analysis's own oracle) back exactly."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxzip
from fxzip.rules.shapes import reshape_axes
from fxzip.rules.layout import MIXED, Flat
from permute_util import assert_self_merge_exact

timm_layers = pytest.importorskip("timm.layers")


class _Net(nn.Module):
    """stem conv -> `body` (a residual block when `residual`) -> pool -> Linear."""

    def __init__(self, body: nn.Module, width: int = 16, residual: bool = True,
                 stem: nn.Module | None = None):
        super().__init__()
        self.stem = stem or nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width),
                                          nn.ReLU())
        self.body, self.residual = body, residual
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.body(x) if self.residual else self.body(x)
        return self.head(x.mean((2, 3)))


def _weight_standardised():
    std = timm_layers.std_conv
    stem = nn.Sequential(std.ScaledStdConv2d(3, 16, 3, padding=1), nn.SiLU())
    body = nn.Sequential(std.ScaledStdConv2d(16, 32, 1), nn.SiLU(),
                         std.ScaledStdConv2d(32, 32, 3, padding=1, groups=4), nn.SiLU(),
                         std.StdConv2d(32, 16, 1))
    return _Net(body, stem=stem)


def _split_attention():  # ResNeSt: radix 2, a grouped conv of 2 groups, softmax over the radix
    body = nn.Sequential(nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
                         timm_layers.SplitAttn(16, 16, radix=2, norm_layer=nn.BatchNorm2d),
                         nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16))
    return _Net(body)


def _selective_kernel():  # SKNet: two kernel paths stacked, softmax over the paths
    body = nn.Sequential(timm_layers.SelectiveKernel(16, 16, rd_channels=8),
                         nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16))
    return _Net(body)


def _eca():  # ECA: a Conv1d sliding along the pooled channels gates them
    body = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                         nn.Conv2d(24, 16, 1), nn.BatchNorm2d(16),
                         timm_layers.EcaModule(16, kernel_size=3))
    return _Net(body)


# name: (builder, number of layers before the output Linear, all zipped)
MODELS = {
    "weight standardisation": (_weight_standardised, 4),
    "split attention (radix)": (_split_attention, 6),
    "selective kernel": (_selective_kernel, 6),
    "eca": (_eca, 4),
}


@pytest.mark.filterwarnings("ignore::fxzip.errors.CalibrationWarning")  # tiny inputs, on purpose
@pytest.mark.parametrize("name", sorted(MODELS))
def test_zips_to_the_output_and_merges_its_permuted_copy_exactly(name):
    build, layers = MODELS[name]
    torch.manual_seed(0)
    x = torch.randn(32, 3, 8, 8)
    model = fxzip.reset_bn(build(), x, progress=False)
    analysis = fxzip.analyze(model, x)
    assert not analysis.barriers, analysis.barriers
    stops = set(analysis.stop_points)
    assert len(analysis.all_layers) == layers + 1  # + the output Linear
    assert all(n in stops for n in analysis.all_layers)
    assert_self_merge_exact(model, x, False, name)


def test_weight_standardisation_ties_the_gain_and_both_weight_axes():
    torch.manual_seed(0)
    model = _weight_standardised().eval()
    analysis = fxzip.analyze(model, torch.randn(2, 3, 8, 8))
    uses = {(u.target, u.axis): u for us in analysis.param_uses.values() for u in us}
    conv = "body.0"  # ScaledStdConv2d(16, 32, 1): rows merged, columns unmerged, gain merged
    assert uses[(f"{conv}.weight", 0)].role == "M"
    assert uses[(f"{conv}.weight", 1)].role == "U"
    assert uses[(f"{conv}.gain", 0)].role == "M"
    assert uses[(f"{conv}.weight", 0)].feat.blocks == uses[(f"{conv}.gain", 0)].feat.blocks


def test_radix_groups_hold_one_space():
    """The split-attention conv's 2·16 outputs are two blocks of ONE space (summed and
    softmax-ed element by element over the radix); its 16 inputs two spaces (its groups)."""
    torch.manual_seed(0)
    model = _split_attention().eval()
    analysis = fxzip.analyze(model, torch.randn(2, 3, 8, 8))
    out = next(u for u in analysis.param_uses["body.3.conv"] if u.param == "weight" and u.axis == 0)
    inp = next(u for u in analysis.param_uses["body.3.conv"] if u.param == "weight" and u.axis == 1)
    assert [b.size for b in out.feat.blocks] == [16, 16]
    assert out.feat.blocks[0].space == out.feat.blocks[1].space
    assert [b.size for b in inp.feat.blocks] == [8, 8]
    assert inp.feat.blocks[0].space != inp.feat.blocks[1].space


def test_eca_pins_the_space_it_slides_over():
    torch.manual_seed(0)
    model = _eca().eval()
    analysis = fxzip.analyze(model, torch.randn(2, 3, 8, 8))
    def space(target: str):
        use = next(u for u in analysis.param_uses[target] if u.param == "weight" and u.axis == 0)
        return analysis.spaces[use.feat.blocks[0].space]
    assert space("body.3").pinned  # gated by ECA
    assert space("stem.0").pinned  # the same residual stream
    assert not space("body.0").pinned  # the bottleneck's inner space is matched as usual


def test_reshape_labels_flattened_axes_and_gives_them_back():
    flat = reshape_axes((0, 1, 2, 3), (8, 4, 3, 3), (1, 8, 36))
    assert flat == [None, 0, Flat(((1, 4), (2, 3), (3, 3)))]
    assert reshape_axes(tuple(flat), (1, 8, 36), (8, 4, 3, 3)) == [0, 1, 2, 3]
    assert reshape_axes(tuple(flat), (1, 8, 36), (8, 6, 6)) == [0, MIXED, MIXED]


class _CachesInEval(nn.Module):
    """As TinyViT's and LeViT's attention: a table computed from a parameter, cached in eval mode."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(4, 4))
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x):
        if self.training:
            return x @ self.table.t()
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.table.t() * 1.0
        return x @ self.cache[key]


def test_counting_flops_leaves_no_fake_tensor_in_a_models_cache():
    """The FLOP count runs on fake tensors; a table the model caches meanwhile must not stay in
    the model (its later real forwards would give fake tensors: .item() fails)."""
    from fxzip.runtime.costs import count_flops

    torch.manual_seed(0)
    model = _CachesInEval().eval()
    x = torch.randn(3, 4)
    assert count_flops(model, x, per_sample=False) == 2 * 3 * 4 * 4
    assert not model.cache
    out = model(x)
    assert type(out) is torch.Tensor
    torch.testing.assert_close(out, x @ model.table.t())


def test_per_sample_flops_run_for_real_only_where_nothing_changes(monkeypatch):
    """One sample of a model in eval mode is counted on real tensors, a model in training mode on
    fake ones (a real forward would move its BatchNorm statistics): the same counts either way,
    and the training-mode model's running statistics and batch count are untouched."""
    from fxzip.runtime import costs

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 5))
    x = torch.randn(4, 3, 6, 6)
    expected = 2 * (8 * 3 * 9 * 16) + 2 * (8 * 16 * 5)  # conv and linear multiply-adds, 1 sample
    fake_runs = []
    fake = costs._count_on_fake_tensors
    monkeypatch.setattr(costs, "_count_on_fake_tensors",
                        lambda *args: fake_runs.append(1) or fake(*args))
    assert costs.count_flops(model.eval(), x) == expected and not fake_runs
    before = model[1].running_mean.clone(), int(model[1].num_batches_tracked)
    assert costs.count_flops(model.train(), x) == expected and fake_runs == [1]
    assert torch.equal(model[1].running_mean, before[0])
    assert int(model[1].num_batches_tracked) == before[1]
