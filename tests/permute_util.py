"""A second permutation oracle: permute every hidden space that fxzip's analysis finds, by
rewriting one model with permutation matches, and load the result into a copy of the model.
If the analysis missed a tie, the permuted copy computes a different function (tests check).
Also the helpers several test files share: `rel_err`, `small_resnet`, `as_trained_timm`."""
import copy

import numpy as np
import torch

import fxzip
from fxzip.demo.digits import ResNet20
from fxzip.matching.core import Match
from fxzip.passes.analysis import Analysis
from fxzip.passes.rewrite import rewrite
from fxzip.graph.prepare import prepare_graphs


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
    rewritten = rewrite([gm], analysis, {**matches, **pinned_or_output}, everything)
    permuted = copy.deepcopy(model)
    own = permuted.state_dict()
    state = {k: v for k, v in rewritten.state_dict().items() if k in own}
    permuted.load_state_dict(state, strict=True)
    return permuted.eval(), len(matches)


def assert_self_merge_exact(model: torch.nn.Module, x: torch.Tensor, has_barrier: bool,
                            label: str, tol: float = 1e-4) -> None:
    """Merging `model` with its permuted copy (or, past a barrier, where the oracle cannot permute
    the whole model, with a plain copy) gives the model's outputs back (relative error < tol)."""
    import fxzip

    with torch.no_grad():
        ref = model(x)
    if has_barrier:
        other = copy.deepcopy(model)
    else:
        other, count = permuted_by_analysis(model, x, seed=1)
        assert count >= 1
        with torch.no_grad():
            torch.testing.assert_close(other(x), ref, rtol=1e-4, atol=1e-5)
    merged = fxzip.merge(model, other, x, reset_bn=False, progress=False)
    with torch.no_grad():
        for out in merged(x):
            err = ((out - ref).norm() / ref.norm()).item()
            assert err < tol, (label, err)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error ||out - ref|| / ||ref|| of a merged model's output against a reference."""
    return ((out - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def small_resnet(seed: int) -> torch.nn.Module:
    """A small ResNet (one block per stage) whose BatchNorm statistics come from a random batch,
    so that they are not the trivial initial ones."""
    torch.manual_seed(seed)
    model = ResNet20(width=1, blocks_per_stage=1)
    model.train()
    with torch.no_grad():
        model(torch.randn(128, 1, 8, 8, generator=torch.Generator().manual_seed(seed + 100)))
    return model.eval()


def as_trained_timm(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """A timm model made to look trained: BatchNorm statistics estimated on `x`, and the
    classifier weights timm zero-initialises re-drawn (a zero head makes every output 0)."""
    import fxzip

    model = fxzip.reset_bn(model, x, progress=False)
    with torch.no_grad():
        for p in model.get_classifier().parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0.0, 0.1)
    return model
