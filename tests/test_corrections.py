"""Label-free corrections (`fxzip.corrections.refit`): BN reset, REPAIR and ridge refits.

* A permuted self-merge stays exact with every correction on (they are identities there), for a
  BatchNorm ResNet, a LayerNorm MLP and a norm-free CNN (one conv without bias).
* On two small trained MLPs (digits 0–4 / 5–9), the refit makes the heads reproduce their parents
  better than plain zipit (fidelity on held-out digits) and lifts joint accuracy; REPAIR helps a
  LayerNorm MLP's fidelity.
* Bad options raise fxzip errors.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxzip
from fxzip.corrections import Corrections, correct
from fxzip.demo.digits import ResNet20, evaluate, load_digits_split, train_classifier, TASK_CLASSES
from fxzip.corrections.fidelity import fidelity

try:
    from permute_util import permuted_by_analysis, rel_err, small_resnet
except ImportError:  # tests/ made a package
    from tests.permute_util import permuted_by_analysis, rel_err, small_resnet

pytestmark = pytest.mark.filterwarnings("ignore::fxzip.errors.CalibrationWarning")

EVERYTHING = Corrections(refit_trunk=True, refit_heads="all", repair=True, reset_bn=False)
EXACT_TOL = 2e-5


def corrected_merge(models, inputs, stop_at, options: Corrections | None, *, method="zipit",
                    zipper: fxzip.Zipper | None = None):
    """Zipper.merge, then `correct` with the matches the merge used (None: plain merge)."""
    zipper = zipper or fxzip.Zipper(models, inputs, progress=False)
    merged = zipper.merge(stop_at, method=method, reset_bn=options is None,
                          corrections=None)
    if options is not None:
        trunk = zipper.analysis.trunk(stop_at)
        matches = {s: zipper.match(s, method, 0.5, 1.0) for s in zipper.analysis.spaces_of(trunk)}
        merged.correction_report = correct(merged, zipper.graphs, zipper.analysis, matches,
                                           zipper.batches, options)
    return merged



# -- tiny models --------------------------------------------------------------------------------
class LayerNormMLP(nn.Module):
    def __init__(self, d_in: int = 64, hidden: int = 32, out: int = 5):
        super().__init__()
        self.fc1, self.ln1 = nn.Linear(d_in, hidden), nn.LayerNorm(hidden)
        self.fc2, self.ln2 = nn.Linear(hidden, hidden), nn.LayerNorm(hidden)
        self.fc3 = nn.Linear(hidden, out)

    def forward(self, x):
        x = x.flatten(1)
        x = F.gelu(self.ln1(self.fc1(x)))
        x = x + F.gelu(self.ln2(self.fc2(x)))
        return self.fc3(x)


class PlainMLP(nn.Module):
    def __init__(self, d_in: int = 64, hidden: int = 48, out: int = 5):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(d_in, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, out)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


class NormFreeCNN(nn.Module):
    def __init__(self, width: int = 8, out: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.conv3 = nn.Conv1d(width, width, 3, padding=1)
        self.fc = nn.Linear(width, out)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)) + x, 2)
        x = F.relu(self.conv3(x.flatten(2)))
        return self.fc(x.mean(-1))


@pytest.fixture(scope="module")
def digits():
    return load_digits_split(seed=0)


# -- exactness --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet", "layernorm", "normfree"])
def test_permuted_self_merge_stays_exact(digits, name):
    torch.manual_seed(0)
    x = digits.x_train[:192]
    model = {"resnet": lambda: ResNet20(width=1, blocks_per_stage=1),
             "layernorm": LayerNormMLP, "normfree": NormFreeCNN}[name]().eval()
    if name == "resnet":  # BN statistics of the calibration data: no BN reset can move them
        fxzip.reset_bn(model, x, progress=False)
    other, _ = permuted_by_analysis(model, x, seed=1)
    with torch.no_grad():
        ref = model(x)
    zipper = fxzip.Zipper([model, other], [x[:96], x[96:]], progress=False)
    stops = {"resnet": ["layer1", "layer2", None], "layernorm": ["ln1", None],
             "normfree": ["conv2", None]}[name]
    for stop in stops:
        merged = corrected_merge(None, None, stop, EVERYTHING, zipper=zipper)
        report = merged.correction_report
        assert report.refitted and report.repaired
        with torch.no_grad():
            out_a, out_b = merged(x)
        assert rel_err(out_a, ref) < EXACT_TOL and rel_err(out_b, ref) < EXACT_TOL, (stop, report)
        for before, after in report.errors.values():
            assert after < 1e-4


def test_bn_reset_pass_is_idempotent(digits):
    """With no layer corrected the pass is a BN reset on eval-mode inputs: exact for a self-merge
    whose parents' statistics are the eval-mode calibration statistics."""
    torch.manual_seed(0)
    x = digits.x_train[:128]
    model = ResNet20(width=1, blocks_per_stage=1).eval()
    other, _ = permuted_by_analysis(model, x, seed=2)
    options = Corrections(refit_trunk=False, refit_heads="none")
    merged = corrected_merge([model, other], x, None, options)
    # the pass set every BN to the statistics of its (eval-mode) inputs: a second pass is a no-op
    state = copy.deepcopy(merged.state_dict())
    zipper = fxzip.Zipper([model, other], x, progress=False)
    trunk = zipper.analysis.trunk(None)
    matches = {s: zipper.match(s, "zipit", 0.5, 1.0) for s in zipper.analysis.spaces_of(trunk)}
    correct(merged, zipper.graphs, zipper.analysis, matches, [x], options)
    for key, value in merged.state_dict().items():
        assert torch.allclose(value.float(), state[key].float(), atol=1e-5), key


# -- quality on trained models ---------------------------------------------------------------------
def trained_pair(digits, make, epochs: int = 15):
    models = []
    for k, classes in enumerate(TASK_CLASSES):
        torch.manual_seed(10 + k)
        xs, ys = digits.task(classes)
        models.append(train_classifier(make(), xs, ys, epochs=epochs, seed=10 + k))
    return models


@pytest.fixture(scope="module")
def mlp_pair(digits):
    return trained_pair(digits, PlainMLP)


@pytest.fixture(scope="module")
def ln_pair(digits):
    return trained_pair(digits, LayerNormMLP)


def test_refit_beats_zipit_on_trained_mlps(digits, mlp_pair):
    calib = list(digits.x_train[:800].split(200))
    held_out = [digits.x_train[800:]]
    zipper = fxzip.Zipper(mlp_pair, calib, progress=False)
    plain = corrected_merge(None, None, None, None, zipper=zipper)
    last = corrected_merge(None, None, None, Corrections(refit_trunk=False, refit_heads="last"),
                           zipper=zipper)
    refit = corrected_merge(None, None, None, Corrections(), zipper=zipper)
    fid = {k: fidelity(m, mlp_pair, held_out).mean_relative_error
           for k, m in (("plain", plain), ("last", last), ("refit", refit))}
    acc = {k: evaluate(m, digits.x_test, digits.y_test).joint
           for k, m in (("plain", plain), ("last", last), ("refit", refit))}
    ensemble = evaluate(mlp_pair, digits.x_test, digits.y_test).joint
    assert fid["refit"] < fid["last"] < fid["plain"], fid
    assert fid["refit"] < 0.5 * fid["plain"], fid
    assert acc["refit"] > acc["plain"] + 0.015 and acc["refit"] >= acc["last"] - 0.005, acc
    assert acc["refit"] > ensemble - 0.05, (acc, ensemble)


def test_repair_and_refit_help_layernorm_mlp(digits, ln_pair):
    calib = list(digits.x_train[:800].split(200))
    held_out = [digits.x_train[800:]]
    zipper = fxzip.Zipper(ln_pair, calib, progress=False)
    variants = {"plain": None,
                "repair": Corrections(refit_trunk=False, refit_heads="none", repair=True),
                "refit": Corrections()}
    fid = {k: fidelity(corrected_merge(None, None, "ln2", o, zipper=zipper), ln_pair,
                       held_out).mean_relative_error for k, o in variants.items()}
    assert fid["repair"] < fid["plain"], fid
    assert fid["refit"] < fid["repair"], fid


def test_corrections_are_deterministic(digits, mlp_pair):
    calib = list(digits.x_train[:400].split(200))
    options = Corrections(max_rows=300, seed=3)
    a = corrected_merge(mlp_pair, calib, None, options).state_dict()
    b = corrected_merge(mlp_pair, calib, None, options).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_parents_untouched(digits, mlp_pair):
    before = [copy.deepcopy(m.state_dict()) for m in mlp_pair]
    corrected_merge(mlp_pair, digits.x_train[:200], None, Corrections(repair=True))
    for m, state in zip(mlp_pair, before):
        assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())


# -- options --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [dict(ridge=0), dict(ridge=-1.0), dict(ridge=float("nan")),
                                    dict(ridge=True), dict(refit_heads="some"),
                                    dict(refit_heads=None), dict(max_rows=0),
                                    dict(max_rows=2.5), dict(repair="yes"), dict(refit_trunk=1),
                                    dict(reset_bn=None)])
def test_bad_options_raise_fxzip_errors(kwargs):
    with pytest.raises(fxzip.FxzipError):
        Corrections(**kwargs)


def test_no_calibration_batches_is_an_error(digits, mlp_pair):
    zipper = fxzip.Zipper(mlp_pair, digits.x_train[:64], progress=False)
    merged = zipper.merge(None)
    with pytest.raises(fxzip.FxzipError):
        correct(merged, zipper.graphs, zipper.analysis, {}, [])


def test_head_layer_selection(digits, mlp_pair):
    calib = digits.x_train[:200]
    zipper = fxzip.Zipper(mlp_pair, calib, progress=False)
    refitted = {}
    for heads in ("none", "first", "last", "first+last", "all"):
        merged = corrected_merge(None, None, "fc1", Corrections(refit_trunk=False, refit_heads=heads),
                                 zipper=zipper)
        refitted[heads] = sorted(merged.correction_report.refitted)
    assert refitted["none"] == []
    assert refitted["first"] == ["heads.0.fc2", "heads.1.fc2"]
    assert refitted["last"] == ["heads.0.fc3", "heads.1.fc3"]
    assert refitted["first+last"] == refitted["all"] == sorted(refitted["first"] + refitted["last"])
    trunk_only = corrected_merge(None, None, "fc1", Corrections(refit_heads="none"), zipper=zipper)
    assert trunk_only.correction_report.refitted == ["fc1"]


# -- the default of fxzip.merge ---------------------------------------------------------------
class SharedFC(nn.Module):
    """fc1 is called twice (shared weights): it cannot be refitted alone, and is left with a
    reason in the report."""

    def __init__(self):
        super().__init__()
        self.fc0, self.fc1, self.fc2 = nn.Linear(64, 16), nn.Linear(16, 16), nn.Linear(16, 5)

    def forward(self, x):
        h = F.relu(self.fc0(x.flatten(1)))
        return self.fc2(F.relu(self.fc1(F.relu(self.fc1(h)))))


def test_merge_corrects_by_default_and_reports_it(digits, mlp_pair):
    a, b = mlp_pair
    x = digits.x_train[:256]
    merged = fxzip.merge(a, b, x, progress=False)
    report = merged.fxzip_report
    assert report.corrections is not None and report.corrections.refitted
    assert "corrections" in report.seconds and "bn_reset" not in report.seconds
    assert "fxzip corrections:" in str(report)
    data = report.to_dict()
    assert data["corrections"]["refitted"] == report.corrections.refitted
    assert data["settings"]["corrections"]["refit_heads"] == "first+last"
    back = fxzip.MergeReport.from_dict(json.loads(report.to_json()))
    assert back.corrections.refitted == report.corrections.refitted
    plain = fxzip.merge(a, b, x, progress=False, corrections=None)
    assert plain.fxzip_report.corrections is None and "corrections" not in plain.fxzip_report.seconds
    # the default equals an explicit Corrections() and differs from the plain merge
    explicit = fxzip.merge(a, b, x, progress=False, corrections=Corrections())
    with torch.no_grad():
        out, out_explicit, out_plain = merged(x)[0], explicit(x)[0], plain(x)[0]
    assert torch.equal(out, out_explicit) and not torch.allclose(out, out_plain)


def test_a_module_called_twice_is_skipped_with_a_reason(digits):
    torch.manual_seed(0)
    x = digits.x_train[:128]
    model = SharedFC().eval()
    other, _ = permuted_by_analysis(model, x, seed=1)
    merged = fxzip.merge(model, other, x, progress=False)
    report = merged.fxzip_report.corrections
    assert "fc1" in report.skipped and "called 2 times" in report.skipped["fc1"]
    assert "fc1" not in report.refitted and "fc0" in report.refitted
    assert "not corrected: module called 2 times" in str(merged.fxzip_report)
    with torch.no_grad():
        ref = model(x)
        assert all(rel_err(o, ref) < EXACT_TOL for o in merged(x))


def test_reset_bn_false_keeps_the_parents_batch_norm_statistics(digits):
    """reset_bn=False: the corrections' targets are the parents as given, and a permuted
    self-merge of a BN ResNet whose statistics are NOT those of the calibration data stays
    exact (no BatchNorm is reset anywhere)."""
    torch.manual_seed(0)
    x = digits.x_train[:128]
    model = ResNet20(width=1, blocks_per_stage=1).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    other, _ = permuted_by_analysis(model, x, seed=1)
    merged = fxzip.merge(model, other, x, progress=False, reset_bn=False)
    assert merged.fxzip_report.corrections.options["reset_bn"] is False
    with torch.no_grad():
        ref = model(x)
        assert all(rel_err(o, ref) < EXACT_TOL for o in merged(x))


# -- ties of features that look alike on scarce data ----------------------------------------------
class SparseMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _single_sample_units(model: SparseMLP, x: torch.Tensor) -> None:
    """Make hidden unit i active on sample i % len(x) only: units active on the same sample
    correlate exactly 1 (with each other and with their copies)."""
    with torch.no_grad():
        for i in range(model.fc1.out_features):
            s = i % len(x)
            pre = x @ model.fc1.weight[i]
            others = torch.cat([pre[:s], pre[s + 1:]])
            if pre[s] <= others.max():
                model.fc1.weight[i].neg_()
                pre, others = -pre, -others
            model.fc1.bias[i] = -(pre[s] + others.max()) / 2


def test_self_merge_with_exact_ties_is_exact():
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    model = SparseMLP().eval()
    _single_sample_units(model, x)
    with torch.no_grad():
        assert ((torch.relu(model.fc1(x)) > 0).sum(0) == 1).float().mean() > 0.5
        ref = model(x)
        # the tie-breaker off: features are paired arbitrarily among the ties
        plain = fxzip.merge(model, copy.deepcopy(model), x, progress=False, reset_bn=False,
                            corrections=None, weight_similarity=0.0)(x)
        assert max(rel_err(o, ref) for o in plain) > 1e-2
        for corrections in (None, "default"):
            outs = fxzip.merge(model, copy.deepcopy(model), x, progress=False, reset_bn=False,
                               corrections=corrections)(x)
            assert all(rel_err(o, ref) < 1e-6 for o in outs), corrections


def test_scarce_data_self_merge_of_a_timm_resnet_is_exact():
    """A timm ResNet at 64² calibrated on 16 random images (fewer than the 512 features of its
    pooled space), with sparse last-stage features (many active on one image only): merged with
    a copy of itself by the default merge (stop_at=None), it comes back exactly."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    x = torch.randn(16, 3, 64, 64)
    model = fxzip.reset_bn(timm.create_model("resnet18", pretrained=False, num_classes=10), x,
                           progress=False).eval()
    with torch.no_grad():
        model.layer4[1].bn2.bias.sub_(2.0)  # 43% of the pooled features active on one image
        ref = model(x)
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        assert ((pooled > 0).sum(0) == 1).float().mean() > 0.3  # ties: alike on one image
    merged = fxzip.merge(model, copy.deepcopy(model), x, progress=False, reset_bn=False)
    with torch.no_grad():
        assert all(rel_err(o, ref) < 1e-4 for o in merged(x))


def test_memory_budget_corrects_on_the_samples_that_fit():
    """The pass holds every calibration sample's activations at once; `memory_gib` bounds them by
    the traced shapes: a budget of about 10 samples' activations corrects on about 10 of 40
    samples, chosen by their own values (the report says so), so the same samples in any order
    or batching; None corrects on all; permuted self-merges stay exact (BatchNorm statistics kept:
    the targets are the parents as given)."""
    from fxzip.corrections.budget import activation_bytes_per_sample
    from fxzip.runtime.sampling import sample_keys, unit_keys

    a = small_resnet(0)
    b, _ = permuted_by_analysis(a, torch.randn(8, 1, 8, 8), seed=2)
    x = torch.randn(40, 1, 8, 8)
    zipper = fxzip.Zipper([a, b], list(x.split(8)), progress=False)
    per_sample = activation_bytes_per_sample(zipper.graphs[0])
    # the stem's output (16 channels × 8 × 8 float32) and the block's are alive together
    assert 16 * 64 * 4 <= per_sample <= 16 * 64 * 4 * 6
    budget = 10 * 4 * per_sample / 2**30  # 4 per-sample units per sample (2 parents + 2): 10 fit
    options = fxzip.Corrections(memory_gib=budget)
    tight = zipper.merge(None, reset_bn=False, corrections=options)
    report = tight.fxzip_report.corrections
    expected = int((unit_keys(sample_keys(x, options.seed + 1)) < 10 / 40).sum())
    assert 3 <= expected <= 20 and (report.samples, report.offered) == (expected, 40)
    assert f"on {expected} of 40 (memory_gib) samples" in str(report)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(3))
    shuffled = fxzip.Zipper([a, b], list(x[order].split([5, 30, 5])), progress=False)
    moved = shuffled.merge(None, reset_bn=False, corrections=options)
    assert moved.fxzip_report.corrections.samples == expected
    loose = zipper.merge(None, reset_bn=False, corrections=fxzip.Corrections(memory_gib=None))
    assert loose.fxzip_report.corrections.samples == 40
    with torch.no_grad():
        for merged in (tight, loose):
            out_a, out_b = merged(x)
            assert rel_err(out_a, a(x)) < 1e-5 and rel_err(out_b, b(x)) < 1e-5
        assert rel_err(moved(x)[0], tight(x)[0]) < 1e-5
    for bad in (0, -1.0, True, float("inf"), "4"):
        with pytest.raises(fxzip.InputError, match="memory_gib"):
            fxzip.Corrections(memory_gib=bad)
