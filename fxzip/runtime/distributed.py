"""Statistics over `torch.distributed`: each rank streams its own shard of the calibration data and
the sums are all-reduced, so every rank ends with the statistics of the union of the shards.

Nothing here does anything unless the caller initialised torch.distributed (`init_process_group`,
e.g. under torchrun): then `fxzip.merge`, `merge_all` and `Zipper` treat their `inputs` as this
rank's shard. Every statistic fxzip keeps is a sum over samples or batches, so it combines exactly:

* moments (count, mean, centred co-moments; `all_reduce_moments`): the counts and count·mean are
  summed to the global count and mean, then each rank's centred moments are shifted to the global
  mean (``m2_r + n_r (mean_r - mean)(mean_r - mean)ᵀ``) and summed: the parallel form of Chan's
  update, exact up to float64 rounding (each rank's own co-moments carry the float32 rounding of
  its Gram products, summed in other groups than one process would: the merged statistics equal
  the one-process statistics to float32 rounding);
* BatchNorm running statistics (`fxzip.corrections.batch_norm.all_reduce_statistics`): each is
  the average over batches of the batch means and unbiased batch variances, so each rank's sums
  over its batches and its batch count are summed with `all_reduce_sum`.

Other code that streams its own statistics (e.g. `fxzip.corrections.refit`) reduces them with the same
hooks: `all_reduce_sum` for plain sums (counts, sums, sums of squares, Gram matrices), and
`all_reduce_moments` for any object with `count`, `mean` and `m2` (optionally `rows`, `sq`) as
`fxzip.runtime.moments.Moments` holds them.

Collectives run on the tensors' own device: gloo for CPU tensors, nccl for CUDA tensors (the group
must have the matching backend). Every rank must call the same functions in the same order; all
of fxzip's calls are made on every rank unconditionally.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "rank", "world_size", "all_reduce_sum", "all_reduce_moments",
           "all_gather_objects", "barrier", "traffic", "any_rank", "send_columns",
           "receive_columns"]

# tensors up to this many elements are concatenated into one buffer per dtype and device (one
# collective for many small tensors); larger ones are reduced on their own, without a copy
_COALESCE_ELEMENTS = 1 << 22

# bytes this process has handed to all-reduces so far (each rank sends about this much); read it
# before and after a call to see what the call moved (`python -m benchmarks.scale` does)
traffic = {"bytes": 0, "calls": 0}


def is_distributed() -> bool:
    """Whether torch.distributed is available and initialised (its default group exists)."""
    return dist.is_available() and dist.is_initialized()


def rank(group: Any = None) -> int:
    """This process's rank in `group` (0 when not distributed)."""
    if not is_distributed():
        return 0
    return dist.get_rank(group)


def world_size(group: Any = None) -> int:
    """The number of ranks in `group` (1 when not distributed)."""
    if not is_distributed():
        return 1
    return dist.get_world_size(group)


def all_reduce_sum(tensors: Sequence[torch.Tensor], group: Any = None) -> None:
    """Sum each tensor over the ranks of `group`, in place (nothing when not distributed). Small
    tensors of one dtype and device travel together in buffers of up to 4M elements."""
    if not is_distributed() or world_size(group) == 1:
        return
    buckets: dict[tuple, list[list[torch.Tensor]]] = defaultdict(lambda: [[]])
    for t in tensors:
        traffic["bytes"] += t.numel() * t.element_size()
        if t.numel() > _COALESCE_ELEMENTS and t.is_contiguous():
            traffic["calls"] += 1
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        elif t.numel():
            bucket = buckets[(t.dtype, t.device)]
            if sum(b.numel() for b in bucket[-1]) + t.numel() > _COALESCE_ELEMENTS:
                bucket.append([])
            bucket[-1].append(t)
    for ts in (ts for bucket in buckets.values() for ts in bucket if ts):  # the same order on every rank
        flat = torch.cat([t.reshape(-1) for t in ts])
        traffic["calls"] += 1
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        for t, part in zip(ts, flat.split([t.numel() for t in ts])):
            t.copy_(part.view_as(t))


def all_reduce_moments(moments: Sequence[Any], group: Any = None) -> None:
    """Combine each rank's moments into those of all ranks' samples, in place, on every rank.

    Each item has `count` (int), `mean` (float64 vector), `m2` (float64 centred co-moments, rows ×
    features), and optionally `rows` (the features `m2`'s rows belong to, None for all) with `sq`
    (every feature's centred sum of squares). A square `m2` without `rows` is symmetric and only
    its upper triangle (diagonal included) is combined and sent, about half the bytes; its lower
    triangle is left as this rank's (`Moments` accumulates and reads only the upper one). A rank
    with no samples contributes nothing.
    """
    moments = list(moments)
    if not moments or not is_distributed() or world_size(group) == 1:
        return
    device = moments[0].mean.device
    counts = torch.tensor([m.count for m in moments], dtype=torch.int64, device=device)
    sums = [m.mean * m.count for m in moments]
    all_reduce_sum([counts, *sums], group)
    for m, total, s in zip(moments, counts.tolist(), sums):
        mean = s / total if total else torch.zeros_like(m.mean)
        if m.count:
            delta = m.mean - mean
            rows = getattr(m, "rows", None)
            m.m2.addr_(delta if rows is None else delta[rows], delta, alpha=float(m.count))
            if getattr(m, "sq", None) is not None:
                m.sq.addcmul_(delta, delta, value=float(m.count))
        m.mean.copy_(mean)
        m.count = int(total)
    masks: dict[tuple[int, torch.device], torch.Tensor] = {}
    payload: list[torch.Tensor] = []
    unpack: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def flush() -> None:
        all_reduce_sum(payload, group)
        for m2, mask, packed in unpack:
            m2.masked_scatter_(mask, packed)
        payload.clear()
        unpack.clear()

    for m in moments:  # in chunks: the packed copies of at most ~16M elements are alive at once
        if getattr(m, "rows", None) is None and m.m2.dim() == 2 and m.m2.shape[0] == m.m2.shape[1]:
            key = (m.m2.shape[0], m.m2.device)
            if key not in masks:
                masks[key] = torch.ones(key[0], key[0], dtype=torch.bool, device=key[1]).triu_()
            packed = m.m2.masked_select(masks[key])
            payload.append(packed)
            unpack.append((m.m2, masks[key], packed))
        else:
            payload.append(m.m2)
        if getattr(m, "sq", None) is not None:
            payload.append(m.sq)
        if sum(t.numel() for t in payload) >= 4 * _COALESCE_ELEMENTS:
            flush()
    flush()


def barrier(group: Any = None) -> None:
    """Wait for every rank of `group` (nothing when not distributed)."""
    if is_distributed() and world_size(group) > 1:
        dist.barrier(group=group)


def all_gather_objects(value: Any, group: Any = None) -> list[Any]:
    """Every rank's `value` (picklable), in rank order; `[value]` when not distributed."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * world_size(group)
    dist.all_gather_object(gathered, value, group=group)
    return gathered


def any_rank(flag: bool, group: Any = None, device: torch.device | None = None) -> bool:
    """Whether `flag` is true on any rank of `group` (`flag` itself when not distributed)."""
    if not is_distributed() or world_size(group) == 1:
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item())


def _global(rank_in_group: int, group: Any) -> int:
    """The global rank of a rank of `group` (point-to-point calls take global ranks)."""
    return rank_in_group if group is None else dist.get_global_rank(group, rank_in_group)


def send_columns(joint: torch.Tensor, means: torch.Tensor, dst: int, group: Any = None) -> None:
    """Send one batch's centred feature columns (features × samples) and their means to rank
    `dst` of `group`, where `receive_columns` takes them; a batch without samples sends its
    count only."""
    header = torch.tensor([joint.shape[1]], dtype=torch.int64, device=joint.device)
    peer = _global(dst, group)
    dist.send(header, peer, group=group)
    traffic["calls"] += 1
    if joint.shape[1]:
        dist.send(joint.contiguous(), peer, group=group)
        dist.send(means.contiguous(), peer, group=group)
        traffic["bytes"] += joint.numel() * joint.element_size()


def receive_columns(features: int, src: int, device: torch.device,
                    group: Any = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (joint, means) that rank `src` of `group` sent with `send_columns` (float32, `features`
    rows); None for a batch without samples."""
    header = torch.empty(1, dtype=torch.int64, device=device)
    peer = _global(src, group)
    dist.recv(header, peer, group=group)
    columns = int(header.item())
    if not columns:
        return None
    joint = torch.empty(features, columns, dtype=torch.float32, device=device)
    means = torch.empty(features, dtype=torch.float32, device=device)
    dist.recv(joint, peer, group=group)
    dist.recv(means, peer, group=group)
    return joint, means
