"""The ZipIt! greedy exactly as the paper defines it: a slow, plain reference implementation.

At every step it takes a full argmax over the whole similarity matrix (the row-major first most
similar pair), merges that pair, and sets the merged cluster's similarity to every other cluster
to the minimum over the two, times `alpha`; `beta` caps each model's merges of its own features.
That is O(D³) for D features in all, but easy to check by eye. `fxzip.matching.zipit.zipit_match`
is the fast implementation the library uses; it must give the same assignment (tests/test_matching.py
checks it on many matrices; `python -m benchmarks.speed`, section 3, measures the speed-up). Use
this one as an oracle, not for merging.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fxzip.errors import MatchingError
from fxzip.matching import Match


def reference_zipit(
    corr: np.ndarray, sizes: Sequence[int], alpha: float, beta: float, out_size: int
) -> Match:
    """Merge features greedily, always the row-major first most similar pair, until out_size remain."""
    sizes = [int(s) for s in sizes]
    D = sum(sizes)
    num_models = len(sizes)

    S = np.array(corr, dtype=np.float64, copy=True)
    S[np.isnan(S)] = 0.0
    np.fill_diagonal(S, -np.inf)

    to_remove = D - out_size
    budget = [math.floor(beta * to_remove / num_models + 1e-9)] * num_models

    # members[i]: the features in the cluster represented by i (None once dead).
    members: list[list[int] | None] = [[i] for i in range(D)]
    model_of = [k for k, s in enumerate(sizes) for _ in range(s)]

    def pure_model(i: int) -> int:
        """The model all members of cluster i come from, or -1 when mixed."""
        owners = {model_of[f] for f in members[i]}
        return owners.pop() if len(owners) == 1 else -1

    def forbid_exhausted() -> None:
        """For each model without budget, forbid merging two of its pure clusters."""
        for k in range(num_models):
            if budget[k] != 0:
                continue
            pure = [i for i in range(D) if members[i] is not None and pure_model(i) == k]
            S[np.ix_(pure, pure)] = -np.inf  # the diagonal is -inf already

    forbid_exhausted()
    for _ in range(to_remove):
        flat = int(np.argmax(S))
        r, c = divmod(flat, D)
        best = S[r, c]
        if np.isnan(best) or best == -np.inf:
            raise MatchingError("no mergeable pair left")

        k_r, k_c = pure_model(r), pure_model(c)
        if k_r >= 0 and k_r == k_c:
            budget[k_r] -= 1

        new = np.minimum(S[r, :], S[c, :]) * alpha
        S[r, :] = new
        S[:, r] = new
        S[r, r] = -np.inf
        S[c, :] = -np.inf
        S[:, c] = -np.inf
        members[r] = members[r] + members[c]
        members[c] = None

        forbid_exhausted()

    reps = [i for i in range(D) if members[i] is not None]
    cluster_of = np.empty(D, dtype=np.int64)
    for cluster_id, rep in enumerate(reps):
        cluster_of[members[rep]] = cluster_id

    assign = []
    start = 0
    for s in sizes:
        assign.append(cluster_of[start : start + s])
        start += s
    return Match.from_assign(assign, len(reps))
