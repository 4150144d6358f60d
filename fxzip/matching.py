"""Feature matching: decide which features of N models become one merged feature.

Given the correlation matrix of the concatenated features of N models, a method
returns a `Match`: for every model, the merged feature (cluster) each of its
features goes to. Three methods are offered:

* ``"average"``: feature i of every model goes to cluster i (plain weight averaging).
* ``"permute"``: Git Re-Basin activation matching, every model aligned to model 0.
* ``"zipit"``:   the ZipIt! greedy, which may also merge features of the same model.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from .errors import MatchingError

__all__ = ["Match", "match_features", "METHODS"]

METHODS = ("average", "permute", "zipit")

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
    """

    assign: tuple[np.ndarray, ...]
    size: int
    counts: np.ndarray

    def __post_init__(self) -> None:
        """Normalise to read-only int64 arrays and check that counts agree with assign."""
        size, assign = _checked_assign(self.assign, self.size)
        counts = _frozen_int_array(self.counts, "Match.counts")
        if not np.array_equal(counts, _count_members(assign, size)):
            raise MatchingError("Match.counts does not equal the number of members per cluster")
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "assign", assign)
        object.__setattr__(self, "counts", counts)

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

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Match):
            return NotImplemented
        return (
            self.size == other.size
            and len(self.assign) == len(other.assign)
            and all(np.array_equal(a, b) for a, b in zip(self.assign, other.assign))
        )

    def __hash__(self) -> int:
        return hash((self.size, tuple(a.tobytes() for a in self.assign)))

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


def _count_members(assign: Sequence[np.ndarray], size: int) -> np.ndarray:
    """Members per cluster, summed over all models."""
    counts = np.zeros(size, dtype=np.int64)
    for a in assign:
        counts += np.bincount(a, minlength=size)
    return counts


# ---------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------


def match_features(
    corr: np.ndarray,
    sizes: Sequence[int],
    method: str = "zipit",
    *,
    alpha: float = 0.5,
    beta: float = 1.0,
    out_size: int | None = None,
) -> Match:
    """Match the features of N models from the correlation matrix of their concatenation.

    `corr` is (D, D) with D = sum(sizes); model k owns the contiguous block of
    sizes[k] rows/columns. `out_size` (default sizes[0]) is the merged width.
    `alpha` and `beta` only affect ``"zipit"``: alpha scales the similarity of a
    freshly merged cluster, beta is the share of merges allowed within one model.
    """
    if method not in METHODS:
        raise MatchingError(f"unknown matching method {method!r}; allowed: {', '.join(METHODS)}")
    sizes = _check_sizes(sizes)
    S = _check_corr(corr, sum(sizes))
    out_size = _check_out_size(out_size, sizes)
    alpha, beta = _check_alpha_beta(alpha, beta)

    if method == "average":
        n = _require_equal_sizes(sizes, out_size, method)
        return Match.identity(n, len(sizes))
    if method == "permute":
        _require_equal_sizes(sizes, out_size, method)
        return _permute(S, sizes)
    return _zipit(S, sizes, alpha=alpha, beta=beta, out_size=out_size)


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------


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
    S[np.isnan(S)] = 0.0
    if not np.all(np.isfinite(S)):
        raise MatchingError("corr contains +inf or -inf; only finite values (or NaN) are allowed")
    asymmetry = _mirror_upper(S)
    if asymmetry > 1e-4 * float(np.abs(S).max()):  # loose: float32/TF32 statistics are fine
        raise MatchingError(
            f"corr must be symmetric (a correlation matrix), but corr and corr.T differ by up "
            f"to {asymmetry:.3g}, more than rounding error"
        )
    return S


def _mirror_upper(S: np.ndarray, block: int = 128) -> float:
    """Copy the upper triangle onto the lower one in place; return the largest |S - S.T|.

    Mirroring makes the result independent of last-bit asymmetries that float
    arithmetic leaves in computed correlations. Done in row blocks to stay cache friendly.
    """
    worst = 0.0
    below = np.tri(block, block, -1, dtype=bool)  # strictly below the diagonal
    for i0 in range(0, S.shape[0], block):
        i1 = min(i0 + block, S.shape[0])
        upper = S[:i1, i0:i1].T  # mirror image of rows i0:i1, up to their diagonal tile
        worst = max(worst, float(np.abs(S[i0:i1, :i1] - upper).max()))
        S[i0:i1, :i0] = upper[:, :i0]
        tile = S[i0:i1, i0:i1]
        np.copyto(tile, tile.T.copy(), where=below[: i1 - i0, : i1 - i0])
    return worst


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


def _require_equal_sizes(sizes: list[int], out_size: int, method: str) -> int:
    """One-to-one methods need equal model widths and out_size equal to that width."""
    n = sizes[0]
    if any(s != n for s in sizes):
        raise MatchingError(
            f"method {method!r} needs all models to have the same width, got sizes={sizes}; "
            "use method='zipit' for different widths"
        )
    if out_size != n:
        raise MatchingError(
            f"method {method!r} keeps the width: out_size must be {n}, got {out_size}; "
            "use method='zipit' to change the width"
        )
    return n


# ---------------------------------------------------------------------------
# Permute (Git Re-Basin activation matching)
# ---------------------------------------------------------------------------


def _permute(S: np.ndarray, sizes: list[int]) -> Match:
    """Align every model to model 0 with a maximum-correlation one-to-one assignment."""
    n = sizes[0]
    assign = [np.arange(n, dtype=np.int64)]
    for k in range(1, len(sizes)):
        block = S[:n, k * n : (k + 1) * n]
        rows, cols = linear_sum_assignment(block, maximize=True)
        a = np.empty(n, dtype=np.int64)
        a[cols] = rows  # feature cols[i] of model k goes to model-0 feature rows[i]
        assign.append(a)
    return Match.from_assign(assign, n)


# ---------------------------------------------------------------------------
# ZipIt! greedy
# ---------------------------------------------------------------------------


def _zipit(S: np.ndarray, sizes: list[int], *, alpha: float, beta: float, out_size: int) -> Match:
    """Run the ZipIt! greedy on a validated symmetric matrix and build the Match."""
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
    kept fast by tracking each row's maximum and first argmax.
    """
    state = _ZipState(S, sizes, alpha=alpha, beta=beta, out_size=out_size, overwrite=overwrite)
    merges = []
    for _ in range(state.to_remove):
        r, c = state.pick()
        state.merge(r, c)
        merges.append((r, c))
    return state.labels, merges


def _within_budgets(sizes: Sequence[int], beta: float, to_remove: int) -> np.ndarray:
    """Within-model merges allowed per model: floor(beta * to_remove / N)."""
    per_model = math.floor(beta * to_remove / len(sizes) + 1e-9)
    return np.full(len(sizes), per_model, dtype=np.int64)


class _ZipState:
    """Similarity matrix plus per-row max/first-argmax caches for the ZipIt! greedy.

    Forbidden pairs and dead rows are -inf. Dead *columns* are left stale (a strided
    write per merge is the main cost) and masked with `alive` wherever rows are read.
    A row whose max is -inf has rowarg -1. `owner[i]` is the model of pure cluster i, else -1.
    """

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
        self.labels = np.arange(D, dtype=np.int64)
        self.alive = np.ones(D, dtype=bool)
        self.owner = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
        self.budget = _within_budgets(sizes, beta, self.to_remove)
        for k in np.flatnonzero(self.budget == 0):
            self._forbid_pure(int(k))
        self.rowmax = np.full(D, _NEG_INF)
        self.rowarg = np.full(D, -1, dtype=np.int64)
        self._recompute(None)

    def pick(self) -> tuple[int, int]:
        """The row-major first maximum (r, c); raise when no pair may be merged."""
        r = int(np.argmax(self.rowmax))
        best = self.rowmax[r]
        if not best > _NEG_INF:  # -inf or NaN
            raise MatchingError(
                f"no mergeable pair left after {int((~self.alive).sum())} of {self.to_remove} "
                "merges: every remaining pair would merge two features of one model beyond its "
                "beta budget; raise beta (allow more within-model merges) or out_size"
            )
        return r, int(self.rowarg[r])

    def merge(self, r: int, c: int) -> None:
        """Merge cluster c into cluster r (r < c), then keep the row caches exact."""
        S = self.S
        stale = np.flatnonzero((self.rowarg == r) | (self.rowarg == c))
        self.alive[c] = False
        new = np.minimum(S[r], S[c]) * self.alpha  # new[r] = new[c] = -inf: S[i, i] is -inf
        new[~self.alive] = _NEG_INF  # dead columns are stale in S
        S[r, :] = new
        S[:, r] = new
        S[c, :] = _NEG_INF
        self.labels[self.labels == c] = r

        # Rows whose argmax was neither r nor c: only S[j, r] may now beat their max
        # (S[j, c] is dead and only matters to the rows recomputed below).
        better = (new > self.rowmax) | ((new == self.rowmax) & (self.rowarg > r))
        self.rowmax[better] = new[better]
        self.rowarg[better] = r
        self.rowmax[c] = _NEG_INF
        self.rowarg[c] = -1
        self._recompute(np.append(stale[stale != c], r))  # duplicates are harmless

        self._update_purity(r, c)

    def _update_purity(self, r: int, c: int) -> None:
        """Charge a within-model merge to its model's budget; forbid more once it runs out."""
        k = self.owner[r]
        if k >= 0 and k == self.owner[c]:
            self.budget[k] -= 1
            if self.budget[k] == 0:
                self._recompute(self._forbid_pure(int(k)))
        else:
            self.owner[r] = -1
        self.owner[c] = -1

    def _forbid_pure(self, k: int) -> np.ndarray:
        """Set every pair of alive pure-k clusters to -inf; return those clusters."""
        idx = np.flatnonzero(self.alive & (self.owner == k))
        self.S[np.ix_(idx, idx)] = _NEG_INF
        return idx

    def _recompute(self, rows: np.ndarray | None) -> None:
        """Recompute the max and first argmax of the given rows (None: all, without a copy)."""
        if rows is None:  # only at the start, when every cluster is alive
            rows = np.arange(self.S.shape[0])
            block = self.S
        elif rows.size == 0:
            return
        else:
            block = self.S[rows]
            block[:, ~self.alive] = _NEG_INF
        arg = block.argmax(axis=1)
        best = block[np.arange(rows.size), arg]
        self.rowmax[rows] = best
        self.rowarg[rows] = np.where(best > _NEG_INF, arg, -1)
