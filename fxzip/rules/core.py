"""The core op rules: how torch's own ops relate the feature spaces of their inputs and output.

Elementwise and broadcasting ops, parametrised layers (Linear, convolutions, norms: one rule per
op, the module and the functional form alike through `ParamHandle`), pooling and resizing,
reductions, softmax, shape ops, split/chunk/unbind. Ops missing from the table are barriers as
soon as a channel-carrying tensor reaches them. The rule API is in `rule_api`.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import heads as head_rules
from .layout import MIXED, SHARED, UNTRACKED, Feat, Flat, Lazy, LazyCat, Stacked
from .api import (Barrier, Context, ParamHandle, SplitRequest, arg, headed, nodes_in,
                       norm_dim, passthrough, register, split_layout)


# ---------------------------------------------------------------------------------------------
# elementwise and broadcasting ops: one space in and out
# ---------------------------------------------------------------------------------------------

def pointwise(ctx: Context, node: fx.Node, operands: list[fx.Node] | None = None) -> Any:
    """Broadcasting elementwise op: every operand carrying the channel axis shares one space."""
    out_shape = ctx.shape(node)
    if out_shape is None:
        return None
    operands = nodes_in((node.args, node.kwargs)) if operands is None else operands
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
        return combined_parameters(lazies, out_ndim)
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
    return Lazy(first.source, aligned(first.axes), tuple(others))


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
register(*ACTIVATION_MODULES, *ACTIVATION_FUNCTIONS, *ACTIVATION_METHODS, heads=True)(pointwise)
register("type_as", "to", heads=True)(first_operand)


def _expand_rule(ctx: Context, node: fx.Node) -> Any:
    return pointwise(ctx, node, [node.args[0]])


register("expand", heads=True)(_expand_rule)


@register("repeat")
def repeat(ctx: Context, node: fx.Node) -> Any:
    """Tiling along other axes than the channels' (a position embedding repeated over the batch):
    one space; tiling the channel axis is a barrier."""
    x = node.args[0]
    info = ctx.info(x)
    sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) \
        else node.args[1:]
    new = len(sizes) - len(ctx.shape(x))
    if not isinstance(info, Feat):
        return passthrough(info, lambda axes: [None] * new + list(axes))
    if sizes[info.axis + new] != 1:
        raise Barrier(f"tiles the channel axis of '{x.name}'")
    return info.moved(info.axis + new)


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


# ---------------------------------------------------------------------------------------------
# parametrised layers: producers, consumers and per-channel parameters. A module's parameters
# and a functional call's get_attr arguments are the same to a rule (`ParamHandle`).
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerCall:
    """A parametrised layer call, module or functional, as its rule reads it: the input, the
    parameters it was given, its hyper-parameters, and the op's name for messages."""

    x: fx.Node
    params: dict[str, ParamHandle]
    options: dict[str, Any]
    what: str


def layer_call(ctx: Context, node: fx.Node, params: dict[str, int],
               options: dict[str, tuple[int, Any]], function_name: str,
               module_name: str | None = None) -> LayerCall:
    """Resolve a module or functional layer call. `params` maps each parameter to its position in
    the functional call, `options` each hyper-parameter to its position and default; a module has
    both as attributes of those names. Module parameters come in the order of `params`,
    functional ones in the order of the call's arguments."""
    if node.op == "call_module":
        module = ctx.module(node)
        handles = {name: ParamHandle.of_module(node, module, name) for name in params}
        values = {name: getattr(module, name) for name in options}
        what = module_name or type(module).__name__
    else:
        handles = {name: ParamHandle.of_value(arg(node, i, name))
                   for name, i in sorted(params.items(), key=lambda item: item[1])}
        values = {name: arg(node, i, name, default) for name, (i, default) in options.items()}
        what = function_name
    given = {name: handle for name, handle in handles.items() if handle is not None}
    return LayerCall(node.args[0], given, values, what)


def _input_feat(ctx: Context, node: fx.Node, axis: int, what: str) -> Feat:
    """The channel info of a layer's input on `axis`; shared inputs get an identity space."""
    x = node.args[0]
    info = ctx.info(x)
    shape = ctx.shape(x)
    axis = norm_dim(axis, len(shape))
    if isinstance(info, Feat):
        if info.axis != axis:
            raise Barrier(f"{what} reads axis {axis} but the channels of '{x.name}' are on axis "
                          f"{info.axis}")
        return info
    if info is SHARED:
        return ctx.pinned_feat(axis, shape[axis])
    if isinstance(info, Lazy) and info.axes[axis] not in (None, MIXED):
        # a layer over a parameter-derived value (ConViT's Linear over relative positions): its
        # input columns stay in place, the value's axis runs along them
        feat = ctx.pinned_feat(axis, shape[axis])
        ctx.tie_param(x, axis, feat)
        return feat
    raise Barrier(f"{what} reads '{x.name}', a value fxzip cannot follow per channel")


def _open(ctx: Context, node: fx.Node, call: LayerCall, feat_in: Feat, axis: int,
          groups: int = 1) -> Feat:
    """A weight layer that reads `feat_in` (weight columns, U) and opens a new space on `axis`
    of its output (weight rows and bias, M)."""
    weight, bias = call.params["weight"], call.params.get("bias")
    ctx.consume(node, call.x, feat_in)
    ctx.tie(weight, 1, feat_in, "U", groups=groups)
    pieces = ctx.info(bias.node) if bias is not None and bias.node is not None else None
    feat_out = ctx.produce(node, axis=axis, size=ctx.param_shape(weight)[0],
                           key=ctx.space_key(weight),
                           pieces=pieces.sizes if isinstance(pieces, LazyCat) else None)
    ctx.tie(weight, 0, feat_out)
    if bias is not None:
        ctx.tie(bias, 0, feat_out)
    return feat_out


@register(nn.Linear, F.linear)
def linear(ctx: Context, node: fx.Node) -> Feat:
    """Linear (module or F.linear): reads the last axis (weight columns, U) and opens a new space
    (rows and bias, M). A Linear over another axis than the channels' (MLP-Mixer's token
    mixing) acts per channel."""
    call = layer_call(ctx, node, {"weight": 1, "bias": 2}, {}, "F.linear", "Linear")
    info, shape = ctx.info(call.x), ctx.shape(call.x)
    if isinstance(info, Feat) and info.axis != len(shape) - 1:
        return _mix_aligned_axis(ctx, node, info, call)
    feat_in = _input_feat(ctx, node, -1, call.what)
    return _open(ctx, node, call, feat_in, axis=len(ctx.shape(node)) - 1)


def _mix_aligned_axis(ctx: Context, node: fx.Node, info: Feat, call: LayerCall) -> Feat:
    """A Linear that mixes positions (tokens) rather than channels applies the same weights to
    every channel: the channels keep their space. Positions mean the same in every model, so the
    weights are merged without matching (identity spaces: plain averaging)."""
    ndim = len(ctx.shape(node))
    weight, bias = call.params["weight"], call.params.get("bias")
    out_features, in_features = ctx.param_shape(weight)
    ctx.tie(weight, 1, ctx.pinned_feat(ndim - 1, in_features), "U")
    rows = ctx.pinned_feat(ndim - 1, out_features)
    ctx.tie(weight, 0, rows)
    if bias is not None:
        ctx.tie(bias, 0, rows)
    return info


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d, F.conv1d, F.conv2d, F.conv3d, torch.conv1d,
          torch.conv2d, torch.conv3d)
def conv(ctx: Context, node: fx.Node) -> Feat:
    """Dense convolution (module or F.convNd): input channels on axis 1 are read (U), output
    channels opened (M). Depthwise and grouped convolutions: see `depthwise`, `grouped_conv`."""
    call = layer_call(ctx, node, {"weight": 1, "bias": 2}, {"groups": (6, 1)}, "convolution")
    groups = call.options["groups"]
    info = ctx.info(call.x)
    if isinstance(info, Feat) and not info.headed and info.axis >= 2:
        return _slide_over_channels(ctx, node, call, info)
    in_channels, out_channels = ctx.shape(call.x)[1], ctx.param_shape(call.params["weight"])[0]
    if groups != 1 and groups == in_channels:
        return depthwise(ctx, node, call, out_channels // in_channels)
    if groups != 1:
        return grouped_conv(ctx, node, call, groups)
    return _open(ctx, node, call, _input_feat(ctx, node, 1, call.what), axis=1)


def _slide_over_channels(ctx: Context, node: fx.Node, call: LayerCall, info: Feat) -> Feat:
    """A convolution whose kernel slides along the channels (ECA's Conv1d over the pooled channel
    vector): each output is a fixed mix of neighbouring channels, so the channels must keep their
    order: the space is pinned (identity matching: merged by averaging feature i with feature i,
    never permuted). The convolution's own channel axis carries no features; its weights are
    averaged."""
    x = call.x
    if ctx.shape(node)[info.axis] != ctx.shape(x)[info.axis]:
        raise Barrier(f"{call.what} slides along the channels of '{x.name}' and changes their "
                      "number")
    ctx.pin(info)
    return info


def grouped_conv(ctx: Context, node: fx.Node, call: LayerCall, groups: int) -> Feat:
    """Grouped convolution: input and output channels split into `groups` groups, group i of the
    input feeding group i of the output only. Single spaces in and out are matched group to group
    (features stay in their group, both spaces pair groups alike), so the merged weight is
    block-diagonal again. Where either side holds several spaces (split attention's radix
    groups), every group must be whole spaces on both sides, which keep their places: a cut
    inside a space asks for it to be opened as pieces."""
    feat_in = _input_feat(ctx, node, 1, f"grouped {call.what}")
    if any(b.expand != 1 for b in feat_in.blocks):
        raise Barrier(f"grouped convolution (groups={groups}) reads channels repeated over "
                      "positions")
    feat_out = _open(ctx, node, call, feat_in, axis=1, groups=groups)
    if len(feat_in.blocks) == 1 and len(feat_out.blocks) == 1:
        ctx.head_group((feat_in.blocks[0].space, feat_out.blocks[0].space), groups,
                       "grouped convolution")
        return feat_out
    cuts: dict[int, set[int]] = {}
    for feat in (feat_in, feat_out):
        step = feat.width // groups
        bounds = set(range(step, feat.width, step))
        for block, start in zip(feat.blocks, feat.offsets()):
            inner = {c - start for c in bounds if start < c < start + block.size}
            if inner:
                cuts.setdefault(block.space, set()).update(inner)
    if cuts:
        raise SplitRequest(f"grouped convolution (groups={groups}) over channels of several "
                           "spaces: its groups must be whole spaces", cuts)
    return feat_out


def depthwise(ctx: Context, node: fx.Node, call: LayerCall, multiplier: int) -> Feat:
    """Depthwise convolution (groups == input channels): one space in and out, the per-channel
    kernels merged (M). With a depth multiplier k each input channel becomes k output channels
    in a row, i.e. the space expanded k times."""
    feat_in = _input_feat(ctx, node, 1, "depthwise convolution")
    feat_out = feat_in if multiplier == 1 else feat_in.expanded(multiplier)
    for param in call.params.values():
        ctx.tie(param, 0, feat_out)
    return feat_out


@register(nn.Embedding, F.embedding)
def embedding(ctx: Context, node: fx.Node) -> Feat:
    """A lookup table (token embeddings): the looked-up ids are the same in every model, the
    table's columns open a space (M); an output layer tied to it reads the same space."""
    call = layer_call(ctx, node, {"weight": 1}, {}, "F.embedding", "Embedding")
    if ctx.info(call.x) is not SHARED:
        raise Barrier(f"{call.what} looks up ids computed per model")
    weight = call.params["weight"]
    feat = ctx.produce(node, axis=len(ctx.shape(node)) - 1, size=ctx.param_shape(weight)[1],
                       key=ctx.space_key(weight))
    ctx.tie(weight, 1, feat)
    return feat


@register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, F.batch_norm)
def batch_norm(ctx: Context, node: fx.Node) -> Feat:
    """BatchNorm: per-channel on axis 1; affine parameters and running statistics are merged."""
    call = layer_call(ctx, node, {"weight": 3, "bias": 4, "running_mean": 1, "running_var": 2},
                      {}, "batch_norm")
    if isinstance(ctx.info(call.x), Lazy):
        return _standardised_parameter(ctx, node, call)
    feat = _input_feat(ctx, node, 1, call.what)
    for param in call.params.values():
        ctx.tie(param, 0, feat)
    return feat


def _standardised_parameter(ctx: Context, node: fx.Node, call: LayerCall) -> Lazy:
    """batch_norm over a parameter (timm's weight standardisation: a conv weight reshaped to
    (1, out, in·k·k), standardised per output channel, scaled by a per-channel gain): a value
    computed from parameters. Its axes keep the weight's labels — the statistics of a row are
    the same whatever order its elements come in, so a permutation of the input channels
    commutes with it — and the per-channel parameters follow axis 1 (the weight's rows)."""
    x = ctx.info(call.x)
    ndim = len(ctx.shape(call.x))
    per_channel = []
    for name, param in call.params.items():
        info = ctx.info(param.node) if param.node is not None else None
        if not isinstance(info, Lazy) or len(info.axes) != 1:
            raise Barrier(f"{call.what} standardises a parameter with a {name} fxzip cannot "
                          "follow per channel")
        per_channel.append(info.through(lambda axes: (None,) + tuple(axes)
                                        + (None,) * (ndim - 2)))
    return combined_parameters([x, *per_channel], ndim)


@register(nn.LayerNorm, F.layer_norm, heads=True)
def layer_norm(ctx: Context, node: fx.Node) -> Feat:
    """LayerNorm over the channel axis only (the last axis): per-channel affine merged. Over
    head_dim (q/k norms) its weight is shared by the heads: features stay in place within heads
    (its parameters are averaged as they are)."""
    call = layer_call(ctx, node, {"weight": 2, "bias": 3}, {"normalized_shape": (1, None)},
                      "layer_norm", "LayerNorm")
    normalized = call.options["normalized_shape"]
    if len(normalized) != 1:
        raise Barrier(f"{call.what} over {tuple(normalized)} normalises across more than the "
                      "channel axis")
    info = ctx.info(call.x)
    if headed(info):
        if info.axis != len(ctx.shape(call.x)) - 1:
            raise Barrier(f"{call.what} over another axis than head_dim of a tensor split into heads")
        ctx.fix_within(info)
        return info
    feat = _input_feat(ctx, node, -1, call.what)
    for param in call.params.values():
        ctx.tie(param, 0, feat)
    return feat


@register(nn.GroupNorm, F.group_norm)
def group_norm(ctx: Context, node: fx.Node) -> Feat:
    """GroupNorm with one group (a LayerNorm over C×H×W) or one group per channel: the
    per-channel affine merged; other groupings normalise within groups of channels."""
    call = layer_call(ctx, node, {"weight": 2, "bias": 3}, {"num_groups": (1, None)},
                      "group_norm", "group_norm")
    groups, channels = call.options["num_groups"], ctx.shape(call.x)[1]
    if groups not in (1, channels):
        raise Barrier(f"GroupNorm with {groups} groups of {channels} channels normalises within "
                      "groups; zipping supports 1 group or one group per channel")
    feat = _input_feat(ctx, node, 1, call.what)
    for param in call.params.values():
        ctx.tie(param, 0, feat)
    return feat


# ---------------------------------------------------------------------------------------------
# spatial ops: pooling, interpolation (channel axis 1 untouched)
# ---------------------------------------------------------------------------------------------

def spatial(ctx: Context, node: fx.Node) -> Any:
    """Pooling and resizing act per channel on the axes after axis 1."""
    x = node.args[0] if node.args else node.kwargs.get("input")
    info = ctx.info(x)
    if not isinstance(info, Feat):
        return passthrough(info)
    if info.axis != 1:
        raise Barrier(f"pools or resizes '{x.name}' whose channels are on axis {info.axis}, not 1")
    return info


register(
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d, nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, F.upsample,
    torch.max_pool1d, torch.max_pool2d, torch.avg_pool1d, torch.adaptive_avg_pool1d,
)(spatial)


# ---------------------------------------------------------------------------------------------
# reductions and softmax over non-channel axes
# ---------------------------------------------------------------------------------------------

def _reduced_dims(node: fx.Node, ndim: int, position: int) -> list[int] | None:
    dim = arg(node, position, "dim")
    if dim is None:
        return None
    dims = [dim] if isinstance(dim, int) else list(dim)
    return sorted(norm_dim(d, ndim) for d in dims)


def _reduce(ctx: Context, node: fx.Node, dim_position: int, what: str) -> Any:
    """A reduction whose `dim` is argument `dim_position` and `keepdim` the next one: over
    spatial/token axes it keeps the space; over the channels it is a barrier, except a mean over
    the channels alone with keepdim, a per-sample statistic (global response norm, hand-written
    layer norms) that merged models take over their merged channels, as LayerNorm does."""
    x = node.args[0]
    info = ctx.info(x)
    ndim = len(ctx.shape(x))
    dims = _reduced_dims(node, ndim, dim_position)
    keepdim = bool(arg(node, dim_position + 1, "keepdim", False))
    if head_rules.plain_stack(info) and dims is not None:
        if info.axis not in dims:
            if any(p.axis in dims for p in info.parts):
                raise Barrier(f"{what} over the channel axis of '{x.name}'")
            return info if keepdim else head_rules.moved_by(info, _after_reducing(ndim, dims))
        info = head_rules.unified_parts(ctx, info, x)  # radix groups summed: one space
    if not isinstance(info, Feat):
        return passthrough(info)
    if info.headed:
        if dims is not None and info.head_axis in dims and info.axis not in dims:
            raise head_rules.radix_request(info, x, what)
        if dims is None or info.head_axis in dims:
            raise Barrier(f"{what} over the heads of '{x.name}'")
        if info.axis in dims:  # a per-head statistic over head_dim (RMS q/k norms)
            if not keepdim:
                raise Barrier(f"{what} over head_dim of '{x.name}' without keepdim")
            return info.head_only()
        return info if keepdim else head_rules.without_axes(info, dims)
    if dims == [info.axis] and keepdim and node.target in (torch.mean, "mean"):
        return UNTRACKED
    if dims is None or info.axis in dims:
        raise Barrier(f"{what} over the channel axis of '{x.name}'")
    return info.moved(info.axis if keepdim else info.axis - sum(d < info.axis for d in dims))


def _after_reducing(ndim: int, dims: list[int]) -> dict[int, int]:
    """Where each axis that a reduction over `dims` (without keepdim) keeps ends up."""
    kept = [i for i in range(ndim) if i not in dims]
    return {old: new for new, old in enumerate(kept)}


@register(torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var,
          "mean", "sum", "amax", "amin", "std", "var", heads=True)
def reduction(ctx: Context, node: fx.Node) -> Any:
    """mean/sum/amax/… (dim is the second argument)."""
    return _reduce(ctx, node, 1, "reduces")


@register(torch.norm, torch.linalg.vector_norm, "norm", heads=True)
def vector_norm(ctx: Context, node: fx.Node) -> Any:
    """Norms (dim is the third argument, after p/ord), e.g. ConvNeXt-V2's global response norm."""
    return _reduce(ctx, node, 2, "takes the norm")


@register(F.pad)
def pad(ctx: Context, node: fx.Node) -> Any:
    """Padding of trailing axes that leaves the channel axis alone (e.g. Swin's windows)."""
    x = node.args[0]
    info = ctx.info(x)
    if not isinstance(info, Feat):
        return passthrough(info)
    ndim = len(ctx.shape(x))
    widths = arg(node, 1, "pad")
    padded = range(ndim - len(widths) // 2, ndim)
    if info.axis in padded and any(widths[2 * (ndim - 1 - info.axis): 2 * (ndim - info.axis)]):
        raise Barrier(f"pads the channel axis of '{x.name}'")
    return info


@register(torch.roll, "roll")
def roll(ctx: Context, node: fx.Node) -> Any:
    """Cyclic shift of positions (Swin's shifted windows); rolling the channel axis is a barrier."""
    x = node.args[0]
    info = ctx.info(x)
    if not isinstance(info, Feat):
        return passthrough(info, lambda axes: axes)
    dims = arg(node, 2, "dims")
    ndim = len(ctx.shape(x))
    dims = [dims] if isinstance(dims, int) else list(dims) if dims is not None else None
    if dims is None or info.axis in [norm_dim(d, ndim) for d in dims]:
        raise Barrier(f"rolls the channel axis of '{x.name}'")
    return info


@register(F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, nn.Softmax, nn.LogSoftmax,
          "softmax", "log_softmax", heads=True)
def softmax(ctx: Context, node: fx.Node) -> Any:
    """Softmax along a non-channel axis is per channel; along the channel axis it is a barrier
    (along head_dim it keeps features in place within heads)."""
    x = node.args[0]
    info = ctx.info(x)
    dim = ctx.module(node).dim if node.op == "call_module" else arg(node, 1, "dim")
    if head_rules.plain_stack(info) and dim is not None:
        if norm_dim(dim, len(ctx.shape(x))) != info.axis:
            if any(p.axis == norm_dim(dim, len(ctx.shape(x))) for p in info.parts):
                raise Barrier(f"normalises over the channel axis of '{x.name}'")
            return info
        return head_rules.unified_parts(ctx, info, x)  # softmax over radix groups: one space
    if not isinstance(info, Feat):
        return passthrough(info, lambda axes: axes)
    if info.headed:
        dim = None if dim is None else norm_dim(dim, len(ctx.shape(x)))
        if dim == info.head_axis:
            raise head_rules.radix_request(info, x, "normalises")
        if dim is None:
            raise Barrier(f"normalises over the heads of '{x.name}'")
        if dim == info.axis:
            ctx.fix_within(info)
        return info
    if dim is None or norm_dim(dim, len(ctx.shape(x))) == info.axis:
        raise Barrier(f"normalises over the channel axis of '{x.name}'")
    return info


# ---------------------------------------------------------------------------------------------
# shape ops: follow the channel axis
# ---------------------------------------------------------------------------------------------

def reshape_like(ctx: Context, node: fx.Node) -> Any:
    """Any reshape, followed by shapes: the channel axis may move, merge with size-1 axes, or be
    flattened with the axes after it (an expanded space); splitting it is a barrier."""
    x = node.args[0]
    info = ctx.info(x)
    shape_in, shape_out = ctx.shape(x), ctx.shape(node)
    if isinstance(info, Stacked):
        stack, info = info, head_rules.collapsed(ctx, info)  # parts that are one layout: copies
        if info is None and head_rules.plain_stack(stack):
            raise Barrier(f"reshapes '{x.name}', {len(stack.parts)} groups of channels of "
                          "different spaces, across its groups (e.g. a channel shuffle)")
        if info is None:
            raise Barrier(f"reshapes '{x.name}', a stack of attention parts")
    if not isinstance(info, Feat):
        return passthrough(info, lambda axes: reshape_axes(axes, shape_in, shape_out))
    if info.headed:
        return head_rules.reshape_headed(ctx, info, shape_in, shape_out, x)
    a, channels = info.axis, ctx.shape(x)[info.axis]
    before = math.prod(shape_in[:a])
    for j in range(len(shape_out)):
        if math.prod(shape_out[:j]) != before or shape_out[j] % channels or shape_out[j] == 0:
            continue
        if channels > 1 and shape_out[j] == 1:
            continue
        factor = shape_out[j] // channels
        if _is_prefix_product(shape_in[a + 1:], factor):
            return info.moved(j) if factor == 1 else info.expanded(factor).moved(j)
    repeated = _merged_from_before(info, shape_in, shape_out)
    if repeated is not None:
        return repeated
    parts = head_rules.stack_of_parts(ctx, info, shape_in, shape_out)
    if parts is not None:
        return parts
    split = head_rules.split_into_heads(ctx, node, info, shape_in, shape_out)
    if split is not None:
        return split
    raise Barrier(f"reshapes '{x.name}' {tuple(shape_in)} -> {tuple(shape_out)}, splitting or "
                  "scattering its channel axis")


def _merged_from_before(info: Feat, shape_in: tuple, shape_out: tuple) -> Feat | None:
    """The channel axis flattened with axes BEFORE it (Swin's patch merging: (…, 2, 2, C) ->
    (…, 4·C)): the channel layout repeated once per position, as consecutive blocks."""
    a = info.axis
    end = math.prod(shape_in[:a + 1])
    for j in range(len(shape_out)):
        if math.prod(shape_out[:j + 1]) != end:
            continue
        factor = shape_out[j] // shape_in[a]
        if shape_out[j] % shape_in[a] or factor < 2 or math.prod(shape_out[:j]) * factor \
                != math.prod(shape_in[:a]):
            return None
        return Feat(j, info.blocks * factor)
    return None


def reshape_axes(axes, shape_in, shape_out) -> list:
    """Axis labels through a (contiguous) reshape. The input is read as a row of atoms (its
    axes, a `Flat` axis as its parts; size-1 axes left out): an output axis that spans atoms
    whole gets the one atom's label, or a `Flat` of several (None if none carries a label, and
    for size-1 axes); an axis that cuts an atom is MIXED if any atom it touches carries a label
    (else None)."""
    atoms: list[tuple[Any, int]] = []
    for label, n in zip(axes, shape_in):
        if isinstance(label, Flat) and math.prod(size for _, size in label.parts) == n:
            atoms.extend(label.parts)
        elif n != 1:
            atoms.append((label, n))
    bounds, at = [1], 1  # the element stride at which each atom starts, and the total
    for _, n in atoms:
        at *= n
        bounds.append(at)
    labels, lo = [], 1
    for n in shape_out:
        hi = lo * n
        if n == 1:
            labels.append(None)
            continue
        if lo in bounds and hi in bounds:
            inside = atoms[bounds.index(lo):bounds.index(hi)]
            if all(label is None for label, _ in inside):
                labels.append(None)
            else:
                labels.append(inside[0][0] if len(inside) == 1 else Flat(tuple(inside)))
        else:
            touched = [label for (label, m), start in zip(atoms, bounds)
                       if start < hi and lo < start * m]
            labels.append(MIXED if any(a is not None for a in touched) else None)
        lo = hi
    return labels


def _is_prefix_product(dims: tuple[int, ...], value: int) -> bool:
    product = 1
    if value == 1:
        return True
    for d in dims:
        product *= d
        if product == value:
            return True
        if product > value:
            return False
    return False


register(torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, nn.Flatten, nn.Unflatten,
         "flatten", "view", "reshape", "squeeze", "unsqueeze", "view_as", "reshape_as",
         heads=True)(reshape_like)


@register(torch.permute, "permute", heads=True)
def permute(ctx: Context, node: fx.Node) -> Any:
    x = node.args[0]
    info = ctx.info(x)
    dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) \
        else node.args[1:] or node.kwargs.get("dims")
    ndim = len(ctx.shape(x))
    dims = [norm_dim(d, ndim) for d in dims]
    if isinstance(info, Stacked) or headed(info):
        return head_rules.moved_by(info, {old: new for new, old in enumerate(dims)})
    if not isinstance(info, Feat):
        return passthrough(info, lambda axes: [axes[d] for d in dims])
    return info.moved(dims.index(info.axis))


@register(torch.transpose, torch.swapaxes, "transpose", "swapaxes", "t", heads=True)
def transpose(ctx: Context, node: fx.Node) -> Any:
    x = node.args[0]
    info = ctx.info(x)
    ndim = len(ctx.shape(x))
    if node.target == "t":
        d0, d1 = 0, 1
    else:
        d0, d1 = norm_dim(arg(node, 1, "dim0"), ndim), norm_dim(arg(node, 2, "dim1"), ndim)
    swap = {d0: d1, d1: d0}
    if isinstance(info, Stacked) or headed(info):
        return head_rules.moved_by(info, swap)
    if not isinstance(info, Feat):
        return passthrough(info, lambda axes: [axes[swap.get(i, i)] for i in range(len(axes))])
    return info.moved(swap.get(info.axis, info.axis))


@register(torch.cat, torch.concat, torch.concatenate, heads=True)
def cat(ctx: Context, node: fx.Node) -> Any:
    """Concatenation on the channel axis builds a composite layout; on another axis (tokens,
    batch) every input shares one space. Parameters concatenated (BEiT/EVA's q, k, v biases)
    stay parameters, each part tied to its piece of the layout that reads them."""
    tensors = list(arg(node, 0, "tensors"))
    ndim = len(ctx.shape(node))
    dim = norm_dim(arg(node, 1, "dim", 0), ndim)
    infos = [ctx.info(t) for t in tensors]
    feats = [i for i in infos if isinstance(i, Feat)]
    if any(isinstance(i, Stacked) for i in infos):
        raise Barrier("concatenates a stack of attention parts")
    if any(i.headed for i in feats):
        return _cat_headed(ctx, node, tensors, infos, dim)
    if not feats and len(tensors) > 1 and all(isinstance(i, Lazy) for i in infos) \
            and all(len(i.axes) == 1 and i.axes[0] == 0 for i in infos):
        return LazyCat(dim, tuple(t.name for t in tensors),
                       tuple(ctx.shape(t)[dim] for t in tensors))
    if not feats:
        return _pointwise_without_features(ctx, tensors, ndim) if len(tensors) == 1 else \
            (SHARED if all(i is SHARED for i in infos) else UNTRACKED)
    if all(f.axis == dim for f in feats):
        blocks = []
        for t, info in zip(tensors, infos):
            if isinstance(info, Feat):
                blocks.extend(info.blocks)
            elif info is SHARED:
                blocks.extend(ctx.pinned_feat(dim, ctx.shape(t)[dim]).blocks)
            else:
                raise Barrier(f"concatenates '{t.name}', which fxzip cannot follow per channel, "
                              "on the channel axis")
        return Feat(dim, tuple(blocks))
    return pointwise(ctx, node, tensors)


def _cat_headed(ctx: Context, node: fx.Node, tensors: list, infos: list, dim: int) -> Any:
    """Tensors split into heads concatenated along tokens (a cls token kept out of rotary
    embeddings) share their layout; along head_dim (rotate-half), their head space remains."""
    first = next(i for i in infos if headed(i))
    shift = len(ctx.shape(node)) - len(ctx.shape(tensors[infos.index(first)]))
    if dim == first.head_axis + shift:
        raise Barrier("concatenates attention heads")
    if dim != first.axis + shift:
        return pointwise(ctx, node, tensors)
    head = None
    for t, info in zip(tensors, infos):
        if not isinstance(info, Feat):
            raise Barrier(f"concatenates '{t.name}' to head_dim of attention heads")
        part = ctx.fix_within(info) if info.headed else info
        if head is None:
            head = part
        else:
            ctx.unify(head, part)
    return head


@register(torch.stack, heads=True)
def stack(ctx: Context, node: fx.Node) -> Any:
    """Stacking equally laid out tensors on a new axis (rotary embeddings' pairs)."""
    tensors = list(arg(node, 0, "tensors"))
    ndim = len(ctx.shape(node))
    dim = norm_dim(arg(node, 1, "dim", 0), ndim)
    infos = [ctx.info(t) for t in tensors]
    if not any(isinstance(i, Feat) for i in infos):
        return SHARED if all(i is SHARED for i in infos) else UNTRACKED
    if any(not isinstance(i, Feat) or ctx.shape(t) != ctx.shape(tensors[0])
           for t, i in zip(tensors, infos)):
        raise Barrier("stacks features with values fxzip cannot follow per channel")
    first = infos[0]
    for info in infos[1:]:
        ctx.unify(first, info)

    def shift(axis: int) -> int:
        return axis + (axis >= dim)
    if first.headed:
        return first.placed(shift(first.axis), shift(first.head_axis))
    return first.moved(shift(first.axis))


@register(F.normalize, heads=True)
def normalize(ctx: Context, node: fx.Node) -> Any:
    """x / ‖x‖ along `dim`: along tokens per channel; along the channels a per-sample statistic
    taken over the merged channels (as hand-written RMS norms), along head_dim per head."""
    x = node.args[0]
    info = ctx.info(x)
    if not isinstance(info, Feat):
        return passthrough(info, lambda axes: axes)
    dim = norm_dim(arg(node, 2, "dim", 1), len(ctx.shape(x)))
    if info.headed and dim == info.head_axis:
        raise Barrier(f"normalises over the heads of '{x.name}'")
    return info


@register(operator.getitem, heads=True)
def getitem(ctx: Context, node: fx.Node) -> Any:
    """Indexing a tensor: allowed when the channel axis is kept whole."""
    x, index = node.args
    info = ctx.info(x)
    if isinstance(info, tuple):  # an element of split / chunk / unbind
        return info[index] if isinstance(index, int) else UNTRACKED
    if isinstance(info, Stacked):
        if isinstance(index, int) and info.axis == 0:
            return head_rules.without_axis(info.parts[index], 0)
        raise Barrier(f"indexes '{x.name}', a stack of attention parts, other than by its first axis")
    if headed(info):
        return head_rules.index_headed(ctx, x, info, index if isinstance(index, tuple) else (index,))
    if not isinstance(info, Feat):
        return passthrough(info, lambda axes: _indexed_axes(ctx, axes, index))
    index = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, fx.Node) for i in index):
        raise Barrier("indexes with a tensor")
    ndim = len(ctx.shape(x))
    explicit = sum(1 for i in index if i is not None and i is not Ellipsis)
    in_dim, out_dim, new_axis = 0, 0, None
    for item in index:
        if item is Ellipsis:
            skip = ndim - explicit
            if in_dim <= info.axis < in_dim + skip:
                new_axis = out_dim + info.axis - in_dim
            in_dim, out_dim = in_dim + skip, out_dim + skip
        elif item is None:
            out_dim += 1
        elif isinstance(item, int):
            if in_dim == info.axis:
                raise Barrier(f"picks one channel of '{x.name}'")
            in_dim += 1
        elif isinstance(item, slice):
            if in_dim == info.axis:
                if item != slice(None):
                    info = _channel_slice(info, item, ctx.shape(x)[info.axis], x)
                new_axis = out_dim
            in_dim, out_dim = in_dim + 1, out_dim + 1
        else:
            raise Barrier(f"indexes '{x.name}' with {item!r}")
    if new_axis is None:
        new_axis = out_dim + info.axis - in_dim
    return info.moved(new_axis)


def _indexed_axes(ctx: Context, axes, index) -> list | None:
    """Axis labels of a parameter indexed by one integer tensor (a relative position bias table
    gathered by a position index), on its first axis or after full slices (LeViT's
    `biases[:, idx]`): the index's axes are MIXED."""
    items = index if isinstance(index, tuple) else (index,)
    lead = 0
    while lead < len(items) and items[lead] == slice(None):
        lead += 1
    if lead != len(items) - 1 or not isinstance(items[lead], fx.Node) \
            or ctx.shape(items[lead]) is None:
        return None
    return list(axes[:lead]) + [MIXED] * len(ctx.shape(items[lead])) + list(axes[lead + 1:])


def _channel_slice(info: Feat, item: slice, width: int, x: fx.Node) -> Feat:
    """The blocks a contiguous slice of the channel axis takes (cut between blocks, or asking for
    the cut spaces to be opened as pieces)."""
    start, stop, step = item.indices(width)
    if step != 1 or stop <= start:
        raise Barrier(f"slices the channel axis of '{x.name}' with a step or to nothing")
    sizes = [s for s in (start, stop - start, width - stop) if s > 0]
    pieces = split_layout(info, sizes)
    return pieces[1] if start > 0 else pieces[0]


def shape_query(ctx: Context, node: fx.Node) -> None:
    """`size()`, `.shape`, `dim()`: plain Python values, no channels."""
    return None


register(getattr, "size", "dim", "numel", "ndimension", heads=True)(shape_query)


# ---------------------------------------------------------------------------------------------
# split / chunk / unbind: tuples of channel infos
# ---------------------------------------------------------------------------------------------

def _split_sizes(node: fx.Node, size: int) -> list[int]:
    """Piece sizes of torch.split(x, size_or_sections) or torch.chunk(x, chunks)."""
    name = node.target if isinstance(node.target, str) else node.target.__name__
    if name == "tensor_split":
        how = arg(node, 1, "indices_or_sections", arg(node, 1, "sections", arg(node, 1, "indices")))
        if isinstance(how, int):
            return [size // how + (i < size % how) for i in range(how)]
        bounds = [0, *how, size]
        return [b - a for a, b in zip(bounds, bounds[1:])]
    if name == "chunk":
        step = -(-size // arg(node, 1, "chunks"))
        return [min(step, size - i) for i in range(0, size, step)]
    how = arg(node, 1, "split_size_or_sections", arg(node, 1, "split_size"))
    if isinstance(how, int):
        return [min(how, size - i) for i in range(0, size, how)]
    return list(how)


@register(torch.split, torch.chunk, "split", "chunk", torch.tensor_split, "tensor_split",
          heads=True)
def split(ctx: Context, node: fx.Node) -> Any:
    x = node.args[0]
    info = ctx.info(x)
    shape = ctx.shape(x)
    dim = norm_dim(arg(node, 2, "dim", 0), len(shape))
    sizes = _split_sizes(node, shape[dim])
    if isinstance(info, Stacked):
        if dim != info.axis:
            raise Barrier("splits a stack of attention parts along another axis than the stack's")
        return tuple(info.parts[i] if size == 1 else UNTRACKED for i, size in enumerate(sizes))
    if headed(info):
        if dim == info.head_axis:
            raise Barrier(f"splits the attention heads of '{x.name}'")
        if dim == info.axis:  # pieces of head_dim: [q | k | v] within each head
            return tuple(ctx.fix_within(info) for _ in sizes)
        return tuple(info for _ in sizes)
    if not isinstance(info, Feat):
        return tuple(passthrough(info, lambda axes: axes) for _ in sizes)
    if dim != info.axis:
        return tuple(info for _ in sizes)
    return tuple(split_layout(info, sizes))


@register(torch.unbind, "unbind", heads=True)
def unbind(ctx: Context, node: fx.Node) -> Any:
    x = node.args[0]
    info = ctx.info(x)
    shape = ctx.shape(x)
    dim = norm_dim(arg(node, 1, "dim", 0), len(shape))
    if isinstance(info, Stacked):
        return head_rules.unbind_stacked(info, dim, shape[dim])
    if headed(info):
        if dim in (info.axis, info.head_axis):
            raise Barrier(f"unbinds the heads or head_dim of '{x.name}'")
        return tuple(head_rules.without_axis(info, dim) for _ in range(shape[dim]))
    if not isinstance(info, Feat):
        return tuple(passthrough(info, lambda axes: axes[:dim] + axes[dim + 1:])
                     for _ in range(shape[dim]))
    if dim == info.axis:
        raise Barrier("unbinds the channel axis")
    axis = info.axis - (dim < info.axis)
    return tuple(info.moved(axis) for _ in range(shape[dim]))
