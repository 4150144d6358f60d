"""Inference costs of a model: parameters and FLOPs (one sample, or a whole batch)."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .inputs import Batch, call_model, leading


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (a merged model's trunk once, each head's own)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, x: Batch, *, per_sample: bool = True) -> int:
    """FLOPs of one forward pass (torch's flop counter: matrix products and convolutions) on the
    first sample of `x` (a tensor or a dict of keyword tensors), or on all of `x` with
    `per_sample=False`."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        call_model(model, leading(x, 1) if per_sample else x)
    return int(counter.get_total_flops())
