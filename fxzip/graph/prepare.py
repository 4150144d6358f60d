"""From models to the graphs the passes work on: input checks, then trace → fuse attention →
pair every graph's nodes with graph 0's (`fxzip.graph.pairing`). Shared by `Zipper`, `analyze` and the
tests."""
from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import InputError
from ..passes.fuse_attention import fuse_attention
from .capture import trace
from .nodes import route_through_inplace_ops


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
    if any(is_merged(m) for m in models[1:]):
        raise InputError("a merged model can be extended only as the first model: "
                         "fxzip.merge(merged, new_model, inputs)")
    if len(devices) > 1:
        raise InputError(f"the models live on different devices {sorted(map(str, devices))}; "
                         "move them to one device first")
    return devices.pop()


def prepare_graphs(models: Sequence[nn.Module], example: Any, *, leaf_modules: Sequence[type] = (),
                   concrete_args: dict | None = None) -> list[fx.GraphModule]:
    """Trace every model on `example` (shapes on every node) and fuse its attention into single
    nodes; a merged model (see `is_merged`) is taken as the graph it is. The graphs may differ;
    `fxzip.graph.pairing.pair_graphs` says where they agree."""
    return [merged_graph(m, example) if is_merged(m) else
            fuse_attention(trace(m, example, leaf_modules=leaf_modules,
                                 concrete_args=concrete_args), example)[0] for m in models]


def is_merged(model: Any) -> bool:
    """Whether `model` is a merged model fxzip returned (with split heads), which another model
    can be zipped into."""
    return isinstance(model, fx.GraphModule) and hasattr(model, "fxzip_trunk")


def merged_graph(model: fx.GraphModule, example: Any) -> fx.GraphModule:
    """A private copy of a merged model with shapes on every node (its trunk's node names and
    module names are the merge's)."""
    gm = fx.GraphModule(copy.deepcopy(model), copy.deepcopy(model.graph), "ZippedModel").eval()
    gm.fxzip_trunk = list(model.fxzip_trunk)
    route_through_inplace_ops(gm)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example)
    except Exception as exc:
        raise InputError(f"running the merged model on the example batch of shape "
                         f"{tuple(example.shape)} failed: {type(exc).__name__}: {exc}") from exc
    return gm
