"""Feature matching: `Match` and the algorithms that decide which features of N models become
one merged feature.

A `Match` says, for every model, the merged feature (cluster) each of its features goes to.
The algorithms work on the correlation matrix of the concatenated features of N models, checked
by `check_inputs`: `permutation_match` (Git Re-Basin activation matching, every model aligned to
model 0) and `zipit_match` (the ZipIt! greedy, which may also merge features of the same model).
The named merge methods built on them are in `fxzip.matching.registry`.
"""

from __future__ import annotations

import gc
import heapq
import math
import operator
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from ..errors import MatchingError

__all__ = ["Match", "check_inputs", "equal_widths", "permutation_match", "zipit_match",
           "cca_match", "covariance"]

_NEG_INF = -np.inf


# ---------------------------------------------------------------------------
# Match
# ---------------------------------------------------------------------------


def _frozen_int_array(values: np.ndarray | Sequence[int], what: str) -> np.ndarray:
    """Copy `values` to a read-only 1-D int64 array, so a frozen Match stays frozen."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise MatchingError(f"{what} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise MatchingError(f"{what} must hold integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=True)
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True)
class Match:
    """How the features of N models map to merged features: a cluster index per input feature.

    `assign[k][i]` is the merged feature that feature i of model k belongs to;
    `counts[m]` is how many input features (over all models) merged feature m has.

    `maps` (None for the usual selection-and-average match) makes the match DENSE: per model k a
    pair (M_k, U_k) of float64 matrices, M_k (size × n_k) merging model k's features into the
    merged ones (merged = Σ_k M_k f_k) and U_k (n_k × size) unmerging them (f_k ≈ U_k merged),
    e.g. an invertible alignment from CCA ("cca"). `assign` then only describes the match
    (model k's feature i is reported with the merged feature it weighs most).
    """

    assign: tuple[np.ndarray, ...]
    size: int
    counts: np.ndarray
    maps: tuple[tuple[np.ndarray, np.ndarray], ...] | None = None

    def __post_init__(self) -> None:
        """Normalise to read-only int64 arrays and check that counts agree with assign."""
        size, assign = _checked_assign(self.assign, self.size)
        counts = _frozen_int_array(self.counts, "Match.counts")
        if not np.array_equal(counts, _count_members(assign, size)):
            raise MatchingError("Match.counts does not equal the number of members per cluster")
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "assign", assign)
        object.__setattr__(self, "counts", counts)
        if self.maps is not None:
            object.__setattr__(self, "maps", _checked_maps(self.maps, size, assign))

    @property
    def dense(self) -> bool:
        """Whether the match merges by dense matrices (`maps`) rather than by selection."""
        return self.maps is not None

    def merge_matrix(self, k: int) -> np.ndarray:
        """M_k (size × n_k): merged features = Σ_k M_k f_k (a cluster's average for a selection)."""
        if self.maps is not None:
            return self.maps[k][0]
        a = self.assign[k]
        out = np.zeros((self.size, a.size))
        out[a, np.arange(a.size)] = 1.0 / self.counts[a]
        return out

    def unmerge_matrix(self, k: int) -> np.ndarray:
        """U_k (n_k × size): model k's features read from the merged ones (a selection)."""
        if self.maps is not None:
            return self.maps[k][1]
        a = self.assign[k]
        out = np.zeros((a.size, self.size))
        out[np.arange(a.size), a] = 1.0
        return out

    @classmethod
    def identity(cls, n: int, num_models: int) -> "Match":
        """Feature i of every model goes to cluster i: what plain weight averaging does."""
        n, num_models = operator.index(n), operator.index(num_models)
        if n < 1 or num_models < 1:
            raise MatchingError(
                f"Match.identity needs n >= 1 and num_models >= 1, got n={n}, num_models={num_models}"
            )
        assign = tuple(np.arange(n, dtype=np.int64) for _ in range(num_models))
        return cls(assign=assign, size=n, counts=np.full(n, num_models, dtype=np.int64))

    @classmethod
    def from_assign(cls, assign: Sequence[np.ndarray], size: int) -> "Match":
        """Build a Match from per-model cluster indices; every cluster must get a member."""
        size, arrays = _checked_assign(assign, size)
        counts = _count_members(arrays, size)
        empty = np.flatnonzero(counts == 0)
        if empty.size:
            raise MatchingError(
                f"every cluster needs at least one member, but clusters {empty[:10].tolist()}"
                f"{' ...' if empty.size > 10 else ''} of {size} are empty"
            )
        return cls(assign=arrays, size=size, counts=counts)

    @property
    def num_models(self) -> int:
        """Number of models the match covers."""
        return len(self.assign)

    @property
    def widths(self) -> tuple[int, ...]:
        """Number of features of each model."""
        return tuple(int(a.size) for a in self.assign)

    @property
    def within_merges(self) -> int:
        """Features that share a cluster with an earlier feature of the same model."""
        return int(sum(a.size - np.unique(a).size for a in self.assign))

    def across_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """Features of two models merged into one cluster, as (rows, cols) indices into the
        concatenated features (model k's feature i is ``sum(widths[:k]) + i``): for every model
        pair k < j, each feature of model k with the first feature of model j in its cluster.
        Indexing a correlation matrix with them gives the correlations of the merged features."""
        offsets = np.cumsum([0, *self.widths])
        first = []  # per model: its first feature in each cluster, -1 where it has none
        for a in self.assign:
            first.append(np.full(self.size, -1, dtype=np.int64))
            clusters, index = np.unique(a, return_index=True)
            first[-1][clusters] = index
        rows, cols = [], []
        for k in range(self.num_models):
            for j in range(k + 1, self.num_models):
                hits = first[j][self.assign[k]]
                found = np.flatnonzero(hits >= 0)
                rows.append(offsets[k] + found)
                cols.append(offsets[j] + hits[found])
        if not rows:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate(rows), np.concatenate(cols)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Match):
            return NotImplemented
        return (
            self.size == other.size
            and len(self.assign) == len(other.assign)
            and all(np.array_equal(a, b) for a, b in zip(self.assign, other.assign))
            and (self.maps is None) == (other.maps is None)
            and (self.maps is None or all(np.array_equal(x, y) for p, q in zip(self.maps, other.maps)
                                          for x, y in zip(p, q)))
        )

    def __hash__(self) -> int:
        return hash((self.size, tuple(a.tobytes() for a in self.assign), self.maps is None))

    def __repr__(self) -> str:
        return (
            f"Match(size={self.size}, widths={self.widths}, "
            f"within_merges={self.within_merges})"
        )


def _checked_assign(assign: Sequence[np.ndarray], size: int) -> tuple[int, tuple[np.ndarray, ...]]:
    """Validate size >= 1 and one int array per model with values in [0, size)."""
    size = operator.index(size)
    if size < 1:
        raise MatchingError(f"Match.size must be >= 1, got {size}")
    arrays = tuple(_frozen_int_array(a, f"assign[{k}]") for k, a in enumerate(assign))
    if not arrays:
        raise MatchingError("assign must hold one array per model, got none")
    for k, a in enumerate(arrays):
        if a.size and (a.min() < 0 or a.max() >= size):
            raise MatchingError(
                f"assign[{k}] has values outside [0, {size}): min {a.min()}, max {a.max()}"
            )
    return size, arrays


def _checked_maps(maps, size: int, assign: tuple[np.ndarray, ...]):
    """One (M_k (size × n_k), U_k (n_k × size)) pair of finite float64 matrices per model."""
    if len(maps) != len(assign):
        raise MatchingError(f"maps must hold one (merge, unmerge) pair per model ({len(assign)}), "
                            f"got {len(maps)}")
    out = []
    for k, (pair, a) in enumerate(zip(maps, assign)):
        merge, unmerge = (np.array(m, dtype=np.float64, copy=True) for m in pair)
        if merge.shape != (size, a.size) or unmerge.shape != (a.size, size):
            raise MatchingError(f"maps[{k}] must be ({size}, {a.size}) and ({a.size}, {size}) "
                                f"matrices, got {merge.shape} and {unmerge.shape}")
        if not (np.isfinite(merge).all() and np.isfinite(unmerge).all()):
            raise MatchingError(f"maps[{k}] holds NaN or inf")
        merge.setflags(write=False)
        unmerge.setflags(write=False)
        out.append((merge, unmerge))
    return tuple(out)


def _count_members(assign: Sequence[np.ndarray], size: int) -> np.ndarray:
    """Members per cluster, summed over all models."""
    counts = np.zeros(size, dtype=np.int64)
    for a in assign:
        counts += np.bincount(a, minlength=size)
    return counts


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------


def check_inputs(
    corr: np.ndarray | None,
    sizes: Sequence[int],
    *,
    out_size: int | None = None,
    alpha: float = 0.5,
    beta: float = 1.0,
) -> tuple[np.ndarray | None, list[int], int, float, float]:
    """Validate the inputs of a matching; return (corr, sizes, out_size, alpha, beta) normalised.

    `corr` is (D, D) with D = sum(sizes) (model k owns the contiguous block of sizes[k]
    rows/columns); it comes back as a symmetric float64 copy with NaN set to 0, or None when
    None was given (a method that needs no correlations). `out_size` defaults to sizes[0].
    """
    sizes = _check_sizes(sizes)
    S = None if corr is None else _check_corr(corr, sum(sizes))
    out_size = _check_out_size(out_size, sizes)
    alpha, beta = _check_alpha_beta(alpha, beta)
    return S, sizes, out_size, alpha, beta


def _check_sizes(sizes: Sequence[int]) -> list[int]:
    """Sizes must be a non-empty list of positive integers (one per model)."""
    try:
        out = [operator.index(s) for s in sizes]
    except TypeError as exc:
        raise MatchingError(f"sizes must be a sequence of ints, got {sizes!r}") from exc
    if not out:
        raise MatchingError("sizes is empty; give the feature count of each model (at least one)")
    if min(out) < 1:
        raise MatchingError(f"every model needs at least one feature, got sizes={out}")
    return out


def _check_corr(corr: np.ndarray, total: int) -> np.ndarray:
    """Return a symmetric float64 copy of corr with NaN set to 0 (NaN = no information)."""
    try:
        S = np.array(corr, dtype=np.float64, copy=True)
    except (TypeError, ValueError) as exc:
        raise MatchingError(f"corr must be a numeric (D, D) array, got {type(corr).__name__}") from exc
    if S.shape != (total, total):
        raise MatchingError(
            f"corr has shape {S.shape} but sizes sum to {total}; expected ({total}, {total})"
        )
    asymmetry = _mirror_upper(S)  # NaN or inf anywhere make it non-finite
    if not math.isfinite(asymmetry):  # the rare case: start again from corr
        S = np.array(corr, dtype=np.float64, copy=True)
        S[np.isnan(S)] = 0.0
        if not np.all(np.isfinite(S)):
            raise MatchingError(
                "corr contains +inf or -inf; only finite values (or NaN) are allowed"
            )
        asymmetry = _mirror_upper(S)  # non-finite now only if corr - corr.T overflows
        if not math.isfinite(asymmetry):
            asymmetry = math.inf
    # loose: float32/TF32 statistics are fine
    if asymmetry and asymmetry > 1e-4 * max(float(S.max()), -float(S.min())):
        raise MatchingError(
            f"corr must be symmetric (a correlation matrix), but corr and corr.T differ by up "
            f"to {asymmetry:.3g}, more than rounding error"
        )
    return S


def _mirror_upper(S: np.ndarray, block: int = 32) -> float:
    """Copy the upper triangle onto the lower one in place; return the largest |S - S.T|.

    Mirroring makes the result independent of last-bit asymmetries that float arithmetic
    leaves in computed correlations. The result is NaN or inf if S holds NaN or inf.
    For speed (this pass costs about as much as the whole greedy), it goes by panels of
    `block` columns: the panel above the diagonal is transposed once into a scratch
    buffer that stays in cache, compared with the panel below, and copied there only
    if they differ (an exactly symmetric matrix is only read).
    """
    with np.errstate(invalid="ignore", over="ignore"):  # NaN and inf are reported, not warned
        return _mirror_panels(S, block)


def _mirror_panels(S: np.ndarray, block: int) -> float:
    """The loop of `_mirror_upper`."""
    D = S.shape[0]
    worst, finite = 0.0, True
    flipped = np.empty((D, block))
    diff = np.empty((D, block))
    below = np.tri(block, block, -1, dtype=bool)  # strictly below the diagonal
    for i0 in range(0, D, block):
        i1 = min(i0 + block, D)
        tile = S[i0:i1, i0:i1]  # on the diagonal: mirror its own upper triangle
        tile_t = tile.T.copy()
        gap = float(np.abs(tile - tile_t).max())
        np.copyto(tile, tile_t, where=below[: i1 - i0, : i1 - i0])
        if i1 < D:  # below the diagonal: the transposed panel above it
            lower = S[i1:, i0:i1]
            upper_t = flipped[: D - i1, : i1 - i0]
            np.copyto(upper_t, S[i0:i1, i1:].T)
            d = np.subtract(lower, upper_t, out=diff[: D - i1, : i1 - i0])
            if d.any():  # NaN counts as nonzero
                high, low = float(d.max()), float(d.min())
                finite = finite and math.isfinite(high) and math.isfinite(low)
                gap = max(gap, high, -low)
                lower[...] = upper_t
        finite = finite and math.isfinite(gap)
        worst = max(worst, gap)
    return worst if finite else math.nan


def _check_out_size(out_size: int | None, sizes: list[int]) -> int:
    """out_size defaults to the first model's width and must lie in [1, sum(sizes)]."""
    if out_size is None:
        return sizes[0]
    try:
        out = operator.index(out_size)
    except TypeError as exc:
        raise MatchingError(f"out_size must be an int or None, got {out_size!r}") from exc
    total = sum(sizes)
    if not 1 <= out <= total:
        raise MatchingError(f"out_size must be between 1 and sum(sizes)={total}, got {out}")
    return out


def _check_alpha_beta(alpha: float, beta: float) -> tuple[float, float]:
    """alpha must be finite and > 0; beta must be finite and >= 0."""
    alpha, beta = float(alpha), float(beta)
    if not (math.isfinite(alpha) and alpha > 0):
        raise MatchingError(f"alpha must be a finite number > 0, got {alpha}")
    if not (math.isfinite(beta) and beta >= 0):
        raise MatchingError(f"beta must be a finite number >= 0, got {beta}")
    return alpha, beta


def equal_widths(sizes: list[int], out_size: int, method: str, wider: bool = False) -> int:
    """One-to-one methods need equal model widths and out_size equal to that width (`wider`:
    at least that width)."""
    n = sizes[0]
    if any(s != n for s in sizes):
        raise MatchingError(
            f"method {method!r} needs all models to have the same width, got sizes={sizes}; "
            "use method='zipit' for different widths"
        )
    if wider and out_size < n:
        raise MatchingError(
            f"method {method!r} keeps at least one model's width: out_size must be >= {n}, "
            f"got {out_size}; use method='zipit' to narrow it"
        )
    if out_size != n and not wider:
        raise MatchingError(
            f"method {method!r} keeps the width: out_size must be {n}, got {out_size}; "
            "use method='zipit' to change the width"
        )
    return n


# ---------------------------------------------------------------------------
# Permute (Git Re-Basin activation matching)
# ---------------------------------------------------------------------------


def permutation_match(S: np.ndarray, sizes: list[int], out_size: int | None = None) -> Match:
    """Align every model to model 0 with a maximum-correlation one-to-one assignment (checked
    inputs of equal widths, see `check_inputs` and `equal_widths`). A wider `out_size` (at most
    N·n) keeps the out_size − n least correlated aligned features apart: each becomes a merged
    feature of its own (ties: the lower model, then the lower feature, first)."""
    n = sizes[0]
    out_size = n if out_size is None else out_size
    assign = [np.arange(n, dtype=np.int64)]
    scores = []
    for k in range(1, len(sizes)):
        block = S[:n, k * n : (k + 1) * n]
        rows, cols = linear_sum_assignment(block, maximize=True)
        a = np.empty(n, dtype=np.int64)
        a[cols] = rows  # feature cols[i] of model k goes to model-0 feature rows[i]
        assign.append(a)
        scores.append(block[a, np.arange(n)])  # each feature's correlation to its partner
    extra = out_size - n
    if extra > 0:
        flat = np.concatenate(scores)
        apart = np.argsort(flat, kind="stable")[:extra]  # the least correlated pairs
        for j, f in enumerate(np.sort(apart)):
            assign[1 + f // n][f % n] = n + j
    return Match.from_assign(assign, out_size)


# ---------------------------------------------------------------------------
# ZipIt! greedy
# ---------------------------------------------------------------------------


def zipit_match(S: np.ndarray, sizes: list[int], *, alpha: float, beta: float,
                out_size: int) -> Match:
    """Run the ZipIt! greedy on a validated symmetric matrix (`check_inputs`) and build the Match.
    The matrix is used as scratch space."""
    labels, _ = _zipit_merges(S, sizes, alpha=alpha, beta=beta, out_size=out_size, overwrite=True)
    return _match_from_labels(labels, sizes)


def _match_from_labels(labels: np.ndarray, sizes: Sequence[int]) -> Match:
    """Turn a representative per global feature into per-model cluster ids (ordered by representative)."""
    reps, ids = np.unique(labels, return_inverse=True)
    bounds = np.cumsum([0, *sizes])
    assign = [ids[bounds[k] : bounds[k + 1]] for k in range(len(sizes))]
    return Match.from_assign(assign, reps.size)


def _zipit_merges(
    S: np.ndarray,
    sizes: Sequence[int],
    *,
    alpha: float,
    beta: float,
    out_size: int,
    overwrite: bool = False,
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Greedy merging; returns the representative of each feature and the (r, c) merges made.

    `S` must be a symmetric (D, D) matrix without NaN. It is copied unless
    `overwrite` (then a float64 S is used as scratch space, saving a D*D copy).
    Each step merges the row-major first maximum (r, c) of the similarity matrix,
    found from cached row maxima; see `_ZipState` for how they are kept exact cheaply.
    """
    collecting = gc.isenabled()
    gc.disable()  # thousands of small heap tuples would trigger full collections of the
    try:  # whole process (slow when torch is loaded); they hold no reference cycles
        state = _ZipState(S, sizes, alpha=alpha, beta=beta, out_size=out_size, overwrite=overwrite)
        for _ in range(state.to_remove):
            state.merge(*state.pick())
    finally:
        if collecting:
            gc.enable()
    return state.labels(), state.merges


def _within_budgets(sizes: Sequence[int], beta: float, to_remove: int) -> np.ndarray:
    """Within-model merges allowed per model: floor(beta * to_remove / N)."""
    per_model = math.floor(beta * to_remove / len(sizes) + 1e-9)
    return np.full(len(sizes), per_model, dtype=np.int64)


class _ZipState:
    """Cluster similarities and a lazy priority queue of row maxima for the ZipIt! greedy.

    The greedy is the plain one: merge the row-major first most similar pair (r, c),
    r < c; the merged cluster, still called r, gets similarity ``alpha * min(S[r], S[c])``
    to every other cluster; c dies. The values are computed with the same float
    operations as that definition, so the merges are bit-for-bit the reference's.
    What makes it fast at D = 4096 is what it avoids:

    * **No column writes.** A pair's value is kept in the row of the *younger* cluster
      (the one written by a later merge; for two input features, the row of the lower
      one, i.e. the upper triangle), so a merge writes row r and never column r, which
      would touch D cache lines of the D x D matrix: that memory traffic used to dominate.
      `fresh[i]` is the step at which row i was written (0: an input row); the value of
      (i, j) is ``S[i, j] if fresh[i] >= fresh[j] else S[j, i]``.
    * **No rescans.** A row's entries never change after it is written (the pairs of a
      new cluster go to its own new row); they only die. So the best entry a row had
      when it was pushed on a max-heap stays an upper bound on its best entry. The heap
      holds an item per live row, ordered like the greedy's choice (largest value, then
      the row-major first pair); `pick` checks the top item and, when its pair has died
      (or was forbidden since), recomputes that row's best and pushes it again. The first
      valid top item is the global choice. Invalid tops are rare (about one per merge).
    * **Few far reads.** Merging two input features r and c needs, for every merged
      cluster X, ``min(value(r, X), value(c, X))``; those values sit in column r and c
      of the rows of the X's, one cache miss each. Instead they are computed from rows
      r and c themselves, which hold the input similarities to every feature: a merged
      cluster's similarity to an input feature y is the minimum, over its members x, of
      ``S[y, x]`` scaled by alpha once per merge x took part in (`depth[x]`), because
      ``alpha * min(a, b) == min(alpha * a, alpha * b)`` holds exactly in floating point
      (rounding is monotone). Merges of a cluster that is already merged, or while a
      cluster is deeper than MAX_LEAF_DEPTH, (both rare) fall back to the gathers.

    Forbidden pairs and the diagonal are -inf; a forbid writes both orientations, and for
    merged clusters the -inf of the representative's entry carries through the minimum.
    Dead clusters keep stale rows and columns, masked wherever they are read.
    `owner[i]` is the model of pure cluster i, else -1.
    """

    #: Largest cluster depth for which a merged row is computed from the input rows.
    MAX_LEAF_DEPTH = 8

    def __init__(
        self,
        S: np.ndarray,
        sizes: Sequence[int],
        *,
        alpha: float,
        beta: float,
        out_size: int,
        overwrite: bool = False,
    ):
        D = int(sum(sizes))
        self.S = np.asarray(S, np.float64) if overwrite else np.array(S, np.float64, copy=True)
        np.fill_diagonal(self.S, _NEG_INF)
        self.alpha = alpha
        self.to_remove = D - out_size
        self.merges: list[tuple[int, int]] = []
        self.dead = np.zeros(D, dtype=bool)
        self.single = np.ones(D, dtype=bool)  # live input features (never merged)
        self.owner = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
        self.budget = _within_budgets(sizes, beta, self.to_remove)
        self.steps = 0
        self.fresh = np.zeros(D, dtype=np.int64)
        # Cluster membership: representative and merge depth of every input feature, the
        # members of every merged cluster, and the features that belong to one.
        self.rep = np.arange(D, dtype=np.int64)
        self.depth = np.zeros(D, dtype=np.int64)
        self.members: dict[int, np.ndarray] = {}
        self.max_depth = 0
        self.merged_leaves = np.empty(D, dtype=np.int64)
        self.num_merged_leaves = 0
        self.heap: list[tuple[float, int, int, int, int]] = []
        if self.to_remove <= 0:
            return
        for k in np.flatnonzero(self.budget == 0):
            self._forbid_pure(int(k))
        self._push_input_rows()

    def labels(self) -> np.ndarray:
        """The representative (lowest feature) of every feature's cluster."""
        return self.rep.copy()

    # -- choosing the pair ---------------------------------------------------------------

    def pick(self) -> tuple[int, int]:
        """The row-major first maximum (r, c); raise when no pair may be merged."""
        heap, S, fresh, dead = self.heap, self.S, self.fresh, self.dead
        while heap:
            neg, a, b, row, at = heap[0]
            other = b if row == a else a
            if (
                fresh[row] == at
                and not dead[row]
                and not dead[other]
                and (fresh[other] < at or (at == 0 and fresh[other] == 0))
                and S[row, other] == -neg
            ):
                return a, b
            heapq.heappop(heap)
            if fresh[row] == at and not dead[row]:
                self._push_row(row)
        raise MatchingError(
            f"no mergeable pair left after {self.steps} of {self.to_remove} "
            "merges: every remaining pair would merge two features of one model beyond its "
            "beta budget; raise beta (allow more within-model merges) or out_size"
        )

    def _push_input_rows(self, block: int = 64) -> None:
        """Heap the best entry of every input row among its pairs above the diagonal.

        Row block by row block: the diagonal tile (masked to its upper triangle) comes
        before the panel to its right, so ties go to the lower column as in a row scan."""
        S, D = self.S, self.S.shape[0]
        above = np.triu(np.ones((block, block), dtype=bool), 1)
        items = []
        for i0 in range(0, D, block):
            i1 = min(i0 + block, D)
            rows = np.arange(i1 - i0)
            tile = np.where(above[: i1 - i0, : i1 - i0], S[i0:i1, i0:i1], _NEG_INF)
            arg = tile.argmax(axis=1)
            best = tile[rows, arg]
            arg += i0
            if i1 < D:
                panel = S[i0:i1, i1:]
                parg = panel.argmax(axis=1)
                pbest = panel[rows, parg]
                right = pbest > best  # a tie stays in the diagonal tile (lower column)
                best[right] = pbest[right]
                arg[right] = parg[right] + i1
            items += [
                (-v, i, j, i, 0)
                for i, j, v in zip(range(i0, i1), arg.tolist(), best.tolist())
                if v > _NEG_INF
            ]
        heapq.heapify(items)
        self.heap = items

    def _push_row(self, i: int) -> None:
        """Push the best live entry of row i (if it has one) among the pairs it holds."""
        at = int(self.fresh[i])
        if at == 0:  # an input row holds its pairs with the input features above it
            part = np.where(self.single[i + 1 :], self.S[i, i + 1 :], _NEG_INF)
            j = int(part.argmax())
            v, j = part[j], j + i + 1
        else:  # a merged row holds its pairs with every live cluster older than it
            part = np.where((self.fresh < at) & ~self.dead, self.S[i], _NEG_INF)
            j = int(part.argmax())
            v = part[j]
        if v > _NEG_INF:
            heapq.heappush(self.heap, (-float(v), min(i, j), max(i, j), i, at))

    # -- merging -------------------------------------------------------------------------

    def merge(self, r: int, c: int) -> None:
        """Merge cluster c into cluster r (r < c): write row r, retire c."""
        S = self.S
        new = self._merged_row(r, c)
        self.steps += 1
        S[r] = new
        self.fresh[r] = self.steps
        self.dead[c] = True
        self._update_members(r, c)
        self.merges.append((r, c))
        self._update_purity(r, c)
        # Every live cluster is older than the new row r: its best entry is its argmax.
        j = int(S[r].argmax())
        if S[r, j] > _NEG_INF:
            heapq.heappush(self.heap, (-float(S[r, j]), min(r, j), max(r, j), r, self.steps))

    def _merged_row(self, r: int, c: int) -> np.ndarray:
        """``alpha * min(row r, row c)`` over the current clusters, -inf at dead ones."""
        if self.single[r] and self.single[c] and self.max_depth <= self.MAX_LEAF_DEPTH:
            return self._merged_input_rows(r, c)
        S, fresh = self.S, self.fresh
        new = np.minimum(S[r], S[c])  # exact for the clusters older than both r and c
        fr, fc = fresh[r], fresh[c]
        later = np.flatnonzero((fresh > min(fr, fc)) & ~self.dead)
        if later.size:  # a cluster written after r (or c) holds its pair with it in its row
            at = fresh[later]
            from_r = np.where(at > fr, S[later, r], S[r, later])
            from_c = np.where(at > fc, S[later, c], S[c, later])
            new[later] = np.minimum(from_r, from_c)
        new[self.dead] = _NEG_INF
        new *= self.alpha  # new[r] = new[c] = -inf: the diagonal is -inf
        return new

    def _merged_input_rows(self, r: int, c: int) -> np.ndarray:
        """`_merged_row` for two input features, from their own rows only (see the class doc).

        ``m = min(S[r], S[c])`` holds the input similarities of the pair to every feature;
        a merged cluster X gets ``min over members x of alpha^depth[x] * m[x]`` (alpha
        applied depth[x] times, one rounding each, like the merges did), written at its
        representative, before the final ``* alpha``."""
        new = np.minimum(self.S[r], self.S[c])
        if self.num_merged_leaves:
            leaves = self.merged_leaves[: self.num_merged_leaves]
            vals = new[leaves]
            if self.alpha != 1.0:  # alpha == 1 scales exactly by nothing
                vals *= self.alpha  # every merged feature has depth >= 1
                if self.max_depth > 1:
                    depth = self.depth[leaves]
                    for level in range(2, self.max_depth + 1):
                        deeper = depth >= level
                        vals[deeper] *= self.alpha
            new[leaves] = np.inf
            np.minimum.at(new, self.rep[leaves], vals)
            new[self.dead] = _NEG_INF  # members that are not their cluster's representative
        new *= self.alpha  # new[r] = new[c] = -inf: the diagonal is -inf
        return new

    def _update_members(self, r: int, c: int) -> None:
        """Cluster c's members join r's; every member of the merged cluster is one level deeper."""
        if self.single[r] and self.single[c]:  # the common case, in scalar steps
            members = np.array([r, c])
            self.rep[c] = r
            self.depth[r] = self.depth[c] = 1
            self.max_depth = max(self.max_depth, 1)
        else:
            from_r = self.members.get(r, np.array([r]))
            from_c = self.members.pop(c, np.array([c]))
            members = np.concatenate([from_r, from_c])
            self.rep[from_c] = r
            self.depth[members] += 1
            self.max_depth = max(self.max_depth, int(self.depth[members].max()))
        self.members[r] = members
        for i in (r, c):
            if self.single[i]:
                self.single[i] = False
                self.merged_leaves[self.num_merged_leaves] = i
                self.num_merged_leaves += 1

    # -- within-model budget -------------------------------------------------------------

    def _update_purity(self, r: int, c: int) -> None:
        """Charge a within-model merge to its model's budget; forbid more once it runs out.

        A forbid lowers entries to -inf in place; heap items holding them fail the value
        check in `pick` and their rows are recomputed."""
        k = self.owner[r]
        if k >= 0 and k == self.owner[c]:
            self.budget[k] -= 1
            if self.budget[k] == 0:
                self._forbid_pure(int(k))
        else:
            self.owner[r] = -1
        self.owner[c] = -1

    def _forbid_pure(self, k: int) -> None:
        """Set every pair of live pure-k clusters to -inf (both orientations)."""
        idx = np.flatnonzero(~self.dead & (self.owner == k))
        self.S[np.ix_(idx, idx)] = _NEG_INF


# ---------------------------------------------------------------------------
# CCA alignment (Horoi et al., ICML 2024)
# ---------------------------------------------------------------------------


def _inverse_sqrt_and_sqrt(C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """C^(-1/2) and C^(1/2) of a symmetric positive definite matrix."""
    values, vectors = np.linalg.eigh(C)
    values = np.clip(values, values.max() * 1e-12, None)
    return (vectors / np.sqrt(values)) @ vectors.T, (vectors * np.sqrt(values)) @ vectors.T


def cca_transform(cov: np.ndarray, n: int, k: int, regularization: float,
                  prior: float = 0.01) -> np.ndarray:
    """T (n × n) mapping model k's features onto model 0's by regularised CCA of the (N·n)²
    second-moment matrix `cov`: T = C₀₀^(1/2) U Vᵀ C_kk^(-1/2), where U Σ Vᵀ is the SVD of
    C₀₀^(-1/2) C₀k C_kk^(-1/2) + prior · P and C_ii = cov_ii + regularization · mean variance · I.
    P is the best one-to-one match of the features by correlation (Hungarian, as "permute"): it
    decides the directions the data leave undetermined (no variance: a LayerNorm's constrained
    direction, dead units), where CCA alone would map them arbitrarily. A copy whose features
    are a permutation Π of model 0's (x_k = Π x₀) gives T = Πᵀ (up to rounding)."""
    a, b = slice(0, n), slice(k * n, (k + 1) * n)
    c00, ckk, c0k = cov[a, a], cov[b, b], cov[a, b]
    ridge = regularization * max(float(np.trace(c00) + np.trace(ckk)) / (2 * n), 1e-12)
    inv0, sqrt0 = _inverse_sqrt_and_sqrt(c00 + ridge * np.eye(n))
    invk, _ = _inverse_sqrt_and_sqrt(ckk + ridge * np.eye(n))
    std0, stdk = np.sqrt(np.clip(np.diag(c00), 1e-300, None)), np.sqrt(np.clip(np.diag(ckk), 1e-300, None))
    rows, cols = linear_sum_assignment(c0k / std0[:, None] / stdk[None, :], maximize=True)
    permutation = np.zeros((n, n))
    permutation[rows, cols] = 1.0
    u, _, vt = np.linalg.svd(inv0 @ c0k @ invk + prior * permutation)
    return sqrt0 @ (u @ vt) @ invk


def covariance(corr: np.ndarray, variance: np.ndarray, mean: np.ndarray | None = None) -> np.ndarray:
    """The covariance matrix of features from their correlation matrix and variances; with
    their `mean`, the uncentred second moments E[x xᵀ] instead."""
    std = np.sqrt(np.clip(np.asarray(variance, dtype=np.float64), 0.0, None))
    out = np.asarray(corr, dtype=np.float64) * std[:, None] * std[None, :]
    if mean is not None:
        mean = np.asarray(mean, dtype=np.float64)
        out += mean[:, None] * mean[None, :]
    return out


def cca_match(cov: np.ndarray, sizes: list[int], *, regularization: float = 3.0) -> Match:
    """A dense Match that aligns every model to model 0 by an invertible map from regularised
    CCA (`cca_transform`) and averages: M₀ = I/N, M_k = T_k/N, U₀ = I, U_k = T_k⁻¹. `cov` is the
    covariance of the concatenated features (equal widths n). The reported assignment pairs
    each feature of model k with the model-0 feature it weighs most (Hungarian on |T_k|)."""
    n, num = sizes[0], len(sizes)
    maps = [(np.eye(n) / num, np.eye(n))]
    assign = [np.arange(n, dtype=np.int64)]
    for k in range(1, num):
        T = cca_transform(cov, n, k, regularization)
        try:
            inverse = np.linalg.inv(T)
        except np.linalg.LinAlgError as exc:  # T is invertible by construction; rounding aside
            raise MatchingError(f"the CCA map of model {k} is singular; raise the "
                                "regularization") from exc
        maps.append((T / num, inverse))
        rows, cols = linear_sum_assignment(np.abs(T), maximize=True)
        a = np.empty(n, dtype=np.int64)
        a[cols] = rows
        assign.append(a)
    return Match(tuple(assign), n, np.full(n, num, dtype=np.int64), maps=tuple(maps))
