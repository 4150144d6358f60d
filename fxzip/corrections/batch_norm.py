"""Re-estimate BatchNorm running statistics on calibration inputs (the paper does this for every
method, the original models included): ONE accumulator, `BatchNormStatistics`, that both
`reset_bn` and the corrections pass (`fxzip.corrections.refit`) write BatchNorms with."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..runtime.distributed import all_reduce_sum, is_distributed, world_size
from ..runtime.inputs import Batches, call_model, shard_batches

__all__ = ["BatchNormStatistics", "all_reduce_statistics", "batch_mean_var",
           "batch_norm_statistics", "reset_bn"]

_BN = nn.modules.batchnorm._BatchNorm


class BatchNormStatistics:
    """The running statistics one BatchNorm gets from its inputs over calibration batches, as
    torch's own BatchNorm computes them in train mode with momentum=None: the cumulative average
    over batches, each batch weighted equally, of the batch's per-channel (axis 1) mean and
    unbiased variance, and the number of those batches.

    `add` one batch's input at a time (the corrections pass: its values are all at hand);
    `reset_bn` lets the BatchNorms accumulate the same average themselves in train mode and reads
    it with `of`. Under torch.distributed `all_reduce_statistics` combines every rank's averages
    into the average over all ranks' batches (each weighted by its batch count; a rank with no
    batch contributes nothing); `write` puts running_mean / running_var / num_batches_tracked
    into the BatchNorm (nothing where no rank had a batch, or the BatchNorm keeps no running
    statistics). The statistics live on `device` (None: the default device).

    `reset_bn` and the corrections pass differ only in where a BatchNorm's inputs come from: in
    `reset_bn` from the model run forward with its BatchNorms in train mode (every BatchNorm reads
    inputs normalised upstream by batch statistics); in the corrections pass from the eval-mode
    merged model, node by node, on inputs the layers before it already corrected.
    """

    def __init__(self, num_features: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32):
        self.mean = torch.zeros(num_features, device=device, dtype=dtype)  # as reset_running_stats
        self.var = torch.ones(num_features, device=device, dtype=dtype)
        self.batches = 0

    @classmethod
    def of(cls, bn: nn.Module) -> BatchNormStatistics:
        """The statistics a BatchNorm accumulated itself (train mode, momentum=None)."""
        stats = cls(bn.num_features, bn.running_mean.device, bn.running_mean.dtype)
        stats.mean, stats.var = bn.running_mean.detach().clone(), bn.running_var.detach().clone()
        stats.batches = int(bn.num_batches_tracked)
        return stats

    def add(self, x: torch.Tensor) -> None:
        """Add one batch: the BatchNorm's input (channels on axis 1)."""
        self.batches += 1
        factor = 1.0 / float(self.batches)  # what torch's BatchNorm takes for momentum=None
        mean, var = batch_mean_var(x.to(self.mean.device))
        self.mean.mul_(1.0 - factor).add_(mean.to(self.mean.dtype), alpha=factor)
        self.var.mul_(1.0 - factor).add_(var.to(self.var.dtype), alpha=factor)

    def mean_var(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The running mean and variance; None if no batch was added (on any rank, once
        all-reduced)."""
        if self.batches == 0:
            return None
        return self.mean, self.var

    def toward(self, bn: nn.Module, weight: float) -> BatchNormStatistics:
        """These statistics blended with the running statistics `bn` has now, in place: `weight`
        on these and 1 - weight on the BatchNorm's (torch's momentum update with momentum
        `weight`; 1: these alone). With few calibration samples, the given statistics (estimated
        on the training data) steady the noisy new ones (`Corrections.bn_prior`)."""
        if weight >= 1.0 or self.batches == 0 or getattr(bn, "running_mean", None) is None:
            return self
        for mine, given in ((self.mean, bn.running_mean), (self.var, bn.running_var)):
            mine.mul_(weight).add_(given.detach().to(mine.device, mine.dtype), alpha=1.0 - weight)
        return self

    def write(self, bn: nn.Module) -> None:
        """Set `bn`'s running statistics to these (and num_batches_tracked to the batches)."""
        stats = self.mean_var()
        if stats is None or getattr(bn, "running_mean", None) is None:
            return
        mean, var = stats
        bn.running_mean.copy_(mean.to(bn.running_mean.device, bn.running_mean.dtype))
        bn.running_var.copy_(var.to(bn.running_var.device, bn.running_var.dtype))
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.fill_(self.batches)  # every rank's batches


def batch_mean_var(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's per-channel (axis 1) mean and unbiased variance (0 where a channel has one value,
    which torch's BatchNorm refuses in train mode), float32: the mean, then the norms of the
    centred values (about twice as fast on the CPU as the statistics of a train-mode
    `F.batch_norm`, which also writes its normalised output)."""
    values = x.float().reshape(x.shape[0], x.shape[1], -1)
    count = values.numel() // values.shape[1]
    mean = values.mean(2).mean(0)
    if count == 1:
        return mean, torch.zeros_like(mean)
    norms = torch.linalg.vector_norm(values - mean[None, :, None], dim=2)
    return mean, norms.square_().sum(0) / (count - 1)


def all_reduce_statistics(stats: Sequence[BatchNormStatistics], group: Any = None) -> None:
    """Combine each accumulator's average over this rank's batches into the average over every
    rank's batches of `group` (None: the default group): means and variances weighted by batch
    counts, in one coalesced float64 all-reduce (nothing when not distributed). Every rank must
    call, with its accumulators in the same order."""
    stats = list(stats)
    if not stats or not is_distributed() or world_size(group) == 1:
        return
    device = stats[0].mean.device
    counts = torch.tensor([float(s.batches) for s in stats], dtype=torch.float64, device=device)
    means = [s.mean.double() * s.batches for s in stats]
    variances = [s.var.double() * s.batches for s in stats]
    all_reduce_sum([counts, *means, *variances], group)
    for s, total, mean, var in zip(stats, counts.tolist(), means, variances):
        s.batches = int(total)
        if total:
            s.mean.copy_(mean / total)
            s.var.copy_(var / total)


def batch_norm_statistics(values: Sequence[torch.Tensor], num_features: int,
                          group: Any = None) -> BatchNormStatistics:
    """The statistics of a BatchNorm whose inputs are `values` (one tensor per batch, all on one
    device), all-reduced over `group`: what the corrections pass reads and writes (its values are
    all at hand)."""
    stats = BatchNormStatistics(num_features, values[0].device if values else None)
    for v in values:
        stats.add(v)
    all_reduce_statistics([stats], group)
    return stats


def reset_bn(model: nn.Module, inputs: Any, *, progress: bool = True,
             group: Any = None) -> nn.Module:
    """Recompute the running mean/variance of every BatchNorm in `model` (in place) as exact
    averages over `inputs` (the mean over batches of the batch means and of the unbiased batch
    variances: torch's cumulative average, momentum=None), then put the model in eval mode.
    Returns the model.

    The model runs forward once over the inputs with its BatchNorms in train mode and
    momentum=None (each later BatchNorm sees inputs normalised by batch statistics): each
    BatchNorm accumulates the average itself, as torch computes it, in the same pass that
    normalises (no second reduction over its input); `BatchNormStatistics` reads and combines
    them. BatchNorms without running statistics (`track_running_stats=False`) are left alone.

    Under torch.distributed `inputs` are this rank's shard (possibly empty): the averages are
    all-reduced over `group` (None: the default group) to those over all ranks' batches. A
    BatchNorm that saw no batch on any rank keeps its reset statistics."""
    norms = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not norms:
        return model.eval()
    batches = inputs if isinstance(inputs, Batches) else shard_batches(inputs, _device(model), group)
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # the cumulative average over the batches
        m.train()
    try:
        with torch.no_grad():
            for x in tqdm(batches, desc="fxzip BN reset", unit="batch", disable=not progress,
                          leave=False):
                call_model(model, x)
        stats = [BatchNormStatistics.of(m) for m in norms]
        all_reduce_statistics(stats, group)
        for m, s in zip(norms, stats):
            m.reset_running_stats()  # a BatchNorm no rank fed keeps these
            s.write(m)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
    return model


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))
