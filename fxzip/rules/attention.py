"""Op rules of the fused attention ops that `attention_fusion` puts in a graph.

`fused_qkv_attention` and `AttentionCore` read a fused projection whose output holds the blocks
[q | k | v]: queries and keys share one feature space, values (and the output projection's
input) another, and both are split into H heads of d features that are matched head to head
(a head group). Per-head parameters an `AttentionCore` reads (relative position bias tables)
follow a space of one feature per head in the same head group.
"""
from __future__ import annotations

import torch.fx as fx

from ..passes.fuse_attention import AttentionCore, fused_qkv_attention
from .layout import Block, Feat, Lazy
from .api import Barrier, Context, register


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
