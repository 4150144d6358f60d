"""The "weights" method: Git Re-Basin weight matching (Ainsworth et al., ICLR 2023, Algorithm 1),
for any architecture the analysis understands. It reads no data.

Model B's features are permuted, one permutation P_s per feature space s, to maximise the sum over
all parameters of the inner products ⟨W_A, W_B permuted along every axis⟩. Every axis that runs
along a space (`Analysis.param_uses`: weight rows and columns, biases, norm weights, embeddings,
class and position tokens, grouped and depthwise convolutions) is permuted by its space's P_s, so
nothing here knows an architecture. The objective is maximised by coordinate descent: the spaces
in a random (seeded) order, each solved exactly given the others by a linear assignment on

    C_s = Σ over the parameter axes along s of  W_A(s-axis first, flattened) · W̃_B(…)ᵀ,

where W̃_B is B's tensor permuted on its other axes; sweeps repeat until no permutation improves
(at most `max_iterations`). Spaces of attention heads (and grouped convolutions) are solved
together as a head group: heads are paired whole, the features within paired heads by an
assignment on their block of C_s, features of `fixed` (rotary) spaces keep their slots within
the head (`fxzip.matching.heads.match_heads` on the costs). Pinned spaces stay identity, and so do
the output spaces (their features are the models' own classes, as in Git Re-Basin). Buffers
(BatchNorm's running statistics) are not weights and do not count.

N > 2 models: every model is matched to model 0 on its own (as "permute" does), and the merge
averages the aligned weights of all of them. Cost: a sweep touches every parameter about twice (one
product per parameter axis along a space, O(parameters × width)) and one assignment per space
(O(width³)); a few sweeps usually converge.

>>> zipper = fxzip.Zipper([model_a, model_b], x)
>>> matches = weight_matching(zipper.graphs, zipper.analysis, zipper.pairing)
>>> merged = fxzip.merge(model_a, model_b, x, method="weights")      # the same, in one call
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from scipy.optimize import linear_sum_assignment

from ..errors import MatchingError
from ..graph.nodes import module_attribute
from .heads import match_heads
from .match import Match
from .registry import Method, register_method
from .similarity import _targets_by_graph0

if TYPE_CHECKING:
    from ..passes.analysis import Analysis
    from ..rules.api import ParamUse

__all__ = ["WeightMatching", "weight_matching", "weight_objective"]

MAX_ITERATIONS = 100
_TOLERANCE = 1e-9  # an update must gain this share of its objective, so ties never cycle


@register_method
class WeightMatching(Method):
    """Git Re-Basin weight matching: model B's features permuted to maximise the inner products of
    the two models' weights, all spaces jointly (`weight_matching`). Needs no statistics: the
    merge reads no data for it (beyond the example that traces the models)."""

    name = "weights"
    needs_statistics = False
    joint = True
    summary = "Git Re-Basin weight matching (no data)"
    widens = False
    seed = 0
    max_iterations = MAX_ITERATIONS

    def match_model(self, graphs: Sequence[fx.GraphModule], analysis: Analysis,
                    pairing: Any) -> dict[int, Match]:
        return weight_matching(graphs, analysis, pairing, seed=self.seed,
                               max_iterations=self.max_iterations)

    def _solve(self, corr: np.ndarray | None, sizes: list[int], out_size: int, alpha: float,
               beta: float) -> Match:
        raise MatchingError("method 'weights' matches every space of the models at once from "
                            "their weights, not one space from a correlation matrix: use "
                            "fxzip.merge(..., method='weights') or "
                            "fxzip.matching.weights.weight_matching(graphs, analysis, pairing)")


# ---------------------------------------------------------------------------
# the parameters and their axes
# ---------------------------------------------------------------------------


@dataclass
class _Param:
    """One parameter of every model (compute dtype, on its device) and the uses of its axes."""

    label: str
    tensors: list[torch.Tensor]
    uses: list[ParamUse]
    groups: int = 1  # > 1: a grouped convolution's weight (out, in/groups, ...), uses on 0 and 1
    _dense: list[torch.Tensor] | None = field(default=None, repr=False)

    def dense(self) -> list[torch.Tensor]:
        """The grouped weight as block-diagonal dense weights (out, in, ...), per model."""
        if self._dense is None:
            self._dense = [_block_diagonal(t, self.groups) for t in self.tensors]
        return self._dense


def _block_diagonal(weight: torch.Tensor, groups: int) -> torch.Tensor:
    out, per_group = weight.shape[0], weight.shape[1]
    dense = weight.new_zeros((out, per_group * groups, *weight.shape[2:]))
    rows = out // groups
    for g in range(groups):
        dense[g * rows:(g + 1) * rows, g * per_group:(g + 1) * per_group] = \
            weight[g * rows:(g + 1) * rows]
    return dense


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def _parameters(graphs: Sequence[fx.GraphModule], analysis: Analysis, pairing: Any
                ) -> list[_Param]:
    """Every parameter (not buffer) that an axis of runs along a space, in every model with one
    shape; axes whose layout does not fit the tensor leave the parameter out."""
    maps = [_targets_by_graph0(analysis, pairing, k) for k in range(len(graphs))]
    found = []
    for target in sorted(analysis.param_uses):
        by_param: dict[str, dict[int, ParamUse]] = {}
        for use in analysis.param_uses[target]:
            by_param.setdefault(use.param, {}).setdefault(use.axis, use)
        for param, axes in sorted(by_param.items()):
            tensors = []
            for k, g in enumerate(graphs):
                own = maps[k].get(target)
                value = None if own is None else \
                    module_attribute(g, f"{own}.{param}" if param else own, None)
                if not isinstance(value, nn.Parameter) or not value.is_floating_point():
                    break
                tensors.append(value)
            if len(tensors) != len(graphs) or any(t.shape != tensors[0].shape for t in tensors):
                continue
            uses = [axes[a] for a in sorted(axes)]
            groups = max(u.groups for u in uses)
            shape = tensors[0].shape
            if not all(_fits(u, shape, groups) for u in uses):
                continue
            if groups > 1 and (any(u.axis not in (0, 1) for u in uses) or shape[0] % groups):
                continue
            dtype = _compute_dtype(tensors[0])
            label = f"{target}.{param}" if param else target
            found.append(_Param(label, [t.detach().to(dtype) for t in tensors], uses, groups))
    return found


def _fits(use: ParamUse, shape: torch.Size, groups: int) -> bool:
    if use.axis >= len(shape):
        return False
    length = shape[use.axis] * (groups if groups > 1 and use.axis == 1 else 1)
    return use.feat.width == length


def _positions(use: ParamUse, perms: dict[int, np.ndarray], device: torch.device
               ) -> torch.Tensor:
    """Where each element of model B's axis goes on the aligned axis (A's order)."""
    parts, offset = [], 0
    for b in use.feat.blocks:
        a = perms.get(b.space)
        base = torch.arange(b.size) if a is None else torch.tensor(a)
        parts.append((base[:, None] * b.expand + torch.arange(b.expand)).reshape(-1) + offset)
        offset += b.width
    return torch.cat(parts).to(device)


def _place(t: torch.Tensor, axis: int, positions: torch.Tensor) -> torch.Tensor:
    """t with element i of `axis` moved to position positions[i]."""
    return torch.empty_like(t).index_copy_(axis, positions, t)


def _block_cost(a: torch.Tensor, b: torch.Tensor, axis: int, offset: int, size: int,
                expand: int) -> torch.Tensor:
    """(size × size) inner products of A's and B's features along `axis`."""
    width = size * expand
    a = a.narrow(axis, offset, width).movedim(axis, 0).reshape(size, -1)
    b = b.narrow(axis, offset, width).movedim(axis, 0).reshape(size, -1)
    return (a @ b.T).double()


def _reduce_expand(c: torch.Tensor, offset: int, size: int, expand: int) -> torch.Tensor:
    """A (size × size) space cost out of the element cost `c` of a whole axis."""
    c = c[offset:offset + size * expand, offset:offset + size * expand]
    if expand > 1:
        c = c.reshape(size, expand, size, expand).diagonal(0, 1, 3).sum(-1)
    return c.double()


# ---------------------------------------------------------------------------
# costs and objective of one parameter (dense, or grouped without densifying)
# ---------------------------------------------------------------------------


def _dense_costs(tensors: Sequence[torch.Tensor], uses: Sequence[ParamUse], k: int,
                 perms: dict[int, np.ndarray], spaces: set[int], out: dict[int, torch.Tensor]
                 ) -> None:
    a, b0 = tensors[0], tensors[k]
    for i, use in enumerate(uses):
        blocks = [(blk, off) for blk, off in zip(use.feat.blocks, use.feat.offsets())
                  if blk.space in spaces]
        if not blocks:
            continue
        b = b0
        for j, other in enumerate(uses):
            if j != i:
                b = _place(b, other.axis, _positions(other, perms, b.device))
        for blk, off in blocks:
            c = _block_cost(a, b, use.axis, off, blk.size, blk.expand)
            out[blk.space] = c if blk.space not in out else out[blk.space] + c


def _dense_objective(tensors: Sequence[torch.Tensor], uses: Sequence[ParamUse], k: int,
                     perms: dict[int, np.ndarray]) -> float:
    b = tensors[k]
    for use in uses:
        b = _place(b, use.axis, _positions(use, perms, b.device))
    return float((tensors[0].double() * b.double()).sum())


def _by_axis(p: _Param) -> tuple[ParamUse | None, ParamUse | None]:
    return (next((u for u in p.uses if u.axis == 0), None),
            next((u for u in p.uses if u.axis == 1), None))


def _regrouped(p: _Param, b: torch.Tensor, inputs: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A grouped weight B (out, w, ...) with its input columns moved by `inputs` (positions on
    the dense input axis), still grouped: (B with each row's columns at their new places within
    the group they land in, that group per row); None where a row's columns land in two groups."""
    g, out, w = p.groups, b.shape[0], b.shape[1]
    rows = out // g
    group_of_row = torch.arange(out, device=b.device) // rows
    dense_cols = group_of_row[:, None] * w + torch.arange(w, device=b.device)  # (out, w)
    moved = inputs[dense_cols]
    landed = moved // w
    if not bool((landed == landed[:, :1]).all()):
        return None
    local = (moved % w).reshape(out, w, *([1] * (b.dim() - 2))).expand_as(b)
    return torch.zeros_like(b).scatter_(1, local, b), landed[:, 0]


def _grouped_costs(p: _Param, k: int, perms: dict[int, np.ndarray], spaces: set[int],
                   out: dict[int, torch.Tensor]) -> None:
    """`_dense_costs` of a grouped convolution's weight, from its grouped form: the dense
    weights are block-diagonal, so only products within groups count."""
    u0, u1 = _by_axis(p)
    a, b = p.tensors[0], p.tensors[k]
    g, n_out, w = p.groups, a.shape[0], a.shape[1]
    rows = n_out // g
    dev = a.device
    if u0 is not None and any(blk.space in spaces for blk in u0.feat.blocks):
        inputs = _positions(u1, perms, dev) if u1 is not None else torch.arange(g * w, device=dev)
        found = _regrouped(p, b, inputs)
        if found is None:  # columns spread over groups: the dense weights (not expected)
            _dense_costs(p.dense(), p.uses, k, perms, {blk.space for blk in u0.feat.blocks
                                                     if blk.space in spaces}, out)
        else:
            moved, landed = found
            full = a.reshape(n_out, -1) @ moved.reshape(n_out, -1).T  # (A rows, B rows)
            full = full * ((torch.arange(n_out, device=dev) // rows)[:, None] == landed[None, :])
            for blk, off in zip(u0.feat.blocks, u0.feat.offsets()):
                if blk.space in spaces:
                    c = _reduce_expand(full, off, blk.size, blk.expand)
                    out[blk.space] = c if blk.space not in out else out[blk.space] + c
    if u1 is not None and any(blk.space in spaces for blk in u1.feat.blocks):
        # B's rows in A's order (input columns as they are): row r of the aligned B is row src[r]
        outputs = _positions(u0, perms, dev) if u0 is not None else torch.arange(n_out, device=dev)
        src = torch.empty_like(outputs)
        src[outputs] = torch.arange(n_out, device=dev)
        prods = torch.bmm(a.reshape(n_out, w, -1), b[src].reshape(n_out, w, -1).transpose(1, 2))
        pair = (torch.arange(n_out, device=dev) // rows) * g + src // rows
        blocks = torch.zeros(g * g, w, w, dtype=prods.dtype, device=dev).index_add_(0, pair, prods)
        full = blocks.reshape(g, g, w, w).permute(0, 2, 1, 3).reshape(g * w, g * w)
        for blk, off in zip(u1.feat.blocks, u1.feat.offsets()):
            if blk.space in spaces:
                c = _reduce_expand(full, off, blk.size, blk.expand)
                out[blk.space] = c if blk.space not in out else out[blk.space] + c


def _grouped_objective(p: _Param, k: int, perms: dict[int, np.ndarray]) -> float:
    u0, u1 = _by_axis(p)
    a, b = p.tensors[0], p.tensors[k]
    g, n_out, w = p.groups, a.shape[0], a.shape[1]
    dev = a.device
    inputs = _positions(u1, perms, dev) if u1 is not None else torch.arange(g * w, device=dev)
    outputs = _positions(u0, perms, dev) if u0 is not None else torch.arange(n_out, device=dev)
    found = _regrouped(p, b, inputs)
    if found is None:
        return _dense_objective(p.dense(), p.uses, k, perms)
    moved, landed = found
    valid = (outputs // (n_out // g)) == landed  # B's row j lands in the group of its new row
    dots = (a[outputs].double() * moved.double()).reshape(n_out, -1).sum(1)
    return float(dots[valid].sum())


def _costs(p: _Param, k: int, perms: dict[int, np.ndarray], spaces: set[int],
           out: dict[int, torch.Tensor]) -> None:
    if p.groups > 1:
        _grouped_costs(p, k, perms, spaces, out)
    else:
        _dense_costs(p.tensors, p.uses, k, perms, spaces, out)


def _objective(p: _Param, k: int, perms: dict[int, np.ndarray]) -> float:
    if p.groups > 1:
        return _grouped_objective(p, k, perms)
    return _dense_objective(p.tensors, p.uses, k, perms)


# ---------------------------------------------------------------------------
# coordinate descent
# ---------------------------------------------------------------------------


@dataclass
class _Unit:
    """Spaces solved together: one space, or the spaces of a head group."""

    spaces: list[int]
    group: Any = None


def _units(analysis: Analysis, free: set[int]) -> list[_Unit]:
    units, seen = [], set()
    for group in analysis.head_groups:
        spaces = [s for s in group.spaces if s in free]
        if spaces:
            units.append(_Unit(spaces, group))
            seen.update(spaces)
    units += [_Unit([s]) for s in sorted(free - seen)]
    return units


def _solve_unit(unit: _Unit, costs: dict[int, np.ndarray], sizes: dict[int, int]
                ) -> dict[int, np.ndarray]:
    """The best permutation of the unit's spaces for fixed costs C_s[i, j] = ⟨A's feature i,
    B's feature j⟩: assign[j] = the feature of A that B's feature j goes to."""
    if unit.group is None:
        (s,) = unit.spaces
        rows, cols = linear_sum_assignment(costs[s], maximize=True)
        assign = np.empty(sizes[s], dtype=np.int64)
        assign[cols] = rows
        return {s: assign}
    group = unit.group
    symmetric = []
    for s in unit.spaces:
        n = sizes[s]
        m = np.zeros((2 * n, 2 * n))
        m[:n, n:] = costs[s]
        m[n:, :n] = costs[s].T
        symmetric.append(m)
    found = match_heads(symmetric, [sizes[s] for s in unit.spaces], group.heads, 2, "permute",
                        fixed=[s in group.fixed for s in unit.spaces],
                        inner=group.inner_of(unit.spaces))
    return {s: m.assign[1].copy() for s, m in zip(unit.spaces, found)}


def _score(cost: np.ndarray, assign: np.ndarray) -> float:
    return float(cost[assign, np.arange(assign.size)].sum())


def _align(params: list[_Param], index: dict[int, list[int]], units: list[_Unit],
           sizes: dict[int, int], k: int, seed: int, max_iterations: int
           ) -> dict[int, np.ndarray]:
    """Model k's permutations (one per free space) by coordinate descent."""
    perms = {s: np.arange(sizes[s], dtype=np.int64) for u in units for s in u.spaces}
    rng = np.random.default_rng(seed)
    for _ in range(max_iterations):
        improved = False
        for u in rng.permutation(len(units)):
            unit = units[u]
            spaces = set(unit.spaces)
            found: dict[int, torch.Tensor] = {}
            for i in sorted({i for s in unit.spaces for i in index.get(s, ())}):
                _costs(params[i], k, perms, spaces, found)
            costs = {s: found[s].cpu().numpy() if s in found else np.zeros((sizes[s],) * 2)
                     for s in unit.spaces}
            new = _solve_unit(unit, costs, sizes)
            old_score = sum(_score(costs[s], perms[s]) for s in unit.spaces)
            new_score = sum(_score(costs[s], new[s]) for s in unit.spaces)
            if new_score - old_score > _TOLERANCE * max(abs(old_score), abs(new_score), 1e-30) \
                    and any(not np.array_equal(new[s], perms[s]) for s in unit.spaces):
                perms.update(new)
                improved = True
        if not improved:
            break
    return perms


def _setup(graphs: Sequence[fx.GraphModule], analysis: Analysis, pairing: Any):
    params = _parameters(graphs, analysis, pairing)
    touched = {b.space for p in params for u in p.uses for b in u.feat.blocks}
    outputs = analysis.output_spaces()
    grouped = {s for g in analysis.head_groups for s in g.spaces}
    free = {s for s in touched if s in analysis.spaces and not analysis.spaces[s].pinned
            and (s not in outputs or s in grouped)}
    index: dict[int, list[int]] = {}
    for i, p in enumerate(params):
        for s in sorted({b.space for u in p.uses for b in u.feat.blocks} & free):
            index.setdefault(s, []).append(i)
    sizes = {s: analysis.spaces[s].size for s in analysis.spaces}
    return params, free, index, sizes


def _check(graphs: Sequence[fx.GraphModule]) -> None:
    if len(graphs) < 2:
        raise MatchingError(f"weight matching needs at least 2 models, got {len(graphs)}")


def weight_matching(graphs: Sequence[fx.GraphModule], analysis: Analysis, pairing: Any, *,
                    seed: int = 0, max_iterations: int = MAX_ITERATIONS) -> dict[int, Match]:
    """A Match for every space of the analysis that is not pinned: model 0 in place, every other
    model k's features permuted onto model 0's by Git Re-Basin weight matching (coordinate
    descent over the spaces in an order drawn from `seed`; see the module's doc). Spaces no
    parameter runs along, and the output spaces, are matched in place (identity)."""
    _check(graphs)
    if max_iterations < 1:
        raise MatchingError(f"max_iterations must be >= 1, got {max_iterations}")
    params, free, index, sizes = _setup(graphs, analysis, pairing)
    units = _units(analysis, free)
    aligned = [_align(params, index, units, sizes, k, seed, max_iterations)
               for k in range(1, len(graphs))]
    matches = {}
    for s, space in analysis.spaces.items():
        if space.pinned:
            continue
        assign = [np.arange(space.size, dtype=np.int64)]
        assign += [perms.get(s, np.arange(space.size, dtype=np.int64)) for perms in aligned]
        matches[s] = Match.from_assign(assign, space.size)
    return matches


def weight_objective(graphs: Sequence[fx.GraphModule], analysis: Analysis, pairing: Any,
                     matches: dict[int, Match], k: int = 1) -> float:
    """Σ over the parameters weight matching reads of ⟨W_0, W_k permuted by `matches`⟩ (model
    k's features moved to their merged feature: `Match.assign[k]`; spaces not in `matches`
    stay in place). The quantity `weight_matching` maximises (for a one-to-one match)."""
    _check(graphs)
    params, free, _, _ = _setup(graphs, analysis, pairing)
    perms = {s: np.asarray(m.assign[k], dtype=np.int64) for s, m in matches.items()
             if s in analysis.spaces and not analysis.spaces[s].pinned}
    return sum(_objective(p, k, perms) for p in params)
