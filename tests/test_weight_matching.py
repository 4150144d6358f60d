"""method="weights": Git Re-Basin weight matching (`fxzip.matching.weights`). Permuted self-merges
come back exactly at every stop point (a ResNet, an MLP, a timm ViT with attention heads, grouped
and depthwise convolutions, a decoder with grouped-query attention and rotary slots), the merge
reads no calibration batch, the matching is deterministic and beats the identity and random
permutations on its objective, and the options it cannot take are clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxzip
from fxzip.errors import InputError, MatchingError, RecipeError
from fxzip.io.recipe import check_merge_options
from fxzip.matching import METHODS, Match, match_features
from fxzip.matching.weights import weight_matching, weight_objective
from fxzip.options import MergeOptions
from permute_util import as_trained_timm, rel_err, small_resnet
from fxzip.testing import permuted_copy

pytestmark = pytest.mark.filterwarnings("ignore::fxzip.CalibrationWarning")

PLAIN = dict(reset_bn=False, corrections=None, progress=False)


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.LayerNorm(12),
                         nn.ReLU(), nn.Linear(12, 3)).eval()


class _Grouped(nn.Module):
    """A grouped convolution (4 groups) and a depthwise one, with BatchNorms."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.g, self.b2 = nn.Conv2d(16, 24, 3, padding=1, groups=4), nn.BatchNorm2d(24)
        self.dw, self.b3 = nn.Conv2d(24, 24, 3, padding=1, groups=24), nn.BatchNorm2d(24)
        self.pw = nn.Conv2d(24, 8, 1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.g(x)))
        x = torch.relu(self.b3(self.dw(x)))
        return self.fc(self.pw(x).flatten(1))


def _grouped(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = _Grouped().train()
    with torch.no_grad():
        model(torch.randn(32, 3, 4, 4))
    return model.eval()


def _vit() -> tuple[nn.Module, torch.Tensor]:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                              num_classes=5).eval()
    x = torch.randn(4, 3, 32, 32)
    return as_trained_timm(model, x), x


def _assert_exact_at(model: nn.Module, x, stops) -> None:
    """`model` merged by weight matching with its permuted copy gives its outputs back at every
    stop point in `stops` (and the matching reads the weights only: one match for all)."""
    other, count = permuted_copy(model, x, seed=1)
    assert count >= 2
    zipper = fxzip.Zipper([model, other], x, **PLAIN)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(other(x), ref, rtol=1e-4, atol=1e-5)
    for stop in stops:
        merged = zipper.merge(stop, method="weights")
        with torch.no_grad():
            outs = merged(x)
        assert len(outs) == 2
        for out in outs:
            assert rel_err(out, ref) < 1e-5, (stop, rel_err(out, ref))
    assert "statistics" not in zipper.seconds


def _some_stops(model: nn.Module, x, count: int = 3) -> list:
    points = fxzip.analyze(model, x).stop_points
    picks = np.linspace(1, len(points) - 2, count).round().astype(int)
    return [None] + [points[i] for i in picks]


# -- 1. exact permuted self-merges -------------------------------------------------------------

def test_small_resnet_permuted_self_merge_is_exact_at_every_stop_point():
    model, x = small_resnet(0), torch.randn(8, 1, 8, 8)
    _assert_exact_at(model, x, _some_stops(model, x, 4) + ["layer2"])


def test_mlp_permuted_self_merge_is_exact_at_every_stop_point():
    model, x = _mlp(0), torch.randn(8, 6)
    _assert_exact_at(model, x, [None, *fxzip.analyze(model, x).stop_points[1:-1]])


def test_shared_output_and_extending_a_merged_model_are_exact():
    """Output spaces stay in place (shared_output averages them unpermuted), and a merged model
    extended by a third permuted copy gives the model back too."""
    model, x = _mlp(0), torch.randn(8, 6)
    other, third = (permuted_copy(model, x, seed=s)[0] for s in (1, 2))
    shared = fxzip.merge(model, other, x, method="weights", shared_output=True, **PLAIN)
    merged = fxzip.merge(model, other, x, method="weights", **PLAIN)
    extended = fxzip.merge(merged, third, x, method="weights", **PLAIN)
    with torch.no_grad():
        ref = model(x)
        assert rel_err(shared(x), ref) < 1e-5
        outs = extended(x)
    assert len(outs) == 3 and all(rel_err(out, ref) < 1e-5 for out in outs)


def test_timm_vit_heads_permuted_self_merge_is_exact():
    model, x = _vit()
    analysis = fxzip.analyze(model, x)
    assert analysis.head_groups  # heads are permuted whole, features within them too
    _assert_exact_at(model, x, [None, "blocks.0", "blocks.1.attn", "blocks.1.norm2"])


def test_grouped_and_depthwise_convolutions_permuted_self_merge_is_exact():
    model, x = _grouped(0), torch.randn(8, 3, 4, 4)
    assert any(g.kind == "grouped convolution" for g in fxzip.analyze(model, x).head_groups)
    _assert_exact_at(model, x, [None, "b2", "dw", "pw"])


def test_grouped_query_decoder_with_rotary_slots_permuted_self_merge_is_exact():
    from test_decoder import TinyDecoder

    torch.manual_seed(0)
    model = TinyDecoder(kv_heads=2).eval()
    ids = torch.randint(0, 50, (8, 16))
    _assert_exact_at(model, ids, [None])


def test_three_models_each_matched_to_the_first():
    """N > 2: every model is matched to model 0 on its own; two permuted copies come back."""
    model, x = small_resnet(0), torch.randn(8, 1, 8, 8)
    copies = [permuted_copy(model, x, seed=s)[0] for s in (1, 2)]
    merged = fxzip.merge_all([model, *copies], x, method="weights", **PLAIN)
    with torch.no_grad():
        ref = model(x)
        outs = merged(x)
    assert len(outs) == 3
    for out in outs:
        assert rel_err(out, ref) < 1e-5


# -- 2. no data read ---------------------------------------------------------------------------

class _CountingBatches:
    """A re-iterable of batches that counts how often it is iterated and how many batches it
    gives."""

    def __init__(self, batches):
        self.batches, self.iterations, self.given = batches, 0, 0

    def __iter__(self):
        self.iterations += 1
        for b in self.batches:
            self.given += 1
            yield b


def test_weight_matching_reads_no_batch_beyond_the_tracing_example():
    a, b = small_resnet(0), small_resnet(1)
    data = _CountingBatches([torch.randn(8, 1, 8, 8) for _ in range(5)])
    zipper = fxzip.Zipper([a, b], data, **PLAIN)
    assert (data.iterations, data.given) == (1, 1)  # the example that traces the models
    merged = zipper.merge(method="weights")
    zipper.merge("layer2", method="weights")
    assert (data.iterations, data.given) == (1, 1)
    assert "statistics" not in merged.fxzip_report.seconds
    merged = fxzip.merge(a, b, data, method="weights", **PLAIN)
    assert (data.iterations, data.given) == (2, 2)
    with torch.no_grad():
        assert len(merged(torch.randn(2, 1, 8, 8))) == 2
    assert not METHODS["weights"].needs_statistics


# -- 3. determinism and the objective ---------------------------------------------------------

def _two_models(seed: int = 0):
    x = torch.randn(8, 1, 8, 8)
    zipper = fxzip.Zipper([small_resnet(seed), small_resnet(seed + 1)], x, **PLAIN)
    return zipper.graphs, zipper.analysis, zipper.pairing


def _random_matches(analysis, rng) -> dict[int, Match]:
    out = {}
    for s, space in analysis.spaces.items():
        if not space.pinned and s not in analysis.output_spaces():
            perm = rng.permutation(space.size)
            out[s] = Match.from_assign([np.arange(space.size), perm], space.size)
    return out


def test_same_seed_same_matches_and_the_objective_beats_identity_and_random():
    graphs, analysis, pairing = _two_models()
    first = weight_matching(graphs, analysis, pairing, seed=3)
    again = weight_matching(graphs, analysis, pairing, seed=3)
    assert first.keys() == again.keys() and all(first[s] == again[s] for s in first)
    moved = [s for s, m in first.items() if not np.array_equal(m.assign[1], np.arange(m.size))]
    assert moved  # independent models are not aligned as they are
    found = weight_objective(graphs, analysis, pairing, first)
    identity = weight_objective(graphs, analysis, pairing, {})
    rng = np.random.default_rng(0)
    randoms = [weight_objective(graphs, analysis, pairing, _random_matches(analysis, rng))
               for _ in range(5)]
    assert found > identity
    assert all(found > r for r in randoms), (found, randoms)
    other = weight_objective(graphs, analysis, pairing,
                             weight_matching(graphs, analysis, pairing, seed=4))
    assert other > identity  # another order of the spaces: another local optimum, also better


def test_weight_objective_of_a_permuted_copy_is_largest_at_the_true_alignment():
    """The objective's maximum over permutations is Σ‖W‖² (Cauchy–Schwarz), which weight
    matching reaches on a permuted copy; the identity gets less."""
    model, x = small_resnet(0), torch.randn(8, 1, 8, 8)
    other, _ = permuted_copy(model, x, seed=1)
    zipper = fxzip.Zipper([model, other], x, **PLAIN)
    z = (zipper.graphs, zipper.analysis, zipper.pairing)
    found = weight_objective(*z, weight_matching(*z))
    self_zipper = fxzip.Zipper([model, model], x, **PLAIN)
    best = weight_objective(self_zipper.graphs, self_zipper.analysis, self_zipper.pairing, {})
    assert found == pytest.approx(best, rel=1e-6)
    assert weight_objective(*z, {}) < best


# -- 4. errors ----------------------------------------------------------------------------------

def test_width_above_one_is_an_input_error():
    model, x = _mlp(0), torch.randn(8, 6)
    with pytest.raises(InputError, match="method 'weights' does not do"):
        fxzip.merge(model, _mlp(1), x, method="weights", width=1.5, **PLAIN)
    with pytest.raises(InputError, match="'weights' does not do"):
        MergeOptions(method="weights", width={"*": 2.0}).checked_width(2)


def test_weights_matches_no_single_correlation_matrix():
    with pytest.raises(MatchingError, match="every space of the models at once"):
        match_features(None, [4, 4], "weights")


def test_weights_is_a_method_name_everywhere():
    assert METHODS["weights"].joint and not METHODS["weights"].widens
    assert MergeOptions(method="weights").method == "weights"
    assert check_merge_options({"method": "weights"}) == {"method": "weights"}
    with pytest.raises(RecipeError, match="method 'weights' does not do"):
        check_merge_options({"method": "weights", "width": 1.5}, 2)
    with pytest.raises(MatchingError, match="at least 2 models"):
        graphs, analysis, pairing = _two_models()
        weight_matching(graphs[:1], analysis, pairing)
