"""From models to the graphs the passes work on: input checks, then trace → fuse attention →
pair every graph's nodes with graph 0's (`fxzip.pairing`). Shared by `Zipper`, `analyze` and the
tests."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import InputError
from .pairing import Pairing, pair_graphs
from .passes.attention_fusion import fuse_attention
from .tracing import trace


def device_of(model: nn.Module) -> torch.device:
    """The device of a model's parameters (CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def check_models(models: Sequence[Any]) -> torch.device:
    """Models to merge: at least two, all `nn.Module`s, all on one device (returned)."""
    if len(models) < 2:
        raise InputError(f"merging needs at least two models, got {len(models)}")
    for k, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise InputError(f"model {k} is a {type(m).__name__}, not a torch.nn.Module")
    devices = {device_of(m) for m in models}
    if len(devices) > 1:
        raise InputError(f"the models live on different devices {sorted(map(str, devices))}; "
                         "move them to one device first")
    return devices.pop()


def prepare_graphs(models: Sequence[nn.Module], example: Any, *, leaf_modules: Sequence[type] = (),
                   concrete_args: dict | None = None) -> list[fx.GraphModule]:
    """Trace every model on `example` (shapes on every node) and fuse its attention into single
    nodes. The graphs may differ; `pair_models` says where they agree."""
    return [fuse_attention(trace(m, example, leaf_modules=leaf_modules,
                                 concrete_args=concrete_args), example)[0] for m in models]


def pair_models(graphs: Sequence[fx.GraphModule]) -> Pairing:
    """Which node of each graph plays the part of each node of graph 0 (see `fxzip.pairing`);
    the merge checks that its trunk is shared (ArchitectureMismatchError otherwise)."""
    return pair_graphs(graphs)
