"""Inference costs of a model: parameters and FLOPs (one sample, or a whole batch)."""
from __future__ import annotations

import copy

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
    `per_sample=False`. The forward runs on fake tensors (shapes only, nothing computed: about a
    tenth of a real forward under the counter); a model that fake tensors cannot run (it reads
    values, e.g. `.item()`) is counted on the real input."""
    x = leading(x, 1) if per_sample else x
    try:
        return _count_on_fake_tensors(_isolated(model), x)
    except Exception:  # noqa: BLE001 - any failure of the fake run: count on the real tensors
        pass
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        call_model(model, x)
    return int(counter.get_total_flops())


def _isolated(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every parameter and buffer with `model` (only the
    modules and their plain attributes are copied). A forward under fake tensors must not store
    anything on the model itself: modules that cache tables in eval mode (TinyViT's and LeViT's
    attention biases) would keep a fake tensor, and every later real forward of the model would
    compute fake tensors too (`.item()` on them: DataDependentOutputException)."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def _count_on_fake_tensors(model: nn.Module, x: Batch) -> int:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = ({k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v
                 for k, v in x.items()} if isinstance(x, dict) else mode.from_tensor(x))
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            call_model(model, fake)
    return int(counter.get_total_flops())
