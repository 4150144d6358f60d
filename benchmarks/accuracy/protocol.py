"""Part of `benchmarks.accuracy` (`python -m benchmarks.accuracy`): the protocol of one setting.
Train the model pairs, choose zipit's alpha/beta on the held-out pair 0 by validation joint
accuracy, then merge every evaluation pair with every method at every stop point ("default",
"auto", the paper's methods) and collect the rows (`SettingResult`)."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch.nn as nn

import fxzip
from fxzip.corrections import AutoSettings, choose as choose_settings
from fxzip.corrections.auto_settings import Trial
from fxzip.demo.digits import Accuracy
from fxzip.runtime.costs import count_flops, count_parameters

from benchmarks.common.data import TaskData
from benchmarks.common.evaluation import accuracy_of
from benchmarks.common.rows import Row, reference_rows
from benchmarks.common.settings import Setting, Stop
from benchmarks.common.timing import Stopwatch, timed
from benchmarks.common.training import train_and_check

from .fidelity_study import FidelityPoint, FidelityProbe

# the methods of the paper's tables, in their order: weight averaging, Git Re-Basin weight
# matching ("weights", in `fxzip.matching.METHODS` but not the paper-algorithm list `METHOD_NAMES`),
# Git Re-Basin activation matching ("permute") and ZipIt! ("zipit")
PAPER_METHODS = ("average", "weights", "permute", "zipit")
# every row `merged_rows` can make: fxzip's default merge, then the paper's methods
MERGE_METHODS = ("default",) + PAPER_METHODS
FULL_GRID = ((0.1, 0.3, 0.5, 0.7, 1.0), (0.0, 0.25, 0.5, 1.0))
QUICK_GRID = ((0.3, 0.5, 1.0), (0.0, 1.0))
Grid = tuple[Sequence[float], Sequence[float]]  # (alphas, betas)


@dataclass
class Choice:
    """zipit's hyper-parameters chosen for one stop point on the held-out pair."""

    alpha: float
    beta: float
    val: Accuracy


def merge(zipper: fxzip.Zipper, stop: Stop, method: str, alpha: float = 0.5,
          beta: float = 1.0) -> nn.Module:
    """`Zipper.merge` for one stop point as the paper merges (no corrections, no weight
    similarity; BN statistics reset on the calibration data)."""
    return zipper.merge(stop.stop_at, method=method, alpha=alpha, beta=beta, reset_bn=True,
                        shared_output=stop.shared_output, corrections=None, weight_similarity=0.0)


def default_merge(zipper: fxzip.Zipper, stop: Stop) -> nn.Module:
    """fxzip's default merge for one stop point (`Zipper.merge` with every default: zipit at
    alpha 0.5, beta 1, weight similarity 0.01, the label-free corrections)."""
    return zipper.merge(stop.stop_at, shared_output=stop.shared_output)


def grid_search(setting: Setting, zipper: fxzip.Zipper, data: TaskData, grid: Grid,
                study: list[FidelityPoint] | None = None) -> dict[str, Choice]:
    """For each stop point the (alpha, beta) maximising zipit's joint accuracy on the validation
    split (ties: higher avg, then the earlier grid point). With `study`, every grid point's
    fidelity is appended to it."""
    probe = FidelityProbe(zipper, data) if study is not None else None
    choices: dict[str, Choice] = {}
    for stop in setting.stops:
        best: tuple[tuple[float, float], Choice] | None = None
        for alpha in grid[0]:
            for beta in grid[1]:
                merged = merge(zipper, stop, "zipit", alpha, beta)
                acc = accuracy_of(setting, merged, data.x_val, data.y_val)
                if probe is not None:
                    cal, val = probe(merged)
                    study.append(FidelityPoint(0, stop.label, alpha, beta, "none", cal.mean_kl,
                                               cal.mean_relative_error, val.mean_kl,
                                               val.mean_relative_error, acc))
                if best is None or (acc.joint, acc.avg) > best[0]:
                    best = ((acc.joint, acc.avg), Choice(alpha, beta, acc))
        choices[stop.label] = best[1]
    return choices


def auto_rows(setting: Setting, pair: int, zipper: fxzip.Zipper, data: TaskData,
              study: list[FidelityPoint], seconds: dict[str, float]) -> list[Row]:
    """The "auto" row of every stop point: `fxzip.corrections.auto_settings.choose` — what
    `Zipper.merge(settings="auto")` runs — with each trial's model also evaluated (validation and
    test accuracy, fidelity on the validation inputs) for the study. `seconds` gets the time of
    the choice and of one default merge per stop point. A stop point that merges the same spaces
    as an earlier one ('full' after 'layer3': only pooling between them) gives the same merges:
    its row, points and times are copied, not recomputed."""
    x, y = data.split.x_test, data.split.y_test
    probe = FidelityProbe(zipper, data)
    rows = []
    done: dict[frozenset, tuple[Row, list[FidelityPoint], float, float]] = {}
    for stop in setting.stops:
        same = None if stop.shared_output else \
            frozenset(zipper.analysis.spaces_of(zipper.trunk(stop.stop_at)))
        if same in done:
            row, points, t_default, t_auto = done[same]
            rows.append(dataclasses.replace(row, stop=stop.label))
            study.extend(dataclasses.replace(p, stop=stop.label) for p in points)
        else:
            points = []

            def evaluate(trial: Trial, merged: nn.Module) -> None:
                _, val = probe(merged)
                points.append(FidelityPoint(pair, stop.label, trial.alpha, trial.beta,
                                            trial.corrections, float(np.mean(trial.kl)),
                                            float(np.mean(trial.relative_error)), val.mean_kl,
                                            val.mean_relative_error,
                                            accuracy_of(setting, merged, data.x_val, data.y_val),
                                            accuracy_of(setting, merged, x, y),
                                            seconds=trial.seconds))

            # statistics are cached by now: the merge's own cost
            t_default = timed(lambda: default_merge(zipper, stop))
            merged, choice = choose_settings(zipper, stop.stop_at, AutoSettings(),
                                             shared_output=stop.shared_output, on_trial=evaluate)
            t_auto = choice.seconds["total"]
            points[choice.best].chosen = True
            study.extend(points)
            report = merged.fxzip_report
            c = choice.chosen
            rows.append(Row(pair, "auto", stop.label,
                            f"{report.layers_zipped}/{report.layers_total}",
                            count_parameters(merged), count_flops(merged, x),
                            points[choice.best].test, c.alpha, c.beta, c.corrections))
            if same is not None:
                done[same] = (rows[-1], points, t_default, t_auto)
        for what, spent in (("default", t_default), ("auto", t_auto)):
            seconds[f"{what} {stop.label}"] = seconds.get(f"{what} {stop.label}", 0.0) + spent
    return rows


def merged_rows(setting: Setting, pair: int, zipper: fxzip.Zipper, data: TaskData,
                choices: dict[str, Choice], methods: Sequence[str] = MERGE_METHODS) -> list[Row]:
    """The rows of `methods` ("default" and the `PAPER_METHODS`) at every stop point, per stop
    point in the order of `methods` (zipit with the chosen alpha/beta: `choices` is needed only
    when "zipit" is among them)."""
    x, y = data.split.x_test, data.split.y_test
    rows = []
    for stop in setting.stops:
        for method in methods:
            if method == "default":  # fxzip.merge's defaults
                merged, alpha, beta, corrections = default_merge(zipper, stop), 0.5, 1.0, "default"
            else:
                chosen = choices[stop.label] if method == "zipit" else None
                alpha, beta = (chosen.alpha, chosen.beta) if chosen else (None, None)
                merged = merge(zipper, stop, method,
                               **({"alpha": alpha, "beta": beta} if chosen else {}))
                corrections = ""
            report = merged.fxzip_report
            rows.append(Row(pair, method, stop.label,
                            f"{report.layers_zipped}/{report.layers_total}",
                            count_parameters(merged), count_flops(merged, x),
                            accuracy_of(setting, merged, x, y), alpha, beta, corrections))
    return rows


def row_order(setting: Setting) -> Callable[[Row], tuple[int, int]]:
    """The sort key of a pair's merge rows: by stop point, then default, auto, the paper's methods
    in `PAPER_METHODS` order (`sorted` is stable: other methods keep their place)."""
    stops = {stop.label: i for i, stop in enumerate(setting.stops)}
    rank = {"default": 0, "auto": 1, **{m: 2 + i for i, m in enumerate(PAPER_METHODS)}}
    return lambda r: (stops[r.stop], rank.get(r.method, len(rank) + 1))


@dataclass
class SettingResult:
    setting: Setting
    rows: list[Row]
    choices: dict[str, Choice]
    single_acc: list[tuple[float, float]]  # per pair: the originals' own-task test accuracy
    seconds: dict[str, float] = field(default_factory=dict)
    epochs: int = 0
    pairs: int = 0
    study: list[FidelityPoint] = field(default_factory=list)  # the fidelity study's grid points
    merge_seconds: dict[str, float] = field(default_factory=dict)  # "default <stop>", "auto <stop>"


def format_choices(choices: dict[str, Choice]) -> str:
    return ", ".join(f"{k}: a={c.alpha} b={c.beta} (val joint {c.val.joint:.3f})"
                     for k, c in choices.items())


def run_setting(setting: Setting, *, pairs: int, epochs: int, grid: Grid,
                log: Callable[[str], None], auto: bool = True) -> SettingResult:
    """Train `pairs` pairs, grid-search on pair 0, evaluate pairs 1..pairs-1."""
    watch = Stopwatch("data", "train", "grid", "evaluate", *(["auto"] if auto else []))
    start = time.perf_counter()
    with watch("data"):
        data = setting.load()
    result = SettingResult(setting, [], {}, [], watch.seconds, epochs, pairs)
    for pair in range(pairs):
        with watch("train"):
            models, own = train_and_check(setting, data, pair, epochs, log)
        result.single_acc.append(own)
        with watch("grid" if pair == 0 else "evaluate"):
            zipper = fxzip.Zipper(models, data.calibration, progress=False)
            if pair == 0:
                result.choices = grid_search(setting, zipper, data, grid,
                                             result.study if auto else None)
            else:
                layers_total = len(zipper.analysis.all_layers)
                result.rows += reference_rows(setting, pair, models, data, layers_total)
                merged = merged_rows(setting, pair, zipper, data, result.choices)
        if pair == 0:
            log(f"  [{setting.key}] held-out choices: {format_choices(result.choices)}")
            continue
        if auto:
            with watch("auto"):
                merged += auto_rows(setting, pair, zipper, data, result.study, result.merge_seconds)
        result.rows += sorted(merged, key=row_order(setting))
    result.seconds = {**watch.seconds, "total": time.perf_counter() - start}
    return result
