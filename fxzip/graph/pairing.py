"""Pairing: which node of model k's graph plays the part of each node of model 0's graph.

Models need not be isomorphic: they are merged where they share a trunk, and may differ past it
(heads, class counts, wrappers and names). `pair_graphs` walks graph 0 in topological order and
maps each node to the node of graph k that applies the same op (function, method, or module of the
same type, configuration and parameter shapes) with the same constants to the already-mapped
inputs and gives a tensor of the same shape. What is mapped is ancestor-closed: a node whose
inputs are not all mapped is not mapped. For models of one architecture every node maps to the
node of the same name (the trivial case); every pass reads model k's nodes through this mapping.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ..errors import ArchitectureMismatchError
from .nodes import module_attribute
from .shapes import tensor_shape


@dataclass(frozen=True)
class Difference:
    """Why a node of graph 0 has no partner in graph k: the closest candidate (None: no node of
    graph k reads the mapped inputs) or an unmapped input."""

    node: str
    description: str
    candidate: str | None
    candidate_description: str
    unmapped_input: str | None = None


@dataclass
class Pairing:
    """For every model k, graph 0's node names → graph k's node names (k = 0: the identity), and
    for each unmapped node of graph 0 the `Difference` that stopped it."""

    graphs: list[fx.GraphModule]
    maps: list[dict[str, str]]
    differences: list[dict[str, Difference]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._nodes = [{n.name: n for n in g.graph.nodes} for g in self.graphs]

    @property
    def num_models(self) -> int:
        return len(self.graphs)

    def is_identity(self, k: int) -> bool:
        """Whether graph k pairs node for node, name for name, with graph 0."""
        return (len(self._nodes[0]) == len(self._nodes[k]) == len(self.maps[k]) + 1
                and all(a == b for a, b in self.maps[k].items()))

    def name(self, k: int, name: str) -> str:
        """The name in graph k of graph 0's node `name` (KeyError if it has no partner)."""
        return self.maps[k][name]

    def node(self, k: int, name: str) -> fx.Node:
        return self._nodes[k][self.maps[k][name]]

    def shared(self) -> set[str]:
        """Graph 0's nodes that have a partner in every graph."""
        names = set(self._nodes[0])
        for m in self.maps[1:]:
            names &= set(m)
        return names

    def images(self, k: int, names: Iterable[str]) -> dict[str, str]:
        """Graph k's name → graph 0's name, for the given graph-0 names."""
        return {self.maps[k][n]: n for n in names}

    def check_trunk(self, trunk: set[str], stop_points: Sequence[str], label: str) -> None:
        """Every node of the trunk must have a partner in every model; otherwise name the first
        node that differs, its counterpart, and the last stop point all models share."""
        order = list(self._nodes[0])
        for k in range(1, self.num_models):
            missing = [n for n in order if n in trunk and n not in self.maps[k]]
            if not missing:
                continue
            diff = self._root_difference(k, missing[0])
            theirs = (f"model {k}'s node '{diff.candidate}' [{diff.candidate_description}]"
                      if diff.candidate else f"nothing in model {k} [{diff.candidate_description}]")
            raise ArchitectureMismatchError(
                f"model 0 and model {k} differ at node '{diff.node}' inside the trunk zipped for "
                f"{label}: model 0's [{diff.description}] vs {theirs}. Models are zipped only "
                f"where they share one architecture; {self.suggestion(stop_points)}")

    def _root_difference(self, k: int, name: str) -> Difference:
        diff = self.differences[k][name]
        while diff.unmapped_input is not None and diff.unmapped_input in self.differences[k]:
            diff = self.differences[k][diff.unmapped_input]
        return diff

    def last_shared_stop(self, stop_points: Sequence[str]) -> str | None:
        """The last valid stop point of graph 0 that every model shares (mapping is
        ancestor-closed, so a shared node's whole trunk is shared)."""
        shared = self.shared()
        placeholders = {n for n, node in self._nodes[0].items() if node.op == "placeholder"}
        last = None
        for name in self._nodes[0]:
            if name in shared and name in stop_points and name not in placeholders:
                last = name
        return last

    def last_shared_block(self, stop_points: Sequence[str]) -> str | None:
        """The last block of graph 0 (a module that runs more than one node, such as "layer2")
        whose last node is a stop point all models share."""
        shared, valid = self.shared(), set(stop_points)
        last_node: dict[str, str] = {}
        count: dict[str, int] = {}
        for node in self._nodes[0].values():
            for module in node.meta.get("nn_module_stack", {}):
                last_node[module] = node.name
                count[module] = count.get(module, 0) + 1
        order = {n: i for i, n in enumerate(self._nodes[0])}
        best = None
        for module, name in last_node.items():
            if not module or count[module] < 2 or name not in shared or name not in valid:
                continue
            key = (order[name], -len(module))
            if best is None or key > best[0]:
                best = (key, module)
        return None if best is None else best[1]

    def suggestion(self, stop_points: Sequence[str]) -> str:
        node, block = self.last_shared_stop(stop_points), self.last_shared_block(stop_points)
        if node is None:
            return ("they share no stop point: give models built from the same architecture "
                    "(past the stop point they may differ)")
        also = f"; the last whole block they share is stop_at='{block}'" if block else ""
        return (f"the last stop point all models share is stop_at='{node}'{also}. Merge with one "
                "of those or an earlier stop point; past it each model keeps its own head")


def describe(gm: fx.GraphModule, node: fx.Node) -> str:
    """A node's op, target, module configuration and output shape, for error messages."""
    if node.op == "call_module":
        what = module_signature(gm, node)
    elif node.op == "get_attr":
        what = f"parameter {node.target}"
    else:
        what = node.target if isinstance(node.target, str) else getattr(node.target, "__name__",
                                                                          str(node.target))
    return f"{node.op} {what} -> {tensor_shape(node)}"


def module_signature(gm: fx.GraphModule, node: fx.Node) -> str:
    module = gm.get_submodule(node.target)
    return f"{type(module).__name__}({module.extra_repr()})"


def _parameter_shapes(module: torch.nn.Module) -> list[tuple]:
    return [(name, tuple(t.shape)) for name, t in
            [*module.named_parameters(), *module.named_buffers()]]


def _shapes(meta: Any) -> Any:
    """The shapes in a ShapeProp `tensor_meta` (nested for tuple outputs)."""
    if meta is None:
        return None
    if hasattr(meta, "shape"):
        return (tuple(meta.shape), getattr(meta, "dtype", None))
    if isinstance(meta, (list, tuple)):
        return tuple(_shapes(m) for m in meta)
    if isinstance(meta, dict):
        return {k: _shapes(v) for k, v in meta.items()}
    return None


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # tensors and other values without a plain equality
        return a is b


def _same_op(ga: fx.GraphModule, a: fx.Node, gb: fx.GraphModule, b: fx.Node) -> bool:
    if a.op != b.op:
        return False
    if a.op == "call_module":
        ma, mb = ga.get_submodule(a.target), gb.get_submodule(b.target)
        return (type(ma) is type(mb) and ma.extra_repr() == mb.extra_repr()
                and _parameter_shapes(ma) == _parameter_shapes(mb))
    if a.op == "get_attr":
        va, vb = module_attribute(ga, a.target), module_attribute(gb, b.target)
        if isinstance(va, torch.Tensor) or isinstance(vb, torch.Tensor):
            return (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)
                    and va.shape == vb.shape and va.dtype == vb.dtype)
        return type(va) is type(vb)
    return a.target == b.target


def _pair_two(ga: fx.GraphModule,
              gb: fx.GraphModule) -> tuple[dict[str, str], dict[str, Difference]]:
    nodes_b = list(gb.graph.nodes)
    position = {n: i for i, n in enumerate(nodes_b)}
    by_name_b = {n.name: n for n in nodes_b}
    forward: dict[fx.Node, fx.Node] = {}
    taken: set[fx.Node] = set()
    differences: dict[str, Difference] = {}
    placeholders_b = [n for n in nodes_b if n.op == "placeholder"]
    sources_b = [n for n in nodes_b
                 if n.op not in ("placeholder", "output") and not n.all_input_nodes]
    placeholder_index = 0
    for a in ga.graph.nodes:
        if a.op == "output":
            continue
        if a.op == "placeholder":
            if placeholder_index < len(placeholders_b):
                b = placeholders_b[placeholder_index]
                if tensor_shape(a) == tensor_shape(b):
                    forward[a], taken = b, taken | {b}
                else:
                    differences[a.name] = Difference(a.name, describe(ga, a), b.name,
                                                     describe(gb, b))
            else:
                differences[a.name] = Difference(a.name, describe(ga, a), None, "no such input")
            placeholder_index += 1
            continue
        unmapped = [n for n in a.all_input_nodes if n not in forward]
        if unmapped:
            differences[a.name] = Difference(a.name, describe(ga, a), None, "", unmapped[0].name)
            continue
        inputs = a.all_input_nodes
        if inputs:
            candidates = sorted((u for u in forward[inputs[0]].users if u not in taken),
                                key=position.__getitem__)
        else:
            candidates = [n for n in sources_b if n not in taken]
        same_name = by_name_b.get(a.name)
        if same_name in candidates:  # models of one architecture: the node of the same name first
            candidates.remove(same_name)
            candidates.insert(0, same_name)
        args = fx.node.map_arg(a.args, forward.__getitem__)
        kwargs = fx.node.map_arg(a.kwargs, forward.__getitem__)
        match = next((b for b in candidates
                      if _same_op(ga, a, gb, b) and _equal(args, b.args)
                      and _equal(kwargs, b.kwargs)
                      and _shapes(a.meta.get("tensor_meta")) == _shapes(b.meta.get("tensor_meta"))),
                     None)
        if match is None:
            closest = next((b for b in candidates if b.op == a.op),
                           candidates[0] if candidates else None)
            differences[a.name] = Difference(
                a.name, describe(ga, a), closest.name if closest is not None else None,
                describe(gb, closest) if closest is not None else "no node reads the same inputs")
            continue
        forward[a] = match
        taken.add(match)
    return {a.name: b.name for a, b in forward.items()}, differences


def pair_graphs(graphs: Sequence[fx.GraphModule]) -> Pairing:
    """The structural pairing of every graph with graph 0."""
    identity = {n.name: n.name for n in graphs[0].graph.nodes if n.op != "output"}
    maps, differences = [identity], [{}]
    for gb in graphs[1:]:
        forward, diff = _pair_two(graphs[0], gb)
        maps.append(forward)
        differences.append(diff)
    return Pairing(list(graphs), maps, differences)
