"""Checks of exactness for users and op-rule authors: a copy of a model with every hidden feature
space that fxzip's analysis finds permuted at random. Merging a model with its permuted copy must
give the model back exactly; if the analysis missed a tie, the copy computes another function.

>>> permuted, count = fxzip.testing.permuted_copy(model, x, seed=1)
>>> torch.testing.assert_close(permuted(x), model(x))          # the same function ...
>>> merged = fxzip.merge(model, permuted, x, reset_bn=False)    # ... and merged back exactly
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch.nn as nn

from .graph.pairing import pair_graphs
from .graph.prepare import prepare_graphs
from .matching import Match
from .passes.analysis import Analysis
from .passes.rewrite import rewrite

__all__ = ["permuted_copy"]


def permuted_copy(model: nn.Module, example: Any, seed: int = 0) -> tuple[nn.Module, int]:
    """(copy of `model` with every space but the pinned and output ones permuted, number of spaces
    permuted). Attention heads are permuted as wholes (queries, keys and values alike), and the
    features within each head; rotary spaces keep their slots. `model` is not modified."""
    (gm,) = prepare_graphs([model], example)
    analysis = Analysis(gm)
    rng = np.random.default_rng(seed)
    outputs = analysis.output_spaces()
    matches = {}
    for s in analysis.spaces.values():
        if s.pinned or s.id in outputs:
            continue
        perm = rng.permutation(s.size)
        matches[s.id] = Match((perm,), s.size, np.ones(s.size, dtype=np.int64))
    for group in analysis.head_groups:  # heads stay whole; queries, keys, values pair heads alike
        heads = rng.permutation(group.heads)
        inner = {s: (f, b) for s, f, b in group.inner}  # grouped-query attention's query heads
        factor = max([f for f, _ in inner.values()], default=1)
        sub_heads = [rng.permutation(factor) for _ in range(group.heads)]
        withins: dict[int, list[np.ndarray]] = {}
        for space in sorted(group.spaces, key=lambda s: s in inner):  # kv spaces first
            f, base = inner.get(space, (1, None))
            size = analysis.spaces[space].size
            d = size // (group.heads * f)
            own = [np.arange(d) if space in group.fixed else rng.permutation(d)
                   for _ in range(group.heads)]
            within = withins[base] if base is not None else own
            withins[space] = own
            perm = np.concatenate([(heads[h] * f + (sub_heads[h][a] if f > 1 else 0)) * d
                                   + within[h] for h in range(group.heads) for a in range(f)])
            matches[space] = Match((perm,), size, np.ones(size, dtype=np.int64))
    pinned_or_output = {s.id: Match.identity(s.size, 1) for s in analysis.spaces.values()
                        if s.id in outputs and not s.pinned}
    everything = {n.name for n in analysis.nodes if n.op != "output"}
    rewritten = rewrite([gm], analysis, {**matches, **pinned_or_output}, everything,
                        pairing=pair_graphs([gm]))
    permuted = copy.deepcopy(model)
    # the copy's own state (its metadata too), with every entry the traced graph holds replaced;
    # the entries it does not read (a BatchNorm's num_batches_tracked, a module's second name,
    # which shares the first one's tensors) keep their values: the function does not use them
    state = permuted.state_dict()
    state.update((k, v) for k, v in rewritten.state_dict().items() if k in state)
    permuted.load_state_dict(state)
    return permuted.eval(), len(matches)
