"""The rule API: what an op rule sees (`Context`), what it records, and how rules are registered.

A rule takes the context and a call node and returns the node's channel info: a `Feat` (channel
axis + layout), `SHARED`, `UNTRACKED` or None (not a tensor); it raises `Barrier` when the op
mixes channels in a way zipping cannot follow. Its records (unions of spaces, parameter uses,
head groups, productions, consumptions) go into a transaction that the analysis commits only
when the rule returns, so a rule that gives up half-way leaves no trace.

This module sits at the bottom of `fxzip.rules`: the rule modules and the analysis import it,
it imports none of them.
"""
from __future__ import annotations

from collections import ChainMap
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
import torch.nn as nn

from ..graph.shapes import tensor_shape
from .layout import SHARED, UNTRACKED, Block, Feat, Lazy, LazyCat, Stacked, UnionFind

BLOCKS_META = "fxzip_blocks"  # on a projection node: the tags of its output blocks ([q | k | v])
SPLIT_META = "fxzip_split"    # on a producer node: the sizes of the spaces its output opens


class Barrier(Exception):
    """Raised by a rule: the op touches the channel axis in a way zipping cannot follow."""


class SplitRequest(Barrier):
    """A barrier that goes away if some spaces are opened as several: `cuts[space]` are feature
    offsets inside `space` where an op splits or slices the channel axis. The analysis asks the
    space's producers to open one space per piece and walks the graph again."""

    def __init__(self, message: str, cuts: dict[int, set[int]]):
        super().__init__(message)
        self.cuts = cuts


# ---------------------------------------------------------------------------------------------
# the rule table
# ---------------------------------------------------------------------------------------------

Rule = Callable[["Context", fx.Node], Any]

MODULE_RULES: dict[type, Rule] = {}
FUNCTION_RULES: dict[Any, Rule] = {}
METHOD_RULES: dict[str, Rule] = {}
HEAD_AWARE: set[Rule] = set()  # rules that follow tensors split into attention heads
FOLD_AWARE: set[Rule] = set()  # ... and heads folded into the batch axis (`Feat.folded`)


def register(*keys: Any, heads: bool = False, folds: bool = False) -> Callable[[Rule], Rule]:
    """Register one rule for module classes, functions and method names (strings); `heads`: the
    rule also follows tensors split into attention heads (headed `Feat`s, `Stacked`), which other
    rules never see (they are a barrier there); `folds` (implies `heads`): also heads folded into
    the batch axis (`Feat.folded`), which other rules never see either."""
    def deco(rule: Rule) -> Rule:
        if heads or folds:
            HEAD_AWARE.add(rule)
        if folds:
            FOLD_AWARE.add(rule)
        for key in keys:
            if isinstance(key, str):
                METHOD_RULES[key] = rule
            elif isinstance(key, type) and issubclass(key, nn.Module):
                MODULE_RULES[key] = rule
            else:
                FUNCTION_RULES[key] = rule
        return rule
    return deco


def rule_for(node: fx.Node, module: nn.Module | None) -> Rule | None:
    """The rule of a call node, or None when the op is not in the table."""
    rule = None
    if node.op == "call_module":
        rule = next((MODULE_RULES[c] for c in type(module).__mro__ if c in MODULE_RULES), None)
    elif node.op == "call_function":
        rule = FUNCTION_RULES.get(node.target)
    elif node.op == "call_method":
        rule = METHOD_RULES.get(node.target)
    if rule is None or rule in FOLD_AWARE:
        return rule
    if rule in HEAD_AWARE:
        return _unfolded(rule)
    return _headless(rule)


def _headless(rule: Rule) -> Rule:
    """A rule that does not follow attention heads: a barrier where a headed tensor reaches it."""
    def guarded(ctx: "Context", node: fx.Node) -> Any:
        for value in node.all_input_nodes:
            info = ctx.info(value)
            if isinstance(info, Stacked) or headed(info) or folded(info):
                raise Barrier(f"reads '{value.name}', split into attention heads, in a way fxzip "
                              "does not follow per head")
        return rule(ctx, node)
    return guarded


def _unfolded(rule: Rule) -> Rule:
    """A rule that follows heads but not heads folded into the batch axis: a barrier there."""
    def guarded(ctx: "Context", node: fx.Node) -> Any:
        for value in node.all_input_nodes:
            if folded(ctx.info(value)):
                raise Barrier(f"reads '{value.name}', whose attention heads are folded into the "
                              "batch axis, in a way fxzip does not follow per head")
        return rule(ctx, node)
    return guarded


def headed(info: Any) -> bool:
    return isinstance(info, Feat) and info.headed


def folded(info: Any) -> bool:
    """A layout whose heads are folded into the batch axis (`Feat.folded`)."""
    return isinstance(info, Feat) and info.folded


# ---------------------------------------------------------------------------------------------
# small helpers shared by the rules
# ---------------------------------------------------------------------------------------------

def norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """A call argument given by position or keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def nodes_in(value: Any) -> list[fx.Node]:
    """The nodes inside (nested) call arguments, in order."""
    out: list[fx.Node] = []
    fx.node.map_arg(value, lambda n: out.append(n))
    return out


def passthrough(info: Any, remap: Callable | None = None) -> Any:
    """What a shape op makes of a value without features: shared stays shared, a parameter keeps
    following its axes when `remap` (old axes -> new axes) can say how, else it is untracked."""
    if info is SHARED or info is None:
        return info
    if isinstance(info, Lazy) and remap is not None:
        moved = info.through(remap)
        return UNTRACKED if moved is None else moved
    return UNTRACKED


def split_layout(feat: Feat, sizes: list[int]) -> list[Feat]:
    """Cut a layout at element boundaries between its blocks; a cut inside a block asks for the
    block's space to be opened as pieces (SplitRequest)."""
    cuts: dict[int, set[int]] = {}
    at, ends = 0, []
    for size in sizes:
        at += size
        ends.append(at)
    start = 0
    for block in feat.blocks:
        for end in ends[:-1]:
            if start < end < start + block.width:
                if (end - start) % block.expand:
                    raise Barrier("splits the channel axis inside the positions of one channel")
                cuts.setdefault(block.space, set()).add((end - start) // block.expand)
        start += block.width
    if cuts:
        raise SplitRequest("splits the channel axis inside a feature space", cuts)
    pieces, blocks = [], list(feat.blocks)
    for size in sizes:
        taken, width = [], 0
        while blocks and width + blocks[0].width <= size:
            width += blocks[0].width
            taken.append(blocks.pop(0))
        pieces.append(Feat(feat.axis, tuple(taken)))
    if any(not p.blocks for p in pieces):
        raise Barrier("splits off an empty part of the channel axis")
    return pieces


# ---------------------------------------------------------------------------------------------
# parameters as rules see them
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ParamUse:
    """Axis `axis` of parameter `param` of `target` runs along `feat`'s layout; role M merges
    (rows, biases, per-channel tensors), role U unmerges (weight columns)."""

    target: str
    param: str
    axis: int
    feat: Feat
    role: str
    groups: int = 1  # > 1: a grouped convolution's weight, whose axis 1 holds one group's inputs


@dataclass(frozen=True)
class ParamHandle:
    """A parameter a call reads, the same to a rule whether it is a module's own (`owner`, the
    module's target, and `name`) or a value node read by get_attr, or computed from one (`node`)."""

    owner: str | None = None
    name: str = ""
    node: fx.Node | None = None

    @classmethod
    def of_module(cls, node: fx.Node, module: nn.Module, name: str) -> ParamHandle | None:
        """Parameter or buffer `name` of the module called by `node`; None where it is unset."""
        return cls(node.target, name) if getattr(module, name, None) is not None else None

    @classmethod
    def of_value(cls, value: Any) -> ParamHandle | None:
        """A functional call's parameter argument; None where it is not a node (e.g. bias=None)."""
        return cls(node=value) if isinstance(value, fx.Node) else None


# ---------------------------------------------------------------------------------------------
# the context
# ---------------------------------------------------------------------------------------------

class Context:
    """What the op rules see and record while the analysis walks the graph.

    The walker calls each rule with `begin()`, a transaction that reads through to the records
    so far and keeps its own apart; `commit()` applies them once the rule has returned."""

    def __init__(self, gm: fx.GraphModule, base: Context | None = None):
        self.gm = gm
        self.base = base
        if base is None:
            self.uf = UnionFind()
            self.infos: MutableMapping[str, Any] = {}
            self.uses: MutableMapping[tuple[str, str, int], ParamUse] = {}
            self.produced: MutableMapping[str, Feat] = {}       # producer node -> output layout
            self.module_spaces: MutableMapping[str, Feat] = {}  # weights' key -> output layout (reuse)
        else:
            self.uf = base.uf.layer()
            self.infos = ChainMap({}, base.infos)
            self.uses = ChainMap({}, base.uses)
            self.produced = ChainMap({}, base.produced)
            self.module_spaces = ChainMap({}, base.module_spaces)
        self.consumed: list[tuple[str, str, Feat]] = []  # (consumer node, input node, layout)
        self.head_groups: list[tuple[tuple[int, ...], int, str]] = []  # (spaces, heads, kind)
        self.repeats: list[tuple[int, int, int]] = []  # (query-side space, kv space, factor)

    # -- transactions -------------------------------------------------------------------------
    def begin(self) -> Context:
        """A transaction for one rule: nothing it records is seen here until `commit`."""
        return Context(self.gm, self)

    def commit(self) -> None:
        """Apply this transaction's records to the context it began from."""
        base = self.base
        self.uf.commit()
        for mine, theirs in ((self.infos, base.infos), (self.uses, base.uses),
                             (self.produced, base.produced),
                             (self.module_spaces, base.module_spaces)):
            theirs.update(mine.maps[0])
        base.consumed.extend(self.consumed)
        base.head_groups.extend(self.head_groups)
        base.repeats.extend(self.repeats)

    def all_head_groups(self) -> Iterator[tuple[tuple[int, ...], int, str]]:
        """(spaces, heads, kind) of every head group recorded so far."""
        if self.base is not None:
            yield from self.base.all_head_groups()
        yield from self.head_groups

    def all_repeats(self) -> Iterator[tuple[int, int, int]]:
        """(query-side space, key/value space, factor) of every grouped-query tie so far."""
        if self.base is not None:
            yield from self.base.all_repeats()
        yield from self.repeats

    # -- reading ------------------------------------------------------------------------------
    def info(self, value: Any) -> Any:
        return self.infos.get(value.name) if isinstance(value, fx.Node) else None

    def shape(self, node: Any) -> tuple[int, ...] | None:
        return tensor_shape(node) if isinstance(node, fx.Node) else None

    def module(self, node: fx.Node) -> nn.Module:
        return self.gm.get_submodule(node.target)

    def param_shape(self, param: ParamHandle) -> tuple[int, ...]:
        if param.node is not None:
            return self.shape(param.node)
        return tuple(getattr(self.gm.get_submodule(param.owner), param.name).shape)

    def space_key(self, param: ParamHandle) -> str:
        """What names a weight, so that a module or weight used twice opens one space."""
        if param.node is None:
            return param.owner
        info = self.info(param.node)
        return info.source if isinstance(info, Lazy) else param.node.name

    # -- recording ----------------------------------------------------------------------------
    def pinned_feat(self, axis: int, size: int) -> Feat:
        return Feat(axis, (Block(self.uf.new(size, pinned=True), size),))

    def pin(self, feat: Feat) -> None:
        for b in feat.blocks:
            self.uf.pin(b.space)

    def unify(self, a: Feat, b: Feat) -> None:
        if self.uf.unify(a, b):
            return
        message = f"ties channel layouts of different structure ({a.blocks} vs {b.blocks})"
        if a.width == b.width and all(x.expand == 1 for x in a.blocks + b.blocks):
            # Both sides cut at every block boundary of either: the common refinement.
            bounds = set(a.offsets()) | set(b.offsets())
            cuts: dict[int, set[int]] = {}
            for feat in (a, b):
                for block, start in zip(feat.blocks, feat.offsets()):
                    inner = {c - start for c in bounds if start < c < start + block.size}
                    if inner:
                        cuts.setdefault(block.space, set()).update(inner)
            if cuts:
                raise SplitRequest(message, cuts)
        raise Barrier(message)

    def produce(self, node: fx.Node, axis: int, size: int, key: str | None = None,
                pieces: tuple[int, ...] | None = None) -> Feat:
        """A new space opened by a producer; `key` (default: the module) names the weights, so
        that a module or weight used twice opens one space; `pieces`: the sizes of the spaces it
        opens at least (biases concatenated from parts)."""
        key = key or (node.target if node.op == "call_module" else node.name)
        feat = self.module_spaces.get(key)
        if feat is None:
            feat = Feat(axis, self._new_blocks(node, size, pieces))
            self.module_spaces[key] = feat
        feat = feat.moved(axis)
        self.produced[node.name] = feat
        return feat

    def _new_blocks(self, node: fx.Node, size: int,
                    at_least: tuple[int, ...] | None = None) -> tuple[Block, ...]:
        """One new space, or, where a pass tagged the output as equal blocks (e.g. [q | k | v]
        of a fused attention projection), one space per distinct tag."""
        pieces = node.meta.get(SPLIT_META)
        if not pieces and not node.meta.get(BLOCKS_META) and at_least:
            pieces = list(at_least)
        if pieces and sum(pieces) == size:
            return tuple(Block(self.uf.new(p), p) for p in pieces)
        tags = node.meta.get(BLOCKS_META)
        if not tags or size % len(tags):
            return (Block(self.uf.new(size), size),)
        width = size // len(tags)
        spaces: dict[str, int] = {}
        for tag in tags:
            spaces.setdefault(tag, self.uf.new(width))
        return tuple(Block(spaces[tag], width) for tag in tags)

    def head_group(self, spaces: tuple[int, ...], heads: int, kind: str) -> None:
        """Record spaces split into `heads` groups that must be matched group to group. Groups
        that share a space become one; they must agree on the number of groups."""
        for other, other_heads, _ in self.all_head_groups():
            shared = {self.uf.find(s) for s in other} & {self.uf.find(s) for s in spaces}
            if shared and other_heads != heads:
                raise Barrier(f"{kind} splits features into {heads} groups where another op "
                              f"splits them into {other_heads}")
        self.head_groups.append((tuple(spaces), heads, kind))

    def split_heads(self, feat: Feat, axis: int, head_axis: int, heads: int) -> Feat:
        """`feat`'s channels split into `heads` heads (head axis `head_axis`, within-head axis
        `axis`): a new head space, and the head group of its spaces."""
        if any(b.expand != 1 or b.size % heads for b in feat.blocks) or feat.headed:
            raise Barrier(f"splits channels into {heads} heads that do not divide every feature "
                          "space of the layout")
        head = Block(self.uf.new(heads), heads)
        self.head_group(tuple(b.space for b in feat.blocks) + (head.space,), heads,
                        "attention heads")
        return Feat(axis, feat.blocks, head_axis, heads, head)

    def repeat_tie(self, sub: Feat, base: Feat, heads_only: bool = False) -> None:
        """Grouped-query attention: `base` (keys or values, `base.heads` heads each repeated
        `base.repeat` times) meets `sub` (queries, scores or attention outputs, heads·repeat
        heads) head for head. The kv heads are paired across models, the `repeat` query heads of
        each kv head's group are paired alike, and the features within a head of `sub` follow
        those of `base` (feature j of q meets feature j of k). `heads_only`: just the head spaces."""
        factor = base.repeat
        if factor < 2 or sub.repeat != 1 or sub.heads != base.heads * factor or \
                base.head is None or sub.head is None:
            raise Barrier(f"pairs {sub.heads} heads with {base.heads} heads repeated {factor} "
                          "times, which do not divide them into equal groups")
        pairs = [(sub.head, base.head)]
        if not heads_only:
            if len(sub.blocks) != len(base.blocks) or any(
                    s.expand != 1 or b.expand != 1 or s.size != b.size * factor
                    for s, b in zip(sub.blocks, base.blocks)):
                raise Barrier("ties grouped-query heads whose features within a head differ")
            pairs += list(zip(sub.blocks, base.blocks))
        known = {self.uf.find(s): self.uf.find(b) for s, b, _ in self.all_repeats()}
        for s, b in pairs:
            before = known.get(self.uf.find(s.space))
            if before is not None:  # one query-side space, one kv space: k's and v's heads
                if self.uf.sizes[before] != b.size:
                    raise Barrier("ties grouped-query heads to key/value spaces of different widths")
                self.uf.union(before, b.space)
            self.repeats.append((s.space, b.space, factor))

    def fix_within(self, feat: Feat) -> Feat:
        """A headed layout whose values within a head are combined in a fixed way (rotary
        embeddings, norms over head_dim, attention over channels): its spaces keep their
        features in place within heads (heads may still be paired); what is left to follow is
        the head space on the head axis."""
        if feat.repeat > 1:
            raise Barrier("combines the features within repeated key/value heads (grouped-query "
                          "attention) in a fixed way after repeating them")
        for b in feat.blocks:
            self.uf.fix(b.space)
        return feat.head_only()

    def consume(self, node: fx.Node, source: fx.Node, feat: Feat) -> None:
        if feat.folded:  # samples and heads on one axis: read where the heads were split
            return
        self.consumed.append((node.name, source.name, feat))

    def tie(self, param: ParamHandle, axis: int, feat: Feat, role: str = "M",
            groups: int = 1) -> None:
        """Axis `axis` of `param` runs along `feat`: merged (M) or unmerged (U)."""
        if param.node is None:
            self._record(param.owner, param.name, axis, feat, role, groups)
        else:
            self.tie_param(param.node, axis, feat, role, groups)

    def _record(self, target: str, param: str, axis: int, feat: Feat, role: str,
                groups: int = 1) -> None:
        key = (target, param, axis)
        placed = feat.moved(axis)
        if key in self.uses:
            self._same_role(key, role)
            self.unify(self.uses[key].feat, placed)
        else:
            self.uses[key] = ParamUse(target, param, axis, placed, role, groups)

    def _same_role(self, key: tuple[str, str, int], role: str) -> None:
        """A parameter axis that one op merges (M) and another unmerges (U) needs two merged
        tensors, which one parameter cannot hold (an embedding table that a Linear reads by the
        same name: tied input and output embeddings written functionally). A barrier, so the
        second op stays per model with its own copy; tables tied between modules are read by
        each module's own name, which keeps their uses apart (`fxzip.graph.export`)."""
        use = self.uses.get(key)
        if use is not None and use.role != role:
            raise Barrier(f"reads parameter '{key[0]}{'.' + key[1] if key[1] else ''}' along axis "
                          f"{key[2]} as {'unmerged (U)' if role == 'U' else 'merged (M)'} where "
                          "another op reads it as the opposite; one tensor cannot be merged both "
                          "ways (give each use its own parameter, or its own module)")

    def tie_param(self, value: fx.Node, axis: int, feat: Feat, role: str = "M",
                  groups: int = 1) -> None:
        """`value` (a parameter read by get_attr, or computed from one) turns out to run along
        `feat` on its axis `axis` (`groups` > 1: a grouped weight holding one group's share of
        it): record the parameter's axis as merged (M) or unmerged (U)."""
        lazy = self.info(value)
        if isinstance(lazy, LazyCat):
            self._tie_parts(lazy, axis, feat, role)
            return
        if isinstance(lazy, Feat):
            if lazy.axis == axis:
                if value.op == "get_attr":
                    self._same_role((value.target, "", axis), role)
                self.unify(lazy, feat.moved(axis))
            elif value.op == "get_attr":  # a weight matrix: rows and columns follow two spaces
                self._record(value.target, "", axis, feat, role, groups)
            else:
                raise Barrier(f"uses parameter '{value.name}' along two different axes")
            return
        if not isinstance(lazy, Lazy):
            raise Barrier(f"combines the channels with '{value.name}', a value fxzip cannot follow "
                          "per channel")
        source_axis = lazy.axes[axis] if axis < len(lazy.axes) else None
        source = next(n for n in self.gm.graph.nodes if n.name == lazy.source)
        if not isinstance(source_axis, int) or \
                tensor_shape(source)[source_axis] * groups != feat.width:
            raise Barrier(f"uses parameter '{source.target}' per channel through a reshape fxzip "
                          "cannot follow")
        self._record(source.target, "", source_axis, feat, role, groups)
        for name, labels in lazy.others:  # parameters combined with it run along feat too
            other = next(n for n in self.gm.graph.nodes if n.name == name)
            label = labels[axis] if axis < len(labels) else None
            if label is None:
                continue  # constant along this axis
            if not isinstance(label, int) or tensor_shape(other)[label] * groups != feat.width:
                raise Barrier(f"uses parameter '{other.target}' per channel through a reshape "
                              "fxzip cannot follow")
            self._record(other.target, "", label, feat, role, groups)
        if lazy.axes == tuple(range(len(lazy.axes))) and value is source and groups == 1:
            self.infos[source.name] = feat.moved(axis)

    def _tie_parts(self, cat: LazyCat, axis: int, feat: Feat, role: str) -> None:
        """Parameters concatenated on their axis `cat.axis` run along `feat`: each part along
        its piece of the layout (a cut inside one space asks for it to be opened as pieces)."""
        if axis != cat.axis or feat.headed:
            raise Barrier("uses concatenated parameters along another axis than their "
                          "concatenation's")
        by_name = {n.name: n for n in self.gm.graph.nodes}
        for name, piece in zip(cat.parts, split_layout(feat, list(cat.sizes))):
            self.tie_param(by_name[name], axis, piece, role)

