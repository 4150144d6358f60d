"""One options object (`fxzip.MergeOptions`): the keywords of `fxzip.merge` are its fields with its
defaults, a bad value names its option, and a `Zipper` built from options merges by them."""
import copy
import inspect

import pytest
import torch
import torch.nn as nn

import fxzip
from fxzip.options import DEFAULTS, PREPARE_OPTIONS, PYTHON_ONLY_OPTIONS

X = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                         nn.Linear(8, 3)).eval()


@pytest.mark.parametrize("function", [fxzip.merge, fxzip.merge_all])
def test_the_api_keywords_are_the_options_with_their_defaults(function):
    keywords = {name: p.default for name, p in inspect.signature(function).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert keywords.pop("example_inputs") is None  # data (a data-free merge's shapes), as inputs
    assert keywords == DEFAULTS


def test_recipes_take_every_option_but_the_python_objects():
    assert set(fxzip.MergeOptions.recipe_defaults()) == set(DEFAULTS) - set(PYTHON_ONLY_OPTIONS)
    assert {"progress", "leaf_modules", "concrete_args", "group"} == set(PYTHON_ONLY_OPTIONS)


def test_a_bad_value_names_its_option():
    with pytest.raises(fxzip.InputError, match=r"alpha must be in \(0, 1\]") as error:
        fxzip.MergeOptions(alpha=2)
    assert error.value.option == "alpha"
    with pytest.raises(fxzip.StopPointError) as error:
        fxzip.MergeOptions(stop_at=1.5)
    assert error.value.option == "stop_at"
    with pytest.raises(fxzip.InputError, match="unknown merge option") as error:
        fxzip.MergeOptions().replace(alhpa=0.3)
    with pytest.raises(fxzip.InputError, match="width=1.5 > 1") as error:
        fxzip.MergeOptions(method="average", width=1.5).checked_width(2)
    assert error.value.option == "width"
    options = fxzip.MergeOptions(alpha=1, beta=0)
    assert (options.alpha, options.beta) == (1.0, 0.0) and isinstance(options.alpha, float)
    assert options.given() == {"alpha": 1.0, "beta": 0.0}


def test_corrections_and_reset_bn_resolve_together():
    assert fxzip.MergeOptions(corrections=None).correction_options is None
    assert fxzip.MergeOptions().correction_options == fxzip.Corrections()
    assert fxzip.MergeOptions(reset_bn=False).correction_options.reset_bn is False
    assert fxzip.MergeOptions(corrections={"repair": True}).correction_options.repair is True
    assert fxzip.MergeOptions(settings="auto").auto == fxzip.AutoSettings()


def test_a_zipper_merges_by_its_options_and_keeps_what_it_prepared():
    """A permuted self-merge at the options' stop point, an override per call, and the options
    that shape the preparation refused at merge time."""
    model = mlp()
    other, _ = fxzip.testing.permuted_copy(model, X, seed=1)
    options = fxzip.MergeOptions(stop_at=1, method="permute", corrections=None, progress=False)
    zipper = fxzip.Zipper([model, other], X, options)
    merged = zipper.merge()
    assert merged.fxzip_report.layers_zipped == 1 and merged.fxzip_report.method == "permute"
    with torch.no_grad():
        for out in merged(X):
            torch.testing.assert_close(out, model(X), rtol=1e-5, atol=1e-5)
    assert zipper.merge(2, method="zipit").fxzip_report.layers_zipped == 2
    with pytest.raises(fxzip.InputError, match="taps"):
        zipper.merge(taps="last")
    assert set(PREPARE_OPTIONS) >= {"taps", "positions", "statistics_precision"}
    again = fxzip.merge(model, copy.deepcopy(other), X, **{**options.given(), "stop_at": 1})
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(again(X), merged(X)))
