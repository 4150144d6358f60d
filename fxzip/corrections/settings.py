"""The options of the corrections pass (`Corrections`, validated once) and what it reports
(`CorrectionReport`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError

__all__ = ["HEAD_LAYERS", "Corrections", "CorrectionReport"]

HEAD_LAYERS = ("none", "first", "last", "first+last", "all")


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
        (λ = ridge · trace(XᵀX)/d); > 0.
    max_rows: at most this many rows (samples × positions) of each layer's inputs enter its
        regression (a fixed random subset per batch); None: all.
    reset_bn: re-estimate the running statistics of every BatchNorm that is not a fit point
        (as `fxzip.reset_bn`, on the corrected inputs); False leaves them as they are.
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
    max_rows: int | None = 8192
    reset_bn: bool = True
    seed: int = 0
    memory_gib: float | None = 4.0

    def __post_init__(self) -> None:
        if not isinstance(self.refit_trunk, bool):
            raise InputError(f"refit_trunk must be True or False, got {self.refit_trunk!r}")
        if not isinstance(self.repair, bool):
            raise InputError(f"repair must be True or False, got {self.repair!r}")
        if not isinstance(self.reset_bn, bool):
            raise InputError(f"reset_bn must be True or False, got {self.reset_bn!r}")
        if self.refit_heads not in HEAD_LAYERS:
            raise InputError(f"refit_heads={self.refit_heads!r} is not one of "
                             f"{', '.join(map(repr, HEAD_LAYERS))}")
        if isinstance(self.ridge, bool) or not isinstance(self.ridge, (int, float)) \
                or not math.isfinite(self.ridge) or self.ridge <= 0:
            raise InputError(f"ridge must be a finite number > 0 (relative to the mean input "
                             f"variance of each layer), got {self.ridge!r}")
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

    @property
    def active(self) -> bool:
        """Whether any layer is corrected (else `correct` is a BatchNorm reset only)."""
        return self.refit_trunk or self.refit_heads != "none" or self.repair


@dataclass
class CorrectionReport:
    """What `correct` did: the layers refitted / repaired (merged-model module names), the
    relative error of each refitted layer's fit-point output to its target before and after, the
    Linear/Conv layers left uncorrected with the reason (e.g. a module called more than once),
    the options, the calibration samples used and the seconds spent."""

    refitted: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)
    seconds: float = 0.0
    skipped: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    samples: int = 0
    offered: int = 0  # calibration samples given (more than `samples` where the budget binds)

    def __str__(self) -> str:
        of = f" of {self.offered} (memory_gib)" if self.offered > self.samples else ""
        lines = [f"fxzip corrections: {len(self.refitted)} layers refitted, {len(self.repaired)} "
                 f"repaired on {self.samples}{of} samples in {self.seconds:.2f}s"]
        for name, (before, after) in self.errors.items():
            lines.append(f"  {name}: relative error {before:.4f} -> {after:.4f}")
        for name, why in self.skipped.items():
            lines.append(f"  {name}: not corrected: {why}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"refitted": list(self.refitted), "repaired": list(self.repaired),
                "errors": {k: [float(a), float(b)] for k, (a, b) in self.errors.items()},
                "seconds": float(self.seconds), "skipped": dict(self.skipped),
                "options": dict(self.options), "samples": int(self.samples),
                "offered": int(self.offered)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CorrectionReport":
        known = set(cls.__dataclass_fields__)
        fields = {k: v for k, v in data.items() if k in known}
        fields["errors"] = {k: tuple(v) for k, v in fields.get("errors", {}).items()}
        return cls(**fields)
