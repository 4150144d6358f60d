"""Analysis pass: infer the feature spaces (merge sites) of a traced graph from the op-rule table.

The result, `Analysis`, is a plain printable structure: every tensor node's channel axis and
layout, the spaces with their producers, consumers, per-channel parameters and statistic taps,
the barriers, and the valid stop points.
"""
from __future__ import annotations

import difflib
import operator
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import StopPointError
from ..graph.nodes import is_inplace
from ..graph.shapes import tensor_shape
from ..rules import timm as timm_rules  # importing fxzip.rules fills the op-rule table
from ..rules.layout import BLOCKED, SHARED, Feat, Lazy, Stacked
from ..rules.api import BLOCKS_META, SPLIT_META, Barrier, Context, ParamUse, SplitRequest, rule_for

MAX_SPLIT_ROUNDS = 64


@dataclass(frozen=True)
class Tap:
    """Where statistics of a space are read: `size` channels at element `offset` of `node`'s axis."""

    node: str
    axis: int
    offset: int
    size: int
    expand: int


@dataclass
class Space:
    """One merge site: features that must share one matching."""

    id: int
    size: int
    pinned: bool
    producers: list[str] = field(default_factory=list)
    per_channel: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    taps: list[Tap] = field(default_factory=list)


@dataclass(frozen=True)
class HeadGroup:
    """Spaces split into `heads` equal groups of features that must be matched group to group:
    features never move between groups and all the spaces pair the groups the same way (the
    query/key and value spaces of one attention; the input and output of grouped convolutions)."""

    spaces: tuple[int, ...]
    heads: int
    kind: str
    fixed: tuple[int, ...] = ()  # spaces whose features stay in place within heads (rotary, …)
    # grouped-query attention: (space, factor, kv space or None) for each space split into
    # heads·factor heads, `factor` query heads per head of the group (paired within it alike);
    # its features within a head follow the kv space's (queries follow keys, outputs values)
    inner: tuple[tuple[int, int, int | None], ...] = ()

    def inner_of(self, spaces: list[int]) -> list[tuple[int, int | None]]:
        """(factor, index in `spaces` of the kv space it follows, or None) per space."""
        found = {s: (f, b) for s, f, b in self.inner}
        out = []
        for s in spaces:
            factor, base = found.get(s, (1, None))
            out.append((factor, spaces.index(base) if base in spaces else None))
        return out


@dataclass(frozen=True)
class BarrierInfo:
    node: str
    op: str
    reason: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op}): {self.reason}"


def check_stop_at(stop_at: Any) -> None:
    """StopPointError unless `stop_at` has the form of a stop point: None, a node or module name,
    or a number of layers (whether the model has it is `Analysis.trunk`'s to say)."""
    if stop_at is not None and (isinstance(stop_at, bool) or not isinstance(stop_at, (int, str))):
        raise StopPointError(f"stop_at must be None, a node or module name, or a number of "
                             f"layers; got {stop_at!r}")


class Analysis:
    """The feature spaces of one traced model, printable and queryable."""

    def __init__(self, gm: fx.GraphModule):
        timm_rules.register()  # timm's layers, those of the timm modules imported
        self.gm = gm
        self.nodes: list[fx.Node] = list(gm.graph.nodes)
        for _ in range(MAX_SPLIT_ROUNDS):
            ctx = self._walk()
            if not self._open_split_spaces(ctx):
                break
        self.uf = ctx.uf
        self.infos: dict[str, Any] = {
            name: ctx.uf.resolve(i) if isinstance(i, Feat) else i for name, i in ctx.infos.items()}
        self.param_uses: dict[str, list[ParamUse]] = defaultdict(list)
        for use in ctx.uses.values():
            self.param_uses[use.target].append(
                ParamUse(use.target, use.param, use.axis, ctx.uf.resolve(use.feat), use.role,
                         use.groups))
        self.layers: list[str] = [n.name for n in self.nodes if n.name in ctx.produced]
        # every weight layer of the model, those past a barrier included (n/m's m)
        self.all_layers: list[str] = [n.name for n in self.nodes
                                      if n.name in ctx.produced or _is_weight_layer(gm, n)]
        self.spaces: dict[int, Space] = self._collect_spaces(ctx)
        self.head_groups: list[HeadGroup] = _joined_groups(ctx)
        # tensors split into attention heads are not cut between trunk and heads (`_inside_heads`)
        self.stop_points: list[str] = [
            n.name for n in self.nodes if n.op != "output"
            and self.infos.get(n.name) is not BLOCKED and not _inside_heads(self.infos.get(n.name))]

    # -- the walk -----------------------------------------------------------------------------
    def _walk(self) -> Context:
        ctx = Context(self.gm)
        self.barriers: list[BarrierInfo] = []
        self.split_requests: list[dict[int, set[int]]] = []
        for node in self.nodes:
            ctx.infos[node.name] = self._visit(ctx, node)
        return ctx

    def _open_split_spaces(self, ctx: Context) -> bool:
        """Where ops split a space that a single layer's output opens, have that layer open one
        space per piece (SPLIT_META) for the next walk. True if anything changed."""
        cuts: dict[int, set[int]] = defaultdict(set)
        for request in self.split_requests:
            for space, offsets in request.items():
                cuts[ctx.uf.find(space)] |= offsets
        changed = False
        for name, feat in ctx.produced.items():
            node = next(n for n in self.nodes if n.name == name)
            if node.meta.get(BLOCKS_META) or any(b.expand != 1 for b in feat.blocks):
                continue
            bounds = {0, feat.width}
            for block, start in zip(feat.blocks, feat.offsets()):
                bounds.add(start)
                bounds |= {start + c for c in cuts.get(ctx.uf.find(block.space), ())}
            bounds = sorted(bounds)
            pieces = [b - a for a, b in zip(bounds, bounds[1:])]
            if len(pieces) > len(feat.blocks) and node.meta.get(SPLIT_META) != pieces:
                node.meta[SPLIT_META] = pieces
                changed = True
        return changed

    def _visit(self, ctx: Context, node: fx.Node) -> Any:
        if node.op == "placeholder":
            return SHARED
        if node.op == "get_attr":
            shape = tensor_shape(node)
            if shape is None:
                return None
            # an integer or boolean tensor (position ids, a relative position index, a mask)
            # never carries features: like an input's ids it is the same role in every model;
            # nor does a constant that torch.export lifted out of the forward code
            if _is_index(node) or _is_lifted_constant(node):
                return SHARED
            return Lazy(node.name, tuple(range(len(shape))))
        if node.op == "output":
            return None
        inputs = [ctx.info(n) for n in node.all_input_nodes]
        if any(i is BLOCKED for i in inputs):
            return BLOCKED
        module = ctx.module(node) if node.op == "call_module" else None
        rule = rule_for(node, module)
        tx = ctx.begin()  # what the rule records counts only if it returns
        try:
            info = self._unknown(node, module, inputs) if rule is None else rule(tx, node)
        except Barrier as barrier:
            if isinstance(barrier, SplitRequest):  # cuts in spaces the rule itself opened go too
                self.split_requests.append({space: cuts for space, cuts in barrier.cuts.items()
                                            if space in ctx.uf.parent})
            self.barriers.append(BarrierInfo(node.name, _op_name(node, module), str(barrier)))
            return BLOCKED
        tx.commit()
        return info

    @staticmethod
    def _unknown(node: fx.Node, module: nn.Module | None, inputs: list[Any]) -> Any:
        """Ops outside the table: harmless on shared values, a barrier on anything per model."""
        has_params = module is not None and any(True for _ in module.parameters())
        if has_params or any(i is not SHARED and i is not None for i in inputs):
            raise Barrier("this op is not in fxzip's op-rule table and reads per-model features")
        if tensor_shape(node) is not None:
            return SHARED
        meta = node.meta.get("tensor_meta")
        if isinstance(meta, (tuple, list)):  # several tensors (meshgrid of aranges): each shared
            return tuple(SHARED if hasattr(m, "shape") else None for m in meta)
        return None

    def _collect_spaces(self, ctx: Context) -> dict[int, Space]:
        uf = ctx.uf
        spaces: dict[int, Space] = {}

        def space(i: int) -> Space:
            root = uf.find(i)
            if root not in spaces:
                spaces[root] = Space(root, uf.sizes[root], uf.pinned[root])
            return spaces[root]

        for name, feat in ctx.produced.items():
            for b in feat.blocks:
                space(b.space).producers.append(name)
        producer_targets = {n.target for n in self.nodes if n.name in ctx.produced}
        for uses in self.param_uses.values():
            for use in uses:
                for b in use.feat.blocks:
                    space(b.space)  # every space a parameter runs along is known
                if use.role == "M" and use.target not in producer_targets:
                    for b in use.feat.blocks:
                        s = space(b.space)
                        if use.target not in s.per_channel:
                            s.per_channel.append(use.target)
        for consumer, source, feat in ctx.consumed:
            feat = uf.resolve(feat)
            for b, offset in zip(feat.blocks, feat.offsets()):
                s = space(b.space)
                if consumer not in s.consumers:
                    s.consumers.append(consumer)
                tap = Tap(source, feat.axis, offset, b.size, b.expand)
                if tap not in s.taps:
                    s.taps.append(tap)
        for s in spaces.values():
            if not s.taps:  # no layer reads it: take its producers' outputs
                s.taps = _producer_taps(ctx, s)
        return dict(sorted(spaces.items()))

    # -- queries ------------------------------------------------------------------------------
    def feat(self, name: str) -> Feat | None:
        info = self.infos.get(name)
        return info if isinstance(info, Feat) else None

    def mergeable_spaces(self) -> list[int]:
        return [s.id for s in self.spaces.values() if not s.pinned and s.taps]

    def output_spaces(self) -> set[int]:
        out = next(n for n in self.nodes if n.op == "output")
        spaces: set[int] = set()
        for n in out.all_input_nodes:
            feat = self.feat(n.name)
            if feat:
                spaces.update(b.space for b in feat.blocks)
        return spaces

    def _ancestors(self, names: list[str]) -> set[str]:
        """`names` and every node they read, directly or not, closed under mutation: an op that
        writes in place into a tensor of the set (or into a view of one: `mask[:, :3] += 1`,
        torch.export's `fill_` of a slice) joins it with what it reads, so that the trunk
        computes the tensor with its writes (a write left to the heads would change each head's
        copy, never the trunk's tensor)."""
        by_name = {n.name: n for n in self.nodes}
        seen: set[str] = set()
        stack = list(names)
        writes = self._writes()
        while True:
            while stack:
                name = stack.pop()
                if name in seen:
                    continue
                seen.add(name)
                stack.extend(n.name for n in by_name[name].all_input_nodes)
            stack = [write for write, base in writes if base in seen and write not in seen]
            if not stack:
                return seen

    def _writes(self) -> list[tuple[str, str]]:
        """(node, base) for every node that writes in place into a tensor that later ops may
        read without reading the node: into a view of `base`, or into `base` itself where the
        graph does not route `base`'s later readers through the write (an ATen op, `x[i] = v`;
        `fxzip.graph.nodes.route_through_inplace_ops` routes the others)."""
        if not hasattr(self, "_writes_found"):
            found = []
            for n in self.nodes:
                if not _writes_in_place(self.gm, n):
                    continue
                base = _view_base(n.args[0])
                if base is not n.args[0] or not is_inplace(n, self.gm):
                    found.append((n.name, base.name))
            self._writes_found = found
        return self._writes_found

    def descendants(self, names: set[str]) -> set[str]:
        """`names` and every node that reads them, directly or not (graph order)."""
        seen = set(names)
        for node in self.nodes:
            if any(n.name in seen for n in node.all_input_nodes):
                seen.add(node.name)
        return seen

    def resolve_stop(self, stop_at: Any) -> str:
        """The node that `stop_at` designates: a node name, or a module's qualified name (a leaf
        or a container such as "layer3"), meaning the last node computed inside that module."""
        names = {n.name for n in self.nodes}
        if stop_at in names:
            return stop_at
        inside = [n.name for n in self.nodes
                  if stop_at in n.meta.get("nn_module_stack", {})
                  or (n.op == "call_module" and n.target == stop_at)]
        if inside:
            return inside[-1]
        close = difflib.get_close_matches(str(stop_at), self.stop_modules() + self.stop_points,
                                          n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise StopPointError(
            f"stop_at={stop_at!r} names no node or module of the traced graph{hint}. Valid stop "
            f"points include: {self._some_stop_points()}. `fxzip.analyze(model, x)` lists all of "
            "them.")

    def stop_modules(self) -> list[str]:
        """The modules (qualified names, from the nodes' module stacks) whose last node is a stop
        point, in graph order: the names `stop_at` takes that people know ("layer3",
        "model.layers.3")."""
        last: dict[str, str] = {}
        for node in self.nodes:
            for path in node.meta.get("nn_module_stack") or {}:
                if path:
                    last[path] = node.name
        valid, order = set(self.stop_points), {n.name: i for i, n in enumerate(self.nodes)}
        return sorted((p for p, n in last.items() if n in valid), key=lambda p: order[last[p]])

    def _some_stop_points(self) -> str:
        named = [n.name for n in self.nodes if n.name in set(self.stop_points) and n.op == "call_module"]
        named = named or self.stop_modules()  # an exported graph calls no modules: their paths
        shown = named[:6] + (["..."] if len(named) > 9 else []) + named[-3:] if len(named) > 9 else named
        return ", ".join(shown) or ", ".join(self.stop_points[:8])

    def trunk(self, stop_at: Any) -> set[str]:
        """Names of the nodes zipped for a stop point (see `fxzip.merge`): an ancestor-closed set."""
        placeholders = {n.name for n in self.nodes if n.op == "placeholder"}
        if stop_at is None:
            outputs = self.output_spaces()
            forced = {name for name in self.layers
                      if any(b.space in outputs for b in self.infos[name].blocks)}
            forced |= {n.name for n in self.nodes if self.infos.get(n.name) is BLOCKED}
            while True:  # a tensor split into heads stays on one side: its readers' side
                head = self.descendants(forced)
                cut = {n.name for n in self.nodes if n.name not in head
                       and _inside_heads(self.infos.get(n.name))
                       and any(u.name in head for u in n.users)}
                # a tensor written in place by a head's op is the heads' too (`_ancestors`)
                cut |= {base for write, base in self._writes()
                        if write in head and base not in head}
                if not cut:
                    return {n.name for n in self.nodes if n.op != "output" and n.name not in head}
                forced |= cut
        check_stop_at(stop_at)
        if isinstance(stop_at, int):
            if not 0 <= stop_at <= len(self.all_layers):
                raise StopPointError(f"stop_at={stop_at} layers, but the model has "
                                     f"{len(self.all_layers)} weight layers; use "
                                     f"0..{len(self.all_layers)}")
            trunk = self._ancestors(self.all_layers[:stop_at]) | placeholders
            label = f"the first {stop_at} layers"
        else:
            node = self.resolve_stop(stop_at)
            trunk = self._ancestors([node]) | placeholders
            label = f"'{node}'"
        split = [n.name for n in self.nodes if n.name in trunk
                 and _inside_heads(self.infos.get(n.name)) and any(u.name not in trunk for u in n.users)]
        if split:
            raise StopPointError(f"cannot zip up to {label}: the merged part would end inside "
                                 f"attention heads ('{split[0]}'); stop before or after the "
                                 "attention")
        blocked = [b for b in self.barriers if b.node in trunk]
        if blocked or any(self.infos.get(n) is BLOCKED for n in trunk):
            barrier = blocked[0] if blocked else self.barriers[0]
            raise StopPointError(
                f"cannot zip up to {label}: it depends on the barrier {barrier}. Stop before it; "
                f"valid stop points include: {self._some_stop_points()}")
        return trunk

    def whole_trunk(self) -> set[str]:
        """Every node but the output: the trunk of a merge with one shared output."""
        if self.barriers:
            raise StopPointError(
                f"a shared output needs every layer zipped, but the model has the barrier "
                f"{self.barriers[0]}; merge with split heads (shared_output=False) instead")
        return {n.name for n in self.nodes if n.op != "output"}

    def spaces_of(self, trunk: set[str]) -> list[int]:
        """The non-pinned spaces a trunk touches (its tensors and its parameters)."""
        spaces: set[int] = set()
        for name in trunk:
            feat = self.feat(name)
            if feat:
                spaces.update(b.space for b in feat.blocks)
        targets = {n.target for n in self.nodes
                   if n.name in trunk and n.op in ("call_module", "get_attr")}
        for target in targets:
            for use in self.param_uses.get(target, []):
                spaces.update(b.space for b in use.feat.blocks)
        return sorted(s for s in spaces if not self.spaces[s].pinned)

    def layers_in(self, trunk: set[str]) -> int:
        """Weight layers (Linear, convolutions; depthwise ones included) inside a trunk."""
        return sum(1 for name in self.all_layers if name in trunk)

    # -- printing -----------------------------------------------------------------------------
    def __str__(self) -> str:
        lines = [f"fxzip analysis of {type(self.gm).__name__}: {len(self.nodes)} nodes, "
                 f"{len(self.all_layers)} weight layers, {len(self.spaces)} spaces, "
                 f"{len(self.barriers)} barriers"]
        lines.append("spaces:")
        for s in self.spaces.values():
            kind = "pinned (identity)" if s.pinned else "merged"
            lines.append(f"  space {s.id:3d}  width {s.size:5d}  {kind:17s}  producers: "
                         f"{', '.join(s.producers) or '-'}  consumers: {', '.join(s.consumers) or '-'}"
                         f"  taps: {', '.join(t.node for t in s.taps) or '-'}")
        for g in self.head_groups:
            lines.append(f"  {g.kind}: spaces {', '.join(map(str, g.spaces))} split into {g.heads} "
                         "groups (matched group to group)")
        lines.append("barriers:" + ("" if self.barriers else " none"))
        lines.extend(f"  {b}" for b in self.barriers)
        valid = set(self.stop_points)
        layers = [name for name in self.all_layers if name in valid]
        lines.append(f"zippable layers: {len(layers)}/{len(self.all_layers)}; stop points "
                     f"({len(self.stop_points)}): {', '.join(self.stop_points)}")
        return "\n".join(lines)

    __repr__ = __str__


_WEIGHT_LAYERS = (nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention)
_WEIGHT_FUNCTIONS = {F.linear, F.conv1d, F.conv2d, F.conv3d}


def _is_weight_layer(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A Linear or convolution (module or function): what n/m counts as a layer."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _WEIGHT_LAYERS)
    return node.op == "call_function" and node.target in _WEIGHT_FUNCTIONS


def _is_index(node: fx.Node) -> bool:
    """A node whose recorded dtype is an integer or bool: it holds ids, indices or masks, never
    features, so no space runs along it (only floating tensors are merged)."""
    dtype = getattr(node.meta.get("tensor_meta"), "dtype", None)
    return isinstance(dtype, torch.dtype) and not dtype.is_floating_point and not dtype.is_complex


def _is_lifted_constant(node: fx.Node) -> bool:
    """A tensor that the forward code creates from constants (`torch.tensor(…)`), which
    torch.export lifts into an attribute named `lifted_tensor_<n>`: the same in every model of
    the architecture, as symbolic tracing records it (a call that reads nothing per model)."""
    return isinstance(node.target, str) and \
        node.target.rsplit(".", 1)[-1].startswith("lifted_tensor_")


def _producer_taps(ctx: Context, space: Space) -> list[Tap]:
    """Taps of a space that no layer reads, on its producers' outputs: each block of the space
    where it lies on the output's channel axis (a fused projection [q | k | v] opens q, k and v
    side by side: k's statistics are its own features, not the first ones of the output)."""
    taps = []
    for name in dict.fromkeys(space.producers):
        feat = ctx.produced[name]
        for block, offset in zip(feat.blocks, feat.offsets()):
            tap = Tap(name, feat.axis, offset, block.size, block.expand)
            if ctx.uf.find(block.space) == space.id and tap not in taps:
                taps.append(tap)
    return taps


# ops whose result may share memory with their first argument (a write into the result writes
# into the argument): views, and ops that return their argument itself where they can
_VIEW_FUNCTIONS = {operator.getitem, torch.permute, torch.transpose, torch.swapaxes,
                   torch.swapdims, torch.t, torch.unsqueeze, torch.squeeze, torch.flatten,
                   torch.unflatten, torch.reshape, torch.narrow, torch.select, torch.split,
                   torch.chunk, torch.unbind, torch.tensor_split, torch.diagonal, torch.movedim,
                   torch.as_strided, torch.detach}
_VIEW_METHODS = {"view", "view_as", "reshape", "reshape_as", "expand", "expand_as", "permute",
                 "transpose", "swapaxes", "swapdims", "t", "unsqueeze", "squeeze", "flatten",
                 "unflatten", "narrow", "select", "split", "chunk", "unbind", "tensor_split",
                 "diagonal", "movedim", "as_strided", "contiguous", "detach", "unfold",
                 "__getitem__", "to", "type_as", "float", "type"}


def _writes_in_place(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether `node` writes into its first argument (a tensor of the graph): an in-place
    method, function, operator or module, an ATen op whose schema says it mutates its first
    argument (torch.export's `fill_.Tensor`, `copy_`, `index_put_`), or `x[i] = v`."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_function" and node.target is operator.setitem:
        return True
    if isinstance(node.target, torch._ops.OpOverload):
        return _aten_writes_first(node.target)
    return is_inplace(node, gm)


def _aten_writes_first(op: torch._ops.OpOverload) -> bool:
    """Whether an ATen op's schema says it writes into its first argument (`Tensor(a!) self`)."""
    arguments = op._schema.arguments
    info = arguments[0].alias_info if arguments else None
    return bool(info is not None and info.is_write)


def _view_base(value: fx.Node) -> fx.Node:
    """The tensor `value` may be a view of: followed back through views (and through in-place
    ops, which return their argument)."""
    while True:
        function = value.op == "call_function" and value.target in _VIEW_FUNCTIONS
        method = value.op == "call_method" and value.target in _VIEW_METHODS
        written = value.op in ("call_function", "call_method") and value.args and \
            isinstance(value.args[0], fx.Node) and _returns_argument(value)
        if not (function or method or written) or not value.args or \
                not isinstance(value.args[0], fx.Node):
            return value
        value = value.args[0]


def _returns_argument(node: fx.Node) -> bool:
    """An in-place op (its result is its first argument, written)."""
    if isinstance(node.target, torch._ops.OpOverload):
        return _aten_writes_first(node.target)
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return name.endswith("_") and not name.endswith("__") or node.kwargs.get("inplace") is True


def _inside_heads(info: Any) -> bool:
    """A tensor split into attention heads (or a stack of such, or heads folded into the batch
    axis), which no stop point cuts."""
    return isinstance(info, Stacked) or isinstance(info, Feat) and (info.headed or info.folded)


def _joined_groups(ctx: Context) -> list[HeadGroup]:
    """The recorded groups with resolved spaces, groups that share a space joined into one."""
    groups: list[tuple[set[int], int, str]] = []
    for spaces, heads, kind in ctx.head_groups:
        spaces = {ctx.uf.find(s) for s in spaces}
        for other in [g for g in groups if g[0] & spaces]:
            groups.remove(other)
            spaces |= other[0]
            kind = kind if kind == other[2] else f"{other[2]} + {kind}"
        groups.append((spaces, heads, kind))
    # grouped-query attention: query-side groups join their key/value group as inner heads
    inner: dict[int, dict[int, tuple[int, int | None]]] = {}  # id(group) -> space -> (f, base)
    bases = {ctx.uf.find(s): (ctx.uf.find(b), f) for s, b, f in ctx.all_repeats()}
    for sub, (base, factor) in bases.items():
        gs = next((g for g in groups if sub in g[0]), None)
        gb = next((g for g in groups if base in g[0]), None)
        if gs is None or gb is None or gs is gb:
            continue
        groups.remove(gs)
        groups.remove(gb)
        joined = (gs[0] | gb[0], gb[1], "grouped-query attention heads")
        marks = {**inner.pop(id(gb), {}), **{s: (factor, bases.get(s, (None,))[0])
                                            for s in gs[0]}}
        inner[id(joined)] = marks
        groups.append(joined)
    out = []
    for g in groups:
        spaces, heads, kind = g
        marks = inner.get(id(g), {})
        fixed = {i for i in spaces if ctx.uf.is_fixed(i)}
        fixed |= {b for s, (_, b) in marks.items() if s in fixed and b is not None}
        fixed |= {s for s, (_, b) in marks.items() if b in fixed}
        out.append(HeadGroup(tuple(sorted(spaces)), heads, kind, tuple(sorted(fixed)),
                             tuple(sorted((s, f, b) for s, (f, b) in marks.items()))))
    return out


def _op_name(node: fx.Node, module: nn.Module | None) -> str:
    if module is not None:
        return type(module).__name__
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
