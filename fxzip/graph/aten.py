"""ATen ops as the torch calls fxzip's op-rule table knows: an exported graph (`fxzip.graph.export`)
speaks ATen (`aten.linear.default`, `aten.slice.Tensor`, `aten.batch_norm.default`, ...), symbolic
traces speak `F.linear`, `x[:, 1:]`, `F.batch_norm`. One table, `ATEN`, says for each ATen op
which torch call computes the same, with the arguments in that call's order, so that a module,
its functional form and its ATen op share one rule, and the merged model of an exported graph
calls plain torch functions. ATen ops that only assert (`_assert_tensor_metadata`) are dropped;
ops outside the table stay as they are (harmless where they read no per-model features).
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F

__all__ = ["ATEN", "functional_from_aten"]

aten = torch.ops.aten


class Call(NamedTuple):
    """The torch call an ATen call becomes: fx op ("call_function" or "call_method"), target,
    positional and keyword arguments."""

    op: str
    target: Any
    args: tuple
    kwargs: dict


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _same(target: Callable, keep: int | None = None, method: bool = False
          ) -> Callable[[tuple, dict], Call]:
    """The same positional arguments (the first `keep` of them) and keywords."""
    def convert(args: tuple, kwargs: dict) -> Call:
        return Call("call_method" if method else "call_function", target,
                    tuple(args if keep is None else args[:keep]), dict(kwargs))
    return convert


def _index(dim: int, item: Any) -> tuple:
    """The getitem index that picks `item` on axis `dim`."""
    return (slice(None),) * dim + (item,)


def _rsub(args: tuple, kwargs: dict) -> Call:
    """rsub(x, other, alpha) = other - alpha * x: `other - x` where alpha is 1 (what `1 - x`
    exports as); otherwise the ATen op as it is."""
    alpha = _arg(args, kwargs, 2, "alpha", 1)
    if alpha != 1:
        return Call("call_function", torch.ops.aten.rsub.Tensor if isinstance(args[1], fx.Node)
                    else torch.ops.aten.rsub.Scalar, tuple(args), dict(kwargs))
    return Call("call_function", operator.sub, (args[1], args[0]), {})


def _slice(args: tuple, kwargs: dict) -> Call:
    x, dim = args[0], _arg(args, kwargs, 1, "dim", 0)
    start, end = _arg(args, kwargs, 2, "start"), _arg(args, kwargs, 3, "end")
    step = _arg(args, kwargs, 4, "step", 1)
    end = None if isinstance(end, int) and end >= 2 ** 62 else end  # "to the end"
    start = None if start == 0 else start
    return Call("call_function", operator.getitem,
                (x, _index(dim, slice(start, end, None if step == 1 else step))), {})


def _select(args: tuple, kwargs: dict) -> Call:
    return Call("call_function", operator.getitem,
                (args[0], _index(_arg(args, kwargs, 1, "dim"), _arg(args, kwargs, 2, "index"))),
                {})


def _index_tensor(args: tuple, kwargs: dict) -> Call:
    indices = tuple(slice(None) if i is None else i for i in _arg(args, kwargs, 1, "indices"))
    return Call("call_function", operator.getitem, (args[0], indices), {})


def _embedding(args: tuple, kwargs: dict) -> Call:  # aten: (weight, indices, ...)
    return Call("call_function", F.embedding, (args[1], args[0]), {})


def _batch_norm(args: tuple, kwargs: dict) -> Call:
    # aten: (input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn)
    x, weight, bias, mean, var, training, momentum, eps = args[:8]
    return Call("call_function", F.batch_norm, (x, mean, var, weight, bias, training, momentum,
                                                eps), {})


def _instance_norm(args: tuple, kwargs: dict) -> Call:
    # aten: (input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, cudnn)
    x, weight, bias, mean, var, use_input_stats, momentum, eps = args[:8]
    return Call("call_function", F.instance_norm, (x, mean, var, weight, bias, use_input_stats,
                                                   momentum, eps), {})


def _einsum(args: tuple, kwargs: dict) -> Call:
    """aten: (equation, [operands], *, path): `torch.einsum(equation, *operands)`, the form
    `fxzip.graph.capture.einsums_as_matmuls` rewrites where it is a batched matrix product."""
    return Call("call_function", torch.einsum, (args[0], *_arg(args, kwargs, 1, "tensors")), {})


def _new(name: str) -> Callable[[tuple, dict], Call]:
    """`x.new_zeros(size, *, dtype, layout, device, pin_memory)` and its kind: a tensor of
    `x`'s dtype and device, with none of its values."""
    def convert(args: tuple, kwargs: dict) -> Call:
        keep = {k: v for k, v in kwargs.items() if k in ("dtype", "device") and v is not None}
        return Call("call_method", name, tuple(args), keep)
    return convert


def _to(args: tuple, kwargs: dict) -> Call:
    """`x.to(...)`: a dtype and/or device, whatever the overload."""
    keep = {k: v for k, v in kwargs.items() if k in ("dtype", "device", "non_blocking", "copy")}
    rest = tuple(a for a in args[1:] if isinstance(a, (torch.dtype, torch.device, str)))
    return Call("call_method", "to", (args[0], *rest), keep)


def _reduction(target: Callable) -> Callable[[tuple, dict], Call]:
    """mean/sum over dims: (x, dim, keepdim, *, dtype)."""
    def convert(args: tuple, kwargs: dict) -> Call:
        x, dim = args[0], _arg(args, kwargs, 1, "dim")
        keepdim = _arg(args, kwargs, 2, "keepdim", False)
        return Call("call_function", target, (x, dim, keepdim), {})
    return convert


def _softmax(target: Callable) -> Callable[[tuple, dict], Call]:
    def convert(args: tuple, kwargs: dict) -> Call:
        return Call("call_function", target, (args[0], _arg(args, kwargs, 1, "dim")), {})
    return convert


def _pool(target: Callable, names: tuple[str, ...]) -> Callable[[tuple, dict], Call]:
    """A pooling op: the input, then its options by name (aten and F agree on their order)."""
    def convert(args: tuple, kwargs: dict) -> Call:
        options = {name: value for name, value in zip(names, args[1:])}
        options.update({k: v for k, v in kwargs.items() if k in names})
        return Call("call_function", target, (args[0],), options)
    return convert


def _interpolate(mode: str) -> Callable[[tuple, dict], Call]:
    """upsample_<mode>.vec(x, output_size, [align_corners,] scale_factors) as F.interpolate."""
    def convert(args: tuple, kwargs: dict) -> Call:
        options = {"size": _arg(args, kwargs, 1, "output_size"), "mode": mode}
        scales = args[-1] if len(args) > 2 else kwargs.get("scale_factors")
        if scales is not None:
            options["scale_factor"] = scales
        if mode != "nearest":
            options["align_corners"] = _arg(args, kwargs, 2, "align_corners", False)
        if options["size"] is None:
            del options["size"]
        return Call("call_function", F.interpolate, (args[0],), options)
    return convert


def _inplace(function: Callable) -> Callable[[tuple, dict], Call]:
    """An in-place activation (`aten.silu_`) as the functional form with `inplace=True`, which
    `route_through_inplace_ops` then makes visible to the graph (as for symbolic traces)."""
    def convert(args: tuple, kwargs: dict) -> Call:
        return Call("call_function", function, tuple(args), {**kwargs, "inplace": True})
    return convert


_POINTWISE = ("relu", "relu_", "tanh", "sigmoid", "neg", "exp", "log", "sqrt", "rsqrt", "sin",
              "cos", "abs", "erf", "square", "reciprocal")
_BINARY = ("add", "sub", "mul", "div", "pow", "maximum", "minimum")
_ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu, "hardtanh": F.hardtanh, "hardswish": F.hardswish,
                "hardsigmoid": F.hardsigmoid, "leaky_relu": F.leaky_relu, "elu": F.elu,
                "mish": F.mish, "softplus": F.softplus}

ATEN: dict[Any, Callable[[tuple, dict], Call]] = {
    aten.linear.default: _same(F.linear),
    aten.conv1d.default: _same(F.conv1d), aten.conv2d.default: _same(F.conv2d),
    aten.conv3d.default: _same(F.conv3d), aten.conv1d.padding: _same(F.conv1d),
    aten.conv2d.padding: _same(F.conv2d), aten.conv3d.padding: _same(F.conv3d),
    aten.layer_norm.default: _same(F.layer_norm, keep=5),
    aten.group_norm.default: _same(F.group_norm, keep=5),
    aten.batch_norm.default: _batch_norm,
    aten.embedding.default: _embedding,
    aten.dropout.default: _same(F.dropout),
    aten.scaled_dot_product_attention.default: _same(F.scaled_dot_product_attention),
    aten.matmul.default: _same(torch.matmul), aten.bmm.default: _same(torch.bmm),
    aten.mm.default: _same(torch.mm), aten.addmm.default: _same(torch.addmm),
    aten.view.default: _same("view", method=True), aten._unsafe_view.default: _same("view", method=True),
    aten.reshape.default: _same(torch.reshape),
    aten.expand.default: _same("expand", method=True),
    aten.repeat.default: _same("repeat", method=True),
    aten.contiguous.default: _same("contiguous", keep=1, method=True),
    aten.clone.default: _same("clone", keep=1, method=True),
    aten.transpose.int: _same(torch.transpose), aten.t.default: _same(torch.t),
    aten.swapaxes.default: _same(torch.transpose), aten.swapdims.default: _same(torch.transpose),
    aten.permute.default: _same(torch.permute), aten.unsqueeze.default: _same(torch.unsqueeze),
    aten.squeeze.dim: _same(torch.squeeze), aten.squeeze.dims: _same(torch.squeeze),
    aten.flatten.using_ints: _same(torch.flatten), aten.unflatten.int: _same(torch.unflatten),
    aten.einsum.default: _einsum,
    **{getattr(aten, name).default: _new(name)
       for name in ("new_zeros", "new_ones", "new_empty", "new_full")},
    aten.cat.default: _same(torch.cat), aten.stack.default: _same(torch.stack),
    aten.split.Tensor: _same(torch.split), aten.split_with_sizes.default: _same(torch.split),
    aten.chunk.default: _same(torch.chunk), aten.unbind.int: _same(torch.unbind),
    aten.slice.Tensor: _slice, aten.select.int: _select, aten.index.Tensor: _index_tensor,
    aten.mean.dim: _reduction(torch.mean), aten.sum.dim_IntList: _reduction(torch.sum),
    aten.amax.default: _reduction(torch.amax),
    aten.softmax.int: _softmax(torch.softmax), aten._softmax.default: _softmax(torch.softmax),
    aten.log_softmax.int: _softmax(torch.log_softmax),
    aten._log_softmax.default: _softmax(torch.log_softmax),
    aten.adaptive_avg_pool1d.default: _pool(F.adaptive_avg_pool1d, ("output_size",)),
    aten.adaptive_avg_pool2d.default: _pool(F.adaptive_avg_pool2d, ("output_size",)),
    aten.avg_pool2d.default: _pool(F.avg_pool2d, ("kernel_size", "stride", "padding",
                                                  "ceil_mode", "count_include_pad")),
    aten.max_pool2d.default: _pool(F.max_pool2d, ("kernel_size", "stride", "padding",
                                                  "dilation", "ceil_mode")),
    aten.sym_size.int: _same("size", method=True),
    aten.linalg_vector_norm.default: _same(torch.linalg.vector_norm),
    aten.addcmul.default: _same(torch.addcmul),
    aten.expand_as.default: _same("expand_as", method=True),
    aten.avg_pool1d.default: _same(F.avg_pool1d),
    aten.rsub.Scalar: _rsub, aten.rsub.Tensor: _rsub,
    aten.clamp_min.default: lambda args, kwargs: Call("call_function", torch.clamp,
                                                      (args[0],), {"min": args[1]}),
    aten.div_.Tensor: _same("div_", method=True),
    aten.to.dtype: _to, aten.to.device: _to, aten.to.dtype_layout: _to, aten._to_copy.default: _to,
    **{getattr(aten, name).default: _same(getattr(torch, name)) for name in _POINTWISE},
    **{getattr(aten, name).default: _same(function) for name, function in _ACTIVATIONS.items()},
    **{getattr(getattr(aten, name), overload): _same(getattr(torch, name))
       for name in _BINARY for overload in ("Tensor", "Scalar", "Tensor_Scalar", "Tensor_Tensor")
       if hasattr(getattr(aten, name), overload)},
    aten.add_.Tensor: _same("add_", method=True), aten.mul_.Tensor: _same("mul_", method=True),
    aten.type_as.default: _same("type_as", method=True),
    aten.rms_norm.default: _same(F.rms_norm), aten.instance_norm.default: _instance_norm,
    aten.glu.default: _same(F.glu), aten.pixel_shuffle.default: _same(torch.pixel_shuffle),
    aten.pixel_unshuffle.default: _same(torch.pixel_unshuffle),
    aten.dropout_.default: _inplace(F.dropout),
    aten.reshape_as.default: _same("reshape_as", method=True),
    aten.view_as.default: _same("view_as", method=True),
    **{getattr(aten, f"{name}_").default: _inplace(function)
       for name, function in {"silu": F.silu, "hardswish": F.hardswish, "relu6": F.relu6,
                              "hardsigmoid": F.hardsigmoid, "hardtanh": F.hardtanh,
                              "leaky_relu": F.leaky_relu, "elu": F.elu}.items()
       if hasattr(aten, f"{name}_")},
    aten.pad.default: _same(F.pad), aten.constant_pad_nd.default: _same(F.pad),
    aten.upsample_bilinear2d.vec: _interpolate("bilinear"),
    aten.upsample_bicubic2d.vec: _interpolate("bicubic"),
    aten.upsample_nearest2d.vec: _interpolate("nearest"),
    aten.gather.default: _same(torch.gather), aten.roll.default: _same(torch.roll),
    aten.where.self: _same(torch.where), aten.clamp.default: _same(torch.clamp),
    aten.masked_fill.Scalar: _same("masked_fill", method=True),
    aten.masked_fill.Tensor: _same("masked_fill", method=True),
}
# ops that compute nothing the model returns: assertions on shapes, dtypes, ranges
DROPPED = {aten._assert_tensor_metadata.default, aten._assert_scalar.default,
           aten.sym_constrain_range_for_size.default}
# ops whose result is their input (as far as values go)
IDENTITY = {aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default,
            aten.detach_.default}  # detach_: in place, on a lifted constant (DeBERTa's scale)


def functional_from_aten(gm: fx.GraphModule) -> int:
    """Replace every ATen call of `ATEN` in `gm` by its torch call (same node name, same meta),
    drop assertions and aliases; return how many nodes changed. The graph computes the same."""
    graph, changed = gm.graph, 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in DROPPED and not node.users:
            graph.erase_node(node)
        elif node.target in IDENTITY:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif node.target in ATEN:
            call = ATEN[node.target](tuple(node.args), dict(node.kwargs))
            name = node.name
            node._rename(f"{name}_aten")
            with graph.inserting_before(node):
                new = graph.create_node(call.op, call.target, call.args, call.kwargs, name=name)
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
        else:
            continue
        changed += 1
    graph.lint()
    gm.recompile()
    return changed
