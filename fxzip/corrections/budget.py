"""The memory budget of the corrections pass: the live activations a sample needs (from the
traced shapes), and which calibration samples fit within `Corrections.memory_gib`."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from ..runtime.distributed import is_distributed
from ..runtime.memory import activation_bytes_per_sample
from ..runtime.inputs import batch_size, leading, selected
from ..runtime.sampling import sample_keys, unit_keys
from .channels import reduce

__all__ = ["activation_bytes_per_sample", "within_budget", "samples_within"]


def within_budget(batches: list[Any], budget: int | None, seed: int, group: Any) -> list[Any]:
    """About `budget` samples of `batches` (all if they fit), spread over all of them: sample i is
    kept where its key (from its own values, `fxzip.runtime.sampling`) falls below budget / total, total
    counted over every rank, so the subset depends neither on the order of the data (a loader
    sorted by class keeps every class) nor on its batching or sharding; at least one sample in
    one process. Batches left empty are dropped."""
    count = torch.tensor([float(sum(batch_size(x) for x in batches))], dtype=torch.float64)
    reduce([count], group)
    total = count.item()
    if budget is None or total <= budget:
        return batches
    share = budget / total
    kept = []
    for x in batches:
        mask = unit_keys(sample_keys(x, seed + 1)) < share  # keys apart from the rows' keys
        if bool(mask.any()):
            kept.append(selected(x, mask))
    if not kept and batches and not is_distributed():  # a budget below one sample's share
        kept = [leading(batches[0], 1)]
    return kept


def samples_within(graphs: Sequence[fx.GraphModule], memory_gib: float | None) -> int | None:
    """How many calibration samples the pass can hold within `memory_gib` (None: no bound or
    unknown): every parent's live activations, the merged model's and the fit targets (each
    about as large as the largest parent's)."""
    if memory_gib is None:
        return None
    per_graph = [activation_bytes_per_sample(g) for g in graphs]
    if any(b is None for b in per_graph):
        return None
    per_sample = sum(per_graph) + 2 * max(per_graph)
    return max(1, int(memory_gib * 2**30 // max(per_sample, 1.0)))
