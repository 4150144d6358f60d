"""Deterministic row subsets that depend on each sample's own values.

The corrections' regressions and the statistics' spread and thinned (`positions=`) taps read
only a subset of the rows (sample × position) of a tensor. Which rows are kept is decided per
sample from a key computed from that sample's input values, so that the subset does not depend
on how the calibration data are batched or sharded over ranks (a merge over several ranks equals
the one-process merge), and is fixed for a seed.
"""
from __future__ import annotations

from typing import Any

import torch

from .inputs import batch_size, batch_tensors

__all__ = ["GOLDEN", "sample_keys", "unit_keys", "kept_rows", "kept_positions"]

GOLDEN = 0.6180339887498949


def sample_keys(batch: Any, seed: int) -> torch.Tensor:
    """One number in (-1, 1) per sample (the fractional part keeps the sign of a negative
    projection: use `unit_keys` for [0, 1)), computed from the sample's own values (a fixed random
    projection), so that which rows of a sample are kept does not depend on how the calibration
    data are batched or sharded over ranks."""
    n = batch_size(batch)
    tensors = [t.reshape(n, -1).double().cpu() for t in batch_tensors(batch)
               if t.dim() and t.shape[0] == n]
    flat = torch.cat(tensors, 1)
    generator = torch.Generator().manual_seed(seed)
    projection = torch.rand(flat.shape[1], generator=generator, dtype=torch.float64) + 0.5
    # rounded, so that summation order (which may differ with the batch) cannot move a key
    return torch.frac(torch.round((flat * projection).sum(1) * 2.0 ** 20) * GOLDEN)


def unit_keys(keys: torch.Tensor) -> torch.Tensor:
    """`sample_keys` mapped into [0, 1) (x mod 1: a negative key wraps around), equidistributed."""
    return torch.remainder(keys, 1.0)


def kept_positions(keys: torch.Tensor, positions: int, keep: float,
                   salt: float = 0.0) -> torch.Tensor:
    """(samples, positions) mask: position p of sample i is kept where the Weyl sequence
    frac(key_i + salt + (p + 1)·φ) falls below `keep` (an equidistributed sequence: each sample
    keeps about keep·positions of its positions, spread evenly)."""
    position = torch.arange(positions, dtype=torch.float64)
    u = torch.frac(keys[:, None] + salt + (position[None, :] + 1.0) * GOLDEN)
    return u < keep


def kept_rows(keys: torch.Tensor, rows: int, keep: float) -> torch.Tensor:
    """Mask of the rows (samples × positions, sample-major) kept for a fit: row p of sample i is
    kept where the Weyl sequence frac(key_i + (p+1)·φ) falls below `keep`."""
    per_sample = rows // max(len(keys), 1)
    return kept_positions(keys, per_sample, keep).reshape(-1)
