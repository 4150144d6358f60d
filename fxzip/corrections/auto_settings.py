"""Automatic merge settings without labels: zipit's `alpha`/`beta` (and corrections on or off)
chosen per stop point by *fidelity* — how well each merged head reproduces its own parent's
outputs (`fxzip.corrections.fidelity`) on a held-out slice of unlabelled inputs.

`Zipper.merge(..., settings="auto")` (and `fxzip.merge`/`merge_all`) merges once per point of a
small grid and keeps the merge whose fidelity score is best (lowest). The feature statistics and
weight similarities are collected once by the Zipper and shared by every grid point, and the
matchings by the corrections on/off pairs, so the grid costs matchings, rewrites, corrections
passes and fidelity forwards only. The parents' reference outputs are computed once per call.

The chosen values and the whole table of scores go into the merged model's report
(`merged.fxzip_report.auto`, printable). Ties (e.g. every point exact in a self-merge) go to the
earlier grid point; the grid is ordered so that fxzip's default settings come first.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch.fx as fx
import torch.nn as nn

from .batch_norm import reset_bn
from ..errors import InputError
from .fidelity import MEASURES, Fidelity, fidelity, parent_outputs
from ..runtime.inputs import Batches

__all__ = ["AutoSettings", "AutoChoice", "Trial", "SETTINGS_NAMES", "resolve_settings", "choose"]

SETTINGS_NAMES = ("default", "auto")
# the default grid: fxzip's default (0.5, 1) first, so that it wins ties
ALPHAS = (0.5, 0.3, 1.0)
BETAS = (1.0, 0.5)
CORRECTIONS = ("default", "none")
HELD_OUT_SHARE = 8  # held_out=None: the last ⌈n/8⌉ of n calibration batches


def _grid_values(values: Any, name: str, low: float, low_open: bool) -> tuple[float, ...]:
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = (values,)
    if not isinstance(values, (list, tuple)) or not values:
        raise InputError(f"AutoSettings.{name} must be a non-empty tuple of numbers, got {values!r}")
    out = []
    for v in values:
        ok = (not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
              and (v > low if low_open else v >= low) and v <= 1)
        if not ok:
            bound = f"({low}, 1]" if low_open else f"[{low}, 1]"
            raise InputError(f"AutoSettings.{name}: {v!r} is not allowed; each value must be a "
                             f"number in {bound}")
        if float(v) not in out:
            out.append(float(v))
    return tuple(out)


@dataclass(frozen=True)
class AutoSettings:
    """What `settings="auto"` tries: every (alpha, beta, corrections) of the grid, scored by the
    fidelity `measure` ("relative_error", the default: relative error of the outputs; "kl": mean
    KL divergence of the heads' softmaxes from their parents', which presumes class logits and
    misranked a shared embedding output: `benchmarks.accuracy` setting (d)) on `held_out`
    inputs (batches; None: the last ⌈n/8⌉ of the Zipper's n calibration batches, which the
    statistics saw as well — pass inputs of their own for a strict hold-out). `corrections` lists "default" (the label-free
    refits, `fxzip.Corrections()`) and/or "none" (plain zipit with the BatchNorm reset)."""

    alphas: tuple[float, ...] = ALPHAS
    betas: tuple[float, ...] = BETAS
    corrections: tuple[str, ...] = CORRECTIONS
    measure: str = "relative_error"
    held_out: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "alphas", _grid_values(self.alphas, "alphas", 0.0, True))
        object.__setattr__(self, "betas", _grid_values(self.betas, "betas", 0.0, False))
        corrections = self.corrections
        if isinstance(corrections, str) or corrections is None:
            corrections = (corrections,)
        if not isinstance(corrections, (list, tuple)) or not corrections:
            raise InputError("AutoSettings.corrections must be a non-empty tuple of \"default\" "
                             f"and/or \"none\", got {self.corrections!r}")
        names = []
        for c in corrections:
            c = "none" if c is None else c
            if c not in CORRECTIONS:
                raise InputError(f"AutoSettings.corrections: {c!r} is not allowed; choose from "
                                 f"{', '.join(map(repr, CORRECTIONS))}")
            if c not in names:
                names.append(c)
        object.__setattr__(self, "corrections", tuple(names))
        if self.measure not in MEASURES:
            raise InputError(f"AutoSettings.measure={self.measure!r} is not allowed; choose one of "
                             f"{', '.join(map(repr, MEASURES))}")

    @property
    def size(self) -> int:
        return len(self.alphas) * len(self.betas) * len(self.corrections)


def resolve_settings(settings: Any) -> AutoSettings | None:
    """What a `settings=` value means: "default" → None (the given alpha/beta/corrections),
    "auto" → `AutoSettings()`, an AutoSettings as is; InputError otherwise."""
    if isinstance(settings, AutoSettings):
        return settings
    if isinstance(settings, str) and settings in SETTINGS_NAMES:
        return None if settings == "default" else AutoSettings()
    raise InputError(f"settings={settings!r} is not allowed: pass \"default\" (alpha, beta and "
                     "corrections as given), \"auto\" (chosen per stop point by fidelity to the "
                     "parents on held-out inputs) or an fxzip.corrections.auto_settings.AutoSettings(...)")


@dataclass
class Trial:
    """One grid point: its settings, its fidelity per head, its score and its cost."""

    alpha: float
    beta: float
    corrections: str
    score: float
    kl: list[float]
    relative_error: list[float]
    agreement: list[float]
    seconds: float


@dataclass
class AutoChoice:
    """The table of a `settings="auto"` merge: every trial and the chosen one (lowest score)."""

    measure: str
    held_out_batches: int
    trials: list[Trial]
    best: int
    seconds: dict[str, float] = field(default_factory=dict)  # references, trials, total

    @property
    def chosen(self) -> Trial:
        return self.trials[self.best]

    def __str__(self) -> str:
        c = self.chosen
        lines = [f"auto settings: alpha={c.alpha}, beta={c.beta}, corrections={c.corrections!r} "
                 f"chosen by {self.measure} on {self.held_out_batches} held-out batches "
                 f"({len(self.trials)} trials, {self.seconds.get('total', 0.0):.2f}s)",
                 "    alpha  beta  corrections     score  mean KL  mean rel.err  agreement"]
        for i, t in enumerate(self.trials):
            mark = " <" if i == self.best else ""
            lines.append(f"    {t.alpha:5.2f} {t.beta:5.2f}  {t.corrections:<11} {t.score:9.4g} "
                         f"{_mean(t.kl):8.4g} {_mean(t.relative_error):13.4g} "
                         f"{_mean(t.agreement):10.3f}{mark}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AutoChoice":
        return cls(data["measure"], data["held_out_batches"],
                   [Trial(**t) for t in data["trials"]], data["best"], dict(data.get("seconds", {})))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def held_out_batches(zipper: Any, auto: AutoSettings) -> list[Any]:
    """The inputs fidelity is measured on: `auto.held_out` (as batches), or the last ⌈n/8⌉ of the
    Zipper's n calibration batches."""
    if auto.held_out is not None:
        return list(Batches(auto.held_out, zipper.batches.device))
    batches = zipper.batches
    n = len(batches)
    first = n - max(1, math.ceil(n / HELD_OUT_SHARE))
    return [b for i, b in enumerate(batches) if i >= first]


def reference_parents(zipper: Any, reset: bool) -> list[nn.Module]:
    """The parents a merge is compared with: the Zipper's traced models, with their BatchNorm
    statistics reset on the calibration data when the merge resets them (as the corrections'
    targets are); copies, the models are not changed."""
    if not reset:
        return list(zipper.graphs)
    return [reset_bn(copy.deepcopy(g), zipper.batches, progress=False) for g in zipper.graphs]


def choose(zipper: Any, stop_at: Any, auto: AutoSettings, *, method: str = "zipit",
           reset_bn: bool = True,
           on_trial: Callable[[Trial, fx.GraphModule], None] | None = None,
           **options: Any) -> tuple[fx.GraphModule, AutoChoice]:
    """Merge `zipper` at `stop_at` once per grid point of `auto` and return the merge with the
    best (lowest) fidelity score and the table of every trial. Ties go to the earlier grid point.
    `options` (shared_output, weight_similarity, width, …) go to every `zipper.merge` as given.
    `on_trial(trial, merged)` sees every trial's model (e.g. a benchmark that also measures
    accuracy); its time is not counted in the choice's seconds."""
    if method != "zipit":
        raise InputError(f"settings=\"auto\" chooses zipit's alpha and beta; method={method!r} has "
                         "none: use method=\"zipit\" or settings=\"default\"")
    if zipper.group is not None:
        raise InputError("settings=\"auto\" is not supported under torch.distributed (every rank "
                         "would score its own shard); choose alpha/beta on one process and pass them")
    start = time.perf_counter()
    inputs = held_out_batches(zipper, auto)
    refs = parent_outputs(reference_parents(zipper, reset_bn), inputs)
    seconds = {"references": time.perf_counter() - start}
    trials: list[Trial] = []
    best_model, best, hooks = None, -1, 0.0
    for corrections in auto.corrections:
        for alpha in auto.alphas:
            for beta in auto.betas:
                tick = time.perf_counter()
                merged = zipper.merge(stop_at, method=method, alpha=alpha, beta=beta,
                                      reset_bn=reset_bn, corrections=corrections, **options)
                fid: Fidelity = fidelity(merged, [], inputs, references=refs)
                score = fid.score(auto.measure)
                score = score if math.isfinite(score) else math.inf  # a broken merge ranks last
                trials.append(Trial(alpha, beta, corrections, score, fid.kl, fid.relative_error,
                                    fid.agreement, time.perf_counter() - tick))
                if best < 0 or score < trials[best].score:
                    best, best_model = len(trials) - 1, merged
                if on_trial is not None:
                    tick = time.perf_counter()
                    on_trial(trials[-1], merged)
                    hooks += time.perf_counter() - tick
                del merged
    seconds["trials"] = sum(t.seconds for t in trials)
    seconds["total"] = time.perf_counter() - start - hooks
    return best_model, AutoChoice(auto.measure, len(inputs), trials, best, seconds)
