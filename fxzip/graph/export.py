"""The torch.export front end: a model captured by PyTorch's own exporter (non-strict) as a graph
of ATen ops, with parameters as get_attr nodes under the model's own names and the module path
of every node in its metadata. It is the capture path PyTorch and Hugging Face `transformers`
maintain, and it captures models that symbolic tracing cannot (transformers 5 has no fx tracer).

Its ATen ops become the torch calls the op-rule table knows (`fxzip.graph.aten`), and the
exported module is made a plain GraphModule that the passes can read and copy: the shape
guards export adds are dropped (the batch axis is left dynamic where the model allows), forward
arguments fixed while exporting (`use_cache=False`, `concrete_args`) become optional inputs with
those values, and the model's output structure (a `ModelOutput`, a dict, a tuple) is kept in
`gm.fxzip_out_spec` while the graph returns its tensors flat.
"""
from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree

from ..errors import InputError, TraceError
from ..runtime.inputs import Batch, describe
from .aten import functional_from_aten
from .nodes import route_through_inplace_ops
from .shapes import propagate_shapes

__all__ = ["export", "restore_outputs"]

# forward arguments that only change what a model caches or returns besides its outputs: fixed
# while exporting where the batches do not give them (a decoder's key/value cache is not merged)
EXPORT_DEFAULTS = {"use_cache": False}


def export(model: nn.Module, example: Batch, *, concrete_args: dict | None = None
           ) -> fx.GraphModule:
    """Capture a private eval-mode copy of `model` with `torch.export` on `example` (a tensor,
    the first input, or a dict of `forward`'s keyword arguments) and annotate every node with its
    shape. TraceError naming the exporter's reason when it cannot."""
    private = copy.deepcopy(model).eval()
    kwargs = dict(example) if isinstance(example, dict) else {}
    args = () if isinstance(example, dict) else (example,)
    fixed = _fixed_arguments(model, kwargs, concrete_args)
    overlap = sorted(set(fixed) & set(kwargs))
    if overlap:
        raise InputError(f"{overlap} are both in the calibration batches and in concrete_args; "
                         "give each forward argument once")
    kwargs.update(fixed)
    try:
        program = torch.export.export(private, args, kwargs, strict=False,
                                      dynamic_shapes=_batch_axis(args, kwargs))
    except Exception as exc:  # torch.export raises many types
        reason = " ".join(str(exc).split())[:600]
        raise TraceError(f"torch.export cannot capture {type(model).__name__} on "
                         f"{describe(example)}: {type(exc).__name__}: {reason}") from exc
    gm = _plain(program.module(), fixed)
    functional_from_aten(gm)
    route_through_inplace_ops(gm)
    propagate_shapes(gm, example, type(model).__name__)
    return gm


def restore_outputs(gm: fx.GraphModule, flat: Any) -> Any:
    """The outputs of an exported graph in the model's own structure (as `gm(...)` returned them
    before `export` made them flat); `flat` as is for a graph of another front end."""
    spec = getattr(gm, "fxzip_out_spec", None)
    return flat if spec is None else pytree.tree_unflatten(list(flat), spec)


def _fixed_arguments(model: nn.Module, given: dict, concrete_args: dict | None) -> dict:
    """`concrete_args`, and `EXPORT_DEFAULTS` for the arguments `forward` takes that neither the
    batches nor `concrete_args` give."""
    fixed = dict(concrete_args or {})
    try:
        names = set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # no signature to read
        return fixed
    for name, value in EXPORT_DEFAULTS.items():
        if name in names and name not in given and name not in fixed:
            fixed[name] = value
    return fixed


def _batch_axis(args: tuple, kwargs: dict) -> Any:
    """Dynamic shapes for `torch.export`: the first axis of every tensor input automatic (dynamic
    where the model allows it, else the example's size), nothing else."""
    def spec(value: Any) -> Any:
        return {0: torch.export.Dim.AUTO} if isinstance(value, torch.Tensor) and value.dim() \
            else None
    return {key: spec(value) for key, value in kwargs.items()} if kwargs else \
        tuple(spec(value) for value in args)


def _plain(gm: fx.GraphModule, fixed: dict) -> fx.GraphModule:
    """The exported module as a plain GraphModule: no shape guards, fixed arguments optional (with
    the values they were exported with), flat outputs (their structure in `fxzip_out_spec`), each
    node's module stack keyed by module path (`stop_at="model.layers.3"`)."""
    graph = gm.graph
    codegen = graph._codegen
    out_spec = getattr(getattr(codegen, "pytree_info", None), "out_spec", None)
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            graph.erase_node(node)
        elif node.op == "placeholder" and node.target in fixed:
            node.args = (fixed[node.target],)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    graph._codegen = fx.graph.CodeGen()
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = (tuple(output.args[0]) if isinstance(output.args[0], (list, tuple))
                   else output.args[0],)
    for node in graph.nodes:  # module paths as keys, as symbolic traces have them
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {path: (path, kind) for path, kind in stack.values()
                                            if path and not path.startswith("_empty_nn_module")}
    plain = fx.GraphModule(gm, graph, gm.__class__.__name__)
    plain.fxzip_out_spec = out_spec
    plain.fxzip_capture = "export"
    return plain
