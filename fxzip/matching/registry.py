"""The merge methods as objects, and the one registry of their names.

A method says whether it needs feature statistics (so the caller knows whether to collect them)
and turns a correlation (or covariance) matrix into a `Match`; the algorithms themselves are in
`fxzip.matching.core`. The command line and the benchmarks take the paper's methods from
`METHOD_NAMES`; `METHODS` also holds "cca" (Horoi et al.'s CCA Merge).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import MatchingError
from .core import (Match, cca_match, check_inputs, equal_widths, permutation_match,
                       zipit_match)

__all__ = ["Method", "Average", "Permute", "ZipIt", "CCA", "METHODS", "METHOD_NAMES",
           "get_method", "match_features"]


class Method:
    """A merge method: its `name`, whether it `needs_statistics` (feature correlations), and
    `match`, which checks the inputs and hands them to the method's algorithm (`_solve`)."""

    name: str = ""
    needs_statistics: bool = True
    summary: str = ""
    #: the matrix `match` takes: the features' "correlation" or their "covariance"
    statistic: str = "correlation"
    #: whether the merged width may exceed one model's (`width=` above 1)
    widens: bool = True

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
    widens = False

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


class CCA(Method):
    """CCA Merge (Horoi et al., ICML 2024): every model aligned to model 0 by an invertible linear
    map from regularised CCA of their features (not a permutation), then averaged: a dense
    Match (`fxzip.matching.core.cca_match`). Takes the features' covariance; one model's width only.
    Spaces of attention heads keep a permutation (the one closest to the map: a dense map would
    mix heads); grouped convolutions cannot be merged by it (MatchingError)."""

    name = "cca"
    summary = "invertible CCA alignment to model 0, then averaging (Horoi et al.)"
    statistic = "covariance"
    widens = False
    # ridge on each model's second moments, times the mean variance: chosen on the validation
    # split of benchmark setting (a)'s pair 1 among 0.3, 1, 3, 30 (with the corrections 3 was best,
    # 30 as good at the layer2 stop; without them 30 led by 1-2 points); small ridges fit noise
    regularization = 3.0

    def _solve(self, corr, sizes, out_size, alpha, beta):
        equal_widths(sizes, out_size, self.name)
        return cca_match(corr, sizes, regularization=self.regularization)


METHODS: dict[str, Method] = {m.name: m for m in (Average(), Permute(), ZipIt(), CCA())}
# the paper's methods, which the demo and the benchmarks compare; "cca" is merged by name too
METHOD_NAMES: tuple[str, ...] = ("average", "permute", "zipit")


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
