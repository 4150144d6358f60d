"""What a merge did, as `merged.fxzip_report`: the stop point, the layers zipped, every merged
space (widths, within-model merges, how alike the merged features were) and the timings."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .matching import Match


@dataclass
class SpaceReport:
    """One merged space: its width before and after, and what its Match did."""

    space: int
    width: int
    merged_width: int
    within_model_merges: int
    mean_correlation: float | None

    @classmethod
    def of(cls, space: int, width: int, match: Match,
           corr: np.ndarray | None = None) -> "SpaceReport":
        """The report of a space matched by `match`; with the features' correlation matrix, the
        mean correlation of the features merged across models."""
        mean = None
        if corr is not None:
            rows, cols = match.across_pairs()
            if rows.size:
                mean = float(np.mean(corr[rows, cols]))
        return cls(space, width, match.size, match.within_merges, mean)


@dataclass
class MergeReport:
    """What a merge did: the stop point, how many layers were zipped, each merged space, timings."""

    method: str
    stop_at: Any
    layers_zipped: int
    layers_total: int
    spaces: list[SpaceReport] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"fxzip merge ({self.method}), stop_at={self.stop_at!r}: zipped "
                 f"{self.layers_zipped}/{self.layers_total} layers, {len(self.spaces)} spaces merged"]
        for s in self.spaces:
            corr = "-" if s.mean_correlation is None else f"{s.mean_correlation:.3f}"
            lines.append(f"  space {s.space:3d}: width {s.width} -> {s.merged_width}, within-model "
                         f"merges {s.within_model_merges}, mean corr of merged features {corr}")
        lines.append("  time: " + ", ".join(f"{k} {v:.3f}s" for k, v in self.seconds.items()))
        return "\n".join(lines)
