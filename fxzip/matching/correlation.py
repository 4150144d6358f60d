"""Helpers on correlation matrices shared by the input checks and the methods: symmetrising one
in place (`_mirror_upper`) and turning one into a covariance (`covariance`, for "cca")."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["covariance"]


def _mirror_upper(S: np.ndarray, block: int = 32) -> float:
    """Copy the upper triangle onto the lower one in place; return the largest |S - S.T|.

    Mirroring makes the result independent of last-bit asymmetries that float arithmetic
    leaves in computed correlations. The result is NaN or inf if S holds NaN or inf.
    For speed (this pass costs about as much as the whole greedy), it goes by panels of
    `block` columns: the panel above the diagonal is transposed once into a scratch
    buffer that stays in cache, compared with the panel below, and copied there only
    if they differ (an exactly symmetric matrix is only read).
    """
    with np.errstate(invalid="ignore", over="ignore"):  # NaN and inf are reported, not warned
        return _mirror_panels(S, block)


def _mirror_panels(S: np.ndarray, block: int) -> float:
    """The loop of `_mirror_upper`."""
    D = S.shape[0]
    worst, finite = 0.0, True
    flipped = np.empty((D, block))
    diff = np.empty((D, block))
    below = np.tri(block, block, -1, dtype=bool)  # strictly below the diagonal
    for i0 in range(0, D, block):
        i1 = min(i0 + block, D)
        tile = S[i0:i1, i0:i1]  # on the diagonal: mirror its own upper triangle
        tile_t = tile.T.copy()
        gap = float(np.abs(tile - tile_t).max())
        np.copyto(tile, tile_t, where=below[: i1 - i0, : i1 - i0])
        if i1 < D:  # below the diagonal: the transposed panel above it
            lower = S[i1:, i0:i1]
            upper_t = flipped[: D - i1, : i1 - i0]
            np.copyto(upper_t, S[i0:i1, i1:].T)
            d = np.subtract(lower, upper_t, out=diff[: D - i1, : i1 - i0])
            if d.any():  # NaN counts as nonzero
                high, low = float(d.max()), float(d.min())
                finite = finite and math.isfinite(high) and math.isfinite(low)
                gap = max(gap, high, -low)
                lower[...] = upper_t
        finite = finite and math.isfinite(gap)
        worst = max(worst, gap)
    return worst if finite else math.nan


def covariance(corr: np.ndarray, variance: np.ndarray, mean: np.ndarray | None = None) -> np.ndarray:
    """The covariance matrix of features from their correlation matrix and variances; with
    their `mean`, the uncentred second moments E[x xᵀ] instead."""
    std = np.sqrt(np.clip(np.asarray(variance, dtype=np.float64), 0.0, None))
    out = np.asarray(corr, dtype=np.float64) * std[:, None] * std[None, :]
    if mean is not None:
        mean = np.asarray(mean, dtype=np.float64)
        out += mean[:, None] * mean[None, :]
    return out
