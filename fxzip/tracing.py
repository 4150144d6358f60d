"""Tracing: each model becomes a torch.fx GraphModule with shapes on every node."""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from .errors import InputError, TraceError


class FxzipTracer(fx.Tracer):
    """A tracer that keeps torch.nn's own modules, TorchScript modules and any user-named module
    types as leaves, and wraps the functions timm marks as not traceable (plus `math` and
    `torchvision.ops`) as single calls."""

    def __init__(self, leaf_modules: Sequence[type] = ()):
        functions, modules = _autowrap()
        super().__init__(autowrap_modules=modules, autowrap_functions=functions)
        self.extra_leaves = tuple(leaf_modules)

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        if self.extra_leaves and isinstance(m, self.extra_leaves):
            return True
        if isinstance(m, torch.jit.ScriptModule):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _autowrap() -> tuple[tuple, tuple]:
    """timm's not-traceable functions, and the modules whose functions are wrapped as leaves."""
    modules: list = [math]
    try:
        import torchvision.ops
        modules.append(torchvision.ops)
    except ImportError:  # torchvision is optional: without it there is nothing to wrap
        pass
    try:
        from timm.layers import get_notrace_functions
        functions = tuple(get_notrace_functions())
    except ImportError:  # timm is optional (the "timm" extra)
        functions = ()
    return functions, tuple(modules)


def _timm_leaf_modules() -> tuple[type, ...]:
    """Module types timm marks as not traceable (they become leaves, hence barriers)."""
    try:
        from timm.layers import get_notrace_modules
        return tuple(get_notrace_modules())
    except ImportError:  # pragma: no cover
        return ()


def trace(model: torch.nn.Module, example: torch.Tensor, *, leaf_modules: Sequence[type] = (),
          concrete_args: dict | None = None) -> fx.GraphModule:
    """Trace a private eval-mode copy of `model` and annotate every node with its shape.

    The copy keeps the user's model untouched (tracing and shape propagation run modules; some
    timm models cache proxies or attach constants when traced). Modules timm marks as not
    traceable are traced into first and made leaves only if that fails.
    """
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"expected a torch.nn.Module to merge, got {type(model).__name__}")
    gm = None
    for leaves in (tuple(leaf_modules), tuple(leaf_modules) + _timm_leaf_modules()):
        private = copy.deepcopy(model).eval()
        tracer = FxzipTracer(leaves)
        try:
            graph = tracer.trace(private, concrete_args=concrete_args)
        except Exception as exc:  # torch.fx raises many types here
            failure = exc
            continue
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
        break
    if gm is None:
        raise TraceError(
            f"torch.fx cannot trace {type(model).__name__}: {type(failure).__name__}: {failure}. "
            "Models with data-dependent control flow cannot be traced; pass the offending module "
            "types as `leaf_modules=` (they become barriers) or fixed forward arguments as "
            "`concrete_args=`.") from failure
    gm.eval()
    route_through_inplace_ops(gm)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example)
    except Exception as exc:
        raise InputError(
            f"running {type(model).__name__} on the example batch of shape {tuple(example.shape)} "
            f"failed: {type(exc).__name__}: {exc}. Check that the inputs have the shape the model "
            "expects.") from exc
    return gm


def tensor_shape(node: fx.Node) -> tuple[int, ...] | None:
    """The shape ShapeProp recorded for a tensor-valued node, else None."""
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


_INPLACE_OPERATORS = {"iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior",
                      "ixor", "ilshift", "irshift", "imatmul"}


def is_inplace(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether a node may mutate one of its inputs (in-place method, operator or module)."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return (node.kwargs.get("inplace", False) is True or name in _INPLACE_OPERATORS
                or (name.endswith("_") and not name.endswith("__")))
    if node.op == "call_module":
        return getattr(gm.get_submodule(node.target), "inplace", False) is True
    return False


def has_inplace(gm: fx.GraphModule) -> bool:
    return any(is_inplace(n, gm) for n in gm.graph.nodes)


def route_through_inplace_ops(gm: fx.GraphModule) -> None:
    """Make mutation visible in the graph: after `y = x.add_(z)`, later readers of `x` read `y`.

    torch.fx records `x.add_(z)` without redirecting later uses of `x`, so ancestor sets (the
    trunk of a stop point) and per-model copies would miss the mutation.
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        if not is_inplace(node, gm) or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        mutated = node.args[0]
        for user in list(mutated.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(mutated, node)
    gm.recompile()
