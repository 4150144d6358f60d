"""Node and module helpers used by every pass: what a `get_attr` target names, in-place ops
(which may mutate an input) found and made visible in the graph, and the private copies of the
models that capture works on."""
from __future__ import annotations

import copy
from typing import Any

import torch.fx as fx
import torch.nn as nn

__all__ = ["module_attribute", "is_inplace", "has_inplace", "route_through_inplace_ops",
           "private_copy"]


def private_copy(model: nn.Module) -> nn.Module:
    """A copy of `model`'s modules (attributes a capture may set, caches a forward makes stay
    on the copy) that shares its parameters: no weight is copied, so capturing a model costs no
    second copy of its weights. Buffers are copied (a forward may update one in place, e.g. a
    call counter, which must not reach the user's model); fxzip never writes into parameters:
    the merged model's are new, its heads' are copied."""
    memo = {id(p): p for p in model.parameters()}
    return copy.deepcopy(model, memo)


_MISSING = object()


def module_attribute(root: Any, target: str, default: Any = _MISSING) -> Any:
    """What a dotted `get_attr` target names on `root` (a parameter, buffer, tensor or module);
    `default` where a name on the path is missing (else AttributeError)."""
    value = root
    for part in target.split("."):
        value = getattr(value, part, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise AttributeError(f"{type(root).__name__} has no attribute {target!r}")
            return default
    return value


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
    """Whether any node of the graph may mutate one of its inputs (see `is_inplace`)."""
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
