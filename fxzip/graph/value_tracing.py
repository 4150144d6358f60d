"""Tracing with values: every proxy also carries the value the example gives it, so that Python
code that torch.fx cannot trace symbolically (a branch on a size, `len`, `int(...)`, unpacking a
size, an `assert` on shapes, `x.device.type`) runs on the example's concrete values.

timm marks such modules as not traceable (MobileViT's unfold branches on `math.ceil` of sizes,
Twins' windowed attention pads only where sizes need it, EfficientViT's LiteMLA checks the
device); made leaves, they are barriers to zipping. Traced with values they become plain ops:

- sizes stay symbolic where they are only computed with (`x.reshape(B * C, ...)` keeps the batch
  size a graph value), so the graph serves other batch sizes;
- control flow (`if`, `bool`, `len`, `int`, iteration) takes the example's value: the graph is
  specialised on the example's shapes (as the meta tracer's tier is);
- `dtype`, `device`, `ndim` and `is_cuda` of a tensor are the example's (constants), and so is a
  tensor constructed from sizes (`torch.zeros(1, N, N, 3)`).

A value that cannot be computed (an op that fails on the example) is unknown, and so is a Python
number read from tensor data (`.item()`); control flow on an unknown value or on a tensor (data-
dependent control flow) fails as in plain torch.fx. The module is a mixin over `torch.fx.Tracer`
that imports nothing of fxzip, so `capture` can combine it with its own tracer.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch.fx.node import map_aggregate
from torch.fx.proxy import Attribute

_UNKNOWN = object()
# tensor constructors called with sizes: a constant of the example's sizes (ConViT's relative
# positions for N patches), which forward code may index, assign into or keep in a buffer
_CONSTRUCTORS = frozenset({torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
                           torch.eye, torch.linspace})
# tensor attributes read as constants of the example (Python code branches on them)
_CONSTANT_ATTRIBUTES = frozenset({"device", "dtype", "ndim", "is_cuda", "is_meta", "layout"})


def value_of(obj: Any) -> Any:
    """The example's value of a proxy (recursively in containers), `_UNKNOWN` if any is unknown."""
    unknown = False

    def one(a: Any) -> Any:
        nonlocal unknown
        if isinstance(a, fx.Proxy):
            v = getattr(a, "_value", _UNKNOWN)
            unknown = unknown or v is _UNKNOWN
            return v
        return a

    out = map_aggregate(obj, one)
    return _UNKNOWN if unknown else out


_DATA_TO_PYTHON = frozenset({"item", "tolist", "numpy", "__bool__", "__int__", "__float__"})


def _size_like(value: Any) -> bool:
    """Whether control flow may follow a value: known, and a Python value (sizes, flags,
    arithmetic on them), not a tensor (data: the graph would silently keep one branch)."""
    if value is _UNKNOWN:
        return False
    found = False

    def check(v: Any) -> Any:
        nonlocal found
        found = found or isinstance(v, torch.Tensor)
        return v

    map_aggregate(value, check)
    return not found


def _mutates_parameter(kind: str, target: Any, args: tuple, kwargs: dict) -> bool:
    """Whether an op is in place (`x.add_(y)`, `operator.iadd`, `inplace=True`) on a value read
    straight from a parameter or buffer (a get_attr node)."""
    first = args[0] if args else None
    if not (isinstance(first, fx.Proxy) and first.node.op == "get_attr"):
        return False
    name = target if kind == "call_method" else getattr(target, "__name__", "")
    return kwargs.get("inplace") is True or (name.endswith("_") and not name.endswith("__")) or \
        name in {"iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow"}


class ValueProxy(fx.Proxy):
    """A proxy with the example's value (`_value`) that answers control flow with it."""

    _value: Any = _UNKNOWN

    def __getattr__(self, k: str) -> Any:
        if k.startswith("_"):  # the proxy's own bookkeeping (`_value`, `_source`), not the tensor's
            raise AttributeError(k)
        value = self.__dict__.get("_value", _UNKNOWN)
        if k in _CONSTANT_ATTRIBUTES and isinstance(value, torch.Tensor):
            return getattr(value, k)
        return ValueAttribute(self, k)

    def __len__(self) -> int:
        if self._value is _UNKNOWN:
            return super().__len__()
        return len(self._value)

    def __int__(self) -> int:
        return int(self._concrete("int"))

    def __index__(self) -> int:
        return int(self._concrete("index"))

    def __float__(self) -> float:
        return float(self._concrete("float"))

    def _concrete(self, what: str) -> Any:
        if not _size_like(self._value):
            raise fx.proxy.TraceError(f"{what}() of a traced value that depends on tensor data "
                                      "(data-dependent control flow)")
        return self._value


class ValueAttribute(Attribute, ValueProxy):
    """`proxy.attr` (its node is made when used): its value is the attribute of the root's."""

    @property
    def _value(self) -> Any:  # type: ignore[override]
        root = getattr(self.root, "_value", _UNKNOWN)
        if root is _UNKNOWN:
            return _UNKNOWN
        return getattr(root, self.attr, _UNKNOWN)


class ValueTracing(fx.Tracer):
    """Mixin: `trace(root, concrete_args, values=...)` runs every traced op on the values of
    `values` (placeholder name: example value) too, and resolves control flow with them. Buffers
    are read as graph attributes (`get_attr`), so that a buffer forward fills is a graph value."""

    proxy_buffer_attributes = True

    def trace(self, root: Any, concrete_args: dict | None = None, *,  # type: ignore[override]
              values: dict[str, Any] | None = None) -> fx.Graph:
        self._example_values = dict(values or {})
        try:
            with torch.no_grad():
                graph = super().trace(root, concrete_args)
        finally:
            self._example_values = {}
        for node in list(graph.nodes):  # parameters read for Python only (`w.device`, a shape)
            if node.op == "get_attr" and not node.users:
                graph.erase_node(node)
        return graph

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ValueProxy(node, self)

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict, name: str | None = None,
                     type_expr: Any = None, proxy_factory_fn: Any = None) -> Any:
        if kind == "call_function" and target in _CONSTRUCTORS:
            args_v, kwargs_v = value_of(args), value_of(kwargs)
            if args_v is not _UNKNOWN and kwargs_v is not _UNKNOWN:
                return target(*args_v, **kwargs_v)  # a constant of the example's sizes
        rv = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if isinstance(rv, ValueProxy):
            rv._value = self._compute(kind, target, args, kwargs)
        return rv

    def _compute(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        """The op's value on the example's values (`_UNKNOWN` where an input is unknown or the op
        fails). Parameters are read as they are (a copy of VGG's 400 MB head would double the
        memory); an in-place op on one is not run (it must not change the model)."""
        if kind == "placeholder":
            return self._example_values.get(target, _UNKNOWN)
        try:
            if kind == "get_attr":
                value: Any = self.root
                self._running = True  # the parameter itself, not its proxy
                try:
                    for part in target.split("."):
                        value = getattr(value, part)
                finally:
                    self._running = False
                return value.detach() if isinstance(value, torch.Tensor) else value
            args_v, kwargs_v = value_of(args), value_of(kwargs)
            if args_v is _UNKNOWN or kwargs_v is _UNKNOWN or _mutates_parameter(kind, target, args,
                                                                               kwargs):
                return _UNKNOWN
            if kind == "call_function":
                return target(*args_v, **kwargs_v)
            if kind == "call_method":
                if target in _DATA_TO_PYTHON:  # a Python number from tensor data: not followed
                    return _UNKNOWN
                return getattr(args_v[0], target)(*args_v[1:], **kwargs_v)
            if kind == "call_module":
                self._running = True  # the leaf runs as it is (its submodules are not traced)
                try:
                    return self.root.get_submodule(target)(*args_v, **kwargs_v)
                finally:
                    self._running = False
        except Exception:  # an op that fails on the example: its value is unknown
            return _UNKNOWN
        return _UNKNOWN

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if getattr(self, "_running", False):  # a leaf running on values reads its own parameters
            return attr_val
        proxy = super().getattr(attr, attr_val, parameter_proxy_cache)
        if isinstance(proxy, ValueProxy) and proxy.node.op == "get_attr" \
                and getattr(proxy, "_source", attr_val) is not attr_val:
            # forward assigned a new tensor to the buffer (ConViT caches its relative positions
            # for the example's size): the same graph node (it reads the attribute when run),
            # with the new value; so a model whose buffer was filled before gets the same graph
            proxy = self.proxy(proxy.node)
            proxy._value = attr_val.detach() if isinstance(attr_val, torch.Tensor) else attr_val
            parameter_proxy_cache[proxy.node.target] = proxy
        if isinstance(proxy, ValueProxy) and proxy.node.op == "get_attr":
            proxy._source = attr_val
        return proxy

    def call_module(self, m: torch.nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        if getattr(self, "_running", False):
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def to_bool(self, obj: fx.Proxy) -> bool:
        value = getattr(obj, "_value", _UNKNOWN)
        if not _size_like(value):  # a branch on tensor data stays an error
            return super().to_bool(obj)
        return bool(value)

    def iter(self, obj: fx.Proxy) -> Any:
        value = getattr(obj, "_value", _UNKNOWN)
        if value is _UNKNOWN:
            return super().iter(obj)
        return iter([obj[i] for i in range(len(value))])
