"""Op rules of attention: products of tensors split into heads (matmul/bmm: q·kᵀ, scores·v;
`scaled_dot_product_attention`; grouped- and multi-query attention), and the fused attention ops
that `fuse_attention` puts in a graph.

`fused_qkv_attention` and `AttentionCore` read a fused projection whose output holds the blocks
[q | k | v]: queries and keys share one feature space, values (and the output projection's input)
another, and both are split into H heads of d features that are matched head to head (a head
group). Per-head parameters an `AttentionCore` reads (relative position bias tables) follow a
space of one feature per head in the same head group. How headed layouts reach the products is
in `heads`.
"""
from __future__ import annotations

import operator
from dataclasses import replace
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..passes.attention_ops import AttentionCore, fused_qkv_attention
from .api import Barrier, Context, arg, folded, headed, register
from .layout import SHARED, Block, Feat, Lazy, Stacked


# ---------------------------------------------------------------------------------------------
# products: scores and attention outputs
# ---------------------------------------------------------------------------------------------

_MATMUL = (torch.matmul, operator.matmul, torch.bmm, "matmul", "bmm")


@register(*_MATMUL, folds=True)
def matmul(ctx: Context, node: fx.Node) -> Any:
    """Batched products of tensors split into heads (q·kᵀ, scores·v, and attention over channels):
    the head axes are batch axes and pair heads alike; head_dim contracted on both sides ties
    the operands' spaces; head_dim contracted against anything else, or two head_dim axes left
    in the product, fixes features within heads. Per-head values (scores) follow the head space.
    Heads folded into the batch axis ((B·H, N, d) for `bmm`) are a batch axis all the same: both
    operands' heads folded alike, or a shared operand constant along them."""
    a, b = node.args[0], node.args[1]
    return product(ctx, node, a, b, ctx.info(a), ctx.info(b))


def _role(ctx: Context, value: fx.Node, info: Any, out_ndim: int, rows: int) -> dict:
    """Where an operand's head and head_dim axes go in a product: 'batch' positions (aligned to
    the output's), 'contracted', or 'kept' (the row axis of a, the column axis of b)."""
    ndim = len(ctx.shape(value))
    shift = out_ndim - ndim

    def place(axis: int) -> tuple[str, int]:
        if axis < ndim - 2:
            return "batch", axis + shift
        if axis == rows:
            return "kept", out_ndim - 2 if rows == ndim - 2 else out_ndim - 1
        return "contracted", -1
    if headed(info):
        return {"head": place(info.head_axis), "within": place(info.axis)}
    if isinstance(info, Feat):
        return {"head": place(info.axis)}
    return {}


def _broadcast_over_heads(shape: Any, info: Any, ref: Feat) -> bool:
    """Whether a plain layout with its channels on a matrix axis has a size-1 axis where the
    headed operand `ref` has its heads (so it is broadcast over them)."""
    return (isinstance(info, Feat) and not info.headed and shape is not None and
            info.axis >= len(shape) - 2 and len(shape) > ref.head_axis and
            shape[ref.head_axis] == 1 and ref.head_axis < len(shape) - 2)


def _single_heads(ctx: Context, values: list[fx.Node], infos: list[Any]) -> list[Any]:
    """Attention with one head: where another operand is split into a single head, a plain
    layout whose channels are on a matrix axis (a reshape to (…, 1, N, d) merged the size-1
    head axis away) is split into one head on that size-1 axis too."""
    ref = next((i for i in infos if isinstance(i, Feat) and i.headed and i.heads == 1 and
                i.repeat == 1), None)
    if ref is None:
        return _shared_heads(ctx, values, infos)
    out = []
    for value, info in zip(values, infos):
        if _broadcast_over_heads(ctx.shape(value), info, ref):
            info = ctx.split_heads(info, info.axis, ref.head_axis, 1)
        out.append(info)
    return out


def _shared_heads(ctx: Context, values: list[fx.Node], infos: list[Any]) -> list[Any]:
    """Multi-query attention (timm's MultiQueryAttention2d): where another operand is split into
    H > 1 heads, a plain layout whose channels are on a matrix axis and that has a size-1 axis
    where the heads are (broadcast over them) is one key/value head repeated H times."""
    ref = next((i for i in infos if isinstance(i, Feat) and i.headed and i.heads > 1 and
                i.repeat == 1), None)
    if ref is None:
        return infos
    out = []
    for value, info in zip(values, infos):
        if _broadcast_over_heads(ctx.shape(value), info, ref):
            info = replace(ctx.split_heads(info, info.axis, ref.head_axis, 1), repeat=ref.heads)
            ctx.consume(value, value, replace(info.head_only(), repeat=1))  # the head's tap
        out.append(info)
    return out


def product(ctx: Context, node: fx.Node, a: fx.Node, b: fx.Node, ia: Any, ib: Any) -> Any:
    out_ndim = len(ctx.shape(node))
    if folded(ia) or folded(ib):
        _check_folded_operands(ctx, node, [a, b], [ia, ib])
    else:
        ia, ib = _single_heads(ctx, [a, b], [ia, ib])
    ra = _role(ctx, a, ia, out_ndim, len(ctx.shape(a)) - 2)
    rb = _role(ctx, b, ib, out_ndim, len(ctx.shape(b)) - 1)
    if not ra and not rb:
        if ia is SHARED and ib is SHARED:
            return SHARED
        raise Barrier("multiplies matrices whose channels fxzip cannot follow")
    for r, info in ((ra, ia), (rb, ib)):
        if r and r["head"][0] != "batch":
            raise Barrier("multiplies along the channel (head) axis of a tensor")
        if not r and not (info is SHARED or info is None):
            raise Barrier("multiplies heads with a value fxzip cannot follow per head")
    head_pos = (ra or rb)["head"][1]
    if ra and rb and (getattr(ia, "repeat", 1) > 1 or getattr(ib, "repeat", 1) > 1):
        return _grouped_product(ctx, node, ia, ib, ra, rb, head_pos)
    if ra and rb:
        if ra["head"][1] != rb["head"][1]:
            raise Barrier("multiplies tensors whose heads are on different axes")
        ctx.unify(_head_of(ia), _head_of(ib).moved(_head_of(ia).axis))
    head = _head_of(ia if ra else ib).moved(head_pos)
    wa, wb = ra.get("within"), rb.get("within")
    if wa and wb and wa[0] == wb[0] == "contracted":
        ctx.unify(ia, ib.placed(ia.axis, ia.head_axis))  # q·kᵀ: feature j of q meets feature j of k
        ctx.consume(node, node, head)  # the scores: statistics of the head space
        return head
    kept = [(w, i) for w, i in ((wa, ia), (wb, ib)) if w and w[0] == "kept"]
    for w, info in ((wa, ia), (wb, ib)):
        if w and w[0] == "contracted":
            ctx.fix_within(info)  # head_dim against fixed values or another operand's channels
    if len(kept) == 2:
        ctx.fix_within(kept[1][1])  # two head_dim axes in the product: the columns stay in place
        kept = kept[:1]
    if kept:
        (w, info), = kept
        return info.placed(w[1], head_pos)
    ctx.consume(node, node, head)
    return head


def _check_folded_operands(ctx: Context, node: fx.Node, values: list[fx.Node],
                           infos: list[Any]) -> None:
    """Operands of a product or attention where some have their heads folded into the batch
    axis: every operand with features folded on one output axis (its batch axis), every other
    one of size 1 there or without it (a value fixed per sample and head cannot follow a
    pairing of heads)."""
    out_ndim = len(ctx.shape(node))
    at = set()
    for value, info in zip(values, infos):
        if folded(info):
            axis = info.head_axis if info.headed else info.axis
            at.add(axis + out_ndim - len(ctx.shape(value)))
    for value, info in zip(values, infos):
        if folded(info):
            continue
        if isinstance(info, (Feat, Stacked)):
            raise Barrier(f"multiplies heads folded into the batch axis with '{value.name}', "
                          "whose heads are not folded")
        shape = ctx.shape(value)
        if shape is not None and any(0 <= p - (out_ndim - len(shape)) < len(shape) and
                                     shape[p - (out_ndim - len(shape))] != 1 for p in at):
            raise Barrier(f"multiplies heads folded into the batch axis with '{value.name}', "
                          "values that vary along that axis (fixed per sample and head)")
    if len(at) != 1 or next(iter(at)) >= out_ndim - 2:
        raise Barrier("multiplies tensors whose heads are folded into different axes, or into "
                      "a matrix axis")


def _head_of(info: Feat) -> Feat:
    if info.repeat > 1:
        raise Barrier("reads the head space of repeated key/value heads")
    return info.head_only() if info.headed else info


def _grouped_product(ctx: Context, node: fx.Node, ia: Feat, ib: Feat, ra: dict, rb: dict,
                     head_pos: int) -> Any:
    """Products with repeated key/value heads (grouped-query attention): q·kᵀ ties q's heads
    and features to k's (two levels, `Context.repeat_tie`) and gives q's head space (scores);
    scores·v gives the attention outputs, a new space whose heads follow v's."""
    if ra["head"][1] != rb["head"][1]:
        raise Barrier("multiplies tensors whose heads are on different axes")
    if ia.repeat > 1 and ib.repeat > 1:
        raise Barrier("multiplies two tensors of repeated key/value heads")
    sub, base = (ia, ib) if ib.repeat > 1 else (ib, ia)
    rs, rbase = (ra, rb) if ib.repeat > 1 else (rb, ra)
    ws, wb = rs.get("within"), rbase.get("within")
    if ws and wb and ws[0] == wb[0] == "contracted":  # q·kᵀ
        ctx.repeat_tie(sub, base)
        head = sub.head_only().moved(head_pos)
        ctx.consume(node, node, head)
        return head
    if ws is None and wb and wb[0] == "kept":  # scores·v
        return attention_output(ctx, node, sub.moved(head_pos), base, wb[1], head_pos)
    raise Barrier("multiplies repeated key/value heads in a way fxzip cannot follow")


def attention_output(ctx: Context, node: fx.Node, scores: Feat, values: Feat, axis: int,
                     head_pos: int) -> Feat:
    """Attention outputs of grouped-query attention: per query head, its group's values. A new
    space (heads·repeat heads of the values' head_dim), tied to the values within heads."""
    if len(values.blocks) != 1 or values.blocks[0].expand != 1:
        raise Barrier("grouped-query attention over values that hold several feature spaces")
    head = scores.blocks[0]
    width = values.blocks[0].size * values.repeat
    out = Feat(axis, (Block(ctx.uf.new(width), width),), head_pos, values.heads * values.repeat,
               head)
    ctx.head_group((out.blocks[0].space, head.space), out.heads, "attention heads")
    ctx.repeat_tie(out, values)
    return out


@register(F.scaled_dot_product_attention, folds=True)
def scaled_dot_product_attention(ctx: Context, node: fx.Node) -> Any:
    """softmax(q·kᵀ/√d + mask)·v: as the two products; a mask computed from parameters or
    features that varies over the heads (a position bias) follows the head space."""
    q, k, v = (arg(node, i, name) for i, name in enumerate(("query", "key", "value")))
    iq, ik, iv = ctx.info(q), ctx.info(k), ctx.info(v)
    n = len(ctx.shape(q))
    mask = arg(node, 3, "attn_mask")
    if any(folded(i) for i in (iq, ik, iv)):  # heads folded into the batch axis: all alike
        if not all(folded(i) and i.headed for i in (iq, ik, iv)) or node.kwargs.get("enable_gqa"):
            raise Barrier("scaled_dot_product_attention reads queries, keys or values of which "
                          "only some have their heads folded into the batch axis")
        values = [q, k, v] + ([mask] if isinstance(mask, fx.Node) else [])
        _check_folded_operands(ctx, node, values, [ctx.info(x) for x in values])
    else:
        iq, ik, iv = _single_heads(ctx, [q, k, v], [iq, ik, iv])
    if node.kwargs.get("enable_gqa") and all(isinstance(i, Feat) and i.headed for i in (iq, ik, iv)):
        ha = iq.head_axis  # key/value heads shared by groups of query heads: as if repeated
        factor = ctx.shape(q)[ha] // ctx.shape(k)[ha]
        if factor > 1:
            ik, iv = replace(ik, repeat=ik.repeat * factor), replace(iv, repeat=iv.repeat * factor)
    if any(isinstance(i, Feat) and i.repeat > 1 for i in (iq, ik, iv)):
        return _grouped_sdpa(ctx, node, iq, ik, iv, n)
    if not all(isinstance(i, Feat) and _head_of(i).axis < n - 2 for i in (iq, ik, iv)) or \
            any(i.headed and i.axis != n - 1 for i in (iq, ik, iv)) or \
            len({_head_of(i).axis for i in (iq, ik, iv)}) != 1:
        raise Barrier("scaled_dot_product_attention reads queries, keys or values that are not "
                      "split into heads as (…, H, N, d)")
    if iq.headed and ik.headed:
        ctx.unify(iq, ik)
    else:  # a query or key whose features within heads were not followed: the others stay put
        for i in (iq, ik):
            if i.headed:
                ctx.fix_within(i)
    head = _head_of(iq)
    ctx.unify(head, _head_of(ik))
    ctx.unify(head, _head_of(iv))
    if isinstance(mask, fx.Node):
        info, shape = ctx.info(mask), ctx.shape(mask)
        pos = head.axis - (n - len(shape))
        varies = pos >= 0 and shape[pos] > 1
        if isinstance(info, Feat) and not info.headed and info.axis == pos:
            ctx.unify(head.moved(pos), info)
        elif isinstance(info, Lazy) and varies:
            ctx.tie_param(mask, pos, head.moved(pos))
        elif info is not SHARED and info is not None and not isinstance(info, Lazy) or \
                info is SHARED and varies:
            raise Barrier(f"attention reads the mask '{mask.name}' in a way fxzip cannot follow "
                          "per head")
    ctx.consume(node, node, head)
    return iv


def _grouped_sdpa(ctx: Context, node: fx.Node, iq: Feat, ik: Feat, iv: Feat, n: int) -> Feat:
    """scaled_dot_product_attention with repeated key/value heads (grouped-query attention)."""
    if not (iq.headed and ik.headed and iv.headed) or iq.repeat != 1 or \
            not ik.repeat == iv.repeat > 1 or {i.axis for i in (iq, ik, iv)} != {n - 1} or \
            len({i.head_axis for i in (iq, ik, iv)}) != 1:
        raise Barrier("grouped-query attention whose queries, keys and values fxzip cannot follow "
                      "as (…, H, N, d) with repeated key/value heads")
    ctx.repeat_tie(iq, ik)
    head = iq.head_only()
    mask = arg(node, 3, "attn_mask")
    if isinstance(mask, fx.Node):
        info, shape = ctx.info(mask), ctx.shape(mask)
        pos = head.axis - (n - len(shape))
        if info is not SHARED and info is not None and not (
                isinstance(info, Lazy) and not (pos >= 0 and shape[pos] > 1)):
            raise Barrier(f"grouped-query attention reads the mask '{mask.name}' per head")
    ctx.consume(node, node, head)
    return attention_output(ctx, node, head, iv, n - 1, head.axis)


# ---------------------------------------------------------------------------------------------
# fused attention: the ops `fuse_attention` inserts
# ---------------------------------------------------------------------------------------------

def _qkv_layout(ctx: Context, qkv: fx.Node, heads: int) -> Feat:
    """The [q | k | v] layout of a fused projection's output (queries and keys in one space)."""
    info = ctx.info(qkv)
    axis = len(ctx.shape(qkv)) - 1
    if not isinstance(info, Feat) or info.axis != axis:
        raise Barrier(f"attention reads '{qkv.name}', whose channels fxzip cannot follow")
    blocks = info.blocks
    if len(blocks) != 3 or ctx.uf.find(blocks[0].space) != ctx.uf.find(blocks[1].space) \
            or any(b.expand != 1 for b in blocks):
        raise Barrier(f"attention reads '{qkv.name}' whose layout is not [q | k | v]")
    if blocks[0].size % heads or blocks[2].size % heads:
        raise Barrier(f"{heads} heads do not divide the attention width {blocks[0].size}")
    return info


@register(fused_qkv_attention)
def attention_rule(ctx: Context, node: fx.Node) -> Feat:
    """Queries and keys share one space, values another; both are split into heads."""
    qkv, heads = node.args[0], node.args[1]
    info = _qkv_layout(ctx, qkv, heads)
    ctx.consume(node, qkv, info)
    ctx.head_group((info.blocks[0].space, info.blocks[2].space), heads, "attention")
    return Feat(info.axis, (info.blocks[2],))


@register(AttentionCore)
def attention_core_rule(ctx: Context, node: fx.Node) -> Feat:
    """Attention with extra inputs: as `attention_rule`, and every parameter-derived extra that
    varies over the heads (a relative position bias table) follows a space of one feature per
    head, which is part of the attention's head group — so its heads are paired as the
    attention's heads are. Its statistics are each head's outputs taken together."""
    module = ctx.module(node)
    qkv, heads = node.args[0], module.heads
    info = _qkv_layout(ctx, qkv, heads)
    out = Feat(info.axis, (info.blocks[2],))
    head_space = None
    for value, axis in zip(node.args[1:], module.head_axes):
        if axis is None:
            continue
        if not isinstance(ctx.info(value), Lazy):
            raise Barrier(f"attention reads '{value.name}' per head, a value that is not computed "
                          "from parameters alone (fixed per-head values cannot follow a pairing "
                          "of heads)")
        if head_space is None:
            head_space = ctx.uf.new(heads)
        ctx.tie_param(value, axis, Feat(axis, (Block(head_space, heads),)))
    ctx.consume(node, qkv, info)
    spaces = (info.blocks[0].space, info.blocks[2].space)
    if head_space is not None:
        per_head = info.blocks[2].size // heads
        ctx.consume(node, node, Feat(out.axis, (Block(head_space, heads, per_head),)))
        spaces += (head_space,)
    ctx.head_group(spaces, heads, "attention")
    return out
