"""Bad input gets a clear fxzip error that says what is wrong and what to do."""
import copy

import pytest
import torch
import torch.nn as nn

import fxzip


def mlp(hidden=8, inputs=4):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, 3)).eval()


X = torch.randn(16, 4)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


class ChannelRoll(nn.Module):
    """A cyclic shift of the channels: feature j lands in feature j+1's place, which no
    permutation of the features can follow (a barrier)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.roll(self.fc1(x), 1, dims=-1))


def test_different_widths():
    with pytest.raises(fxzip.ArchitectureMismatchError, match="differ at node"):
        fxzip.merge(mlp(8), mlp(9), X, progress=False)


def test_different_architectures():
    other = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    with pytest.raises(fxzip.ArchitectureMismatchError, match="architecture"):
        fxzip.merge(mlp(), other, X, progress=False)


def test_untraceable_model():
    with pytest.raises(fxzip.TraceError, match="data-dependent control flow"):
        fxzip.merge(DataDependent(), DataDependent(), X, progress=False)


def test_unknown_stop_point_lists_valid_ones():
    with pytest.raises(fxzip.StopPointError, match="names no node") as err:
        fxzip.merge(mlp(), mlp(), X, stop_at="layer9", progress=False)
    assert "fxzip.analyze" in str(err.value)


def test_stop_point_past_a_barrier_names_it():
    with pytest.raises(fxzip.StopPointError, match="roll") as err:
        fxzip.merge(ChannelRoll(), ChannelRoll(), X, stop_at="fc2", progress=False)
    assert "channel axis" in str(err.value)
    report = fxzip.analyze(ChannelRoll(), X)
    assert [b.node for b in report.barriers] == ["roll"]
    assert "fc1" in report.stop_points and "fc2" not in report.stop_points


def test_full_zip_stops_before_a_barrier():
    merged = fxzip.merge(ChannelRoll(), ChannelRoll(), X, progress=False)
    assert merged.fxzip_report.layers_zipped == 1


@pytest.mark.parametrize("stop_at", [-1, 3, 2.5, True])
def test_bad_layer_counts(stop_at):
    with pytest.raises(fxzip.StopPointError):
        fxzip.merge(mlp(), mlp(), X, stop_at=stop_at, progress=False)


@pytest.mark.parametrize("inputs", [[], None, iter([]), torch.empty(0, 4)])
def test_empty_inputs(inputs):
    with pytest.raises(fxzip.InputError):
        fxzip.merge(mlp(), mlp(), inputs, progress=False)


def test_inputs_of_the_wrong_shape():
    with pytest.raises(fxzip.InputError, match="shape"):
        fxzip.merge(mlp(), mlp(), torch.randn(16, 5), progress=False)


def test_later_batch_of_the_wrong_shape():
    with pytest.raises(fxzip.InputError, match="batch 1"):
        fxzip.merge(mlp(), mlp(), [X, torch.randn(16, 5)], progress=False)


def test_inputs_that_are_not_tensors():
    with pytest.raises(fxzip.InputError, match="not a tensor"):
        fxzip.merge(mlp(), mlp(), [[1.0, 2.0]], progress=False)


def test_non_finite_activations():
    bad = mlp()
    with torch.no_grad():
        bad[0].weight[0, 0] = float("nan")
    with pytest.raises(fxzip.NonFiniteError, match="NaN/Inf"):
        fxzip.merge(bad, mlp(), X, progress=False)


def test_fewer_than_two_models():
    with pytest.raises(fxzip.InputError, match="at least two"):
        fxzip.merge_all([mlp()], X, progress=False)
    with pytest.raises(fxzip.InputError, match="not a torch.nn.Module"):
        fxzip.merge(mlp(), None, X, progress=False)


def test_unknown_method():
    with pytest.raises(fxzip.InputError, match="unknown method"):
        fxzip.merge(mlp(), mlp(), X, method="magic", progress=False)


def test_errors_are_fxzip_errors():
    assert issubclass(fxzip.StopPointError, fxzip.FxzipError)
    assert issubclass(fxzip.FxzipError, Exception)


def test_inputs_are_not_mutated_and_generators_are_read_twice():
    a, b = mlp(), mlp()
    b.train()
    before = [copy.deepcopy(m.state_dict()) for m in (a, b)]
    merged = fxzip.merge(a, b, (x for x in [X, X * 2]), progress=False)
    for m, state in zip((a, b), before):
        for key, value in m.state_dict().items():
            assert torch.equal(value, state[key]), key
    assert not a.training and b.training
    out_a, out_b = merged(X)
    assert out_a.shape == out_b.shape == (16, 3)


def test_container_module_stop_point_means_its_output():
    from fxzip.demo.digits import ResNet20
    torch.manual_seed(0)
    model = ResNet20(width=1).eval()
    analysis = fxzip.analyze(model, torch.randn(2, 1, 8, 8))
    assert analysis.resolve_stop("layer2") == "relu_12"  # the block's final ReLU, after the add
    assert analysis.resolve_stop("layer2.0.conv1") == "layer2_0_conv1"
    trunk = analysis.trunk("layer2")
    assert analysis.layers_in(trunk) == 1 + 6 + 6 + 1  # stem, layer1, layer2 with its projection


# -- option values ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, needle", [
    ({"beta": 3.0}, "beta must be in [0, 1]"),
    ({"beta": -0.1}, "beta must be in [0, 1]"),
    ({"beta": float("nan")}, "beta must be a finite number"),
    ({"alpha": 0.0}, "alpha must be in (0, 1]"),
    ({"alpha": 1.5}, "alpha must be in (0, 1]"),
    ({"alpha": "0.5"}, "alpha must be a finite number"),
    ({"method": "zip"}, "unknown method 'zip'"),
    ({"method": 3}, "unknown method 3"),
    ({"corrections": "refit"}, "corrections='refit' is not allowed"),
    ({"corrections": True}, "corrections=True is not allowed"),
    ({"weight_similarity": 2.0}, "weight_similarity must be in [0, 1]"),
    ({"weight_similarity": -1}, "weight_similarity must be in [0, 1]"),
    ({"reset_bn": "yes"}, "reset_bn must be True or False"),
    ({"shared_output": 1}, "shared_output must be True or False"),
])
def test_bad_option_values(kwargs, needle):
    a = mlp()
    for call in (lambda: fxzip.merge(a, copy.deepcopy(a), X, progress=False, **kwargs),
                 lambda: fxzip.merge_all([a, copy.deepcopy(a)], X, progress=False, **kwargs),
                 lambda: fxzip.Zipper([a, copy.deepcopy(a)], X, progress=False).merge(**kwargs)):
        with pytest.raises(fxzip.InputError) as info:
            call()
        assert needle in str(info.value)


def test_bad_corrections_options_are_fxzip_errors():
    with pytest.raises(fxzip.InputError, match="refit_heads"):
        fxzip.Corrections(refit_heads="middle")
    with pytest.raises(fxzip.InputError, match="ridge"):
        fxzip.Corrections(ridge=0)


def test_the_option_range_edges_are_accepted():
    a = mlp()
    for kwargs in ({"alpha": 1.0, "beta": 0.0}, {"beta": 1.0, "weight_similarity": 1.0},
                   {"corrections": "none", "weight_similarity": 0}, {"corrections": None},
                   {"corrections": fxzip.Corrections(refit_heads="all", repair=True)}):
        outs = fxzip.merge(a, copy.deepcopy(a), X, progress=False, **kwargs)(X)
        assert len(outs) == 2


def test_corrections_as_a_mapping_and_in_recipes():
    from fxzip.io.recipe import check_merge_options

    a = mlp()
    merged = fxzip.merge(a, copy.deepcopy(a), X, progress=False,
                         corrections={"refit_heads": "all", "repair": True})
    assert merged.fxzip_report.settings["corrections"]["refit_heads"] == "all"
    with pytest.raises(fxzip.InputError, match="unknown field"):
        fxzip.merge(a, copy.deepcopy(a), X, progress=False, corrections={"refit": True})
    for value in ("default", "none", None, {"repair": True}):
        assert check_merge_options({"corrections": value}) == {"corrections": value}
    with pytest.raises(fxzip.RecipeError, match="merge.corrections"):
        check_merge_options({"corrections": 3})

