"""Shapes: every node of a traced graph gets its shape and dtype in `node.meta`, from a run on fake
tensors (a real run where fake tensors cannot run it); and the readers of that meta."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from ..errors import InputError, TraceError
from ..runtime.inputs import Batch, describe
from .fake_tensors import fake_copy

__all__ = ["propagate_shapes", "positional_args", "tensor_shape"]


def positional_args(gm: fx.GraphModule, example: Batch) -> list[Any]:
    """The values of a traced graph's placeholders, in order, for an example: a tensor is the
    first; a dict gives its keys' values; the others take their defaults."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not isinstance(example, dict):
        return [example] + [n.args[0] if n.args else None for n in placeholders[1:]]
    return [example[n.target] if n.target in example else (n.args[0] if n.args else None)
            for n in placeholders]


class _ShapeProp(fx.Interpreter):
    """torch.fx's ShapeProp (shape and dtype in `node.meta["tensor_meta"]`) without its print-out
    of tracebacks: a failing node raises `_NodeFailure` naming it. It runs `graph` (by default the
    module's own) with `module`'s submodules and attributes, and keeps each node's meta in `found`
    (written by the caller once the whole graph has run); `types` gives the real type of fake
    tensors that stand for one of another type (by id: a parameter's copy)."""

    def __init__(self, module: torch.nn.Module, graph: fx.Graph | None = None,
                 types: dict[int, type] | None = None):
        super().__init__(module, graph=graph)
        self.extra_traceback = False
        self.types = types or {}
        self.found: dict[fx.Node, dict[str, Any]] = {}

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as exc:
            raise _NodeFailure(n, exc) from exc
        result = _unrequested_weights_dropped(self.module, n, result)
        self.found[n] = _node_meta(result, self.types)
        return result


def _unrequested_weights_dropped(module: torch.nn.Module, n: fx.Node, result: Any) -> Any:
    """`nn.MultiheadAttention` called with need_weights=False returns None for the attention
    weights, but on fake tensors its fused fast path returns an empty tensor there (torch's fake
    kernel of `_native_multi_head_attention`): the real kernel's None, so that both runs write the
    same meta (the call is a node of the graph inside a traced-into `TransformerEncoderLayer`)."""
    if n.op != "call_module" or not isinstance(result, tuple) or len(result) != 2 \
            or result[1] is None:
        return result
    if not isinstance(module.get_submodule(n.target), torch.nn.MultiheadAttention):
        return result
    need = n.kwargs.get("need_weights", n.args[4] if len(n.args) > 4 else True)
    return (result[0], None) if need is False else result


def _node_meta(result: Any, types: dict[int, type]) -> dict[str, Any]:
    """A node's meta for its result: "tensor_meta" (the result with every tensor's metadata, where
    it holds a tensor) and "type" (a fake tensor's is the real run's: torch.Tensor, or the type in
    `types`)."""
    found = False

    def extract(obj: Any) -> Any:
        nonlocal found
        if isinstance(obj, torch.Tensor):
            found = True
            return _extract_tensor_metadata(obj)
        return obj

    tensor_meta = map_aggregate(result, extract)
    kind = types.get(id(result), torch.Tensor) if isinstance(result, FakeTensor) else type(result)
    return {"tensor_meta": tensor_meta, "type": kind} if found else {"type": kind}


class _NodeFailure(Exception):
    """A node failed while running for its meta: which node, and its error."""

    def __init__(self, node: fx.Node, error: Exception):
        super().__init__(str(error))
        self.node, self.error = node, error


def _run_for_meta(module: torch.nn.Module, graph: fx.Graph, args: list[Any],
                  types: dict[int, type] | None = None) -> dict[fx.Node, dict[str, Any]]:
    """Every node's meta from a run of `graph` on `args` (no autograd)."""
    prop = _ShapeProp(module, graph, types)
    with torch.no_grad():
        prop.run(*args)
    return prop.found


def _meta_on_fake_tensors(gm: fx.GraphModule, args: list[Any]
                          ) -> dict[fx.Node, dict[str, Any]] | None:
    """Every node's meta from a run of a fake copy of gm on fake tensors of the example's shapes
    (nothing computed); None where fake tensors cannot run the graph (it reads values, e.g.
    `.item()`, or an op has no fake kernel)."""
    try:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        module, types = fake_copy(gm, mode)
        with _silenced("torch._subclasses.fake_tensor"), mode:
            fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            return _run_for_meta(module, gm.graph, fake, types)
    except Exception:  # noqa: BLE001 - any failure of the fake run: the real run reports or passes
        return None


@contextmanager
def _silenced(logger: str) -> Iterator[None]:
    """A logger silenced: fake tensors log the traceback of an op that fails on them (a wrong
    input shape), a failure that only means the example itself runs next."""
    log = logging.getLogger(logger)
    disabled, log.disabled = log.disabled, True
    try:
        yield
    finally:
        log.disabled = disabled


def propagate_shapes(gm: fx.GraphModule, example: Batch, label: str | None = None) -> None:
    """Write every node's shape and dtype into its meta (as torch.fx's ShapeProp does, without
    printing tracebacks) from a run of a fake copy of `gm` on fake tensors shaped as the example
    (a real forward is about a tenth of a merge's time), or, where fake tensors cannot run it, of
    `gm` on the example. Both write the same meta, but for the strides of size-1 dimensions (no
    element is reached through them; some fake kernels set them otherwise: layer_norm, view). A
    failure names the op that failed; where that op reads the input directly, the input's shape is
    named as the likely cause (InputError), else the op (TraceError)."""
    label = label or type(gm).__name__
    args = positional_args(gm, example)
    found = _meta_on_fake_tensors(gm, args)
    try:
        if found is None:
            found = _run_for_meta(gm, gm.graph, args)
    except _NodeFailure as failure:
        node, exc = failure.node, failure.error
        reads_input = any(a.op == "placeholder" for a in node.all_input_nodes)
        where = (f"node '{node.name}' ({node.op} {_target_name(gm, node)}) failed: "
                 f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
        if reads_input:
            raise InputError(
                f"running {label} on the example batch ({describe(example)}) failed at its first "
                f"op on the input: {where}. Check that the inputs have the shape the model "
                "expects.") from exc
        raise TraceError(
            f"running the traced {label} on the example batch ({describe(example)}) failed at "
            f"{where}. The op may depend on something tracing fixed (an input size, a forward "
            "argument); pass the module that holds it as `leaf_modules=`.") from exc
    for node, meta in found.items():
        node.meta.update(meta)


def _target_name(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{node.target}: {type(gm.get_submodule(node.target)).__name__}"
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__",
                                                                     str(node.target))


def tensor_shape(node: fx.Node) -> tuple[int, ...] | None:
    """The shape ShapeProp recorded for a tensor-valued node, else None."""
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None
