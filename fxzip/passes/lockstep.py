"""The lockstep graph: every model run node by node on the same input inside one FX graph, an
observer called with every model's tensor at each tapped node.

A merge under a memory budget reads the calibration data in several statistics passes, each for
a share of the spaces; without help each pass would run the models again from their inputs. A
pass instead saves, per batch, the values alive at a point before the next pass's first tap (a
*cut*, chosen where the fewest bytes are alive; its *frontier*: the tensors computed so far that
later nodes still read), running on to it if its own taps end earlier, and the next pass resumes
there (`Checkpoints`): the passes form a chain through the models, about one forward in all.
The saved values are copies, so nothing a pass does in place reaches them; what the budget's
share for them cannot hold is recomputed from the inputs, batch by batch. Resuming runs the same operations on the same values: the statistics are bitwise those
of passes run from the inputs.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_map

from ..graph.pairing import Pairing
from ..runtime.memory import meta_bytes

__all__ = ["Checkpoints", "Lockstep", "lockstep_module", "node_positions", "plan_cuts"]


def node_positions(graph: fx.GraphModule) -> dict[str, int]:
    """Graph node name -> index among its nodes (the output left out): a cut's coordinates."""
    return {n.name: i for i, n in enumerate(n for n in graph.graph.nodes if n.op != "output")}


class Lockstep:
    """Where each model stands as graph 0's nodes are run in lockstep: after graph 0's node i
    (a *cut*), model k has run its first `done(i)[k]` nodes; the values alive there are the
    cut's frontier."""

    def __init__(self, graphs: Sequence[fx.GraphModule], pairing: Pairing):
        self.node_lists = [[n for n in gm.graph.nodes if n.op != "output"] for gm in graphs]
        self.positions = [{n.name: i for i, n in enumerate(nodes)} for nodes in self.node_lists]
        self.shared = pairing.shared()
        self.pairing = pairing
        self._done: list[list[int]] = []
        # per model, each node's last reader (its index; -1 if none reads it but the output)
        self._last_read = [{n: max((positions[u.name] for u in n.users if u.name in positions),
                                   default=-1) for n in nodes}
                           for nodes, positions in zip(self.node_lists, self.positions)]

    def done(self, cut: int) -> list[int]:
        """Per model, how many of its nodes have run after graph 0's node `cut`."""
        if not self._done:
            done = [0] * len(self.node_lists)
            for node in self.node_lists[0]:
                if node.name in self.shared:
                    for k in range(len(done)):
                        done[k] = max(done[k], self.positions[k][self.pairing.name(k, node.name)]
                                      + 1)
                self._done.append(list(done))
        return self._done[cut]

    def frontier(self, k: int, cut: int, attributes: bool = False) -> list[fx.Node]:
        """Model k's values alive after the cut: those of its nodes run so far that a node yet
        to run reads; computed values, or with `attributes` the get_attr nodes (a resumed graph
        reads those from the model again)."""
        nodes, done, last_read = self.node_lists[k], self.done(cut)[k], self._last_read[k]
        return [n for n in nodes[:done] if (n.op == "get_attr") == attributes
                and last_read[n] >= done]

    def frontier_bytes(self, cut: int) -> float:
        """The bytes of every model's frontier at a cut, from the traced shapes (unknown: inf)."""
        total = 0.0
        for k in range(len(self.node_lists)):
            for node in self.frontier(k, cut):
                size = meta_bytes(node.meta.get("tensor_meta", node.meta.get("val")))
                total += math.inf if size is None else size
        return total

    def cut_before(self, start: int, earliest: int) -> int:
        """The cut before graph 0's node `start`, no earlier than `earliest`, with the smallest
        frontier (the latest of those): where a pass beginning at `start` resumes."""
        best, cut = math.inf, start - 1
        for c in range(start - 1, max(earliest, 0) - 1, -1):
            size = self.frontier_bytes(c)
            if size < best:
                best, cut = size, c
        return cut


class Checkpoints(nn.Module):
    """The frontiers saved by statistics passes for later ones, per cut and batch position.

    `cuts[i]` is the cut pass i resumes from (None: from the models' inputs), in the order the
    passes run (`plan_cuts`); a pass saves the frontier of the next pass's cut (`plan`).
    `limit_bytes` bounds the saved tensors (None: no bound); a batch whose frontier did not fit
    runs from its input. Called in the lockstep graph as `checkpoints(cut, *values)` to save."""

    def __init__(self, cuts: Sequence[int | None], limit_bytes: float | None = None):
        super().__init__()
        self.cuts = list(cuts)
        self.limit_bytes = limit_bytes
        self.current = 0  # the pass running now (index into cuts)
        self.position = 0  # the batch being run
        self.saved: dict[int, dict[int, tuple]] = {}  # cut -> position -> frontier values
        self.bytes = 0
        self.peak_bytes = 0
        self.resumed = 0  # batches run from a saved frontier, over all passes
        self.skipped = 0  # frontiers not saved: over the limit

    def extra_repr(self) -> str:
        return (f"pass {self.current} of {len(self.cuts)}, cuts {self.cuts}, saved "
                f"{sorted(self.saved)}, {self.bytes / 2**20:.1f} MiB, resumed {self.resumed}, "
                f"not saved {self.skipped}")

    def plan(self) -> tuple[int | None, list[int]]:
        """(the cut the current pass resumes from, None if none; the cut it saves: the next
        pass's, if it lies after its own, which the pass runs on to if its taps end before it).
        Saving only the next pass's cut keeps one or two frontiers held at a time: the passes
        form a chain through the models instead of the first one saving every later cut."""
        resume = self.cuts[self.current]
        following = self.cuts[self.current + 1] if self.current + 1 < len(self.cuts) else None
        if following is None or following <= (-1 if resume is None else resume):
            return resume, []
        return resume, [following]

    def take(self, cut: int, position: int) -> tuple | None:
        """The frontier saved at `cut` for a batch (its own copy while a later pass still
        resumes there), or None."""
        values = self.saved.get(cut, {}).get(position)
        if values is not None:
            self.resumed += 1
            if cut in self.cuts[self.current + 1:]:
                values = _copied(values)
        return values

    def forward(self, cut: int, *values: Any) -> None:
        """Save a copy of the frontier at `cut` for the current batch, if it fits the limit."""
        if self.position in self.saved.get(cut, {}):
            return
        size = _bytes(values)
        if self.limit_bytes is not None and self.bytes + size > self.limit_bytes:
            self.skipped += 1
            return
        self.saved.setdefault(cut, {})[self.position] = _copied(values)
        self.bytes += size
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def finish_pass(self) -> None:
        """Move on to the next pass; drop the frontiers no later pass resumes from."""
        self.current += 1
        for cut in [c for c in self.saved if c not in self.cuts[self.current:]]:
            self.bytes -= sum(_bytes(values) for values in self.saved.pop(cut).values())


def plan_cuts(graphs: Sequence[fx.GraphModule], pairing: Pairing,
              starts: Sequence[int]) -> list[int | None]:
    """Per pass (`starts`: the index of its first tap in graph 0, in the order they run), the
    cut it resumes from: the smallest frontier between the latest earlier pass's start before
    its own and its own (None for the first pass, or where no earlier pass runs past it)."""
    lockstep = Lockstep(graphs, pairing)
    cuts: list[int | None] = []
    for i, start in enumerate(starts):
        before = [s for s in starts[:i] if s < start]
        cuts.append(lockstep.cut_before(start, max(before)) if before else None)
    return cuts


def _bytes(values: Any) -> int:
    return sum(v.numel() * v.element_size() for v in tree_flatten(values)[0]
               if isinstance(v, torch.Tensor))


def _copied(values: Any) -> Any:
    return tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, values)


def lockstep_module(graphs: Sequence[fx.GraphModule], observer: nn.Module, pairing: Pairing,
                    checkpoints: Checkpoints | None = None, resume_cut: int | None = None,
                    saves: Sequence[int] = ()) -> fx.GraphModule:
    """One graph that runs all models node by node on the same input and calls the observer
    right after each tapped node (a name of graph 0) with every model's tensor there (graph k's
    node paired with it, see `fxzip.graph.pairing`); it returns nothing.

    Each model's graph is emitted in its own order, as far as the node paired with graph 0's
    current node: for models of one architecture that is node by node, in lockstep; nothing
    after the last tapped node is run (an early space's pass stops early). Model k's
    submodules and attributes live under `m{k}.`; FX frees every tensor after its last use, so
    only the tensors of the node being computed are alive beside the models' state.

    With `checkpoints`, the graph also calls it with the frontier at each cut of `saves`
    (running on to the last of them); with `resume_cut` it starts after that cut, its inputs
    being the frontier's values there (as `Checkpoints.take` gives them) instead of the models'
    inputs.
    """
    root = nn.Module()
    for k, gm in enumerate(graphs):
        root.add_module(f"m{k}", gm)
    root.add_module("observer", observer)
    if checkpoints is not None:
        root.add_module("checkpoints", checkpoints)
    graph = fx.Graph()
    lockstep = Lockstep(graphs, pairing)
    node_lists, positions, shared = lockstep.node_lists, lockstep.positions, lockstep.shared
    envs: list[dict[fx.Node, fx.Node]] = [{} for _ in graphs]
    done = [0] * len(graphs)
    tapped = [i for i, n in enumerate(node_lists[0]) if n.name in shared and n.name in observer.taps]
    last = tapped[-1] if tapped else -1  # nothing past the last tap (or the last cut saved)
    if checkpoints is not None and saves:
        last = max(last, max(saves))
    inputs: list[fx.Node] = []

    def emit_until(k: int, name: str) -> fx.Node:
        env, nodes = envs[k], node_lists[k]
        while done[k] <= positions[k][name]:
            node = nodes[done[k]]
            done[k] += 1
            if node.op == "placeholder":
                env[node] = inputs[sum(1 for n in nodes[:done[k]] if n.op == "placeholder") - 1]
                continue
            copy = graph.node_copy(node, lambda n: env[n])
            if node.op in ("call_module", "get_attr"):
                copy.target = f"m{k}.{node.target}"
            env[node] = copy
        return env[nodes[positions[k][name]]]

    first = 0
    if resume_cut is not None:  # the models as they stand after the cut
        done = list(lockstep.done(resume_cut))
        for k in range(len(graphs)):
            for node in lockstep.frontier(k, resume_cut):
                envs[k][node] = graph.placeholder(f"m{k}_{node.name}")
            for node in lockstep.frontier(k, resume_cut, attributes=True):
                envs[k][node] = graph.get_attr(f"m{k}.{node.target}")
        first = resume_cut + 1
    else:
        placeholders = [n for n in graphs[0].graph.nodes if n.op == "placeholder"]
        inputs = [graph.placeholder(n.target, default_value=n.args[0] if n.args
                                    else inspect.Signature.empty) for n in placeholders]
    pending = sorted(c for c in saves if c >= first)
    for i in range(first, last + 1):
        node = node_lists[0][i]
        if node.name in shared:
            values = [emit_until(k, pairing.name(k, node.name)) for k in range(len(graphs))]
            if node.name in observer.taps:
                graph.call_module("observer", (node.name, *values))
        while checkpoints is not None and pending and pending[0] <= i:
            cut = pending.pop(0)
            graph.call_module("checkpoints", (cut, *[envs[k][n] for k in range(len(graphs))
                                                     for n in lockstep.frontier(k, cut)]))
    graph.output(None)
    return fx.GraphModule(root, graph, "LockstepStatistics")
