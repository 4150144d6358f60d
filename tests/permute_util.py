"""A second permutation oracle: permute every hidden space that fxzip's analysis finds, by
rewriting one model with permutation matches, and load the result into a copy of the model.
If the analysis missed a tie, the permuted copy computes a different function (tests check)."""
import copy

import numpy as np
import torch

from fxzip.matching import Match
from fxzip.passes.analysis import Analysis
from fxzip.passes.rewrite import rewrite
from fxzip.pipeline import prepare_graphs


def permuted_by_analysis(model: torch.nn.Module, x: torch.Tensor, seed: int = 0):
    """(copy of `model` with every non-output space permuted, number of spaces permuted)."""
    (gm,) = prepare_graphs([model], x)
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
        for space in group.spaces:
            d = analysis.spaces[space].size // group.heads
            within = (lambda: np.arange(d)) if space in group.fixed else (lambda: rng.permutation(d))
            perm = np.concatenate([heads[h] * d + within() for h in range(group.heads)])
            matches[space] = Match((perm,), d * group.heads, np.ones(d * group.heads, dtype=np.int64))
    pinned_or_output = {s.id: Match.identity(s.size, 1) for s in analysis.spaces.values()
                        if s.id in outputs and not s.pinned}
    everything = {n.name for n in analysis.nodes if n.op != "output"}
    rewritten = rewrite([gm], analysis, {**matches, **pinned_or_output}, everything)
    permuted = copy.deepcopy(model)
    own = permuted.state_dict()
    state = {k: v for k, v in rewritten.state_dict().items() if k in own}
    permuted.load_state_dict(state, strict=True)
    return permuted.eval(), len(matches)
