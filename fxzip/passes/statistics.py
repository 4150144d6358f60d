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

from ..distributed import all_reduce_moments
from ..errors import InputError, NonFiniteError
from ..inputs import Batches, call_model, describe
from ..pairing import Pairing, pair_graphs
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
    """

    def __init__(self, dim: int, device: torch.device, rows: Sequence[int] | None = None):
        self.count = 0
        self.rows = None if rows is None else torch.as_tensor(rows, dtype=torch.long, device=device)
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        height = dim if rows is None else len(rows)
        self.m2 = torch.zeros(height, dim, dtype=torch.float64, device=device)
        self.sq = None if rows is None else torch.zeros(dim, dtype=torch.float64, device=device)

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
            add_upper_gram(self.m2, joint)
        else:
            self.m2 += (joint[self.rows] @ joint.T).double()
            self.sq += joint.square().sum(1, dtype=torch.float64)
        total = self.count + n
        delta = means.double() - self.mean
        weight = self.count * n / total
        if self.rows is None:
            self.m2.addr_(delta, delta, alpha=weight)
        else:
            self.m2.addr_(delta[self.rows], delta, alpha=weight)
            self.sq.addcmul_(delta, delta, value=weight)
        self.mean.add_(delta, alpha=n / total)
        self.count = total

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
        correlations are set to 0). Computed in place in torch (float64)."""
        if self.rows is None:
            cov = torch.triu(self.m2)
            cov += cov.T.clone()  # mirror the upper triangle; the diagonal is now doubled
            cov.diagonal().mul_(0.5)
            rows = torch.arange(cov.shape[0], device=cov.device)
        else:
            cov = self.m2.clone()
            rows = self.rows
        constant = self.constant()
        mask = torch.as_tensor(constant, device=cov.device)
        # 1/sqrt of the sums of squares; 0 for constant features (the sums are > 0 otherwise)
        inv = torch.where(mask, 0.0, self._sums_of_squares().clamp_min(1e-300).rsqrt())
        cov *= inv[rows][:, None]
        cov *= inv[None, :]
        cov.clamp_(-1.0, 1.0)
        return cov.cpu().numpy(), constant


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


def tap_view(tensor: torch.Tensor, tap: Tap) -> torch.Tensor:
    """A tap's channels moved to the front (a view): positions and expanded copies are samples."""
    return tensor.movedim(tap.axis, 0)[tap.offset: tap.offset + tap.size * tap.expand]


def centre_into(x: torch.Tensor, tap: Tap, out: torch.Tensor) -> torch.Tensor:
    """Write a tap's view `x` (from `tap_view`) into `out` (size × samples, float32), centred on
    its batch mean, in one pass; return that mean. Raises _NonFiniteRows on NaN/Inf."""
    rest = tuple(range(1, x.dim()))
    mean = x.float().mean(rest) if rest else x.float()
    mean = _finite_mean(mean.reshape(tap.size, tap.expand).mean(1), x.float())
    torch.sub(x, mean.repeat_interleave(tap.expand).view(-1, *([1] * len(rest))),
              out=out.view(x.shape))
    return mean


class Observer(nn.Module):
    """Called in the lockstep graph with every model's tensor at one tapped node: folds the
    concatenated features [f_A, f_B, ...] of each of the node's taps into its moments."""

    def __init__(self, taps: dict[str, list[tuple[Tap, Moments]]], precision: str = "float32"):
        super().__init__()
        self.taps = taps
        self.precision = precision
        self.position = 0

    def forward(self, name: str, *tensors: torch.Tensor) -> None:
        with product_precision(self.precision):
            self._observe(name, tensors)

    def _observe(self, name: str, tensors: Sequence[torch.Tensor]) -> None:
        for tap, moments in self.taps[name]:
            try:
                views = [tap_view(t, tap) for t in tensors]
                joint = torch.empty(len(views) * tap.size, views[0].numel() // tap.size,
                                    dtype=torch.float32, device=views[0].device)
                blocks = joint.split(tap.size)
                means = torch.cat([centre_into(x, tap, out) for x, out in zip(views, blocks)])
                moments.update_centred(joint, means)
            except _NonFiniteRows:
                k = next(k for k, t in enumerate(tensors) if not torch.isfinite(t).all())
                raise NonFiniteError(
                    f"model {k} produced NaN/Inf activations at node '{name}' on calibration "
                    f"batch {self.position}; check the model's weights and the input scaling"
                ) from None


def lockstep_module(graphs: Sequence[fx.GraphModule], observer: Observer,
                    pairing: Pairing | None = None) -> fx.GraphModule:
    """One graph that runs all models node by node on the same input and calls the observer
    right after each tapped node (a name of graph 0) with every model's tensor there (graph k's
    node paired with it, see `fxzip.pairing`); it returns nothing.

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


TAPS = ("all", "last")


def check_taps(taps: str) -> str:
    """`taps` if it names a choice of taps (see `collect`), else an InputError."""
    if taps not in TAPS:
        raise InputError(f"taps must be one of {TAPS}, got {taps!r}")
    return taps


def shared_taps(analysis: Analysis, space: int, shared: set[str], which: str = "all",
                order: dict[str, int] | None = None) -> list[Tap]:
    """A space's taps at nodes every model has (its consumers past the point where the models
    part are left out); its producers' outputs where no tap is left. `which="last"` keeps only
    the tap latest in graph order (`order`: node name -> position)."""
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


def collect(graphs: Sequence[fx.GraphModule], analysis: Analysis, spaces: Iterable[int],
            batches: Batches, *, progress: bool = True, precision: str = "float32",
            timings: dict[str, float] | None = None, group: Any = None,
            pairing: Pairing | None = None, taps: str = "all") -> dict[int, SpaceStats]:
    """Statistics of every requested space over all batches, for all models at once; `precision`
    is that of the Gram products ("float32" or "bfloat16", see `resolve_precision`).

    `taps` says where a space is read: "all" at every tensor its consumers read (a residual
    stream at every block's input: the samples of all those reads are pooled), "last" only at
    the read latest in the graph (a residual stream at the end of its segment, where the ZipIt!
    paper's code reads it), which is cheaper where spaces are read many times.

    A second, smaller pass reads the producers' outputs only for spaces that have constant
    (dead) features at their consumers, where the correlation needs a fallback (those spaces'
    `SpaceStats.fallback` is set). `timings`, if given, receives the seconds of each pass:
    "consumer taps" (the first pass: lockstep forwards and moment updates) and "dead units"
    (the second pass; 0.0 when no space needs it).

    Under torch.distributed (see `fxzip.distributed`) `batches` are this rank's shard: each pass's
    moments are all-reduced over `group` (None: the default group) before they are used, so the
    dead units, the second pass and the result are those of all ranks' batches, on every rank.

    `pairing` (default: the structural one, see `fxzip.pairing`) finds model k's node for each
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
    _run_pass(graphs, {s: (shared_taps(analysis, s, shared, taps, order), stats[s].features)
                       for s in spaces},
              batches, progress, "fxzip statistics", precision, pairing)
    all_reduce_moments([stats[s].features for s in spaces], group)
    timings["consumer taps"] = time.perf_counter() - start
    start = time.perf_counter()
    retry = {s: [t for t in producer_taps(analysis, s) if t.node in shared] for s in spaces}
    dead = {s: stats[s].constant_features() for s in retry}
    retry = {s: taps for s, taps in retry.items() if taps and dead[s].size}
    for s in retry:
        stats[s].fallback = Moments(stats[s].features.mean.numel(), device, rows=dead[s])
    if retry:
        _run_pass(graphs, {s: (taps, stats[s].fallback) for s, taps in retry.items()},
                  batches, progress, "fxzip statistics (dead units)", precision, pairing)
        all_reduce_moments([stats[s].fallback for s in retry], group)
    timings["dead units"] = time.perf_counter() - start
    return stats


def _run_pass(graphs: Sequence[fx.GraphModule], targets: dict[int, tuple[list[Tap], Moments]],
              batches: Batches, progress: bool, desc: str, precision: str = "float32",
              pairing: Pairing | None = None) -> None:
    """Stream all batches through the lockstep graph, folding each target's taps into its moments."""
    by_node: dict[str, list[tuple[Tap, Moments]]] = defaultdict(list)
    for taps, moments in targets.values():
        for tap in taps:
            by_node[tap.node].append((tap, moments))
    observer = Observer(dict(by_node), precision)
    module = lockstep_module(graphs, observer, pairing)
    bar = tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False)
    with torch.no_grad():
        for position, x in enumerate(bar):
            batches.check_shape(x, position)
            observer.position = position
            try:
                call_model(module, x)
            except NonFiniteError:
                raise
            except Exception as exc:
                raise InputError(f"the models failed on calibration batch {position} ("
                                 f"{describe(x)}): {type(exc).__name__}: {exc}") from exc
