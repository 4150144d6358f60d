"""Streaming accumulators of feature statistics (count, mean, centred co-moments merged by Chan et
al.'s update) and the upper-triangle Gram products they are built from, at a chosen precision.

The statistics pass (`fxzip.passes.statistics`) feeds them; under torch.distributed their sums are
all-reduced (`fxzip.runtime.distributed`); the matching reads their correlations.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from ..errors import InputError

__all__ = ["Moments", "SpaceStats", "GRAM_BLOCK_ROWS", "PRECISIONS", "cpu_has_fast_bfloat16",
           "resolve_precision", "product_precision", "add_upper_gram", "upper_blocks",
           "add_upper_product"]


class NonFiniteRows(Exception):
    """Internal: a batch's rows hold NaN/Inf (the caller says which model and node)."""


class Moments:
    """Streaming count, mean and centred second moments of features, each batch given as the
    (features × samples) matrix of all models' features stacked.

    Only the upper triangle of `m2` is accumulated (the Gram products are symmetric: about half
    the work of full products); `correlation` mirrors it. With `rows` (indices into
    the features) only those rows of the second-moment matrix are kept, plus every feature's
    variance: what a correlation needs for a few features only.

    The per-batch work is the Gram product of the batch centred on its own mean, added by the
    product itself (`addmm_`) into a float32 buffer that is moved into the float64 `m2` after
    `FLUSH_EVERY` products or `FLUSH_ROWS` samples, whichever comes first (a float32 sum no
    longer than one product of FLUSH_ROWS samples; moving it costs a pass over the matrix, as
    much as a product of a few dozen samples, so it is not done per calibration batch); the
    scatter of the batch means about the overall mean (the between-batch part of the moments:
    Chan et al.'s parallel update) is added in float64 when the moments are read, in one product
    over all batches' means since the last read, instead of a rank-1 update of the whole matrix
    per batch. `count`, `mean` and `m2` are exact on every read. How the batches are grouped
    (over ranks, into batches) changes the sums by float32 rounding only.
    """

    FLUSH_EVERY = 16  # float32 sums of at most this many products
    FLUSH_ROWS = 1 << 16  # ... and of at most this many samples (positions included)
    MAX_PENDING = 256  # batch means kept before they are folded into `m2`

    def __init__(self, dim: int, device: torch.device, rows: Sequence[int] | None = None):
        self.rows = None if rows is None else torch.as_tensor(rows, dtype=torch.long, device=device)
        self._count = 0
        self._mean = torch.zeros(dim, dtype=torch.float64, device=device)
        height = dim if rows is None else len(rows)
        # the square matrix is made by the first flush (a float64 copy of the float32 products)
        self._m2 = torch.zeros(height, dim, dtype=torch.float64, device=device) \
            if rows is not None else None
        self._shape, self._device = (height, dim), device
        self._sq = None if rows is None else torch.zeros(dim, dtype=torch.float64, device=device)
        # float32 Gram products not yet in _m2: one block of rows per `upper_blocks` entry, each
        # from its diagonal on (the upper triangle: about half the matrix)
        self._buffer: list[torch.Tensor] | None = None
        self._buffered = 0  # products in the buffer (0: stale, the next product overwrites it)
        self._buffered_rows = 0  # their samples
        self._pending: list[tuple[int, torch.Tensor]] = []  # (count, float64 mean) per batch
        self._consumed = False  # m2 turned into the correlation (`correlation(in_place=True)`)
        self._variance: np.ndarray | None = None

    # exact views: every read folds what is pending first ---------------------------------------
    @property
    def count(self) -> int:
        return self._count + sum(n for n, _ in self._pending)

    @count.setter
    def count(self, value: int) -> None:
        self.settle()
        self._count = int(value)

    @property
    def mean(self) -> torch.Tensor:
        self.settle()
        return self._mean

    @mean.setter
    def mean(self, value: torch.Tensor) -> None:
        self.settle()
        self._mean = value

    @property
    def m2(self) -> torch.Tensor:
        """The centred co-moments (float64). Without `rows`, only the upper triangle (diagonal
        included) is meaningful: the lower one is never read."""
        if self._consumed:
            raise RuntimeError("these moments' co-moments became their correlation "
                               "(correlation(in_place=True)); collect them again")
        self.settle()
        if self._m2 is None:
            self._m2 = torch.zeros(self._shape, dtype=torch.float64, device=self._device)
        return self._m2

    @property
    def sq(self) -> torch.Tensor | None:
        self.settle()
        return self._sq

    def update(self, columns: Sequence[torch.Tensor]) -> None:
        """Fold in one batch given as each model's raw (channels × samples) matrix; the channel
        counts must sum to `dim`. Raises NonFiniteRows if the batch holds NaN/Inf."""
        columns = [c.float() for c in columns]
        means = torch.cat([finite_mean(c.mean(1), c) for c in columns])
        joint = torch.cat(columns)
        self.update_centred(joint - means[:, None], means)

    def update_centred(self, joint: torch.Tensor, means: torch.Tensor) -> None:
        """Fold in one batch: the stacked (features × samples) float32 matrix centred on its own
        means, and those means."""
        n = joint.shape[1]
        if n == 0:
            return
        if self.rows is None:
            if self._buffer is None:
                dim = self._shape[1]
                self._buffer = [torch.empty(stop - start, dim - start, dtype=torch.float32,
                                            device=self._device)
                                for start, stop in upper_blocks(dim)]
            add_upper_product(self._buffer, joint, overwrite=self._buffered == 0)
            self._buffered += 1
            self._buffered_rows += n
            if self._buffered >= self.FLUSH_EVERY or self._buffered_rows >= self.FLUSH_ROWS:
                self._flush()
        else:
            self._m2 += (joint[self.rows] @ joint.T).double()
            self._sq += joint.square().sum(1, dtype=torch.float64)
        self._pending.append((n, means.detach().double()))
        if len(self._pending) >= self.MAX_PENDING:
            self.settle()

    def _flush(self) -> None:
        """Move the float32 products into the float64 sums; the next product overwrites the
        buffer."""
        if self._buffer is not None and self._buffered:
            first = self._m2 is None
            if first:  # no zeros to add to: the products are copied, the lower triangle zeroed
                self._m2 = torch.empty(self._shape, dtype=torch.float64, device=self._device)
            for (start, stop), block in zip(upper_blocks(self._shape[1]), self._buffer):
                if first:
                    self._m2[start:stop, start:].copy_(block)
                    self._m2[start:stop, :start].zero_()
                else:
                    self._m2[start:stop, start:] += block
        self._buffered = self._buffered_rows = 0

    def settle(self) -> None:
        """Fold the buffered products and the pending batch means into count, mean and m2: the
        scatter of the batch means (and of the earlier data as one group) about the new mean,
        Σ n_b (μ_b − μ)(μ_b − μ)ᵀ, in float64."""
        self._flush()
        self._buffer = None  # freed between passes; made again by the next update
        if not self._pending:
            return
        counts = [self._count] + [n for n, _ in self._pending]
        means = torch.stack([self._mean] + [m for _, m in self._pending], 1)  # (dim, groups)
        weights = torch.tensor(counts, dtype=torch.float64, device=means.device)
        total = float(sum(counts))
        mean = means @ (weights / total)
        deltas = means - mean[:, None]
        scaled = deltas * weights
        if self._m2 is None:
            self._m2 = torch.zeros(self._shape, dtype=torch.float64, device=self._device)
        if self.rows is None:  # the upper triangle's row blocks only
            for start, stop in upper_blocks(self._shape[1]):
                self._m2[start:stop, start:].addmm_(scaled[start:stop], deltas[start:].T)
        else:
            self._m2.addmm_(scaled[self.rows], deltas.T)
            self._sq += (scaled * deltas).sum(1)
        self._mean = mean
        self._count = int(total)
        self._pending = []

    def _sums_of_squares(self) -> torch.Tensor:
        """Every feature's centred sum of squares."""
        return self.m2.diagonal() if self.rows is None else self.sq

    def variance(self) -> np.ndarray:
        """Every feature's (sample) variance."""
        if self._consumed:
            return self._variance
        return (self._sums_of_squares() / max(self.count - 1, 1)).cpu().numpy()

    def constant(self) -> np.ndarray:
        """Mask of the features that are constant over all samples (to float32 precision)."""
        std = np.sqrt(np.clip(self.variance(), 0.0, None))
        return std <= 1e-6 * np.abs(self.mean.cpu().numpy()) + 1e-10

    def correlation(self, in_place: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Pearson correlation (the kept rows of it), and the mask of constant features (whose
        correlations are set to 0). Computed in float64 by row blocks of the upper triangle, each
        scaled and mirrored into the result (one pass over the co-moments, one write of the
        result; the temporaries are one block). `in_place` writes it over the co-moments (no
        second D × D matrix; a row block's mirror lands below the diagonal, where no later block
        reads), which leaves these moments without `m2`: only count, mean and `variance` stay."""
        constant = self.constant()
        mask = torch.as_tensor(constant, device=self._device)
        # 1/sqrt of the sums of squares; 0 for constant features (the sums are > 0 otherwise)
        inv = torch.where(mask, 0.0, self._sums_of_squares().clamp_min(1e-300).rsqrt())
        if self.rows is not None:
            cov = self.m2 * inv[self.rows][:, None]
            cov *= inv[None, :]
            return cov.clamp_(-1.0, 1.0).cpu().numpy(), constant
        m2 = self.m2
        if in_place:
            self._variance = self.variance()
        corr = m2 if in_place else torch.empty_like(m2)
        for start, stop in upper_blocks(m2.shape[0]):
            block = m2[start:stop, start:] * inv[start:stop, None]
            block *= inv[None, start:]
            block.clamp_(-1.0, 1.0)
            width = stop - start
            square = block[:, :width]  # the diagonal block: its upper triangle, mirrored
            corr[start:stop, start:stop] = square.triu() + square.triu(1).T
            corr[start:stop, stop:] = block[:, width:]
            corr[stop:, start:stop] = block[:, width:].T
        if in_place:
            self._m2 = None
            self._consumed = True
        return corr.cpu().numpy(), constant


class SpaceStats:
    """Moments of a space at the tensors its consumers read (the paper's features) and, as a
    fallback for features that are constant there (dead units), at its producers' outputs: only
    the rows of those features are collected there."""

    def __init__(self, dim: int, device: torch.device, lean: bool = False):
        self.features = Moments(dim, device)
        self.fallback: Moments | None = None
        self._correlation: np.ndarray | None = None
        # lean: the correlation is computed over the co-moments (used once, then dropped: a
        # merge under a memory budget)
        self.lean = lean

    def constant_features(self) -> np.ndarray:
        """Indices of the features that are constant at the consumers."""
        return np.flatnonzero(self.features.constant())

    def correlation(self) -> np.ndarray:
        """The correlation matrix the matching uses (computed once; the result is read-only)."""
        if self._correlation is None:
            self._correlation = self._compute_correlation()
            self._correlation.setflags(write=False)
        return self._correlation

    def _compute_correlation(self) -> np.ndarray:
        corr, constant = self.features.correlation(in_place=self.lean)
        if constant.any() and self.fallback is not None:
            backup, still_constant = self.fallback.correlation()
            index = self.fallback.rows.cpu().numpy()
            corr[index, :] = backup
            corr[:, index] = backup.T
            constant = constant & still_constant
        if constant.any():  # constant everywhere: equal constants are interchangeable
            idx = np.flatnonzero(constant)
            m = self.features.mean.cpu().numpy()[idx]
            scale = np.maximum(np.abs(m[:, None]), np.abs(m[None, :]))
            corr[np.ix_(idx, idx)] = (np.abs(m[:, None] - m[None, :]) <= 1e-5 * scale + 1e-10)
        return corr


def finite_mean(mean: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`mean` if finite; NaN/Inf anywhere in `values` reaches it, so only then are the values
    checked (raising NonFiniteRows), else the float32 sum overflowed: recompute in float64."""
    if bool(torch.isfinite(mean).all()):
        return mean
    if not bool(torch.isfinite(values).all()):
        raise NonFiniteRows
    return values.double().mean(tuple(range(1, values.dim()))).float()


GRAM_BLOCK_ROWS = 128  # blocks of 128-256 rows measured fastest here for 512 to 4,096 features
PRECISIONS = ("auto", "float32", "bfloat16")


def cpu_has_fast_bfloat16() -> bool:
    """Whether oneDNN runs bfloat16 products natively on this CPU (AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available()
                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_precision(precision: Any) -> str:
    """`precision` if it names a precision of the Gram products (`PRECISIONS`), else an
    InputError."""
    if precision not in PRECISIONS:
        raise InputError(f"statistics_precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision of the Gram products: "float32", or "bfloat16" (CPU only: the float32
    features are rounded to bfloat16 inside oneDNN's product, which accumulates and returns
    float32). "auto" takes bfloat16 where the CPU runs it natively, about twice as fast; float32
    elsewhere. The rounding (to nearest, relative error up to 2^-9) is independent across samples,
    so correlations over N samples (positions included) differ from float32's by about
    2.5e-3/sqrt(N) rms, the largest entries 4-5 times that (1.7e-4 at most on a ResNet-20x4's
    spaces); the matchings were the same on every space measured."""
    check_precision(precision)
    if precision == "auto":
        return "bfloat16" if device.type == "cpu" and cpu_has_fast_bfloat16() else "float32"
    if precision == "bfloat16" and device.type != "cpu":
        raise InputError(f"statistics_precision='bfloat16' is for the CPU; the models are on "
                         f"{device}: use 'float32' or 'auto'")
    return precision


@contextmanager
def product_precision(precision: str) -> Iterator[None]:
    """Within the block, float32 matrix products on the CPU round their inputs to bfloat16 if
    `precision` is "bfloat16" (oneDNN's fp32 math mode); the models' own forwards never run
    inside it."""
    if precision != "bfloat16":
        yield
        return
    setting = torch.backends.mkldnn.matmul
    previous = setting.fp32_precision
    setting.fp32_precision = "bf16"
    try:
        yield
    finally:
        setting.fp32_precision = previous


def add_upper_gram(m2: torch.Tensor, joint: torch.Tensor) -> None:
    """m2 += joint @ joint.T on and above the diagonal only: the rows are taken in blocks, each
    multiplied with itself and the rows after it (float32 products, or bfloat16-rounded inputs
    inside `product_precision`), so about half of the full product's multiply-adds and float64
    additions are done (the more blocks, the closer to half; the blocks stay large enough for an
    efficient matrix product)."""
    dim = joint.shape[0]
    step = GRAM_BLOCK_ROWS if dim > 2 * GRAM_BLOCK_ROWS else max(1, (dim + 1) // 2)
    for start in range(0, dim, step):
        rows = joint[start:start + step]
        m2[start:start + step, start:] += rows @ joint[start:].T


def upper_blocks(dim: int) -> list[tuple[int, int]]:
    """The row blocks (start, stop) in which the upper triangle of a dim × dim Gram matrix is
    accumulated: GRAM_BLOCK_ROWS rows each (two halves for small matrices)."""
    step = GRAM_BLOCK_ROWS if dim > 2 * GRAM_BLOCK_ROWS else max(1, (dim + 1) // 2)
    return [(start, min(start + step, dim)) for start in range(0, dim, step)]


def add_upper_product(blocks: Sequence[torch.Tensor], joint: torch.Tensor,
                      overwrite: bool = False) -> None:
    """blocks[b] += joint[start:stop] @ joint[start:].T for the row blocks of `upper_blocks`
    (blocks[b] = ... with `overwrite`): the upper triangle of joint @ joint.T as
    `add_upper_gram` computes it, each block's product added by the matrix product itself into
    a float32 block of the rows from their diagonal on (no temporary product, no separate
    addition, half the memory of the square matrix)."""
    beta = 0.0 if overwrite else 1.0
    for (start, stop), block in zip(upper_blocks(joint.shape[0]), blocks):
        block.addmm_(joint[start:stop], joint[start:].T, beta=beta)
