"""Builds a merge's `MergeReport` from what the stages left behind: the analysis (spaces,
barriers, graph order), the statistics (how alike the merged features were), the matches, the
timings and the costs of the merged model against the ensemble of its inputs."""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import torch.fx as fx
import torch.nn as nn

from .corrections import CorrectionReport
from .matching import Match
from .options import MergeOptions
from .passes.analysis import Analysis
from .report import MergeReport, SpaceReport
from .runtime.costs import count_flops, count_parameters
from .runtime.inputs import Batch

__all__ = ["ReportBuilder"]


class ReportBuilder:
    """The report of every merge of one `Zipper`: what is the same for all of them (graph order,
    the ensemble's costs) is computed once."""

    def __init__(self, analysis: Analysis, graphs: Sequence[fx.GraphModule], example: Batch):
        self.analysis, self.graphs, self.example = analysis, list(graphs), example

    def build(self, merged: nn.Module, options: MergeOptions, width: Any, trunk: set[str],
              spaces: Sequence[int], matches: dict[int, Match],
              correlations: dict[int, float | None], seconds: dict[str, float],
              corrections: CorrectionReport | None) -> MergeReport:
        """The report of one merge (`options` as it ran; `width` checked; `correlations`: each
        space's mean correlation of the features merged across models, None where unknown)."""
        given = options.correction_options
        return MergeReport(
            options.method, options.stop_at, self.analysis.layers_in(trunk),
            len(self.analysis.all_layers),
            [self.space_report(s, matches[s], correlations.get(s)) for s in spaces], seconds,
            barriers=self.barriers(), costs=self.costs(merged), corrections=corrections,
            settings={"alpha": options.alpha, "beta": options.beta,
                      "weight_similarity": options.weight_similarity,
                      "width": dict(width) if isinstance(width, dict) else width,
                      "reset_bn": options.reset_bn,
                      "capture": getattr(self.graphs[0], "fxzip_capture", "fx"),
                      "corrections": None if given is None else dataclasses.asdict(given)})

    def space_report(self, space: int, match: Match,
                     mean_correlation: float | None = None) -> SpaceReport:
        """A merged space's report, with the mean correlation of its features merged across
        models where its statistics were collected."""
        info = self.analysis.spaces[space]
        nodes = info.producers + info.per_channel
        order = min((self.node_order.get(n, 0) for n in nodes), default=0)
        return SpaceReport.of(space, info.size, match, nodes=nodes, order=order,
                              mean_correlation=mean_correlation)

    @functools.cached_property
    def node_order(self) -> dict[str, int]:
        """Graph position of every node of the analysis (the report's graph order)."""
        return {n.name: i for i, n in enumerate(self.analysis.nodes)}

    def barriers(self) -> list[dict[str, Any]]:
        return [{"node": b.node, "op": b.op, "reason": b.reason,
                 "order": self.node_order.get(b.node, 0)} for b in self.analysis.barriers]

    @functools.cached_property
    def ensemble_costs(self) -> dict[str, int]:
        """Parameters and FLOPs per sample of the ensemble of the inputs (the same for every merge)."""
        return {"ensemble_parameters": sum(count_parameters(g) for g in self.graphs),
                "ensemble_flops": sum(count_flops(g, self.example) for g in self.graphs)}

    def costs(self, merged: nn.Module) -> dict[str, int]:
        """Parameters and FLOPs per sample of the merged model and of the ensemble of the inputs."""
        return {"parameters": count_parameters(merged),
                "ensemble_parameters": self.ensemble_costs["ensemble_parameters"],
                "flops": count_flops(merged, self.example),
                "ensemble_flops": self.ensemble_costs["ensemble_flops"]}
