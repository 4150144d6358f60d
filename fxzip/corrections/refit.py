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
parents as given. With ``parents_as_given`` (a data-free merge, whose inputs are synthesised) the
targets are the parents as given while the merged model's BatchNorms are still reset, except a
refitted layer's own BatchNorm, which keeps the merge's statistics (the fitted weights absorb
them, so a self-merge stays exact).

Few calibration samples (`Corrections.bn_prior`): BatchNorm statistics re-estimated on a handful
of samples are noisy, and a head's noisy statistics cost the most (deep layers, few positions).
A head's BatchNorm normalises one model's own features, so its given running statistics (from the
training data) are a prior for them: the head's BatchNorms and their counterparts in its parent
(for the targets) blend the calibration statistics with the given ones, weight N / (N + bn_prior)
on the new for N samples (16 by default: chosen on the validation split of
`python -m benchmarks.scarce_data --split val`). A zipped trunk BatchNorm's given statistics
average different features, so the trunk and its parents' counterparts keep the calibration
statistics alone: both sides are estimated alike and a permuted self-merge stays exact. The
refits' ridge needs no such rule: with fewer rows than inputs their change lies in the span of
the rows seen (the dual solution), and a ridge or a skip that grew with inputs per row
(`ridge_rows`, `min_rows`, off by default) lost accuracy on that split.

A *correctable layer* is a ``Linear``, ``Conv1d`` or ``Conv2d`` module (groups 1, zero padding,
called once). Where its only user is an affine BatchNorm, the pair is corrected as one affine map
and its *fit point* is the BatchNorm's output: the layer's weights then hold the fitted map and
the BatchNorm keeps running statistics that equal the calibration statistics of its input with
``weight``/``bias`` set to make it pass the fitted map through. Every other BatchNorm of the
merged model has its running statistics re-estimated on the way (per batch mean and unbiased
variance averaged over batches, as `fxzip.reset_bn` does, but of the eval-mode model's inputs, on
inputs that are already corrected; both write with one accumulator,
`fxzip.corrections.batch_norm.BatchNormStatistics`, and differ only in where a BatchNorm's inputs
come from): the pass replaces `reset_bn`. Nothing is added to the graph
(a bias parameter is created on a bias-free layer with no BatchNorm after it, when a correction
needs an intercept).

Measured (`python -m benchmarks.corrections`, setting (a): ResNet-20×4 on the digits halves): the refit of
the trunk plus each head's first and last layers (the default `Corrections()`) lifts zipit's
joint accuracy at every stop point to within about a point of the ensemble of the BN-reset
parents; REPAIR adds little once BatchNorms are reset or layers refitted, and is off by default.

Memory: the pass runs the merged model and every parent node by node over ALL its calibration
batches at once, so it keeps the live activations of all of them (and, per layer, the ``d × d``
Gram matrix of its inputs, ``d`` = in-features × kernel size; ``n × n`` for n < d rows).
`Corrections.memory_gib` bounds that: the activations a sample needs are estimated from the
traced shapes
(`fxzip.corrections.budget.activation_bytes_per_sample`), and only about as many samples as fit the budget are corrected
on, chosen from every batch by their own values (4 GiB by default: every sample of a small model,
about a hundred 224² images of a ResNet-50 pair); the report says how many were used. The cost of
the pass is then bounded too.
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import torch.nn as nn
from tqdm.auto import tqdm

from ..errors import InputError
from ..matching.match import Match
from ..runtime.distributed import is_distributed
from ..runtime.inputs import batch_size, leading
from ..runtime.sampling import sample_keys
from .batch_norm import batch_norm_statistics
from .budget import samples_within, within_budget
from .channels import channel_stats, reduce
from .plan import Layer, origin, plan
from .regression import regression_rows, ridge_change, squared_norm, total_rows, weight_matrix
from .repair import repair
from .runner import Runner
from .settings import CorrectionReport, Corrections
from .targets import merged_targets

if TYPE_CHECKING:  # type hints only: the pass reads `analysis.feat`, `.spaces` and Feat blocks
    from ..passes.analysis import Analysis

__all__ = ["correct"]

_BN = nn.modules.batchnorm._BatchNorm


class _Pass:
    """The lockstep pass: the merged model node by node, its parents alongside (module docstring)."""

    def __init__(self, merged: fx.GraphModule, graphs: Sequence[fx.GraphModule], analysis: Analysis,
                 matches: dict[int, Match], batches: list[Any], options: Corrections,
                 pairing: Any = None, group: Any = None, progress: bool = False):
        self.merged, self.graphs, self.analysis, self.matches = merged, graphs, analysis, matches
        self.options, self.group, self.progress = options, group, progress
        self.plan, skipped = plan(merged, graphs, options, pairing)
        self.by_node = {layer.node: layer for layer in self.plan}
        self.by_fit = {layer.fit_node: layer for layer in self.plan}
        needed: dict[int, set[str]] = {k: set() for k in range(len(graphs))}
        for layer in self.plan:
            for k, name in layer.parent_nodes.items():
                needed[k].add(name)
        self.runner = Runner(merged, batches)
        samples = torch.tensor([float(sum(batch_size(b) for b in batches))], dtype=torch.float64)
        reduce([samples], group)  # of every rank
        # `Corrections.bn_prior` (parents taken as given: their statistics are not re-estimated)
        self.bn_weight = 1.0 if options.parents_as_given or not options.reset_bn else \
            options.bn_weight(int(samples.item()))
        parents_reset = options.reset_bn and not options.parents_as_given
        zipped: dict[int, set[str]] = {k: set() for k in range(len(graphs))}  # parents' trunk nodes
        for node in merged.graph.nodes:
            if (node.meta.get("fxzip_origin") or (0,))[0] is None:
                for k, name in (origin(node, pairing, len(graphs)) or {}).items():
                    zipped[k].add(name)
        self.parents = [Runner(g, batches, keep=needed[k], reset_bn=parents_reset, group=group,
                               bn_weight=self.bn_weight, unblended=zipped[k])
                        for k, g in enumerate(graphs)]
        self.sample_keys = [sample_keys(b, options.seed) for b in batches]
        self.report = CorrectionReport(skipped=skipped, bn_weight=self.bn_weight)

    def _dim(self, k: int, name: str) -> int:
        """The number of dimensions of graph k's node (from the traced shapes: a rank with no
        batch has no values to read it from)."""
        meta = next(n for n in self.graphs[k].graph.nodes if n.name == name).meta
        tensor = meta.get("tensor_meta")
        if tensor is not None and hasattr(tensor, "shape"):
            return len(tensor.shape)
        value = meta.get("val")
        return value.dim() if isinstance(value, torch.Tensor) else 2

    def run(self) -> CorrectionReport:
        bar = tqdm(total=len(self.plan), desc="fxzip corrections", unit="layer", leave=False,
                   disable=not (self.progress and self.plan))
        with torch.no_grad(), bar:
            while self.runner.next_node is not None:
                node = self.runner.next_node
                layer = self.by_node.get(node.name)
                if layer is not None:
                    self._targets(layer)
                    if layer.refit:
                        self._refit(layer)
                    bar.update(1)
                if node.op == "call_module" and isinstance(self.merged.get_submodule(node.target), _BN):
                    self._before_bn(node)
                self.runner.step()
                fitted = self.by_fit.get(node.name)
                if fitted is not None:
                    self._finish(fitted)
        return self.report

    # targets ------------------------------------------------------------------------------------
    def _targets(self, layer: Layer) -> None:
        """The fit point's target values (merged by M for a trunk layer, `merged_targets`) and the
        REPAIR target statistics (the average of the merged parent features' means and stds)."""
        if layer.head is not None:
            values = self.parents[layer.head].take(layer.parent_nodes[layer.head])
            dim = self._dim(layer.head, layer.parent_nodes[layer.head])
            module = self.merged.get_submodule(layer.module)
            axis = dim - 1 if isinstance(module, nn.Linear) else 1 % dim
            layer.axis = axis
            layer.targets = list(values)
            if layer.repair:
                layer.target_stats = channel_stats(values, axis, module.weight.shape[0], self.group)
            return
        feat = self.analysis.feat(layer.parent_nodes[0])
        if feat is None:
            raise KeyError(layer.parent_nodes[0])
        per_model = [p.take(layer.parent_nodes[k]) for k, p in enumerate(self.parents)]
        dim = self._dim(0, layer.parent_nodes[0])
        layer.axis = feat.axis % dim
        layer.targets, stats = merged_targets(per_model, feat, dim, self.analysis, self.matches,
                                              layer.repair, self.group)
        if layer.repair:
            layer.target_stats = stats

    # refit --------------------------------------------------------------------------------------
    def _refit(self, layer: Layer) -> None:
        """Solve the layer (with its BN, if the fit point) by ridge regression toward its current
        effective weights (`ridge_change`), and write the change back in the layer's own
        parametrisation: the layer's weights change by the fitted change divided by the BN's
        scale, the intercept goes to the BN's bias (or the layer's bias); the BN keeps the
        statistics it was reset to here. A bias-free layer without a BN is fitted without
        intercept (no parameter is added), so the merged model keeps its parents' modules and can
        be merged again."""
        module = self.merged.get_submodule(layer.module)
        node = self.runner.next_node
        inputs = self.runner.env[node.args[0].name]
        z0 = [module(x) for x in inputs]
        d, count = module.weight[0].numel(), total_rows(module, z0, self.group)
        used = regression_rows(count, self.options.max_rows)
        ridge = self.options.ridge_for(used, d)
        if ridge is None:  # too few rows (or none): the layer stays as merged, its BN reset
            if used:
                self.report.skipped[layer.module] = (
                    f"refit skipped: {used} rows for {d} inputs, fewer than min_rows × inputs "
                    f"= {self.options.min_rows:g} × {d}")
            return
        scale = None
        if layer.bn is not None:
            bn = self.merged.get_submodule(layer.bn)
            if self.options.reset_bn and not self.options.parents_as_given:
                # (with the parents as given, the merged BN keeps the merge's statistics: the
                # fitted weights absorb their error, and a self-merge stays exact)
                self._write_bn(bn, layer.head, z0)
            scale = bn.weight.detach().double() / (bn.running_var.double() + bn.eps).sqrt()
            y0 = [bn(z) for z in z0]
        else:
            y0 = z0
        intercept = layer.bn is not None or module.bias is not None
        delta, before_num, before_den = ridge_change(
            module, inputs, y0, layer.targets, self.sample_keys, ridge=ridge,
            max_rows=self.options.max_rows, intercept=intercept, group=self.group,
            row_count=count)
        if delta is None:
            return
        self.report.ridges[layer.module] = ridge
        change = delta[:d].T  # of the effective map (rows of weight·scale for a BN fit point)
        device, dtype = module.weight.device, module.weight.dtype
        if scale is not None:
            usable = scale.abs() > 1e-6 * scale.abs().max().clamp_min(1e-30)
            rows = torch.where(usable[:, None], change / torch.where(usable, scale, 1.0)[:, None],
                               torch.zeros_like(change))
            new = weight_matrix(module).double() + rows
            module.weight.data.copy_(new.reshape(module.weight.shape).to(device, dtype))
            bn.bias.data.add_(delta[d].to(bn.bias.device, bn.bias.dtype))
            layer.pending_bias = True  # the BN keeps the statistics of this fit
        else:
            new = weight_matrix(module).double() + change
            module.weight.data.copy_(new.reshape(module.weight.shape).to(device, dtype))
            if intercept:
                module.bias.data.add_(delta[d].to(device, dtype))
        self.report.refitted.append(layer.module)
        layer.error_before = math.sqrt(before_num / max(before_den, 1e-30))

    # BatchNorm ----------------------------------------------------------------------------------
    def _before_bn(self, node: fx.Node) -> None:
        """Reset the BN's statistics on its (corrected) inputs, unless it is a refitted fit
        point (its statistics are part of the fitted map then): `batch_norm_statistics`, the
        accumulator `fxzip.reset_bn` uses too, fed here with the eval-mode merged model's values."""
        bn = self.merged.get_submodule(node.target)
        layer = self.by_fit.get(node.name)
        if layer is not None and layer.pending_bias is not None:
            layer.pending_bias = None
            return
        if not self.options.reset_bn or not bn.track_running_stats or bn.running_mean is None:
            return
        self._write_bn(bn, (node.meta.get("fxzip_origin") or (None,))[0],
                       self.runner.env[node.args[0].name])

    def _write_bn(self, bn: nn.Module, head: int | None, values: list[torch.Tensor]) -> None:
        """Set a merged BatchNorm's statistics from its inputs `values` (one tensor per batch):
        a head's (model `head`'s own features) blended with its given statistics as its parent's
        are (`Corrections.bn_prior`); a zipped trunk BatchNorm's from the samples alone (its given
        statistics average different features; its parents' are not blended either)."""
        stats = batch_norm_statistics(values, bn.num_features, self.group)
        if head is not None:
            stats.toward(bn, self.bn_weight)
        stats.write(bn)

    # REPAIR and cleanup -------------------------------------------------------------------------
    def _finish(self, layer: Layer) -> None:
        if layer.error_before is not None:
            sums = torch.zeros(2, dtype=torch.float64)
            for t, y in zip(layer.targets, self.runner.env[layer.fit_node]):
                sums[0] += squared_norm(t - y)
                sums[1] += squared_norm(t)
            reduce([sums], self.group)
            num, den = sums.tolist()
            self.report.errors[layer.module] = (layer.error_before, math.sqrt(num / max(den, 1e-30)))
        if layer.repair and layer.target_stats is not None:
            self.runner.env[layer.fit_node] = repair(
                self.merged.get_submodule(layer.bn or layer.module),
                self.runner.env[layer.fit_node], layer.axis, layer.target_stats,
                is_bn=layer.bn is not None, group=self.group)
            self.report.repaired.append(layer.bn or layer.module)
        layer.targets, layer.target_stats = None, None


def correct(merged: fx.GraphModule, graphs: Sequence[fx.GraphModule], analysis: Analysis,
            matches: dict[int, Match], inputs: Iterable[Any],
            options: Corrections | None = None, *, max_samples: int | None = None,
            pairing: Any = None, group: Any = None, progress: bool = False) -> CorrectionReport:
    """Correct a merged model in place (see the module docstring); returns a report.

    merged: the rewrite's GraphModule (its nodes carry their parents' nodes, `fxzip_origin`);
        its BatchNorms are reset here (it need not be reset before).
    graphs: the parents' traced graphs (`Zipper.graphs`); analysis: `Zipper.analysis`;
    matches: the Match of every merged space (what the rewrite used; pinned spaces may be left
        out); inputs: the calibration batches (tensors or dicts of keyword tensors); options:
        `Corrections()` by default; max_samples: use only the first this many calibration
        samples (None: all; the pass holds their activations at once, see the module docstring);
    pairing: `Zipper.pairing` (graph 0's trunk nodes → graph k's), needed where the models differ
        past the trunk (None: the graphs' nodes have the same names);
    group: under torch.distributed, `inputs` are this rank's shard (it may be empty): every sum
        (Gram matrices, BatchNorm and REPAIR statistics) is all-reduced over `group` before it is
        used, so every rank writes the same weights. Every rank of the group must call.
    progress: a progress bar over the corrected layers.
    """
    options = options or Corrections()
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                    or max_samples < 1):
        raise InputError(f"max_samples must be None or an int >= 1, got {max_samples!r}")
    start = time.perf_counter()
    batches, seen = [], 0
    for x in inputs:
        if max_samples is not None and seen >= max_samples:
            break
        n = batch_size(x)
        if max_samples is not None and seen + n > max_samples:
            x, n = leading(x, max_samples - seen), max_samples - seen
        batches.append(x)
        seen += n
    offered = seen
    batches = within_budget(batches, samples_within(graphs, options.memory_gib), options.seed,
                             group)
    seen = sum(batch_size(x) for x in batches)
    if not batches and not is_distributed():
        raise InputError("correct() needs at least one calibration batch")
    was_training = merged.training
    merged.eval()
    report = _Pass(merged, graphs, analysis, matches, batches, options, pairing, group,
                   progress).run()
    merged.train(was_training)
    report.seconds = time.perf_counter() - start
    report.samples = seen
    report.offered = offered
    report.options = {k: getattr(options, k) for k in options.__dataclass_fields__}
    return report
