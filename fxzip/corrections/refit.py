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

Memory: the pass runs the merged model and every parent node by node over ALL its calibration
batches at once, so it keeps the live activations of all of them (and, per layer, the ``(d+1)²``
Gram matrix of its inputs, ``d`` = in-features × kernel size). `Corrections.memory_gib` bounds
that: the activations a sample needs are estimated from the traced shapes
(`activation_bytes_per_sample`), and only about as many samples as fit the budget are corrected
on, chosen from every batch by their own values (4 GiB by default: every sample of a small model,
about a hundred 224² images of a ResNet-50 pair); the report says how many were used. The cost of
the pass is then bounded too.
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

from ..runtime.distributed import all_reduce_sum, is_distributed
from ..errors import InputError
from ..runtime.inputs import batch_size, batch_tensors, leading, selected
from ..matching.core import Match
from ..passes.rewrite import Layouts
from ..runtime.sampling import kept_rows, sample_keys, unit_keys
from ..graph.tracing import is_inplace

if TYPE_CHECKING:  # type hints only: the pass reads `analysis.feat`, `.spaces` and Feat blocks
    from ..passes.analysis import Analysis
    from ..rules.layout import Feat

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
    memory_gib: the activations the pass may hold at once, in GiB, estimated from the traced
        shapes: where the calibration samples do not all fit, about as many as fit are corrected
        on, chosen from every batch by the samples' own values (not the first ones: data sorted
        by class keep every class; the report says how many); None: every sample. Under
        torch.distributed the share is of all ranks' samples: the same samples as in one
        process.
    """

    refit_trunk: bool = True
    refit_heads: str = "first+last"
    repair: bool = False
    ridge: float = 1e-2
    max_rows: int | None = 8192
    reset_bn: bool = True
    seed: int = 0
    memory_gib: float | None = 4.0

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
        if self.memory_gib is not None and (isinstance(self.memory_gib, bool)
                                            or not isinstance(self.memory_gib, (int, float))
                                            or not math.isfinite(self.memory_gib)
                                            or self.memory_gib <= 0):
            raise InputError(f"memory_gib must be None or a number of GiB > 0, got "
                             f"{self.memory_gib!r}")

    @property
    def active(self) -> bool:
        """Whether any layer is corrected (else `correct` is a BatchNorm reset only)."""
        return self.refit_trunk or self.refit_heads != "none" or self.repair


@dataclass
class CorrectionReport:
    """What `correct` did: the layers refitted / repaired (merged-model module names), the
    relative error of each refitted layer's fit-point output to its target before and after, the
    Linear/Conv layers left uncorrected with the reason (e.g. a module called more than once),
    the options, the calibration samples used and the seconds spent."""

    refitted: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)
    seconds: float = 0.0
    skipped: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    samples: int = 0
    offered: int = 0  # calibration samples given (more than `samples` where the budget binds)

    def __str__(self) -> str:
        of = f" of {self.offered} (memory_gib)" if self.offered > self.samples else ""
        lines = [f"fxzip corrections: {len(self.refitted)} layers refitted, {len(self.repaired)} "
                 f"repaired on {self.samples}{of} samples in {self.seconds:.2f}s"]
        for name, (before, after) in self.errors.items():
            lines.append(f"  {name}: relative error {before:.4f} -> {after:.4f}")
        for name, why in self.skipped.items():
            lines.append(f"  {name}: not corrected: {why}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"refitted": list(self.refitted), "repaired": list(self.repaired),
                "errors": {k: [float(a), float(b)] for k, (a, b) in self.errors.items()},
                "seconds": float(self.seconds), "skipped": dict(self.skipped),
                "options": dict(self.options), "samples": int(self.samples),
                "offered": int(self.offered)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CorrectionReport":
        known = set(cls.__dataclass_fields__)
        fields = {k: v for k, v in data.items() if k in known}
        fields["errors"] = {k: tuple(v) for k, v in fields.get("errors", {}).items()}
        return cls(**fields)


# -- node-by-node execution over all batches --------------------------------------------------------
class _Runner:
    """Runs a GraphModule node by node over a list of batches at once (a list of values per node),
    freeing each value after its last use unless it is in `keep`. With `reset_bn`, every eval-mode
    BatchNorm normalises with the statistics of its inputs on these batches (as after
    `fxzip.reset_bn`, but on eval-mode inputs) without its module being changed."""

    def __init__(self, gm: fx.GraphModule, batches: Sequence[Any], keep: Iterable[str] = (),
                 reset_bn: bool = False, group: Any = None):
        self.gm, self.batches, self.reset_bn, self.group = gm, list(batches), reset_bn, group
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
                stats = _bn_statistics(inputs, module.num_features, self.group)
                if stats is not None:
                    mean, var = (v.to(module.running_mean.device, module.running_mean.dtype)
                                 for v in stats[:2])
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


# -- layers -----------------------------------------------------------------------------------------
def _patches(module: nn.Module, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The (rows, d) matrix of a layer's inputs, one row per output position (im2col); with
    `rows` (a mask over all of them, sample-major) only those rows, gathered straight from the
    input without unfolding the rest (the same values in the same order)."""
    if isinstance(module, nn.Linear):
        flat = x.reshape(-1, x.shape[-1])
        return flat if rows is None else flat[rows]
    padding = 0 if isinstance(module.padding, str) else module.padding
    if isinstance(module, nn.Conv1d):
        pad = padding if isinstance(padding, int) else padding[0]
        args = ((1, module.kernel_size[0]), (1, module.dilation[0]), (0, pad), (1, module.stride[0]))
        x = x.unsqueeze(2)
    else:
        args = (module.kernel_size, module.dilation, padding, module.stride)
    if rows is not None:
        return _gathered_patches(x, rows, *args)
    cols = F.unfold(x, args[0], dilation=args[1], padding=args[2], stride=args[3])
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _gathered_patches(x: torch.Tensor, rows: torch.Tensor, kernel: Any, dilation: Any,
                      padding: Any, stride: Any) -> torch.Tensor:
    """The rows of `F.unfold(x, ...)`'s patch matrix (sample-major, (C·kh·kw) columns in unfold's
    order) selected by the mask `rows`, by indexing the zero-padded input at the kept positions."""
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = map(_pair, (kernel, dilation, padding, stride))
    n, c, h, w = x.shape
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    index = rows.nonzero().flatten().to(x.device)
    sample, position = index // (oh * ow), index % (oh * ow)
    top, left = (position // ow) * sh, (position % ow) * sw
    padded = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    i = top[:, None, None] + (torch.arange(kh, device=x.device) * dh)[None, :, None]
    j = left[:, None, None] + (torch.arange(kw, device=x.device) * dw)[None, None, :]
    patches = padded[sample[:, None, None], :, i, j]  # (kept, kh, kw, C)
    return patches.permute(0, 3, 1, 2).reshape(len(index), c * kh * kw)


def _rows(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """A layer's (or its BatchNorm's) output as (rows, out), rows in the order of `_patches`."""
    if isinstance(module, nn.Linear):
        return y.reshape(-1, y.shape[-1])
    return y.movedim(1, -1).reshape(-1, y.shape[1])


def _rows_at(module: nn.Module, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`_rows(module, y)[rows]` (`rows` a mask over all rows, sample-major) gathered straight
    from `y`, without first copying every row into the channels-last layout."""
    if isinstance(module, nn.Linear):
        return y.reshape(-1, y.shape[-1])[rows.to(y.device)]
    flat = y.reshape(y.shape[0], y.shape[1], -1)
    index = rows.nonzero().flatten().to(y.device)
    return flat[index // flat.shape[2], :, index % flat.shape[2]]


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


def _var_mean(v: torch.Tensor, dims: list[int], unbiased: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.var_mean(v, dims)` in two plain passes (the mean, then the centred squares): the
    same values, about 6× faster on the CPU for a channel axis between reduced axes."""
    mean = v.mean(dims, keepdim=True)
    n = v.numel() // max(mean.numel(), 1)
    var = (v - mean).square_().sum(dims) / max(n - 1 if unbiased else n, 1)
    return var, mean.reshape(var.shape)


def _squared_norm(v: torch.Tensor) -> float:
    """Σ v², as a Python float (float32 norm: ample for a reported relative error)."""
    return float(torch.linalg.vector_norm(v.float())) ** 2


def _reduce(values: Sequence[torch.Tensor], group: Any) -> None:
    """Sum CPU float64 tensors over the ranks of `group`, in place (nothing in one process). Every
    rank makes the same calls in the same order: the pass walks the same merged graph on each."""
    if is_distributed():
        all_reduce_sum(list(values), group)


def _channel_stats(values: Sequence[torch.Tensor], axis: int, width: int,
                   group: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Population mean and std per channel over all batches and positions (of every rank),
    float32 per batch, combined in float64."""
    sums = torch.zeros(2, width, dtype=torch.float64)
    count = torch.zeros(1, dtype=torch.float64)
    for v in values:
        var, mean = _var_mean(v.float(), _reduce_dims(v, axis), unbiased=False)
        n = v.numel() // v.shape[axis]
        sums[0] += mean.double().cpu() * n
        sums[1] += (var.double() + mean.double().square()).cpu() * n
        count += n
    _reduce([sums, count], group)
    mean = sums[0] / count.clamp_min(1)
    return mean, (sums[1] / count.clamp_min(1) - mean.square()).clamp_min(0).sqrt()


def _bn_statistics(values: Sequence[torch.Tensor], width: int,
                   group: Any = None) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """Running mean/var as `fxzip.reset_bn` sets them: the equal-weight average over batches (of
    every rank) of each batch's mean and unbiased variance (per channel, axis 1), and the number
    of those batches; None if no rank has a batch."""
    sums = torch.zeros(2, width, dtype=torch.float64)
    count = torch.zeros(1, dtype=torch.float64)
    for v in values:
        n = v.numel() // v.shape[1]
        var, mean = _var_mean(v.float(), _reduce_dims(v, 1), unbiased=n > 1)
        sums[0] += mean.double().cpu()
        sums[1] += var.double().cpu()
        count += 1
    _reduce([sums, count], group)
    if count.item() == 0:
        return None
    return sums[0] / count, sums[1] / count, int(count.item())


def _bn_reset(bn: _BN, values: Sequence[torch.Tensor], group: Any = None) -> None:
    stats = _bn_statistics(values, bn.num_features, group)
    if stats is None:
        return
    mean, var, batches = stats
    bn.running_mean.copy_(mean.to(bn.running_mean.device, bn.running_mean.dtype))
    bn.running_var.copy_(var.to(bn.running_var.device, bn.running_var.dtype))
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.fill_(batches)  # every rank's batches, as reset_bn counts them


# -- memory ---------------------------------------------------------------------------------------
def _meta_bytes(meta: Any) -> int | None:
    """Bytes of the tensors a node's recorded metadata describes (nested tuples summed)."""
    if hasattr(meta, "shape") and hasattr(meta, "dtype"):
        try:
            return math.prod(int(d) for d in meta.shape) * meta.dtype.itemsize
        except (TypeError, ValueError, RuntimeError):  # symbolic or unknown sizes
            return None
    if isinstance(meta, (list, tuple)):
        sizes = [_meta_bytes(m) for m in meta]
        return sum(s for s in sizes if s is not None)
    if isinstance(meta, dict):
        return _meta_bytes(list(meta.values()))
    return 0


def activation_bytes_per_sample(gm: fx.GraphModule) -> float | None:
    """The largest sum of live activations (bytes per sample) while `gm` runs node by node and
    frees each value after its last use, from the shapes traced on the example batch; None where
    the example's batch size is unknown."""
    nodes = list(gm.graph.nodes)
    last = {}
    for i, node in enumerate(nodes):
        for arg in node.all_input_nodes:
            last[arg] = i
    batch = None
    live: dict[fx.Node, int] = {}
    total = peak = 0
    for i, node in enumerate(nodes):
        meta = node.meta.get("tensor_meta", node.meta.get("val"))
        if node.op == "placeholder" and batch is None:
            shape = getattr(meta, "shape", None)
            batch = int(shape[0]) if shape is not None and len(shape) else None
        if node.op not in ("get_attr", "output"):
            live[node] = _meta_bytes(meta) or 0
            total += live[node]
            peak = max(peak, total)
        for arg in node.all_input_nodes:
            if last.get(arg) == i:
                total -= live.pop(arg, 0)
    return peak / batch if batch else None


def _within_budget(batches: list[Any], budget: int | None, seed: int, group: Any) -> list[Any]:
    """About `budget` samples of `batches` (all if they fit), spread over all of them: sample i is
    kept where its key (from its own values, `fxzip.runtime.sampling`) falls below budget / total, total
    counted over every rank, so the subset depends neither on the order of the data (a loader
    sorted by class keeps every class) nor on its batching or sharding; at least one sample in
    one process. Batches left empty are dropped."""
    count = torch.tensor([float(sum(batch_size(x) for x in batches))], dtype=torch.float64)
    _reduce([count], group)
    total = count.item()
    if budget is None or total <= budget:
        return batches
    share = budget / total
    kept = []
    for x in batches:
        mask = unit_keys(sample_keys(x, seed + 1)) < share  # keys apart from the rows' keys
        if bool(mask.any()):
            kept.append(selected(x, mask))
    if not kept and batches and not is_distributed():  # a budget below one sample's share
        kept = [leading(batches[0], 1)]
    return kept


def samples_within(graphs: Sequence[fx.GraphModule], memory_gib: float | None) -> int | None:
    """How many calibration samples the pass can hold within `memory_gib` (None: no bound or
    unknown): every parent's live activations, the merged model's and the fit targets (each
    about as large as the largest parent's)."""
    if memory_gib is None:
        return None
    per_graph = [activation_bytes_per_sample(g) for g in graphs]
    if any(b is None for b in per_graph):
        return None
    per_sample = sum(per_graph) + 2 * max(per_graph)
    return max(1, int(memory_gib * 2**30 // max(per_sample, 1.0)))


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
    pending_bias: bool | None = None  # refitted with its BN: the BN's statistics are kept
    error_before: float | None = None
    axis: int = 1             # the channel axis at the fit point
    targets: list[torch.Tensor] | None = None
    target_stats: tuple[torch.Tensor, torch.Tensor] | None = None


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


# A refit solves a (d+1)² float64 system (d = in-features × kernel size): three such matrices at
# once. Above this d (0.5 GB each) a layer is left as merged: VGG's 7×7 ConvMlp and torchvision's
# 25088-input classifier would need 5 GB each (and are fitted on far fewer rows than d).
MAX_REFIT_INPUTS = 8192


def _why_not(module: nn.Module) -> str | None:
    """Why a Linear/Conv module cannot be corrected (None: it can; "" : not a layer kind at all)."""
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) and \
            module.weight[0].numel() > MAX_REFIT_INPUTS:
        return (f"{module.weight[0].numel()} inputs per output (in-features × kernel): its "
                f"least-squares system would be too large (limit {MAX_REFIT_INPUTS})")
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.groups != 1:
            return f"grouped convolution (groups={module.groups})"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
        if isinstance(module.padding, str) and module.padding != "valid":
            return f"padding={module.padding!r}"
        return None
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return f"{type(module).__name__} layers are not refitted"
    return ""


def _origin(node: fx.Node, pairing: Any, num_models: int) -> dict[int, str] | None:
    """The parent nodes a merged node computes: {k: graph k's node} for every model (a trunk
    node, through the pairing) or for its own model only (a head node); None if unknown."""
    origin = node.meta.get("fxzip_origin")
    if origin is None:
        return None
    head, name = origin
    if head is not None:
        return {head: name}
    if pairing is None:
        return {k: name for k in range(num_models)}
    try:
        return {k: pairing.name(k, name) if k else name for k in range(num_models)}
    except KeyError:
        return None


def _plan(merged: fx.GraphModule, graphs: Sequence[fx.GraphModule], options: Corrections,
          pairing: Any = None) -> tuple[list[_Layer], dict[str, str]]:
    """The correctable layers of `merged`, each with its parents' fit-point nodes, and the
    layers left uncorrected with the reason (merged module name -> reason). A merged node's
    parents are found by the provenance the rewrite records on it (`fxzip_origin`: graph 0's node
    for the trunk, read in graph k through the pairing; model k's own node for a head)."""
    calls: dict[str, int] = {}
    for node in merged.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    nodes = [{n.name: n for n in g.graph.nodes} for g in graphs]
    parent_calls = []
    for g in graphs:
        counts: dict[str, int] = {}
        for n in g.graph.nodes:
            if n.op == "call_module":
                counts[n.target] = counts.get(n.target, 0) + 1
        parent_calls.append(counts)
    skipped: dict[str, str] = {}
    candidates: dict[str, tuple[int | None, fx.Node, list[fx.Node]]] = {}
    for node in merged.graph.nodes:
        if node.op != "call_module":
            continue
        why = _why_not(merged.get_submodule(node.target))
        if why == "":
            continue
        if why is None and calls[node.target] != 1:
            why = f"module called {calls[node.target]} times (shared weights)"
        if why is None and (len(node.args) != 1 or node.kwargs):
            why = "called with more than one input"
        origin = _origin(node, pairing, len(graphs))
        if why is None and origin is None:
            why = "no parent layer known for it"
        partners: list[fx.Node] = []
        if why is None:
            for k, name in origin.items():
                partner = nodes[k].get(name)
                if partner is None or partner.op != "call_module":
                    why = f"model {k}'s layer not found"
                elif parent_calls[k][partner.target] != 1:
                    why = (f"model {k}'s module '{partner.target}' is called "
                           f"{parent_calls[k][partner.target]} times")
                else:
                    partners.append(partner)
                    continue
                break
        if why is not None:
            skipped.setdefault(node.target, why)
            continue
        head = node.meta["fxzip_origin"][0]
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
    return plan, skipped


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


def _add(total: Any, part: Any) -> Any:
    """`part` if `total` is None, else their sum (elementwise for lists)."""
    if total is None:
        return part
    return [a + b for a, b in zip(total, part)] if isinstance(part, list) else total + part


# -- the pass -----------------------------------------------------------------------------------------
class _Pass:
    def __init__(self, merged: fx.GraphModule, graphs: Sequence[fx.GraphModule], analysis: Analysis,
                 matches: dict[int, Match], batches: list[Any], options: Corrections,
                 pairing: Any = None, group: Any = None):
        self.merged, self.graphs, self.analysis, self.matches = merged, graphs, analysis, matches
        self.options, self.group = options, group
        self.plan, skipped = _plan(merged, graphs, options, pairing)
        self.by_node = {layer.node: layer for layer in self.plan}
        self.by_fit = {layer.fit_node: layer for layer in self.plan}
        needed: dict[int, set[str]] = {k: set() for k in range(len(graphs))}
        for layer in self.plan:
            for k, name in layer.parent_nodes.items():
                needed[k].add(name)
        self.runner = _Runner(merged, batches)
        self.parents = [_Runner(g, batches, keep=needed[k], reset_bn=options.reset_bn, group=group)
                        for k, g in enumerate(graphs)]
        self.sample_keys = [sample_keys(b, options.seed) for b in batches]
        self.report = CorrectionReport(skipped=skipped)

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
            dim = self._dim(layer.head, layer.parent_nodes[layer.head])
            module = self.merged.get_submodule(layer.module)
            axis = dim - 1 if isinstance(module, nn.Linear) else 1 % dim
            layer.axis = axis
            layer.targets = list(values)
            if layer.repair:
                layer.target_stats = _channel_stats(values, axis, module.weight.shape[0], self.group)
            return
        feat = self.analysis.feat(layer.parent_nodes[0])
        if feat is None:
            raise KeyError(layer.parent_nodes[0])
        per_model = [p.take(layer.parent_nodes[k]) for k, p in enumerate(self.parents)]
        axis = feat.axis % self._dim(0, layer.parent_nodes[0])
        layer.axis = axis
        total, mean_t, std_t = None, None, None
        layouts = Layouts(self.analysis, self.matches, len(self.graphs))
        for k, values in enumerate(per_model):
            if layouts.is_dense(feat):  # a dense match ("cca"): Σ_k M_k f_k by matrix products
                mat = layouts.matrix(feat, k, "M")
                total = _add(total, [torch.movedim(torch.tensordot(
                    mat.to(v.device, v.dtype), v, dims=([1], [axis])), 0, axis) for v in values])
                if layer.repair:
                    mean, std = _channel_stats(values, axis, mat.shape[1], self.group)
                    mean_t = _add(mean_t, mat @ mean.cpu().double())
                    std_t = _add(std_t, mat.abs() @ std.cpu().double())
                counts = torch.ones(mat.shape[0], dtype=torch.long)  # M_k already averages
                continue
            index, counts, width = _merge_index(self.analysis, self.matches, feat, k, len(self.graphs))
            index = index.to(values[0].device) if values else index
            scattered = []
            for v in values:
                shape = list(v.shape)
                shape[axis] = width
                scattered.append(v.new_zeros(shape).index_add_(axis, index, v))
            total = scattered if total is None else [a + s for a, s in zip(total, scattered)]
            if layer.repair:
                mean, std = _channel_stats(values, axis, len(index), self.group)
                m = torch.zeros(width, dtype=torch.float64).index_add_(0, index.cpu(), mean.cpu())
                s = torch.zeros(width, dtype=torch.float64).index_add_(0, index.cpu(), std.cpu())
                mean_t = m if mean_t is None else mean_t + m
                std_t = s if std_t is None else std_t + s
        shape = [1] * self._dim(0, layer.parent_nodes[0])
        shape[axis] = -1
        layer.targets = [t / counts.to(t.device, t.dtype).reshape(shape) for t in total]
        if layer.repair:
            layer.target_stats = (mean_t / counts.double(), std_t / counts.double())

    # refit --------------------------------------------------------------------------------------
    def _refit(self, layer: _Layer) -> None:
        """Solve the layer (with its BN, if the fit point) by ridge regression toward its current
        effective weights, and write the change back in the layer's own parametrisation: the
        layer's weights change by the fitted change divided by the BN's scale, the intercept goes
        to the BN's bias (or the layer's bias); the BN keeps the statistics it was reset to here.
        A bias-free layer without a BN is fitted without intercept (no parameter is added), so the
        merged model keeps its parents' modules and can be merged again."""
        module = self.merged.get_submodule(layer.module)
        node = self.runner.next_node
        inputs = self.runner.env[node.args[0].name]
        z0 = [module(x) for x in inputs]
        weight = _weight_matrix(module).double()
        bias = module.bias.detach().double() if module.bias is not None \
            else weight.new_zeros(weight.shape[0])
        scale = None
        if layer.bn is not None:
            bn = self.merged.get_submodule(layer.bn)
            if self.options.reset_bn:
                _bn_reset(bn, z0, self.group)
            scale = bn.weight.detach().double() / (bn.running_var.double() + bn.eps).sqrt()
            shift = bn.bias.detach().double() - bn.running_mean.double() * scale
            y0 = [bn(z) for z in z0]
            weight, bias = weight * scale[:, None], bias * scale + shift  # the effective map
        else:
            y0 = z0
        d = weight.shape[1]
        gram = torch.zeros(d + 1, d + 1, dtype=torch.float64)
        cross = torch.zeros(d + 1, weight.shape[0], dtype=torch.float64)
        counts = torch.tensor([float(sum(y.numel() // weight.shape[0] for y in y0))],
                              dtype=torch.float64)
        _reduce([counts], self.group)  # the rows of every rank
        total_rows = counts.item()
        keep = 1.0 if self.options.max_rows is None \
            else min(1.0, self.options.max_rows / max(total_rows, 1.0))
        errors = torch.zeros(2, dtype=torch.float64)  # Σ (t - y)², Σ t²: the error before
        for x, y, t, keys in zip(inputs, y0, layer.targets, self.sample_keys):
            difference = t - y
            errors[0] += _squared_norm(difference)
            errors[1] += _squared_norm(t)
            if keep < 1.0:  # the kept rows only, gathered without copying the others
                rows = kept_rows(keys, y.numel() // weight.shape[0], keep).to(x.device)
                patches, residual = _patches(module, x, rows), _rows_at(module, difference, rows)
            else:
                patches, residual = _patches(module, x), _rows(module, difference)
            # [X 1]ᵀ[X 1] and [X 1]ᵀR by blocks (no copy of X with a column of ones appended),
            # float32 products added into the float64 sums in place
            gram[:d, :d].add_((patches.T @ patches).cpu())
            sums = patches.sum(0).double().cpu()
            gram[:d, d].add_(sums)
            gram[d, :d].add_(sums)
            gram[d, d] += patches.shape[0]
            cross[:d].add_((patches.T @ residual).cpu())
            cross[d].add_(residual.sum(0).double().cpu())
        _reduce([gram, cross, errors], self.group)  # the sums of every rank before the solve
        before_num, before_den = errors.tolist()
        if gram[d, d] == 0:
            return
        intercept = layer.bn is not None or module.bias is not None
        if not intercept:  # no parameter to hold one: fit through the origin
            gram, cross = gram[:d, :d], cross[:d]
        lam = self.options.ridge * gram.diagonal()[:d].mean().clamp_min(1e-12)
        penalty = torch.full((gram.shape[0],), float(lam), dtype=torch.float64)
        if intercept:
            penalty[d] = lam * 1e-6  # the intercept is (almost) free
        system = gram  # not needed after the solve: the penalty is added in place
        system.diagonal().add_(penalty)
        factor, info = torch.linalg.cholesky_ex(system)
        delta = torch.cholesky_solve(cross, factor) if int(info) == 0 \
            else torch.linalg.lstsq(system, cross).solution
        change = delta[:d].T  # of the effective map (rows of weight·scale for a BN fit point)
        device, dtype = module.weight.device, module.weight.dtype
        if scale is not None:
            usable = scale.abs() > 1e-6 * scale.abs().max().clamp_min(1e-30)
            rows = torch.where(usable[:, None], change / torch.where(usable, scale, 1.0)[:, None],
                               torch.zeros_like(change))
            new = _weight_matrix(module).double() + rows
            module.weight.data.copy_(new.reshape(module.weight.shape).to(device, dtype))
            bn.bias.data.add_(delta[d].to(bn.bias.device, bn.bias.dtype))
            layer.pending_bias = True  # the BN keeps the statistics of this fit
        else:
            new = _weight_matrix(module).double() + change
            module.weight.data.copy_(new.reshape(module.weight.shape).to(device, dtype))
            if intercept:
                module.bias.data.add_(delta[d].to(device, dtype))
        self.report.refitted.append(layer.module)
        layer.error_before = math.sqrt(before_num / max(before_den, 1e-30))

    # BatchNorm ----------------------------------------------------------------------------------
    def _before_bn(self, node: fx.Node) -> None:
        """Reset the BN's statistics on its (corrected) inputs, unless it is a refitted fit
        point (its statistics are part of the fitted map then)."""
        bn = self.merged.get_submodule(node.target)
        layer = self.by_fit.get(node.name)
        if layer is not None and layer.pending_bias is not None:
            layer.pending_bias = None
            return
        if not self.options.reset_bn or not bn.track_running_stats or bn.running_mean is None:
            return
        _bn_reset(bn, self.runner.env[node.args[0].name], self.group)

    # REPAIR and cleanup -------------------------------------------------------------------------
    def _finish(self, layer: _Layer) -> None:
        if layer.error_before is not None:
            sums = torch.zeros(2, dtype=torch.float64)
            for t, y in zip(layer.targets, self.runner.env[layer.fit_node]):
                sums[0] += _squared_norm(t - y)
                sums[1] += _squared_norm(t)
            _reduce([sums], self.group)
            num, den = sums.tolist()
            self.report.errors[layer.module] = (layer.error_before, math.sqrt(num / max(den, 1e-30)))
        if layer.repair and layer.target_stats is not None:
            self._repair(layer)
        layer.targets, layer.target_stats = None, None

    def _repair(self, layer: _Layer) -> None:
        """Rescale the fit point's features to the target mean/std; fold into the BN's affine
        parameters or the layer's rows and bias; update the computed values."""
        values = self.runner.env[layer.fit_node]
        axis = layer.axis
        mean, std = _channel_stats(values, axis, layer.target_stats[0].shape[0], self.group)
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
        self.runner.env[layer.fit_node] = [
            v * r.reshape([-1 if a == axis else 1 for a in range(v.dim())])
            + s.reshape([-1 if a == axis else 1 for a in range(v.dim())]) for v in values]
        self.report.repaired.append(layer.bn or layer.module)


def correct(merged: fx.GraphModule, graphs: Sequence[fx.GraphModule], analysis: Analysis,
            matches: dict[int, Match], inputs: Iterable[Any],
            options: Corrections | None = None, *, max_samples: int | None = None,
            pairing: Any = None, group: Any = None) -> CorrectionReport:
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
    batches = _within_budget(batches, samples_within(graphs, options.memory_gib), options.seed,
                             group)
    seen = sum(batch_size(x) for x in batches)
    if not batches and not is_distributed():
        raise InputError("correct() needs at least one calibration batch")
    was_training = merged.training
    merged.eval()
    report = _Pass(merged, graphs, analysis, matches, batches, options, pairing, group).run()
    merged.train(was_training)
    report.seconds = time.perf_counter() - start
    report.samples = seen
    report.offered = offered
    report.options = {k: getattr(options, k) for k in options.__dataclass_fields__}
    return report
