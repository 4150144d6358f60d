"""Attention fusion, a graph rewrite: find multi-head self-attention in a traced graph, make it one op.

`nn.MultiheadAttention` (self-attention without masks) is first spelled out into its projections.
A fused `qkv` projection followed by `reshape(..., 3, H, d)`, permutes, `unbind`, softmax
attention (`scaled_dot_product_attention`, or `matmul` + `softmax`) and the reshape back to
`(..., N, H·d)` is replaced by ONE call of `fused_qkv_attention(qkv, H)` — but only when the
replaced subgraph reads nothing else per model (no parameters, no position biases, no rotary
embeddings) and the whole model computes the same outputs afterwards on the example batch. That
check makes the rewrite correct by construction: anything else stays a barrier.

Attention that also reads tensors from outside the region — relative position biases gathered from
a (positions × heads) table, shifted-window masks (Swin) — is kept as the traced subgraph itself,
moved into an `AttentionCore` submodule, once `follow_heads` (its own module) has followed the head
axis through it op by op (q and k meet only in the score product, v only through the attention
weights, the extra tensors only shift or scale the scores). An extra tensor computed from
parameters alone that varies over the heads has its head axis tied to a space of one feature per
head, which joins the attention's head group: the table's heads are paired (and averaged) as the
attention's heads are. Per-head values that are not parameters (computed from the input, or fixed
constants) are a barrier. Still barriers: parametrised ops inside the attention (q/k norms, CaiT's
talking heads), other [q | k | v] layouts (MaxViT's per-head interleaving, LeViT's per-head split),
attention over channels (EdgeNeXt's XCA), factorised attention (CoaT).

The fused ops are in `attention_ops`. The fused projection is tagged (BLOCKS_META) as holding the
blocks [q | k | v]; the op rules of the fused ops (`fxzip.rules.attention`) then know the
structure: queries and keys share one feature space, values (and the output projection's input)
another, and both are split into H heads of d features that must be matched head to head
(`fxzip.matching.heads`).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..runtime.inputs import Batch, batch_size, call_model, leading
from ..graph.shapes import propagate_shapes, tensor_shape
from ..rules.api import BLOCKS_META
from .attention_ops import AttentionCore, fused_qkv_attention
from .follow_heads import follow_heads


@dataclass(frozen=True)
class AttentionRegion:
    """A subgraph from the split of a fused projection to the merge of the heads."""

    projection: str  # the node whose output is (..., N, 3·H·d)
    heads: int
    nodes: tuple[str, ...]  # replaced nodes, the last one is the reshape back to (..., N, H·d)
    extras: tuple[str, ...] = ()  # tensors from outside it reads: position biases, masks


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
    extras: list[fx.Node] = []
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
            if not _harmless_input(value) and value not in extras:
                extras.append(value)  # masks, position biases, rotary embeddings, …
    if any(value not in members for value in end.all_input_nodes if _is_tensor(value)):
        return None
    inside.sort(key=order.__getitem__)
    extras.sort(key=order.__getitem__)
    return AttentionRegion(source.name, heads, tuple(n.name for n in inside) + (end.name,),
                           tuple(n.name for n in extras))


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


def fuse_attention(gm: fx.GraphModule, example: Batch) -> tuple[fx.GraphModule, list[str]]:
    """Make every multi-head self-attention one `fused_qkv_attention` op: `nn.MultiheadAttention`
    modules are spelled out (projection, attention, output projection), attention subgraphs are
    replaced. Kept only if the model's outputs on `example` stay the same; returns the (new or
    unchanged) module and the nodes whose output is a fused [q | k | v] projection."""
    candidate = _copy(gm)
    expanded = _expand_multihead_attention(candidate)
    if expanded:
        candidate.recompile()
        propagate_shapes(candidate, example)
    regions = find_regions(candidate)
    if not regions and not expanded:
        return gm, []
    graph = candidate.graph
    by_name = {n.name: n for n in graph.nodes}
    for index, region in enumerate(regions):
        source = by_name[region.projection]
        end = by_name[region.nodes[-1]]
        if region.extras:
            fused = _insert_core(candidate, region, by_name, index)
            if fused is None:
                continue
        else:
            with graph.inserting_before(end):
                fused = graph.call_function(fused_qkv_attention, (source, region.heads))
        fused.meta = dict(end.meta)
        end.replace_all_uses_with(fused)
        for name in reversed(region.nodes):
            graph.erase_node(by_name[name])
        source.meta[BLOCKS_META] = ("qk", "qk", "v")
    candidate.recompile()
    if not _same_on(gm, candidate, example):
        return gm, []
    projections = [n.name for n in graph.nodes if n.meta.get(BLOCKS_META)]
    return candidate, projections


def _insert_core(gm: fx.GraphModule, region: AttentionRegion, by_name: dict[str, fx.Node],
                 index: int) -> fx.Node | None:
    """Move a region that reads extra tensors into an `AttentionCore` submodule and call it in its
    place; None (region left alone) when the heads cannot be followed through it."""
    nodes = [by_name[name] for name in region.nodes]
    source = by_name[region.projection]
    head_axes = follow_heads(gm, nodes, source, [by_name[n] for n in region.extras])
    if head_axes is None:
        return None
    members = set(nodes)
    inputs: list[fx.Node] = []
    for node in nodes:
        for value in node.all_input_nodes:
            if value not in members and value is not source and value not in inputs:
                inputs.append(value)
    body_graph = fx.Graph()
    env = {source: body_graph.placeholder("qkv")}
    for i, value in enumerate(inputs):
        env[value] = body_graph.placeholder(f"extra_{i}")
    for node in nodes:
        env[node] = body_graph.node_copy(node, env.__getitem__)
    body_graph.output(env[nodes[-1]])
    body = fx.GraphModule(gm, body_graph, "AttentionBody")
    axes = tuple(head_axes.get(v) for v in inputs)
    name = f"fxzip_attention_{index}"
    while hasattr(gm, name):
        name = "fxzip_" + name
    gm.add_submodule(name, AttentionCore(body, region.heads, axes))
    with gm.graph.inserting_before(nodes[-1]):
        return gm.graph.call_module(name, (source, *inputs))


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
            if not module.batch_first:  # (L, N, E) -> (N, L, E); an unbatched (L, E) stays
                x = graph.call_method("transpose", (x, 0, -2))
            bias = graph.get_attr(f"{prefix}.in_proj_bias") if module.in_proj_bias is not None else None
            qkv = graph.call_function(F.linear, (x, graph.get_attr(f"{prefix}.in_proj_weight"), bias))
            qkv.meta[BLOCKS_META] = ("qk", "qk", "v")
            heads = graph.call_function(fused_qkv_attention, (qkv, module.num_heads))
            out_bias = (graph.get_attr(f"{prefix}.out_proj.bias")
                        if module.out_proj.bias is not None else None)
            out = graph.call_function(F.linear, (heads, graph.get_attr(f"{prefix}.out_proj.weight"),
                                                 out_bias))
            if not module.batch_first:
                out = graph.call_method("transpose", (out, 0, -2))
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


def _same_on(gm: fx.GraphModule, candidate: fx.GraphModule, example: Batch) -> bool:
    """Whether both modules compute the same outputs, checked on the example's first two samples
    (every sample goes through the same ops; the models are in eval mode), or on the whole
    example if the models cannot run on a smaller batch."""
    with torch.no_grad():
        if batch_size(example) > 2:
            try:
                reference = call_model(gm, leading(example, 2))
            except Exception:  # a batch size fixed in the graph: check on the whole example
                pass
            else:
                return _same_outputs(reference, call_model(candidate, leading(example, 2)))
        return _same_outputs(call_model(gm, example), call_model(candidate, example))


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
