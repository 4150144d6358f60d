"""The staged driver: `Zipper` runs the pipeline's stages in order — capture, analysis,
statistics, matching, rewrite, corrections — and keeps what is shared between merges (graphs,
analysis, statistics, matches), so many stop points and methods cost one trace and one read of
the calibration data."""
from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any, Iterator

import torch.fx as fx
import torch.nn as nn
from tqdm.auto import tqdm

from .corrections import AutoSettings, choose as choose_settings, correct, reset_bn
from .errors import CalibrationWarning, InputError, MemoryWarning, StopPointError
from .graph.pairing import pair_graphs
from .graph.prepare import check_models, is_merged, prepare_graphs
from .matching import (Match, Method, covariance, feature_signatures, get_method, match_heads,
                       merged_size, mix, space_widths, weight_similarity as signature_similarity)
from .options import DEFAULTS, PREPARE_OPTIONS, MergeOptions
from .passes.analysis import Analysis
from .passes.rewrite import rewrite
from .passes.lockstep import Checkpoints, plan_cuts
from .passes.statistics import collect, first_tap
from .passes.statistics_plan import plan_passes, unit_bytes
from .report import mean_across_correlation
from .report_builder import ReportBuilder
from .runtime.distributed import all_gather_objects, rank, world_size
from .runtime.inputs import batch_size
from .runtime.memory import (GIB, PhasePeaks, activation_bytes_per_sample, model_bytes,
                             resolve_memory_gib)
from .runtime.moments import SpaceStats, resolve_precision
from .runtime.synthetic_inputs import SyntheticBatches, calibration_batches

__all__ = ["Zipper"]

_OPTIONS = object()  # `Zipper.merge`'s stop point when none is given: the options' own
# the share of a memory budget that holds the models' values saved between statistics passes,
# so that a pass resumes where an earlier one left the models instead of at their inputs
CHECKPOINT_SHARE = 0.1


def _size(count: float) -> str:
    """Bytes as GiB, or as MiB below a tenth of a GiB."""
    return f"{count / GIB:.2f} GiB" if count >= 0.1 * GIB else f"{count / 2 ** 20:.1f} MiB"


def _round_up(value: float, digits: int = 3) -> float:
    """`value` rounded up to `digits` significant digits."""
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(value)))
    return math.ceil(value * scale) / scale


class Zipper:
    """A prepared merge of N models of one architecture: traced graphs, the analysis and (lazily)
    the feature statistics. `merge()` can then be called for many stop points and methods without
    tracing or collecting statistics again.

    Options (see `fxzip.merge`) come as keywords or a `MergeOptions`; those that shape the
    preparation (`PREPARE_OPTIONS`: taps, positions, statistics_precision, progress,
    leaf_modules, concrete_args, group) are fixed here, the others are the defaults of every
    `merge()` call, which may change them."""

    def __init__(self, models: Sequence[nn.Module], inputs: Any,
                 options: MergeOptions | None = None, *, example_inputs: Any = None,
                 **keywords: Any):
        self.options = (options or MergeOptions()).replace(**keywords)
        models = list(models)
        device = check_models(models)
        self.seconds: dict[str, float] = {}
        self._timing: set[str] = set()  # the phases being timed now (a nested one counts once)
        # inputs=None: a data-free merge, its batches synthesised (on first read) from the models
        self.batches = calibration_batches(models, inputs, example_inputs,
                                           self.options.synthesis_options, device, self.group,
                                           progress=self.options.progress)
        self.options = self.options.resolved(self.data_free)
        self.statistics_precision = resolve_precision(self.options.statistics_precision,
                                                      self.batches.example_device)
        with self._timed("trace"):
            self.graphs = prepare_graphs(models, self.batches.example,
                                         leaf_modules=self.options.leaf_modules,
                                         concrete_args=self.options.concrete_args,
                                         capture=self.options.capture)
            self.pairing = pair_graphs(self.graphs)
        self.options.checked_width(self.num_models)
        # a merged model first: the new models are zipped into its trunk, its heads kept
        self.extends = is_merged(models[0])
        with self._timed("analysis"):
            self.analysis = Analysis(self.graphs[0])
        self._analyses: dict[int, Analysis] = {0: self.analysis}
        self._moments: dict[int, SpaceStats] = {}
        self._matches: dict[tuple, Match] = {}
        self._mean_correlations: dict[tuple, float | None] = {}  # per match key, for the report
        self._similarities: dict[int, Any] = {}
        self._reporter = ReportBuilder(self.analysis, self.graphs, self.batches.example)

    @contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        """Adds the block's wall time to `seconds[phase]`; a block inside another of the same
        phase (a match inside the matching of a pass) is not counted twice."""
        if phase in self._timing:
            yield
            return
        start = time.perf_counter()
        self._timing.add(phase)
        try:
            yield
        finally:
            self._timing.discard(phase)
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    @property
    def num_models(self) -> int:
        return len(self.graphs)

    @property
    def group(self) -> Any:
        """The torch.distributed group the statistics are all-reduced over (None: one process or
        the default group)."""
        return self.options.group

    # -- statistics and matching ---------------------------------------------------------------

    def statistics(self, spaces: Sequence[int]) -> dict[int, SpaceStats]:
        """Feature statistics of the given spaces, collected once and cached."""
        missing = [s for s in spaces if s not in self._moments]
        if missing:
            with self._timed("statistics"):
                self._moments.update(collect(self.graphs, self.analysis, missing, self.batches,
                                             progress=self.options.progress,
                                             precision=self.statistics_precision,
                                             pairing=self.pairing, group=self.group,
                                             taps=self.options.taps,
                                             positions=self.options.positions))
            self._warn_if_too_few_samples(missing)
        return {s: self._moments[s] for s in spaces}

    def _short_of_samples(self, spaces: Sequence[int]) -> list[tuple[int, int, int]]:
        """(space, samples, features) of the spaces that saw fewer samples than features."""
        return [(s, self._moments[s].features.count, self.num_models * self.analysis.spaces[s].size)
                for s in spaces if self._moments[s].features.count < self.num_models
                * self.analysis.spaces[s].size]

    def _warn_if_too_few_samples(self, spaces: Sequence[int],
                                 short: list[tuple[int, int, int]] | None = None) -> None:
        """Correlations of D features from fewer than D samples are rank-deficient: features that
        differ may look perfectly alike, and the matching cannot tell them apart. (`short`: the
        spaces' `_short_of_samples`, where their statistics are gone.)"""
        short = self._short_of_samples(spaces) if short is None else short
        if short:
            s, count, dim = min(short, key=lambda t: t[1] / t[2])
            where = ", ".join(self.analysis.spaces[s].producers[:2]) or f"space {s}"
            warnings.warn(
                f"{len(short)} feature spaces saw fewer calibration samples than they have "
                f"features, e.g. space {s} ({where}): {count} samples (positions × images) for "
                f"{dim} features of all models. Their correlations are rank-deficient, so "
                "features that merely look alike on these inputs may be merged; pass more "
                "calibration data (more images, or larger ones)", CalibrationWarning, stacklevel=3)

    def weight_similarity(self, space: int, cache: bool = True) -> Any:
        """The (D, D) similarity of the space's features by their weights (see
        `fxzip.matching.similarity`), None if no parameter runs along it; cached unless `cache`
        is False (a merge under a memory budget uses it once)."""
        if space in self._similarities:
            return self._similarities[space]
        with self._timed("matching"):
            signatures = feature_signatures(self.graphs, self.analysis, self.pairing, space)
            found = None if signatures is None else signature_similarity(signatures)
        if cache:
            self._similarities[space] = found
        return found

    def match(self, space: int, method: str | Method, alpha: float, beta: float,
              weight_similarity: float = DEFAULTS["weight_similarity"],
              width: float = 1.0) -> Match:
        """The Match of a space, cached; the spaces of one head group are matched together (at
        one model's width). `weight_similarity` mixes the features' weight similarity into their
        correlation; `width` is the merged width as a multiple of one model's
        (`fxzip.matching.width`)."""
        method = get_method(method)
        group = self._head_group(space)
        out_size = None if group is not None else \
            merged_size(self.analysis.spaces[space].size, width, self.num_models)
        key = self._key(space, method.name, alpha, beta, weight_similarity, width)
        if key in self._matches:
            return self._matches[key]
        spaces = list(group.spaces) if group is not None else [space]
        stats = self.statistics(spaces) if method.needs_statistics else {}
        # statistics used once (a merge under a budget): the similarity is mixed over itself
        lean = bool(stats) and all(stats[s].lean for s in spaces)
        similarities = [self.weight_similarity(s, cache=not lean)
                        if stats and weight_similarity else None for s in spaces]
        with self._timed("matching"):
            if stats and method.statistic == "covariance":  # "cca": E[x xᵀ], no weight similarity
                corrs = [covariance(stats[s].correlation(), stats[s].features.variance(),
                                    stats[s].features.mean.cpu().numpy()) for s in spaces]
            else:
                corrs = [mix(stats[s].correlation(), w, weight_similarity, into_similarity=lean)
                         if stats else None for s, w in zip(spaces, similarities)]
                similarities = None
            sizes = [self.analysis.spaces[s].size for s in spaces]
            if group is not None:
                found = match_heads(corrs, sizes, group.heads, self.num_models, method,
                                    alpha=alpha, beta=beta,
                                    fixed=[s in group.fixed for s in spaces],
                                    inner=group.inner_of(spaces))
            else:
                # the mixed matrix is this call's own (the cached correlation is read-only,
                # so it is copied): made symmetric in place, no second D × D copy
                found = [method.match(corrs[0], [sizes[0]] * self.num_models, alpha=alpha,
                                      beta=beta, out_size=out_size, owned=True)]
        for s, m in zip(spaces, found):
            found_key = self._key(s, method.name, alpha, beta, weight_similarity, width)
            self._matches[found_key] = m
            self._mean_correlations[found_key] = \
                mean_across_correlation(m, stats[s].correlation()) if stats else None
        return self._matches[key]

    def _head_group(self, space: int) -> Any:
        """The head group a space belongs to (its spaces are matched together), or None."""
        return next((g for g in self.analysis.head_groups if space in g.spaces), None)

    def _key(self, space: int, method: str, alpha: float, beta: float, weight_similarity: float,
             width: float) -> tuple:
        """The cache key of a space's Match: the method and its settings, and the merged size
        (None in a head group, matched at one model's width)."""
        out_size = None if self._head_group(space) is not None else \
            merged_size(self.analysis.spaces[space].size, width, self.num_models)
        return (space, method, alpha, beta, weight_similarity, out_size)

    def _match_key(self, space: int, method: Method, options: MergeOptions,
                   width: float) -> tuple:
        """The cache key of a space's Match under `options` (see `match`)."""
        return self._key(space, method.name, options.alpha, options.beta,
                         options.weight_similarity, width)

    def _units(self, spaces: Sequence[int]) -> list[list[int]]:
        """The spaces grouped as they are matched (a head group's spaces together), in order."""
        units, seen = [], set()
        for s in spaces:
            if s in seen:
                continue
            group = self._head_group(s)
            unit = list(group.spaces) if group is not None else [s]
            seen.update(unit)
            units.append(unit)
        return units

    def _pass_activation_bytes(self) -> float:
        """The activations the statistics pass holds at once: every model's live tensors for
        the example batch's size, with room for the observer's columns (half as much again)."""
        per_sample = [activation_bytes_per_sample(g) for g in self.graphs]
        return 1.5 * sum(b or 0.0 for b in per_sample) * batch_size(self.batches.example)

    def _match_in_passes(self, spaces: Sequence[int], method: Method, options: MergeOptions,
                         ratios: dict[int, float], budget_gib: float | None,
                         peaks: PhasePeaks) -> dict[str, float]:
        """Match every space (cached matches are reused): spaces whose statistics are cached
        first, the others in statistics passes that fit `budget_gib` (`plan_passes`), each pass
        followed by its spaces' matching; under torch.distributed each rank collects and matches
        the spaces it owns and the matches are shared. The statistics are kept (for later
        merges) only where one pass holds them all in one process. A tenth of the budget
        (`CHECKPOINT_SHARE`) keeps the models' values where a later pass begins, so that it
        resumes there (`fxzip.passes.lockstep`), where every read of the batches gives the same
        ones (not a shuffling DataLoader). Returns the passes run, the batches resumed
        and the peak of the saved values, for the report."""
        keys = {s: self._match_key(s, method, options, ratios[s]) for s in spaces}
        todo = [s for s in spaces if keys[s] not in self._matches]

        def match(s: int) -> None:
            self.match(s, method, options.alpha, options.beta, options.weight_similarity,
                       ratios[s])

        units = self._units(todo)
        fresh = [u for u in units if not all(s in self._moments for s in u)]
        with self._timed("matching"), peaks.phase("matching"):
            for unit in self._bar([u for u in units if u not in fresh], "fxzip matching"):
                match(unit[0])
        ranks = world_size(self.group)
        room = None if budget_gib is None else budget_gib * GIB - self._pass_activation_bytes()
        dims = {s: self.num_models * self.analysis.spaces[s].size for u in fresh for s in u}
        saved = None if room is None else CHECKPOINT_SHARE * budget_gib * GIB
        room = None if room is None else room - saved
        passes = plan_passes(fresh, dims, None if room is None else max(room, 0.0), ranks)
        over = [] if room is None else self._warn_if_over_budget(fresh, dims, budget_gib, room)
        keep = ranks == 1 and len(passes) <= 1
        checkpoints = None if len(passes) <= 1 or not self.batches.same_each_read \
            else Checkpoints(plan_cuts(
            self.graphs, self.pairing,
            [first_tap(self.graphs, self.analysis, p.spaces, self.pairing, self.options.taps)
             for p in passes]), saved)
        me = rank(self.group)
        short: list[tuple[int, int, int]] = []
        for i, p in enumerate(passes):
            owners = p.owners if ranks > 1 else None
            label = f", pass {i + 1}/{len(passes)}" if len(passes) > 1 else ""
            with self._timed("statistics"), peaks.phase("statistics"):
                found = collect(
                    self.graphs, self.analysis, p.spaces, self.batches,
                    progress=self.options.progress, precision=self.statistics_precision,
                    pairing=self.pairing, group=self.group, taps=self.options.taps,
                    positions=self.options.positions, owners=owners,
                    checkpoints=checkpoints, description=f"fxzip statistics{label}")
            for stats in found.values():  # used once: correlations over the co-moments
                stats.lean = not keep
            self._moments.update(found)
            mine = p.spaces if owners is None else p.owned_by(me)
            short += self._short_of_samples(mine)
            before = set(self._matches)
            with self._timed("matching"), peaks.phase("matching"):
                for unit in self._bar(self._units(mine), f"fxzip matching{label}"):
                    match(unit[0])
            if owners is not None:
                self._share_matches(before)
            if not keep:
                for s in mine:
                    self._moments.pop(s, None)
                    self._similarities.pop(s, None)
        self._warn_if_too_few_samples([], short)
        return {"statistics_passes": len(passes), "spaces_over_budget": len(over),
                "resumed_batches": 0 if checkpoints is None else checkpoints.resumed,
                "checkpoint_gib": 0.0 if checkpoints is None else checkpoints.peak_bytes / GIB}

    def _bar(self, units: list[list[int]], description: str) -> Any:
        """`units`, iterated under a progress bar (one step a unit of spaces matched)."""
        return tqdm(units, desc=description, unit="space", leave=False,
                    disable=not (self.options.progress and units))

    def _warn_if_over_budget(self, units: Sequence[Sequence[int]], dims: dict[int, int],
                             budget_gib: float, room: float) -> list[Sequence[int]]:
        """Warn (`MemoryWarning`) where a unit of spaces alone is estimated to need more than
        the budget leaves for statistics and matching (`room` bytes: the budget less the pass's
        activations and the saved values): it still gets a pass of its own and is matched whole.
        Returns those units."""
        need = {tuple(u): sum(unit_bytes(u, dims)) for u in units}
        over = [u for u in units if need[tuple(u)] > max(room, 0.0)]
        if over:
            largest = max(over, key=lambda u: need[tuple(u)])
            s = largest[0]
            where = ", ".join(self.analysis.spaces[s].producers[:2]) or f"space {s}"
            extra = (need[tuple(largest)] - room) / GIB
            # the budget whose room (less the activations and the saved values' share) holds it
            keep = 1.0 - CHECKPOINT_SHARE
            advice = (f"give memory_gib={_round_up(budget_gib + extra / keep):g} or more"
                      if keep > 0 else "give a larger memory_gib")
            warnings.warn(
                f"{len(over)} feature space(s) need more memory to collect and match than the "
                f"memory budget of {_size(budget_gib * GIB)} leaves for them "
                f"({_size(max(room, 0.0))} beside the statistics pass's activations), e.g. "
                f"space {s} ({where}, {sum(dims[t] for t in largest)} features of all models): "
                f"estimated up to {_size(need[tuple(largest)])}. A space is matched whole, so "
                f"the merge will go over the budget by up to about {_size(extra * GIB)}; "
                f"{advice} if the device has that much free",
                MemoryWarning, stacklevel=4)
        return over

    def _share_matches(self, before: set[tuple]) -> None:
        """Give every rank the matches each rank made since `before` (with their mean
        correlations): every rank then builds the same merged model."""
        made = {k: (m, self._mean_correlations.get(k)) for k, m in self._matches.items()
                if k not in before}
        for found in all_gather_objects(made, self.group):
            for k, (m, mean) in found.items():
                self._matches[k], self._mean_correlations[k] = m, mean

    # -- the trunk -----------------------------------------------------------------------------

    def trunk(self, stop_at: str | int | None) -> set[str]:
        """The nodes (graph 0's names) zipped for a stop point, checked to be shared by every
        model (ArchitectureMismatchError naming the first difference and the last shared stop
        point otherwise). None: every layer but each model's own output layers."""
        if self.extends:
            trunk = self._within_merged_trunk(stop_at)
        else:
            trunk = self.analysis.trunk(stop_at)
        if stop_at is None:
            for k in range(1, self.num_models):
                if not self.pairing.is_identity(k):
                    trunk = self._without_heads_of(k, trunk)
            label = "stop_at=None (every layer but the output layers)"
        else:
            label = f"stop_at={stop_at!r}"
        trunk = self._without_head_only_parameters(self._without_unshared_values(trunk))
        self.pairing.check_trunk(trunk, self.analysis.stop_points, label)
        return trunk

    def _without_head_only_parameters(self, trunk: set[str]) -> set[str]:
        """The trunk less the values computed from parameters alone (no input reaches them) that
        only nodes outside the trunk read: a head's own weights, such as an output projection
        tied to the input embedding (`F.linear(h, embed.weight)`), which each head then keeps as
        its model's instead of reading the trunk's merged copy of it."""
        from_inputs: set[str] = set()
        for node in self.analysis.nodes:
            if node.op == "placeholder" or any(a.name in from_inputs
                                               for a in node.all_input_nodes):
                from_inputs.add(node.name)
        trunk = set(trunk)
        for node in reversed(self.analysis.nodes):
            if (node.name in trunk and node.name not in from_inputs and node.users
                    and not any(u.name in trunk for u in node.users)):
                trunk.discard(node.name)
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

    # -- a merge -------------------------------------------------------------------------------

    def merge(self, stop_at: str | int | None | object = _OPTIONS, **keywords: Any
              ) -> fx.GraphModule:
        """The merged model for one stop point (by default the options' own; see `fxzip.merge`
        for the options; those fixed by the preparation, `PREPARE_OPTIONS`, cannot change
        here)."""
        fixed = sorted(set(keywords) & set(PREPARE_OPTIONS))
        if fixed:
            raise InputError(f"{', '.join(fixed)} shape(s) the preparation of the Zipper; pass "
                             "them to Zipper(...), not to merge()")
        if stop_at is not _OPTIONS:
            keywords["stop_at"] = stop_at
        options = self.options.replace(**keywords).resolved(self.data_free)
        stop_at = options.stop_at
        auto = options.auto
        if auto is not None:
            return self._merge_auto(options, auto)
        width = options.checked_width(self.num_models)
        before = dict(self.seconds)
        if options.shared_output:
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
        method = get_method(options.method)
        budget = resolve_memory_gib(options.memory_gib, self.batches.example_device,
                                    max(model_bytes(g) for g in self.graphs))
        peaks = PhasePeaks(self.batches.example_device)
        ratios = space_widths(self.analysis, spaces, width)
        corrections = options.correction_options
        if self.data_free and options.corrections == "default":
            # data-free: the parents' own BatchNorm statistics are the targets' best knowledge
            corrections = dataclasses.replace(corrections, parents_as_given=True)
        if self.data_free and not self.batches.synthesized \
                and (method.needs_statistics or corrections is not None or options.reset_bn):
            with self._timed("synthesis"), peaks.phase("synthesis"):
                self.batches.synthesize()  # a data-free merge's inputs, made once
        passes = self._match_in_passes(spaces, method, options, ratios, budget, peaks) \
            if method.needs_statistics else {"statistics_passes": 0}
        keys = {s: self._match_key(s, method, options, ratios[s]) for s in spaces}
        if method.joint and any(keys[s] not in self._matches for s in spaces):
            with self._timed("matching"):  # "weights": every space at once, from the weights
                found = method.match_model(self.graphs, self.analysis, self.pairing)
            self._matches.update((self._match_key(s, method, options, 1.0), m)
                                 for s, m in found.items())
        matches = {s: self.match(s, method, options.alpha, options.beta,
                                 options.weight_similarity, ratios[s]) for s in spaces}
        matches.update({s: Match.identity(self.analysis.spaces[s].size, self.num_models)
                        for s in aligned})
        with self._timed("rewrite"), peaks.phase("rewrite"):
            merged = rewrite(self.graphs, self.analysis, matches, trunk,
                             shared_output=options.shared_output, pairing=self.pairing,
                             spread=[self.extends] + [False] * (self.num_models - 1))
        correction_report = None
        if corrections is not None:  # the pass also re-estimates the BatchNorm statistics
            given = options.memory_gib != "auto"  # "auto" (free memory) never moves a result
            if given and budget is not None and (corrections.memory_gib is None
                                                 or corrections.memory_gib > budget):
                corrections = dataclasses.replace(corrections, memory_gib=budget)
            with self._timed("corrections"), peaks.phase("corrections"):
                correction_report = correct(merged, self.graphs, self.analysis, matches,
                                            self.batches, corrections, pairing=self.pairing,
                                            group=self.group, progress=options.progress)
        elif options.reset_bn:
            with self._timed("bn_reset"), peaks.phase("bn_reset"):
                reset_bn(merged, self.batches, progress=options.progress, group=self.group)
        seconds = {k: v - before.get(k, 0.0) for k, v in self.seconds.items()}
        seconds = {k: v for k, v in seconds.items() if v > 0}
        correlations = {s: self._mean_correlations.get(keys[s]) for s in spaces}
        merged.fxzip_report = self._reporter.build(merged, options, width, trunk, spaces, matches,
                                                   correlations, seconds, correction_report)
        merged.fxzip_report.memory = {"budget_gib": budget, **passes,
                                      "peak_gib": dict(peaks.gib)}
        merged.fxzip_report.calibration = self.calibration()
        return merged

    @property
    def data_free(self) -> bool:
        """Whether this merge reads no calibration data (inputs=None): synthesised inputs."""
        return isinstance(self.batches, SyntheticBatches)

    def calibration(self) -> dict[str, Any]:
        """What the merges read: {"source": "given"}, or for a data-free merge the synthesis
        (`SyntheticBatches.report`: samples, batches, steps, how many models' BatchNorm statistics
        were matched, whether anything was synthesised)."""
        if self.data_free:
            return {**self.batches.report, "synthesized": self.batches.synthesized}
        return {"source": "given"}

    def _merge_auto(self, options: MergeOptions, auto: AutoSettings) -> fx.GraphModule:
        """settings="auto": alpha, beta and corrections chosen by fidelity
        (`fxzip.corrections.auto_settings`); the report gets the choice and every trial's
        scores."""
        given = [n for n in ("alpha", "beta", "corrections") if getattr(options, n) != DEFAULTS[n]]
        if given:
            raise InputError(f"settings=\"auto\" chooses alpha, beta and corrections itself; "
                             f"leave {', '.join(given)} at the default, or restrict the grid with "
                             "fxzip.AutoSettings(alphas=..., betas=..., corrections=...)")
        merged, choice = choose_settings(
            self, options.stop_at, auto, method=options.method, reset_bn=options.reset_bn,
            shared_output=options.shared_output, weight_similarity=options.weight_similarity,
            width=options.width, settings="default")
        report = merged.fxzip_report
        report.auto = choice
        report.settings["settings"] = "auto"
        report.seconds["auto"] = choice.seconds["total"]
        return merged
