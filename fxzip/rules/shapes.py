"""Op rules of shape ops — reshape/view/flatten/squeeze, permute/transpose, shape queries, pixel
(un)shuffle: they follow the channel axis wherever it moves (a flatten of C×H×W expands its
space)."""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from . import heads as head_rules
from .api import Barrier, Context, arg, headed, norm_dim, passthrough, register
from .layout import MIXED, Block, Feat, Flat, Stacked


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
    if info.folded:
        out = head_rules.reshape_head_space(ctx, info, shape_in, shape_out)
        if out is None:
            raise Barrier(f"reshapes '{x.name}', whose {info.width} attention heads are folded "
                          f"into the batch axis, {tuple(shape_in)} -> {tuple(shape_out)} across "
                          "its heads")
        return out
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
    if head_rules.head_space(ctx, info):  # scores (B, H, N, N) -> (B·H, N, N): heads folded
        folded = head_rules.reshape_head_space(ctx, info, shape_in, shape_out)
        if folded is not None:
            return folded
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
         torch.unflatten, "flatten", "view", "reshape", "squeeze", "unsqueeze", "view_as",
         "reshape_as", "unflatten", folds=True)(reshape_like)


@register(torch.permute, "permute", folds=True)
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


@register(torch.transpose, torch.swapaxes, "transpose", "swapaxes", "t", folds=True)
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


def shape_query(ctx: Context, node: fx.Node) -> None:
    """`size()`, `.shape`, `dim()`: plain Python values, no channels."""
    return None


register(getattr, "size", "dim", "numel", "ndimension", folds=True)(shape_query)


def _channels_at(ctx: Context, x: fx.Node, what: str) -> Feat | None:
    """The layout of a pixel (un)shuffle's input, whose channels must be on axis -3 (…, C, H, W);
    None for a value without features."""
    info = ctx.info(x)
    if not isinstance(info, Feat):
        return None
    if info.axis != len(ctx.shape(x)) - 3:
        raise Barrier(f"{what} reads '{x.name}', whose channels are not on axis -3")
    return info


def _factor(ctx: Context, node: fx.Node, name: str) -> int:
    """The upscale or downscale factor of a pixel (un)shuffle, module or function."""
    if node.op == "call_module":
        return getattr(ctx.module(node), name)
    return arg(node, 1, name)


@register(nn.PixelShuffle, torch.pixel_shuffle)
def pixel_shuffle(ctx: Context, node: fx.Node) -> Any:
    """(…, C·r², H, W) -> (…, C, H·r, W·r): each run of r² consecutive channels becomes one
    output channel spread over r×r positions. The runs move as wholes and their r² slots keep
    their places: a space of whole runs is split into C "heads" of r² fixed features (matched
    head to head), and the output channel is its head space, one feature per head. Channels
    repeated r² times in a row (a pixel unshuffle before) simply lose the repetition."""
    x = node.args[0]
    info = _channels_at(ctx, x, "pixel_shuffle")
    if info is None:
        return passthrough(ctx.info(x))
    slots = _factor(ctx, node, "upscale_factor") ** 2
    blocks = []
    for block in info.blocks:
        if block.expand % slots == 0:
            blocks.append(replace(block, expand=block.expand // slots))
        elif block.expand == 1 and block.size % slots == 0:
            blocks.append(_runs_as_heads(ctx, block, block.size // slots))
        else:
            raise Barrier(f"pixel_shuffle by {slots} channels cuts a run of channels of "
                          f"'{x.name}' between feature spaces")
    return Feat(info.axis, tuple(blocks))


def _runs_as_heads(ctx: Context, block: Block, heads: int) -> Block:
    """A block read as `heads` runs of consecutive channels that move as wholes, each run's
    channels in place: the block's space is a head group with a new head space (one feature per
    run), its features fixed within heads. Returns the head space's block; of a pinned space
    (the same in every model, e.g. the input), a pinned one."""
    if ctx.uf.is_pinned(block.space):
        return Block(ctx.uf.new(heads, pinned=True), heads)
    head = Block(ctx.uf.new(heads), heads)
    ctx.head_group((block.space, head.space), heads, "pixel shuffle")
    ctx.uf.fix(block.space)
    return head


@register(nn.PixelUnshuffle, torch.pixel_unshuffle)
def pixel_unshuffle(ctx: Context, node: fx.Node) -> Any:
    """(…, C, H·r, W·r) -> (…, C·r², H, W): each channel becomes r² consecutive channels (its
    r×r positions), as a flatten of C with the positions: the space expanded r² times."""
    x = node.args[0]
    info = _channels_at(ctx, x, "pixel_unshuffle")
    if info is None:
        return passthrough(ctx.info(x))
    return info.expanded(_factor(ctx, node, "downscale_factor") ** 2)
