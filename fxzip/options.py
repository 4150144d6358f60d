"""One options object for a merge: every keyword of `fxzip.merge`, checked once, with one set of
allowed values and one error text — `fxzip.merge`/`merge_all`, `Zipper` and recipes all build a
`MergeOptions`, so an option means the same everywhere it can be given."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

from .corrections import AutoSettings, Corrections, resolve_settings
from .errors import FxzipError, InputError
from .graph.prepare import CAPTURES
from .matching import METHODS, Width, check_width
from .passes.analysis import check_stop_at
from .passes.statistics import check_positions, check_taps
from .runtime.memory import check_memory_gib
from .runtime.moments import check_precision
from .runtime.synthetic_inputs import Synthesis, resolve_synthesis

__all__ = ["MergeOptions", "PREPARE_OPTIONS", "PYTHON_ONLY_OPTIONS", "resolve_corrections"]

# the options a `Zipper` fixes when it is built (tracing and the statistics it collects); the
# others may change from one `Zipper.merge` call to the next
PREPARE_OPTIONS = ("statistics_precision", "taps", "positions", "progress", "leaf_modules",
                   "concrete_args", "group", "capture")
# options that hold Python objects, not values a recipe (YAML) can give
PYTHON_ONLY_OPTIONS = ("progress", "leaf_modules", "concrete_args", "group")
CORRECTION_NAMES = ("default", "none")


@dataclass(frozen=True)
class MergeOptions:
    """Every option of a merge (see `fxzip.merge` for what each does), checked when built: a bad
    value is an `InputError` (a `StopPointError` for `stop_at`) that names the option and its
    allowed values, with the option's name in the error's `option` attribute. Numbers are stored
    as floats; `corrections` and `settings` as given (see `correction_options`, `auto`). `width`
    is checked against the number of models by `checked_width`, once that number is known."""

    # what is zipped, and how features are matched
    stop_at: str | int | None = None
    method: str | None = None  # None: "zipit", or "weights" in a data-free merge (`resolved`)
    alpha: float = 0.5
    beta: float = 1.0
    # a tie-breaker by default: features that look exactly alike on the calibration data (scarce
    # data) are told apart by their weights; small enough not to move real matchings much
    weight_similarity: float = 0.01
    width: Width = 1.0
    shared_output: bool = False
    # after the rewrite
    reset_bn: bool = True
    corrections: str | Corrections | dict | None = "default"
    settings: str | AutoSettings = "default"
    # the statistics
    statistics_precision: str = "auto"
    taps: str = "all"
    positions: float = 1.0
    # memory: what the merge may add beside the models and the merged model, in GiB
    memory_gib: float | str | None = "auto"
    # a data-free merge (inputs=None): how its calibration inputs are synthesised
    synthesis: str | Synthesis | dict = "default"
    # capture and running
    capture: str = "auto"
    progress: bool = True
    leaf_modules: Sequence[type] = ()
    concrete_args: dict | None = field(default=None, compare=False)
    group: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for name, check in _CHECKS.items():
            try:
                value = check(getattr(self, name))
            except FxzipError as exc:
                exc.option = name
                raise
            object.__setattr__(self, name, value)
        self.correction_options  # corrections and reset_bn together

    @property
    def correction_options(self) -> Corrections | None:
        """The `Corrections` that `corrections` means, or None for none (plain ZipIt!);
        `reset_bn=False` turns their BatchNorm reset off too."""
        return resolve_corrections(self.corrections, self.reset_bn)

    @property
    def synthesis_options(self) -> Synthesis:
        """The `Synthesis` that `synthesis` means (used only by a data-free merge)."""
        return resolve_synthesis(self.synthesis)

    @property
    def auto(self) -> AutoSettings | None:
        """The grid of `settings="auto"` (None: alpha, beta and corrections as given)."""
        return resolve_settings(self.settings)

    def replace(self, **changes: Any) -> "MergeOptions":
        """A copy with some options changed (checked again); InputError for an unknown name."""
        unknown = sorted(set(changes) - set(FIELDS))
        if unknown:
            raise InputError(f"unknown merge option(s) {', '.join(map(repr, unknown))}; the "
                             f"options are {', '.join(FIELDS)}")
        return dataclasses.replace(self, **changes)

    def resolved(self, data_free: bool) -> "MergeOptions":
        """These options with `method=None` made concrete: "weights" in a data-free merge (it
        needs no activations), else "zipit"."""
        if self.method is not None:
            return self
        return dataclasses.replace(self, method="weights" if data_free else "zipit")

    def checked_width(self, num_models: int) -> Width:
        """`width` checked against the number of models (in [1, N]); above 1 only for a method
        that can keep the least alike features apart ("zipit", "permute")."""
        try:
            width = check_width(self.width, num_models)
            widest = max(width.values()) if isinstance(width, dict) else width
            if widest > 1 and not METHODS[self.method or "zipit"].widens:
                raise InputError(
                    f"width={widest} > 1 keeps the least alike features apart, which method "
                    f"{self.method!r} does not do; use width=1 or a method among "
                    f"{', '.join(m for m in METHODS if METHODS[m].widens)}")
        except FxzipError as exc:
            exc.option = "width"
            raise
        return width

    def given(self) -> dict[str, Any]:
        """The options that differ from their defaults (a recipe's `merge:` section, say)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default}

    @classmethod
    def recipe_defaults(cls) -> dict[str, Any]:
        """The options a recipe may set, with their defaults (a recipe has calibration data, so
        its method defaults to "zipit")."""
        return {name: "zipit" if name == "method" and default is None else default
                for name, default in DEFAULTS.items() if name not in PYTHON_ONLY_OPTIONS}


def resolve_corrections(corrections: Any, reset_bn: bool = True) -> Corrections | None:
    """The Corrections a `corrections=` value means: "default" → `Corrections()`, None or "none" →
    None (plain ZipIt!), a Corrections as is, a mapping of its fields (as recipes give them);
    InputError otherwise. `reset_bn=False` turns the corrections' BatchNorm reset off too (their
    targets are then the parents as given)."""
    if corrections is None or (isinstance(corrections, str) and corrections == "none"):
        return None
    if isinstance(corrections, str) and corrections == "default":
        options = Corrections()
    elif isinstance(corrections, Corrections):
        options = corrections
    elif isinstance(corrections, dict):
        unknown = sorted(set(corrections) - set(Corrections.__dataclass_fields__))
        if unknown:
            raise InputError(f"corrections: unknown field(s) {', '.join(map(repr, unknown))}; "
                             f"allowed: {', '.join(Corrections.__dataclass_fields__)}")
        options = Corrections(**corrections)
    else:
        raise InputError(f"corrections={corrections!r} is not allowed: pass \"default\" (the "
                         "label-free refit after the rewrite), None or \"none\" (plain ZipIt!), "
                         "a mapping of fxzip.Corrections' fields, or an fxzip.Corrections(...)")
    if not reset_bn and options.reset_bn:
        options = dataclasses.replace(options, reset_bn=False)
    return options


def _number(name: str, low: float, high: float, low_open: bool, meaning: str
            ) -> Callable[[Any], float]:
    """A check of a finite number in [low, high] (or (low, high]); the interval and what the
    option means go into the error."""
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise InputError(f"{name} must be a finite number, got {value!r}")
        if not (low < value if low_open else low <= value) or value > high:
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise InputError(f"{name} must be in {interval} ({meaning}), got {value}")
        return float(value)
    return check


def _boolean(name: str) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        if not isinstance(value, bool):
            raise InputError(f"{name} must be True or False, got {value!r}")
        return value
    return check


def _method(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or value not in METHODS:
        raise InputError(f"unknown method {value!r}; choose one of {', '.join(METHODS)}")
    return value


def _corrections(value: Any) -> Any:
    resolve_corrections(value)
    return value


def _settings(value: Any) -> Any:
    resolve_settings(value)
    return value


def _synthesis(value: Any) -> Any:
    resolve_synthesis(value)
    return value


def _capture(value: Any) -> str:
    if value not in CAPTURES:
        raise InputError(f"capture must be one of {', '.join(map(repr, CAPTURES))} (\"auto\": "
                         f"torch.fx symbolic tracing, torch.export where that fails), got {value!r}")
    return value


def _leaf_modules(value: Any) -> tuple[type, ...]:
    if isinstance(value, type) or not isinstance(value, Sequence) \
            or not all(isinstance(t, type) for t in value):
        raise InputError(f"leaf_modules must be a sequence of module classes, got {value!r}")
    return tuple(value)


def _concrete_args(value: Any) -> dict | None:
    if value is not None and not isinstance(value, dict):
        raise InputError(f"concrete_args must be None or a dict of forward's arguments, "
                         f"got {value!r}")
    return value


def _stop_at(value: Any) -> Any:
    check_stop_at(value)
    return value


_CHECKS: dict[str, Callable[[Any], Any]] = {
    "stop_at": _stop_at,
    "method": _method,
    "alpha": _number("alpha", 0, 1, True, "the weight of a merged cluster's similarity to the "
                     "others"),
    "beta": _number("beta", 0, 1, False, "the share of merges allowed within one model"),
    "weight_similarity": _number("weight_similarity", 0, 1, False, "the share of the weights' "
                                 "similarity in the matching's similarity"),
    "shared_output": _boolean("shared_output"),
    "reset_bn": _boolean("reset_bn"),
    "corrections": _corrections,
    "settings": _settings,
    "statistics_precision": check_precision,
    "taps": check_taps,
    "positions": check_positions,
    "capture": _capture,
    "memory_gib": check_memory_gib,
    "synthesis": _synthesis,
    "progress": _boolean("progress"),
    "leaf_modules": _leaf_modules,
    "concrete_args": _concrete_args,
}
FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(MergeOptions))
DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(MergeOptions)}
