"""Helpers on correlation matrices shared by the input checks and the methods: symmetrising one
(`symmetric_copy`, or in place `_mirror_upper`) and turning one into a covariance (`covariance`,
for "cca")."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["covariance", "symmetric_copy"]


#: Edge of the square tiles the mirroring goes by: few enough tiles that the Python loop costs
#: little, small enough that a tile pair and its buffers stay in cache.
TILE = 256


def _mirror_upper(S: np.ndarray) -> float:
    """Copy the upper triangle onto the lower one in place; return the largest |S - S.T|.

    Mirroring makes the result independent of last-bit asymmetries that float arithmetic
    leaves in computed correlations. The result is NaN or inf if S holds NaN or inf.
    """
    return _mirror(S, S)


def symmetric_copy(corr: np.ndarray) -> tuple[np.ndarray, float]:
    """A float64 copy of a square matrix with its upper triangle mirrored onto the lower one,
    and the largest |corr - corr.T| (as `_mirror_upper`); one pass, without a second copy."""
    S = np.empty(corr.shape)
    return S, _mirror(corr, S)


def _mirror(src: np.ndarray, dst: np.ndarray) -> float:
    """Write src's upper triangle (as float64) to both triangles of dst; return the largest
    |src - src.T| (NaN if src holds NaN or inf, which are reported, not warned about)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return _mirror_tiles(src, dst, TILE)


def _mirror_tiles(src: np.ndarray, dst: np.ndarray, tile: int) -> float:
    """The loop of `_mirror`, by pairs of square tiles (one above the diagonal, its mirror
    below): each upper tile is read into a buffer and transposed there. Transposing within
    the matrix would read `tile` rows at once at a stride that is a power of two at the usual
    widths: they fall into the same cache sets and miss on nearly every element. In place
    (`dst is src`), a lower tile is written only where it differs from its mirror."""
    D = src.shape[0]
    tile = max(1, min(tile, D))  # small matrices get small buffers
    in_place = dst is src
    pad = 8  # buffer rows of tile + 8 floats: not a power of two either
    upper_buf, flipped_buf, diff_buf = (np.empty((tile, tile + pad)) for _ in range(3))
    below = np.tri(tile, tile, -1, dtype=bool)  # strictly below the diagonal
    worst, finite = 0.0, True
    for i0 in range(0, D, tile):
        i1 = min(i0 + tile, D)
        w = i1 - i0
        upper, flipped = upper_buf[:w, :w], flipped_buf[:w, :w]
        np.copyto(upper, src[i0:i1, i0:i1], casting="unsafe")  # the diagonal tile
        np.copyto(flipped, upper.T)
        gap = float(np.abs(np.subtract(upper, flipped, out=diff_buf[:w, :w])).max())
        if not in_place:
            dst[i0:i1, i0:i1] = upper
        np.copyto(dst[i0:i1, i0:i1], flipped, where=below[:w, :w])
        for j0 in range(i1, D, tile):
            j1 = min(j0 + tile, D)
            upper, flipped = upper_buf[:w, : j1 - j0], flipped_buf[: j1 - j0, :w]
            np.copyto(upper, src[i0:i1, j0:j1], casting="unsafe")
            np.copyto(flipped, upper.T)
            d = np.subtract(src[j0:j1, i0:i1], flipped, out=diff_buf[: j1 - j0, :w],
                            dtype=np.float64, casting="unsafe")
            changed = bool(d.any())  # NaN counts as nonzero
            if changed:
                high, low = float(d.max()), float(d.min())
                finite = finite and math.isfinite(high) and math.isfinite(low)
                gap = max(gap, high, -low)
            if not in_place:
                dst[i0:i1, j0:j1] = upper
            if changed or not in_place:
                dst[j0:j1, i0:i1] = flipped
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
