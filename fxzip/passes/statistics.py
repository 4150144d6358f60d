"""Statistics pass: one streaming run of all models over the calibration inputs that accumulates,
per space, the mean and covariance of the concatenated features [f_A; f_B; ...].

The models run in lockstep inside ONE graph (`LockstepModule`): after the copies of a tapped node
an observer reads every model's tensor at once and folds it into the moments, so no tensor is kept
or cloned beyond its last use and a later in-place op cannot change what was observed. Each batch
is centred on its own mean in float32 and merged into float64 accumulators (Chan et al.'s parallel
update), which keeps the moments accurate over long streams. The centred features of all models
are written straight into one stacked matrix, whose Gram product is computed on and above the
diagonal only.
"""
from __future__ import annotations

import inspect
import math
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from tqdm.auto import tqdm

from ..runtime.distributed import all_reduce_moments
from ..errors import InputError, NonFiniteError
from ..runtime.inputs import Batches, call_model, describe
from ..graph.pairing import Pairing, pair_graphs
from ..runtime.sampling import sample_keys, unit_keys
from .analysis import Analysis, Tap


class _NonFiniteRows(Exception):
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
        counts must sum to `dim`. Raises _NonFiniteRows if the batch holds NaN/Inf."""
        columns = [c.float() for c in columns]
        means = torch.cat([_finite_mean(c.mean(1), c) for c in columns])
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
        return (self._sums_of_squares() / max(self.count - 1, 1)).cpu().numpy()

    def constant(self) -> np.ndarray:
        """Mask of the features that are constant over all samples (to float32 precision)."""
        std = np.sqrt(np.clip(self.variance(), 0.0, None))
        return std <= 1e-6 * np.abs(self.mean.cpu().numpy()) + 1e-10

    def correlation(self) -> tuple[np.ndarray, np.ndarray]:
        """Pearson correlation (the kept rows of it), and the mask of constant features (whose
        correlations are set to 0). Computed in float64 by row blocks of the upper triangle, each
        scaled and mirrored into the result (one pass over the co-moments, one write of the
        result; the temporaries are one block)."""
        constant = self.constant()
        mask = torch.as_tensor(constant, device=self._device)
        # 1/sqrt of the sums of squares; 0 for constant features (the sums are > 0 otherwise)
        inv = torch.where(mask, 0.0, self._sums_of_squares().clamp_min(1e-300).rsqrt())
        if self.rows is not None:
            cov = self.m2 * inv[self.rows][:, None]
            cov *= inv[None, :]
            return cov.clamp_(-1.0, 1.0).cpu().numpy(), constant
        m2 = self.m2
        corr = torch.empty_like(m2)
        for start, stop in upper_blocks(m2.shape[0]):
            block = m2[start:stop, start:] * inv[start:stop, None]
            block *= inv[None, start:]
            block.clamp_(-1.0, 1.0)
            width = stop - start
            square = block[:, :width]  # the diagonal block: its upper triangle, mirrored
            corr[start:stop, start:stop] = square.triu() + square.triu(1).T
            corr[start:stop, stop:] = block[:, width:]
            corr[stop:, start:stop] = block[:, width:].T
        return corr.cpu().numpy(), constant


class SpaceStats:
    """Moments of a space at the tensors its consumers read (the paper's features) and, as a
    fallback for features that are constant there (dead units), at its producers' outputs: only
    the rows of those features are collected there."""

    def __init__(self, dim: int, device: torch.device):
        self.features = Moments(dim, device)
        self.fallback: Moments | None = None
        self._correlation: np.ndarray | None = None

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
        corr, constant = self.features.correlation()
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


def _finite_mean(mean: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`mean` if finite; NaN/Inf anywhere in `values` reaches it, so only then are the values
    checked (raising _NonFiniteRows), else the float32 sum overflowed: recompute in float64."""
    if bool(torch.isfinite(mean).all()):
        return mean
    if not bool(torch.isfinite(values).all()):
        raise _NonFiniteRows
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


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision of the Gram products: "float32", or "bfloat16" (CPU only: the float32
    features are rounded to bfloat16 inside oneDNN's product, which accumulates and returns
    float32). "auto" takes bfloat16 where the CPU runs it natively, about twice as fast; float32
    elsewhere. The rounding (to nearest, relative error up to 2^-9) is independent across samples,
    so correlations over N samples (positions included) differ from float32's by about
    2.5e-3/sqrt(N) rms, the largest entries 4-5 times that (1.7e-4 at most on a ResNet-20x4's
    spaces); the matchings were the same on every space measured."""
    if precision not in PRECISIONS:
        raise InputError(f"statistics_precision must be one of {PRECISIONS}, got {precision!r}")
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


def tap_view(tensor: torch.Tensor, tap: Tap) -> torch.Tensor:
    """A tap's channels moved to the front (a view): positions and expanded copies are samples."""
    return tensor.movedim(tap.axis, 0)[tap.offset: tap.offset + tap.size * tap.expand]


def centre_into(x: torch.Tensor, tap: Tap, out: torch.Tensor) -> torch.Tensor:
    """Write a tap's view `x` (from `tap_view`) into `out` (size × samples, float32), centred on
    its batch mean, in one pass; return that mean. Raises _NonFiniteRows on NaN/Inf."""
    flat = channels_innermost(x)
    if flat is not None:  # one 2-D transposing copy, then centred in place
        rows = out.view(flat.shape)  # (size·expand, samples): expanded copies are samples too
        rows.copy_(flat)
        mean = _finite_mean(rows.mean(1).reshape(tap.size, tap.expand).mean(1), rows)
        rows.sub_(mean.repeat_interleave(tap.expand)[:, None])
        return mean
    rest = tuple(range(1, x.dim()))
    mean = x.float().mean(rest) if rest else x.float()
    mean = _finite_mean(mean.reshape(tap.size, tap.expand).mean(1), x.float())
    torch.sub(x, mean.repeat_interleave(tap.expand).view(-1, *([1] * len(rest))),
              out=out.view(x.shape))
    return mean


def channels_innermost(x: torch.Tensor) -> torch.Tensor | None:
    """A tap view `x` (channels first) as a (channels, samples) view when its channels are the
    innermost axis in memory (token features (B, N, C), channels-last images), else None. Copying
    such a view into a channel-major matrix is one blocked 2-D transpose; an elementwise op with
    an output of the other layout walks memory with a stride of C, about 15× slower."""
    if x.dim() < 2 or x.stride(0) != 1 or x.shape[0] < 2:
        return None
    try:
        flat = x.view(x.shape[0], -1)
    except RuntimeError:  # the sample axes cannot be merged without a copy
        return None
    return flat if flat.dim() == 2 and flat.stride(0) == 1 else None


SPREAD_SEED = 0  # the seed of the sample keys that choose a spread tap's positions
_SALT = 0.7548776662466927  # tap j of a space starts its Weyl sequence at frac(j·salt)


class Read:
    """One tap read into one space's moments: at `rate` < 1 only about that share of each
    sample's positions enters (every round(1/rate)-th, from an offset chosen per sample from its
    key and the `salt`, so that the taps of one space read different positions). `positions` < 1
    thins the positions further, by about that share but never below one position per sample
    (a tensor without positions, e.g. pooled features, is read whole)."""

    __slots__ = ("tap", "moments", "rate", "salt", "positions")

    def __init__(self, tap: Tap, moments: Moments, rate: float = 1.0, salt: float = 0.0,
                 positions: float = 1.0):
        self.tap, self.moments, self.rate, self.salt = tap, moments, rate, salt
        self.positions = positions

    def __iter__(self):  # unpacks as (tap, moments), as the plain pairs it generalises
        return iter((self.tap, self.moments))


def kept_counts(offsets: Sequence[int], positions: int, stride: int) -> list[int]:
    """How many positions each sample keeps: offset, offset + stride, ... below `positions`."""
    return [len(range(o, positions, stride)) for o in offsets]


def centre_kept_into(x: torch.Tensor, tap: Tap, offsets: Sequence[int], counts: Sequence[int],
                     stride: int, out: torch.Tensor) -> torch.Tensor:
    """As `centre_into`, for the positions a spread read keeps: sample i's positions
    offsets[i], offsets[i] + stride, ... (flat order) of the tap view `x` (channels, samples,
    *positions) are copied into `out` (size × kept, float32), one strided copy per sample, then
    centred in place on their mean; return that mean. Raises _NonFiniteRows on NaN/Inf."""
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    cols = out.view(x.shape[0], -1)
    start = 0
    for i, (offset, count) in enumerate(zip(offsets, counts)):
        if count:
            cols[:, start:start + count].copy_(flat[:, i, offset::stride])
            start += count
    mean = _finite_mean(cols.mean(1).reshape(tap.size, tap.expand).mean(1), cols)
    cols.sub_(mean.repeat_interleave(tap.expand)[:, None])
    return mean


class Observer(nn.Module):
    """Called in the lockstep graph with every model's tensor at one tapped node: folds the
    concatenated features [f_A, f_B, ...] of each of the node's taps into its moments.

    `taps` maps a node to its reads: `Read`s, or (Tap, Moments) pairs (read in full). A read at a
    rate < 1 takes a subset of positions chosen from `keys` (one per sample of the current batch,
    set by the caller before each batch), the same subset for every model."""

    def __init__(self, taps: dict[str, list], precision: str = "float32"):
        super().__init__()
        self.taps = {name: [r if isinstance(r, Read) else Read(*r) for r in reads]
                     for name, reads in taps.items()}
        self.precision = precision
        self.position = 0
        self.keys: torch.Tensor | None = None

    def forward(self, name: str, *tensors: torch.Tensor) -> None:
        with product_precision(self.precision):
            self._observe(name, tensors)

    def _observe(self, name: str, tensors: Sequence[torch.Tensor]) -> None:
        for read in self.taps[name]:
            tap, moments = read.tap, read.moments
            try:
                views = [tap_view(t, tap) for t in tensors]
                spread = self._spread(views[0], read)
                if spread is not None:  # a share of the positions
                    offsets, counts, stride = spread
                    kept = sum(counts)
                    if kept == 0:
                        continue
                    joint = torch.empty(len(views) * tap.size, kept * tap.expand,
                                        dtype=torch.float32, device=views[0].device)
                    means = torch.cat([centre_kept_into(x, tap, offsets, counts, stride, out)
                                       for x, out in zip(views, joint.split(tap.size))])
                else:
                    if views[0].numel() == 0:
                        continue
                    joint = torch.empty(len(views) * tap.size, views[0].numel() // tap.size,
                                        dtype=torch.float32, device=views[0].device)
                    means = torch.cat([centre_into(x, tap, out)
                                       for x, out in zip(views, joint.split(tap.size))])
                moments.update_centred(joint, means)
            except _NonFiniteRows:
                k = next(k for k, t in enumerate(tensors) if not torch.isfinite(t).all())
                raise NonFiniteError(
                    f"model {k} produced NaN/Inf activations at node '{name}' on calibration "
                    f"batch {self.position}; check the model's weights and the input scaling"
                ) from None

    def _spread(self, x: torch.Tensor, read: Read) -> tuple[list[int], list[int], int] | None:
        """For a read at a rate < 1: each sample's first kept position (chosen from its key and
        the read's salt), its number of kept positions and the stride between them (round(1 /
        rate)); None to read every position (rate 1, no keys, or a view whose second axis is
        not the batch)."""
        stride = max(1, round(1.0 / read.rate))
        keys = self.keys
        if keys is None or x.dim() < 2 or x.shape[1] != keys.shape[0]:
            return None
        positions = x[0, 0].numel()
        stride *= max(1, min(round(1.0 / read.positions), positions))
        if stride == 1:
            return None
        offsets = (unit_keys(keys + read.salt) * stride).long().clamp_(0, stride - 1).tolist()
        return offsets, kept_counts(offsets, positions, stride), stride


def lockstep_module(graphs: Sequence[fx.GraphModule], observer: Observer,
                    pairing: Pairing | None = None) -> fx.GraphModule:
    """One graph that runs all models node by node on the same input and calls the observer
    right after each tapped node (a name of graph 0) with every model's tensor there (graph k's
    node paired with it, see `fxzip.graph.pairing`); it returns nothing.

    Each model's graph is emitted in its own order, as far as the node paired with graph 0's
    current node: for models of one architecture that is node by node, in lockstep. Model k's
    submodules and attributes live under `m{k}.`; FX frees every tensor after its last use, so
    only the tensors of the node being computed are alive beside the models' state.
    """
    pairing = pairing if pairing is not None else pair_graphs(graphs)
    root = nn.Module()
    for k, gm in enumerate(graphs):
        root.add_module(f"m{k}", gm)
    root.add_module("observer", observer)
    graph = fx.Graph()
    placeholders = [n for n in graphs[0].graph.nodes if n.op == "placeholder"]
    inputs = [graph.placeholder(n.target, default_value=n.args[0] if n.args
                                else inspect.Signature.empty) for n in placeholders]
    envs: list[dict[fx.Node, fx.Node]] = [{} for _ in graphs]
    node_lists = [[n for n in gm.graph.nodes if n.op != "output"] for gm in graphs]
    positions = [{n.name: i for i, n in enumerate(nodes)} for nodes in node_lists]
    done = [0] * len(graphs)

    def emit_until(k: int, name: str) -> fx.Node:
        env, nodes = envs[k], node_lists[k]
        while done[k] <= positions[k][name]:
            node = nodes[done[k]]
            done[k] += 1
            if node.op == "placeholder":
                number = sum(1 for n in nodes[:done[k]] if n.op == "placeholder") - 1
                env[node] = inputs[number]
                continue
            copy = graph.node_copy(node, lambda n: env[n])
            if node.op in ("call_module", "get_attr"):
                copy.target = f"m{k}.{node.target}"
            env[node] = copy
        return env[nodes[positions[k][name]]]

    shared = pairing.shared()
    for node in node_lists[0]:
        if node.name not in shared:
            continue
        values = [emit_until(k, pairing.name(k, node.name)) for k in range(len(graphs))]
        if node.name in observer.taps:
            graph.call_module("observer", (node.name, *values))
    graph.output(None)
    return fx.GraphModule(root, graph, "LockstepStatistics")


def producer_taps(analysis: Analysis, space: int) -> list[Tap]:
    """Taps at the outputs of a space's producers (each producer opens exactly that space)."""
    s = analysis.spaces[space]
    taps = [Tap(p, analysis.infos[p].axis, 0, s.size, 1) for p in s.producers]
    return [] if taps == s.taps else taps


TAPS = ("all", "last", "spread")


def check_positions(positions: float) -> float:
    """`positions` if it is a share of positions to read in (0, 1], else an InputError."""
    if isinstance(positions, bool) or not isinstance(positions, (int, float)) \
            or not math.isfinite(positions) or not 0 < positions <= 1:
        raise InputError(f"positions must be a share of each tensor's positions in (0, 1] (1: "
                         f"read every position), got {positions!r}")
    return float(positions)


def check_taps(taps: str) -> str:
    """`taps` if it names a choice of taps (see `collect`), else an InputError."""
    if taps not in TAPS:
        raise InputError(f"taps must be one of {TAPS}, got {taps!r}")
    return taps


def shared_taps(analysis: Analysis, space: int, shared: set[str], which: str = "all",
                order: dict[str, int] | None = None) -> list[Tap]:
    """A space's taps at nodes every model has (its consumers past the point where the models
    part are left out); its producers' outputs where no tap is left. `which="last"` keeps only
    the tap latest in graph order (`order`: node name -> position); "all" and "spread" keep all."""
    taps = [t for t in analysis.spaces[space].taps if t.node in shared]
    if taps and which == "last":
        order = order if order is not None else {n.name: i for i, n in enumerate(analysis.nodes)}
        taps = [max(taps, key=lambda t: order.get(t.node, -1))]
    if not taps:
        taps = [t for t in producer_taps(analysis, space) if t.node in shared]
    if not taps:
        raise InputError(f"space {space} ({', '.join(analysis.spaces[space].producers[:2])}) has "
                         "no tensor that every model computes; stop the merge earlier")
    return taps


def _positions(node: fx.Node | None, tap: Tap) -> int | None:
    """Positions per sample of a tap's tensor (elements per sample and channel; expanded copies
    count), from the traced shapes; None where unknown."""
    meta = None if node is None else node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    if shape is None or len(shape) < 2 or tap.axis % len(shape) == 0:
        return None
    return math.prod(shape) // (shape[0] * shape[tap.axis])


def spread_reads(taps: list[Tap], moments: Moments, nodes: dict[str, fx.Node]) -> list[Read]:
    """A space's taps read as `taps="spread"`: each at the share max(P) / sum(P) of its
    positions (P: positions per sample of each tap), so that all reads together cost about one
    read of the largest and every tap still contributes its share of the pooled samples."""
    positions = [_positions(nodes.get(t.node), t) for t in taps]
    if len(taps) < 2:
        return [Read(t, moments) for t in taps]
    if any(p is None for p in positions):
        rate = 1.0 / len(taps)
    else:
        rate = max(positions) / sum(positions)
    return [Read(t, moments, rate, math.modf(j * _SALT)[0]) for j, t in enumerate(taps)]


def collect(graphs: Sequence[fx.GraphModule], analysis: Analysis, spaces: Iterable[int],
            batches: Batches, *, progress: bool = True, precision: str = "float32",
            timings: dict[str, float] | None = None, group: Any = None,
            pairing: Pairing | None = None, taps: str = "all",
            positions: float = 1.0) -> dict[int, SpaceStats]:
    """Statistics of every requested space over all batches, for all models at once; `precision`
    is that of the Gram products ("float32" or "bfloat16", see `resolve_precision`).

    `taps` says where a space is read: "all" at every tensor its consumers read (a residual
    stream at every block's input: the samples of all those reads are pooled), "last" only at
    the read latest in the graph (a residual stream at the end of its segment, where the ZipIt!
    paper's code reads it), which is cheaper where spaces are read many times; "spread" at every
    tensor as "all", but a space read at k taps takes each at a share of its positions (about
    1/k: `spread_reads`), a subset chosen per sample from the sample's input values (fixed, and
    the same however the data are batched or sharded): an unbiased estimate of "all"'s pooled
    moments from about as many samples as one read, at about the cost of one read.

    `positions` < 1 reads every tap at about that share of each sample's positions (spatial
    positions, tokens; every round(1/positions)-th, from an offset chosen per sample as "spread"
    does, at least one per sample): the Gram products, which grow with the positions read, cost
    that share (see `check_positions`).

    A second, smaller pass reads the producers' outputs only for spaces that have constant
    (dead) features at their consumers, where the correlation needs a fallback (those spaces'
    `SpaceStats.fallback` is set). `timings`, if given, receives the seconds of each pass:
    "consumer taps" (the first pass: lockstep forwards and moment updates) and "dead units"
    (the second pass; 0.0 when no space needs it).

    Under torch.distributed (see `fxzip.runtime.distributed`) `batches` are this rank's shard: each pass's
    moments are all-reduced over `group` (None: the default group) before they are used, so the
    dead units, the second pass and the result are those of all ranks' batches, on every rank.

    `pairing` (default: the structural one, see `fxzip.graph.pairing`) finds model k's node for each
    tap; taps at nodes that not every model has are left out.
    """
    spaces = list(spaces)
    check_taps(taps)
    pairing = pairing if pairing is not None else pair_graphs(graphs)
    shared = pairing.shared()
    order = {n.name: i for i, n in enumerate(analysis.nodes)}
    device = batches.example_device
    stats = {s: SpaceStats(len(graphs) * analysis.spaces[s].size, device) for s in spaces}
    timings = {} if timings is None else timings
    start = time.perf_counter()
    nodes = {n.name: n for n in analysis.nodes}
    reads = []
    for s in spaces:
        chosen = shared_taps(analysis, s, shared, taps, order)
        found = spread_reads(chosen, stats[s].features, nodes) if taps == "spread" \
            else [Read(t, stats[s].features, 1.0, math.modf(j * _SALT)[0])
                  for j, t in enumerate(chosen)]
        for read in found:
            read.positions = positions
        reads += found
    _run_pass(graphs, reads, batches, progress, "fxzip statistics", precision, pairing)
    all_reduce_moments([stats[s].features for s in spaces], group)
    timings["consumer taps"] = time.perf_counter() - start
    start = time.perf_counter()
    retry = {s: [t for t in producer_taps(analysis, s) if t.node in shared] for s in spaces}
    dead = {s: stats[s].constant_features() for s in retry}
    retry = {s: taps for s, taps in retry.items() if taps and dead[s].size}
    for s in retry:
        stats[s].fallback = Moments(stats[s].features.mean.numel(), device, rows=dead[s])
    if retry:
        _run_pass(graphs, [Read(t, stats[s].fallback) for s, taps in retry.items() for t in taps],
                  batches, progress, "fxzip statistics (dead units)", precision, pairing)
        all_reduce_moments([stats[s].fallback for s in retry], group)
    timings["dead units"] = time.perf_counter() - start
    return stats


def _run_pass(graphs: Sequence[fx.GraphModule], reads: list[Read], batches: Batches,
              progress: bool, desc: str, precision: str = "float32",
              pairing: Pairing | None = None) -> None:
    """Stream all batches through the lockstep graph, folding each read into its moments."""
    by_node: dict[str, list[Read]] = defaultdict(list)
    for read in reads:
        by_node[read.tap.node].append(read)
    observer = Observer(dict(by_node), precision)
    keyed = any(read.rate < 1.0 or read.positions < 1.0 for read in reads)
    module = lockstep_module(graphs, observer, pairing)
    bar = tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False)
    with torch.no_grad():
        for position, x in enumerate(bar):
            batches.check_shape(x, position)
            observer.position = position
            observer.keys = sample_keys(x, SPREAD_SEED) if keyed else None
            try:
                call_model(module, x)
            except NonFiniteError:
                raise
            except Exception as exc:
                raise InputError(f"the models failed on calibration batch {position} ("
                                 f"{describe(x)}): {type(exc).__name__}: {exc}") from exc
