"""The merge methods' base class and their one registry of names.

A method says whether it needs feature statistics (so the caller knows whether to collect them)
and turns a correlation (or covariance) matrix into a `Match`; each method lives in a module of
its own, its `Method` subclass beside its algorithm (`average`, `permute`, `zipit`, `cca`,
`weights`). The command line and the benchmarks take the paper's methods from `METHOD_NAMES`;
`METHODS` also holds "cca" (Horoi et al.'s CCA Merge) and "weights" (Git Re-Basin weight matching).

A `joint` method ("weights") matches every space of the models at once from the models themselves
(`match_model`), not one space from its correlations: `Zipper.merge` asks it for all its matches.

To add a method: write a module `fxzip/matching/<name>.py` with a `Method` subclass that sets
`name` and `needs_statistics` and implements `_solve`, decorate it with `@register_method`, and
import the module in `fxzip/matching/__init__.py` (the order of the imports is that of `METHODS`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np

from ..errors import MatchingError
from .match import Match, check_inputs

__all__ = ["Method", "register_method", "METHODS", "METHOD_NAMES", "get_method",
           "match_features"]


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
    #: whether it matches all spaces at once from the models (`match_model`), not by `match`
    joint: bool = False

    def match(self, corr: np.ndarray | None, sizes: Sequence[int], *, alpha: float = 0.5,
              beta: float = 1.0, out_size: int | None = None, owned: bool = False) -> Match:
        """Match the features of N models (`sizes[k]` each) from the (D, D) correlation matrix of
        their concatenation (None for a method that needs no statistics). `out_size` (default
        sizes[0]) is the merged width; `alpha` and `beta` only affect "zipit". `owned`: corr is
        a temporary the method may overwrite (no copy of a wide space's matrix is made)."""
        corr, sizes, out_size, alpha, beta = check_inputs(corr, sizes, out_size=out_size,
                                                          alpha=alpha, beta=beta, owned=owned)
        if corr is None and self.needs_statistics:
            raise MatchingError(f"method {self.name!r} needs the correlation matrix of the "
                                "features")
        return self._solve(corr, sizes, out_size, alpha, beta)

    def _solve(self, corr: np.ndarray | None, sizes: list[int], out_size: int, alpha: float,
               beta: float) -> Match:
        raise NotImplementedError

    def match_model(self, graphs: Sequence, analysis: Any, pairing: Any) -> dict[int, Match]:
        """A joint method's Match of every non-pinned space of `analysis` (graph 0's), from the
        traced models `graphs` paired by `pairing`."""
        raise NotImplementedError(f"method {self.name!r} matches one space at a time (`match`)")

    def __repr__(self) -> str:
        return f"<merge method {self.name!r}>"


METHODS: dict[str, Method] = {}
# the paper's methods, which the demo and the benchmarks compare (with "weights", Git Re-Basin
# weight matching, the paper's other baseline, listed beside them there); "cca" is merged by name too
METHOD_NAMES: tuple[str, ...] = ("average", "permute", "zipit")

_M = TypeVar("_M", bound=type[Method])


def register_method(cls: _M) -> _M:
    """Class decorator: put one instance of a `Method` subclass into `METHODS` under its `name`
    (a missing or already registered name is an error)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name` to register it by")
    if cls.name in METHODS:
        raise ValueError(f"a merge method named {cls.name!r} is already registered "
                         f"({type(METHODS[cls.name]).__name__})")
    METHODS[cls.name] = cls()
    return cls


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
