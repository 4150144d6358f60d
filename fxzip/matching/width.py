"""The merge's capacity knob, `width=`: how wide each merged feature space is.

`width` is the merged width as a multiple of ONE model's width: 1.0 (the default) is ZipIt!'s
n features out of N·n (today's merge), N (the number of models) keeps every feature of every
model apart (no merging: the merged trunk computes the ensemble's function, at the ensemble's
cost), and in between round(width·n) features are kept: the matching stops merging once that many
are left, so the features it leaves apart are the ones the models agree on least (ZipIt!'s greedy
merges the most correlated first; "permute" splits its least correlated pairs apart). A number
applies to every merged space; a dict gives a width per stop region, as PLeaS's per-layer
budgets do: `{"layer1": 1.0, "layer2": 1.5, "*": 2.0}` gives the spaces that `stop_at="layer1"`
zips width 1.0, those that `"layer2"` adds 1.5, and the rest ("*"; default 1.0) 2.0.

Spaces of attention heads and grouped convolutions keep one model's width (a head's width sets
its attention's scale, so a wider head would compute another function).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Union

from ..errors import InputError, StopPointError

__all__ = ["Width", "check_width", "merged_size", "space_widths", "REST"]

Width = Union[float, Mapping[Union[str, int], float]]
REST = "*"  # the key of a width dict for the spaces past its last named stop region


def _ratio(value: Any, num_models: int, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 1 <= value <= num_models:
        raise InputError(f"{where} must be a number in [1, {num_models}] (the merged width as a "
                         f"multiple of one model's width: 1 merges {num_models} models into one "
                         f"model's width, {num_models} keeps every feature apart), got {value!r}")
    return float(value)


def check_width(width: Any, num_models: int) -> Width:
    """A checked `width=`: a number in [1, num_models], or a dict of stop points (and "*") to
    such numbers; InputError naming the allowed values otherwise."""
    if isinstance(width, Mapping):
        if not width:
            raise InputError("width={} names no stop region; pass a number in "
                             f"[1, {num_models}] or a dict such as {{'layer1': 1.0, '*': 1.5}}")
        out = {}
        for key, value in width.items():
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise InputError(f"width's keys must be stop points (as stop_at takes them: a "
                                 f"node or module name, or a number of layers) or {REST!r}, "
                                 f"got {key!r}")
            out[key] = _ratio(value, num_models, f"width[{key!r}]")
        return out
    return _ratio(width, num_models, "width")


def merged_size(size: int, ratio: float, num_models: int) -> int:
    """The merged width of a space of `size` features per model: round(ratio·size), half up,
    within [size, num_models·size]."""
    return min(max(math.floor(ratio * size + 0.5), size), num_models * size)


def space_widths(analysis: Any, spaces: list[int], width: Width) -> dict[int, float]:
    """The width ratio of every space: the number itself, or, for a dict, the ratio of the
    earliest named stop region whose trunk touches the space ("*" or 1.0 past them all).
    InputError for a key that is not a valid stop point."""
    if not isinstance(width, Mapping):
        return {s: float(width) for s in spaces}
    regions = []
    for key, ratio in width.items():
        if key == REST:
            continue
        try:
            region = set(analysis.spaces_of(analysis.trunk(key)))
        except StopPointError as exc:
            raise InputError(f"width[{key!r}] names no stop region: {exc}") from exc
        regions.append((len(region), region, ratio))
    regions.sort(key=lambda r: r[0])  # earlier stop points zip fewer spaces
    rest = width.get(REST, 1.0)
    return {s: next((ratio for _, region, ratio in regions if s in region), rest) for s in spaces}
