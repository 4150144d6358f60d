"""Re-estimate BatchNorm running statistics on calibration inputs (the paper does this for every
method, the original models included)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..runtime.distributed import all_reduce_batch_norms
from ..runtime.inputs import Batches, call_model, shard_batches


def reset_bn(model: nn.Module, inputs: Any, *, progress: bool = True,
             group: Any = None) -> nn.Module:
    """Recompute the running mean/variance of every BatchNorm in `model` (in place) as exact
    averages over `inputs` (the mean over batches of the batch means and of the unbiased batch
    variances), then put the model in eval mode. Returns the model.

    Under torch.distributed `inputs` are this rank's shard (possibly empty): the averages are
    all-reduced over `group` (None: the default group) to those over all ranks' batches."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    if not norms:
        return model.eval()
    batches = inputs if isinstance(inputs, Batches) else shard_batches(inputs, _device(model), group)
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
        m.train()
    try:
        with torch.no_grad():
            for x in tqdm(batches, desc="fxzip BN reset", unit="batch", disable=not progress, leave=False):
                call_model(model, x)
        all_reduce_batch_norms(norms, group)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
    return model


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))
