"""The public API: `merge`, `merge_all` and `analyze`. Each checks its options into one
`MergeOptions` and hands the work to the staged driver, `fxzip.zipper.Zipper`."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.fx as fx
import torch.nn as nn

from .corrections import AutoSettings, Corrections
from .graph.prepare import device_of, prepare_graphs
from .matching import Width
from .options import MergeOptions
from .passes.analysis import Analysis
from .runtime.inputs import Batches
from .runtime.synthetic_inputs import Synthesis
from .zipper import Zipper

__all__ = ["merge", "merge_all", "analyze", "Zipper", "MergeOptions"]

_DEFAULT = MergeOptions()


def merge(model_a: nn.Module, model_b: nn.Module, inputs: Any, *, stop_at: str | int | None = None,
          method: str | None = None, alpha: float = _DEFAULT.alpha, beta: float = _DEFAULT.beta,
          reset_bn: bool = True, shared_output: bool = False, progress: bool = True,
          leaf_modules: Sequence[type] = (), concrete_args: dict | None = None,
          statistics_precision: str = "auto", group: Any = None,
          taps: str = "all", positions: float = 1.0,
          corrections: str | Corrections | None = "default",
          weight_similarity: float = _DEFAULT.weight_similarity,
          width: Width = 1.0, settings: str | AutoSettings = "default",
          capture: str = "auto",
          memory_gib: float | str | None = "auto",
          example_inputs: Any = None,
          synthesis: str | Synthesis | dict = "default") -> fx.GraphModule:
    """Merge two models of one architecture into one GraphModule returning `(out_a, out_b)`.

    inputs: calibration data: a tensor batch, a list of batches, or an iterable/DataLoader of
        `x` or `(x, y, ...)`. None: a data-free merge, which reads no real sample:
        `example_inputs` (one batch) gives only the input shapes and dtypes; the method defaults
        to "weights" (no activations needed), and where the merge needs activations (the
        BatchNorm reset, the corrections, an activation matching) it reads inputs synthesised
        from the models themselves: noise optimised so that each model's BatchNorms see their
        own running statistics (`synthesis`, see `fxzip.Synthesis` and docs/data-free.md).
    stop_at: a node or module name (or a module prefix such as "layer3"): everything it depends
        on is zipped, the rest becomes one head per model. An int n zips the first n weight
        layers (ZipIt! n/m). None zips every layer but the ones producing the outputs, so each
        model keeps its own output layer.
    method: None (the default): "zipit" with calibration inputs, "weights" without.
        "zipit" (greedy, within and across models; `alpha` in (0, 1], `beta` in [0, 1]: the
        share of merges allowed within a model), "permute" (Hungarian
        across models: Git Re-Basin activation matching), "average" (plain weight averaging) or
        "cca" (CCA Merge, Horoi et al. 2024: model B aligned to A by an invertible linear map
        from regularised CCA of their features, then averaged; see `fxzip.matching.cca`) or
        "weights" (Git Re-Basin weight matching: B's features permuted to maximise the inner
        products of the two models' weights, all spaces jointly by coordinate descent; reads no
        data, one model's width only; N > 2 models are each matched to model 0; see
        `fxzip.matching.weights`).
    reset_bn: re-estimate the BatchNorm statistics of the merged model on `inputs` (with the
        corrections on, their pass does it, and their targets are the parents with BatchNorm
        statistics of `inputs`; False: no reset anywhere, targets the parents as given).
    corrections: "default" (the default): after the rewrite, a label-free least-squares refit
        of every zipped layer and of each head's first and last layers toward the parents
        (`fxzip.Corrections()`, see `fxzip.corrections`: one more pass over `inputs`, which holds
        their activations at once, so it corrects on about as many samples as fit
        `Corrections.memory_gib`, 4 GiB by default, chosen from every batch by their own
        values). None or "none": plain ZipIt! as in the
        paper (`method="zipit", alpha=0.5, beta=1.0, corrections=None, weight_similarity=0`).
        A `Corrections(...)` chooses refit/REPAIR by hand.
    weight_similarity: in [0, 1], the share of the features' weight similarity mixed into their
        activation correlation for the matching (`fxzip.matching.similarity`; default 0.01:
        breaks the ties of features that look exactly alike on scarce calibration data).
    width: the merged width as a multiple of one model's width, in [1, number of models]: 1 (the
        default) merges into one model's width, 2 (two models) keeps every feature apart (the
        ensemble's function and cost); in between, the features the models agree on least are
        kept apart. A dict gives a width per stop region, e.g. `{"layer1": 1.0, "*": 1.5}`
        (`fxzip.matching.width`); "zipit" and "permute" take widths above 1.
    settings: "default" (alpha, beta and corrections as given) or "auto": zipit's alpha and beta
        and corrections on/off chosen for the stop point, without labels, by the merge's
        fidelity to its parents (the relative error of the heads' outputs to the parents') on the
        last eighth of `inputs`, over a small grid (`fxzip.corrections.auto_settings`: 3 alphas
        × 2 betas × corrections on/off, so about 12 merges' cost; statistics collected once); an
        `AutoSettings(...)` sets the grid, the measure and held-out inputs of their own.
        The choice and every grid point's scores are in `merged.fxzip_report.auto`.
    shared_output: for models trained into one aligned output space (e.g. fixed class
        embeddings, CLIP-style): zip every layer, average the output layers without permuting
        them, and return ONE output.
    statistics_precision: the feature correlations' matrix products: "float32", "bfloat16"
        (CPU: inputs rounded to bfloat16, float32 accumulation; correlations within ~1e-5) or
        "auto" (bfloat16 where the CPU runs it natively, about twice as fast; else float32).
    group: under torch.distributed (`init_process_group` called, e.g. by torchrun) `inputs` are
        this rank's shard (it may be empty if another rank's is not): the statistics and the
        BatchNorm reset are all-reduced over `group` (None: the default group), and every rank
        returns the same merged model as a one-process merge over the union of the shards.
        Every rank of the group must make the same call.
    taps: where a feature space is read for its statistics: "all" (every tensor its consumers
        read: a residual stream at every block's input), "last" (only the read latest in the
        graph: a residual stream once, at the end of its segment, as the ZipIt! paper's code
        does; cheaper where streams are wide and read often, see docs/scale-out.md) or
        "spread" (every read as "all", each at a share of its positions chosen per sample, about
        1/k for a stream read k times: an unbiased estimate of "all" at about one read's cost).
    positions: in (0, 1], the share of each read tensor's positions (pixels, tokens) that enters
        the statistics: every round(1/positions)-th per sample, at least one, chosen per sample
        from its own values (independent of batching and sharding). 1 (the default) reads all;
        0.25 makes the feature correlations about 4× cheaper where positions are many (ViT
        tokens, early conv layers): see docs/scale-out.md for what it costs in accuracy.
    memory_gib: what the merge may hold beside the models and the merged model, in GiB:
        activations, the feature statistics and the matching's matrices ("auto", the default:
        80% of the memory free on the models' device less one model; None: no bound). Where the
        spaces' statistics do not fit at once, they are collected in several passes over
        `inputs`, each followed by its spaces' matching (the result is the same); a number also
        bounds the corrections' samples ("auto" does not: the result never depends on the free
        memory). `merged.fxzip_report.memory` gives each phase's peak and the
        number of passes. A space is matched whole: one that needs more than the budget on its
        own is a `fxzip.MemoryWarning` (with the budget that holds it), counted in the report.
        Under torch.distributed each rank holds and matches a share of the spaces (its memory
        falls with the number of ranks).
    Every option is checked into one `fxzip.MergeOptions` before any work (an InputError names
    the option and its allowed values). The input models are never modified. The report is in
    `merged.fxzip_report`.
    """
    return merge_all([model_a, model_b], inputs, stop_at=stop_at, method=method, alpha=alpha,
                     beta=beta, reset_bn=reset_bn, shared_output=shared_output, progress=progress,
                     leaf_modules=leaf_modules, concrete_args=concrete_args,
                     statistics_precision=statistics_precision, group=group, taps=taps,
                     positions=positions, corrections=corrections,
                     weight_similarity=weight_similarity, width=width, settings=settings,
                     capture=capture, memory_gib=memory_gib, example_inputs=example_inputs,
                     synthesis=synthesis)


def merge_all(models: Sequence[nn.Module], inputs: Any, *, stop_at: str | int | None = None,
              method: str | None = None, alpha: float = _DEFAULT.alpha, beta: float = _DEFAULT.beta,
              reset_bn: bool = True, shared_output: bool = False, progress: bool = True,
              leaf_modules: Sequence[type] = (), concrete_args: dict | None = None,
              statistics_precision: str = "auto", group: Any = None,
              taps: str = "all", positions: float = 1.0,
              corrections: str | Corrections | None = "default",
              weight_similarity: float = _DEFAULT.weight_similarity,
              width: Width = 1.0, settings: str | AutoSettings = "default",
              capture: str = "auto",
              memory_gib: float | str | None = "auto",
              example_inputs: Any = None,
              synthesis: str | Synthesis | dict = "default") -> fx.GraphModule:
    """Merge N ≥ 2 models (see `merge`); the merged model returns one output per model."""
    options = MergeOptions(stop_at=stop_at, method=method, alpha=alpha, beta=beta,
                           reset_bn=reset_bn, shared_output=shared_output, progress=progress,
                           leaf_modules=leaf_modules, concrete_args=concrete_args,
                           statistics_precision=statistics_precision, group=group, taps=taps,
                           positions=positions, corrections=corrections,
                           weight_similarity=weight_similarity, width=width, settings=settings,
                           capture=capture, memory_gib=memory_gib, synthesis=synthesis)
    options.checked_width(len(models) if isinstance(models, Sequence) else 2)
    zipper = Zipper(models, inputs, options, example_inputs=example_inputs)
    merged = zipper.merge()
    merged.fxzip_report.seconds = {**{k: zipper.seconds[k] for k in ("trace", "analysis")},
                                   **merged.fxzip_report.seconds}
    return merged


def analyze(model: nn.Module, example_inputs: Any, *, leaf_modules: Sequence[type] = (),
            concrete_args: dict | None = None, capture: str = "auto") -> Analysis:
    """The feature spaces, barriers and valid stop points of a model (printable); `capture` as
    `merge` takes it."""
    batches = Batches(example_inputs, device_of(model) if isinstance(model, nn.Module) else None)
    (gm,) = prepare_graphs([model], batches.example, leaf_modules=leaf_modules,
                           concrete_args=concrete_args, capture=capture)
    return Analysis(gm)
