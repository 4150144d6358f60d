"""What a merge did, as `merged.fxzip_report`: the stop point, the layers zipped, every merged
space (its nodes, widths, merges within and across models, how alike the merged features were),
the barriers, the timings, and parameters and FLOPs against the ensemble. Printable, JSON-ready
(`to_dict`, `to_json`, `from_dict`) and drawn by `plot(path)`."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .corrections import AutoChoice, CorrectionReport
from .matching import Match


def mean_across_correlation(match: Match, corr: np.ndarray) -> float | None:
    """The mean correlation of the features `match` merges across models (None: no such pair)."""
    rows, cols = match.across_pairs()
    return float(np.mean(corr[rows, cols])) if rows.size else None


@dataclass
class SpaceReport:
    """One merged space: its width before and after, and what its Match did."""

    space: int
    width: int
    merged_width: int
    within_model_merges: int
    mean_correlation: float | None
    nodes: list[str] = field(default_factory=list)  # the layers that write the space
    within_by_model: list[int] = field(default_factory=list)
    across_model_merges: int = 0  # merges that join features of different models
    order: int = 0  # position of its first node in the graph

    @classmethod
    def of(cls, space: int, width: int, match: Match, corr: np.ndarray | None = None, *,
           nodes: list[str] | None = None, order: int = 0,
           mean_correlation: float | None = None) -> "SpaceReport":
        """The report of a space matched by `match`; with the features' correlation matrix (or
        its `mean_across_correlation`, given as `mean_correlation`), the mean correlation of the
        features merged across models. Every merge removes one feature: N·width − merged_width
        merges, the ones within a model counted per model."""
        mean = mean_correlation if corr is None else mean_across_correlation(match, corr)
        by_model = [int((np.bincount(a, minlength=match.size) - 1).clip(min=0).sum())
                    for a in match.assign]
        across = len(match.assign) * width - match.size - sum(by_model)
        return cls(space, width, match.size, match.within_merges, mean, list(nodes or []),
                   by_model, max(across, 0), order)


@dataclass
class MergeReport:
    """What a merge did: the stop point, how many layers were zipped, each merged space, timings."""

    method: str
    stop_at: Any
    layers_zipped: int
    layers_total: int
    spaces: list[SpaceReport] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    barriers: list[dict[str, Any]] = field(default_factory=list)  # node, op, reason, order
    costs: dict[str, int] = field(default_factory=dict)  # parameters, flops; ensemble_… of inputs
    corrections: CorrectionReport | None = None  # what the label-free corrections did (None: off)
    settings: dict[str, Any] = field(default_factory=dict)  # alpha, beta, weight_similarity, …
    auto: AutoChoice | None = None  # settings="auto": every grid point's fidelity and the choice
    # the budget (GiB, None: unbounded), the statistics passes, the batches a pass resumed from
    # values an earlier pass saved and those values' peak (GiB), and each phase's peak (GiB: the
    # process's resident peak on the CPU, the peak allocated memory on a GPU)
    memory: dict[str, Any] = field(default_factory=dict)
    # what the merge read: {"source": "given"} or a data-free merge's synthesis
    calibration: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"fxzip merge ({self.method}), stop_at={self.stop_at!r}: zipped "
                 f"{self.layers_zipped}/{self.layers_total} layers, {len(self.spaces)} spaces merged"]
        for s in self.spaces:
            corr = "-" if s.mean_correlation is None else f"{s.mean_correlation:.3f}"
            more = ", …" if len(s.nodes) > 2 else ""
            where = f" ({', '.join(s.nodes[:2])}{more})" if s.nodes else ""
            lines.append(f"  space {s.space:3d}{where}: width {s.width} -> {s.merged_width}, "
                         "merges "
                         f"within models {s.within_model_merges}, across {s.across_model_merges}, "
                         f"mean corr of merged features {corr}")
        lines.extend(f"  barrier {b['node']} ({b['op']}): {b['reason']}" for b in self.barriers)
        c = self.costs
        if c:
            lines.append(f"  parameters {c['parameters']:,} "
                         f"(ensemble {c['ensemble_parameters']:,}), "
                         f"FLOPs per sample {c['flops']:,} (ensemble {c['ensemble_flops']:,})")
        if self.settings:
            lines.append("  settings: " + ", ".join(f"{k}={v!r}" for k, v in self.settings.items()
                                                    if k != "corrections"))
        if self.auto is not None:
            lines.extend("  " + line for line in str(self.auto).splitlines())
        if self.corrections is not None:
            lines.extend("  " + line for line in str(self.corrections).splitlines())
        else:
            lines.append("  corrections: none (plain merge)")
        lines.append("  time: " + ", ".join(f"{k} {v:.3f}s" for k, v in self.seconds.items()))
        if self.memory:
            budget = self.memory.get("budget_gib")
            peaks = ", ".join(f"{k} {v:.2f}" for k, v in self.memory.get("peak_gib", {}).items())
            lines.append(f"  memory: budget {'none' if budget is None else f'{budget:.2f} GiB'}, "
                         f"{self.memory.get('statistics_passes', 0)} statistics pass(es)"
                         + (f" ({self.memory['resumed_batches']} batches resumed from "
                            f"{self.memory['checkpoint_gib']:.2f} GiB saved between them)"
                            if self.memory.get("resumed_batches") else "")
                         + (f", {self.memory['spaces_over_budget']} space(s) over the budget on "
                            "their own" if self.memory.get("spaces_over_budget") else "")
                         + f"; peak GiB: {peaks or '-'}")
        if self.calibration.get("source") == "synthesized":
            c = self.calibration
            lines.append(
                f"  calibration: data-free, {c['samples']} inputs synthesised ({c['steps']} steps, "
                f"BatchNorm statistics of {c.get('models_matched', 0)} model(s) matched)"
                if c.get("synthesized") else "  calibration: data-free, no input read or made")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (numbers, strings, lists, dicts) that `json.dumps` takes as is."""
        data = asdict(self)
        data["corrections"] = None if self.corrections is None else self.corrections.to_dict()
        data["auto"] = None if self.auto is None else self.auto.to_dict()
        return json.loads(json.dumps(data, default=str))

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MergeReport":
        """The report back from `to_dict()` (e.g. the `report.json` of `fxzip merge`)."""
        known = {f for f in cls.__dataclass_fields__}
        fields = {k: v for k, v in data.items() if k in known}
        space_fields = set(SpaceReport.__dataclass_fields__)
        fields["spaces"] = [SpaceReport(**{k: v for k, v in s.items() if k in space_fields})
                            for s in data.get("spaces", [])]
        if isinstance(fields.get("corrections"), dict):
            fields["corrections"] = CorrectionReport.from_dict(fields["corrections"])
        if isinstance(fields.get("auto"), dict):
            fields["auto"] = AutoChoice.from_dict(fields["auto"])
        return cls(**fields)

    def plot(self, path: str | Path) -> Path:
        """Per merged space in graph order: the width of each model and the merged width (top);
        the shares of merges within and across models, and the mean correlation of the features
        merged across models (bottom); barriers as dashed lines. Where the models agree, the
        correlation is high and most merges are across models."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        spaces = sorted(self.spaces, key=lambda s: s.order)
        x = np.arange(len(spaces))
        labels = [s.nodes[0] if s.nodes else f"space {s.space}" for s in spaces]
        width = max(6.0, 0.35 * len(spaces) + 2) + 2.5  # room for the legends on the right
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(width, 6), sharex=True)
        top.bar(x - 0.2, [s.width for s in spaces], 0.4, label="width of each model", color="0.7")
        top.bar(x + 0.2, [s.merged_width for s in spaces], 0.4, label="merged width", color="C0")
        top.set_ylabel("features")
        top.set_title(f"fxzip {self.method}, stop_at={self.stop_at!r}: "
                      f"{self.layers_zipped}/{self.layers_total} layers zipped")
        top.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
        merges = [max(s.within_model_merges + s.across_model_merges, 1) for s in spaces]
        within = np.array([s.within_model_merges for s in spaces]) / np.array(merges)
        across = np.array([s.across_model_merges for s in spaces]) / np.array(merges)
        bottom.bar(x, across, 0.6, label="across models", color="C2")
        bottom.bar(x, within, 0.6, bottom=across, label="within a model", color="C1")
        corr = [np.nan if s.mean_correlation is None else s.mean_correlation for s in spaces]
        bottom.plot(x, corr, "k.-", label="mean corr. of merged features")
        bottom.set_ylim(min(0.0, np.nanmin(corr) if not np.all(np.isnan(corr)) else 0.0), 1.05)
        bottom.set_ylabel("share of merges / corr.")
        bottom.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
        orders = [s.order for s in spaces]
        for b in self.barriers:
            at = np.searchsorted(orders, b.get("order", 0)) - 0.5
            for ax in (top, bottom):
                ax.axvline(at, color="r", ls="--", lw=1)
            top.annotate(b["node"], (at, top.get_ylim()[1]), color="r", fontsize=7, rotation=90,
                         va="top")
        bottom.set_xticks(x, labels, rotation=90, fontsize=7)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
