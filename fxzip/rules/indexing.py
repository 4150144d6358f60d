"""Op rules of indexing and splitting — getitem (slices, None, Ellipsis), split/chunk/tensor_split,
unbind: the channel axis kept whole, or cut between its spaces (tuples of channel infos); gather
by an index shared by the models, which moves positions only."""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from . import heads as head_rules
from .api import Barrier, Context, arg, headed, norm_dim, passthrough, register, split_layout
from .layout import MIXED, SHARED, UNTRACKED, Feat, Stacked


@register(operator.getitem, heads=True)
def getitem(ctx: Context, node: fx.Node) -> Any:
    """Indexing a tensor: allowed when the channel axis is kept whole."""
    x, index = node.args
    info = ctx.info(x)
    if isinstance(info, tuple):  # an element of split / chunk / unbind
        return info[index] if isinstance(index, int) else UNTRACKED
    if isinstance(info, Stacked):
        part = _stacked_part(info, index)
        if part is not None:
            return head_rules.without_axis(info.parts[part], info.axis)
        raise Barrier(f"indexes '{x.name}', a stack of attention parts, other than by one "
                      "part of its stack axis")
    if headed(info):
        return head_rules.index_headed(ctx, x, info, index if isinstance(index, tuple) else (index,))
    if not isinstance(info, Feat):
        return passthrough(info, lambda axes: _indexed_axes(ctx, axes, index, ctx.shape(x)))
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


def _stacked_part(info: Stacked, index: Any) -> int | None:
    """Which part of a stack of attention parts `index` picks whole: an int on the stack axis and
    whole slices elsewhere (`qkv[0]`, and torch.export's `select(qkv, 0, 0)` spelled `qkv[(0,)]`,
    or `qkv[:, 1]` for a stack on axis 1); None for any other index."""
    items = index if isinstance(index, tuple) else (index,)
    at = info.axis
    if len(items) <= at or not isinstance(items[at], int) or isinstance(items[at], bool) or \
            any(i != slice(None) for k, i in enumerate(items) if k != at):
        return None
    count = len(info.parts)
    return items[at] % count if -count <= items[at] < count else None


def _indexed_axes(ctx: Context, axes, index, shape: tuple | None) -> list | None:
    """Axis labels of a parameter (`axes`, of a tensor of `shape`) after indexing: by one
    integer tensor (`_gathered_axes`), or by ints, slices, None and Ellipsis
    (`_sliced_axes`)."""
    items = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, fx.Node) for i in items):
        return _gathered_axes(ctx, axes, items)
    return _sliced_axes(axes, items, shape)


def _sliced_axes(axes, items: tuple, shape: tuple | None) -> list | None:
    """Axis labels after basic indexing: an int drops its axis, None adds a constant one, a slice
    that keeps part of an axis makes it MIXED (a part of a parameter axis is no whole one that a
    space could run along: HF BEiT slices its relative position bias table's rows before
    interpolating them); a whole slice keeps the label."""
    explicit = sum(1 for i in items if i is not None and i is not Ellipsis)
    out, at = [], 0
    for item in items:
        if item is Ellipsis:
            skip = len(axes) - explicit
            out.extend(axes[at:at + skip])
            at += skip
        elif item is None:
            out.append(None)
        elif isinstance(item, int) and at < len(axes):
            at += 1
        elif isinstance(item, slice) and at < len(axes):
            whole = item == slice(None) or (
                shape is not None and all(isinstance(v, int) or v is None
                                          for v in (item.start, item.stop, item.step))
                and item.indices(shape[at]) == (0, shape[at], 1))
            out.append(axes[at] if whole or axes[at] is None else MIXED)
            at += 1
        else:
            return None
    return out + list(axes[at:])


def _gathered_axes(ctx: Context, axes, items: tuple) -> list | None:
    """Axis labels of a parameter indexed by one integer tensor (a relative position bias table
    gathered by a position index), on its first axis or after full slices (LeViT's
    `biases[:, idx]`): the index's axes are MIXED."""
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


# ---------------------------------------------------------------------------------------------
# gather: positions picked by an index shared by the models
# ---------------------------------------------------------------------------------------------

@register(torch.gather, "gather", folds=True)
def gather(ctx: Context, node: fx.Node) -> Any:
    """`torch.gather(x, dim, index)` picks positions along `dim`, element by element. With an
    index that is the same in every model (ids, relative positions) and the same for every
    channel (and head), it moves positions the way a slice does and every channel keeps its
    place: the layout is kept (DeBERTa gathers per-head scores by relative position). Along the
    channels, or with an index that differs per channel, it is a barrier."""
    x, index = node.args[0], arg(node, 2, "index")
    info, shape = ctx.info(x), ctx.shape(x)
    dim = norm_dim(arg(node, 1, "dim"), len(shape))
    if not isinstance(info, Feat):
        if isinstance(info, Stacked):
            raise Barrier(f"gathers from '{x.name}', a stack of attention parts")
        if info is SHARED:  # ids gathered by ids (BERT's token types): shared
            return SHARED if ctx.info(index) is SHARED else UNTRACKED
        return passthrough(info)
    if ctx.info(index) is not SHARED:
        raise Barrier(f"gathers from '{x.name}' by '{index.name}', an index that is not the same "
                      "in every model")
    own = [info.axis] + ([info.head_axis] if info.headed else [])
    if dim in own:
        raise Barrier(f"gathers along the channel or head axis of '{x.name}'")
    index_shape = ctx.shape(index)
    for axis in own:
        if index_shape[axis] != shape[axis] or not _constant_along(ctx, index, axis):
            raise Barrier(f"gathers from '{x.name}' by an index that differs from channel to "
                          "channel (or head to head)")
    return info


def _constant_along(ctx: Context, index: fx.Node, axis: int) -> bool:
    """Whether `index` holds the same values all along `axis`: it is expanded there from size 1
    or from an axis it did not have (followed through `expand` and `contiguous`)."""
    node, ndim = index, len(ctx.shape(index))
    while isinstance(node, fx.Node) and ctx.shape(node) is not None:
        shape = ctx.shape(node)
        at = axis - (ndim - len(shape))  # expand adds leading axes
        if at < 0 or shape[at] == 1:
            return True
        if node.op != "call_method" or node.target not in ("expand", "contiguous"):
            return False
        node = node.args[0]
    return False


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
