"""The accuracy protocol's result rows (one method at one stop point on one pair), the reference
rows (model A, model B, their ensemble), mean ± std summaries over pairs and their table cells
(`benchmarks.accuracy`, `benchmarks.width`)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxzip.demo.digits import Accuracy
from fxzip.runtime.costs import count_flops, count_parameters

from .data import TaskData
from .evaluation import accuracy_of, embedding_accuracy
from .settings import Setting
from .training import reset_copies

METRICS = ("joint", "task_a", "task_b", "avg")


@dataclass
class Row:
    """One line of results: a method at a stop point on one pair."""

    pair: int
    method: str
    stop: str
    zipped: str
    params: int
    flops: int
    acc: Accuracy
    alpha: float | None = None
    beta: float | None = None
    corrections: str = ""


@dataclass
class Summary:
    """Mean ± std over the evaluation pairs of one (method, stop) group."""

    method: str
    stop: str
    zipped: str
    params: int
    flops: int
    mean: dict[str, float]
    std: dict[str, float]


def metric(acc: Accuracy, name: str) -> float:
    return acc.avg if name == "avg" else getattr(acc, name)


def summary_of(group: Sequence[Row]) -> Summary:
    """Mean and sample std (ddof=1; 0 for one row) of every metric over `group` (one method and
    stop point); sizes from its first row."""
    first = group[0]
    values = {m: np.array([metric(r.acc, m) for r in group]) for m in METRICS}
    return Summary(first.method, first.stop, first.zipped, first.params, first.flops,
                   {m: float(v.mean()) for m, v in values.items()},
                   {m: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for m, v in values.items()})


def summarise(rows: Sequence[Row]) -> list[Summary]:
    """Group rows by (method, stop) in order of appearance; mean and sample std (ddof=1)."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.method, r.stop), []).append(r)
    return [summary_of(group) for group in groups.values()]


CHANCE_CELLS = {("model A", "task_b"), ("model B", "task_a")}


def cell(setting: Setting, s: Summary, name: str) -> str:
    """One table cell in %: mean ± std; chance-by-definition cells of the cross-entropy settings'
    single models are marked, and so is the avg that includes them (*)."""
    single = not setting.embedding and s.method in ("model A", "model B")
    if single and (s.method, name) in CHANCE_CELLS:
        return f"{100 * s.mean[name]:.1f} (chance)"
    text = f"{100 * s.mean[name]:.1f} ± {100 * s.std[name]:.1f}"
    return text + (" *" if single and name == "avg" else "")


def reference_rows(setting: Setting, pair: int, models: list[nn.Module], data: TaskData,
                   layers_total: int) -> list[Row]:
    """Model A, model B and their ensemble, each with BatchNorm statistics reset."""
    x, y = data.split.x_test, data.split.y_test
    reset = reset_copies(models, data.calibration)
    rows = [Row(pair, f"model {'AB'[k]}", "-", "-", count_parameters(m), count_flops(m, x),
                accuracy_of(setting, m, x, y, single_task=k)) for k, m in enumerate(reset)]
    params, flops = sum(r.params for r in rows), sum(r.flops for r in rows)
    rows.append(Row(pair, "ensemble", "-", f"0/{layers_total}", params, flops,
                    accuracy_of(setting, reset, x, y)))
    if setting.embedding:
        with torch.no_grad():
            mean = sum(F.normalize(m(x), dim=1) for m in reset) / len(reset)
        rows.append(Row(pair, "ensemble (mean emb)", "-", f"0/{layers_total}", params, flops,
                        embedding_accuracy([mean], y)))
    return rows
