"""Op rules of parametrised layers — Linear, convolutions (dense, grouped, depthwise), Embedding,
and the norms BatchNorm, LayerNorm, RMSNorm, GroupNorm and InstanceNorm: producers, consumers and
per-channel parameters.

One rule per op, the module and the functional form alike: a module's parameters and a functional
call's get_attr arguments are the same to a rule (`ParamHandle`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .api import (Barrier, Context, ParamHandle, SplitRequest, arg, headed, norm_dim,
                  register)
from .elementwise import combined_parameters
from .layout import MIXED, SHARED, Block, Feat, Lazy, LazyCat


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


def _input_feat(ctx: Context, node: fx.Node, axis: int, what: str,
                x: fx.Node | None = None) -> Feat:
    """The channel info of a layer's input `x` (default: the first argument) on `axis`; shared
    inputs get an identity space."""
    x = node.args[0] if x is None else x
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
        # a layer over a parameter-derived value: the value's axis runs along its input columns.
        # Computed from buffers or constants (ConViT's Linear over relative positions), the
        # columns stay in place; from learned tables alone (DeBERTa's relative position
        # embeddings, normalised, read by the layer's own query and key projections), the axis
        # is a learned feature space like any other, merged with whatever the layer also reads
        size = shape[axis]
        feat = Feat(axis, (Block(ctx.uf.new(size), size),)) if _learned(ctx, info) \
            else ctx.pinned_feat(axis, size)
        ctx.tie_param(x, axis, feat)
        return feat
    raise Barrier(f"{what} reads '{x.name}', a value fxzip cannot follow per channel")


def _learned(ctx: Context, value: Lazy) -> bool:
    """Whether a parameter-derived value is computed from learned parameters alone (no buffers,
    no constants)."""
    params = {name for name, _ in ctx.gm.named_parameters(remove_duplicate=False)}
    sources = {value.source} | {name for name, _ in value.others}
    return all(n.target in params for n in ctx.gm.graph.nodes
               if n.op == "get_attr" and n.name in sources)


def _open(ctx: Context, node: fx.Node, call: LayerCall, feat_in: Feat, axis: int,
          groups: int = 1, transposed: bool = False) -> Feat:
    """A weight layer that reads `feat_in` (weight columns, U) and opens a new space on `axis`
    of its output (weight rows and bias, M). `transposed`: the weight is stored (in, out), so
    its axis 0 reads and its axis 1 opens (transformers' Conv1D, `torch.addmm`)."""
    weight, bias = call.params["weight"], call.params.get("bias")
    opens, reads = (1, 0) if transposed else (0, 1)  # the weight axes along output and input
    ctx.consume(node, call.x, feat_in)
    ctx.tie(weight, reads, feat_in, "U", groups=groups)
    pieces = ctx.info(bias.node) if bias is not None and bias.node is not None else None
    feat_out = ctx.produce(node, axis=axis, size=ctx.param_shape(weight)[opens],
                           key=ctx.space_key(weight),
                           pieces=pieces.sizes if isinstance(pieces, LazyCat) else None)
    ctx.tie(weight, opens, feat_out)
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


@register(torch.addmm)
def addmm(ctx: Context, node: fx.Node) -> Feat:
    """bias + x @ W with W a parameter of shape (in, out): a Linear whose weight is stored
    transposed (transformers' Conv1D in GPT-2, whose ATen op this is). Reads x's channels (W's
    rows, U) and opens a new space (W's columns and the bias, M). `beta` and `alpha` scale the
    bias and the product, which commutes with merging."""
    bias, x, weight = (arg(node, i, name) for i, name in enumerate(("input", "mat1", "mat2")))
    if not isinstance(ctx.info(weight), (Lazy, LazyCat)):
        raise Barrier(f"addmm multiplies by '{getattr(weight, 'name', weight)}', which is not a "
                      "parameter: fxzip follows addmm as a layer (bias + x @ W) only")
    if not isinstance(ctx.info(bias), (Lazy, LazyCat)) or len(ctx.shape(bias)) != 1:
        raise Barrier(f"addmm adds '{getattr(bias, 'name', bias)}', which is not a bias vector "
                      "(a parameter of one axis)")
    call = LayerCall(x, {"weight": ParamHandle.of_value(weight),
                         "bias": ParamHandle.of_value(bias)}, {}, "addmm")
    feat_in = _input_feat(ctx, node, -1, call.what, x=x)
    return _open(ctx, node, call, feat_in, axis=len(ctx.shape(node)) - 1, transposed=True)


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
    table's columns open a space (M); an output layer tied to it reads the same space (U), so
    the tied table becomes two merged tensors (`fxzip.graph.export.own_parameter_names`)."""
    call = layer_call(ctx, node, {"weight": 1}, {}, "F.embedding", "Embedding")
    if ctx.info(call.x) is not SHARED:
        raise Barrier(f"{call.what} looks up ids computed per model")
    weight = call.params["weight"]
    # its own key: a table also read by a Linear (tied output layer) opens the Linear's space
    # along its rows, the embedding's along its columns
    feat = ctx.produce(node, axis=len(ctx.shape(node)) - 1, size=ctx.param_shape(weight)[1],
                       key=f"{ctx.space_key(weight)}:embedding")
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
    return _norm_over_last_axis(ctx, node, call)


@register(nn.RMSNorm, F.rms_norm, heads=True)
def rms_norm(ctx: Context, node: fx.Node) -> Feat:
    """RMSNorm over the channel axis only (the last axis), as LayerNorm: its root mean square is
    a per-sample statistic that a merged model takes over its merged channels, and its
    per-channel weight is merged (M). Over head_dim (Qwen3's q/k norms) features stay in place
    within heads."""
    call = layer_call(ctx, node, {"weight": 2}, {"normalized_shape": (1, None)}, "rms_norm",
                      "RMSNorm")
    return _norm_over_last_axis(ctx, node, call)


def _norm_over_last_axis(ctx: Context, node: fx.Node, call: LayerCall) -> Feat:
    """A norm whose statistics run over the last axis alone (LayerNorm, RMSNorm): the channels
    keep their space and the per-channel parameters are merged. A tensor split into heads normed
    over head_dim keeps its features in place within heads (one weight serves every head)."""
    normalized = call.options["normalized_shape"]
    normalized = (normalized,) if isinstance(normalized, int) else normalized
    if len(normalized) != 1:
        raise Barrier(f"{call.what} over {tuple(normalized)} normalises across more than the "
                      "channel axis")
    info = ctx.info(call.x)
    if headed(info):
        if info.axis != len(ctx.shape(call.x)) - 1:
            raise Barrier(f"{call.what} over another axis than head_dim of a tensor split into "
                          "heads")
        ctx.fix_within(info)
        return info
    feat = _input_feat(ctx, node, -1, call.what)
    for param in call.params.values():
        ctx.tie(param, 0, feat)
    return feat


@register(nn.GroupNorm, F.group_norm)
def group_norm(ctx: Context, node: fx.Node) -> Feat:
    """GroupNorm: statistics per group of C/G consecutive channels, the per-channel affine merged.
    One group (a LayerNorm over C×H×W) or one group per channel constrain nothing; otherwise a
    channel must stay in its group, like a feature in its attention head: a space that spans
    several groups is split into that many heads (matched head to head, features free within a
    head); a space inside one group is free. A space cut by a group boundary is asked to be
    opened as pieces."""
    call = layer_call(ctx, node, {"weight": 2, "bias": 3}, {"num_groups": (1, None)},
                      "group_norm", "group_norm")
    groups, channels = call.options["num_groups"], ctx.shape(call.x)[1]
    feat = _input_feat(ctx, node, 1, call.what)
    if groups not in (1, channels):
        _keep_within_groups(ctx, feat, groups, channels)
    for param in call.params.values():
        ctx.tie(param, 0, feat)
    return feat


def _keep_within_groups(ctx: Context, feat: Feat, groups: int, channels: int) -> None:
    """Record that the channels of `feat` stay within their `groups` groups of consecutive
    channels: a block that spans whole groups is a head group of one head per group; a block
    inside one group is free; a block whose ends a group boundary cuts asks for its space to be
    opened as pieces (the ends apart from the whole groups in between)."""
    width = channels // groups
    if any(b.expand != 1 for b in feat.blocks):
        raise Barrier(f"GroupNorm with {groups} groups over channels repeated over positions")
    cuts: dict[int, set[int]] = {}
    spans: list[tuple[int, int]] = []
    for block, start in zip(feat.blocks, feat.offsets()):
        end = start + block.size
        inner = [c for c in range(width, channels, width) if start < c < end]
        if not inner:
            continue  # inside one group: its features may move freely
        ragged = ({inner[0] - start} if start % width else set()) | \
            ({inner[-1] - start} if end % width else set())
        if ragged:
            cuts.setdefault(block.space, set()).update(ragged)
        else:
            spans.append((block.space, block.size // width))
    if cuts:
        raise SplitRequest(f"GroupNorm with {groups} groups cuts a feature space at a group "
                           "boundary", cuts)
    for space, heads in spans:
        if not ctx.uf.is_pinned(space):  # a pinned space (the input) keeps every channel anyway
            ctx.head_group((space,), heads, "group norm")


@register(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, F.instance_norm)
def instance_norm(ctx: Context, node: fx.Node) -> Feat:
    """InstanceNorm: statistics per sample and channel on axis 1, so the channels keep their
    space; the affine parameters and running statistics (where kept) are merged per channel."""
    call = layer_call(ctx, node, {"running_mean": 1, "running_var": 2, "weight": 3, "bias": 4},
                      {}, "instance_norm")
    feat = _input_feat(ctx, node, 1, call.what)
    for param in call.params.values():
        ctx.tie(param, 0, feat)
    return feat
