"""Feature layouts: which merge spaces a tensor's channel axis holds, block by block."""
from __future__ import annotations

from collections import ChainMap
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class Block:
    """`size` channels of one feature space, each repeated `expand` times (flatten of C×H×W)."""

    space: int
    size: int
    expand: int = 1

    @property
    def width(self) -> int:
        """Elements this block occupies on the channel axis."""
        return self.size * self.expand


@dataclass(frozen=True)
class Feat:
    """A tensor whose axis `axis` carries the concatenation of `blocks` (usually just one).

    Split into attention heads (`head_axis` set): axis `head_axis` runs over the `heads` heads
    and axis `axis` within a head; element (h, j) is feature j of head h of the blocks' spaces
    (block t's space holds head h at features h·d_t … (h+1)·d_t, d_t = size / heads; the
    within-head axis holds head h's features of every block in a row). `head` is the head
    space: one feature per head, in the head group of the blocks' spaces, along which per-head
    values (attention scores, relative position biases, talking heads) run once the features
    within heads are no longer followed.

    `repeat` > 1: every head is repeated `repeat` times in a row on the head axis (keys and
    values of grouped-query attention, each serving a group of query heads): the head axis is
    `heads · repeat` long.

    `folded`: the heads are folded into the batch: the head axis (of a headed layout; of a
    head space alone, its channel axis) is the row-major flattening of axes before it with the
    heads, heads inner — `(B, H, N, d) -> (B·H, N, d)`, as DeBERTa's attention runs `bmm` over
    it. Element f·H + h of the axis is head h; the outer part f runs over samples, which ops
    never mix with the heads (only rules registered with `folds=True` see such a layout). Its
    statistics are read where the heads were split, not on the folded axis."""

    axis: int
    blocks: tuple[Block, ...]
    head_axis: int | None = None
    heads: int = 1
    head: Block | None = None
    repeat: int = 1
    folded: bool = False

    @property
    def width(self) -> int:
        return sum(b.width for b in self.blocks)

    @property
    def headed(self) -> bool:
        return self.head_axis is not None

    def moved(self, axis: int) -> "Feat":
        return replace(self, axis=axis)

    def placed(self, axis: int, head_axis: int | None) -> "Feat":
        """The same layout with its within-head and head axes at new positions."""
        return replace(self, axis=axis, head_axis=head_axis)

    def head_only(self) -> "Feat":
        """The head space on the head axis: what is left of a headed layout once values within a
        head are no longer followed feature by feature (rotations, norms over head_dim)."""
        return Feat(self.head_axis, (self.head,), folded=self.folded)

    def expanded(self, factor: int) -> "Feat":
        """Every channel repeated `factor` times in a row (the channel axis flattened with later axes)."""
        return replace(self, blocks=tuple(replace(b, expand=b.expand * factor) for b in self.blocks))

    def offsets(self) -> list[int]:
        """Element offset of each block on the channel axis."""
        out, at = [], 0
        for b in self.blocks:
            out.append(at)
            at += b.width
        return out


@dataclass(frozen=True)
class Flat:
    """An axis label: the axis is the row-major flattening of consecutive axes, `parts` their
    (label, size) pairs (size-1 axes left out). A reshape that cuts it again at the same
    boundaries gives the parts' labels back (a weight reshaped to (1, out, in·k·k) for weight
    standardisation and back to (out, in, k, k))."""

    parts: tuple[tuple[Any, int], ...]


@dataclass(frozen=True)
class Lazy:
    """A parameter read by get_attr (node `source`), or a value computed from it alone, whose
    channel axis is not known yet. `axes[i]` is the parameter axis that axis i comes from (None:
    a new or broadcast axis; `MIXED`: an axis made by indexing, merging or splitting the
    parameter's axes, which no single parameter axis runs along; a `Flat`: several parameter
    axes flattened). The first op that combines it with features fixes its space.

    `others`: further parameters combined with it elementwise or per row (weight
    standardisation's gain), each as (get_attr node name, axis labels in this tensor's axes);
    whatever space an axis of the value turns out to run along, theirs runs along too.

    `fixed`: combined elementwise with a tensor that is the same in every model (an input slice,
    a constant) and keeps its own channel order: the space the value meets is pinned (identity
    matching), as a shared per-channel value pins it; the parameters still follow that space."""

    source: str
    axes: tuple[Any, ...]
    others: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    fixed: bool = False

    def remapped(self, axes: "list | tuple") -> "Lazy":
        """The same parameter with new axis labels (the others' labels kept: use `through` when
        the axes move)."""
        return Lazy(self.source, tuple(axes), self.others, self.fixed)

    def through(self, remap: "Callable[[tuple], list | tuple | None]") -> "Lazy | None":
        """The value after an op that moves axes as `remap` (old labels -> new labels, None if
        it cannot say) moves them, for the parameter and every other one alike."""
        axes = remap(self.axes)
        if axes is None:
            return None
        others = []
        for source, labels in self.others:
            moved = remap(labels)
            if moved is None:
                return None
            others.append((source, tuple(moved)))
        return Lazy(self.source, tuple(axes), tuple(others), self.fixed)


@dataclass(frozen=True)
class Stacked:
    """A tensor whose axis `axis` stacks tensors of different layouts (`parts`, in the tensor's
    own axes): a fused projection [q | k | v] reshaped to (…, 3, H, d)."""

    axis: int
    parts: tuple[Feat, ...]


@dataclass(frozen=True)
class LazyCat:
    """Parameters (or values computed from them alone) concatenated on axis `axis`: `parts` are
    their nodes' names, `sizes` their widths there (BEiT/EVA's cat of q, k and v biases)."""

    axis: int
    parts: tuple[str, ...]
    sizes: tuple[int, ...]


class _Marker:
    """A named singleton state for nodes that carry no trackable channel axis."""

    def __init__(self, name: str, doc: str):
        self.name, self.__doc__ = name, doc

    def __repr__(self) -> str:
        return self.name


SHARED = _Marker("SHARED", "The same value in every model (inputs, constants): needs no merging.")
UNTRACKED = _Marker("UNTRACKED", "A value computed from parameters that fxzip cannot follow per channel.")
MIXED = _Marker("MIXED", "A Lazy axis made from parameter axes by indexing, merging or splitting.")
BLOCKED = _Marker("BLOCKED", "A value downstream of a barrier: never part of the zipped trunk.")


@dataclass
class UnionFind:
    """Union-find over space ids; a space is `pinned` when it must keep identity matching.

    `layer()` gives a view that reads through to this union-find and keeps its own writes apart
    until `commit()`: what a rule records is applied only when the rule returns."""

    parent: MutableMapping[int, int] = field(default_factory=dict)
    sizes: MutableMapping[int, int] = field(default_factory=dict)
    pinned: MutableMapping[int, bool] = field(default_factory=dict)
    fixed: MutableMapping[int, bool] = field(default_factory=dict)  # features stay in place
    count: int = 0
    base: "UnionFind | None" = field(default=None, repr=False)

    def new(self, size: int, pinned: bool = False) -> int:
        i = self.count
        self.count += 1
        self.parent[i], self.sizes[i], self.pinned[i] = i, size, pinned
        return i

    def layer(self) -> "UnionFind":
        """A view whose writes (new spaces, unions, pins) stay apart until `commit`."""
        return UnionFind(ChainMap({}, self.parent), ChainMap({}, self.sizes),
                         ChainMap({}, self.pinned), ChainMap({}, self.fixed), self.count, self)

    def commit(self) -> None:
        """Apply a layer's writes to the union-find it was made from."""
        for mine, theirs in ((self.parent, self.base.parent), (self.sizes, self.base.sizes),
                             (self.pinned, self.base.pinned), (self.fixed, self.base.fixed)):
            theirs.update(mine.maps[0])
        self.base.count = self.count

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        lo, hi = min(ra, rb), max(ra, rb)
        self.parent[hi] = lo
        self.pinned[lo] = self.pinned[lo] or self.pinned[hi]
        self.fixed[lo] = self.fixed.get(lo, False) or self.fixed.get(hi, False)

    def pin(self, i: int) -> None:
        self.pinned[self.find(i)] = True

    def fix(self, i: int) -> None:
        """Space i's features stay in place within their heads (heads may still be paired)."""
        self.fixed[self.find(i)] = True

    def is_fixed(self, i: int) -> bool:
        return self.fixed.get(self.find(i), False)

    def is_pinned(self, i: int) -> bool:
        return self.pinned[self.find(i)]

    def unify(self, a: Feat, b: Feat) -> bool:
        """Tie two layouts block by block; False when their block structures differ."""
        if len(a.blocks) != len(b.blocks) or a.heads != b.heads or a.repeat != b.repeat or \
                (a.head is None) != (b.head is None) or a.folded != b.folded:
            return False
        if any(x.size != y.size or x.expand != y.expand for x, y in zip(a.blocks, b.blocks)):
            return False
        for x, y in zip(a.blocks, b.blocks):
            self.union(x.space, y.space)
        if a.head is not None:
            self.union(a.head.space, b.head.space)
        return True

    def resolve(self, feat: Feat) -> Feat:
        """The same layout with every space id replaced by its current root."""
        head = None if feat.head is None else replace(feat.head, space=self.find(feat.head.space))
        return replace(feat, blocks=tuple(replace(b, space=self.find(b.space)) for b in feat.blocks),
                       head=head)
