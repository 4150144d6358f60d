"""Runs a GraphModule node by node over all calibration batches at once, so the corrections pass
can walk the merged model and its parents in lockstep and read any node's values."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..graph.nodes import is_inplace
from .batch_norm import batch_norm_statistics

__all__ = ["Runner"]

_BN = nn.modules.batchnorm._BatchNorm


class Runner:
    """Runs a GraphModule node by node over a list of batches at once (a list of values per node),
    freeing each value after its last use unless it is in `keep`. With `reset_bn`, every eval-mode
    BatchNorm normalises with the statistics of its inputs on these batches (as after
    `fxzip.reset_bn`, but on eval-mode inputs) without its module being changed; `bn_weight` < 1
    blends those statistics with the module's own (`BatchNormStatistics.toward`), except at the
    BatchNorm nodes named in `unblended`."""

    def __init__(self, gm: fx.GraphModule, batches: Sequence[Any], keep: Iterable[str] = (),
                 reset_bn: bool = False, group: Any = None, bn_weight: float = 1.0,
                 unblended: Iterable[str] = ()):
        self.gm, self.batches, self.reset_bn, self.group = gm, list(batches), reset_bn, group
        self.bn_weight, self.unblended = bn_weight, set(unblended)
        self.nodes = [n for n in gm.graph.nodes if n.op != "output"]
        self.position = 0
        self.env: dict[str, list[Any]] = {}
        self.keep = set(keep)
        last: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            for arg in node.all_input_nodes:
                last[arg.name] = i
        output = next(n for n in gm.graph.nodes if n.op == "output")
        for arg in output.all_input_nodes:
            last[arg.name] = len(self.nodes)
        self.last = last
        self.frees: dict[int, list[str]] = {}
        for name, i in last.items():
            self.frees.setdefault(i, []).append(name)
        self._placeholders = 0
        # values an in-place op will change: a kept one is read as it was computed (a snapshot)
        self.mutated = {n.args[0].name for n in self.nodes
                        if is_inplace(n, gm) and n.args and isinstance(n.args[0], fx.Node)}
        self.snapshots: dict[str, list[Any]] = {}

    @property
    def next_node(self) -> fx.Node | None:
        return self.nodes[self.position] if self.position < len(self.nodes) else None

    def step(self) -> fx.Node:
        """Compute the next node on every batch."""
        node = self.nodes[self.position]
        self.env[node.name] = self._compute(node)
        if node.name in self.keep and node.name in self.mutated:
            self.snapshots[node.name] = [v.clone() if isinstance(v, torch.Tensor) else v
                                         for v in self.env[node.name]]
        for name in self.frees.get(self.position, ()):
            if name not in self.keep:
                self.env.pop(name, None)
        self.position += 1
        return node

    def run_to(self, name: str) -> list[Any]:
        """Advance until `name` is computed (it must be kept or not yet freed); its values."""
        while name not in self.env:
            if self.position >= len(self.nodes):
                raise KeyError(f"node {name!r} was freed or is not in the graph")
            self.step()
        return self.snapshots.get(name, self.env[name])

    def take(self, name: str) -> list[Any]:
        """The values of a kept node, released from `keep` (freed if already past its last use)."""
        values = self.run_to(name)
        self.keep.discard(name)
        self.snapshots.pop(name, None)
        if self.last.get(name, -1) < self.position:
            self.env.pop(name, None)
        return values

    def _compute(self, node: fx.Node) -> list[Any]:
        if node.op == "placeholder":
            first = self._placeholders == 0
            self._placeholders += 1
            default = node.args[0] if node.args else None
            if self.batches and isinstance(self.batches[0], dict):  # forward's keyword arguments
                return [b.get(node.target, default) for b in self.batches]
            if first:
                return list(self.batches)
            return [default] * len(self.batches)
        if node.op == "get_attr":
            value = self.gm
            for part in node.target.split("."):
                value = getattr(value, part)
            return [value] * len(self.batches)
        if self.reset_bn and node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
            module = self.gm.get_submodule(node.target)
            if isinstance(module, _BN) and module.track_running_stats and not module.training \
                    and module.running_mean is not None:
                inputs = self.env[node.args[0].name]
                weight = 1.0 if node.name in self.unblended else self.bn_weight
                stats = batch_norm_statistics(inputs, module.num_features, self.group).toward(
                    module, weight).mean_var()
                if stats is not None:
                    mean, var = (v.to(module.running_mean.device, module.running_mean.dtype)
                                 for v in stats)
                    return [F.batch_norm(x, mean.to(x.dtype), var.to(x.dtype), module.weight,
                                         module.bias, False, 0.0, module.eps) for x in inputs]
        out = []
        for b in range(len(self.batches)):
            args = fx.node.map_arg(node.args, lambda n: self.env[n.name][b])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: self.env[n.name][b])
            if node.op == "call_module":
                out.append(self.gm.get_submodule(node.target)(*args, **kwargs))
            elif node.op == "call_function":
                out.append(node.target(*args, **kwargs))
            elif node.op == "call_method":
                out.append(getattr(args[0], node.target)(*args[1:], **kwargs))
            else:  # pragma: no cover - fx has no other ops
                raise RuntimeError(f"unexpected node op {node.op}")
        return out
