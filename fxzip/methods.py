"""The merge methods as objects, and the one registry of their names.

A method says whether it needs feature statistics (so the caller knows whether to collect them)
and turns a correlation matrix into a `Match`; the algorithms themselves are in
`fxzip.matching`. The command line and the benchmarks take the names from `METHOD_NAMES`.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import MatchingError
from .matching import Match, check_inputs, equal_widths, permutation_match, zipit_match

__all__ = ["Method", "Average", "Permute", "ZipIt", "METHODS", "METHOD_NAMES", "get_method",
           "match_features"]


class Method:
    """A merge method: its `name`, whether it `needs_statistics` (feature correlations), and
    `match`, which checks the inputs and hands them to the method's algorithm (`_solve`)."""

    name: str = ""
    needs_statistics: bool = True
    summary: str = ""

    def match(self, corr: np.ndarray | None, sizes: Sequence[int], *, alpha: float = 0.5,
              beta: float = 1.0, out_size: int | None = None) -> Match:
        """Match the features of N models (`sizes[k]` each) from the (D, D) correlation matrix of
        their concatenation (None for a method that needs no statistics). `out_size` (default
        sizes[0]) is the merged width; `alpha` and `beta` only affect "zipit"."""
        corr, sizes, out_size, alpha, beta = check_inputs(corr, sizes, out_size=out_size,
                                                          alpha=alpha, beta=beta)
        if corr is None and self.needs_statistics:
            raise MatchingError(f"method {self.name!r} needs the correlation matrix of the "
                                "features")
        return self._solve(corr, sizes, out_size, alpha, beta)

    def _solve(self, corr: np.ndarray | None, sizes: list[int], out_size: int, alpha: float,
               beta: float) -> Match:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<merge method {self.name!r}>"


class Average(Method):
    """Feature i of every model goes to merged feature i: plain weight averaging."""

    name = "average"
    needs_statistics = False
    summary = "plain weight averaging"

    def _solve(self, corr, sizes, out_size, alpha, beta):
        return Match.identity(equal_widths(sizes, out_size, self.name), len(sizes))


class Permute(Method):
    """Git Re-Basin activation matching: every model aligned one-to-one to model 0."""

    name = "permute"
    summary = "Hungarian matching across models (Git Re-Basin)"

    def _solve(self, corr, sizes, out_size, alpha, beta):
        equal_widths(sizes, out_size, self.name, wider=True)
        return permutation_match(corr, sizes, out_size)


class ZipIt(Method):
    """The ZipIt! greedy: merges the most correlated features, within or across models."""

    name = "zipit"
    summary = "ZipIt! greedy, within and across models"

    def _solve(self, corr, sizes, out_size, alpha, beta):
        return zipit_match(corr, sizes, alpha=alpha, beta=beta, out_size=out_size)


METHODS: dict[str, Method] = {m.name: m for m in (Average(), Permute(), ZipIt())}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)


def get_method(method: str | Method) -> Method:
    """The method of a name (a Method passes through); MatchingError for an unknown name."""
    if isinstance(method, Method):
        return method
    if method not in METHODS:
        raise MatchingError(f"unknown matching method {method!r}; allowed: {', '.join(METHODS)}")
    return METHODS[method]


def match_features(corr: np.ndarray | None, sizes: Sequence[int], method: str | Method = "zipit",
                   *, alpha: float = 0.5, beta: float = 1.0, out_size: int | None = None) -> Match:
    """Match the features of N models from the correlation matrix of their concatenation.

    `corr` is (D, D) with D = sum(sizes); model k owns the contiguous block of sizes[k]
    rows/columns. `out_size` (default sizes[0]) is the merged width. `alpha` and `beta` only
    affect "zipit": alpha scales the similarity of a freshly merged cluster, beta is the share
    of merges allowed within one model. See `Method.match`.
    """
    return get_method(method).match(corr, sizes, alpha=alpha, beta=beta, out_size=out_size)
