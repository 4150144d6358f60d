"""Attention heads, followed op by op: the rules and helpers for tensors split into heads.

A reshape that splits a channel axis into (heads, head_dim) makes a *headed* layout (`Feat` with a
head axis, see `layout.Feat`): its spaces are split into heads that are matched head to head (a
head group), with a head space of one feature per head. Ops over tokens keep it; permutes move
both axes; a matmul or `scaled_dot_product_attention` that contracts head_dim ties the two
operands' spaces and leaves the head space (scores), which per-head tables (relative position
biases) and talking-heads Linears read like any per-channel tensor; scores times values give the
values' headed layout back, and the reshape that merges heads gives their channels back. (The
rules of those products are in `attention`.)

Where values within a head are combined in a fixed way — rotary embeddings, norms over
head_dim with a weight shared by the heads, attention over channels — the spaces are *fixed*:
heads may still be paired, but features stay in place within heads (`Context.fix_within`). A
tensor whose head_dim axis is cut or resized then (rotate-half slices) is left with its head
space alone. The rules of elementwise, shape, indexing and reduction ops call the helpers here
for headed inputs; this module imports only the rule API and the layouts.

Heads folded into the batch axis — `(B, H, N, d) -> (B·H, N, d)` for `torch.bmm` (DeBERTa,
hand-written attention in the style of `F.multi_head_attention_forward`), or heads tiled with
`repeat` — are still heads (`Feat.folded`): the folded axis is a batch axis whose element
f·H + h is head h, heads permuted as wholes within every f alike. Products, softmax over
another axis, scaling, gathers by positions and masks that are the same for every (sample,
head) act per element of it; the reshape that cuts it at the heads gives the head axis back.
Only rules registered with `folds=True` see folded layouts; anything that would mix the folded
axis (a reduction over it, a value that varies along it) is a barrier.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
import torch.fx as fx

from .api import (Barrier, Context, SplitRequest, arg, folded, headed, norm_dim, register,
                  split_layout)
from .layout import SHARED, Feat, Lazy, Stacked


# ---------------------------------------------------------------------------------------------
# reshapes: split channels into heads, merge them back, keep them
# ---------------------------------------------------------------------------------------------

def _kept(shape_in: tuple, axis: int, shape_out: tuple) -> int | None:
    """The output axis that input axis `axis` survives as, whole, through a reshape; None if it
    is merged with or split into others."""
    before = math.prod(shape_in[:axis])
    for j, n in enumerate(shape_out):
        if n == shape_in[axis] and math.prod(shape_out[:j]) == before:
            if n == 1 and shape_in[axis] == 1:
                return None
            return j
    return None


def split_into_heads(ctx: Context, node: fx.Node, info: Feat, shape_in: tuple,
                     shape_out: tuple) -> Any:
    """As `_split`; every head space it opens gets its statistics here (a tap on the head axis),
    so that it has a tensor that every model computes whatever reads it later."""
    split = _split(ctx, info, shape_in, shape_out)
    if split is None:
        return _split_folded(ctx, node, info, shape_in, shape_out)
    for part in split.parts if isinstance(split, Stacked) else [split]:
        ctx.consume(node, node, part.head_only())
    return split


def _split_folded(ctx: Context, node: fx.Node, info: Feat, shape_in: tuple,
                  shape_out: tuple) -> Feat | None:
    """A plain layout's channel axis reshaped into (H, d) with the heads folded into the batch
    axis at once ((N, B, H·d) -> (N, B·H, d), as `F.multi_head_attention_forward` does): a
    folded headed layout, whose head space is read on the input, each head's d channels its
    samples. None if the reshape is not that."""
    a, width = info.axis, shape_in[info.axis]
    before, after = math.prod(shape_in[:a]), math.prod(shape_in[a + 1:])
    if len(info.blocks) != 1 or info.blocks[0].expand != 1:
        return None
    for j in range(len(shape_out) - 1):
        outer, heads = math.prod(shape_out[:j]), math.prod(shape_out[:j + 1]) // before
        if heads < 2 or heads * before != math.prod(shape_out[:j + 1]) or \
                shape_out[j] == heads or shape_out[j] % heads or before % outer or \
                heads * shape_out[j + 1] != width or shape_out[j + 1] < 2 or \
                math.prod(shape_out[j + 2:]) != after:
            continue
        split = ctx.split_heads(info, j + 1, j, heads)
        x = node.args[0]
        ctx.consume(node, x, Feat(a, (replace(split.head, expand=width // heads),)))
        return replace(split, folded=True)
    return None


def _split(ctx: Context, info: Feat, shape_in: tuple, shape_out: tuple) -> Any:
    """A plain layout's channel axis reshaped into (H, d) — a headed layout — or into (n, H, d)
    with n equal parts ([q | k | v] of a fused projection) — a stack of headed layouts. None if
    the reshape is neither."""
    a, width = info.axis, shape_in[info.axis]
    before, after = math.prod(shape_in[:a]), math.prod(shape_in[a + 1:])
    for j in range(len(shape_out) - 1):
        if math.prod(shape_out[:j]) != before:
            continue
        for span in (2, 3):
            if j + span > len(shape_out) or math.prod(shape_out[j:j + span]) != width \
                    or math.prod(shape_out[j + span:]) != after:
                continue
            if span == 2:
                heads, d = shape_out[j], shape_out[j + 1]
                if heads == 1 or d == 1 or len(info.blocks) != 1:
                    continue
                return ctx.split_heads(info, j + 1, j, heads)
            parts, heads, d = shape_out[j:j + 3]
            if parts == 1 or d == 1:
                continue
            pieces = split_layout(info, [heads * d] * parts)
            if any(len(p.blocks) != 1 for p in pieces):
                raise Barrier("splits channels into parts that hold several feature spaces")
            return Stacked(j, tuple(ctx.split_heads(p, j + 2, j + 1, heads) for p in pieces))
    return None


def reshape_headed(ctx: Context, info: Feat, shape_in: tuple, shape_out: tuple,
                   x: fx.Node | None = None) -> Feat:
    """A headed layout through a reshape: heads merged back into channels (head axis right before
    head_dim), or both axes kept whole; a reshape of head_dim alone leaves the head space. Heads
    merged with a broadcast axis after them (`k[:, :, None].expand(B, K, n, N, d).reshape(B,
    K·n, N, d)`, transformers' `repeat_kv`) are repeated n times (grouped-query attention).
    Heads merged with the axes before them are folded into the batch axis (`Feat.folded`); a
    reshape that cuts a folded axis right before its heads unfolds them."""
    a, ha = info.axis, info.head_axis
    if info.folded and info.repeat > 1:
        raise Barrier(f"reshapes repeated key/value heads folded into the batch axis "
                      f"{tuple(shape_in)} -> {tuple(shape_out)}")
    n = None if info.folded else _expanded_after_heads(ctx, x, info, shape_in)
    if n is not None:
        merged = shape_in[:ha] + (shape_in[ha] * n,) + shape_in[ha + 2:]
        if tuple(shape_out) == merged:
            shift = lambda i: i - (i > ha)  # noqa: E731
            return replace(info.placed(shift(a), ha), repeat=info.repeat * n)
    if info.repeat > 1:
        if _kept(shape_in, ha, shape_out) is not None and _kept(shape_in, a, shape_out) is not None:
            return info.placed(_kept(shape_in, a, shape_out), _kept(shape_in, ha, shape_out))
        raise Barrier(f"reshapes repeated key/value heads {tuple(shape_in)} -> {tuple(shape_out)}")
    if ha == a - 1 and len(info.blocks) == 1:
        # what precedes the heads (a folded axis' samples included) stays before them
        before = math.prod(shape_in[:ha + 1]) // info.heads
        after = math.prod(shape_in[a + 1:])
        width = info.heads * shape_in[a]
        for j, n in enumerate(shape_out):
            if n == width and math.prod(shape_out[:j]) == before \
                    and math.prod(shape_out[j + 1:]) == after:
                return Feat(j, info.blocks)
    j_in = _kept(shape_in, a, shape_out)
    j_head, fold = (None, False) if info.folded else (_kept(shape_in, ha, shape_out), False)
    if j_head is None:
        j_head, fold = _heads_after_fold(shape_in, ha, shape_out, info.heads)
    if j_head is not None and j_in is not None:
        return replace(info.placed(j_in, j_head), folded=fold)
    if j_head is not None:
        return replace(ctx.fix_within(info), axis=j_head, folded=fold)
    raise Barrier(f"reshapes a tensor split into {info.heads} attention heads "
                  f"{tuple(shape_in)} -> {tuple(shape_out)} across its head axis")


def _heads_after_fold(shape_in: tuple, ha: int, shape_out: tuple,
                      heads: int) -> tuple[int | None, bool]:
    """Where the heads on axis `ha` (alone, or folded: the heads inner) go through a reshape that
    keeps them whole as the inner part of one output axis: (that axis, whether it is folded —
    longer than the heads, the axes before them merged into it), or (None, False). The heads'
    run of elements ends where axis `ha` ends; the output axis must end there too and hold a
    whole number of head runs."""
    if heads < 2:
        return None, False
    end = math.prod(shape_in[:ha + 1])
    for j, n in enumerate(shape_out):
        if n >= heads and n % heads == 0 and math.prod(shape_out[:j + 1]) == end:
            return j, n != heads
    return None, False


def head_space(ctx: Context, info: Feat) -> bool:
    """Whether a plain layout is one head space alone (one feature per head of a head group:
    attention scores, per-head values), which a reshape may fold into the batch axis."""
    if info.headed or len(info.blocks) != 1 or info.blocks[0].expand != 1:
        return False
    block = info.blocks[0]
    root = ctx.uf.find(block.space)
    return any(heads == block.size and root in {ctx.uf.find(s) for s in spaces}
               for spaces, heads, _ in ctx.all_head_groups())


def reshape_head_space(ctx: Context, info: Feat, shape_in: tuple,
                       shape_out: tuple) -> Feat | None:
    """A head space alone (scores (B, H, N, N)) through a reshape that keeps its heads whole:
    folded into the batch axis with the axes before it ((B·H, N, N)), or a folded one unfolded
    or kept folded. None if the reshape does neither (a folded layout's barrier is the
    caller's)."""
    j, fold = _heads_after_fold(shape_in, info.axis, shape_out, info.blocks[0].size)
    if j is None or not (fold or info.folded):
        return None
    return replace(info.moved(j), folded=fold)


def check_folds(ctx: Context, node: fx.Node, operands: list[fx.Node]) -> None:
    """Elementwise ops where heads are folded into the batch axis: every operand with features
    has its heads folded on one axis of the output, along which every other operand is constant
    (of size 1 there, or without that axis: scalars, masks broadcast over samples and heads) —
    a value that varies along the folded axis would be fixed per (sample, head), which cannot
    follow a pairing of heads."""
    out_shape = ctx.shape(node)
    infos = {op: ctx.info(op) for op in operands}
    if out_shape is None or not any(folded(i) for i in infos.values()):
        return
    out_ndim = len(out_shape)
    at = set()
    for op, info in infos.items():
        if folded(info):
            shape = ctx.shape(op)
            axis = info.head_axis if info.headed else info.axis
            pos = axis + out_ndim - len(shape)
            if shape[axis] != out_shape[pos]:
                raise Barrier(f"broadcasts '{op.name}', whose heads are folded into the batch "
                              "axis, along that axis")
            at.add(pos)
    if len(at) != 1:
        raise Barrier("combines tensors whose heads are folded into different axes")
    pos = at.pop()
    for op, info in infos.items():
        if folded(info):
            continue
        if isinstance(info, (Feat, Stacked)):
            raise Barrier(f"combines heads folded into the batch axis with '{op.name}', whose "
                          "heads are not folded")
        shape = ctx.shape(op)
        if shape is not None and pos - (out_ndim - len(shape)) >= 0 and \
                shape[pos - (out_ndim - len(shape))] != 1:
            raise Barrier(f"combines heads folded into the batch axis with '{op.name}', values "
                          "that vary along that axis (fixed per sample and head)")


def folded_axis(info: Feat) -> int:
    """The axis of a folded layout that holds the samples and heads together."""
    return info.head_axis if info.headed else info.axis


def _expanded_after_heads(ctx: Context, x: fx.Node | None, info: Feat,
                          shape_in: tuple) -> int | None:
    """n, where `x` is headed values expanded from size 1 to n on the axis right after the head
    axis (a broadcast copy of every head); None otherwise."""
    ha = info.head_axis
    if x is None or ha + 1 >= len(shape_in) or ha + 1 == info.axis or shape_in[ha + 1] < 2:
        return None
    while x.op == "call_method" and x.target == "contiguous":
        x = x.args[0]
    if not (x.op == "call_method" and x.target == "expand") or not isinstance(x.args[0], fx.Node):
        return None
    source = ctx.shape(x.args[0])
    if source is None or len(source) != len(shape_in) or source[ha + 1] != 1:
        return None
    return shape_in[ha + 1]


@register("repeat_interleave", torch.repeat_interleave, heads=True)
def repeat_interleave(ctx: Context, node: fx.Node) -> Any:
    """Every element repeated n times in a row along an axis: along the head axis, each head
    serves n query heads (grouped-query attention: a repeated headed layout); along another
    axis than the channels' (tokens), the layout is kept."""
    x = node.args[0]
    info = ctx.info(x)
    repeats = arg(node, 1, "repeats")
    dim = arg(node, 2, "dim")
    shape = ctx.shape(x)
    if not isinstance(info, Feat) and not isinstance(info, Stacked):
        if info is SHARED or info is None:
            return info
        raise Barrier(f"repeats '{x.name}', a value fxzip cannot follow per channel")
    if not isinstance(repeats, int) or dim is None or isinstance(info, Stacked):
        raise Barrier(f"repeats elements of '{x.name}' across its channel axis")
    dim = norm_dim(dim, len(shape))
    if dim == info.axis:
        raise Barrier(f"repeats the channels of '{x.name}' along their own axis")
    if info.headed and dim == info.head_axis:
        return replace(info, repeat=info.repeat * repeats)
    return info


def moved_by(info: Any, where: dict[int, int]) -> Any:
    """A headed layout or stack with every axis moved by `where` (old -> new; others stay)."""
    if isinstance(info, Stacked):
        return Stacked(where.get(info.axis, info.axis), tuple(moved_by(p, where) for p in info.parts))
    return info.placed(where.get(info.axis, info.axis), where.get(info.head_axis, info.head_axis))


def without_axis(info: Feat, dim: int) -> Feat:
    """A headed (or plain) layout with axis `dim` (not one of its own) removed."""
    def shift(x: int | None) -> int | None:
        return None if x is None else x - (dim < x)
    return info.placed(shift(info.axis), shift(info.head_axis))


def without_axes(info: Feat, dims: list[int]) -> Feat:
    """A headed layout with axes `dims` (none of its own) reduced away."""
    for dim in sorted(dims, reverse=True):
        info = without_axis(info, dim)
    return info


def unbind_stacked(info: Stacked, dim: int, count: int) -> tuple:
    if dim != info.axis:
        raise Barrier("unbinds a stack of attention parts along another axis than the stack's")
    return tuple(without_axis(p, dim) for p in info.parts)


# ---------------------------------------------------------------------------------------------
# radix groups: parts of the channel axis that ops combine element by element
# ---------------------------------------------------------------------------------------------
# Split attention (ResNeSt) and selective kernels (SKNet) reshape channels into (R, C) groups and
# then sum or softmax over R: element j of every group meets element j of the others, so every
# group must hold the same space. A sum or softmax over the heads of a headed layout asks for its
# space to be opened as one space per group (a SplitRequest); the reshape of those R blocks gives
# a stack of R layouts (`Stacked` of plain parts), and the op over the stack axis ties the parts
# into one space, after which the stack axis is a plain axis of copies.

def radix_request(info: Feat, x: fx.Node, what: str) -> Barrier:
    """A sum or softmax over the heads of `info`: its groups must hold one space, so its space
    is asked to be opened as one space per head (then tied by the op over the groups)."""
    message = f"{what} over the heads of '{x.name}'"
    if len(info.blocks) != 1 or info.blocks[0].expand != 1 or info.repeat != 1 or info.heads < 2:
        return Barrier(message)
    block = info.blocks[0]
    d = block.size // info.heads
    return SplitRequest(message + " (radix groups: each must hold the same features)",
                        {block.space: {d * h for h in range(1, info.heads)}})


def plain_stack(info: Any) -> bool:
    return isinstance(info, Stacked) and not any(p.headed for p in info.parts)


def stack_of_parts(ctx: Context, info: Feat, shape_in: tuple, shape_out: tuple) -> Any:
    """A plain layout of several blocks whose channel axis is reshaped into (P, W), every part
    whole blocks: a stack of P layouts on the P axis, or, where the parts are one layout
    already, that layout with the P axis holding copies. None if the reshape is not that."""
    if len(info.blocks) < 2 or info.headed:
        return None
    a, width = info.axis, shape_in[info.axis]
    before, after = math.prod(shape_in[:a]), math.prod(shape_in[a + 1:])
    for j in range(len(shape_out) - 1):
        parts, w = shape_out[j], shape_out[j + 1]
        if parts < 2 or parts * w != width or math.prod(shape_out[:j]) != before or \
                math.prod(shape_out[j + 2:]) != after:
            continue
        try:
            pieces = split_layout(info, [w] * parts)
        except Barrier:  # a part cuts a block: not whole spaces per part
            return None
        stack = Stacked(j, tuple(p.moved(j + 1) for p in pieces))
        return collapsed(ctx, stack) or stack
    return None


def collapsed(ctx: Context, stack: Stacked) -> Feat | None:
    """A stack of plain parts that are all one layout: that layout (the stack axis holds copies);
    None if the parts differ."""
    if not plain_stack(stack):
        return None
    first = stack.parts[0]
    for part in stack.parts[1:]:
        if part.axis != first.axis or len(part.blocks) != len(first.blocks) or any(
                ctx.uf.find(x.space) != ctx.uf.find(y.space) or x.size != y.size
                or x.expand != y.expand for x, y in zip(part.blocks, first.blocks)):
            return None
    return first


def unified_parts(ctx: Context, stack: Stacked, x: fx.Node) -> Feat:
    """A stack of plain parts combined element by element across the stack axis: the parts are
    tied into one space, the stack axis then holds copies."""
    if not plain_stack(stack):
        raise Barrier(f"combines the parts of '{x.name}', a stack of attention parts")
    first = stack.parts[0]
    for part in stack.parts[1:]:
        if part.axis != first.axis:
            raise Barrier(f"combines parts of '{x.name}' whose channels lie on different axes")
        ctx.unify(first, part)
    return first


# ---------------------------------------------------------------------------------------------
# elementwise ops and indexing
# ---------------------------------------------------------------------------------------------

def pointwise_headed(ctx: Context, node: fx.Node, operands: list[fx.Node]) -> Feat:
    """Elementwise op with headed operands: all of them aligned, tied together; head-only values
    (per-head statistics, scores) tie to the head space; parameters that vary over the heads
    follow the head space; anything that varies along head_dim fixes the features in place."""
    out_shape = ctx.shape(node)
    out_ndim = len(out_shape)
    infos = {op: ctx.info(op) for op in operands}
    heads = [(op, i) for op, i in infos.items() if headed(i)]
    first = heads[0][1]
    shift0 = out_ndim - len(ctx.shape(heads[0][0]))
    result = first.placed(first.axis + shift0, first.head_axis + shift0)
    h_pos, d_pos = result.head_axis, result.axis
    fix = False
    for op, info in infos.items():
        shape = ctx.shape(op)
        if shape is None:
            continue
        shift = out_ndim - len(shape)
        if headed(info):
            if (info.axis + shift, info.head_axis + shift) != (d_pos, h_pos):
                raise Barrier("combines tensors split into heads along different axes")
            ctx.unify(result, info.placed(d_pos, h_pos))
            continue
        along = {pos: shape[pos - shift] if pos - shift >= 0 else 1 for pos in (h_pos, d_pos)}
        if along[d_pos] > 1:
            fix = True  # varies along head_dim: rotary tables, norm weights, rotated halves
        if result.repeat > 1 and (isinstance(info, Feat) or along[h_pos] > 1):
            raise Barrier("combines repeated key/value heads with values per head")
        if isinstance(info, Feat):
            if info.axis + shift != h_pos:
                raise Barrier("combines a tensor split into heads with channels on another axis")
            ctx.unify(result.head_only().moved(h_pos), info.moved(h_pos))
        elif along[h_pos] > 1:
            if isinstance(info, Lazy):
                ctx.tie_param(op, h_pos - shift, result.head_only().moved(h_pos - shift))
            else:
                raise Barrier(f"combines heads with '{op.name}', fixed values per head that cannot "
                              "follow a pairing of heads")
    if fix:
        ctx.fix_within(result)
    return result


def index_headed(ctx: Context, x: fx.Node, info: Feat, index: tuple) -> Feat:
    """Indexing that keeps the head axis whole; cutting head_dim leaves the head space."""
    ndim = len(ctx.shape(x))
    explicit = sum(1 for i in index if i is not None and i is not Ellipsis)
    where: dict[int, int | None] = {}
    cut: set[int] = set()
    in_dim = out_dim = 0
    for item in index:
        if item is Ellipsis:
            for _ in range(ndim - explicit):
                where[in_dim] = out_dim
                in_dim, out_dim = in_dim + 1, out_dim + 1
        elif item is None:
            out_dim += 1
        elif isinstance(item, int):
            where[in_dim] = None
            cut.add(in_dim)
            in_dim += 1
        elif isinstance(item, slice):
            if item != slice(None):
                cut.add(in_dim)
            where[in_dim] = out_dim
            in_dim, out_dim = in_dim + 1, out_dim + 1
        else:
            raise Barrier(f"indexes '{x.name}', split into heads, with {item!r}")
    while in_dim < ndim:
        where[in_dim] = out_dim
        in_dim, out_dim = in_dim + 1, out_dim + 1
    if info.head_axis in cut:
        raise Barrier(f"picks or slices attention heads of '{x.name}'")
    if info.axis in cut:
        return ctx.fix_within(info).moved(where[info.head_axis])
    return info.placed(where[info.axis], where[info.head_axis])
