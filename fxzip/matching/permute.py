"""The "permute" method: Git Re-Basin activation matching, every model aligned one-to-one to model
0 by a maximum-correlation assignment (Hungarian)."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from .match import Match, equal_widths
from .registry import Method, register_method

__all__ = ["Permute", "permutation_match"]


@register_method
class Permute(Method):
    """Git Re-Basin activation matching: every model aligned one-to-one to model 0."""

    name = "permute"
    summary = "Hungarian matching across models (Git Re-Basin)"

    def _solve(self, corr: np.ndarray, sizes: list[int], out_size: int, alpha: float,
               beta: float) -> Match:
        equal_widths(sizes, out_size, self.name, wider=True)
        return permutation_match(corr, sizes, out_size)


def permutation_match(S: np.ndarray, sizes: list[int], out_size: int | None = None) -> Match:
    """Align every model to model 0 with a maximum-correlation one-to-one assignment (checked
    inputs of equal widths, see `check_inputs` and `equal_widths`). A wider `out_size` (at most
    N·n) keeps the out_size − n least correlated aligned features apart: each becomes a merged
    feature of its own (ties: the lower model, then the lower feature, first). The assignment
    minimises the negated block: the problem `maximize=True` solves by negating a contiguous copy
    of its own (the same solution), here with one n×n copy instead of two."""
    n = sizes[0]
    out_size = n if out_size is None else out_size
    assign = [np.arange(n, dtype=np.int64)]
    scores = []
    for k in range(1, len(sizes)):
        block = S[:n, k * n : (k + 1) * n]
        rows, cols = linear_sum_assignment(np.negative(block), maximize=False)
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
