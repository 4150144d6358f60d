"""Two-level matching of grouped features: heads to heads, then features within heads.

Queries/keys and values of one attention form two spaces of H heads of features. A merged head
must take its queries, keys AND values from one head of every model (attention weights of a head
apply to that head's values), and features never move between heads. Grouped convolutions are
the same with groups for heads: the input and output groups of a convolution pair alike. So heads
are paired first, once for all the spaces (Hungarian on how well the heads' features can be
matched), then each group of paired heads is matched within by the chosen method
(`fxzip.matching.match_features`).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from .errors import MatchingError
from .matching import Match
from .methods import Method, get_method


def head_similarity(corrs: Sequence[np.ndarray], sizes: Sequence[int], heads: int,
                    k: int, fixed: Sequence[bool] = ()) -> np.ndarray:
    """(heads × heads) similarity of model 0's heads to model k's: the best one-to-one feature
    correlation between the two heads (features in place where `fixed`), summed over the
    spaces."""
    score = np.zeros((heads, heads))
    fixed = list(fixed) or [False] * len(sizes)
    for corr, size, keep in zip(corrs, sizes, fixed):
        d = size // heads
        if d == 1 and len(sizes) > 1:
            continue  # one value per head (a per-head parameter's axis): it follows the pairing
        cross = corr[:size, k * size:(k + 1) * size]
        for i in range(heads):
            for j in range(heads):
                block = cross[i * d:(i + 1) * d, j * d:(j + 1) * d]
                if keep:
                    score[i, j] += np.trace(block)
                    continue
                rows, cols = linear_sum_assignment(block, maximize=True)
                score[i, j] += block[rows, cols].sum()
    return score


def pair_heads(corrs: Sequence[np.ndarray], sizes: Sequence[int], heads: int,
               num_models: int, fixed: Sequence[bool] = ()) -> np.ndarray:
    """(num_models × heads): the head of every model that merged head i is made of (model 0's
    head i, and each other model's head aligned to it)."""
    pairs = np.tile(np.arange(heads), (num_models, 1))
    for k in range(1, num_models):
        rows, cols = linear_sum_assignment(head_similarity(corrs, sizes, heads, k, fixed),
                                          maximize=True)
        pairs[k, rows] = cols
    return pairs


def match_heads(corrs: Sequence[np.ndarray | None], sizes: Sequence[int], heads: int,
                num_models: int, method: str | Method, *, alpha: float = 0.5,
                beta: float = 1.0, fixed: Sequence[bool] = ()) -> list[Match]:
    """One Match per space (`corrs[i]` over `num_models` × `sizes[i]` features, None where the
    method needs no statistics), each keeping heads whole and all pairing heads the same way;
    merged feature i·d + j is feature j of merged head i. A `fixed` space (rotary embeddings,
    norms over head_dim) keeps every feature in place within its head: merged feature i·d + j
    averages feature j of the paired heads."""
    method = get_method(method)
    for size in sizes:
        if size % heads:
            raise MatchingError(f"{heads} groups do not divide a width of {size}")
    fixed = list(fixed) or [False] * len(sizes)
    if method.needs_statistics:
        pairs = pair_heads(corrs, sizes, heads, num_models, fixed)
    else:
        pairs = np.tile(np.arange(heads), (num_models, 1))
    matches = []
    for corr, size, keep in zip(corrs, sizes, fixed):
        d = size // heads
        assign = [np.empty(size, dtype=np.int64) for _ in range(num_models)]
        for i in range(heads):
            if keep:
                for k in range(num_models):
                    assign[k][pairs[k, i] * d + np.arange(d)] = i * d + np.arange(d)
                continue
            index = np.concatenate([k * size + pairs[k, i] * d + np.arange(d)
                                    for k in range(num_models)])
            within = method.match(None if corr is None else corr[np.ix_(index, index)],
                                  [d] * num_models, alpha=alpha, beta=beta)
            for k in range(num_models):
                assign[k][pairs[k, i] * d + np.arange(d)] = i * d + within.assign[k]
        matches.append(Match.from_assign(assign, size))
    return matches
