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

from ..errors import InputError, TraceError
from ..passes.fuse_attention import fuse_attention
from .capture import trace
from .capture_errors import both_failed
from .export import export
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


CAPTURES = ("auto", "fx", "export")  # the front ends `capture=` chooses between


def prepare_graphs(models: Sequence[nn.Module], example: Any, *, leaf_modules: Sequence[type] = (),
                   concrete_args: dict | None = None, capture: str = "auto"
                   ) -> list[fx.GraphModule]:
    """Capture every model on `example` (shapes on every node) and, for symbolic traces, fuse its
    attention into single nodes; a merged model (see `is_merged`) is taken as the graph it is. The
    graphs may differ; `fxzip.graph.pairing.pair_graphs` says where they agree.

    `capture`: "fx" (torch.fx symbolic tracing, `fxzip.graph.capture`), "export" (torch.export,
    `fxzip.graph.export`) or "auto": symbolic tracing, and torch.export for every model where the
    first model cannot be traced. Each graph says which ran in `gm.fxzip_capture`."""
    if capture not in CAPTURES:
        raise InputError(f"capture must be one of {CAPTURES}, got {capture!r}")
    graphs: list[fx.GraphModule] = []
    for model in models:
        if is_merged(model):
            graphs.append(merged_graph(model, example))
            continue
        if capture == "auto" and graphs:  # every model as the first one was captured
            capture = getattr(graphs[0], "fxzip_capture", "fx")
        graphs.append(_capture(model, example, leaf_modules, concrete_args, capture))
    return graphs


def _capture(model: nn.Module, example: Any, leaf_modules: Sequence[type],
             concrete_args: dict | None, capture: str) -> fx.GraphModule:
    """One model's graph by the front end `capture` asks for ("auto": fx, else export)."""
    if capture == "export":
        return export(model, example, concrete_args=concrete_args)
    try:
        gm = trace(model, example, leaf_modules=leaf_modules, concrete_args=concrete_args)
    except TraceError as traced:
        if capture == "fx":
            raise
        try:
            return export(model, example, concrete_args=concrete_args)
        except TraceError as exported:
            raise both_failed(traced, exported) from exported
    fused = fuse_attention(gm, example)[0]
    for name in ("fxzip_capture", "fxzip_out_spec"):  # what capture noted, on the fused graph
        if hasattr(gm, name):
            setattr(fused, name, getattr(gm, name))
    return fused


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
