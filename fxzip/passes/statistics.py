"""Statistics pass: one streaming run of all models over the calibration inputs that accumulates,
per space, the mean and covariance of the concatenated features [f_A; f_B; ...].

The models run in lockstep inside ONE graph (`fxzip.passes.lockstep`): after the copies of a
tapped node an observer reads every model's tensor at once and folds it into the moments, so no
tensor is kept or cloned beyond its last use and a later in-place op cannot change what was
observed (only the values a pass saves for the next, under a memory budget, are copies). Each batch
is centred on its own mean in float32 and merged into float64 accumulators (Chan et al.'s parallel
update), which keeps the moments accurate over long streams. The centred features of all models
are written straight into one stacked matrix, whose Gram product is computed on and above the
diagonal only. The accumulators and the products are in `fxzip.runtime.moments`.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from tqdm.auto import tqdm

from ..runtime.distributed import (all_gather_objects, all_reduce_moments, any_rank, rank,
                                   receive_columns, send_columns, world_size)
from ..errors import InputError, NonFiniteError
from ..runtime.inputs import Batches, call_model, describe
from ..runtime.moments import (Moments, NonFiniteRows, SpaceStats, finite_mean,
                               product_precision)
from ..graph.pairing import Pairing
from ..runtime.sampling import sample_keys, unit_keys
from .analysis import Analysis, Tap
from .lockstep import Checkpoints, lockstep_module, node_positions


def tap_view(tensor: torch.Tensor, tap: Tap) -> torch.Tensor:
    """A tap's channels moved to the front (a view): positions and expanded copies are samples."""
    return tensor.movedim(tap.axis, 0)[tap.offset: tap.offset + tap.size * tap.expand]


def centre_into(x: torch.Tensor, tap: Tap, out: torch.Tensor) -> torch.Tensor:
    """Write a tap's view `x` (from `tap_view`) into `out` (size × samples, float32), centred on
    its batch mean, in one pass; return that mean. Raises NonFiniteRows on NaN/Inf."""
    flat = channels_innermost(x)
    if flat is not None:  # one 2-D transposing copy, then centred in place
        rows = out.view(flat.shape)  # (size·expand, samples): expanded copies are samples too
        rows.copy_(flat)
        mean = finite_mean(rows.mean(1).reshape(tap.size, tap.expand).mean(1), rows)
        rows.sub_(mean.repeat_interleave(tap.expand)[:, None])
        return mean
    rest = tuple(range(1, x.dim()))
    mean = x.float().mean(rest) if rest else x.float()
    mean = finite_mean(mean.reshape(tap.size, tap.expand).mean(1), x.float())
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

    __slots__ = ("tap", "moments", "rate", "salt", "positions", "owner")

    def __init__(self, tap: Tap, moments: Moments | None, rate: float = 1.0, salt: float = 0.0,
                 positions: float = 1.0, owner: int | None = None):
        self.tap, self.moments, self.rate, self.salt = tap, moments, rate, salt
        self.positions = positions
        self.owner = owner  # the rank that holds the moments (None: this one, not sharded)

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
    centred in place on their mean; return that mean. Raises NonFiniteRows on NaN/Inf."""
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    cols = out.view(x.shape[0], -1)
    start = 0
    for i, (offset, count) in enumerate(zip(offsets, counts)):
        if count:
            cols[:, start:start + count].copy_(flat[:, i, offset::stride])
            start += count
    mean = finite_mean(cols.mean(1).reshape(tap.size, tap.expand).mean(1), cols)
    cols.sub_(mean.repeat_interleave(tap.expand)[:, None])
    return mean


class Observer(nn.Module):
    """Called in the lockstep graph with every model's tensor at one tapped node: folds the
    concatenated features [f_A, f_B, ...] of each of the node's taps into its moments.

    `taps` maps a node to its reads: `Read`s, or (Tap, Moments) pairs (read in full). A read at a
    rate < 1 takes a subset of positions chosen from `keys` (one per sample of the current batch,
    set by the caller before each batch), the same subset for every model.

    Sharded over ranks (`group`), a read whose `owner` is another rank sends its columns there
    (`send_columns`), and the owner folds every rank's columns into its moments; an `active`
    False rank (out of data, running a batch only to keep step) sends none."""

    def __init__(self, taps: dict[str, list], precision: str = "float32", group: Any = None):
        super().__init__()
        self.taps = {name: [r if isinstance(r, Read) else Read(*r) for r in reads]
                     for name, reads in taps.items()}
        self.precision = precision
        self.position = 0
        self.keys: torch.Tensor | None = None
        self.group, self.rank, self.ranks = group, rank(group), world_size(group)
        self.active = True

    def forward(self, name: str, *tensors: torch.Tensor) -> None:
        with product_precision(self.precision):
            self._observe(name, tensors)

    def _observe(self, name: str, tensors: Sequence[torch.Tensor]) -> None:
        for read in self.taps[name]:
            try:
                found = self._columns(read, tensors) if self.active else None
                if read.owner is None or read.owner == self.rank:
                    if found is not None:
                        read.moments.update_centred(*found)
                    if read.owner is not None:
                        self._receive(read, len(tensors) * read.tap.size, tensors[0].device)
                else:
                    empty = torch.empty(0, 0, device=tensors[0].device)
                    send_columns(*(found or (empty, empty)), read.owner, self.group)
            except NonFiniteRows:
                k = next(k for k, t in enumerate(tensors) if not torch.isfinite(t).all())
                raise NonFiniteError(
                    f"model {k} produced NaN/Inf activations at node '{name}' on calibration "
                    f"batch {self.position}; check the model's weights and the input scaling"
                ) from None

    def _columns(self, read: Read, tensors: Sequence[torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The read's (features × samples) float32 columns of every model stacked, centred on
        their means, and those means; None where the batch gives it no sample."""
        tap = read.tap
        views = [tap_view(t, tap) for t in tensors]
        spread = self._spread(views[0], read)
        if spread is not None:  # a share of the positions
            offsets, counts, stride = spread
            kept = sum(counts)
            if kept == 0:
                return None
            joint = torch.empty(len(views) * tap.size, kept * tap.expand,
                                dtype=torch.float32, device=views[0].device)
            means = torch.cat([centre_kept_into(x, tap, offsets, counts, stride, out)
                               for x, out in zip(views, joint.split(tap.size))])
            return joint, means
        if views[0].numel() == 0:
            return None
        joint = torch.empty(len(views) * tap.size, views[0].numel() // tap.size,
                            dtype=torch.float32, device=views[0].device)
        means = torch.cat([centre_into(x, tap, out)
                           for x, out in zip(views, joint.split(tap.size))])
        return joint, means

    def _receive(self, read: Read, features: int, device: torch.device) -> None:
        """Fold every other rank's columns of an owned read into its moments, in rank order."""
        for source in range(self.ranks):
            if source != self.rank:
                found = receive_columns(features, source, device, self.group)
                if found is not None:
                    read.moments.update_centred(*found)

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


def first_tap(graphs: Sequence[fx.GraphModule], analysis: Analysis, spaces: Iterable[int],
              pairing: Pairing, taps: str = "all") -> int:
    """Where `collect`'s pass over these spaces first reads the models: the index
    (`node_positions` of graph 0) of its earliest tap, the start a `Checkpoints` plan needs."""
    shared = pairing.shared()
    order = {n.name: i for i, n in enumerate(analysis.nodes)}
    at = node_positions(graphs[0])
    return min(at[t.node] for s in spaces for t in shared_taps(analysis, s, shared, taps, order))


def collect(graphs: Sequence[fx.GraphModule], analysis: Analysis, spaces: Iterable[int],
            batches: Batches, *, progress: bool = True, precision: str = "float32",
            pairing: Pairing, timings: dict[str, float] | None = None, group: Any = None,
            taps: str = "all", positions: float = 1.0,
            owners: Mapping[int, int] | None = None,
            checkpoints: Checkpoints | None = None,
            description: str = "fxzip statistics") -> dict[int, SpaceStats]:
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

    `pairing` (`fxzip.graph.pairing.pair_graphs(graphs)`) finds model k's node for each tap; taps
    at nodes that not every model has are left out.

    `owners` (space -> rank of `group`) shards the spaces over the ranks instead: each rank's
    batches are still its shard, but a space's columns go to its owner, which alone holds its
    moments (nothing is all-reduced); the result is this rank's spaces only, each with the
    statistics of all ranks' batches.

    `checkpoints`: this is one of several planned passes (`first_tap` gave its start); it
    resumes the models where an earlier pass saved them and saves them for later passes
    (`fxzip.passes.lockstep`). `description` labels the progress bars (which pass this is).
    """
    spaces = list(spaces)
    check_taps(taps)
    shared = pairing.shared()
    order = {n.name: i for i, n in enumerate(analysis.nodes)}
    device = batches.example_device
    me = rank(group)
    mine = [s for s in spaces if owners is None or owners[s] == me]
    stats = {s: SpaceStats(len(graphs) * analysis.spaces[s].size, device) for s in mine}
    timings = {} if timings is None else timings
    start = time.perf_counter()
    nodes = {n.name: n for n in analysis.nodes}
    reads = []
    for s in spaces:
        chosen = shared_taps(analysis, s, shared, taps, order)
        held = stats[s].features if s in stats else None
        found = spread_reads(chosen, held, nodes) if taps == "spread" \
            else [Read(t, held, 1.0, math.modf(j * _SALT)[0]) for j, t in enumerate(chosen)]
        for read in found:
            read.positions = positions
            read.owner = None if owners is None else owners[s]
        reads += found
    _run_pass(graphs, reads, batches, progress, description, precision, pairing, group,
              checkpoints)
    if owners is None:
        all_reduce_moments([stats[s].features for s in spaces], group)
    timings["consumer taps"] = time.perf_counter() - start
    start = time.perf_counter()
    retry = {s: [t for t in producer_taps(analysis, s) if t.node in shared] for s in mine}
    dead = {s: stats[s].constant_features() for s in retry}
    retry = {s: taps for s, taps in retry.items() if taps and dead[s].size}
    for s in retry:
        stats[s].fallback = Moments(stats[s].features.mean.numel(), device, rows=dead[s])
    if owners is not None:  # every rank reads the taps of every owner's dead units
        retry = {s: [t for t in producer_taps(analysis, s) if t.node in shared]
                 for found in all_gather_objects(sorted(retry), group) for s in found}
    if retry:
        _run_pass(graphs, [Read(t, stats[s].fallback if s in stats else None,
                                owner=None if owners is None else owners[s])
                           for s, taps in retry.items() for t in taps],
                  batches, progress, f"{description} (dead units)", precision, pairing, group)
        if owners is None:
            all_reduce_moments([stats[s].fallback for s in retry], group)
    timings["dead units"] = time.perf_counter() - start
    return stats


def _in_step(batches: Batches, sharded: bool, group: Any) -> Iterator[tuple[Any, bool]]:
    """(batch, active) pairs: the batches; sharded, as many steps as the rank with the most
    batches has, a rank out of data repeating its example inactive (it only keeps step)."""
    source = iter(batches)
    while True:
        x = next(source, None)
        if sharded and not any_rank(x is not None, group, batches.example_device):
            return
        if x is None and not sharded:
            return
        yield (x, True) if x is not None else (batches.example, False)


def _run_pass(graphs: Sequence[fx.GraphModule], reads: list[Read], batches: Batches,
              progress: bool, desc: str, precision: str = "float32",
              pairing: Pairing | None = None, group: Any = None,
              checkpoints: Checkpoints | None = None) -> None:
    """Stream all batches through the lockstep graph, folding each read into its moments (its
    owner's, where the reads are sharded over ranks); with `checkpoints`, a batch whose frontier
    an earlier pass saved is resumed from there."""
    by_node: dict[str, list[Read]] = defaultdict(list)
    for read in reads:
        by_node[read.tap.node].append(read)
    observer = Observer(dict(by_node), precision, group)
    keyed = any(read.rate < 1.0 or read.positions < 1.0 for read in reads)
    sharded = any(read.owner is not None for read in reads) and observer.ranks > 1
    resume_cut, saves = checkpoints.plan() if checkpoints is not None else (None, [])
    resumed = None if resume_cut is None else \
        lockstep_module(graphs, observer, pairing, checkpoints, resume_cut, saves)
    module = None  # from the inputs: built for the first batch not resumed
    bar = tqdm(_in_step(batches, sharded, group), desc=desc, unit="batch",
               disable=not progress, leave=False)
    with torch.no_grad():
        for position, (x, active) in enumerate(bar):
            batches.check_shape(x, position)
            observer.position, observer.active = position, active
            observer.keys = sample_keys(x, SPREAD_SEED) if keyed else None
            if checkpoints is not None:
                checkpoints.position = position
            frontier = None if resumed is None else checkpoints.take(resume_cut, position)
            if frontier is None and module is None:
                module = lockstep_module(graphs, observer, pairing, checkpoints, saves=saves)
            try:
                if frontier is not None:
                    resumed(*frontier)
                else:
                    call_model(module, x)
            except NonFiniteError:
                raise
            except Exception as exc:
                raise InputError(f"the models failed on calibration batch {position} ("
                                 f"{describe(x)}): {type(exc).__name__}: {exc}") from exc
    if checkpoints is not None:
        checkpoints.finish_pass()
