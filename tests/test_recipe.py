"""Recipes: defaults, relative paths, and an error that names the key for every bad entry."""
import pytest

from fxzip.errors import RecipeError
from fxzip.io.recipe import dump, load_recipe, merge_defaults, parse_recipe, resolved

GOOD = {"models": [{"model": "resnet18", "kwargs": {"num_classes": 3}, "checkpoint": "a.pt"},
                   "toy_models.nets:TinyNet"],
        "calibration": {"data": "images", "size": 32, "mean": [0.5, 0.5, 0.5], "std": 0.25},
        "merge": {"stop_at": "layer2", "alpha": 0.3}, "seed": 3}


def test_defaults_and_paths_relative_to_the_recipe(tmp_path):
    recipe = parse_recipe(GOOD, tmp_path)
    assert recipe.models[0].checkpoint == tmp_path / "a.pt"
    assert recipe.models[1].model == "toy_models.nets:TinyNet" and recipe.models[1].checkpoint is None
    cal = recipe.calibration
    assert (cal.data, cal.size, cal.std, cal.batch_size, cal.limit) == (
        tmp_path / "images", (32, 32), (0.25,), 64, None)
    assert recipe.device == "auto" and recipe.seed == 3
    assert {"stop_at", "method", "alpha", "beta", "reset_bn"} <= set(merge_defaults())
    full = resolved(recipe, "cpu")
    assert full["merge"]["alpha"] == 0.3 and full["merge"]["method"] == "zipit"
    assert full["device"] == "cpu" and {"fxzip", "torch", "timm"} <= set(full["versions"])
    (tmp_path / "r.yaml").write_text(dump({k: v for k, v in full.items() if k != "versions"}))
    assert load_recipe(tmp_path / "r.yaml").merge["alpha"] == 0.3


@pytest.mark.parametrize("change, message", [
    ({"modles": []}, "unknown key 'modles' in the recipe (did you mean 'models'?)"),
    ({"models": ["resnet18"]}, "two or more models"),
    ({"models": [{"model": "resnet18", "chekpoint": "a.pt"}, "resnet18"]},
     "unknown key 'chekpoint' in models[0] (did you mean 'checkpoint'?)"),
    ({"models": [{"model": "resnet18", "kwargs": [1]}, "resnet18"]}, "models[0].kwargs must be a mapping"),
    ({"calibration": {"data": "x", "batch_size": 0}}, "calibration.batch_size must be a positive integer"),
    ({"calibration": {"data": "x", "size": [1, 2, 3]}}, "calibration.size must be"),
    ({"calibration": {"data": "x", "interpolation": "cubic"}}, "calibration.interpolation 'cubic'"),
    ({"calibration": {"size": 3}}, "calibration needs the key 'data'"),
    ({"merge": {"stop": "layer2"}}, "unknown key 'stop' in merge (did you mean 'stop_at'?)"),
    ({"merge": {"method": "ties"}}, "merge.method: unknown method 'ties'; choose one of"),
    ({"merge": {"alpha": "high"}}, "merge.alpha: alpha must be a finite number"),
    ({"merge": {"reset_bn": "yes"}}, "merge.reset_bn: reset_bn must be True or False"),
    ({"merge": {"progress": False}}, "unknown key 'progress' in merge"),
    ({"device": "tpu"}, "device 'tpu' is not one of auto, cpu, cuda"),
])
def test_bad_entries_name_the_key(tmp_path, change, message):
    with pytest.raises(RecipeError) as error:
        parse_recipe({**GOOD, **change}, tmp_path)
    assert message in str(error.value)


def test_unreadable_recipes(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("models: [a, b\ncalibration: x\n")
    with pytest.raises(RecipeError, match=r"not valid YAML \(line"):
        load_recipe(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(tmp_path / "list.yaml")


def test_recipes_check_options_as_the_api_does():
    """One MergeOptions behind both: a bad value in a recipe is refused with the API's own text,
    the key named; every method the API takes (cca too) is taken."""
    import fxzip
    from fxzip.io.recipe import check_merge_options

    for bad in ({"beta": 3.0}, {"alpha": 0.0}, {"method": "zip"}, {"corrections": "refit"},
                {"weight_similarity": 2.0}, {"taps": "some"}, {"positions": 0},
                {"settings": "best"}, {"width": 0.5}, {"statistics_precision": "half"},
                {"stop_at": 2.5}):
        (key, value), = bad.items()
        with pytest.raises(fxzip.FxzipError) as api:
            fxzip.MergeOptions(**bad).checked_width(2)  # the width once the models are known
        with pytest.raises(RecipeError) as recipe:
            check_merge_options(bad, num_models=2)
        assert str(recipe.value) == f"recipe: merge.{key}: {api.value}", (bad, recipe.value)
    for method in fxzip.matching.METHODS:
        assert check_merge_options({"method": method}) == {"method": method}
    with pytest.raises(RecipeError, match="merge.width: width must be"):
        check_merge_options({"width": 3}, num_models=2)
    assert check_merge_options({"width": {"layer1": 1.5, "*": 1.0}}, num_models=2)
