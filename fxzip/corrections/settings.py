"""The options of the corrections pass (`Corrections`, validated once) and what it reports
(`CorrectionReport`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError

__all__ = ["HEAD_LAYERS", "RIDGE_ROWS", "MIN_ROWS", "BN_PRIOR", "Corrections", "CorrectionReport"]

HEAD_LAYERS = ("none", "first", "last", "first+last", "all")
# The few-sample defaults, chosen on the validation split of setting (a) with other calibration
# draws than the test run's (`python -m benchmarks.scarce_data --split val --draws 2
# --draw-offset 100`, results/scarce_data_validation.md): bn_prior 16 beat 0 and 64; a row-aware
# ridge (ridge_rows 0.3) or skip (min_rows 0.1) lost more at 8 samples than it gained anywhere.
RIDGE_ROWS = 0.0
MIN_ROWS = 0.0
BN_PRIOR = 16.0


@dataclass(frozen=True)
class Corrections:
    """Which corrections `correct` applies.

    refit_trunk: refit every correctable trunk layer against its parents' outputs merged by M.
    refit_heads: which layers of each head to refit against its own parent's outputs: "none",
        "first" (the layers that read the trunk), "last" (the layers whose output reaches the
        model's output without another layer: the output Linear), "first+last" or "all".
    repair: REPAIR-rescale the output features of every correctable layer that is corrected
        (trunk layers always; head layers where `refit_heads` selects them, all head layers if
        `refit_heads="none"`) after any refit.
    ridge: the ridge strength relative to the mean diagonal of each layer's input Gram matrix
        (λ = ridge · trace(XᵀX)/d) where rows are plentiful; > 0.
    ridge_rows: how the ridge grows where a layer's regression has few rows n (samples ×
        positions entering it, at most `max_rows`) for its d inputs (in-features × kernel size):
        λ = (ridge + ridge_rows · d/n) · trace(XᵀX)/d, i.e. a fixed penalty per row rather than
        a fixed share of the data (`ridge_for`); >= 0, 0 (default): `ridge` alone.
    min_rows: a layer is not refitted where n < min_rows · d (the report lists it under
        `skipped`); >= 0, 0 (default): never skipped for want of rows.
    bn_prior: how many calibration samples the given running statistics of a BatchNorm of one
        model's own features are worth: where the pass re-estimates the statistics of a head's
        BatchNorm (past the zipped trunk) and of its parent's counterpart (for the targets) on N
        calibration samples, it blends them with the given ones, weight N / (N + bn_prior) on
        the new (`bn_weight`). Zipped trunk BatchNorms, whose given statistics average different
        features, and their parents' counterparts take the calibration statistics alone. >= 0
        (0: the calibration statistics everywhere; math.inf: the heads' given ones).
    max_rows: at most this many rows (samples × positions) of each layer's inputs enter its
        regression (a fixed random subset per batch); None: all.
    reset_bn: re-estimate the running statistics of every BatchNorm that is not a fit point
        (as `fxzip.reset_bn`, on the corrected inputs); False leaves them as they are.
    parents_as_given: the targets are the parents with their own BatchNorm statistics, even
        where `reset_bn` re-estimates the merged model's (True in a data-free merge: a trained
        model's statistics are all it keeps of its data; synthesised inputs would only blur
        them); False: the parents' statistics are re-estimated on the calibration data too.
    seed: the seed of the row subset.
    memory_gib: the activations the pass may hold at once, in GiB, estimated from the traced
        shapes: where the calibration samples do not all fit, about as many as fit are corrected
        on, chosen from every batch by the samples' own values (not the first ones: data sorted
        by class keep every class; the report says how many); None: every sample. Under
        torch.distributed the share is of all ranks' samples: the same samples as in one
        process.
    """

    refit_trunk: bool = True
    refit_heads: str = "first+last"
    repair: bool = False
    ridge: float = 1e-2
    ridge_rows: float = RIDGE_ROWS
    min_rows: float = MIN_ROWS
    bn_prior: float = BN_PRIOR
    max_rows: int | None = 8192
    reset_bn: bool = True
    parents_as_given: bool = False
    seed: int = 0
    memory_gib: float | None = 4.0

    def __post_init__(self) -> None:
        if not isinstance(self.refit_trunk, bool):
            raise InputError(f"refit_trunk must be True or False, got {self.refit_trunk!r}")
        if not isinstance(self.repair, bool):
            raise InputError(f"repair must be True or False, got {self.repair!r}")
        if not isinstance(self.reset_bn, bool):
            raise InputError(f"reset_bn must be True or False, got {self.reset_bn!r}")
        if not isinstance(self.parents_as_given, bool):
            raise InputError(f"parents_as_given must be True or False, got "
                             f"{self.parents_as_given!r}")
        if self.refit_heads not in HEAD_LAYERS:
            raise InputError(f"refit_heads={self.refit_heads!r} is not one of "
                             f"{', '.join(map(repr, HEAD_LAYERS))}")
        if isinstance(self.ridge, bool) or not isinstance(self.ridge, (int, float)) \
                or not math.isfinite(self.ridge) or self.ridge <= 0:
            raise InputError(f"ridge must be a finite number > 0 (relative to the mean input "
                             f"variance of each layer), got {self.ridge!r}")
        for name in ("ridge_rows", "min_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value < 0:
                raise InputError(f"{name} must be a finite number >= 0 (relative to each layer's "
                                 f"inputs per row), got {value!r}")
        if isinstance(self.bn_prior, bool) or not isinstance(self.bn_prior, (int, float)) \
                or math.isnan(self.bn_prior) or self.bn_prior < 0:
            raise InputError(f"bn_prior must be a number of samples >= 0 (or math.inf), got "
                             f"{self.bn_prior!r}")
        if self.max_rows is not None and (isinstance(self.max_rows, bool)
                                          or not isinstance(self.max_rows, int)
                                          or self.max_rows < 1):
            raise InputError(f"max_rows must be None or an int >= 1, got {self.max_rows!r}")
        if self.memory_gib is not None and (isinstance(self.memory_gib, bool)
                                            or not isinstance(self.memory_gib, (int, float))
                                            or not math.isfinite(self.memory_gib)
                                            or self.memory_gib <= 0):
            raise InputError(f"memory_gib must be None or a number of GiB > 0, got "
                             f"{self.memory_gib!r}")

    def ridge_for(self, rows: int, inputs: int) -> float | None:
        """The relative ridge of a layer whose regression reads `rows` rows for `inputs` inputs
        (d): ``ridge + ridge_rows · d / rows``; None where the layer is not refitted
        (rows < min_rows · d, or no rows at all)."""
        if rows <= 0 or rows < self.min_rows * inputs:
            return None
        return self.ridge + self.ridge_rows * inputs / rows

    def bn_weight(self, samples: int) -> float:
        """The weight of statistics estimated on `samples` calibration samples against a
        BatchNorm's given ones: samples / (samples + bn_prior) (1 for bn_prior 0)."""
        if self.bn_prior == 0:
            return 1.0
        if math.isinf(self.bn_prior) or samples <= 0:
            return 0.0
        return samples / (samples + self.bn_prior)

    @property
    def active(self) -> bool:
        """Whether any layer is corrected (else `correct` is a BatchNorm reset only)."""
        return self.refit_trunk or self.refit_heads != "none" or self.repair


@dataclass
class CorrectionReport:
    """What `correct` did: the layers refitted / repaired (merged-model module names), the
    relative error of each refitted layer's fit-point output to its target before and after, the
    relative ridge each refit used (`Corrections.ridge_for`), the Linear/Conv layers left
    uncorrected or not refitted with the reason (e.g. a module called more than once, too few
    rows), the weight of the BatchNorm statistics estimated on the calibration samples against
    the given ones (`Corrections.bn_weight`), the options, the calibration samples used and the
    seconds spent."""

    refitted: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)
    seconds: float = 0.0
    skipped: dict[str, str] = field(default_factory=dict)
    ridges: dict[str, float] = field(default_factory=dict)
    bn_weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)
    samples: int = 0
    offered: int = 0  # calibration samples given (more than `samples` where the budget binds)

    def __str__(self) -> str:
        of = f" of {self.offered} (memory_gib)" if self.offered > self.samples else ""
        lines = [f"fxzip corrections: {len(self.refitted)} layers refitted, {len(self.repaired)} "
                 f"repaired on {self.samples}{of} samples in {self.seconds:.2f}s"]
        if self.bn_weight < 1.0:
            lines.append(f"  BatchNorm statistics: weight {self.bn_weight:.3f} on the calibration "
                         f"samples' against the given ones (bn_prior)")
        for name, (before, after) in self.errors.items():
            ridge = f" (ridge {self.ridges[name]:.3g})" if name in self.ridges else ""
            lines.append(f"  {name}: relative error {before:.4f} -> {after:.4f}{ridge}")
        for name, why in self.skipped.items():
            lines.append(f"  {name}: not corrected: {why}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"refitted": list(self.refitted), "repaired": list(self.repaired),
                "errors": {k: [float(a), float(b)] for k, (a, b) in self.errors.items()},
                "seconds": float(self.seconds), "skipped": dict(self.skipped),
                "ridges": {k: float(v) for k, v in self.ridges.items()},
                "bn_weight": float(self.bn_weight),
                "options": dict(self.options), "samples": int(self.samples),
                "offered": int(self.offered)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CorrectionReport":
        known = set(cls.__dataclass_fields__)
        fields = {k: v for k, v in data.items() if k in known}
        fields["errors"] = {k: tuple(v) for k, v in fields.get("errors", {}).items()}
        return cls(**fields)
