"""Matching of wide feature spaces: a planted permutation among thousands of features is found
exactly, and the fast paths (the tiled symmetric copy of the input checks, the ZipIt! greedy,
the negated-block Hungarian, the blocked `mix`) give the plain definitions' results bit for bit
on matrices wider than their tiles and blocks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from fxzip.matching import Match, match_features, mix
from fxzip.matching.correlation import TILE, _mirror_upper, symmetric_copy

from benchmarks.common.reference_zipit import reference_zipit


def planted(rng: np.random.Generator, n: int, samples: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(correlation of 2n features, perm): model A's features share low-rank structure, feature
    perm[i] of model B is a noisy copy of A's feature i (correlation about 0.96)."""
    latent = rng.standard_normal((samples, 16))
    a = latent @ rng.standard_normal((16, n)) * 0.3 + rng.standard_normal((samples, n))
    perm = rng.permutation(n)
    b = np.empty_like(a)
    b[:, perm] = a + 0.3 * rng.standard_normal(a.shape)
    return np.corrcoef(np.concatenate([a, b], axis=1), rowvar=False), perm


def mirrored(corr: np.ndarray) -> np.ndarray:
    """The upper triangle of corr (as float64) copied onto the lower one: what the matching sees."""
    upper = np.triu(np.asarray(corr, dtype=np.float64), 1)
    return upper + upper.T + np.diag(np.diag(corr).astype(np.float64))


def lowrank(rng: np.random.Generator, D: int) -> np.ndarray:
    """A realistic correlation matrix (np.corrcoef of low-rank data plus noise), not mirrored:
    np.corrcoef leaves last-bit asymmetries."""
    X = rng.standard_normal((200, 6)) @ rng.standard_normal((6, D))
    X += rng.standard_normal((200, D))
    return np.corrcoef(X, rowvar=False)


@pytest.fixture(scope="module")
def wide() -> tuple[np.ndarray, np.ndarray]:
    """A planted permutation between two models of 1,536 features (D = 3,072)."""
    return planted(np.random.default_rng(0), 1536)


def test_zipit_recovers_a_planted_permutation_of_thousands_of_features(wide):
    corr, perm = wide
    a, b = match_features(corr, [perm.size] * 2, "zipit").assign
    np.testing.assert_array_equal(b[perm], a)


def test_permute_recovers_a_planted_permutation_of_thousands_of_features(wide):
    corr, perm = wide
    a, b = match_features(corr, [perm.size] * 2, "permute").assign
    np.testing.assert_array_equal(b[perm], a)


def test_wider_zipit_merges_only_planted_pairs(wide):
    corr, perm = wide
    n = perm.size
    m = match_features(corr, [n, n], "zipit", out_size=n + n // 4)
    a, b = m.assign
    paired = b[perm] == a  # A's feature i shares its cluster with its copy
    assert paired.sum() == n - n // 4
    assert np.all(m.counts[a[~paired]] == 1)  # the others stay alone


@pytest.mark.parametrize("n", [150, 300, 450])
@pytest.mark.parametrize("alpha, beta, out_size", [
    (0.5, 1.0, None), (0.5, 0.0, None), (1.0, 0.5, None), (0.5, 1.0, "half"),
    (1.0, 1.0, "half"), (0.8, 1.0, "quarter"), (0.5, 1.0, "wider"),
])
def test_zipit_equals_the_plain_greedy(n, alpha, beta, out_size):
    rng = np.random.default_rng(n)
    corr = lowrank(rng, 2 * n)
    size = {None: n, "half": n // 2, "quarter": n // 4, "wider": n + n // 3}[out_size]
    fast = match_features(corr, [n, n], "zipit", alpha=alpha, beta=beta, out_size=size)
    assert fast == reference_zipit(mirrored(corr), [n, n], alpha, beta, size)


@pytest.mark.parametrize("n", [300, 500])
def test_zipit_of_float32_statistics_equals_the_plain_greedy(n):
    corr = lowrank(np.random.default_rng(1), 2 * n).astype(np.float32)
    assert match_features(corr, [n, n]) == reference_zipit(mirrored(corr), [n, n], 0.5, 1.0, n)


@pytest.mark.parametrize("n, out_size", [(300, 300), (700, 700), (700, 900)])
def test_permute_equals_the_plain_hungarian(n, out_size):
    corr = lowrank(np.random.default_rng(2), 2 * n)
    block = mirrored(corr)[:n, n:]
    rows, cols = linear_sum_assignment(block, maximize=True)
    b = np.empty(n, dtype=np.int64)
    b[cols] = rows
    apart = np.sort(np.argsort(block[b, np.arange(n)], kind="stable")[: out_size - n])
    b[apart] = n + np.arange(apart.size)
    expected = Match.from_assign([np.arange(n), b], out_size)
    assert match_features(corr, [n, n], "permute", out_size=out_size) == expected


@pytest.mark.parametrize("D", [TILE - 1, TILE + 1, 2 * TILE + 37])
def test_symmetric_copy_spans_several_tiles(D):
    rng = np.random.default_rng(D)
    A = rng.uniform(-1, 1, (D, D))
    S, gap = symmetric_copy(A)
    np.testing.assert_array_equal(S, mirrored(A))
    assert gap == np.abs(A - A.T).max()
    S32, _ = symmetric_copy(A.astype(np.float32))
    np.testing.assert_array_equal(S32, mirrored(A.astype(np.float32)))
    in_place = A.copy()
    assert _mirror_upper(in_place) == gap
    np.testing.assert_array_equal(in_place, S)
    assert symmetric_copy(S)[1] == 0.0
    for i, j in [(D - 1, 0), (0, D - 1), (D // 2, D // 2)]:
        bad = A.copy()
        bad[i, j] = np.nan
        assert math.isnan(symmetric_copy(bad)[1])
        bad[i, j] = np.inf
        assert math.isnan(symmetric_copy(bad)[1])


def test_mix_of_wide_matrices_equals_its_formula():
    rng = np.random.default_rng(3)
    corr, sim = lowrank(rng, 700), lowrank(rng, 700)
    for w in (0.25, 0.5):
        np.testing.assert_array_equal(mix(corr, sim, w), (1.0 - w) * corr + w * sim)
        assert mix(corr.astype(np.float32), sim, w).dtype == np.float64


@pytest.mark.parametrize("method", ["zipit", "permute"])
def test_an_owned_matrix_is_made_symmetric_in_place_with_the_same_match(method):
    """`owned=True` (the merge's own mixed matrix) symmetrises the matrix in place and matches on
    it instead of on a copy — no second D × D matrix for a wide space — and gives the copy's
    Match; a read-only or float32 matrix is still copied, unchanged."""
    from fxzip.matching import get_method

    rng = np.random.default_rng(3)
    corr, _ = planted(rng, TILE + 40)  # several tiles
    corr[np.tril_indices_from(corr, -1)] += 1e-9  # last-bit asymmetry below the diagonal
    expected = get_method(method).match(corr.copy(), [TILE + 40] * 2)
    owned = corr.copy()
    found = get_method(method).match(owned, [TILE + 40] * 2, owned=True)
    assert [a.tolist() for a in found.assign] == [a.tolist() for a in expected.assign]
    assert not np.array_equal(owned, corr)  # the working matrix itself: mirrored, then used
    for kept in (corr.astype(np.float32), corr.copy()):
        if kept.dtype == np.float64:
            kept.setflags(write=False)
        before = kept.copy()
        get_method(method).match(kept, [TILE + 40] * 2, owned=True)
        assert np.array_equal(kept, before)
