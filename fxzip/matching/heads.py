"""Two-level matching of grouped features: heads to heads, then features within heads.

Queries/keys and values of one attention form two spaces of H heads of features. A merged head
must take its queries, keys AND values from one head of every model (attention weights of a head
apply to that head's values), and features never move between heads. Grouped convolutions are
the same with groups for heads: the input and output groups of a convolution pair alike. So heads
are paired first, once for all the spaces (Hungarian on how well the heads' features can be
matched), then each group of paired heads is matched within by the chosen method
(`fxzip.matching.registry.match_features`).

Grouped-query attention adds a level: each key/value head serves `factor` query heads in a row.
The kv heads are paired (the query heads' groups with them), then the query heads within each
pair of groups (Hungarian again), and the features within a query head follow its kv head's
(queries follow keys, attention outputs follow values).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from ..errors import MatchingError
from .match import Match
from .registry import Method, get_method


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


def _inner_similarity(corr: np.ndarray, size: int, heads: int, factor: int, k: int, i: int,
                      j: int, keep: bool) -> np.ndarray:
    """(factor × factor) similarity of model 0's inner heads of outer head i to model k's of
    outer head j (one space)."""
    d = size // (heads * factor)
    cross = corr[:size, k * size:(k + 1) * size]
    score = np.zeros((factor, factor))
    for a in range(factor):
        for b in range(factor):
            r, c = (i * factor + a) * d, (j * factor + b) * d
            block = cross[r:r + d, c:c + d]
            if keep or d == 1:
                score[a, b] = np.trace(block)
            else:
                rows, cols = linear_sum_assignment(block, maximize=True)
                score[a, b] = block[rows, cols].sum()
    return score


def _grouped_pairs(corrs, sizes, heads, num_models, fixed, inner, statistics: bool):
    """(outer pairs (num_models × heads), inner pairs (num_models × heads × factor) or None)."""
    subs = [i for i, (f, _) in enumerate(inner) if f > 1]
    plain = [i for i in range(len(sizes)) if i not in subs]
    factor = inner[subs[0]][0] if subs else 1
    if any(inner[i][0] != factor for i in subs):
        raise MatchingError("query heads grouped by different factors in one head group")
    wide = [i for i in subs if sizes[i] // (heads * factor) > 1] or subs
    pairs = np.tile(np.arange(heads), (num_models, 1))
    within = np.tile(np.arange(factor), (num_models, heads, 1))
    if not statistics:
        return pairs, within
    for k in range(1, num_models):
        score = head_similarity([corrs[i] for i in plain], [sizes[i] for i in plain], heads, k,
                                [fixed[i] for i in plain]) if plain else np.zeros((heads, heads))
        for i in range(heads):
            for j in range(heads):
                sim = sum(_inner_similarity(corrs[s], sizes[s], heads, factor, k, i, j, fixed[s])
                          for s in wide)
                rows, cols = linear_sum_assignment(sim, maximize=True)
                score[i, j] += sim[rows, cols].sum()
        rows, cols = linear_sum_assignment(score, maximize=True)
        pairs[k, rows] = cols
        for i in range(heads):
            sim = sum(_inner_similarity(corrs[s], sizes[s], heads, factor, k, i, pairs[k, i],
                                        fixed[s]) for s in wide)
            rows, cols = linear_sum_assignment(sim, maximize=True)
            within[k, i, rows] = cols
    return pairs, within


def match_heads(corrs: Sequence[np.ndarray | None], sizes: Sequence[int], heads: int,
                num_models: int, method: str | Method, *, alpha: float = 0.5,
                beta: float = 1.0, fixed: Sequence[bool] = (),
                inner: Sequence[tuple[int, int | None]] = ()) -> list[Match]:
    """One Match per space (`corrs[i]` over `num_models` × `sizes[i]` features, None where the
    method needs no statistics), each keeping heads whole and all pairing heads the same way;
    merged feature i·d + j is feature j of merged head i. A `fixed` space (rotary embeddings,
    norms over head_dim) keeps every feature in place within its head: merged feature i·d + j
    averages feature j of the paired heads. `inner[i]` = (factor, index of a kv space or None):
    space i holds `factor` query heads per head (grouped-query attention), paired within each
    pair of heads, its features following the kv space's within heads."""
    method = get_method(method)
    for size in sizes:
        if size % heads:
            raise MatchingError(f"{heads} groups do not divide a width of {size}")
    fixed = list(fixed) or [False] * len(sizes)
    if any(f > 1 for f, _ in inner):
        return _match_grouped(corrs, sizes, heads, num_models, method, alpha, beta, fixed,
                              list(inner))
    if method.needs_statistics:
        pairs = pair_heads(_as_correlations(corrs, method), sizes, heads, num_models, fixed)
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


def _as_correlations(corrs: Sequence[np.ndarray | None], method: Method) -> list:
    """Heads are paired by their features' correlations: a method that takes covariances
    ("cca") has them turned back into correlations for the pairing. Within paired heads such a
    method's dense map only chooses a permutation (`Match.assign`): a dense map would mix heads."""
    if method.statistic != "covariance":
        return list(corrs)
    out = []
    for c in corrs:
        if c is None:
            out.append(None)
            continue
        std = np.sqrt(np.clip(np.diag(c), 0.0, None))
        inv = np.where(std > 0, 1.0 / np.where(std > 0, std, 1.0), 0.0)
        out.append(c * inv[:, None] * inv[None, :])
    return out


def _match_grouped(corrs, sizes, heads, num_models, method, alpha, beta, fixed, inner):
    """match_heads with query heads grouped under key/value heads (see the module's doc)."""
    pairs, within = _grouped_pairs(_as_correlations(corrs, method), sizes, heads, num_models,
                                   fixed, inner, method.needs_statistics)
    assigns: dict[int, list[np.ndarray]] = {}
    order = sorted(range(len(sizes)), key=lambda i: (inner[i][0] > 1, i))  # kv spaces first
    for s in order:
        size, (factor, base) = sizes[s], inner[s]
        corr, keep = corrs[s], fixed[s]
        d = size // (heads * factor)
        assign = [np.empty(size, dtype=np.int64) for _ in range(num_models)]
        for i in range(heads):
            for a in range(factor):
                src = [(pairs[k, i] * factor + (within[k, i, a] if factor > 1 else 0)) * d
                       + np.arange(d)
                       for k in range(num_models)]
                dst = (i * factor + a) * d
                if factor > 1 and base is not None:
                    db = sizes[base] // heads
                    if db != d:
                        raise MatchingError(f"query heads of {d} features follow key/value heads "
                                            f"of {db}")
                    for k in range(num_models):
                        kv = assigns[base][k][pairs[k, i] * d + np.arange(d)] - i * d
                        assign[k][src[k]] = dst + kv
                elif keep:
                    for k in range(num_models):
                        assign[k][src[k]] = dst + np.arange(d)
                else:
                    index = np.concatenate([k * size + src[k] for k in range(num_models)])
                    found = method.match(None if corr is None else corr[np.ix_(index, index)],
                                         [d] * num_models, alpha=alpha, beta=beta)
                    for k in range(num_models):
                        assign[k][src[k]] = dst + found.assign[k]
        assigns[s] = assign
    return [Match.from_assign(assigns[s], sizes[s]) for s in range(len(sizes))]
