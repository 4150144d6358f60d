"""The "average" method: feature i of every model goes to merged feature i (plain weight
averaging, no statistics needed)."""

from __future__ import annotations

import numpy as np

from .match import Match, equal_widths
from .registry import Method, register_method

__all__ = ["Average"]


@register_method
class Average(Method):
    """Feature i of every model goes to merged feature i: plain weight averaging."""

    name = "average"
    needs_statistics = False
    summary = "plain weight averaging"
    widens = False

    def _solve(self, corr: np.ndarray | None, sizes: list[int], out_size: int, alpha: float,
               beta: float) -> Match:
        return Match.identity(equal_widths(sizes, out_size, self.name), len(sizes))
