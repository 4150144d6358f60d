"""Op rules of elementwise and broadcasting ops — activations, arithmetic, dropout, `expand`,
`repeat`, PReLU, GLU: one space in and out; per-channel parameters they combine with are merged."""
from __future__ import annotations

import math
import operator
from dataclasses import replace
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import heads as head_rules
from .api import (Barrier, Context, ParamHandle, arg, headed, nodes_in, norm_dim, passthrough,
                  register, split_layout)
from .layout import SHARED, UNTRACKED, Feat, Lazy, Stacked


def pointwise(ctx: Context, node: fx.Node, operands: list[fx.Node] | None = None) -> Any:
    """Broadcasting elementwise op: every operand carrying the channel axis shares one space."""
    out_shape = ctx.shape(node)
    if out_shape is None:
        return None
    operands = nodes_in((node.args, node.kwargs)) if operands is None else operands
    head_rules.check_folds(ctx, node, operands)  # heads folded into the batch axis stay apart
    out_ndim = len(out_shape)
    infos = [ctx.info(op) for op in operands]
    stacks: dict[fx.Node, Feat] = {}
    if any(isinstance(i, Stacked) for i in infos):
        if len(operands) == 1:
            return infos[0]
        if not all(head_rules.plain_stack(i) for i in infos if isinstance(i, Stacked)):
            raise Barrier("combines a stack of attention parts with other values")
        # radix groups met element by element (split attention's weighted sum): one space
        stacks = {op: head_rules.unified_parts(ctx, i, op) for op, i in zip(operands, infos)
                  if isinstance(i, Stacked)}
    if any(headed(i) for i in infos):
        return head_rules.pointwise_headed(ctx, node, operands)
    feats: list[tuple[fx.Node, Feat, int]] = []
    gates: list[tuple[fx.Node, Feat]] = []
    for op in operands:
        info = stacks.get(op) or ctx.info(op)
        if isinstance(info, Feat):
            shape = ctx.shape(op)
            out_axis = info.axis + out_ndim - len(shape)
            if out_axis >= 0 and shape[info.axis] == 1 < out_shape[out_axis] and info.width == 1:
                gates.append((op, info))  # one channel broadcast over all (FocalNet's gates)
                continue
            if out_axis < 0 or out_shape[out_axis] != shape[info.axis]:
                raise Barrier(f"broadcasts the channel axis of '{op.name}' ({shape[info.axis]} "
                              f"channels) to {out_shape}")
            feats.append((op, info, out_axis))
    if gates and not feats:
        raise Barrier(f"broadcasts the one channel of '{gates[0][0].name}' over channels fxzip "
                      "cannot follow")
    for _, gate in gates:  # a per-position scalar of every channel: its feature stays itself
        ctx.pin(gate)
    if not feats:
        return _pointwise_without_features(ctx, operands, out_ndim)
    out_axis = feats[0][2]
    result = feats[0][1].moved(out_axis)
    for op, feat, axis in feats[1:]:
        if axis != out_axis:
            raise Barrier(f"combines channel axes at different positions ({out_axis} and {axis})")
        ctx.unify(result, feat)
    channels = out_shape[out_axis]
    for op in operands:
        info = stacks.get(op) or ctx.info(op)
        if isinstance(info, Feat):
            continue
        shape = ctx.shape(op)
        if shape is None:
            continue
        axis = out_axis - (out_ndim - len(shape))
        carries = axis >= 0 and shape[axis] == channels and channels > 1
        if not carries:
            continue  # broadcast along the channel axis, or a scalar-like tensor
        if info is SHARED:
            ctx.pin(result)  # a fixed per-channel constant: the space must keep identity matching
        else:
            if isinstance(info, Lazy) and info.fixed:  # a parameter times an input's channels
                ctx.pin(result)
            ctx.tie_param(op, axis, result)
    return result


def _pointwise_without_features(ctx: Context, operands: list[fx.Node], out_ndim: int) -> Any:
    """Shared values stay shared; one parameter combined with shared values or scalars stays a
    (derived) parameter, its axes aligned from the right; anything else is untracked."""
    infos = [ctx.info(op) for op in operands]
    lazies = [i for i in infos if isinstance(i, Lazy)]
    if all(i is SHARED or i is None for i in infos):
        return SHARED
    if lazies and all(i is SHARED or i is None or isinstance(i, Lazy) for i in infos):
        combined = combined_parameters(lazies, out_ndim)
        shaped = [ctx.shape(op) for op, i in zip(operands, infos) if i is SHARED]
        if any(shape is not None and math.prod(shape) > 1 for shape in shaped):
            # with an input's (or a constant's) own channels: whatever it meets keeps its order
            combined = replace(combined, fixed=True)
        return combined
    return UNTRACKED


def combined_parameters(lazies: list[Lazy], out_ndim: int) -> Lazy:
    """Parameters combined elementwise, their axes aligned from the right: the first one, with
    the others (and theirs) following it wherever its axes turn out to run."""
    def aligned(labels: tuple) -> tuple:
        return (None,) * (out_ndim - len(labels)) + tuple(labels)

    first = lazies[0]
    others = [(source, aligned(labels)) for source, labels in first.others]
    for lazy in lazies[1:]:
        others.append((lazy.source, aligned(lazy.axes)))
        others.extend((source, aligned(labels)) for source, labels in lazy.others)
    return Lazy(first.source, aligned(first.axes), tuple(others),
                any(lazy.fixed for lazy in lazies))


def first_operand(ctx: Context, node: fx.Node) -> Any:
    """Ops whose other tensor arguments only give dtype/device (`type_as`, `to`)."""
    return pointwise(ctx, node, [node.args[0]])


ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.Hardswish,
    nn.Hardsigmoid, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout,
)
ACTIVATION_FUNCTIONS = (
    F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.tanh, F.sigmoid, F.leaky_relu, F.hardswish,
    F.hardsigmoid, F.elu, F.selu, F.celu, F.mish, F.softplus, F.hardtanh, F.dropout, F.dropout1d,
    F.dropout2d, F.dropout3d, F.alpha_dropout, torch.relu, torch.relu_, torch.tanh, torch.sigmoid,
    torch.exp, torch.abs, torch.neg, torch.sqrt, torch.rsqrt, torch.square, torch.clamp,
    torch.clip, torch.pow, torch.sin, torch.cos, torch.log, torch.erf, torch.nn.functional.logsigmoid,
    torch.where, torch.maximum, torch.minimum, torch.lerp, torch.addcmul, torch.addcdiv,
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv, operator.neg, operator.pow, torch.add, torch.sub,
    torch.mul, torch.div, torch.true_divide, operator.and_, operator.or_, operator.xor,
    operator.invert, torch.logical_and, torch.logical_or, torch.logical_not,
    torch.Tensor.__and__, torch.Tensor.__or__, torch.Tensor.__xor__, torch.Tensor.__invert__,
)
ACTIVATION_METHODS = (
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "abs", "neg", "sqrt", "rsqrt",
    "square", "clamp", "clamp_", "clip", "pow", "sin", "cos", "log", "erf", "add", "add_", "sub",
    "sub_", "mul", "mul_", "div", "div_", "addcmul", "addcmul_", "contiguous", "clone", "detach",
    "float", "double", "half", "bfloat16", "cpu", "cuda", "expand_as", "masked_fill", "bool",
    "long", "int", "logical_and", "logical_or", "logical_not", "__and__", "__or__", "__xor__",
    "__invert__",
)
register(*ACTIVATION_MODULES, *ACTIVATION_FUNCTIONS, *ACTIVATION_METHODS, folds=True)(pointwise)
register("type_as", "to", folds=True)(first_operand)


def like(ctx: Context, node: fx.Node) -> Any:
    """`zeros_like(x)`, `x.new_ones(…)`, …: a tensor made from another's shape, dtype and device
    alone, never its values: the same in every model (DeBERTa-v3's unused zero position
    embeddings). Exported graphs keep these as ATen ops."""
    return SHARED


register(torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like,
         torch.ops.aten.zeros_like.default, torch.ops.aten.ones_like.default,
         torch.ops.aten.empty_like.default, torch.ops.aten.full_like.default,
         "new_zeros", "new_ones", "new_empty", "new_full", folds=True)(like)


def _expand_rule(ctx: Context, node: fx.Node) -> Any:
    return pointwise(ctx, node, [node.args[0]])


register("expand", folds=True)(_expand_rule)


@register("repeat", folds=True)
def repeat(ctx: Context, node: fx.Node) -> Any:
    """Tiling along other axes than the channels' (a position embedding repeated over the batch):
    one space; tiling the channel axis is a barrier. Heads tiled along their own axis (DeBERTa's
    relative position keys, one copy of every head per sample: `(H, P, d).repeat(B, 1, 1)`)
    are heads folded into the batch axis, the copies outer (`Feat.folded`); head_dim stays
    whole."""
    x = node.args[0]
    info = ctx.info(x)
    sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) \
        else node.args[1:]
    new = len(sizes) - len(ctx.shape(x))
    if not isinstance(info, Feat):
        if isinstance(info, Stacked):
            raise Barrier(f"tiles '{x.name}', a stack of attention parts")
        return passthrough(info, lambda axes: [None] * new + list(axes))
    if sizes[info.axis + new] != 1:
        raise Barrier(f"tiles the channel axis of '{x.name}'")
    if not info.headed:
        return info.moved(info.axis + new)
    tiled = sizes[info.head_axis + new] != 1
    if tiled and (info.repeat > 1 or info.heads < 2):
        raise Barrier(f"tiles the heads of '{x.name}', repeated key/value heads or one head")
    return replace(info.placed(info.axis + new, info.head_axis + new),
                   folded=info.folded or tiled)


@register(nn.PReLU)
def prelu(ctx: Context, node: fx.Node) -> Any:
    """PReLU: a per-channel slope when it has one parameter per channel on axis 1."""
    result = pointwise(ctx, node, [node.args[0]])
    module = ctx.module(node)
    if isinstance(result, Feat) and module.num_parameters > 1:
        if result.axis != 1:
            raise Barrier("PReLU slopes apply to axis 1 but the channels are elsewhere")
        ctx.tie(ParamHandle.of_module(node, module, "weight"), 0, result)
    return result


@register(nn.GLU, F.glu)
def glu(ctx: Context, node: fx.Node) -> Any:
    """GLU: the input cut in two halves along `dim`, the first gated by the sigmoid of the second,
    element j by element j. Along the channel axis, feature j of the first half meets feature j
    of the second, so both halves must be permuted alike: the producer's space is opened as two
    pieces (a SplitRequest where one space holds both halves), which are tied into one space, the
    output's. Along another axis the op is elementwise and keeps the layout."""
    x = node.args[0] if node.args else node.kwargs["input"]
    dim = ctx.module(node).dim if node.op == "call_module" else arg(node, 1, "dim", -1)
    info = ctx.info(x)
    shape = ctx.shape(x)
    dim = norm_dim(dim, len(shape))
    if not isinstance(info, Feat):
        return passthrough(info)  # a parameter's halves combined: no axis of it runs whole
    if dim != info.axis:
        return info
    first, second = split_layout(info, [shape[dim] // 2] * 2)
    ctx.unify(first, second)
    return first
