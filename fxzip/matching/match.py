"""`Match` (which merged feature every feature of N models goes to) and the checks of a matching's
inputs, shared by every merge method.

A `Match` says, for every model, the merged feature (cluster) each of its features goes to.
The algorithms work on the correlation matrix of the concatenated features of N models, checked
by `check_inputs`; the named merge methods are in `fxzip.matching.registry` and one module per
method (`average`, `permute`, `zipit`, `cca`).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import MatchingError
from .correlation import _mirror_upper, symmetric_copy

__all__ = ["Match", "check_inputs", "equal_widths"]


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
    owned: bool = False,
) -> tuple[np.ndarray | None, list[int], int, float, float]:
    """Validate the inputs of a matching; return (corr, sizes, out_size, alpha, beta) normalised.

    `corr` is (D, D) with D = sum(sizes) (model k owns the contiguous block of sizes[k]
    rows/columns); it comes back as a symmetric float64 copy with NaN set to 0, or None when
    None was given (a method that needs no correlations). `owned`: corr is a temporary the
    caller drops, made symmetric in place where it is a writable float64 array and returned
    as the method's working matrix, which the method overwrites (no second D × D matrix).
    `out_size` defaults to sizes[0].
    """
    sizes = _check_sizes(sizes)
    S = None if corr is None else _check_corr(corr, sum(sizes), owned)
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


def _check_corr(corr: np.ndarray, total: int, owned: bool = False) -> np.ndarray:
    """Return a symmetric float64 copy of corr with NaN set to 0 (NaN = no information); corr
    itself, made so in place, where it is `owned` and a writable C-ordered float64 array."""
    try:
        source = _real_matrix(corr)
    except (TypeError, ValueError) as exc:
        raise MatchingError(f"corr must be a numeric (D, D) array, got {type(corr).__name__}") from exc
    if source.shape != (total, total):
        raise MatchingError(
            f"corr has shape {source.shape} but sizes sum to {total}; expected ({total}, {total})"
        )
    in_place = owned and isinstance(source, np.ndarray) and source.dtype == np.float64 \
        and source.flags.writeable and source.flags.c_contiguous
    if in_place:
        S, asymmetry = source, _mirror_upper(source)
    else:
        S, asymmetry = symmetric_copy(source)  # NaN or inf anywhere make it non-finite
    if not math.isfinite(asymmetry):  # the rare case: start again from corr
        if not in_place:
            np.copyto(S, source, casting="unsafe")
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


def _real_matrix(corr: np.ndarray) -> np.ndarray:
    """corr as an array of real numbers, itself when it is one (read, never copied: the copy
    `_check_corr` makes converts it to float64 tile by tile)."""
    array = np.asarray(corr)
    return array if array.dtype.kind in "biuf" else np.asarray(corr, dtype=np.float64)


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
