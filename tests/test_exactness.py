"""The key invariants of fxzip, on random architectures (tests/archs.py).

* Merging a model with a hidden-unit permutation of itself is exact at every stop point.
* Stopping before the first parametrised layer gives back the two original models.
* A merge leaves its input models (state, training flags, hooks) and inputs untouched.

API under test::

    rep = fxzip.analyze(model, x); rep.stop_points      # list[str], graph order
    merged = fxzip.merge(a, b, x, stop_at=None | str | int, method="zipit" | "permute",
                         reset_bn=False, progress=False)
    out_a, out_b = merged(x)                             # a torch.fx.GraphModule
"""
from __future__ import annotations

import os
import random
import traceback

import pytest
import torch
import torch.fx
from hypothesis import HealthCheck, assume, example, given, settings, strategies as st

import fxzip

try:
    from archs import (EXAMPLE_SPECS, CNNSpec, ConcatBlock, arch_specs, build, cnn_specs,
                       degenerate_features, mlp_specs, permuted_copy)
except ImportError:  # tests/ made a package
    from tests.archs import (EXAMPLE_SPECS, CNNSpec, ConcatBlock, arch_specs, build,
                             cnn_specs, degenerate_features, mlp_specs, permuted_copy)

REL_TOL = 1e-4          # relative error of a merged output against the reference
ORIG_ATOL = 1e-6        # stop_at=0: outputs are the original models'
MAX_STOPS = 10          # stop points tried per model (the first and the last always), + None
EXAMPLES = int(os.environ.get("FXZIP_TEST_EXAMPLES", 15))  # hypothesis examples per test

# The generated models are small and so are their batches, on purpose: rank-deficient statistics
# are expected here (the oracle avoids look-alike features), so the warning is noise.
pytestmark = pytest.mark.filterwarnings("ignore::fxzip.errors.CalibrationWarning")

SLOW = settings(deadline=None, max_examples=EXAMPLES,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
seeds = st.integers(0, 2**16)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def generic_model(spec, seed: int):
    """build(spec, seed), rejecting models whose features are degenerate on their input (a
    feature of one model as correlated with another of the same model as with its permuted
    counterpart: exact matching is then ill-posed, not a bug of the merger)."""
    model, x = build(spec, seed)
    why = degenerate_features(model, x)
    assume(why is None)
    return model, x


def run_merged(merged, x):
    assert isinstance(merged, torch.fx.GraphModule), \
        f"fxzip.merge returned {type(merged).__name__}, not a torch.fx.GraphModule"
    with torch.no_grad():
        outs = merged(x)
    assert isinstance(outs, tuple) and len(outs) == 2, \
        f"the merged module returned {type(outs).__name__} of length {len(outs) if isinstance(outs, (tuple, list)) else '-'}, not a 2-tuple"
    return outs


def pick_stops(stops: list[str], rng: random.Random, k: int = MAX_STOPS) -> list[str]:
    """All stop points when there are at most k, else the first, the last and k-2 others,
    in graph order."""
    if len(stops) <= k:
        return list(stops)
    middle = sorted(rng.sample(range(1, len(stops) - 1), k - 2))
    return [stops[0]] + [stops[i] for i in middle] + [stops[-1]]


def stop_points(model, x, context: str) -> list[str]:
    rep = fxzip.analyze(model, x)
    stops = list(rep.stop_points)
    assert stops, f"analyze() found no stop point\n{context}"
    assert all(isinstance(s, str) for s in stops), f"stop_points are not all str: {stops!r}\n{context}"
    assert len(set(stops)) == len(stops), f"stop_points repeat: {stops!r}\n{context}"
    return stops


def check_self_merge(model, x, other, stops: list[str], context: str) -> None:
    """Merging `model` with its permuted copy `other` is exact at every stop in `stops` and
    at stop_at=None (zipit), and with method="permute" at stop_at=None."""
    with torch.no_grad():
        ref = model(x)
    runs = [(s, "zipit") for s in stops] + [(None, "zipit"), (None, "permute")]
    failures, first_trace = [], None
    for stop, method in runs:
        try:
            merged = fxzip.merge(model, other, x, stop_at=stop, method=method, reset_bn=False,
                                 progress=False)
            out_a, out_b = run_merged(merged, x)
        except Exception as exc:  # noqa: BLE001 - report every stop point, then fail
            failures.append(f"  stop_at={stop!r} method={method}: raised {type(exc).__name__}: {exc}")
            first_trace = first_trace or traceback.format_exc()
            continue
        ea, eb = rel_err(out_a, ref), rel_err(out_b, ref)
        if not (ea < REL_TOL and eb < REL_TOL):  # also catches NaN
            failures.append(f"  stop_at={stop!r} method={method}: relative error of output A "
                            f"{ea:.3e}, of output B {eb:.3e} (tolerance {REL_TOL:g})")
    if failures:
        pytest.fail(
            f"permuted self-merge is not exact at {len(failures)} of {len(runs)} runs\n{context}\n"
            f"stop points tried: {stops!r}\n" + "\n".join(failures)
            + (f"\nfirst exception:\n{first_trace}" if first_trace else ""), pytrace=False)


def _hook_counts(model: torch.nn.Module) -> dict:
    names = [a for a in vars(torch.nn.Module()) if a.endswith("hooks") or a.endswith("hooks_with_kwargs")
             or a.endswith("_hooks_always_called")]
    return {(mod_name, a): len(getattr(m, a)) for mod_name, m in model.named_modules() for a in names
            if hasattr(getattr(m, a, None), "__len__")}


def _global_hook_counts() -> dict:
    mod = torch.nn.modules.module
    return {a: len(getattr(mod, a)) for a in dir(mod)
            if a.startswith("_global_") and "hook" in a and hasattr(getattr(mod, a), "__len__")}


def snapshot(model: torch.nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": {n: m.training for n, m in model.named_modules()},
        "params": {n: (id(p), p.requires_grad) for n, p in model.named_parameters()},
        "buffers": {n: id(b) for n, b in model.named_buffers()},
        "hooks": _hook_counts(model),
    }


def assert_untouched(model, before: dict, label: str, context: str) -> None:
    after = snapshot(model)
    state_b, state_a = before["state"], after["state"]
    assert state_b.keys() == state_a.keys(), \
        f"the state_dict keys of {label} changed: {sorted(state_b.keys() ^ state_a.keys())}\n{context}"
    changed = [k for k in state_b if state_b[k].dtype != state_a[k].dtype
               or state_b[k].shape != state_a[k].shape or not torch.equal(state_b[k], state_a[k])]
    assert not changed, f"merge changed {label}'s {changed}\n{context}"
    flips = [n for n, t in before["training"].items() if after["training"].get(n) != t]
    assert not flips, f"merge changed the training flag of {label}'s modules {flips}\n{context}"
    assert before["params"] == after["params"], \
        f"merge replaced parameters of {label} or changed their requires_grad\n{context}"
    assert before["buffers"] == after["buffers"], f"merge replaced buffers of {label}\n{context}"
    hooks = {k: v for k, v in after["hooks"].items() if v}
    assert not hooks, f"merge left hooks on {label}: {hooks}\n{context}"


# --------------------------------------------------------------------------------------------
# permuted self-merge is exact
# --------------------------------------------------------------------------------------------


def _self_merge(spec, seed, perm_seed, pick_seed):
    model, x = generic_model(spec, seed)
    other = permuted_copy(model, perm_seed)
    context = f"spec={spec!r}\nseed={seed} perm_seed={perm_seed} pick_seed={pick_seed}"
    stops = pick_stops(stop_points(model, x, context), random.Random(pick_seed))
    check_self_merge(model, x, other, stops, context)


@SLOW
@given(spec=mlp_specs(), seed=seeds, perm_seed=seeds, pick_seed=seeds)
def test_permuted_self_merge_is_exact_mlp(spec, seed, perm_seed, pick_seed):
    _self_merge(spec, seed, perm_seed, pick_seed)


@SLOW
@given(spec=cnn_specs(), seed=seeds, perm_seed=seeds, pick_seed=seeds)
# found by hypothesis: an in-place ReLU after a fit point must not change the corrections' target
@example(spec=CNNSpec(hw=5, stem=7, blocks=(ConcatBlock(c1=2, c2=7, act="F.relu_"),), head="pool",
                      classes=2, stem_bias=False, stem_act="relu", batch=16),
         seed=0, perm_seed=0, pick_seed=5368)
def test_permuted_self_merge_is_exact_cnn(spec, seed, perm_seed, pick_seed):
    _self_merge(spec, seed, perm_seed, pick_seed)


def _generic_seed(spec) -> int:
    for seed in range(20):
        model, x = build(spec, seed)
        if degenerate_features(model, x) is None:
            return seed
    raise AssertionError(f"no non-degenerate seed for {spec!r}")


@pytest.mark.parametrize("index", range(len(EXAMPLE_SPECS)))
def test_permuted_self_merge_is_exact_examples(index):
    """The hand-written specs that cover every block type (MAX_STOPS stop points each)."""
    spec = EXAMPLE_SPECS[index]
    seed = _generic_seed(spec)
    model, x = build(spec, seed)
    other = permuted_copy(model, 1234 + index)
    context = f"spec={spec!r}\nseed={seed} perm_seed={1234 + index}"
    stops = pick_stops(stop_points(model, x, context), random.Random(index))
    check_self_merge(model, x, other, stops, context)


# --------------------------------------------------------------------------------------------
# stopping before the first parametrised layer gives the originals
# --------------------------------------------------------------------------------------------


@SLOW
@given(spec=arch_specs(), seed=seeds)
def test_stop_before_first_layer_gives_the_originals(spec, seed):
    model_a, x = build(spec, seed)
    model_b, _ = build(spec, seed + 1)  # same architecture, other weights
    context = f"spec={spec!r}\nseed={seed} (model B: seed {seed + 1})"
    with torch.no_grad():
        ref_a, ref_b = model_a(x), model_b(x)
    assert not torch.allclose(ref_a, ref_b), f"test setup: the two models agree\n{context}"
    first = stop_points(model_a, x, context)[0]
    for stop in (0, first):
        merged = fxzip.merge(model_a, model_b, x, stop_at=stop, method="zipit", reset_bn=False,
                             progress=False)
        out_a, out_b = run_merged(merged, x)
        for label, out, ref in (("A", out_a, ref_a), ("B", out_b, ref_b)):
            assert out.shape == ref.shape and torch.allclose(out, ref, rtol=1e-6, atol=ORIG_ATOL), (
                f"stop_at={stop!r}: output {label} is not model {label}'s output "
                f"(max abs err {(out - ref).abs().max().item() if out.shape == ref.shape else 'shape'}: "
                f"{tuple(out.shape)} vs {tuple(ref.shape)})\n{context}")


# --------------------------------------------------------------------------------------------
# the input models are left alone
# --------------------------------------------------------------------------------------------


@SLOW
@given(spec=arch_specs(), seed=seeds, data=st.data())
def test_merge_leaves_the_inputs_untouched(spec, seed, data):
    model_a, x = build(spec, seed)
    partner = data.draw(st.sampled_from(["permuted", "other"]), label="partner")
    model_b = permuted_copy(model_a, seed) if partner == "permuted" else build(spec, seed + 1)[0]
    method = data.draw(st.sampled_from(["zipit", "permute"]), label="method")
    reset_bn = data.draw(st.booleans(), label="reset_bn")
    kind = data.draw(st.sampled_from(["None", "0", "middle"]), label="stop kind")
    context = f"spec={spec!r}\nseed={seed} partner={partner} method={method} reset_bn={reset_bn}"
    if kind == "None":
        stop = None
    elif kind == "0":
        stop = 0
    else:
        stop = data.draw(st.sampled_from(stop_points(model_a, x, context)), label="stop_at")
    mode = data.draw(st.sampled_from(["eval", "eval", "train", "mixed"]), label="mode")
    if mode == "train":
        model_a.train()
    elif mode == "mixed":  # B in train mode except its first block
        model_b.train()
        model_b.body[0].eval()
    context += f" stop_at={stop!r} mode={mode}"

    before_a, before_b = snapshot(model_a), snapshot(model_b)
    x_before = x.clone()
    global_hooks = _global_hook_counts()
    grad_enabled = torch.is_grad_enabled()
    try:
        merged = fxzip.merge(model_a, model_b, x, stop_at=stop, method=method, reset_bn=reset_bn,
                             progress=False)
    except fxzip.FxzipError as exc:
        # only a model in training mode may be refused
        assert mode != "eval", f"merge refused eval-mode models: {type(exc).__name__}: {exc}\n{context}"
        merged = None
    assert_untouched(model_a, before_a, "model A", context)
    assert_untouched(model_b, before_b, "model B", context)
    assert torch.equal(x, x_before), f"merge modified the calibration input in place\n{context}"
    assert _global_hook_counts() == global_hooks, f"merge left global module hooks\n{context}"
    assert torch.is_grad_enabled() == grad_enabled, f"merge changed torch.is_grad_enabled()\n{context}"
    if merged is not None and mode == "eval":
        out_a, out_b = run_merged(merged, x)
        assert torch.isfinite(out_a).all() and torch.isfinite(out_b).all(), \
            f"the merged module gives non-finite outputs\n{context}"
        # running the merged module does not touch the inputs either
        assert_untouched(model_a, before_a, "model A (after running the merged module)", context)
        assert_untouched(model_b, before_b, "model B (after running the merged module)", context)
