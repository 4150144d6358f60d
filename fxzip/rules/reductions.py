"""Op rules of reductions and normalisations along an axis — mean/sum/amax/std/var, vector
norms, F.normalize, softmax: along tokens or positions they keep the space, along the channels
they are a barrier (but for per-sample statistics that merged models take over merged channels)."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import heads as head_rules
from .api import Barrier, Context, arg, norm_dim, passthrough, register
from .layout import UNTRACKED, Feat


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
    if info.folded and (dims is None or head_rules.folded_axis(info) in dims):
        raise Barrier(f"{what} over the axis of '{x.name}' that holds samples and attention "
                      "heads together (heads folded into the batch axis)")
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
          "mean", "sum", "amax", "amin", "std", "var", folds=True)
def reduction(ctx: Context, node: fx.Node) -> Any:
    """mean/sum/amax/… (dim is the second argument)."""
    return _reduce(ctx, node, 1, "reduces")


@register(torch.norm, torch.linalg.vector_norm, "norm", folds=True)
def vector_norm(ctx: Context, node: fx.Node) -> Any:
    """Norms (dim is the third argument, after p/ord), e.g. ConvNeXt-V2's global response norm."""
    return _reduce(ctx, node, 2, "takes the norm")


@register(F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, nn.Softmax, nn.LogSoftmax,
          "softmax", "log_softmax", folds=True)
def softmax(ctx: Context, node: fx.Node) -> Any:
    """Softmax along a non-channel axis is per channel; along the channel axis it keeps every
    feature in place (permutation-equivariant), so the space passes through (along head_dim it
    keeps features in place within heads)."""
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
    if info.folded and (dim is None or
                        norm_dim(dim, len(ctx.shape(x))) == head_rules.folded_axis(info)):
        raise Barrier(f"normalises over the axis of '{x.name}' that holds samples and attention "
                      "heads together (heads folded into the batch axis)")
    if info.headed:
        dim = None if dim is None else norm_dim(dim, len(ctx.shape(x)))
        if dim == info.head_axis:
            raise head_rules.radix_request(info, x, "normalises")
        if dim is None:
            raise Barrier(f"normalises over the heads of '{x.name}'")
        if dim == info.axis:
            ctx.fix_within(info)
        return info
    if dim is None:
        raise Barrier(f"normalises over the channel axis of '{x.name}'")
    # along the channel axis too: each output keeps its feature's place (permutation-equivariant),
    # a per-sample normalisation that merged models take over their merged channels
    return info


@register(F.normalize, folds=True)
def normalize(ctx: Context, node: fx.Node) -> Any:
    """x / ‖x‖ along `dim`: along tokens per channel; along the channels a per-sample statistic
    taken over the merged channels (as hand-written RMS norms), along head_dim per head."""
    x = node.args[0]
    info = ctx.info(x)
    if not isinstance(info, Feat):
        return passthrough(info, lambda axes: axes)
    dim = norm_dim(arg(node, 2, "dim", 1), len(ctx.shape(x)))
    if info.folded and dim == head_rules.folded_axis(info):
        raise Barrier(f"normalises over the axis of '{x.name}' that holds samples and attention "
                      "heads together (heads folded into the batch axis)")
    if info.headed and dim == info.head_axis:
        raise Barrier(f"normalises over the heads of '{x.name}'")
    return info
