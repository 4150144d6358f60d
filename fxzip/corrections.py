"""Label-free corrections of a merged model: BatchNorm reset, REPAIR and least-squares refits, in
ONE lockstep pass over the calibration data, folded into the merged model's own weights.

After the rewrite, a merged layer reads merged inputs that differ from what any parent layer read,
and its averaged weights only approximate its parents'. Two closed-form corrections fix that with
unlabelled calibration data and no gradient training:

* **refit** (PLeaS, Nasery et al.): each correctable layer's weights are solved by ridge
  regression so that, fed the merged model's own inputs, the layer's output best reproduces its
  *target*: for a trunk layer the parents' outputs merged by M (each merged feature the mean of
  the features its cluster merges: what minimises the squared error to every member); for a head
  layer of model k, model k's own output. Layers are solved in graph order, so every layer sees
  inputs that the layers before it already corrected. The regression is ridge toward the current
  merged weights: ``W = W0 + (XᵀX + λI)⁻¹ Xᵀ (T - X W0)``, so a layer whose output already equals
  its target is left exactly as it is (a permuted self-merge stays exact).
* **repair** (REPAIR, Jordan et al.): each correctable layer's output features are rescaled so
  that their mean and standard deviation on the calibration data equal the average of the means
  and standard deviations of the parent features they merge (exact in a self-merge: ratio 1).

The targets are the parents *with their BatchNorm statistics reset on the calibration data*
when `reset_bn` is on (the paper resets the BN statistics of every model it compares, the
original models included, and that ensemble is the ceiling of a merge): each parent BatchNorm
then normalises with the statistics of its own inputs on the calibration batches (eval-mode
inputs; the parents' modules are not changed). With ``reset_bn=False`` the targets are the
parents as given.

A *correctable layer* is a ``Linear``, ``Conv1d`` or ``Conv2d`` module (groups 1, zero padding,
called once). Where its only user is an affine BatchNorm, the pair is corrected as one affine map
and its *fit point* is the BatchNorm's output: the layer's weights then hold the fitted map and
the BatchNorm keeps running statistics that equal the calibration statistics of its input with
``weight``/``bias`` set to make it pass the fitted map through. Every other BatchNorm of the
merged model has its running statistics re-estimated on the way (per batch mean and unbiased
variance averaged over batches, as `fxzip.reset_bn` does, but of the eval-mode model's inputs, on
inputs that are already corrected): the pass replaces `reset_bn`. Nothing is added to the graph
(a bias parameter is created on a bias-free layer with no BatchNorm after it, when a correction
needs an intercept).

Measured (benchmarks/corrections.py, setting (a): ResNet-20×4 on the digits halves): the refit of
the trunk plus each head's first and last layers (the default `Corrections()`) lifts zipit's
joint accuracy at every stop point to within about a point of the ensemble of the BN-reset
parents; REPAIR adds little once BatchNorms are reset or layers refitted, and is off by default.

Memory: the pass runs the merged model and every parent node by node over ALL calibration batches
at once, so it keeps the live activations of the whole calibration set (and, per layer, the
``(d+1)²`` Gram matrix of its inputs, ``d`` = in-features × kernel size). Use it with a
calibration set of moderate size (or pass ``max_samples``).
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .errors import InputError
from .matching import Match

if TYPE_CHECKING:  # type hints only: the pass reads `analysis.feat`, `.spaces` and Feat blocks
    from .passes.analysis import Analysis
    from .passes.layout import Feat

__all__ = ["Corrections", "CorrectionReport", "correct", "HEAD_LAYERS"]

HEAD_LAYERS = ("none", "first", "last", "first+last", "all")
_BN = nn.modules.batchnorm._BatchNorm


@dataclass(frozen=True)
class Corrections:
    """Which corrections `correct` applies.

    refit_trunk: refit every correctable trunk layer against its parents' outputs merged by M.
    refit_heads: which layers of each head to refit against its own parent's outputs: "none",
        "first" (the layers that read the trunk), "last" (the layers whose output reaches the
        model's output without another layer: the output Linear), "first+last" or "all".
    repair: REPAIR-rescale the output features of every correctable layer that is corrected
        (trunk layers always; head layers where `refit_heads` selects them, all head layers if
        `refit_heads="none"`) after any refit.
    ridge: the ridge strength relative to the mean diagonal of each layer's input Gram matrix
        (λ = ridge · trace(XᵀX)/d); > 0.
    max_rows: at most this many rows (samples × positions) of each layer's inputs enter its
        regression (a fixed random subset per batch); None: all.
    reset_bn: re-estimate the running statistics of every BatchNorm that is not a fit point
        (as `fxzip.reset_bn`, on the corrected inputs); False leaves them as they are.
    seed: the seed of the row subset.
    """

    refit_trunk: bool = True
    refit_heads: str = "first+last"
    repair: bool = False
    ridge: float = 1e-2
    max_rows: int | None = 8192
    reset_bn: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.refit_trunk, bool):
            raise InputError(f"refit_trunk must be True or False, got {self.refit_trunk!r}")
        if not isinstance(self.repair, bool):
            raise InputError(f"repair must be True or False, got {self.repair!r}")
        if not isinstance(self.reset_bn, bool):
            raise InputError(f"reset_bn must be True or False, got {self.reset_bn!r}")
        if self.refit_heads not in HEAD_LAYERS:
            raise InputError(f"refit_heads={self.refit_heads!r} is not one of "
                             f"{', '.join(map(repr, HEAD_LAYERS))}")
        if isinstance(self.ridge, bool) or not isinstance(self.ridge, (int, float)) \
                or not math.isfinite(self.ridge) or self.ridge <= 0:
            raise InputError(f"ridge must be a finite number > 0 (relative to the mean input "
                             f"variance of each layer), got {self.ridge!r}")
        if self.max_rows is not None and (isinstance(self.max_rows, bool)
                                          or not isinstance(self.max_rows, int)
                                          or self.max_rows < 1):
            raise InputError(f"max_rows must be None or an int >= 1, got {self.max_rows!r}")

    @property
    def active(self) -> bool:
        """Whether any layer is corrected (else `correct` is a BatchNorm reset only)."""
        return self.refit_trunk or self.refit_heads != "none" or self.repair


@dataclass
class CorrectionReport:
    """What `correct` did: the layers refitted / repaired (merged-model module names), the
    relative error of each refitted layer's fit-point output to its target before and after, and
    the seconds spent."""

    refitted: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)
    seconds: float = 0.0

    def __str__(self) -> str:
        lines = [f"fxzip corrections: {len(self.refitted)} layers refitted, {len(self.repaired)} "
                 f"repaired in {self.seconds:.2f}s"]
        for name, (before, after) in self.errors.items():
            lines.append(f"  {name}: relative error {before:.4f} -> {after:.4f}")
        return "\n".join(lines)


# -- node-by-node execution over all batches --------------------------------------------------------
class _Runner:
    """Runs a GraphModule node by node over a list of batches at once (a list of values per node),
    freeing each value after its last use unless it is in `keep`. With `reset_bn`, every eval-mode
    BatchNorm normalises with the statistics of its inputs on these batches (as after
    `fxzip.reset_bn`, but on eval-mode inputs) without its module being changed."""

    def __init__(self, gm: fx.GraphModule, batches: Sequence[torch.Tensor], keep: Iterable[str] = (),
                 reset_bn: bool = False):
        self.gm, self.batches, self.reset_bn = gm, list(batches), reset_bn
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

    @property
    def next_node(self) -> fx.Node | None:
        return self.nodes[self.position] if self.position < len(self.nodes) else None

    def step(self) -> fx.Node:
        """Compute the next node on every batch."""
        node = self.nodes[self.position]
        self.env[node.name] = self._compute(node)
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
        return self.env[name]

    def take(self, name: str) -> list[Any]:
        """The values of a kept node, released from `keep` (freed if already past its last use)."""
        values = self.run_to(name)
        self.keep.discard(name)
        if self.last.get(name, -1) < self.position:
            self.env.pop(name, None)
        return values

    def _compute(self, node: fx.Node) -> list[Any]:
        if node.op == "placeholder":
            first = self._placeholders == 0
            self._placeholders += 1
            if first:
                return list(self.batches)
            default = node.args[0] if node.args else None
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
                mean, var = _bn_statistics(inputs)
                mean, var = mean.to(inputs[0].dtype), var.to(inputs[0].dtype)
                return [F.batch_norm(x, mean, var, module.weight, module.bias, False, 0.0, module.eps)
                        for x in inputs]
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


# -- layers -----------------------------------------------------------------------------------------
def _correctable(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return module.groups == 1 and module.padding_mode == "zeros" and \
            not (isinstance(module.padding, str) and module.padding != "valid")
    return False


def _patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The (rows, d) matrix of a layer's inputs, one row per output position (im2col)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    padding = 0 if isinstance(module.padding, str) else module.padding
    if isinstance(module, nn.Conv1d):
        cols = F.unfold(x.unsqueeze(2), (1, module.kernel_size[0]), dilation=(1, module.dilation[0]),
                        padding=(0, padding if isinstance(padding, int) else padding[0]),
                        stride=(1, module.stride[0]))
    else:
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding,
                        stride=module.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _rows(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """A layer's (or its BatchNorm's) output as (rows, out), rows in the order of `_patches`."""
    if isinstance(module, nn.Linear):
        return y.reshape(-1, y.shape[-1])
    return y.movedim(1, -1).reshape(-1, y.shape[1])


def _weight_matrix(module: nn.Module) -> torch.Tensor:
    return module.weight.detach().reshape(module.weight.shape[0], -1)


def _set_weight(module: nn.Module, matrix: torch.Tensor, bias: torch.Tensor | None) -> None:
    weight = module.weight
    module.weight = nn.Parameter(matrix.reshape(weight.shape).to(weight.dtype),
                                 requires_grad=weight.requires_grad)
    if bias is not None:
        module.bias = nn.Parameter(bias.to(weight.dtype), requires_grad=weight.requires_grad)


def _reduce_dims(v: torch.Tensor, axis: int) -> list[int]:
    return [d for d in range(v.dim()) if d != axis]


def _channel_stats(values: Sequence[torch.Tensor], axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Population mean and std per channel over all batches and positions (float32 per batch,
    combined in float64)."""
    count, total, second = 0, None, None
    for v in values:
        var, mean = torch.var_mean(v.float(), dim=_reduce_dims(v, axis), unbiased=False)
        n = v.numel() // v.shape[axis]
        s, q = mean.double() * n, (var.double() + mean.double().square()) * n
        total = s if total is None else total + s
        second = q if second is None else second + q
        count += n
    mean = total / count
    return mean, (second / count - mean.square()).clamp_min(0).sqrt()


def _bn_statistics(values: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Running mean/var as `fxzip.reset_bn` sets them: the equal-weight average over batches of
    each batch's mean and unbiased variance (per channel, axis 1)."""
    means, variances = [], []
    for v in values:
        n = v.numel() // v.shape[1]
        var, mean = torch.var_mean(v.float(), dim=_reduce_dims(v, 1), unbiased=n > 1)
        means.append(mean.double())
        variances.append(var.double())
    return torch.stack(means).mean(0), torch.stack(variances).mean(0)


def _bn_reset(bn: _BN, values: Sequence[torch.Tensor]) -> None:
    mean, var = _bn_statistics(values)
    bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
    bn.running_var.copy_(var.to(bn.running_var.dtype))
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.fill_(len(values))


# -- the plan -----------------------------------------------------------------------------------------
@dataclass
class _Layer:
    """One correctable layer of the merged model."""

    node: str                 # merged node of the layer
    module: str               # its module target in the merged model
    head: int | None          # None: trunk; k: head of model k
    parent_nodes: dict[int, str]  # the fit point's node in graph k (every k for the trunk)
    fit_node: str             # the fit point's node in the merged graph (the layer or its BN)
    bn: str | None            # merged BN module target when the fit point is a BN
    refit: bool
    repair: bool
    pending_bias: torch.Tensor | None = None
    error_before: float | None = None
    axis: int = 1             # the channel axis at the fit point
    targets: list[torch.Tensor] | None = None
    target_stats: tuple[torch.Tensor, torch.Tensor] | None = None


def _head_prefix(targets: set[str]) -> str:
    """The prefix under which the rewrite put head modules (as `rewrite._head_prefix`)."""
    prefix = "heads"
    while any(t == prefix or t.startswith(prefix + ".") for t in targets):
        prefix = "fxzip_" + prefix
    return prefix


def _owner(target: str, parent_targets: set[str], prefix: str, num_models: int) -> tuple[int | None, str] | None:
    """(None, target) for a trunk module, (k, original target) for model k's head module."""
    if target in parent_targets:
        return None, target
    for k in range(num_models):
        head = f"{prefix}.{k}."
        if target.startswith(head) and target[len(head):] in parent_targets:
            return k, target[len(head):]
    return None


def _producers_between(graph: fx.Graph, is_layer: set[str]) -> tuple[set[str], set[str]]:
    """(layers that read no other layer upstream, layers with no layer downstream)."""
    upstream_layer: dict[str, bool] = {}
    for node in graph.nodes:
        upstream_layer[node.name] = any(
            (a.name in is_layer) or upstream_layer.get(a.name, False) for a in node.all_input_nodes)
    downstream_layer: dict[str, bool] = {}
    for node in reversed(list(graph.nodes)):
        downstream_layer[node.name] = any(
            (u.name in is_layer) or downstream_layer.get(u.name, False) for u in node.users)
    first = {n for n in is_layer if not upstream_layer[n]}
    last = {n for n in is_layer if not downstream_layer[n]}
    return first, last


def _module_nodes(graph: fx.GraphModule) -> dict[str, list[fx.Node]]:
    nodes: dict[str, list[fx.Node]] = {}
    for node in graph.graph.nodes:
        if node.op == "call_module":
            nodes.setdefault(node.target, []).append(node)
    return nodes


def _fit_point(graph: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The affine BatchNorm that is `node`'s only user (and reads nothing else), if any."""
    users = list(node.users)
    if len(users) != 1 or users[0].op != "call_module" or len(users[0].args) != 1 \
            or users[0].kwargs:
        return None
    module = graph.get_submodule(users[0].target)
    if isinstance(module, _BN) and module.affine and module.track_running_stats \
            and module.running_mean is not None:
        return users[0]
    return None


def _plan(merged: fx.GraphModule, graphs: Sequence[fx.GraphModule], options: Corrections) -> list[_Layer]:
    """The correctable layers of `merged`, each with its parents' fit-point nodes."""
    modules = [_module_nodes(g) for g in graphs]
    by_name = [{n.name: n for n in g.graph.nodes} for g in graphs]
    all_targets = {n.target for g in graphs for n in g.graph.nodes
                   if n.op in ("call_module", "get_attr")}
    prefix = _head_prefix(all_targets)
    calls: dict[str, int] = {}
    for node in merged.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    candidates: dict[str, tuple[int | None, fx.Node, list[fx.Node]]] = {}
    for node in merged.graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1 or len(node.args) != 1 or node.kwargs:
            continue
        if not _correctable(merged.get_submodule(node.target)):
            continue
        owner = _owner(node.target, set(modules[0]), prefix, len(graphs))
        if owner is None:  # a head module of a model k > 0 whose target graph 0 lacks
            owner = next(((k, node.target[len(f"{prefix}.{k}."):]) for k in range(len(graphs))
                          if node.target.startswith(f"{prefix}.{k}.")
                          and node.target[len(f"{prefix}.{k}."):] in modules[k]), None)
        if owner is None:
            continue
        head, original = owner
        if head is None:  # trunk: graph 0's node, and its partner in every graph (same name/target)
            if len(modules[0].get(original, [])) != 1:
                continue
            first = modules[0][original][0]
            partners = [by_name[k].get(first.name) for k in range(len(graphs))]
            if any(p is None or p.op != "call_module" or p.target != original for p in partners):
                partners = [modules[k].get(original, [None, None])[0]
                            if len(modules[k].get(original, [])) == 1 else None
                            for k in range(len(graphs))]
            if any(p is None for p in partners):
                continue
        else:
            if len(modules[head].get(original, [])) != 1:
                continue
            partners = [modules[head][original][0]]
        candidates[node.name] = (head, node, partners)
    head_layers = {name for name, (k, _, _) in candidates.items() if k is not None}
    first_layers, last_layers = _producers_between(merged.graph, head_layers)
    chosen = {"none": set(), "all": head_layers, "first": first_layers, "last": last_layers,
              "first+last": first_layers | last_layers}[options.refit_heads]
    plan = []
    for name, (head, node, partners) in candidates.items():
        refit = options.refit_trunk if head is None else name in chosen
        repair = options.repair and (head is None or options.refit_heads == "none" or name in chosen)
        if not (refit or repair):
            continue
        bn = _fit_point(merged, node)
        graph_of = [head] if head is not None else list(range(len(graphs)))
        parent_bns = [_fit_point(graphs[k], p) for k, p in zip(graph_of, partners)]
        if bn is not None and all(b is not None for b in parent_bns):
            fits = {k: b.name for k, b in zip(graph_of, parent_bns)}
            plan.append(_Layer(name, node.target, head, fits, bn.name, bn.target, refit, repair))
        else:
            fits = {k: p.name for k, p in zip(graph_of, partners)}
            plan.append(_Layer(name, node.target, head, fits, name, None, refit, repair))
    return plan


# -- merging targets by M ---------------------------------------------------------------------------
def _merge_index(analysis: Analysis, matches: dict[int, Match], feat: Feat, k: int,
                 num_models: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(position of each of model k's channels on the merged axis, members per merged channel,
    merged width) for a tensor of layout `feat`."""
    parts, counts, offset = [], [], 0
    for b in feat.blocks:
        match = matches.get(b.space)
        if match is None:
            if not analysis.spaces[b.space].pinned:
                raise KeyError(b.space)
            match = Match.identity(b.size, num_models)
        assign = torch.tensor(np.asarray(match.assign[k]), dtype=torch.long)
        parts.append((assign[:, None] * b.expand + torch.arange(b.expand)).reshape(-1) + offset)
        counts.append(torch.tensor(np.asarray(match.counts)).repeat_interleave(b.expand))
        offset += match.size * b.expand
    return torch.cat(parts), torch.cat(counts), offset


# -- the pass -----------------------------------------------------------------------------------------
class _Pass:
    def __init__(self, merged: fx.GraphModule, graphs: Sequence[fx.GraphModule], analysis: Analysis,
                 matches: dict[int, Match], batches: list[torch.Tensor], options: Corrections):
        self.merged, self.graphs, self.analysis, self.matches = merged, graphs, analysis, matches
        self.options = options
        self.plan = _plan(merged, graphs, options)
        self.by_node = {layer.node: layer for layer in self.plan}
        self.by_fit = {layer.fit_node: layer for layer in self.plan}
        needed: dict[int, set[str]] = {k: set() for k in range(len(graphs))}
        for layer in self.plan:
            for k, name in layer.parent_nodes.items():
                needed[k].add(name)
        self.runner = _Runner(merged, batches)
        self.parents = [_Runner(g, batches, keep=needed[k], reset_bn=options.reset_bn)
                        for k, g in enumerate(graphs)]
        self.generator = torch.Generator().manual_seed(options.seed)
        self.report = CorrectionReport()

    def run(self) -> CorrectionReport:
        with torch.no_grad():
            while self.runner.next_node is not None:
                node = self.runner.next_node
                layer = self.by_node.get(node.name)
                if layer is not None:
                    self._targets(layer)
                    if layer.refit:
                        self._refit(layer)
                if node.op == "call_module" and isinstance(self.merged.get_submodule(node.target), _BN):
                    self._before_bn(node)
                self.runner.step()
                fitted = self.by_fit.get(node.name)
                if fitted is not None:
                    self._finish(fitted)
        return self.report

    # targets ------------------------------------------------------------------------------------
    def _targets(self, layer: _Layer) -> None:
        """The fit point's target values (merged by M for a trunk layer) and the REPAIR target
        statistics (the average of the merged parent features' means and stds)."""
        if layer.head is not None:
            values = self.parents[layer.head].take(layer.parent_nodes[layer.head])
            axis = 1 % values[0].dim() if not isinstance(self.merged.get_submodule(layer.module),
                                                          nn.Linear) else values[0].dim() - 1
            layer.axis = axis
            layer.targets = list(values)
            if layer.repair:
                layer.target_stats = _channel_stats(values, axis)
            return
        feat = self.analysis.feat(layer.parent_nodes[0])
        if feat is None:
            raise KeyError(layer.parent_nodes[0])
        per_model = [p.take(layer.parent_nodes[k]) for k, p in enumerate(self.parents)]
        axis = feat.axis % per_model[0][0].dim()
        layer.axis = axis
        total, mean_t, std_t = None, None, None
        for k, values in enumerate(per_model):
            index, counts, width = _merge_index(self.analysis, self.matches, feat, k, len(self.graphs))
            index = index.to(values[0].device)
            scattered = []
            for v in values:
                shape = list(v.shape)
                shape[axis] = width
                scattered.append(v.new_zeros(shape).index_add_(axis, index, v))
            total = scattered if total is None else [a + s for a, s in zip(total, scattered)]
            if layer.repair:
                mean, std = _channel_stats(values, axis)
                m = torch.zeros(width, dtype=torch.float64).index_add_(0, index.cpu(), mean.cpu())
                s = torch.zeros(width, dtype=torch.float64).index_add_(0, index.cpu(), std.cpu())
                mean_t = m if mean_t is None else mean_t + m
                std_t = s if std_t is None else std_t + s
        shape = [1] * total[0].dim()
        shape[axis] = -1
        divisor = counts.to(total[0].device, total[0].dtype).reshape(shape)
        layer.targets = [t / divisor for t in total]
        if layer.repair:
            layer.target_stats = (mean_t / counts.double(), std_t / counts.double())

    # refit --------------------------------------------------------------------------------------
    def _refit(self, layer: _Layer) -> None:
        """Solve the layer (with its BN, if the fit point) by ridge regression toward its current
        effective weights; write the weights now and keep the intercept for the BN (if any)."""
        module = self.merged.get_submodule(layer.module)
        node = self.runner.next_node
        inputs = self.runner.env[node.args[0].name]
        z0 = [module(x) for x in inputs]
        weight = _weight_matrix(module).double()
        bias = module.bias.detach().double() if module.bias is not None \
            else weight.new_zeros(weight.shape[0])
        if layer.bn is not None:
            bn = self.merged.get_submodule(layer.bn)
            if self.options.reset_bn:
                _bn_reset(bn, z0)
            scale = bn.weight.detach().double() / (bn.running_var.double() + bn.eps).sqrt()
            shift = bn.bias.detach().double() - bn.running_mean.double() * scale
            y0 = [bn(z) for z in z0]
            weight, bias = weight * scale[:, None], bias * scale + shift
        else:
            y0 = z0
        d = weight.shape[1]
        gram = torch.zeros(d + 1, d + 1, dtype=torch.float64)
        cross = torch.zeros(d + 1, weight.shape[0], dtype=torch.float64)
        total_rows = sum(y.numel() // weight.shape[0] for y in y0)
        keep = 1.0 if self.options.max_rows is None else min(1.0, self.options.max_rows / total_rows)
        before_num, before_den = 0.0, 0.0
        for x, y, t in zip(inputs, y0, layer.targets):
            before_num += (t - y).double().square().sum().item()
            before_den += t.double().square().sum().item()
            patches, residual = _patches(module, x), _rows(module, t - y)
            if keep < 1.0:
                rows = (torch.rand(patches.shape[0], generator=self.generator) < keep).to(x.device)
                patches, residual = patches[rows], residual[rows]
            patches = torch.cat([patches, patches.new_ones(patches.shape[0], 1)], 1)
            gram += (patches.T @ patches).double().cpu()
            cross += (patches.T @ residual).double().cpu()
        if gram[d, d] == 0:
            return
        lam = self.options.ridge * gram.diagonal()[:d].mean().clamp_min(1e-12)
        penalty = torch.full((d + 1,), float(lam), dtype=torch.float64)
        penalty[d] = lam * 1e-6  # the intercept is (almost) free
        system = gram + torch.diag(penalty)
        factor, info = torch.linalg.cholesky_ex(system)
        delta = torch.cholesky_solve(cross, factor) if int(info) == 0 \
            else torch.linalg.lstsq(system, cross).solution
        weight = weight + delta[:d].T
        bias = bias + delta[d]
        device = module.weight.device
        if layer.bn is not None:
            _set_weight(module, weight.float().to(device), None)
            if module.bias is not None:
                module.bias = nn.Parameter(torch.zeros_like(module.bias), module.bias.requires_grad)
            layer.pending_bias = bias.float().to(device)
        else:
            _set_weight(module, weight.float().to(device), bias.float().to(device))
        self.report.refitted.append(layer.module)
        layer.error_before = math.sqrt(before_num / max(before_den, 1e-30))

    # BatchNorm ----------------------------------------------------------------------------------
    def _before_bn(self, node: fx.Node) -> None:
        """Reset the BN's statistics on its (corrected) inputs; a refitted fit point's BN then
        passes the fitted map through (weight = sqrt(var + eps), bias = mean + intercept)."""
        bn = self.merged.get_submodule(node.target)
        layer = self.by_fit.get(node.name)
        refitted = layer is not None and layer.pending_bias is not None
        if not (self.options.reset_bn or refitted) or not bn.track_running_stats \
                or bn.running_mean is None:
            return
        _bn_reset(bn, self.runner.env[node.args[0].name])
        if refitted:
            bn.weight.data.copy_((bn.running_var + bn.eps).sqrt())
            bn.bias.data.copy_(bn.running_mean + layer.pending_bias)
            layer.pending_bias = None

    # REPAIR and cleanup -------------------------------------------------------------------------
    def _finish(self, layer: _Layer) -> None:
        if layer.error_before is not None:
            num, den = 0.0, 0.0
            for t, y in zip(layer.targets, self.runner.env[layer.fit_node]):
                num += (t - y).double().square().sum().item()
                den += t.double().square().sum().item()
            self.report.errors[layer.module] = (layer.error_before, math.sqrt(num / max(den, 1e-30)))
        if layer.repair and layer.target_stats is not None:
            self._repair(layer)
        layer.targets, layer.target_stats = None, None

    def _repair(self, layer: _Layer) -> None:
        """Rescale the fit point's features to the target mean/std; fold into the BN's affine
        parameters or the layer's rows and bias; update the computed values."""
        values = self.runner.env[layer.fit_node]
        axis = layer.axis
        mean, std = _channel_stats(values, axis)
        mean_t, std_t = layer.target_stats
        ratio = torch.where(std > 1e-8 * std.max().clamp_min(1e-30), std_t / std.clamp_min(1e-30),
                            torch.ones_like(std))
        shift = mean_t - mean * ratio  # y' = y * ratio + shift
        module = self.merged.get_submodule(layer.bn or layer.module)
        device, dtype = module.weight.device, module.weight.dtype
        r, s = ratio.to(device, dtype), shift.to(device, dtype)
        if layer.bn is not None:
            module.weight.data.mul_(r)
            module.bias.data.mul_(r).add_(s)
        else:
            weight = _weight_matrix(module) * r[:, None]
            bias = (module.bias.detach() if module.bias is not None else torch.zeros_like(r)) * r + s
            _set_weight(module, weight, bias)
        shape = [1] * values[0].dim()
        shape[axis] = -1
        self.runner.env[layer.fit_node] = [v * r.reshape(shape) + s.reshape(shape) for v in values]
        self.report.repaired.append(layer.bn or layer.module)


def correct(merged: fx.GraphModule, graphs: Sequence[fx.GraphModule], analysis: Analysis,
            matches: dict[int, Match], inputs: Iterable[torch.Tensor],
            options: Corrections | None = None, *, max_samples: int | None = None) -> CorrectionReport:
    """Correct a merged model in place (see the module docstring); returns a report.

    merged: the rewrite's GraphModule (trunk modules under their qualified names, model k's head
        modules under ``heads.<k>.``); its BatchNorms are reset here (it need not be reset before).
    graphs: the parents' traced graphs (`Zipper.graphs`); analysis: `Zipper.analysis`;
    matches: the Match of every merged space (what the rewrite used; pinned spaces may be left
        out); inputs: the calibration batches (tensors); options: `Corrections()` by default;
    max_samples: use only the first this many calibration samples (None: all).
    """
    options = options or Corrections()
    start = time.perf_counter()
    batches, seen = [], 0
    for x in inputs:
        if max_samples is not None and seen >= max_samples:
            break
        if max_samples is not None and seen + x.shape[0] > max_samples:
            x = x[:max_samples - seen]
        batches.append(x)
        seen += x.shape[0]
    if not batches:
        raise InputError("correct() needs at least one calibration batch")
    was_training = merged.training
    merged.eval()
    report = _Pass(merged, graphs, analysis, matches, batches, options).run()
    merged.train(was_training)
    report.seconds = time.perf_counter() - start
    return report
