"""The "zipit" method: the ZipIt! greedy, which repeatedly merges the most correlated pair of
features, within or across models (`zipit_match`), fast at thousands of features (`_ZipState`)."""

from __future__ import annotations

import gc
import heapq
import math
from typing import Sequence

import numpy as np

from ..errors import MatchingError
from .match import Match
from .registry import Method, register_method

__all__ = ["ZipIt", "zipit_match"]

_NEG_INF = -np.inf


@register_method
class ZipIt(Method):
    """The ZipIt! greedy: merges the most correlated features, within or across models."""

    name = "zipit"
    summary = "ZipIt! greedy, within and across models"

    def _solve(self, corr: np.ndarray, sizes: list[int], out_size: int, alpha: float,
               beta: float) -> Match:
        return zipit_match(corr, sizes, alpha=alpha, beta=beta, out_size=out_size)


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
    * **Few far reads.** Merging r and c needs, for every merged cluster X,
      ``min(value(r, X), value(c, X))``; for an input feature r those values sit in
      column r of the rows of the X's, one cache miss each. Instead they are computed
      from row r itself, which holds the input similarities to every feature: a merged
      cluster's similarity to an input feature y is the minimum, over its members x, of
      ``S[y, x]`` scaled by alpha once per merge x took part in (`depth[x]`), because
      ``alpha * min(a, b) == min(alpha * a, alpha * b)`` holds exactly in floating point
      (rounding is monotone). Only a merged side gathers from its column, and only the
      pairs of the clusters written after it; while a cluster is deeper than
      MAX_LEAF_DEPTH (rare), input features gather too.

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
        self.died = np.empty(D, dtype=np.int64)  # died[:steps]: the dead, in order of death
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
        part = self.S[i].copy()  # masked by index lists: faster than by boolean masks
        if at == 0:  # an input row holds its pairs with the input features above it
            part[: i + 1] = _NEG_INF
            part[self.merged_leaves[: self.num_merged_leaves]] = _NEG_INF
        else:  # a merged row holds its pairs with every live cluster older than it
            part[self._died()] = _NEG_INF
            part[np.flatnonzero(self.fresh >= at)] = _NEG_INF
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
        self.died[self.steps - 1] = c
        self._update_members(r, c)
        self.merges.append((r, c))
        self._update_purity(r, c)
        # Every live cluster is older than the new row r: its best entry is its argmax.
        j = int(S[r].argmax())
        if S[r, j] > _NEG_INF:
            heapq.heappush(self.heap, (-float(S[r, j]), min(r, j), max(r, j), r, self.steps))

    def _merged_row(self, r: int, c: int) -> np.ndarray:
        """``alpha * min(row r, row c)`` over the current clusters, -inf at dead ones."""
        leafy = self.max_depth <= self.MAX_LEAF_DEPTH
        if leafy and self.single[r] and self.single[c]:  # one pass over the leaves for both
            new = self._through_leaves(np.minimum(self.S[r], self.S[c]))
        else:
            new = np.minimum(self._values(r, leafy), self._values(c, leafy))
            new[self._died()] = _NEG_INF
        new *= self.alpha  # new[r] = new[c] = -inf: the diagonal is -inf
        return new

    def _values(self, x: int, leafy: bool) -> np.ndarray:
        """Cluster x's similarity to every live cluster (stale at dead ones): an input row
        through the leaves (`_through_leaves`), else row x with the pairs that clusters
        written after x hold in their own rows gathered from column x."""
        S, fresh = self.S, self.fresh
        if leafy and self.single[x]:
            return self._through_leaves(S[x].copy())
        values = S[x].copy()
        later = np.flatnonzero((fresh > fresh[x]) & ~self.dead)
        values[later] = S[later, x]
        return values

    def _through_leaves(self, m: np.ndarray) -> np.ndarray:
        """Input similarities `m` (a row of them, or the minimum of rows; overwritten) turned
        into similarities to the current clusters (see the class doc); -inf at dead ones.

        A merged cluster X gets ``min over members x of alpha^depth[x] * m[x]`` (alpha
        applied depth[x] times, one rounding each, like the merges did), written at its
        representative."""
        if self.num_merged_leaves:
            leaves = self.merged_leaves[: self.num_merged_leaves]
            vals = m[leaves]
            if self.alpha != 1.0:  # alpha == 1 scales exactly by nothing
                vals *= self.alpha  # every merged feature has depth >= 1
                if self.max_depth > 1:
                    depth = self.depth[leaves]
                    for level in range(2, self.max_depth + 1):
                        np.multiply(vals, self.alpha, out=vals, where=depth >= level)
            m[leaves] = np.inf
            np.minimum.at(m, self.rep[leaves], vals)
            m[self._died()] = _NEG_INF  # members that are not their cluster's representative
        return m

    def _died(self) -> np.ndarray:
        """The dead clusters' ids, to mask with: scattering by index beats a boolean mask."""
        return self.died[: self.steps]

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
