"""The refit and REPAIR targets of a merged trunk layer: its parents' outputs merged by M (each
merged feature the mean of the features its cluster merges), and their merged statistics."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..matching.match import Match
from ..passes.rewrite import Layouts
from .channels import channel_stats

if TYPE_CHECKING:  # type hints only: targets read `analysis.spaces` and Feat blocks
    from ..passes.analysis import Analysis
    from ..rules.layout import Feat

__all__ = ["merged_targets", "merge_index"]


def merge_index(analysis: Analysis, matches: dict[int, Match], feat: Feat, k: int,
                num_models: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(position of each of model k's channels on the merged axis, members per merged channel,
    merged width) for a tensor of layout `feat`."""
    parts, counts, offset = [], [], 0
    for b in feat.blocks:
        match = matches.get(b.space)
        if match is None:
            if not analysis.spaces[b.space].pinned:
                raise KeyError(b.space)
            match = Match.identity(b.size, num_models)
        assign = torch.tensor(np.asarray(match.assign[k]), dtype=torch.long)
        parts.append((assign[:, None] * b.expand + torch.arange(b.expand)).reshape(-1) + offset)
        counts.append(torch.tensor(np.asarray(match.counts)).repeat_interleave(b.expand))
        offset += match.size * b.expand
    return torch.cat(parts), torch.cat(counts), offset


def merged_targets(per_model: Sequence[Sequence[torch.Tensor]], feat: Feat, dim: int,
                   analysis: Analysis, matches: dict[int, Match], repair: bool,
                   group: Any = None) -> tuple[list[torch.Tensor],
                                               tuple[torch.Tensor, torch.Tensor] | None]:
    """The target values of a trunk fit point (one tensor per batch) from every model's values of
    it (`per_model[k]`, of layout `feat` with `dim` dimensions), merged by M; with `repair`, the
    REPAIR target statistics too (the average of the merged parent features' means and stds,
    over every rank's batches), else None."""
    axis = feat.axis % dim
    total, mean_t, std_t = None, None, None
    layouts = Layouts(analysis, matches, len(per_model))
    for k, values in enumerate(per_model):
        if layouts.is_dense(feat):  # a dense match ("cca"): Σ_k M_k f_k by matrix products
            mat = layouts.matrix(feat, k, "M")
            total = _add(total, [torch.movedim(torch.tensordot(
                mat.to(v.device, v.dtype), v, dims=([1], [axis])), 0, axis) for v in values])
            if repair:
                mean, std = channel_stats(values, axis, mat.shape[1], group)
                mean_t = _add(mean_t, mat @ mean.cpu().double())
                std_t = _add(std_t, mat.abs() @ std.cpu().double())
            counts = torch.ones(mat.shape[0], dtype=torch.long)  # M_k already averages
            continue
        index, counts, width = merge_index(analysis, matches, feat, k, len(per_model))
        index = index.to(values[0].device) if values else index
        if total is None:  # every model's channels added into one tensor per batch, in place
            total = [v.new_zeros([width if a == axis else n for a, n in enumerate(v.shape)])
                     for v in values]
        for t, v in zip(total, values):
            t.index_add_(axis, index, v)
        if repair:
            mean, std = channel_stats(values, axis, len(index), group)
            m = torch.zeros(width, dtype=torch.float64).index_add_(0, index.cpu(), mean.cpu())
            s = torch.zeros(width, dtype=torch.float64).index_add_(0, index.cpu(), std.cpu())
            mean_t = m if mean_t is None else mean_t + m
            std_t = s if std_t is None else std_t + s
    shape = [1] * dim
    shape[axis] = -1
    targets = [t.div_(counts.to(t.device, t.dtype).reshape(shape)) for t in total]
    return targets, ((mean_t / counts.double(), std_t / counts.double()) if repair else None)


def _add(total: Any, part: Any) -> Any:
    """`part` if `total` is None, else their sum (elementwise for lists)."""
    if total is None:
        return part
    return [a + b for a, b in zip(total, part)] if isinstance(part, list) else total + part
