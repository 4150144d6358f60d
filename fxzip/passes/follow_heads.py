"""The head-following check of `fuse_attention`: a state machine that follows the head axis op by
op through an attention subgraph that reads extra tensors, before it moves into an `AttentionCore`."""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..graph.shapes import tensor_shape
from ..rules.api import norm_dim


_SAME_STATE_METHODS = {"contiguous", "clone", "float", "half", "to", "type_as", "detach"}
_SCALE_OPS = {operator.mul, operator.truediv, torch.mul, torch.div, "mul", "div"}
_BIAS_OPS = {operator.add, operator.sub, torch.add, torch.sub, "add", "sub"} | _SCALE_OPS
_MATMUL = {operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm"}
_SOFTMAX = {F.softmax, torch.softmax, "softmax"}


@dataclass(frozen=True)
class _Heads:
    """Where a tensor inside an attention region keeps its heads: the head axis, of `ndim` axes."""

    head: int
    ndim: int

    def moved(self, where: dict[int, int]) -> _Heads:
        """The same state after a permute/transpose (`where`: old axis -> new axis)."""
        return replace(self, **{name: where.get(getattr(self, name), getattr(self, name))
                                for name in ("three", "head", "d") if hasattr(self, name)})


@dataclass(frozen=True)
class _Packed(_Heads):
    """The split of the fused projection, (..., N, 3, H, d): [q | k | v] on axis `three`."""

    three: int
    d: int

    def part(self, dim: int, role: str) -> _Part:
        """One of q, k, v: the [q | k | v] axis `dim` removed."""
        shift = lambda a: a - (a > dim)
        return _Part(head=shift(self.head), ndim=self.ndim - 1, role=role, d=shift(self.d))


@dataclass(frozen=True)
class _Part(_Heads):
    """Queries, keys or values (`role` q, k or v), head features on axis `d`."""

    role: str
    d: int


@dataclass(frozen=True)
class _Scores(_Heads):
    """Attention scores or weights, q·kᵀ per head (the head features contracted)."""


@dataclass(frozen=True)
class _Output(_Heads):
    """The heads' outputs, weights·v, head features on axis `d`."""

    d: int


_PLAIN = "plain"  # a shape value


def follow_heads(gm: fx.GraphModule, nodes: list[fx.Node], source: fx.Node,
                 extras: list[fx.Node]) -> dict[fx.Node, int | None] | None:
    """Follow the head axis from the split of [q | k | v] to the merge of the heads, op by op:
    q and k meet only in the score product (over their head features), values only through the
    attention weights, heads stay on one axis throughout. Extra tensors may only scale or shift
    the scores. Returns, per extra tensor, its axis along the heads (None: broadcast over the
    heads), or None where the region does anything else."""
    extra_set = set(extras)
    states: dict[fx.Node, Any] = {}
    head_axes: dict[fx.Node, int | None] = {}

    def extra_axis(value: fx.Node, state: _Heads) -> bool:
        shape = tensor_shape(value)
        axis = len(shape) - (state.ndim - state.head)
        axis = None if axis < 0 or shape[axis] == 1 else axis
        return head_axes.setdefault(value, axis) == axis

    for position, node in enumerate(nodes):
        shape = tensor_shape(node)
        key = node.target if node.op in ("call_function", "call_method") else None
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            key = "softmax" if isinstance(module, nn.Softmax) else \
                "same" if isinstance(module, (nn.Dropout, nn.Identity)) else None
            args = [node.args[0]]
            if isinstance(module, nn.Softmax):
                args = [node.args[0], module.dim]
        else:
            args = list(node.args)
        inputs = [states.get(a) if isinstance(a, fx.Node) else None for a in args]
        first = inputs[0] if inputs else None
        state = None
        if position == 0:  # the split (..., N, 3, H, d)
            n = len(shape)
            state = _Packed(head=n - 2, ndim=n, three=n - 3, d=n - 1)
        elif position == len(nodes) - 1:  # the merge of the heads (..., N, H·d)
            if not (isinstance(first, _Output) and first.head == first.ndim - 2
                    and first.d == first.ndim - 1):
                return None
            break
        elif key in (getattr, "size", "dim"):
            state = _PLAIN
        elif first is None or first == _PLAIN:
            return None
        elif isinstance(first, tuple):  # q, k, v unbound
            if key is operator.getitem and isinstance(node.args[1], int):
                state = first[node.args[1]]
        elif key in ("permute", torch.permute, "transpose", torch.transpose):
            state = _moved(first, node, key)
        elif key in _SAME_STATE_METHODS or key in (F.dropout, "same"):
            state = first
        elif key in (torch.unbind, "unbind") and isinstance(first, _Packed):
            dim = norm_dim(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0),
                           first.ndim)
            if dim != first.three:
                return None
            state = tuple(first.part(dim, role) for role in ("q", "k", "v"))
        elif key is operator.getitem and isinstance(first, _Packed) and first.three == 0 \
                and isinstance(node.args[1], int):
            state = first.part(0, ("q", "k", "v")[node.args[1]])
        elif key in _SOFTMAX and isinstance(first, _Scores):
            dim = args[1] if len(args) > 1 else node.kwargs.get("dim")
            state = first if dim is not None and norm_dim(dim, first.ndim) == first.ndim - 1 \
                else None
        elif key in _MATMUL and len(inputs) == 2 and isinstance(inputs[1], _Heads):
            state = _product(first, inputs[1])
        elif key is F.scaled_dot_product_attention:
            state = _sdpa(node, states, extra_set, extra_axis)
        elif key in ("view", "reshape", torch.reshape) and isinstance(first, _Scores):
            state = _reshaped(first, tensor_shape(node.args[0]), shape)
        elif key in _BIAS_OPS and len(args) == 2 and (
                isinstance(first, _Scores) or isinstance(first, _Part) and first.role in ("q", "k")):
            other = args[1]
            if isinstance(other, fx.Node) and tensor_shape(other) is not None:
                if other not in extra_set or not isinstance(first, _Scores) \
                        or not extra_axis(other, first):
                    return None
            elif key not in _SCALE_OPS:
                return None
            state = first
        if not state:
            return None
        states[node] = state
    return head_axes


def _moved(state: _Heads, node: fx.Node, key: Any) -> _Heads:
    """A tensor state through permute / transpose."""
    n = state.ndim
    if key in ("permute", torch.permute):
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) \
            else node.args[1:]
        dims = [norm_dim(d, n) for d in dims]
        where = {old: new for new, old in enumerate(dims)}
    else:
        a, b = norm_dim(node.args[1], n), norm_dim(node.args[2], n)
        where = {a: b, b: a}
    return state.moved(where)


def _product(a: Any, b: _Heads) -> _Heads | None:
    """q·kᵀ (features contracted, k transposed) gives scores; scores·v gives the heads' outputs."""
    if not isinstance(a, _Heads) or a.head != b.head or a.ndim != b.ndim or a.head >= a.ndim - 2:
        return None
    n = a.ndim
    if _is(a, "q") and _is(b, "k") and a.d == n - 1 and b.d == n - 2:
        return _Scores(head=a.head, ndim=n)
    if isinstance(a, _Scores) and _is(b, "v") and b.d == n - 1:
        return _Output(head=a.head, ndim=n, d=n - 1)
    return None


def _is(state: Any, role: str) -> bool:
    return isinstance(state, _Part) and state.role == role


def _sdpa(node: fx.Node, states: dict, extras: set, extra_axis) -> _Output | None:
    names = ("query", "key", "value", "attn_mask")
    given = dict(zip(names, node.args))
    given.update({k: v for k, v in node.kwargs.items() if k in names})
    q, k, v = (states.get(given.get(name)) for name in names[:3])
    if not (_is(q, "q") and _is(k, "k") and _is(v, "v")) or not q.head == k.head == v.head:
        return None
    n = q.ndim
    if q.d != n - 1 or k.d != n - 1 or v.d != n - 1 or q.head >= n - 2:
        return None
    mask = given.get("attn_mask")
    if isinstance(mask, fx.Node):
        if mask not in extras or not extra_axis(mask, q):
            return None
    return _Output(head=q.head, ndim=n, d=n - 1)


def _reshaped(state: _Scores, shape_in: tuple, shape_out: tuple) -> _Scores | None:
    """Scores through a view that keeps the head axis whole (e.g. (B·W, H, N, N) <-> (B, W, H, N, N))."""
    head = state.head
    before = math.prod(shape_in[:head])
    for j, n in enumerate(shape_out):
        if n == shape_in[head] and math.prod(shape_out[:j]) == before:
            if shape_out[-1] != shape_in[-1]:
                return None  # softmax runs over the last axis: keep it
            return _Scores(head=j, ndim=len(shape_out))
    return None
