"""`fxzip merge` end to end on files the test writes — digit images, checkpoints of a user's own
class (safetensors and a nested DDP-style .pt) and of a timm model — and every bad input as one
`fxzip: error:` line, a non-zero exit status and no output folder."""
import json
import re
import shutil
import warnings

import pytest
import timm
import torch

import fxzip
from fxzip.cli import main
from fxzip.cli.merge import calibration_batches, load_models
from fxzip.io.recipe import load_recipe
from merge_files import reload_without_fxzip, save_checkpoint, write_digit_images, write_recipe
from toy_models.nets import TinyNet

OUTPUTS = ("merged.pt2", "recipe.yaml", "report.json", "report.png", "README.md")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Images, two TinyNet and two timm test_resnet checkpoints, and two good recipes."""
    root = tmp_path_factory.mktemp("merge_files")
    write_digit_images(root / "images", count=40)
    (root / "empty").mkdir()
    torch.manual_seed(0)
    save_checkpoint(TinyNet(), root / "tiny_a.safetensors")
    save_checkpoint(TinyNet(), root / "tiny_b.pt", nested=True)
    save_checkpoint(TinyNet(width=12), root / "tiny_wide.safetensors")
    save_checkpoint(timm.create_model("test_resnet", num_classes=3), root / "res_a.safetensors")
    save_checkpoint(timm.create_model("test_resnet", num_classes=3), root / "res_b.pt")
    tiny = {"models": [{"model": "toy_models.nets:TinyNet", "checkpoint": "tiny_a.safetensors"},
                       {"model": "toy_models.nets:tiny_net", "checkpoint": "tiny_b.pt"}],
            "calibration": {"data": "images", "batch_size": 16, "mean": 0.5, "std": 0.25},
            "merge": {"stop_at": "conv2"}, "device": "cpu"}
    res = {"models": [{"model": "test_resnet", "kwargs": {"num_classes": 3}, "checkpoint": c}
                      for c in ("res_a.safetensors", "res_b.pt")],
           "calibration": {"data": "images", "batch_size": 16, "size": 32, "limit": 32},
           "merge": {"stop_at": "layer3"}}
    write_recipe(root / "tiny.yaml", tiny)
    write_recipe(root / "res.yaml", res)
    return root, tiny, res


def merge_in_process(recipe_path):
    """What fxzip.merge gives in this process for the recipe's models and calibration data."""
    recipe = load_recipe(recipe_path)
    models = load_models(recipe, torch.device("cpu"), progress=False)
    batches, _ = calibration_batches(recipe, models[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxzip.CalibrationWarning)
        return fxzip.merge_all(models, batches, progress=False, **recipe.merge)


def test_merge_writes_a_program_that_loads_anywhere(files, tmp_path, capsys):
    root, _, _ = files
    cases = []
    for name in ("tiny", "res"):
        out = tmp_path / f"out_{name}"
        assert main(["merge", str(root / f"{name}.yaml"), "-o", str(out), "--quiet"]) == 0
        assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)
        report = json.loads((out / "report.json").read_text())
        assert report["stop_at"] in ("conv2", "layer3") and report["spaces"]
        assert report["costs"]["parameters"] < report["costs"]["ensemble_parameters"]
        assert [o["index"] for o in report["outputs"]] == [0, 1]
        card = (out / "README.md").read_text()
        assert "torch.export.load('merged.pt2')" in card and "FLOPs" in card
        resolved = (out / "recipe.yaml").read_text()
        assert "sha256" in resolved and "versions" in resolved
        merged = merge_in_process(root / f"{name}.yaml")
        xs = [torch.randn(b, 3, 32, 32) for b in (5, 1)]  # calibration batches were 16
        with torch.no_grad():
            refs = [list(merged(x)) for x in xs]
        loaded = fxzip.load(out / "merged.pt2")
        assert all(torch.equal(a, b) for a, b in zip(loaded(xs[0]), refs[0]))
        from_folder = fxzip.load(out)  # the folder `fxzip merge` wrote stands for its merged.pt2
        assert all(torch.equal(a, b) for a, b in zip(from_folder(xs[0]), refs[0]))
        cases.append((out / "merged.pt2", xs, refs))
    assert "ok" in reload_without_fxzip(cases, tmp_path)
    # the resolved recipe runs again and gives the same program
    again = tmp_path / "again"
    assert main(["merge", str(tmp_path / "out_tiny" / "recipe.yaml"), "-o", str(again), "--quiet"]) == 0
    (_, tiny_xs, tiny_refs) = cases[0]
    assert all(torch.equal(a, b) for a, b in
               zip(fxzip.load(again / "merged.pt2")(tiny_xs[0]), tiny_refs[0]))
    assert capsys.readouterr().err.count("fxzip: error") == 0


def test_a_recipe_option_means_what_the_keyword_means(files, tmp_path):
    """`method: cca` (or any option) in a recipe merges as `method="cca"` does in Python: both go
    through one MergeOptions."""
    root, tiny, _ = files
    recipe = json.loads(json.dumps(tiny))
    recipe["merge"].update(method="cca", corrections="none", weight_similarity=0.0)
    write_recipe(root / "tiny_cca.yaml", recipe)
    out = tmp_path / "cca"
    assert main(["merge", str(root / "tiny_cca.yaml"), "-o", str(out), "--quiet"]) == 0
    loaded = fxzip.load(out)
    assert loaded.fxzip_report.method == "cca"
    x = torch.randn(3, 3, 32, 32)
    reference = merge_in_process(root / "tiny_cca.yaml")
    assert reference.fxzip_report.method == "cca"
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(loaded(x), reference(x)))


def test_loading_a_folder_without_a_merged_model_says_so(tmp_path):
    with pytest.raises(fxzip.ExportError, match="holds no merged.pt2"):
        fxzip.load(tmp_path)


BAD = {
    "missing checkpoint": (lambda r: r["models"][1].update(checkpoint="nowhere.pt"),
                           "checkpoint .*nowhere.pt not found"),
    "unreadable checkpoint": (lambda r: r["models"][1].update(checkpoint="images/0/000.png"),
                              "unknown file type '.png'"),
    "unknown model": (lambda r: r["models"][0].update(model="tinynett"),
                      "unknown model name 'tinynett'"),
    "unknown callable": (lambda r: r["models"][0].update(model="toy_models.nets:Tiny"),
                         "unknown model name 'toy_models.nets:Tiny'"),
    "checkpoint not fitting": (lambda r: r["models"][1].update(checkpoint="tiny_wide.safetensors"),
                               "tiny_wide.safetensors does not fit models\\[1\\].*mis-shaped "
                               "conv1.weight \\(checkpoint \\(12, 3, 3, 3\\), model \\(8, 3, 3, 3\\)\\)"),
    "empty image folder": (lambda r: r["calibration"].update(data="empty"),
                           "calibration folder .*empty holds no images"),
    "bad stop point": (lambda r: r["merge"].update(stop_at="layer9"), "layer9"),
    "models that differ": (lambda r: r["models"][1].update(checkpoint="tiny_wide.safetensors",
                                                           kwargs={"width": 12}), "differ"),
    "bad recipe key": (lambda r: r["merge"].update(alhpa=0.1), "unknown key 'alhpa' in merge"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_leaves_nothing(files, tmp_path, capsys, case):
    root, tiny, _ = files
    recipe = json.loads(json.dumps(tiny))
    change, pattern = BAD[case]
    change(recipe)
    work = tmp_path / "work"
    shutil.copytree(root, work, ignore=lambda d, names: [n for n in names if n.endswith(".yaml")])
    write_recipe(work / "recipe.yaml", recipe)
    status = main(["merge", str(work / "recipe.yaml"), "-o", str(work / "out" / "merged"), "--quiet"])
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("fxzip: warning")]
    assert status != 0
    assert len(err) == 1 and err[0].startswith("fxzip: error: "), err
    assert re.search(pattern, err[0]), err[0]
    assert not (work / "out").exists()
    assert not [p for p in work.iterdir() if p.name.startswith(".")]


def test_existing_output_folder_is_refused(files, tmp_path, capsys):
    root, _, _ = files
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert main(["merge", str(root / "tiny.yaml"), "-o", str(tmp_path / "taken"), "--quiet"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]


def test_analyze_prints_spaces_and_stop_points(files, capsys):
    root, _, _ = files
    assert main(["analyze", "toy_models.nets:TinyNet", "--kwargs", '{"width": 4}',
                 "--checkpoint", str(root / "tiny_a.safetensors"), "--input-size", "3,32,32"]) == 1
    assert "does not fit" in capsys.readouterr().err
    assert main(["analyze", "toy_models.nets:TinyNet", "--kwargs", '{"width": 4}',
                 "--input-size", "3,32,32"]) == 0
    out = capsys.readouterr().out
    assert "spaces" in out and "stop points" in out and "conv2" in out
    assert main(["analyze", "test_resnet", "--input-size", "3,x"]) == 1
    assert capsys.readouterr().err.startswith("fxzip: error: --input-size")
