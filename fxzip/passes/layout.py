"""Feature layouts: which merge spaces a tensor's channel axis holds, block by block."""
from __future__ import annotations

from collections import ChainMap
from collections.abc import MutableMapping
from dataclasses import dataclass, field, replace


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
    """A tensor whose axis `axis` carries the concatenation of `blocks` (usually just one)."""

    axis: int
    blocks: tuple[Block, ...]

    @property
    def width(self) -> int:
        return sum(b.width for b in self.blocks)

    def moved(self, axis: int) -> "Feat":
        return replace(self, axis=axis)

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
class Lazy:
    """A parameter read by get_attr (node `source`), or a value computed from it alone, whose
    channel axis is not known yet. `axes[i]` is the parameter axis that axis i comes from (None:
    a new or broadcast axis; `MIXED`: an axis made by indexing, merging or splitting the
    parameter's axes, which no single parameter axis runs along). The first op that combines it
    with features fixes its space."""

    source: str
    axes: tuple[int | None, ...]

    def remapped(self, axes: "list[int | None] | tuple[int | None, ...]") -> "Lazy":
        return Lazy(self.source, tuple(axes))


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
                         ChainMap({}, self.pinned), self.count, self)

    def commit(self) -> None:
        """Apply a layer's writes to the union-find it was made from."""
        for mine, theirs in ((self.parent, self.base.parent), (self.sizes, self.base.sizes),
                             (self.pinned, self.base.pinned)):
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

    def pin(self, i: int) -> None:
        self.pinned[self.find(i)] = True

    def is_pinned(self, i: int) -> bool:
        return self.pinned[self.find(i)]

    def unify(self, a: Feat, b: Feat) -> bool:
        """Tie two layouts block by block; False when their block structures differ."""
        if len(a.blocks) != len(b.blocks):
            return False
        if any(x.size != y.size or x.expand != y.expand for x, y in zip(a.blocks, b.blocks)):
            return False
        for x, y in zip(a.blocks, b.blocks):
            self.union(x.space, y.space)
        return True

    def resolve(self, feat: Feat) -> Feat:
        """The same layout with every space id replaced by its current root."""
        return replace(feat, blocks=tuple(replace(b, space=self.find(b.space)) for b in feat.blocks))
