"""The public API: `merge`, `merge_all`, `analyze`, and the reusable `Zipper`."""
from __future__ import annotations

import math
import time
import warnings
import dataclasses
import functools
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any, Iterator

import torch.fx as fx
import torch.nn as nn

from .corrections import AutoSettings, Corrections, choose as choose_settings, correct, \
    reset_bn as reset_batch_norm, resolve_settings
from .runtime.costs import count_flops, count_parameters
from .errors import CalibrationWarning, InputError, StopPointError
from .runtime.inputs import Batches, shard_batches
from .matching import METHODS, Match, Method, covariance, get_method, match_heads
from .passes.analysis import Analysis
from .passes.rewrite import rewrite
from .passes.statistics import (SpaceStats, check_positions, check_taps, collect,
                                resolve_precision)
from .graph.prepare import check_models, device_of, is_merged, pair_models, prepare_graphs
from .report import MergeReport, SpaceReport
from .matching import feature_signatures, mix, weight_similarity as signature_similarity
from .matching import Width, check_width, merged_size, space_widths

__all__ = ["Zipper", "merge", "merge_all", "analyze", "MergeReport", "SpaceReport", "Corrections",
           "CORRECTION_NAMES"]

DEFAULT_ALPHA = 0.5
DEFAULT_BETA = 1.0
# a tie-breaker by default: features that look exactly alike on the calibration data (scarce
# data) are told apart by their weights; small enough not to move real matchings much
DEFAULT_WEIGHT_SIMILARITY = 0.01
CORRECTION_NAMES = ("default", "none")


def resolve_corrections(corrections: Any, reset_bn: bool = True) -> Corrections | None:
    """The Corrections a `corrections=` value means: "default" → `Corrections()`, None or "none" →
    None (plain ZipIt!), a Corrections as is; InputError otherwise. `reset_bn=False` turns the
    corrections' BatchNorm reset off too (their targets are then the parents as given)."""
    if corrections is None or (isinstance(corrections, str) and corrections == "none"):
        return None
    if isinstance(corrections, str) and corrections == "default":
        options = Corrections()
    elif isinstance(corrections, Corrections):
        options = corrections
    elif isinstance(corrections, dict):  # a recipe's mapping of Corrections' fields
        unknown = sorted(set(corrections) - set(Corrections.__dataclass_fields__))
        if unknown:
            raise InputError(f"corrections: unknown field(s) {', '.join(map(repr, unknown))}; "
                             f"allowed: {', '.join(Corrections.__dataclass_fields__)}")
        options = Corrections(**corrections)
    else:
        raise InputError(f"corrections={corrections!r} is not allowed: pass \"default\" (the "
                         "label-free refit after the rewrite), None or \"none\" (plain ZipIt!), "
                         "or an fxzip.Corrections(...)")
    if not isinstance(reset_bn, bool):
        raise InputError(f"reset_bn must be True or False, got {reset_bn!r}")
    if not reset_bn and options.reset_bn:
        options = dataclasses.replace(options, reset_bn=False)
    return options


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_options(method: Any, alpha: Any, beta: Any, weight_similarity: Any = 0.0,
                  reset_bn: Any = True, shared_output: Any = False) -> tuple[float, float, float]:
    """Check the merge options; InputError naming the allowed values. (alpha, beta, w) back."""
    if not isinstance(method, str) or method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    alpha = _number(alpha, "alpha")
    if not 0 < alpha <= 1:
        raise InputError(f"alpha must be in (0, 1] (the weight of a merged cluster's similarity "
                         f"to the others), got {alpha}")
    beta = _number(beta, "beta")
    if not 0 <= beta <= 1:
        raise InputError(f"beta must be in [0, 1] (the share of merges allowed within one model), "
                         f"got {beta}")
    weight = _number(weight_similarity, "weight_similarity")
    if not 0 <= weight <= 1:
        raise InputError(f"weight_similarity must be in [0, 1] (the share of the weights' "
                         f"similarity in the matching's similarity), got {weight}")
    for name, value in (("reset_bn", reset_bn), ("shared_output", shared_output)):
        if not isinstance(value, bool):
            raise InputError(f"{name} must be True or False, got {value!r}")
    return alpha, beta, weight


def check_method_width(method: str, width: Any, num_models: int) -> Width:
    """A checked `width=` (`fxzip.matching.width.check_width`); a width above 1 needs a method that can
    keep the least alike features apart (`Method.widens`): InputError for "average" and "cca"."""
    width = check_width(width, num_models)
    widest = max(width.values()) if isinstance(width, dict) else width
    if widest > 1 and not METHODS[method].widens:
        raise InputError(f"width={widest} > 1 keeps the least alike features apart, which method "
                         f"{method!r} does not do; use width=1 or a method among "
                         f"{', '.join(m for m in METHODS if METHODS[m].widens)}")
    return width


class Zipper:
    """A prepared merge of N models of one architecture: traced graphs, the analysis and (lazily)
    the feature statistics. `merge()` can then be called for many stop points and methods without
    tracing or collecting statistics again."""

    def __init__(self, models: Sequence[nn.Module], inputs: Any, *, progress: bool = True,
                 leaf_modules: Sequence[type] = (), concrete_args: dict | None = None,
                 statistics_precision: str = "auto", group: Any = None, taps: str = "all",
                 positions: float = 1.0):
        models = list(models)
        self.taps = check_taps(taps)
        self.positions = check_positions(positions)
        device = check_models(models)
        self.progress = progress
        self.seconds: dict[str, float] = {}
        self.group = group
        self.batches = shard_batches(inputs, device, group)
        self.statistics_precision = resolve_precision(statistics_precision,
                                                      self.batches.example_device)
        with self._timed("trace"):
            self.graphs = prepare_graphs(models, self.batches.example, leaf_modules=leaf_modules,
                                         concrete_args=concrete_args)
            self.pairing = pair_models(self.graphs)
        # a merged model first: the new models are zipped into its trunk, its heads kept
        self.extends = is_merged(models[0])
        with self._timed("analysis"):
            self.analysis = Analysis(self.graphs[0])
        self._analyses: dict[int, Analysis] = {0: self.analysis}
        self._moments: dict[int, SpaceStats] = {}
        self._matches: dict[tuple, Match] = {}
        self._similarities: dict[int, Any] = {}

    @contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    @property
    def num_models(self) -> int:
        return len(self.graphs)

    def statistics(self, spaces: Sequence[int]) -> dict[int, SpaceStats]:
        """Feature statistics of the given spaces, collected once and cached."""
        missing = [s for s in spaces if s not in self._moments]
        if missing:
            with self._timed("statistics"):
                self._moments.update(collect(self.graphs, self.analysis, missing, self.batches,
                                             progress=self.progress,
                                             precision=self.statistics_precision,
                                             pairing=self.pairing, group=self.group,
                                             taps=self.taps, positions=self.positions))
            self._warn_if_too_few_samples(missing)
        return {s: self._moments[s] for s in spaces}

    def _warn_if_too_few_samples(self, spaces: Sequence[int]) -> None:
        """Correlations of D features from fewer than D samples are rank-deficient: features that
        differ may look perfectly alike, and the matching cannot tell them apart."""
        short = [(s, self._moments[s].features.count, self.num_models * self.analysis.spaces[s].size)
                 for s in spaces if self._moments[s].features.count < self.num_models
                 * self.analysis.spaces[s].size]
        if short:
            s, count, dim = min(short, key=lambda t: t[1] / t[2])
            where = ", ".join(self.analysis.spaces[s].producers[:2]) or f"space {s}"
            warnings.warn(
                f"{len(short)} feature spaces saw fewer calibration samples than they have "
                f"features, e.g. space {s} ({where}): {count} samples (positions × images) for "
                f"{dim} features of all models. Their correlations are rank-deficient, so "
                "features that merely look alike on these inputs may be merged; pass more "
                "calibration data (more images, or larger ones)", CalibrationWarning, stacklevel=3)

    def weight_similarity(self, space: int) -> Any:
        """The (D, D) similarity of the space's features by their weights (see
        `fxzip.matching.similarity`), None if no parameter runs along it; cached."""
        if space not in self._similarities:
            with self._timed("matching"):
                signatures = feature_signatures(self.graphs, self.analysis, self.pairing, space)
                self._similarities[space] = None if signatures is None \
                    else signature_similarity(signatures)
        return self._similarities[space]

    def match(self, space: int, method: str | Method, alpha: float, beta: float,
              weight_similarity: float = DEFAULT_WEIGHT_SIMILARITY, width: float = 1.0) -> Match:
        """The Match of a space, cached; the spaces of one head group are matched together (at
        one model's width). `weight_similarity` mixes the features' weight similarity into their
        correlation; `width` is the merged width as a multiple of one model's (`fxzip.matching.width`)."""
        method = get_method(method)
        group = next((g for g in self.analysis.head_groups if space in g.spaces), None)
        out_size = None if group is not None else \
            merged_size(self.analysis.spaces[space].size, width, self.num_models)
        key = (space, method.name, alpha, beta, weight_similarity, out_size)
        if key in self._matches:
            return self._matches[key]
        spaces = list(group.spaces) if group is not None else [space]
        stats = self.statistics(spaces) if method.needs_statistics else {}
        similarities = [self.weight_similarity(s) if stats and weight_similarity else None
                        for s in spaces]
        with self._timed("matching"):
            if stats and method.statistic == "covariance":  # "cca": E[x xᵀ], no weight similarity
                corrs = [covariance(stats[s].correlation(), stats[s].features.variance(),
                                    stats[s].features.mean.cpu().numpy()) for s in spaces]
            else:
                corrs = [mix(stats[s].correlation(), w, weight_similarity) if stats else None
                         for s, w in zip(spaces, similarities)]
            sizes = [self.analysis.spaces[s].size for s in spaces]
            if group is not None:
                found = match_heads(corrs, sizes, group.heads, self.num_models, method,
                                    alpha=alpha, beta=beta,
                                    fixed=[s in group.fixed for s in spaces],
                                    inner=group.inner_of(spaces))
            else:
                found = [method.match(corrs[0], [sizes[0]] * self.num_models, alpha=alpha,
                                      beta=beta, out_size=out_size)]
        for s, m in zip(spaces, found):
            self._matches[(s, method.name, alpha, beta, weight_similarity, out_size)] = m
        return self._matches[key]

    def trunk(self, stop_at: str | int | None) -> set[str]:
        """The nodes (graph 0's names) zipped for a stop point, checked to be shared by every
        model (ArchitectureMismatchError naming the first difference and the last shared stop
        point otherwise). None: every layer but each model's own output layers."""
        if self.extends:
            trunk = self._within_merged_trunk(stop_at)
            label = f"stop_at={stop_at!r}"
        elif stop_at is None:
            trunk = self.analysis.trunk(None)
        else:
            trunk = self.analysis.trunk(stop_at)
        if stop_at is None:
            for k in range(1, self.num_models):
                if not self.pairing.is_identity(k):
                    trunk = self._without_heads_of(k, trunk)
            label = "stop_at=None (every layer but the output layers)"
        else:
            label = f"stop_at={stop_at!r}"
        trunk = self._without_unshared_values(trunk)
        self.pairing.check_trunk(trunk, self.analysis.stop_points, label)
        return trunk

    def _within_merged_trunk(self, stop_at: str | int | None) -> set[str]:
        """Extending a merged model: its trunk (None), or the part of it up to a stop point."""
        merged = set(self.graphs[0].fxzip_trunk)
        if stop_at is None:
            return merged
        named = self.analysis.resolve_stop(stop_at) if isinstance(stop_at, str) else None
        trunk = self.analysis.trunk(stop_at) if named is None or named in merged else {named}
        outside = [n.name for n in self.analysis.nodes if n.name in trunk - merged]
        if outside:
            raise StopPointError(
                f"stop_at={stop_at!r} reaches past the merged model's trunk (node "
                f"'{outside[0]}' belongs to its heads); a model added to a merge is zipped into "
                "that trunk or a part of it: leave stop_at=None or name an earlier stop point")
        return trunk

    def _without_unshared_values(self, trunk: set[str]) -> set[str]:
        """The trunk less the nodes that not every model has, carry no features (shapes,
        parameters, values of the input alone) and that no trunk node reads: each model's head
        computes its own (e.g. the input size a segmentation model resizes its output to)."""
        shared = self.pairing.shared()
        trunk = set(trunk)
        for node in reversed(self.analysis.nodes):
            if (node.name in trunk and node.name not in shared and node.op != "placeholder"
                    and self.analysis.feat(node.name) is None
                    and not any(u.name in trunk for u in node.users)):
                trunk.discard(node.name)
        return trunk

    def _without_heads_of(self, k: int, trunk: set[str]) -> set[str]:
        """The trunk less the nodes paired with model k's output layers (or anything after them
        or a barrier in model k's graph), and everything after those."""
        if k not in self._analyses:
            with self._timed("analysis"):
                self._analyses[k] = Analysis(self.graphs[k])
        own = self._analyses[k].trunk(None)
        theirs = {a for a in trunk
                  if a in self.pairing.maps[k] and self.pairing.name(k, a) not in own}
        return trunk - self.analysis.descendants(theirs)

    def merge(self, stop_at: str | int | None = None, *, method: str = "zipit",
              alpha: float = DEFAULT_ALPHA, beta: float = DEFAULT_BETA,
              reset_bn: bool = True, shared_output: bool = False,
              corrections: str | Corrections | None = "default",
              weight_similarity: float = DEFAULT_WEIGHT_SIMILARITY,
              width: Width = 1.0, settings: str | AutoSettings = "default") -> fx.GraphModule:
        """The merged model for one stop point (see `fxzip.merge`)."""
        auto = resolve_settings(settings)
        if auto is not None:
            return self._merge_auto(stop_at, auto, method=method, alpha=alpha, beta=beta,
                                    reset_bn=reset_bn, shared_output=shared_output,
                                    corrections=corrections, weight_similarity=weight_similarity,
                                    width=width)
        alpha, beta, weight_similarity = check_options(method, alpha, beta, weight_similarity,
                                                       reset_bn, shared_output)
        width = check_method_width(method, width, self.num_models)
        options = resolve_corrections(corrections, reset_bn)
        chosen = METHODS[method]
        before = dict(self.seconds)
        if shared_output:
            if self.extends:
                raise InputError("a merged model with split heads cannot be extended into one "
                                 "shared output; leave shared_output=False")
            if stop_at is not None:
                raise StopPointError("shared_output=True zips the whole model into one output; "
                                     "leave stop_at=None")
            trunk = self.analysis.whole_trunk()
            self.pairing.check_trunk(trunk, self.analysis.stop_points, "shared_output=True")
            aligned = self.analysis.output_spaces()
        else:
            trunk, aligned = self.trunk(stop_at), set()
        spaces = [s for s in self.analysis.spaces_of(trunk) if s not in aligned]
        if chosen.needs_statistics:
            self.statistics(spaces)
        ratios = space_widths(self.analysis, spaces, width)
        matches = {s: self.match(s, chosen, alpha, beta, weight_similarity, ratios[s])
                   for s in spaces}
        matches.update({s: Match.identity(self.analysis.spaces[s].size, self.num_models)
                        for s in aligned})
        with self._timed("rewrite"):
            merged = rewrite(self.graphs, self.analysis, matches, trunk,
                             shared_output=shared_output, pairing=self.pairing,
                             spread=[self.extends] + [False] * (self.num_models - 1))
        correction_report = None
        if options is not None:  # the pass also re-estimates the BatchNorm statistics
            with self._timed("corrections"):
                correction_report = correct(merged, self.graphs, self.analysis, matches,
                                            self.batches, options, pairing=self.pairing,
                                            group=self.group)
        elif reset_bn:
            with self._timed("bn_reset"):
                reset_batch_norm(merged, self.batches, progress=self.progress, group=self.group)
        seconds = {k: v - before.get(k, 0.0) for k, v in self.seconds.items()}
        seconds = {k: v for k, v in seconds.items() if v > 0}
        merged.fxzip_report = MergeReport(
            method, stop_at, self.analysis.layers_in(trunk), len(self.analysis.all_layers),
            [self._space_report(s, matches[s]) for s in spaces], seconds,
            barriers=self._barriers(), costs=self._costs(merged), corrections=correction_report,
            settings={"alpha": alpha, "beta": beta, "weight_similarity": weight_similarity,
                      "width": dict(width) if isinstance(width, dict) else width,
                      "reset_bn": reset_bn, "corrections": None if options is None
                      else dataclasses.asdict(options)})
        return merged

    def _merge_auto(self, stop_at: str | int | None, auto: AutoSettings, *, alpha: Any, beta: Any,
                    corrections: Any, **options: Any) -> fx.GraphModule:
        """settings="auto": alpha, beta and corrections chosen by fidelity
        (`fxzip.corrections.auto_settings`); the report gets the choice and every trial's scores."""
        given = [n for n, v, d in (("alpha", alpha, DEFAULT_ALPHA), ("beta", beta, DEFAULT_BETA),
                                   ("corrections", corrections, "default")) if v != d]
        if given:
            raise InputError(f"settings=\"auto\" chooses alpha, beta and corrections itself; "
                             f"leave {', '.join(given)} at the default, or restrict the grid with "
                             "fxzip.corrections.auto_settings.AutoSettings(alphas=..., betas=..., "
                             "corrections=...)")
        check_options(options["method"], DEFAULT_ALPHA, DEFAULT_BETA,
                      options["weight_similarity"], options["reset_bn"], options["shared_output"])
        merged, choice = choose_settings(self, stop_at, auto, **options)
        report = merged.fxzip_report
        report.auto = choice
        report.settings["settings"] = "auto"
        report.seconds["auto"] = choice.seconds["total"]
        return merged

    def _space_report(self, space: int, match: Match) -> SpaceReport:
        """A merged space's report; the mean correlation where its statistics were collected."""
        corr = self._moments[space].correlation() if space in self._moments else None
        info = self.analysis.spaces[space]
        nodes = info.producers + info.per_channel
        order = min((self._node_order.get(n, 0) for n in nodes), default=0)
        return SpaceReport.of(space, info.size, match, corr, nodes=nodes, order=order)

    @functools.cached_property
    def _node_order(self) -> dict[str, int]:
        """Graph position of every node of the analysis (the report's graph order)."""
        return {n.name: i for i, n in enumerate(self.analysis.nodes)}

    @functools.cached_property
    def _ensemble_costs(self) -> dict[str, int]:
        """Parameters and FLOPs per sample of the ensemble of the inputs (the same for every merge)."""
        x = self.batches.example
        return {"ensemble_parameters": sum(count_parameters(g) for g in self.graphs),
                "ensemble_flops": sum(count_flops(g, x) for g in self.graphs)}

    def _barriers(self) -> list[dict[str, Any]]:
        order = self._node_order
        return [{"node": b.node, "op": b.op, "reason": b.reason, "order": order.get(b.node, 0)}
                for b in self.analysis.barriers]

    def _costs(self, merged: nn.Module) -> dict[str, int]:
        """Parameters and FLOPs per sample of the merged model and of the ensemble of the inputs."""
        return {"parameters": count_parameters(merged),
                "ensemble_parameters": self._ensemble_costs["ensemble_parameters"],
                "flops": count_flops(merged, self.batches.example),
                "ensemble_flops": self._ensemble_costs["ensemble_flops"]}


def merge(model_a: nn.Module, model_b: nn.Module, inputs: Any, *, stop_at: str | int | None = None,
          method: str = "zipit", alpha: float = DEFAULT_ALPHA, beta: float = DEFAULT_BETA,
          reset_bn: bool = True, shared_output: bool = False, progress: bool = True,
          leaf_modules: Sequence[type] = (), concrete_args: dict | None = None,
          statistics_precision: str = "auto", group: Any = None,
          taps: str = "all", positions: float = 1.0,
          corrections: str | Corrections | None = "default",
          weight_similarity: float = DEFAULT_WEIGHT_SIMILARITY,
          width: Width = 1.0, settings: str | AutoSettings = "default") -> fx.GraphModule:
    """Merge two models of one architecture into one GraphModule returning `(out_a, out_b)`.

    inputs: calibration data: a tensor batch, a list of batches, or an iterable/DataLoader of
        `x` or `(x, y, ...)`.
    stop_at: a node or module name (or a module prefix such as "layer3"): everything it depends
        on is zipped, the rest becomes one head per model. An int n zips the first n weight
        layers (ZipIt! n/m). None zips every layer but the ones producing the outputs, so each
        model keeps its own output layer.
    method: "zipit" (greedy, within and across models; `alpha` in (0, 1], `beta` in [0, 1]: the
        share of merges allowed within a model), "permute" (Hungarian
        across models: Git Re-Basin activation matching), "average" (plain weight averaging) or
        "cca" (CCA Merge, Horoi et al. 2024: model B aligned to A by an invertible linear map
        from regularised CCA of their features, then averaged; see `fxzip.matching.registry.CCA`).
    reset_bn: re-estimate the BatchNorm statistics of the merged model on `inputs` (with the
        corrections on, their pass does it, and their targets are the parents with BatchNorm
        statistics of `inputs`; False: no reset anywhere, targets the parents as given).
    corrections: "default" (the default): after the rewrite, a label-free least-squares refit
        of every zipped layer and of each head's first and last layers toward the parents
        (`fxzip.Corrections()`, see `fxzip.corrections.refit`: one more pass over `inputs`, which holds
        their activations at once, so it corrects on about as many samples as fit
        `Corrections.memory_gib`, 4 GiB by default, chosen from every batch by their own
        values). None or "none": plain ZipIt! as in the
        paper (`method="zipit", alpha=0.5, beta=1.0, corrections=None, weight_similarity=0`).
        A `Corrections(...)` chooses refit/REPAIR by hand.
    weight_similarity: in [0, 1], the share of the features' weight similarity mixed into their
        activation correlation for the matching (`fxzip.matching.similarity`; default 0.01: breaks the
        ties of features that look exactly alike on scarce calibration data).
    width: the merged width as a multiple of one model's width, in [1, number of models]: 1 (the
        default) merges into one model's width, 2 (two models) keeps every feature apart (the
        ensemble's function and cost); in between, the features the models agree on least are
        kept apart. A dict gives a width per stop region, e.g. `{"layer1": 1.0, "*": 1.5}`
        (`fxzip.matching.width`); "zipit" and "permute" take widths above 1.
    settings: "default" (alpha, beta and corrections as given) or "auto": zipit's alpha and beta
        and corrections on/off chosen for the stop point, without labels, by the merge's
        fidelity to its parents (the relative error of the heads' outputs to the parents') on the
        last eighth of `inputs`, over a small grid (`fxzip.corrections.auto_settings`: 3 alphas × 2 betas ×
        corrections on/off, so about 12 merges' cost; statistics collected once); an
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
        does; cheaper where streams are wide and read often, see the README's Speed) or
        "spread" (every read as "all", each at a share of its positions chosen per sample, about
        1/k for a stream read k times: an unbiased estimate of "all" at about one read's cost).
    positions: in (0, 1], the share of each read tensor's positions (pixels, tokens) that enters
        the statistics: every round(1/positions)-th per sample, at least one, chosen per sample
        from its own values (independent of batching and sharding). 1 (the default) reads all;
        0.25 makes the feature correlations about 4× cheaper where positions are many (ViT
        tokens, early conv layers): see the README's Speed for what it costs in accuracy.
    The input models are never modified. The report is in `merged.fxzip_report`.
    """
    return merge_all([model_a, model_b], inputs, stop_at=stop_at, method=method, alpha=alpha,
                     beta=beta, reset_bn=reset_bn, shared_output=shared_output, progress=progress,
                     leaf_modules=leaf_modules, concrete_args=concrete_args,
                     statistics_precision=statistics_precision, group=group, taps=taps,
                     positions=positions, corrections=corrections,
                     weight_similarity=weight_similarity, width=width, settings=settings)


def merge_all(models: Sequence[nn.Module], inputs: Any, *, stop_at: str | int | None = None,
              method: str = "zipit", alpha: float = DEFAULT_ALPHA, beta: float = DEFAULT_BETA,
              reset_bn: bool = True, shared_output: bool = False, progress: bool = True,
              leaf_modules: Sequence[type] = (), concrete_args: dict | None = None,
              statistics_precision: str = "auto", group: Any = None,
              taps: str = "all", positions: float = 1.0,
              corrections: str | Corrections | None = "default",
              weight_similarity: float = DEFAULT_WEIGHT_SIMILARITY,
              width: Width = 1.0, settings: str | AutoSettings = "default") -> fx.GraphModule:
    """Merge N ≥ 2 models (see `merge`); the merged model returns one output per model."""
    check_options(method, alpha, beta, weight_similarity, reset_bn, shared_output)
    check_method_width(method, width, len(models) if isinstance(models, Sequence) else 2)
    resolve_corrections(corrections, reset_bn)
    resolve_settings(settings)
    zipper = Zipper(models, inputs, progress=progress, leaf_modules=leaf_modules,
                    concrete_args=concrete_args, statistics_precision=statistics_precision,
                    group=group, taps=taps, positions=positions)
    merged = zipper.merge(stop_at, method=method, alpha=alpha, beta=beta, reset_bn=reset_bn,
                          shared_output=shared_output, corrections=corrections,
                          weight_similarity=weight_similarity, width=width, settings=settings)
    merged.fxzip_report.seconds = {**{k: zipper.seconds[k] for k in ("trace", "analysis")},
                                   **merged.fxzip_report.seconds}
    return merged


def analyze(model: nn.Module, example_inputs: Any, *, leaf_modules: Sequence[type] = (),
            concrete_args: dict | None = None) -> Analysis:
    """The feature spaces, barriers and valid stop points of a model (printable)."""
    batches = Batches(example_inputs, device_of(model) if isinstance(model, nn.Module) else None)
    (gm,) = prepare_graphs([model], batches.example, leaf_modules=leaf_modules,
                           concrete_args=concrete_args)
    return Analysis(gm)
