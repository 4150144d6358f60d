"""Tests for fxzip.matching: the fast ZipIt! greedy against a plain oracle, plus planted and edge cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxzip.errors import MatchingError
from fxzip.matching.match import Match
from fxzip.matching.correlation import _mirror_upper
from fxzip.matching.zipit import _zipit_merges, _ZipState
from fxzip.matching.registry import METHOD_NAMES, METHODS, match_features

from benchmarks.common.reference_zipit import reference_zipit

ALPHAS = (1.0, 0.5, 0.1)
BETAS = (0.0, 0.25, 0.5, 1.0)
FAST = settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
FEW = settings(max_examples=60, deadline=None, database=None)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def random_corr(rng: np.random.Generator, D: int, kind: str) -> np.ndarray:
    """A symmetric similarity matrix: uniform, heavily tied (1 decimal), or a real correlation."""
    if kind == "uniform":
        A = rng.uniform(-1, 1, (D, D))
        return (A + A.T) / 2
    if kind == "tied":
        A = np.triu(np.round(rng.uniform(-1, 1, (D, D)), 1), 1)
        return A + A.T
    X = rng.normal(size=(int(rng.integers(2, 2 * D + 3)), D))
    if kind == "corr_nan":
        X[:, rng.integers(D)] = 1.0  # a constant feature gives NaN correlations
    with np.errstate(invalid="ignore", divide="ignore"):
        C = np.corrcoef(X, rowvar=False)
    return (C + C.T) / 2  # exactly symmetric: float addition commutes


def fast_or_error(corr, sizes, alpha, beta, out_size):
    """Run the fast zipit, returning the Match or the string 'error' on MatchingError."""
    try:
        return match_features(corr, sizes, "zipit", alpha=alpha, beta=beta, out_size=out_size)
    except MatchingError:
        return "error"


def reference_or_error(corr, sizes, alpha, beta, out_size):
    """Run the reference zipit, returning the Match or the string 'error' on MatchingError."""
    try:
        return reference_zipit(corr, sizes, alpha, beta, out_size)
    except MatchingError:
        return "error"


def assert_same(fast, ref) -> None:
    """Both raised, or both produced exactly the same assignment arrays."""
    if isinstance(fast, str) or isinstance(ref, str):
        assert fast == ref
        return
    assert fast.size == ref.size
    for a, b in zip(fast.assign, ref.assign, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(fast.counts, ref.counts)


def check_invariants(m: Match, sizes, out_size: int) -> None:
    """Counts add up, no cluster is empty, and the requested width is honoured."""
    assert m.size == out_size
    assert m.widths == tuple(sizes)
    assert int(m.counts.sum()) == sum(sizes)
    assert (m.counts > 0).all()
    for a in m.assign:
        assert a.dtype == np.int64
        assert ((0 <= a) & (a < m.size)).all()


def pure_merges_per_model(merges, sizes) -> list[int]:
    """Replay a merge history and count, per model, merges of two clusters pure in that model."""
    owner = np.repeat(np.arange(len(sizes)), sizes)  # model of a pure cluster, -1 if mixed
    counts = [0] * len(sizes)
    for r, c in merges:
        if owner[r] >= 0 and owner[r] == owner[c]:
            counts[owner[r]] += 1
        else:
            owner[r] = -1
        owner[c] = -1
    return counts


def planted_corr(rng: np.random.Generator, n: int, perms) -> np.ndarray:
    """Correlation of model A's features X and of models whose features are X permuted."""
    X = rng.normal(size=(4 * n + 50, n))
    blocks = [X]
    for perm in perms:
        B = np.empty_like(X)
        B[:, perm] = X  # feature perm[i] of this model is feature i of model A
        blocks.append(B)
    C = np.corrcoef(np.concatenate(blocks, axis=1), rowvar=False)
    return (C + C.T) / 2


# ---------------------------------------------------------------------------
# Fast zipit == reference
# ---------------------------------------------------------------------------


@st.composite
def zipit_cases(draw, equal_sizes: bool = True):
    """Sizes, a similarity matrix and zipit options."""
    N = draw(st.sampled_from([2, 3]))
    if equal_sizes:
        sizes = [draw(st.integers(1, 24))] * N
    else:
        sizes = draw(st.lists(st.integers(1, 24), min_size=N, max_size=N))
    D = sum(sizes)
    kind = draw(st.sampled_from(["uniform", "tied", "corr", "corr_nan"]))
    seed = draw(st.integers(0, 2**32 - 1))
    corr = random_corr(np.random.default_rng(seed), D, kind)
    alpha = draw(st.sampled_from(ALPHAS))
    beta = draw(st.sampled_from(BETAS))
    out_size = draw(st.one_of(st.none(), st.integers(sizes[0], D), st.integers(1, D)))
    return corr, sizes, alpha, beta, out_size


@FAST
@given(zipit_cases())
def test_fast_zipit_equals_reference(case):
    corr, sizes, alpha, beta, out_size = case
    target = sizes[0] if out_size is None else out_size
    fast = fast_or_error(corr, sizes, alpha, beta, out_size)
    assert_same(fast, reference_or_error(corr, sizes, alpha, beta, target))
    if not isinstance(fast, str):
        check_invariants(fast, sizes, target)


@FEW
@given(zipit_cases(equal_sizes=False))
def test_fast_zipit_equals_reference_unequal_sizes(case):
    corr, sizes, alpha, beta, out_size = case
    target = sizes[0] if out_size is None else out_size
    fast = fast_or_error(corr, sizes, alpha, beta, out_size)
    assert_same(fast, reference_or_error(corr, sizes, alpha, beta, target))


def test_all_ties_matrix_equals_reference():
    # A constant matrix makes every pair a tie: the row-major tie-break decides everything.
    for N, n, beta in itertools.product([2, 3], [1, 4, 9], BETAS):
        D = N * n
        corr = np.full((D, D), 0.3)
        for alpha in ALPHAS:
            assert_same(
                fast_or_error(corr, [n] * N, alpha, beta, n),
                reference_or_error(corr, [n] * N, alpha, beta, n),
            )


def test_last_bit_asymmetry_is_resolved_by_the_upper_triangle():
    # np.corrcoef is not exactly symmetric; the upper triangle is what counts.
    rng = np.random.default_rng(3)
    n = 20
    C = np.corrcoef(rng.normal(size=(15, 2 * n)), rowvar=False)
    mirrored = np.triu(C, 1) + np.triu(C, 1).T
    for beta in BETAS:
        assert_same(
            fast_or_error(C, [n, n], 0.5, beta, None),
            reference_or_error(mirrored, [n, n], 0.5, beta, n),
        )


def test_nan_is_treated_as_zero():
    rng = np.random.default_rng(4)
    corr = random_corr(rng, 12, "uniform")
    corr[2, 7] = corr[7, 2] = np.nan
    zeroed = corr.copy()
    zeroed[2, 7] = zeroed[7, 2] = 0.0
    assert match_features(corr, [6, 6]) == match_features(zeroed, [6, 6])
    assert match_features(corr, [6, 6], "permute") == match_features(zeroed, [6, 6], "permute")


def test_float32_and_rounding_asymmetry_are_accepted():
    rng = np.random.default_rng(13)
    corr = random_corr(rng, 20, "corr")
    noisy = corr + np.triu(rng.uniform(-1e-6, 1e-6, corr.shape), 1)  # lower triangle untouched
    expected = reference_zipit(np.triu(noisy, 1) + np.triu(noisy, 1).T, [10, 10], 0.5, 1.0, 10)
    assert match_features(noisy, [10, 10]) == expected
    as32 = corr.astype(np.float32)
    assert match_features(as32, [10, 10]) == reference_zipit(as32, [10, 10], 0.5, 1.0, 10)


def structured_corr(rng: np.random.Generator, D: int, kind: str) -> np.ndarray:
    """Harder similarity matrices: coarse ties, constant blocks, or low-rank correlations."""
    if kind == "quarters":  # few distinct values: ties everywhere
        A = np.triu(np.round(rng.uniform(-1, 1, (D, D)) * 4) / 4, 1)
        return A + A.T
    if kind == "blocks":  # a constant value per pair of feature groups
        group = rng.integers(0, 4, D)
        values = np.round(rng.uniform(-1, 1, (4, 4)), 1)
        return ((values + values.T) / 2)[group][:, group]
    X = rng.normal(size=(60, 3)) @ rng.normal(size=(3, D)) + 0.3 * rng.normal(size=(60, D))
    C = np.corrcoef(X, rowvar=False)
    return (C + C.T) / 2


@pytest.mark.parametrize("seed", range(32))
def test_fast_zipit_equals_reference_on_larger_structured_matrices(seed):
    # Bigger than the hypothesis cases: merged clusters merge again and get deep, budgets
    # run out mid-way, alpha near or above 1 keeps deep clusters competitive.
    rng = np.random.default_rng(100 + seed)
    N = int(rng.choice([2, 3, 4]))
    if seed % 2:
        sizes = [int(s) for s in rng.integers(10, 40, N)]
    else:
        sizes = [int(rng.integers(10, 40))] * N
    D = sum(sizes)
    kind = ["uniform", "quarters", "blocks", "lowrank"][seed % 4]
    corr = random_corr(rng, D, kind) if kind == "uniform" else structured_corr(rng, D, kind)
    alpha = float(rng.choice([0.5, 1.0, 0.3, 0.999, 2.0]))
    beta = float(rng.choice([0.0, 0.25, 0.5, 1.0, 2.0]))
    for out_size in (sizes[0], D // 3, D // (2 * N), 1):
        assert_same(
            fast_or_error(corr, sizes, alpha, beta, out_size),
            reference_or_error(corr, sizes, alpha, beta, out_size),
        )


@pytest.mark.parametrize("leaf_depth", [0, 1, 2])
def test_far_reads_and_input_row_formula_agree(monkeypatch, leaf_depth):
    # _ZipState computes a merged row from the two input rows while clusters are at most
    # MAX_LEAF_DEPTH deep, and by gathering the younger rows otherwise; both must agree.
    monkeypatch.setattr(_ZipState, "MAX_LEAF_DEPTH", leaf_depth)
    rng = np.random.default_rng(leaf_depth)
    for kind, alpha, beta, out_size in [
        ("lowrank", 0.5, 1.0, 30), ("quarters", 0.5, 0.5, 10), ("lowrank", 0.3, 2.0, 1),
    ]:
        corr = structured_corr(rng, 60, kind)
        assert_same(
            fast_or_error(corr, [30, 30], alpha, beta, out_size),
            reference_or_error(corr, [30, 30], alpha, beta, out_size),
        )


@pytest.mark.parametrize("alpha, beta", [(0.5, 1.0), (0.5, 0.0), (1.0, 0.5)])
def test_fast_zipit_equals_reference_on_realistic_correlations(alpha, beta):
    # Like the speed benchmark: two models of n features, partly permuted copies of each other.
    rng = np.random.default_rng(14)
    n, rank = 192, 48
    latent = rng.standard_normal((1024, rank))
    load_a = rng.standard_normal((rank, n))
    share = rng.uniform(0.0, 1.0, n)
    load_b = share * load_a[:, rng.permutation(n)]
    load_b += np.sqrt(1 - share**2) * rng.standard_normal((rank, n))
    data = latent @ np.concatenate([load_a, load_b], axis=1)
    data += 3 * rng.standard_normal(data.shape)
    C = np.corrcoef(data, rowvar=False)
    C = (C + C.T) / 2
    assert_same(
        fast_or_error(C, [n, n], alpha, beta, None), reference_or_error(C, [n, n], alpha, beta, n)
    )


@pytest.mark.parametrize("D", [1, 2, 5, 31, 32, 33, 70])
def test_mirror_upper_copies_the_upper_triangle_and_measures_asymmetry(D):
    rng = np.random.default_rng(D)
    A = rng.uniform(-1, 1, (D, D))
    S = A.copy()
    assert _mirror_upper(S) == np.abs(A - A.T).max()
    np.testing.assert_array_equal(S, np.triu(A) + np.triu(A, 1).T)
    symmetric = S.copy()
    assert _mirror_upper(S) == 0.0
    np.testing.assert_array_equal(S, symmetric)
    if D > 1:
        S[D - 1, 0] = np.nan
        assert math.isnan(_mirror_upper(S))


# ---------------------------------------------------------------------------
# Planted permutations
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_zipit_recovers_planted_permutation(alpha, beta):
    rng = np.random.default_rng(5)
    n = 16
    perm = rng.permutation(n)
    m = match_features(planted_corr(rng, n, [perm]), [n, n], alpha=alpha, beta=beta)
    a, b = m.assign
    np.testing.assert_array_equal(b[perm], a)
    assert m.within_merges == 0


def test_zipit_recovers_planted_permutation_three_models():
    rng = np.random.default_rng(6)
    n = 12
    perms = [rng.permutation(n), rng.permutation(n)]
    m = match_features(planted_corr(rng, n, perms), [n] * 3, alpha=0.5, beta=0.5)
    a, b, c = m.assign
    np.testing.assert_array_equal(b[perms[0]], a)
    np.testing.assert_array_equal(c[perms[1]], a)
    np.testing.assert_array_equal(m.counts, np.full(n, 3))


def test_permute_recovers_planted_permutation():
    rng = np.random.default_rng(7)
    n = 16
    perms = [rng.permutation(n), rng.permutation(n)]
    m = match_features(planted_corr(rng, n, perms), [n] * 3, "permute")
    a, b, c = m.assign
    np.testing.assert_array_equal(a, np.arange(n))
    np.testing.assert_array_equal(b[perms[0]], a)
    np.testing.assert_array_equal(c[perms[1]], a)


def test_wider_permute_keeps_the_least_correlated_pairs_apart():
    rng = np.random.default_rng(9)
    n = 12
    X = rng.normal(size=(400, n))
    B = X[:, rng.permutation(n)] + rng.normal(size=(400, n)) * np.linspace(0.1, 2.0, n)
    corr = np.corrcoef(np.concatenate([X, B], axis=1), rowvar=False)
    corr = (corr + corr.T) / 2  # partners alike to different degrees
    narrow = match_features(corr, [n, n], "permute")
    partner = corr[:n, n:][narrow.assign[1], np.arange(n)]  # each B feature's correlation
    for extra in (0, 1, 5, n):
        wide = match_features(corr, [n, n], "permute", out_size=n + extra)
        check_invariants(wide, [n, n], n + extra)
        np.testing.assert_array_equal(wide.assign[0], np.arange(n))
        apart = np.flatnonzero(wide.assign[1] >= n)
        assert apart.size == extra
        kept = np.setdiff1d(np.arange(n), apart)
        np.testing.assert_array_equal(wide.assign[1][kept], narrow.assign[1][kept])
        if 0 < extra < n:
            assert partner[apart].max() <= partner[kept].min()


def test_average_is_identity():
    rng = np.random.default_rng(8)
    n = 10
    m = match_features(planted_corr(rng, n, [rng.permutation(n)]), [n, n], "average")
    assert m == Match.identity(n, 2)
    for a in m.assign:
        np.testing.assert_array_equal(a, np.arange(n))
    np.testing.assert_array_equal(m.counts, np.full(n, 2))


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_permute_maximises_total_correlation(n):
    rng = np.random.default_rng(n)
    corr = random_corr(rng, 2 * n, "uniform")
    b = match_features(corr, [n, n], "permute").assign[1]
    block = corr[:n, n:]
    best = max(sum(block[p[j], j] for j in range(n)) for p in itertools.permutations(range(n)))
    assert math.isclose(sum(block[b[j], j] for j in range(n)), best, rel_tol=1e-12, abs_tol=1e-12)


# ---------------------------------------------------------------------------
# Budgets (beta)
# ---------------------------------------------------------------------------


@FEW
@given(
    N=st.sampled_from([2, 3]),
    n=st.integers(1, 24),
    seed=st.integers(0, 2**32 - 1),
    kind=st.sampled_from(["uniform", "tied", "corr"]),
    alpha=st.sampled_from(ALPHAS),
)
def test_beta_zero_merges_only_across_models(N, n, seed, kind, alpha):
    corr = random_corr(np.random.default_rng(seed), N * n, kind)
    try:
        m = match_features(corr, [n] * N, alpha=alpha, beta=0.0)
    except MatchingError:
        # With 3+ models the greedy can strand clusters that all share a model
        # (e.g. {a,b}, {a,c}, {b,c}); with 2 models that cannot happen.
        assert N > 2
        return
    assert m.within_merges == 0
    # Equal widths and out_size == n: every cluster holds exactly one feature of each model.
    np.testing.assert_array_equal(m.counts, np.full(n, N))
    for a in m.assign:
        np.testing.assert_array_equal(np.sort(a), np.arange(n))


def within_model_friendly_corr(rng: np.random.Generator, sizes) -> np.ndarray:
    """Features of the same model are much more alike than features of different models."""
    D = sum(sizes)
    owner = np.repeat(np.arange(len(sizes)), sizes)
    same = owner[:, None] == owner[None, :]
    A = np.where(same, 0.9, 0.1) + rng.uniform(-0.05, 0.05, (D, D))
    return np.triu(A, 1) + np.triu(A, 1).T


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize(
    "sizes, out_size", [([8, 8], 8), ([10, 10, 10], 25), ([12, 7], 12), ([12, 7], 15)]
)
def test_within_model_budget_is_used_exactly(sizes, out_size, beta):
    # Within-model pairs always look best, so the greedy spends each budget in full.
    corr = within_model_friendly_corr(np.random.default_rng(9), sizes)
    labels, merges = _zipit_merges(corr, sizes, alpha=1.0, beta=beta, out_size=out_size)
    to_remove = sum(sizes) - out_size
    budget = math.floor(beta * to_remove / len(sizes) + 1e-9)
    assert len(merges) == to_remove
    assert pure_merges_per_model(merges, sizes) == [min(budget, s - 1) for s in sizes]
    assert np.unique(labels).size == out_size


@FEW
@given(zipit_cases(equal_sizes=False))
def test_within_model_budget_is_never_exceeded(case):
    corr, sizes, alpha, beta, out_size = case
    out_size = sizes[0] if out_size is None else out_size
    try:
        _, merges = _zipit_merges(corr, sizes, alpha=alpha, beta=beta, out_size=out_size)
    except MatchingError:
        return
    budget = math.floor(beta * (sum(sizes) - out_size) / len(sizes) + 1e-9)
    assert all(k <= budget for k in pure_merges_per_model(merges, sizes))


def test_merge_history_matches_returned_match():
    corr = random_corr(np.random.default_rng(10), 30, "tied")
    labels, merges = _zipit_merges(corr, [15, 15], alpha=0.5, beta=0.5, out_size=15)
    assert all(r < c for r, c in merges)
    reps = np.unique(labels)
    m = match_features(corr, [15, 15], alpha=0.5, beta=0.5)
    ids = np.searchsorted(reps, labels)
    np.testing.assert_array_equal(np.concatenate(m.assign), ids)


# ---------------------------------------------------------------------------
# Match invariants and API
# ---------------------------------------------------------------------------


@FAST
@given(
    sizes=st.lists(st.integers(1, 20), min_size=1, max_size=3),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_zipit_match_invariants(sizes, seed, data):
    D = sum(sizes)
    out_size = data.draw(st.integers(1, D))
    corr = random_corr(np.random.default_rng(seed), D, "uniform")
    # beta = N gives every model a budget of all merges: nothing is forbidden, nothing can fail.
    m = match_features(corr, sizes, alpha=0.5, beta=float(len(sizes)), out_size=out_size)
    check_invariants(m, sizes, out_size)


def test_beta_zero_with_three_models_can_get_stuck():
    # Known limit of the greedy: clusters {a,b}, {a,c}, {b,c} all share a model, so
    # with beta=0 nothing can merge them. Three identical-ish models are enough.
    # Models a = (0, 1), b = (2, 3), c = (4, 5); strongest pairs a0-b0, a1-c0, b1-c1.
    corr = np.full((6, 6), 0.1)
    for i, j, v in [(0, 2, 0.9), (1, 4, 0.8), (3, 5, 0.7)]:
        corr[i, j] = corr[j, i] = v
    with pytest.raises(MatchingError, match="no mergeable pair"):
        match_features(corr, [2, 2, 2], beta=0.0)
    with pytest.raises(MatchingError):
        reference_zipit(corr, [2, 2, 2], 0.5, 0.0, 2)
    check_invariants(match_features(corr, [2, 2, 2], beta=3.0), [2, 2, 2], 2)


def test_identity_and_from_assign():
    m = Match.identity(4, 3)
    assert m.size == 4 and m.num_models == 3
    np.testing.assert_array_equal(m.counts, [3, 3, 3, 3])
    m2 = Match.from_assign([np.array([0, 1, 1]), np.array([2, 0])], 3)
    np.testing.assert_array_equal(m2.counts, [2, 2, 1])
    assert m2.within_merges == 1
    assert repr(m2) == "Match(size=3, widths=(3, 2), within_merges=1)"
    assert m2 == Match.from_assign([[0, 1, 1], [2, 0]], 3)
    assert m2 != Match.from_assign([[0, 1, 1], [0, 2]], 3)
    assert hash(m2) == hash(Match.from_assign([[0, 1, 1], [2, 0]], 3))


def test_across_pairs_name_each_feature_with_the_first_of_a_later_model():
    # clusters: 0 = {a0, a1, b1}, 1 = {a2}, 2 = {b0, c0, c1}; offsets 0, 3, 5
    m = Match.from_assign([[0, 0, 1], [2, 0], [2, 2]], 3)
    rows, cols = m.across_pairs()
    assert list(zip(rows.tolist(), cols.tolist())) == [(0, 4), (1, 4), (3, 5)]
    assert Match.identity(3, 1).across_pairs()[0].size == 0


def test_methods_registry():
    assert METHOD_NAMES == ("average", "permute", "zipit")  # the paper's, which the demo compares
    assert tuple(METHODS) == METHOD_NAMES + ("cca", "weights")
    assert [METHODS[name].needs_statistics for name in METHODS] == [False, True, True, True, False]
    assert [METHODS[name].widens for name in METHODS] == [False, True, True, False, False]
    assert METHODS["cca"].statistic == "covariance"
    assert METHODS["average"].match(None, [3, 3]) == Match.identity(3, 2)
    with pytest.raises(MatchingError, match="needs the correlation matrix"):
        METHODS["zipit"].match(None, [3, 3])

def test_match_arrays_are_read_only():
    source = np.array([0, 1])
    m = Match.from_assign([source, np.array([1, 0])], 2)
    source[0] = 1  # the Match holds its own copy
    assert m.assign[0][0] == 0
    with pytest.raises(ValueError):
        m.assign[0][0] = 1
    with pytest.raises(ValueError):
        m.counts[0] = 5


@pytest.mark.parametrize(
    "assign, size",
    [
        ([[0, 0], [0, 0]], 2),  # cluster 1 is empty
        ([[0, 2]], 2),  # value out of range
        ([[0, -1]], 2),  # negative value
        ([[[0, 1]]], 2),  # not 1-D
        ([[0.0, 1.0]], 2),  # not integers
        ([[0]], 0),  # size below 1
    ],
)
def test_from_assign_rejects_bad_input(assign, size):
    with pytest.raises(MatchingError):
        Match.from_assign([np.asarray(a) for a in assign], size)


def test_constructor_rejects_wrong_counts():
    with pytest.raises(MatchingError):
        Match(assign=(np.array([0, 1]),), size=2, counts=np.array([2, 0]))


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def sym(D: int) -> np.ndarray:
    return random_corr(np.random.default_rng(11), D, "uniform")


@pytest.mark.parametrize(
    "corr, sizes, kwargs, needle",
    [
        (sym(8), [4, 4], {"method": "nope"}, "unknown matching method"),
        (sym(8), [4, 5], {}, "expected (9, 9)"),
        (sym(8)[:, :7], [4, 4], {}, "expected (8, 8)"),
        (np.zeros(8), [4, 4], {}, "expected (8, 8)"),
        ([[0.0, 1.0], [1.0]], [1, 1], {}, "numeric"),
        (sym(8), [4, 4], {"out_size": 0}, "out_size"),
        (sym(8), [4, 4], {"out_size": 9}, "out_size"),
        (sym(8), [4, 4], {"out_size": 2.5}, "out_size"),
        (sym(8), [], {}, "sizes"),
        (sym(8), [8, 0], {}, "at least one feature"),
        (sym(8), [4, 4], {"alpha": 0.0}, "alpha"),
        (sym(8), [4, 4], {"alpha": float("nan")}, "alpha"),
        (sym(8), [4, 4], {"beta": -0.5}, "beta"),
        (sym(8), [3, 5], {"method": "average"}, "same width"),
        (sym(8), [3, 5], {"method": "permute"}, "same width"),
        (sym(8), [4, 4], {"method": "average", "out_size": 5}, "out_size must be 4"),
        (sym(8), [4, 4], {"method": "permute", "out_size": 3}, "out_size must be >= 4"),
        (np.arange(64.0).reshape(8, 8), [4, 4], {}, "symmetric"),
        (np.where(np.eye(8) > 0, np.inf, sym(8)), [4, 4], {}, "inf"),
    ],
)
def test_bad_input_raises_matching_error(corr, sizes, kwargs, needle):
    with pytest.raises(MatchingError) as info:
        match_features(corr, sizes, **kwargs)
    assert needle in str(info.value)


def test_impossible_merge_raises():
    # beta=0 forbids merging model 0's features together, and the lone model-1
    # feature can absorb only one of them: out_size=1 cannot be reached.
    corr = sym(4)
    with pytest.raises(MatchingError, match="no mergeable pair"):
        match_features(corr, [3, 1], beta=0.0, out_size=1)
    with pytest.raises(MatchingError):
        reference_zipit(corr, [3, 1], 0.5, 0.0, 1)


def test_no_merges_when_out_size_is_total():
    corr = sym(6)
    m = match_features(corr, [3, 3], out_size=6)
    np.testing.assert_array_equal(np.concatenate(m.assign), np.arange(6))


# ---------------------------------------------------------------------------
# Speed sanity (no timing assertion)
# ---------------------------------------------------------------------------


def test_fast_zipit_runs_at_width_512():
    n = 512
    rng = np.random.default_rng(12)
    C = np.corrcoef(rng.normal(size=(1200, 2 * n)).astype(np.float32), rowvar=False)
    m = match_features(C, [n, n], alpha=0.5, beta=0.5)
    check_invariants(m, [n, n], n)
