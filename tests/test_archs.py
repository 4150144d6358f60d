"""Tests of the test-model zoo and its permutation oracle (tests/archs.py); no fxzip needed."""
from __future__ import annotations

import torch
import torch.fx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

try:
    from archs import (EXAMPLE_SPECS, CNNSpec, Dense, MLPSpec, arch_specs, build, cnn_specs,
                       degenerate_features, example_input, mlp_specs, permuted_copy)
except ImportError:  # tests/ made a package
    from tests.archs import (EXAMPLE_SPECS, CNNSpec, Dense, MLPSpec, arch_specs, build, cnn_specs,
                             degenerate_features, example_input, mlp_specs, permuted_copy)

RTOL, ATOL = 1e-4, 1e-5
SETTINGS = settings(deadline=None, max_examples=30, suppress_health_check=[HealthCheck.too_slow])
seeds = st.integers(0, 2**16)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _check_oracle(spec, seed, perm_seed):
    model, x = build(spec, seed)
    assert not model.training and not any(m.training for m in model.modules()), spec
    before = _snapshot(model)
    with torch.no_grad():
        ref = model(x)
        other = permuted_copy(model, perm_seed)
        out = other(x)
    assert ref.shape == (x.shape[0], spec.classes), spec
    assert torch.isfinite(ref).all(), f"non-finite output for {spec!r}"
    assert not other.training and all(not m.training for m in other.modules()), spec
    # same function
    err = (out - ref).abs().max().item()
    assert torch.allclose(out, ref, rtol=RTOL, atol=ATOL), \
        f"permuted copy differs (max abs err {err:.3g}) for {spec!r}, seed={seed}, perm_seed={perm_seed}"
    # not the identity: at least one tensor changed (every hidden width is >= 2)
    after_perm = other.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(v, after_perm[k])]
    assert changed, f"permuted_copy changed no parameter for {spec!r}"
    # the argument is untouched, bit for bit
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), f"permuted_copy mutated {k} of the original for {spec!r}"
    # traceable, and the traced module computes the same thing (original and permuted copy)
    for m in (model, other):
        gm = torch.fx.symbolic_trace(m)
        with torch.no_grad():
            got, want = gm(x), m(x)
        assert torch.equal(got, want) or torch.allclose(got, want, rtol=RTOL, atol=ATOL), \
            f"symbolic_trace output differs for {spec!r}"
    return model, x, other


@SETTINGS
@given(spec=mlp_specs(), seed=seeds, perm_seed=seeds)
def test_permuted_copy_mlp(spec, seed, perm_seed):
    _check_oracle(spec, seed, perm_seed)


@SETTINGS
@given(spec=cnn_specs(), seed=seeds, perm_seed=seeds)
def test_permuted_copy_cnn(spec, seed, perm_seed):
    _check_oracle(spec, seed, perm_seed)


@pytest.mark.parametrize("spec", EXAMPLE_SPECS, ids=lambda s: type(s).__name__)
def test_permuted_copy_examples(spec):
    for seed in range(3):
        _check_oracle(spec, seed, seed + 100)


@settings(deadline=None, max_examples=10, suppress_health_check=[HealthCheck.too_slow])
@given(spec=arch_specs(), seed=seeds)
def test_build_is_deterministic_and_leaves_global_rng(spec, seed):
    state = torch.random.get_rng_state()
    m1, x1 = build(spec, seed)
    m2, x2 = build(spec, seed)
    assert torch.equal(torch.random.get_rng_state(), state), "build() touched the global RNG"
    assert torch.equal(x1, x2) and torch.equal(x1, example_input(spec, seed))
    assert 16 <= x1.shape[0] <= 32
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    p1, p2 = permuted_copy(m1, 5).state_dict(), permuted_copy(m1, 5).state_dict()
    assert all(torch.equal(p1[k], p2[k]) for k in p1), "permuted_copy is not deterministic in its seed"


@pytest.mark.parametrize("spec", EXAMPLE_SPECS, ids=lambda s: type(s).__name__)
def test_oracle_is_sensitive(spec):
    """Swapping two output units of the first layer without fixing its consumers changes the output,
    so the equality checks above are not vacuous."""
    model, x = build(spec, 0)
    broken = permuted_copy(model, 1)
    first = broken.body[0].fc if isinstance(spec, MLPSpec) else broken.body[0].conv
    with torch.no_grad():
        first.weight[[0, 1]] = first.weight[[1, 0]].clone()
        assert not torch.allclose(broken(x), model(x), rtol=RTOL, atol=ATOL)


def test_flatten_head_index():
    """The flatten head's column permutation is the channel permutation expanded over H*W."""
    spec = CNNSpec(4, 3, (), "flatten", 2, batch=16)
    model, x = build(spec, 0)
    other = permuted_copy(model, 0)
    with torch.no_grad():
        assert torch.allclose(other(x), model(x), rtol=RTOL, atol=ATOL)
    assert not torch.equal(other.head.fc.weight, model.head.fc.weight)


def test_degenerate_features():
    """A LayerNorm over 2 features feeding a Linear makes all of the Linear's outputs affine in one
    variable: flagged.  The hand-written specs have non-degenerate seeds."""
    model, x = build(MLPSpec(4, (Dense(2, "ln", "tanh"), Dense(5, None, "tanh")), 3), 0)
    assert degenerate_features(model, x) is not None
    for spec in EXAMPLE_SPECS:
        assert any(degenerate_features(*build(spec, seed)) is None for seed in range(5)), spec
