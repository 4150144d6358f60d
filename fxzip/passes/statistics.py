"""Statistics pass: one streaming run of all models over the calibration inputs that accumulates,
per space, the mean and covariance of the concatenated features [f_A; f_B; ...].

The models run in lockstep inside ONE graph (`LockstepModule`): after the copies of a tapped node
an observer reads every model's tensor at once and folds it into the moments, so no tensor is kept
or cloned beyond its last use and a later in-place op cannot change what was observed. Each batch
is centred on its own mean in float32 and merged into float64 accumulators (Chan et al.'s parallel
update), which keeps the moments accurate over long streams.
"""
from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from tqdm.auto import tqdm

from ..errors import InputError, NonFiniteError
from ..inputs import Batches
from .analysis import Analysis, Tap


class _NonFiniteRows(Exception):
    """Internal: a batch's rows hold NaN/Inf (the caller says which model and node)."""


class Moments:
    """Streaming count, mean and centred second moments of features, each batch given as every
    model's (channels × samples) matrix.

    With `rows` (indices into the features) only those rows of the second-moment matrix are kept,
    plus every feature's variance: what a correlation needs for a few features only.
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
        means = [_finite_mean(c.mean(1), c) for c in columns]
        self.update_centred([c - m[:, None] for c, m in zip(columns, means)], means)

    def update_centred(self, centred: Sequence[torch.Tensor], means: Sequence[torch.Tensor]) -> None:
        """Fold in one batch given centred on its own means (float32), with those means."""
        n = centred[0].shape[1]
        if n == 0:
            return
        if self.rows is None:
            self._add_gram(centred)
        else:
            joint = torch.cat(centred)
            self.m2 += (joint[self.rows] @ joint.T).double()
            self.sq += joint.square().sum(1, dtype=torch.float64)
        total = self.count + n
        delta = torch.cat(means).double() - self.mean
        weight = self.count * n / total
        if self.rows is None:
            self.m2.addr_(delta, delta, alpha=weight)
        else:
            self.m2.addr_(delta[self.rows], delta, alpha=weight)
            self.sq.addcmul_(delta, delta, value=weight)
        self.mean.add_(delta, alpha=n / total)
        self.count = total

    def _add_gram(self, centred: Sequence[torch.Tensor]) -> None:
        """m2 += [c_0; c_1; ...] @ [c_0; c_1; ...].T, block by block: only the blocks on or above
        the diagonal are multiplied (in float32), the rest are their transposes; for two models
        this saves a quarter of the work."""
        bounds = np.cumsum([0] + [c.shape[0] for c in centred]).tolist()
        for i, ci in enumerate(centred):
            rows = slice(bounds[i], bounds[i + 1])
            for j in range(i, len(centred)):
                cols = slice(bounds[j], bounds[j + 1])
                block = (ci @ centred[j].T).double()
                self.m2[rows, cols] += block
                if j != i:
                    self.m2[cols, rows] += block.T

    def correlation(self) -> tuple[np.ndarray, np.ndarray]:
        """Pearson correlation (the kept rows of it), and the mask of constant features (whose
        correlations are set to 0)."""
        scale = 1.0 / max(self.count - 1, 1)
        cov = (self.m2 * scale).cpu().numpy()
        if self.rows is None:
            variance = np.diag(cov)
            rows = np.arange(cov.shape[0])
        else:
            variance = (self.sq * scale).cpu().numpy()
            rows = self.rows.cpu().numpy()
        mean = self.mean.cpu().numpy()
        std = np.sqrt(np.clip(variance, 0.0, None))
        constant = std <= 1e-6 * np.abs(mean) + 1e-10
        safe = np.where(constant, 1.0, std)
        corr = np.clip(cov / np.outer(safe[rows], safe), -1.0, 1.0)
        corr[constant[rows], :] = 0.0
        corr[:, constant] = 0.0
        return corr, constant


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
        return np.flatnonzero(self.features.correlation()[1])

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


def tap_columns(tensor: torch.Tensor, tap: Tap) -> tuple[torch.Tensor, torch.Tensor]:
    """One tap as a (channels × samples) float32 matrix centred on its batch mean, and that mean:
    positions and expanded copies become samples. Centring writes the channel-first copy in one
    pass."""
    x = tensor.movedim(tap.axis, 0)[tap.offset: tap.offset + tap.size * tap.expand]
    rest = tuple(range(1, x.dim()))
    mean = x.float().mean(rest) if rest else x.float()
    mean = _finite_mean(mean.reshape(tap.size, tap.expand).mean(1), x.float())
    centred = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    torch.sub(x, mean.repeat_interleave(tap.expand).view(-1, *([1] * len(rest))), out=centred)
    return centred.view(tap.size, -1), mean


class Observer(nn.Module):
    """Called in the lockstep graph with every model's tensor at one tapped node: folds the
    concatenated features [f_A, f_B, ...] of each of the node's taps into its moments."""

    def __init__(self, taps: dict[str, list[tuple[Tap, Moments]]]):
        super().__init__()
        self.taps = taps
        self.position = 0

    def forward(self, name: str, *tensors: torch.Tensor) -> None:
        for tap, moments in self.taps[name]:
            try:
                centred, means = zip(*(tap_columns(t, tap) for t in tensors))
                moments.update_centred(centred, means)
            except _NonFiniteRows:
                k = next(k for k, t in enumerate(tensors) if not torch.isfinite(t).all())
                raise NonFiniteError(
                    f"model {k} produced NaN/Inf activations at node '{name}' on calibration "
                    f"batch {self.position}; check the model's weights and the input scaling"
                ) from None


def lockstep_module(graphs: Sequence[fx.GraphModule], observer: Observer) -> fx.GraphModule:
    """One graph that runs all (isomorphic) models node by node on the same input and calls the
    observer right after each tapped node; it returns nothing.

    Model k's submodules and attributes live under `m{k}.`; FX frees every tensor after its last
    use, so only the tensors of the node being computed are alive beside the models' state.
    """
    root = nn.Module()
    for k, gm in enumerate(graphs):
        root.add_module(f"m{k}", gm)
    root.add_module("observer", observer)
    graph = fx.Graph()
    placeholders = [n for n in graphs[0].graph.nodes if n.op == "placeholder"]
    inputs = {n.name: graph.placeholder(n.name, default_value=n.args[0] if n.args
                                        else inspect.Signature.empty) for n in placeholders}
    envs: list[dict[fx.Node, fx.Node]] = [{} for _ in graphs]
    node_lists = [list(gm.graph.nodes) for gm in graphs]
    for column in zip(*node_lists):
        if column[0].op == "output":
            break
        for k, node in enumerate(column):
            env = envs[k]
            if node.op == "placeholder":
                env[node] = inputs[node.name]
                continue
            copy = graph.node_copy(node, lambda n: env[n])
            if node.op in ("call_module", "get_attr"):
                copy.target = f"m{k}.{node.target}"
            env[node] = copy
        name = column[0].name
        if name in observer.taps:
            graph.call_module("observer", (name, *(envs[k][n] for k, n in enumerate(column))))
    graph.output(None)
    return fx.GraphModule(root, graph, "LockstepStatistics")


def producer_taps(analysis: Analysis, space: int) -> list[Tap]:
    """Taps at the outputs of a space's producers (each producer opens exactly that space)."""
    s = analysis.spaces[space]
    taps = [Tap(p, analysis.infos[p].axis, 0, s.size, 1) for p in s.producers]
    return [] if taps == s.taps else taps


def collect(graphs: Sequence[fx.GraphModule], analysis: Analysis, spaces: Iterable[int],
            batches: Batches, *, progress: bool = True) -> dict[int, SpaceStats]:
    """Statistics of every requested space over all batches, for all models at once.

    A second, smaller pass reads the producers' outputs only for spaces that have constant
    (dead) features at their consumers, where the correlation needs a fallback.
    """
    spaces = list(spaces)
    device = batches.example.device
    stats = {s: SpaceStats(len(graphs) * analysis.spaces[s].size, device) for s in spaces}
    _run_pass(graphs, {s: (analysis.spaces[s].taps, stats[s].features) for s in spaces},
              batches, progress, "fxzip statistics")
    retry = {s: producer_taps(analysis, s) for s in spaces}
    dead = {s: stats[s].constant_features() for s in retry}
    retry = {s: taps for s, taps in retry.items() if taps and dead[s].size}
    for s in retry:
        stats[s].fallback = Moments(stats[s].features.mean.numel(), device, rows=dead[s])
    if retry:
        _run_pass(graphs, {s: (taps, stats[s].fallback) for s, taps in retry.items()},
                  batches, progress, "fxzip statistics (dead units)")
    return stats


def _run_pass(graphs: Sequence[fx.GraphModule], targets: dict[int, tuple[list[Tap], Moments]],
              batches: Batches, progress: bool, desc: str) -> None:
    """Stream all batches through the lockstep graph, folding each target's taps into its moments."""
    by_node: dict[str, list[tuple[Tap, Moments]]] = defaultdict(list)
    for taps, moments in targets.values():
        for tap in taps:
            by_node[tap.node].append((tap, moments))
    observer = Observer(dict(by_node))
    module = lockstep_module(graphs, observer)
    bar = tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False)
    with torch.no_grad():
        for position, x in enumerate(bar):
            batches.check_shape(x, position)
            observer.position = position
            try:
                module(x)
            except NonFiniteError:
                raise
            except Exception as exc:
                raise InputError(f"the models failed on calibration batch {position} of shape "
                                 f"{tuple(x.shape)}: {type(exc).__name__}: {exc}") from exc
