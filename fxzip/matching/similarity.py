"""Weight similarity of features: a second opinion besides the activations' correlation.

With few calibration samples, many features look exactly alike (e.g. ReLU units active on the same
single image correlate exactly 1), and the matching pairs them arbitrarily: even a model merged
with a copy of itself is then not returned exactly. The weights tell such features apart.

Each feature of a space gets a *signature* from every parameter that runs along the space (the
rows of the layers that write it, their biases and BatchNorm parameters, the columns of the layers
that read it): per parameter, the feature's slice sorted and summarised by evenly spaced
quantiles (scalars as they are). Sorting makes the signature invariant to how the neighbouring
spaces are permuted, so a feature and its counterpart in a permuted copy have equal signatures
(bit for bit); features that merely look alike on the data have different weights. The
signatures' columns are standardised over all features of all models (so every parameter counts
alike, not its scale) and the similarity of two features is the correlation of their signatures.

`Zipper.match` mixes it in: ``S = (1 − w)·corr + w·weight_similarity`` with ``w`` the
`weight_similarity` option (MuDSC, Xu et al., CVPR 2024, mix weight and activation similarity;
here the weights are compared by permutation-invariant signatures rather than aligned first).
"""
from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.fx as fx

from ..graph.nodes import module_attribute

if TYPE_CHECKING:
    from ..passes.analysis import Analysis

__all__ = ["feature_signatures", "weight_similarity", "mix"]

QUANTILES = 16
_MIX_ROWS = 256  # rows of the similarity `mix` weighs at a time
_PARALLEL_SORT_SIZE = 1 << 20  # values from which the rows are sorted on several threads
_SORT_ROWS_PER_TASK = 64


def _targets_by_graph0(analysis: Analysis, pairing: Any, k: int) -> dict[str, str]:
    """Graph 0's module/attribute targets → graph k's (through the pairing of the nodes that use
    them); identity for k = 0."""
    found: dict[str, str] = {}
    for node in analysis.nodes:
        if node.op in ("call_module", "get_attr") and node.target not in found:
            if k == 0:
                found[node.target] = node.target
            else:
                try:
                    found[node.target] = pairing.node(k, node.name).target
                except KeyError:
                    continue
    return found


def _sorted_rows(values: np.ndarray) -> np.ndarray:
    """Each row sorted; a large array in row blocks on torch's threads (numpy's sort runs on
    one core and lets go of the GIL), the same values as one sort."""
    workers = min(torch.get_num_threads(), values.shape[0] // _SORT_ROWS_PER_TASK)
    if workers < 2 or values.size < _PARALLEL_SORT_SIZE:
        return np.sort(values, axis=1)
    out = np.empty_like(values)
    bounds = np.linspace(0, values.shape[0], 4 * workers + 1).astype(int)

    def sort_block(i: int) -> None:
        out[bounds[i]:bounds[i + 1]] = np.sort(values[bounds[i]:bounds[i + 1]], axis=1)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(sort_block, range(len(bounds) - 1)))
    return out


def _summary(rows: torch.Tensor) -> torch.Tensor:
    """(features, m) → (features, ≤ QUANTILES): each row sorted, read at evenly spaced points
    (float64; the values of `torch.quantile`'s linear interpolation, bit for bit). The rows are
    sorted by numpy, whose vectorised sort is about ten times faster than torch's on the CPU."""
    values = rows.detach().cpu()
    if values.dtype not in (torch.float32, torch.float64):
        values = values.float()
    ordered = torch.from_numpy(_sorted_rows(values.numpy())).double()
    if ordered.shape[1] <= QUANTILES:
        return ordered
    ranks = torch.linspace(0, 1, QUANTILES, dtype=torch.float64) * (ordered.shape[1] - 1)
    below, above = ranks.long(), ranks.ceil().long()
    return torch.lerp(ordered[:, below], ordered[:, above], ranks - below)


def feature_signatures(graphs: Sequence[fx.GraphModule], analysis: Analysis, pairing: Any,
                       space: int) -> list[np.ndarray] | None:
    """Per model, the (size, L) signatures of the features of `space` (None if no parameter
    runs along it)."""
    size = analysis.spaces[space].size
    per_model: list[list[torch.Tensor]] = [[] for _ in graphs]
    maps = [_targets_by_graph0(analysis, pairing, k) for k in range(len(graphs))]
    for target in sorted(analysis.param_uses):
        for use in analysis.param_uses[target]:
            if use.groups != 1 or use.feat.headed:
                continue
            offset = 0
            for block in use.feat.blocks:
                if block.space != space:
                    offset += block.width
                    continue
                parts = []
                for k, g in enumerate(graphs):
                    own = maps[k].get(target)
                    path = f"{own}.{use.param}" if use.param else own
                    value = None if own is None else module_attribute(g, path, None)
                    if not isinstance(value, torch.Tensor) or use.axis >= value.dim() \
                            or value.shape[use.axis] < offset + block.width:
                        parts = []
                        break
                    piece = value.detach().narrow(use.axis, offset, block.width).movedim(use.axis, 0)
                    parts.append(_summary(piece.reshape(block.size, -1).cpu()))
                if parts:
                    for k, p in enumerate(parts):
                        per_model[k].append(p)
                offset += block.width
    if not per_model[0]:
        return None
    return [torch.cat(p, 1).numpy() for p in per_model]


def weight_similarity(signatures: Sequence[np.ndarray]) -> np.ndarray:
    """The (D, D) correlation of the features' signatures (all models' features concatenated),
    each signature column standardised over all features first; constant signatures correlate 0
    with others (1 with themselves)."""
    sig = np.concatenate(signatures, 0)
    sig = sig - sig.mean(0, keepdims=True)
    scale = sig.std(0, keepdims=True)
    sig = np.divide(sig, scale, out=np.zeros_like(sig), where=scale > 1e-12 * (np.abs(sig).max() + 1e-300))
    sig = sig - sig.mean(1, keepdims=True)
    norm = np.linalg.norm(sig, axis=1, keepdims=True)
    sig = np.divide(sig, norm, out=np.zeros_like(sig), where=norm > 1e-12)
    sim = sig @ sig.T
    np.fill_diagonal(sim, 1.0)
    return np.clip(sim, -1.0, 1.0, out=sim)  # in place: no second (D, D) matrix


def mix(corr: np.ndarray, similarity: np.ndarray | None, weight: float,
        into_similarity: bool = False) -> np.ndarray:
    """(1 − weight)·corr + weight·similarity (corr itself when weight is 0 or no similarity), in
    one new matrix: the weighted similarity is added by row blocks, not held as a second one.
    `into_similarity` writes it over `similarity` instead (the same values; no new matrix)."""
    if similarity is None or weight == 0:
        return corr
    if corr.shape != similarity.shape:  # statistics of some rows only: not mixed
        return corr
    if into_similarity and similarity.flags.writeable and similarity.dtype == np.float64:
        for start in range(0, similarity.shape[0], _MIX_ROWS):
            rows = slice(start, start + _MIX_ROWS)
            block = similarity[rows]
            block *= weight
            block += (1.0 - weight) * corr[rows]
        return similarity
    out = (1.0 - weight) * corr
    dtype = np.result_type(out, weight * similarity[:1])  # the sum's, as numpy would promote
    out = out.astype(dtype, copy=False)
    for start in range(0, out.shape[0], _MIX_ROWS):  # weight * similarity by row blocks
        rows = slice(start, start + _MIX_ROWS)
        out[rows] += weight * similarity[rows]
    return out
