"""Head-aware attention: find multi-head self-attention in a traced graph and make it one op.

`nn.MultiheadAttention` (self-attention without masks) is first spelled out into its projections.
A fused `qkv` projection followed by `reshape(..., 3, H, d)`, permutes, `unbind`, softmax
attention (`scaled_dot_product_attention`, or `matmul` + `softmax`) and the reshape back to
`(..., N, H·d)` is replaced by ONE call of `fused_qkv_attention(qkv, H)` — but only when the
replaced subgraph reads nothing else per model (no parameters, no position biases, no rotary
embeddings) and the whole model computes the same outputs afterwards on the example batch. That
check makes the rewrite correct by construction: anything else stays a barrier.

The op rule then knows the structure: the projection's output holds the blocks [q | k | v];
queries and keys share one feature space, values (and the output projection's input) another,
and both are split into H heads of d features that must be matched head to head
(`fxzip.head_matching`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from ..tracing import tensor_shape
from .layout import Feat
from .op_rules import Barrier, register

if TYPE_CHECKING:
    from .analysis import Context

BLOCKS_META = "fxzip_blocks"  # on a projection node: the tags of its output blocks


def fused_qkv_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Multi-head self-attention from a fused projection (..., N, 3·H·d): per head
    softmax(q kᵀ / √d) v, the heads concatenated back to (..., N, H·d)."""
    *lead, tokens, width = qkv.shape
    head_dim = width // (3 * num_heads)
    q, k, v = qkv.reshape(-1, tokens, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(*lead, tokens, num_heads * head_dim)


torch.fx.wrap("fused_qkv_attention")  # a leaf when a merged model is traced again


@dataclass(frozen=True)
class AttentionRegion:
    """A subgraph from the split of a fused projection to the merge of the heads."""

    projection: str  # the node whose output is (..., N, 3·H·d)
    heads: int
    nodes: tuple[str, ...]  # replaced nodes, the last one is the reshape back to (..., N, H·d)


def find_regions(gm: fx.GraphModule) -> list[AttentionRegion]:
    """Candidate attention subgraphs: closed between a 3-way head split and the head merge."""
    regions = []
    for node in gm.graph.nodes:
        region = _region_from(gm, node)
        if region is not None:
            regions.append(region)
    return regions


def _region_from(gm: fx.GraphModule, split: fx.Node) -> AttentionRegion | None:
    if not _is_reshape(split) or not split.args or not isinstance(split.args[0], fx.Node):
        return None
    source = split.args[0]
    shape_in, shape_out = tensor_shape(source), tensor_shape(split)
    if shape_in is None or shape_out is None or len(shape_out) != len(shape_in) + 2:
        return None
    if tuple(shape_out[:-3]) != tuple(shape_in[:-1]) or shape_out[-3] != 3:
        return None
    heads, head_dim = shape_out[-2], shape_out[-1]
    width = heads * head_dim
    if 3 * width != shape_in[-1]:
        return None
    tokens_shape = tuple(shape_in[:-1]) + (width,)
    # Walk forward from the split; stop at the first reshape back to (..., N, H·d).
    inside: list[fx.Node] = [split]
    frontier = list(split.users)
    end = None
    seen = {split}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    while frontier:
        frontier.sort(key=order.__getitem__)
        node = frontier.pop(0)
        if node in seen:
            continue
        seen.add(node)
        if node.op == "output":
            return None
        if _is_reshape(node) and tensor_shape(node) == tokens_shape:
            if end is not None and end is not node:
                return None
            end = node
            continue
        inside.append(node)
        frontier.extend(node.users)
        if len(inside) > 64:
            return None
    if end is None:
        return None
    members = set(inside) | {end}
    for node in inside:
        if any(user not in members for user in node.users):
            return None  # an intermediate escapes the region
        if node.op == "call_module" and any(True for _ in _state(gm, node.target)):
            return None  # q/k norms or other parametrised modules inside
        if node.op == "get_attr":
            return None
        for value in node.all_input_nodes:
            if value in members or value is source:
                continue
            if not _harmless_input(value):
                return None  # masks, position biases, rotary embeddings, …
    if any(value not in members for value in end.all_input_nodes if _is_tensor(value)):
        return None
    inside.sort(key=order.__getitem__)
    return AttentionRegion(source.name, heads, tuple(n.name for n in inside) + (end.name,))


def _state(gm: fx.GraphModule, target: str):
    module = gm.get_submodule(target)
    yield from module.parameters()
    yield from module.buffers()


def _is_reshape(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in ("reshape", "view")
    return node.op == "call_function" and node.target in (torch.reshape,)


def _is_tensor(node: fx.Node) -> bool:
    return tensor_shape(node) is not None


def _harmless_input(node: fx.Node) -> bool:
    """Shape values, and forward arguments left at a None/False default (e.g. `attn_mask`)."""
    if node.op == "placeholder":
        return bool(node.args) and node.args[0] in (None, False)
    return not _is_tensor(node) and node.op != "get_attr"


def fuse_attention(gm: fx.GraphModule, example: torch.Tensor) -> tuple[fx.GraphModule, list[str]]:
    """Make every multi-head self-attention one `fused_qkv_attention` op: `nn.MultiheadAttention`
    modules are spelled out (projection, attention, output projection), attention subgraphs are
    replaced. Kept only if the model's outputs on `example` stay the same; returns the (new or
    unchanged) module and the nodes whose output is a fused [q | k | v] projection."""
    candidate = _copy(gm)
    expanded = _expand_multihead_attention(candidate)
    if expanded:
        candidate.recompile()
        ShapeProp(candidate).propagate(example)
    regions = find_regions(candidate)
    if not regions and not expanded:
        return gm, []
    graph = candidate.graph
    by_name = {n.name: n for n in graph.nodes}
    for region in regions:
        source = by_name[region.projection]
        end = by_name[region.nodes[-1]]
        with graph.inserting_before(end):
            fused = graph.call_function(fused_qkv_attention, (source, region.heads))
        fused.meta = dict(end.meta)
        end.replace_all_uses_with(fused)
        for name in reversed(region.nodes):
            graph.erase_node(by_name[name])
        source.meta[BLOCKS_META] = ("qk", "qk", "v")
    candidate.recompile()
    with torch.no_grad():
        if not _same_outputs(gm(example), candidate(example)):
            return gm, []
    projections = [n.name for n in graph.nodes if n.meta.get(BLOCKS_META)]
    return candidate, projections


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with a copy of `gm`'s graph (node metadata included) and the same modules."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    copied = fx.GraphModule(gm, graph, gm.__class__.__name__)
    return copied.eval()


def _expand_multihead_attention(gm: fx.GraphModule) -> int:
    """Spell out self-attention calls of `nn.MultiheadAttention` (query, key and value the same
    tensor, no masks, only the attention output used) as F.linear → fused_qkv_attention →
    F.linear on the module's own parameters. Returns how many were expanded."""
    graph, count = gm.graph, 0
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if not isinstance(module, nn.MultiheadAttention) or not _plain_self_attention(node, module):
            continue
        users = list(node.users)
        if any(u.op != "call_function" or u.target is not operator.getitem for u in users):
            continue
        if any(u.args[1] != 0 and u.users for u in users):
            continue  # the attention weights are used
        x = node.args[0] if node.args else node.kwargs["query"]
        prefix = node.target
        with graph.inserting_before(node):
            if not module.batch_first:
                x = graph.call_method("transpose", (x, 0, 1))
            bias = graph.get_attr(f"{prefix}.in_proj_bias") if module.in_proj_bias is not None else None
            qkv = graph.call_function(F.linear, (x, graph.get_attr(f"{prefix}.in_proj_weight"), bias))
            qkv.meta[BLOCKS_META] = ("qk", "qk", "v")
            heads = graph.call_function(fused_qkv_attention, (qkv, module.num_heads))
            out_bias = (graph.get_attr(f"{prefix}.out_proj.bias")
                        if module.out_proj.bias is not None else None)
            out = graph.call_function(F.linear, (heads, graph.get_attr(f"{prefix}.out_proj.weight"),
                                                 out_bias))
            if not module.batch_first:
                out = graph.call_method("transpose", (out, 0, 1))
        for user in users:
            user.replace_all_uses_with(out)
            graph.erase_node(user)
        graph.erase_node(node)
        count += 1
    return count


def _plain_self_attention(node: fx.Node, module: nn.MultiheadAttention) -> bool:
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
             "average_attn_weights", "is_causal")
    given = dict(zip(names, node.args))
    given.update(node.kwargs)
    q, k, v = given.get("query"), given.get("key"), given.get("value")
    if not (isinstance(q, fx.Node) and q is k is v):
        return False
    if any(given.get(name) is not None for name in ("key_padding_mask", "attn_mask")):
        return False
    if given.get("is_causal", False):
        return False
    return (module._qkv_same_embed_dim and module.bias_k is None and module.bias_v is None
            and not module.add_zero_attn)


def _same_outputs(a: Any, b: Any) -> bool:
    flat_a, flat_b = _flatten(a), _flatten(b)
    if len(flat_a) != len(flat_b):
        return False
    for x, y in zip(flat_a, flat_b):
        if x.shape != y.shape:
            return False
        scale = x.abs().max().clamp_min(1e-6)
        if not ((x - y).abs().max() <= 1e-4 * scale):
            return False
    return True


def _flatten(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flatten(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _flatten(v)]
    return []


@register(fused_qkv_attention)
def attention_rule(ctx: "Context", node: fx.Node) -> Feat:
    """Queries and keys share one space, values another; both are split into heads."""
    qkv, heads = node.args[0], node.args[1]
    info = ctx.info(qkv)
    shape = ctx.shape(qkv)
    axis = len(shape) - 1
    if not isinstance(info, Feat) or info.axis != axis:
        raise Barrier(f"attention reads '{qkv.name}', whose channels fxzip cannot follow")
    blocks = info.blocks
    if len(blocks) != 3 or ctx.uf.find(blocks[0].space) != ctx.uf.find(blocks[1].space) \
            or any(b.expand != 1 for b in blocks):
        raise Barrier(f"attention reads '{qkv.name}' whose layout is not [q | k | v]")
    if blocks[0].size % heads or blocks[2].size % heads:
        raise Barrier(f"{heads} heads do not divide the attention width {blocks[0].size}")
    ctx.consume(node, qkv, info)
    ctx.head_group((blocks[0].space, blocks[2].space), heads, "attention")
    return Feat(axis, (blocks[2],))
