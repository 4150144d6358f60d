"""Rewrite pass: emit ONE GraphModule with a merged trunk, unmerge gathers at the boundary, and
one head per model that keeps that model's own weights.

Trunk weights follow W* = Σ_k M_k W_k U_k: U_k sums the columns of features that share a cluster
(a scatter-add), M_k averages the rows of a cluster's members. Unmerging at the boundary is
exact: U_k is a selection, `x.index_select(axis, assign_k)`.

A dense Match (`Match.maps`, e.g. "cca") gives M_k and U_k as matrices: its tensors are merged by
matrix products along their axes, and the boundary unmerges by a product with U_k.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch.utils import _pytree as pytree
import torch.nn as nn

from ..errors import MatchingError
from ..matching.match import Match
from ..graph.pairing import Pairing
from ..graph.nodes import has_inplace, module_attribute
from .analysis import Analysis
from ..rules.layout import SHARED, Feat
from ..rules.api import ParamUse


class Layouts:
    """Index arithmetic of merged layouts: per-model gather indices, merged widths, counts."""

    def __init__(self, analysis: Analysis, matches: dict[int, Match], num_models: int):
        self.analysis, self.matches, self.num_models = analysis, matches, num_models

    def match(self, space: int) -> Match:
        if space in self.matches:
            return self.matches[space]
        s = self.analysis.spaces[space]
        if s.pinned:
            return Match.identity(s.size, self.num_models)
        raise KeyError(f"no matching computed for space {space}")

    def is_identity(self, feat: Feat) -> bool:
        return all(self.analysis.spaces[b.space].pinned for b in feat.blocks)

    def width(self, feat: Feat) -> int:
        return sum(self.match(b.space).size * b.expand for b in feat.blocks)

    def index(self, feat: Feat, k: int, device: torch.device) -> torch.Tensor:
        """For each element of model k's channel axis, its position on the merged axis."""
        parts, offset = [], 0
        for b in feat.blocks:
            match = self.match(b.space)
            assign = torch.tensor(match.assign[k], dtype=torch.long)
            idx = (assign[:, None] * b.expand + torch.arange(b.expand)).reshape(-1)
            parts.append(idx + offset)
            offset += match.size * b.expand
        return torch.cat(parts).to(device)

    def is_dense(self, feat: Feat) -> bool:
        """Whether a block of the layout is matched by dense matrices (`Match.maps`)."""
        return any(self.match(b.space).dense for b in feat.blocks)

    def matrix(self, feat: Feat, k: int, role: str) -> torch.Tensor:
        """Model k's merge (role "M": merged width × model k's width) or unmerge matrix (role
        "U": the transpose shape) of a layout, in float64: blocks on the diagonal, each channel
        repeated `expand` times."""
        parts = []
        for b in feat.blocks:
            match = self.match(b.space)
            m = torch.from_numpy(np.array(match.merge_matrix(k) if role == "M"
                                          else match.unmerge_matrix(k)))
            parts.append(torch.kron(m, torch.eye(b.expand, dtype=m.dtype)) if b.expand > 1 else m)
        return torch.block_diag(*parts)

    def counts(self, feat: Feat, device: torch.device) -> torch.Tensor:
        parts = [torch.tensor(self.match(b.space).counts).repeat_interleave(b.expand)
                 for b in feat.blocks]
        return torch.cat(parts).to(device)


def _scatter_sum(t: torch.Tensor, axis: int, index: torch.Tensor, width: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[axis] = width
    return torch.zeros(shape, dtype=t.dtype, device=t.device).index_add_(axis, index, t)


def merge_tensor(tensors: Sequence[torch.Tensor], uses: Sequence[ParamUse], layouts: Layouts) -> torch.Tensor:
    """Σ_k M_k T_k U_k along the axes named by `uses`; tensors without uses are averaged."""
    tensors = [t.detach() for t in tensors]
    if not uses:
        if tensors[0].is_floating_point():
            return torch.stack(tensors).mean(0)
        return tensors[0].clone()
    groups = max(u.groups for u in uses)
    if any(layouts.is_dense(u.feat) for u in uses):
        return _merge_dense(tensors, uses, layouts, groups)
    if groups > 1:  # merge the block-diagonal dense weight, then take its diagonal blocks again
        tensors = [_block_diagonal(t, groups) for t in tensors]
    total = None
    for k, t in enumerate(tensors):
        for use in uses:
            t = _scatter_sum(t, use.axis, layouts.index(use.feat, k, t.device), layouts.width(use.feat))
        total = t if total is None else total + t
    merged_axes = [u for u in uses if u.role == "M"]
    for use in merged_axes:
        shape = [1] * total.dim()
        shape[use.axis] = -1
        total = total / layouts.counts(use.feat, total.device).to(total.dtype).reshape(shape)
    if not merged_axes:
        total = total / len(tensors)
    return _diagonal_blocks(total, groups) if groups > 1 else total


def _merge_dense(tensors: Sequence[torch.Tensor], uses: Sequence[ParamUse], layouts: Layouts,
                 groups: int) -> torch.Tensor:
    """Σ_k M_k T_k U_k by matrix products along the axes of `uses` (a dense Match somewhere).
    BatchNorm's running variances are merged by |M_k| (non-negative; the same as M_k for a
    selection or permutation): the BatchNorm reset re-estimates them anyway."""
    if groups > 1:
        raise MatchingError("a dense match (method \"cca\") cannot merge a grouped or depthwise "
                            "convolution: its map would mix the groups; use a selection method "
                            "(\"zipit\", \"permute\")")
    total = None
    for k, t in enumerate(tensors):
        t = t.double()
        for use in uses:
            mat = layouts.matrix(use.feat, k, use.role).to(t.device)
            if use.role == "U":  # columns: W_k U_k
                mat = mat.T
            elif use.param == "running_var":
                mat = mat.abs()
            t = torch.movedim(torch.tensordot(mat, t, dims=([1], [use.axis])), 0, use.axis)
        total = t if total is None else total + t
    if not any(u.role == "M" for u in uses):
        total = total / len(tensors)
    return total.to(tensors[0].dtype)


def _block_diagonal(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped convolution's weight (out, in/groups, ...) as the dense (out, in, ...) weight."""
    out, per_group = weight.shape[0], weight.shape[1]
    dense = weight.new_zeros((out, per_group * groups, *weight.shape[2:]))
    rows = out // groups
    for g in range(groups):
        dense[g * rows:(g + 1) * rows, g * per_group:(g + 1) * per_group] = weight[g * rows:(g + 1) * rows]
    return dense


def _diagonal_blocks(dense: torch.Tensor, groups: int) -> torch.Tensor:
    """The inverse of `_block_diagonal` (the merge keeps groups whole, so nothing else is set)."""
    out, width = dense.shape[0], dense.shape[1]
    rows, per_group = out // groups, width // groups
    return torch.cat([dense[g * rows:(g + 1) * rows, g * per_group:(g + 1) * per_group]
                      for g in range(groups)])


_WIDTH_ATTRIBUTES = {
    nn.Linear: lambda m: dict(out_features=m.weight.shape[0], in_features=m.weight.shape[1]),
    nn.modules.conv._ConvNd: lambda m: dict(out_channels=m.weight.shape[0],
                                            in_channels=m.weight.shape[1] * m.groups),
    nn.modules.batchnorm._NormBase: lambda m: dict(num_features=(
        m.running_mean if m.running_mean is not None else m.weight).shape[0]),
    nn.LayerNorm: lambda m: dict(normalized_shape=tuple(m.weight.shape)) if m.weight is not None else {},
}


def merge_module(modules: Sequence[nn.Module], uses: Sequence[ParamUse], layouts: Layouts) -> nn.Module:
    """A copy of the first model's module whose own tensors are the merged ones (its own tensors
    are not copied first: they are replaced)."""
    own = [*modules[0]._parameters.values(), *modules[0]._buffers.values()]
    merged = copy.deepcopy(modules[0], {id(t): t for t in own if t is not None})
    by_param: dict[str, list[ParamUse]] = {}
    for use in uses:
        by_param.setdefault(use.param, []).append(use)
    for name, param in list(merged.named_parameters(recurse=False)):
        value = merge_tensor([m._parameters[name] for m in modules], by_param.get(name, []), layouts)
        merged._parameters[name] = nn.Parameter(value, requires_grad=param.requires_grad)
    for name, buf in list(merged.named_buffers(recurse=False)):
        merged._buffers[name] = merge_tensor([m._buffers[name] for m in modules],
                                             by_param.get(name, []), layouts)
    for cls, attributes in _WIDTH_ATTRIBUTES.items():
        if isinstance(merged, cls):
            for key, value in attributes(merged).items():
                setattr(merged, key, value)
    return merged


def _head_prefix(targets: set[str]) -> str:
    prefix = "heads"
    while any(t == prefix or t.startswith(prefix + ".") for t in targets):
        prefix = "fxzip_" + prefix
    return prefix


class _Emitter:
    """Emits the trunk once, from model 0's graph, with merged modules (model k's modules found
    through the pairing), and each model's head from that model's OWN graph with its own weights,
    reading the trunk's values unmerged. Heads are emitted in their graph's order, each node as
    soon as what it reads exists, so a head reads a trunk value before a later trunk op could
    change it in place."""

    def __init__(self, graphs: Sequence[fx.GraphModule], analysis: Analysis, layouts: Layouts,
                 trunk: set[str], shared_output: bool, pairing: Pairing,
                 spread: Sequence[bool] = ()):
        self.graphs, self.analysis, self.layouts, self.trunk = graphs, analysis, layouts, trunk
        self.shared_output, self.pairing = shared_output, pairing
        self.spread = list(spread) or [False] * len(graphs)
        self.graph = fx.Graph()
        self.root: dict[str, Any] = {}
        self.trunk_env: dict[str, fx.Node] = {}
        self.untied: dict[str, str] = {}  # get_attr target -> the trunk's own name (`_untied`)
        self.head_env: list[dict[str, fx.Node]] = [{} for _ in graphs]
        # graph k's name -> graph 0's name, for the nodes of graph k that the trunk computes
        self.images = [pairing.images(k, trunk) for k in range(len(graphs))]
        self.fresh_copies = any(has_inplace(g) for g in graphs)
        self.targets = {n.target for g in graphs for n in g.graph.nodes
                        if n.op in ("call_module", "get_attr")}
        # a merged model being extended (spread) keeps its heads' names and numbers; the other
        # models' heads are numbered after its outputs
        self.offset = 0
        if self.spread[0]:
            out = next(n for n in graphs[0].graph.nodes if n.op == "output")
            self.offset = len(out.args[0]) - 1
        own = {n.target for g in graphs[1:] for n in g.graph.nodes
               if n.op in ("call_module", "get_attr")}
        self.trunk_targets = {n.target for n in graphs[0].graph.nodes
                              if n.name in trunk and n.op in ("call_module", "get_attr")}
        # the modules the trunk calls: a get_attr of one of their tensors (a forward that reads
        # `self.proj.weight.dtype`) must read the merged module's own tensor
        self.trunk_modules = {n.target: n for n in graphs[0].graph.nodes
                              if n.name in trunk and n.op == "call_module"}
        self.prefix = _head_prefix((own | self.trunk_targets) if self.spread[0] else self.targets)
        self.device = next((p.device for p in graphs[0].parameters()), torch.device("cpu"))
        self.pending = [[n for n in g.graph.nodes
                         if n.op != "output" and n.name not in self.images[k]]
                        for k, g in enumerate(graphs)]

    # -- trunk --------------------------------------------------------------------------------
    def emit_trunk(self, node: fx.Node) -> None:
        target = self._untied(node)
        if node.op in ("call_module", "get_attr") and target not in self.root:
            self.root[target] = self._merged(node, own=target != node.target)
        self.trunk_env[node.name] = self.graph.node_copy(node, lambda n: self.trunk_env[n.name])
        self.trunk_env[node.name].target = target
        self.trunk_env[node.name].meta["fxzip_origin"] = (None, node.name)  # graph 0's node

    def _untied(self, node: fx.Node) -> Any:
        """The target the trunk reads for `node`: its own, or, for a get_attr of a tensor of a
        module the trunk calls that an op reads in a way of its own (a weight the analysis
        recorded uses for under the get_attr's name: an output layer tied to an embedding by
        `F.linear(h, self.embed.weight)`), a fresh name for its own merged tensor. The module
        keeps its merged tensor, the op gets its own: the tie is undone."""
        owner = node.target.rpartition(".")[0] if isinstance(node.target, str) else ""
        if node.op != "get_attr" or owner not in self.trunk_modules or \
                not self.analysis.param_uses.get(node.target):
            return node.target
        if node.target not in self.untied:
            self.untied[node.target] = self._fresh("fxzip_untied_" + node.target.replace(".", "_"))
        return self.untied[node.target]

    def _merged(self, node: fx.Node, own: bool = False) -> Any:
        """The merged module or tensor of a trunk node; `own`: a get_attr's own merged tensor
        (see `_untied`), never the module's."""
        owner, _, attribute = node.target.rpartition(".")
        if node.op == "get_attr" and owner in self.trunk_modules and not own:
            if owner not in self.root:  # the same tensor object as the module's: one merge
                self.root[owner] = self._merged(self.trunk_modules[owner])
            return getattr(self.root[owner], attribute)
        uses = self.analysis.param_uses.get(node.target, [])
        partners = [self.pairing.node(k, node.name).target for k in range(len(self.graphs))]
        if node.op == "call_module":
            return merge_module([g.get_submodule(t) for g, t in zip(self.graphs, partners)], uses,
                                self.layouts)
        values = [module_attribute(g, t) for g, t in zip(self.graphs, partners)]
        if not isinstance(values[0], torch.Tensor):
            return copy.deepcopy(values[0])
        merged = merge_tensor(values, [u for u in uses if u.param == ""], self.layouts)
        if isinstance(values[0], nn.Parameter):
            return nn.Parameter(merged, requires_grad=values[0].requires_grad)
        return merged

    # -- heads --------------------------------------------------------------------------------
    def emit_head(self, node: fx.Node, k: int) -> fx.Node:
        """Model k's own node (of graph k), with model k's own module or parameter."""
        target = node.target
        if node.op in ("call_module", "get_attr"):
            if not self.spread[k] or node.target in self.trunk_targets:
                target = f"{self.prefix}.{k + self.offset}.{node.target}"
            if target not in self.root:
                source = self.graphs[k]
                value = source.get_submodule(node.target) if node.op == "call_module" \
                    else module_attribute(source, node.target)
                self.root[target] = copy.deepcopy(value)
        args = fx.node.map_arg(node.args, lambda n: self.value(n, k))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: self.value(n, k))
        new = self.graph.create_node(node.op, target, args, kwargs, name=f"{node.name}_{k}")
        new.meta["fxzip_origin"] = (k, node.name)  # model k's own node (graph k's name)
        self.head_env[k][node.name] = new
        return new

    def _fresh(self, name: str) -> str:
        """`name`, or `name_2`, `name_3`, ... where it is taken by a module or attribute."""
        fresh, number = name, 1
        while fresh in self.root or fresh in self.targets:
            number += 1
            fresh = f"{name}_{number}"
        return fresh

    def ready(self, node: fx.Node, k: int) -> bool:
        return all(n.name in self.head_env[k] or self.images[k].get(n.name) in self.trunk_env
                   for n in node.all_input_nodes)

    def flush(self, k: int) -> None:
        """Emit model k's head nodes, in its graph's order, as far as their inputs exist."""
        pending = self.pending[k]
        done = 0
        while done < len(pending) and self.ready(pending[done], k):
            if pending[done].name not in self.head_env[k]:
                self.emit_head(pending[done], k)
            done += 1
        del pending[:done]

    def value(self, node: fx.Node, k: int) -> fx.Node:
        """What model k's head reads for its node `node`: its own copy, or the trunk's value of
        the partner node, unmerged into model k's features."""
        if node.name in self.head_env[k]:
            return self.head_env[k][node.name]
        name = self.images[k][node.name]
        info = self.analysis.infos.get(name)
        trunk_value = self.trunk_env[name]
        if node.op == "get_attr" or (not isinstance(info, Feat) and info is not SHARED):
            return self.emit_head(node, k)  # parameters and shape values: recomputed per model
        if isinstance(info, Feat) and not self.layouts.is_identity(info):
            unmerge = self._fresh(f"fxzip_rezip_{name}" if self.spread[k]
                                  else f"fxzip_unmerge_{k + self.offset}_{name}")
            if self.layouts.is_dense(info):  # x_k = U_k x along the channel axis
                dtype = trunk_value.meta.get("tensor_meta")
                matrix = self.layouts.matrix(info, k, "U")
                self.root[unmerge] = matrix.to(self.device, getattr(dtype, "dtype", torch.float32))
                product = self.graph.call_function(
                    torch.tensordot, (self.graph.get_attr(unmerge), trunk_value),
                    {"dims": ([1], [info.axis])})
                value = self.graph.call_function(torch.movedim, (product, 0, info.axis))
            else:
                self.root[unmerge] = self.layouts.index(info, k, self.device)
                index = self.graph.get_attr(unmerge)
                value = self.graph.call_function(torch.index_select,
                                                 (trunk_value, info.axis, index))
        elif self.fresh_copies:  # a head's in-place op must not reach the other heads
            value = self.graph.call_method("clone", (trunk_value,))
        else:
            return trunk_value
        self.head_env[k][node.name] = value
        return value

    def _structured(self, value: Any, k: int) -> Any:
        """Model k's outputs in its own structure where its graph returns them flat (an exported
        graph: a `ModelOutput`, a dict), so code written for the model reads a head alike."""
        spec = getattr(self.graphs[k], "fxzip_out_spec", None)
        if spec is None:
            return value
        name = self._fresh(f"fxzip_out_spec_{k + self.offset}")
        self.root[name] = spec
        return self.graph.call_function(pytree.tree_unflatten,
                                        (list(value), self.graph.get_attr(name)))

    # -- whole graph --------------------------------------------------------------------------
    def run(self) -> fx.GraphModule:
        heads = range(len(self.graphs))
        for node in self.analysis.nodes:
            if node.name in self.trunk and node.op != "output":
                self.emit_trunk(node)
                for k in heads:
                    self.flush(k)
        if self.shared_output:
            out = next(n for n in self.analysis.nodes if n.op == "output")
            self.graph.output(self._structured(
                fx.node.map_arg(out.args[0], lambda n: self.trunk_env[n.name]), 0))
        else:
            outputs: list[Any] = []
            for k in heads:
                self.flush(k)
                if self.pending[k]:
                    raise RuntimeError(f"fxzip internal error: head {k} cannot be emitted from "
                                       f"node '{self.pending[k][0].name}' on")
                out = next(n for n in self.graphs[k].graph.nodes if n.op == "output")
                value = fx.node.map_arg(out.args[0], lambda n: self.value(n, k))
                outputs.extend(value if self.spread[k] else [self._structured(value, k)])
            self.graph.output(tuple(outputs))
        for node in list(self.graph.nodes):  # a trunk parameter only the heads read (an
            if node.op == "get_attr" and not node.users:  # exported graph reads them all first)
                self.graph.erase_node(node)
        self.graph.lint()
        merged = fx.GraphModule(self.root, self.graph, "ZippedModel").eval()
        # what a later merge needs to zip another model into this one's trunk
        merged.fxzip_trunk = sorted(self.trunk_env[n].name for n in self.trunk)
        # the trunk's own copies of tied tensors, by the name they were read under (`to_model`)
        merged.fxzip_untied = {fresh: target for target, fresh in self.untied.items()}
        return merged


def rewrite(graphs: Sequence[fx.GraphModule], analysis: Analysis, matches: dict[int, Match],
            trunk: set[str], *, pairing: Pairing, shared_output: bool = False,
            spread: Sequence[bool] = ()) -> fx.GraphModule:
    """Emit the merged model for one trunk (an ancestor-closed set of graph 0's node names, all
    paired in every graph by `pairing`, `fxzip.graph.pairing.pair_graphs(graphs)`). With `shared_output` the
    trunk is the whole graph and its output is returned once, unchanged. Otherwise the output is
    the tuple of every model's own output; a model whose `spread` is true (a merged model being
    extended) contributes its tuple's items."""
    layouts = Layouts(analysis, matches, len(graphs))
    return _Emitter(graphs, analysis, layouts, trunk, shared_output, pairing, spread).run()
