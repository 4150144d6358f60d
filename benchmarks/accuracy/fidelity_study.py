"""Part of `benchmarks.accuracy` (`python -m benchmarks.accuracy`; off with `--no-auto`): the
fidelity study. Does fidelity to the parents (no labels) rank merges as joint accuracy does?

On the held-out pair: the Spearman rank correlation between each zipit (alpha, beta) grid
point's fidelity (KL of the heads' softmaxes from the parents', or relative error of the outputs;
on the calibration slice that settings="auto" uses and on the validation inputs) and its
validation joint accuracy. On the evaluation pairs, over the settings="auto" grid: its
correlation with test joint accuracy, and the test joint accuracy of the fidelity choice ("auto")
against the grid point chosen by validation labels and the best one by test labels (oracle).
Written under each setting's table in `accuracy_<setting>.md`; one line per grid point in
`accuracy_<setting>_fidelity.csv`."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch.nn as nn

import fxzip
from fxzip.corrections import AutoSettings, Fidelity, fidelity, parent_outputs
from fxzip.corrections.auto_settings import held_out_batches, reference_parents
from fxzip.demo.digits import Accuracy

from benchmarks.common import tables
from benchmarks.common.data import TaskData

if TYPE_CHECKING:
    from .protocol import SettingResult


@dataclass
class FidelityPoint:
    """One grid point of the fidelity study: its settings, its fidelity (on the calibration slice
    that settings="auto" scores on, and on the validation inputs) and its accuracies."""

    pair: int
    stop: str
    alpha: float
    beta: float
    corrections: str
    kl: float  # calibration slice
    rel: float
    kl_val: float  # validation inputs (no labels used)
    rel_val: float
    val: Accuracy
    test: Accuracy | None = None
    chosen: bool = False  # the choice of settings="auto" (by its measure)
    seconds: float = 0.0


class FidelityProbe:
    """The parents' reference outputs for fidelity, once per pair: on the calibration slice that
    settings="auto" scores on, and on the validation inputs (their labels unused)."""

    def __init__(self, zipper: fxzip.Zipper, data: TaskData):
        parents = reference_parents(zipper, True)  # BN-reset parents, as the merges reset BN
        self.cal = held_out_batches(zipper, AutoSettings())
        self.val = [data.x_val]
        self.refs_cal = parent_outputs(parents, self.cal)
        self.refs_val = parent_outputs(parents, self.val)

    def __call__(self, merged: nn.Module) -> tuple[Fidelity, Fidelity]:
        return (fidelity(merged, [], self.cal, references=self.refs_cal),
                fidelity(merged, [], self.val, references=self.refs_val))


def _ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 0..n-1, ties given their mean rank."""
    v = np.asarray(values, dtype=float)
    ranks = np.empty(len(v))
    ranks[v.argsort(kind="stable")] = np.arange(len(v))
    for value in np.unique(v):
        ranks[v == value] = ranks[v == value].mean()
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (NaN where either side is constant)."""
    ra, rb = _ranks(a), _ranks(b)
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _first_best(points: Sequence[FidelityPoint], key: Callable[[FidelityPoint], Any]) -> FidelityPoint:
    """The point with the highest key, the earliest one on ties."""
    best = points[0]
    for p in points[1:]:
        if key(p) > key(best):
            best = p
    return best


def study_markdown(result: SettingResult) -> str:
    """The fidelity study: rank correlations between fidelity and joint accuracy, and the
    fidelity choice against the choices by labels, per stop point; the cost of settings="auto"."""
    stops = [s.label for s in result.setting.stops]
    held = [p for p in result.study if p.pair == 0]
    lines = ["### Fidelity (no labels) vs joint accuracy", "",
             "rho = Spearman rank correlation between MINUS a fidelity measure and joint accuracy "
             "(1: fidelity ranks the settings exactly as accuracy does). KL = mean over heads of "
             "KL(softmax(parent) || softmax(head)); rel.err = relative error of the outputs; "
             "'cal' = on the calibration slice that settings=\"auto\" scores on (the last "
             "eighth of the calibration batches), 'val' = on the validation inputs (labels unused). "
             "Parents: the BN-reset originals.", ""]
    if held:
        n = len({(p.alpha, p.beta) for p in held})
        lines += [f"Held-out pair (seed 0), the paper's zipit (alpha, beta) grid ({n} points, no "
                  "corrections, no weight similarity) against VALIDATION joint accuracy:", ""]
        rows = []
        for stop in stops:
            pts = [p for p in held if p.stop == stop]
            joint = [p.val.joint for p in pts]
            fid_choice = _first_best(pts, lambda p: -p.kl)
            label_choice = _first_best(pts, lambda p: (p.val.joint, p.val.avg))
            rows.append([stop] + [f"{spearman([-getattr(p, m) for p in pts], joint):.2f}"
                                  for m in ("kl", "rel", "kl_val", "rel_val")]
                        + [f"({fid_choice.alpha}, {fid_choice.beta}) {100 * fid_choice.val.joint:.1f}",
                           f"({label_choice.alpha}, {label_choice.beta}) "
                           f"{100 * label_choice.val.joint:.1f}"])
        lines += [tables.markdown_table(["stop", "rho KL cal", "rho rel.err cal", "rho KL val",
                                         "rho rel.err val", "choice by KL cal: val joint",
                                         "best by val labels: val joint"], rows, right=range(1, 7)),
                  ""]
    evals = [p for p in result.study if p.pair != 0]
    if evals:
        pairs = sorted({p.pair for p in evals})
        n = len({(p.alpha, p.beta, p.corrections) for p in evals})
        lines += [f"Evaluation pairs (seeds {pairs[0]}..{pairs[-1]}), the settings=\"auto\" grid "
                  f"({n} points: alpha x beta x corrections default/none) against TEST joint "
                  "accuracy, mean ± std over the pairs; 'auto' = what settings=\"auto\" "
                  f"returns (measure {AutoSettings().measure}), 'by KL' / 'by rel.err' = the "
                  "choice by KL / by relative error, 'by "
                  "val labels' = the grid point with the best validation joint accuracy, "
                  "'oracle' = the best test joint accuracy of the grid; 'corrected points only': "
                  "rho over the grid points with corrections on (the corrections on/off gap "
                  "dominates the full grid's rho). Cost: seconds per merge "
                  "(statistics already collected) of settings=\"auto\" and of one default merge.",
                  ""]
        rows = []
        for stop in stops:
            rho_kl, rho_rel, rho_on, auto, by_kl, by_rel, by_val, oracle, on = \
                [], [], [], [], [], [], [], [], 0
            for pair in pairs:
                pts = [p for p in evals if p.pair == pair and p.stop == stop]
                if not pts:
                    continue
                joint = [p.test.joint for p in pts]
                rho_kl.append(spearman([-p.kl for p in pts], joint))
                rho_rel.append(spearman([-p.rel for p in pts], joint))
                corrected = [p for p in pts if p.corrections == "default"]
                rho_on.append(spearman([-p.kl for p in corrected], [p.test.joint for p in corrected]))
                chosen = next(p for p in pts if p.chosen)
                on += chosen.corrections == "default"
                auto.append(chosen.test.joint)
                by_kl.append(_first_best(pts, lambda p: -p.kl).test.joint)
                by_rel.append(_first_best(pts, lambda p: -p.rel).test.joint)
                by_val.append(_first_best(pts, lambda p: (p.val.joint, p.val.avg)).test.joint)
                oracle.append(max(joint))
            k = len(auto)
            delta = np.array(auto) - np.array(by_val)
            cost = [result.merge_seconds.get(f"{w} {stop}", float("nan")) / max(k, 1)
                    for w in ("auto", "default")]
            pm = tables.mean_std
            rows.append([stop, pm(rho_kl), pm(rho_rel), pm(rho_on), pm(auto, 100, 1),
                         pm(by_kl, 100, 1), pm(by_rel, 100, 1), pm(by_val, 100, 1),
                         pm(oracle, 100, 1), pm(delta, 100, 1),
                         f"{on}/{k}", f"{cost[0]:.1f} / {cost[1]:.1f}"])
        lines += [tables.markdown_table(["stop", "rho KL cal", "rho rel.err cal",
                                         "rho KL cal, corrected points only", "auto",
                                         "by KL", "by rel.err", "by val labels", "oracle",
                                         "auto - by val labels", "corrections chosen",
                                         "seconds auto / default"], rows, right=range(1, 12))]
    return "\n".join(lines)


def write_study_csv(result: SettingResult, path: Path) -> None:
    """One line per grid point of the fidelity study."""
    tables.write_csv(path, ["setting", "pair", "stop", "alpha", "beta", "corrections", "kl_cal",
                            "rel_err_cal", "kl_val", "rel_err_val", "val_joint", "val_avg",
                            "test_joint", "test_avg", "auto_choice", "seconds"],
                     ([result.setting.key, p.pair, p.stop, p.alpha, p.beta, p.corrections,
                       f"{p.kl:.6g}", f"{p.rel:.6g}", f"{p.kl_val:.6g}", f"{p.rel_val:.6g}",
                       f"{p.val.joint:.4f}", f"{p.val.avg:.4f}",
                       "" if p.test is None else f"{p.test.joint:.4f}",
                       "" if p.test is None else f"{p.test.avg:.4f}", int(p.chosen),
                       f"{p.seconds:.3f}"] for p in result.study))
