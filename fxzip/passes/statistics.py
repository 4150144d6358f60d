"""Statistics pass: one streaming run of all models over the calibration inputs that accumulates,
per space, the mean and covariance of the concatenated features [f_A; f_B; ...].

Each batch is centred on its own mean in float32 and merged into float64 accumulators (Chan et
al.'s parallel update), which keeps the moments accurate over long streams.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.fx as fx
from tqdm.auto import tqdm

from ..errors import InputError, NonFiniteError
from ..inputs import Batches
from ..tracing import has_inplace
from .analysis import Analysis, Tap


class Moments:
    """Streaming count, mean and centred second moment of feature rows."""

    def __init__(self, dim: int, device: torch.device):
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, rows: torch.Tensor) -> None:
        n = rows.shape[0]
        if n == 0:
            return
        rows = rows.float()
        batch_mean = rows.mean(0)
        centred = rows - batch_mean
        gram = (centred.T @ centred).double()
        batch_mean = batch_mean.double()
        total = self.count + n
        delta = batch_mean - self.mean
        self.m2 += gram + torch.outer(delta, delta) * (self.count * n / total)
        self.mean += delta * (n / total)
        self.count = total

    def correlation(self) -> tuple[np.ndarray, np.ndarray]:
        """Pearson correlation, and the mask of constant features (whose rows are 0 there)."""
        cov = (self.m2 / max(self.count - 1, 1)).cpu().numpy()
        mean = self.mean.cpu().numpy()
        std = np.sqrt(np.clip(np.diag(cov), 0.0, None))
        constant = std <= 1e-6 * np.abs(mean) + 1e-10
        safe = np.where(constant, 1.0, std)
        corr = np.clip(cov / np.outer(safe, safe), -1.0, 1.0)
        corr[constant, :] = 0.0
        corr[:, constant] = 0.0
        return corr, constant


class SpaceStats:
    """Moments of a space at the tensors its consumers read (the paper's features) and, as a
    fallback for features that are constant there (dead units), at its producers' outputs."""

    def __init__(self, dim: int, device: torch.device, with_fallback: bool):
        self.features = Moments(dim, device)
        self.fallback = Moments(dim, device) if with_fallback else None

    def correlation(self) -> np.ndarray:
        corr, constant = self.features.correlation()
        if constant.any() and self.fallback is not None:
            backup, still_constant = self.fallback.correlation()
            corr[constant, :] = backup[constant, :]
            corr[:, constant] = backup[:, constant]
            constant = constant & still_constant
        if constant.any():  # constant everywhere: equal constants are interchangeable
            idx = np.flatnonzero(constant)
            m = self.features.mean.cpu().numpy()[idx]
            scale = np.maximum(np.abs(m[:, None]), np.abs(m[None, :]))
            corr[np.ix_(idx, idx)] = (np.abs(m[:, None] - m[None, :]) <= 1e-5 * scale + 1e-10)
        return corr


def tap_module(gm: fx.GraphModule, taps: Sequence[str]) -> fx.GraphModule:
    """A copy of the model's graph that returns the tap tensors instead of its outputs.

    In graphs with in-place ops each tap is cloned where it is computed, so that a later in-place
    op cannot change what the statistics see.
    """
    graph = fx.Graph()
    clone = has_inplace(gm)
    wanted = set(taps)
    taken: dict[str, fx.Node] = {}
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
        if node.name in wanted:
            taken[node.name] = graph.call_method("clone", (env[node],)) if clone else env[node]
    graph.output(tuple(taken[t] for t in taps))
    return fx.GraphModule(gm, graph, "TapModule")


def tap_rows(tensor: torch.Tensor, tap: Tap) -> torch.Tensor:
    """The (samples × channels) matrix of one tap: positions and expanded copies become samples."""
    x = tensor.movedim(tap.axis, -1)
    x = x[..., tap.offset: tap.offset + tap.size * tap.expand]
    x = x.reshape(*x.shape[:-1], tap.size, tap.expand).movedim(-2, -1)
    return x.reshape(-1, tap.size)


def producer_taps(analysis: Analysis, space: int) -> list[Tap]:
    """Taps at the outputs of a space's producers (each producer opens exactly that space)."""
    s = analysis.spaces[space]
    taps = [Tap(p, analysis.infos[p].axis, 0, s.size, 1) for p in s.producers]
    return [] if taps == s.taps else taps


def collect(graphs: Sequence[fx.GraphModule], analysis: Analysis, spaces: Iterable[int],
            batches: Batches, *, progress: bool = True) -> dict[int, SpaceStats]:
    """Statistics of every requested space over all batches, for all models at once."""
    spaces = list(spaces)
    fallback = {s: producer_taps(analysis, s) for s in spaces}
    order = [n.name for n in analysis.nodes]
    tap_names = sorted({t.node for s in spaces for t in analysis.spaces[s].taps + fallback[s]},
                       key=order.index)
    slot = {name: i for i, name in enumerate(tap_names)}
    modules = [tap_module(gm, tap_names) for gm in graphs]
    device = batches.example.device
    stats = {s: SpaceStats(len(graphs) * analysis.spaces[s].size, device, bool(fallback[s]))
             for s in spaces}
    bar = tqdm(batches, desc="fxzip statistics", unit="batch", disable=not progress, leave=False)
    with torch.no_grad():
        for position, x in enumerate(bar):
            batches.check_shape(x, position)
            outputs = [_run(module, x, k) for k, module in enumerate(modules)]
            for s in spaces:
                targets = [(analysis.spaces[s].taps, stats[s].features),
                           (fallback[s], stats[s].fallback)]
                for taps, moments in targets:
                    for tap in taps:
                        moments.update(_rows(outputs, slot[tap.node], tap, position))
    return stats


def _rows(outputs: list[tuple], slot: int, tap: Tap, position: int) -> torch.Tensor:
    """[f_A, f_B, ...] of one tap, checked to be finite."""
    rows = [tap_rows(out[slot], tap) for out in outputs]
    for k, r in enumerate(rows):
        if not torch.isfinite(r).all():
            raise NonFiniteError(
                f"model {k} produced NaN/Inf activations at node '{tap.node}' on calibration "
                f"batch {position}; check the model's weights and the input scaling")
    return torch.cat(rows, dim=1)


def _run(module: fx.GraphModule, x: torch.Tensor, k: int) -> tuple:
    try:
        return module(x)
    except Exception as exc:
        raise InputError(f"model {k} failed on a calibration batch of shape {tuple(x.shape)}: "
                         f"{type(exc).__name__}: {exc}") from exc
