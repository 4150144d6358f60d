"""Op rules of cat and stack: concatenation on the channel axis builds a composite layout (blocks
of its inputs), on any other axis, or stacked on a new one, the inputs share their layout."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from .api import Barrier, Context, arg, headed, norm_dim, register
from .elementwise import _pointwise_without_features, combined_parameters, pointwise
from .layout import MIXED, SHARED, UNTRACKED, Feat, Lazy, LazyCat, Stacked


@register(torch.cat, torch.concat, torch.concatenate, heads=True)
def cat(ctx: Context, node: fx.Node) -> Any:
    """Concatenation on the channel axis builds a composite layout; on another axis (tokens,
    batch) every input shares one space. Parameters concatenated (BEiT/EVA's q, k, v biases)
    stay parameters, each part tied to its piece of the layout that reads them."""
    tensors = list(arg(node, 0, "tensors"))
    ndim = len(ctx.shape(node))
    dim = norm_dim(arg(node, 1, "dim", 0), ndim)
    tensors = _nonempty(ctx, tensors, dim, ndim)
    if len(tensors) == 1:  # the others add no element: a copy of the one left
        return ctx.info(tensors[0])
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
    if not feats and any(isinstance(i, Lazy) for i in infos) \
            and all(isinstance(i, Lazy) or i is SHARED for i in infos):
        return _cat_parameters(infos, dim)
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


def _cat_parameters(infos: list, dim: int) -> Lazy:
    """Parameters (or values computed from them alone) and shared values concatenated on axis
    `dim`: a parameter value whose axis `dim` is MIXED (pieces of parameter axes, no whole one)
    and whose other axes keep every part's labels (HF BEiT puts its relative position bias
    table back together from interpolated and fixed rows; its heads axis still runs along
    the head space)."""
    def mixed(axes: tuple) -> list:
        return [MIXED if i == dim else a for i, a in enumerate(axes)]
    return combined_parameters([i.through(mixed) for i in infos if isinstance(i, Lazy)],
                               len(next(i for i in infos if isinstance(i, Lazy)).axes))


def _nonempty(ctx: Context, tensors: list, dim: int, ndim: int) -> list:
    """The tensors that give the concatenation elements: an empty part (Phi-3's partial rotary
    embedding with every feature rotated cats an empty pass-through slice to head_dim; torch's
    legacy empty 1-D tensors cat to anything) carries no channel to follow. All of them where
    every one is empty."""
    def empty(t: Any) -> bool:
        shape = ctx.shape(t)
        return shape is not None and (shape == (0,) and ndim != 1 or
                                      len(shape) == ndim and shape[dim] == 0)
    kept = [t for t in tensors if not empty(t)]
    return kept or tensors


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
