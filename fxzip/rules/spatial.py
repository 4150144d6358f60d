"""Op rules of spatial ops — pooling, interpolation, padding, rolling: they move or combine
positions, each channel on its own, so the channel axis keeps its space."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .api import Barrier, Context, arg, norm_dim, passthrough, register
from .layout import MIXED, Feat


def _per_channel_axes(kept: int, ndim: int) -> Callable[[tuple], list | None]:
    """The axis labels of a parameter after an op that keeps the number of axes and its first
    `kept` axes (batch, channels) and combines positions along the others: those are MIXED (a
    pooled or resized parameter axis is no whole one that a space could run along), the first
    ones keep their labels (HF BEiT interpolates its relative position bias table, heads on
    axis 1, over its positions)."""
    def remap(axes: tuple) -> list | None:
        if len(axes) != ndim:
            return None
        return list(axes[:kept]) + [None if a is None else MIXED for a in axes[kept:]]
    return remap


def spatial(ctx: Context, node: fx.Node) -> Any:
    """Pooling and resizing act per channel on the axes after axis 1."""
    x = node.args[0] if node.args else node.kwargs.get("input")
    info = ctx.info(x)
    if not isinstance(info, Feat):
        out, shape = ctx.shape(node), ctx.shape(x)
        same_rank = out is not None and shape is not None and len(out) == len(shape)
        return passthrough(info, _per_channel_axes(2, len(shape)) if same_rank else None)
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
