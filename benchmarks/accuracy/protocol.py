"""The ZipIt! paper's accuracy protocol on offline data.

    python benchmarks/accuracy.py [--settings a,b,c,d,e] [--pairs 5] [--epochs N] [--width W]
                                  [--quick] [--out benchmarks/results]

Settings (every model pair: one architecture, two DIFFERENT initialisations, trained on
disjoint class halves: task A = classes 0–4, task B = classes 5–9):

  a  digits 5+5, `fxzip.demo.digits.ResNet20(width=W)`, cross-entropy heads;
     stops: layer1, layer2, layer3, full (stop_at=None: all but the output layers).
  b  digits 5+5, `DigitsVGG` (the classifier flattens C×H×W = C·2·2 maps); stops: stage1,
     stage2, full.
  c  mnist1d 5+5 (generated offline), `Conv1dNet`; stops: stage1, stage2, stage3, full.
  d  digits 5+5, `ResNet20(width=W)` ending in a Linear to a d=32 embedding, trained so that the
     cosine similarity / T (T=0.07) to 10 fixed random unit class embeddings classifies the
     model's own 5 classes. Split-head stops as in (a), plus "shared": `shared_output=True`
     zips every layer into ONE model with ONE output (the output layer averaged) — the paper's
     ZipIt!20/20 row.
  e  digits 5+5, the `DigitsVGG` of (b) without BatchNorm (norm-free: the BN reset repairs
     nothing there); stops as in (b).

Protocol, per setting:
  * `--pairs` P model pairs are trained (seeds 0..P-1). Pair 0 is the held-out pair, used only
    to choose zipit's `alpha`/`beta` (grid search, separately for every stop point, maximising
    joint accuracy on a VALIDATION split: 20% of the training data that no model is trained
    on). Pairs 1..P-1 are the evaluation pairs: mean ± sample std (ddof=1) over them on the
    test data are reported.
  * Calibration data (feature statistics and BatchNorm reset) = the training inputs of BOTH
    tasks (without the validation split), in batches of 256.
  * BatchNorm statistics are reset on the calibration data for every method, the original
    models (and so the ensemble) included.
  * Accuracies (fractions, shown in %):
      - split heads: joint = argmax over both heads' softmaxes over all 10 classes; task A/B =
        each head on its own classes' test samples (`fxzip.demo.digits.evaluate`).
      - ensemble = the two (BN-reset) original models as two heads, evaluated the same way.
      - model A alone (heads settings): joint = argmax over its 5 classes, counted on all 10
        classes' test samples (so at most ≈ 0.5); task A = its accuracy; task B = 0.2, CHANCE
        level by definition (model A has no outputs for classes 5–9; a blind guess among B's 5
        classes), marked "(chance)". Model B symmetrically.
      - embedding setting (d): class scores are cosine similarities to the class embeddings.
        joint = argmax over all 10 classes; task A/B = argmax restricted to the task's classes.
        With split heads (and for the ensemble) a class's score is the MAX over both heads'
        similarities; task A uses head A, task B head B. A single model (or the shared-output
        merge) is evaluated on both tasks with its one embedding, so model A's task B accuracy
        is measured, not defined.
  * Rows "default" = `Zipper.merge` with every default (zipit, alpha 0.5, beta 1, weight
    similarity 0.01, the label-free corrections); "auto" = `settings="auto"` (alpha, beta and
    corrections on/off chosen per stop point and pair by fidelity to the BN-reset parents on the
    last eighth of the calibration batches: no labels; `fxzip.corrections.auto_settings`).
  * Fidelity study (the section under each table): on the held-out pair, the Spearman rank
    correlation between each zipit (alpha, beta) grid point's fidelity (KL of the heads'
    softmaxes from the parents', or relative error of the outputs; on the calibration slice
    that "auto" uses and on the validation inputs) and its validation joint accuracy; on the
    evaluation pairs, over the "auto" grid, its correlation with test joint accuracy, and the
    test joint accuracy of the fidelity choice ("auto") against the grid point chosen by
    validation labels and the best one by test labels (oracle). Extra rows in
    `accuracy_<setting>_fidelity.csv`.
  * params: `fxzip.runtime.costs.count_parameters`; FLOPs: `fxzip.runtime.costs.count_flops` (torch's
    FlopCounterMode: convolutions and matrix products) on ONE sample; the ensemble counts both
    models.

Outputs in `--out`: `accuracy_<setting>.csv` (one row per pair, method and stop point),
`accuracy_<setting>.md` (the mean ± std table) and `accuracy_<setting>.png` (joint accuracy vs
FLOPs). Torch runs single-threaded by default (`--threads`): on a shared 2-core machine two
threads were up to 10× slower.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import fxzip  # noqa: E402
from fxzip.runtime.costs import count_flops, count_parameters  # noqa: E402
from fxzip.demo.digits import (TASK_CLASSES, Accuracy, DigitsSplit, ResNet20,  # noqa: E402
                          evaluate_heads, load_digits_split, train_classifier, train_task_pair)
from fxzip.corrections.auto_settings import (AutoSettings, Trial, choose as choose_settings,  # noqa: E402
                                  held_out_batches, reference_parents)
from fxzip.corrections.fidelity import Fidelity, fidelity, parent_outputs  # noqa: E402
from fxzip.matching.registry import METHOD_NAMES  # noqa: E402

from benchmarks.models import Conv1dNet, DigitsVGG  # noqa: E402
from benchmarks import tables  # noqa: E402

FULL_GRID = ((0.1, 0.3, 0.5, 0.7, 1.0), (0.0, 0.25, 0.5, 1.0))
QUICK_GRID = ((0.3, 0.5, 1.0), (0.0, 1.0))
VAL_FRACTION = 0.2
CALIBRATION_BATCH = 256
EMBED_DIM = 32
TEMPERATURE = 0.07
CHANCE = 0.2
Grid = tuple[Sequence[float], Sequence[float]]  # (alphas, betas)


def class_embeddings(dim: int = EMBED_DIM, seed: int = 1234) -> torch.Tensor:
    """10 fixed random unit vectors (one per class), seeded: the shared output space of (d)."""
    vectors = torch.randn(10, dim, generator=torch.Generator().manual_seed(seed))
    return F.normalize(vectors, dim=1)


# -- data -----------------------------------------------------------------------------------------
@dataclass
class TaskData:
    """Training data (without the validation split) and test data in `split`, the validation split,
    and the calibration batches (training inputs of both tasks)."""

    split: DigitsSplit
    x_val: torch.Tensor
    y_val: torch.Tensor

    @property
    def calibration(self) -> list[torch.Tensor]:
        x = self.split.x_train
        return [x[i:i + CALIBRATION_BATCH] for i in range(0, len(x), CALIBRATION_BATCH)]


def hold_out_validation(split: DigitsSplit, fraction: float = VAL_FRACTION) -> TaskData:
    """Move the first `fraction` of the (already shuffled) training data to a validation split."""
    n_val = int(len(split.y_train) * fraction)
    train = DigitsSplit(split.x_train[n_val:], split.y_train[n_val:], split.x_test, split.y_test)
    return TaskData(train, split.x_train[:n_val], split.y_train[:n_val])


def load_digits() -> TaskData:
    """scikit-learn's digits (N, 1, 8, 8), split by `fxzip.demo.digits.load_digits_split(seed=0)`."""
    return hold_out_validation(load_digits_split(seed=0))


def load_mnist1d() -> TaskData:
    """mnist1d generated offline with its default arguments (4,000 train / 1,000 test), (N, 1, 40),
    standardised with the training mean and std."""
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())
    x = torch.tensor(data["x"], dtype=torch.float32).unsqueeze(1)
    x_test = torch.tensor(data["x_test"], dtype=torch.float32).unsqueeze(1)
    mean, std = x.mean(), x.std()
    split = DigitsSplit((x - mean) / std, torch.tensor(data["y"], dtype=torch.long),
                        (x_test - mean) / std, torch.tensor(data["y_test"], dtype=torch.long))
    return hold_out_validation(split)


# -- settings -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stop:
    """One stop point: its table label and the `Zipper.merge` arguments."""

    label: str
    stop_at: str | int | None
    shared_output: bool = False


@dataclass
class Setting:
    key: str
    title: str
    load: Callable[[], TaskData]
    make_model: Callable[[], nn.Module]
    stops: list[Stop]
    epochs: int
    quick_epochs: int = 10
    embedding: bool = False
    note: str = ""


RESNET_STOPS = [Stop("layer1", "layer1"), Stop("layer2", "layer2"), Stop("layer3", "layer3"),
                Stop("full", None)]
POOL_NOTE = ("'{last}' and 'full' zip the same layers (only parameter-free global pooling and "
             "flatten lie between them), so their rows agree.")


def make_settings(width: int) -> dict[str, Setting]:
    """The five settings; `width` is the ResNet-20 width multiplier of (a) and (d)."""
    return {
        "a": Setting("a", f"digits 5+5, ResNet-20x{width}, cross-entropy heads", load_digits,
                     lambda: ResNet20(width=width), RESNET_STOPS, epochs=20,
                     note=POOL_NOTE.format(last="layer3")),
        "b": Setting("b", "digits 5+5, VGG-style CNN with a flatten(C*2*2) classifier",
                     load_digits, lambda: DigitsVGG(width=32, hidden=128),
                     [Stop("stage1", "stage1"), Stop("stage2", "stage2"), Stop("full", None)],
                     epochs=30),
        "e": Setting("e", "digits 5+5, the VGG-style CNN of (b) without BatchNorm (norm-free)",
                     load_digits, lambda: DigitsVGG(width=32, hidden=128, norm=False),
                     [Stop("stage1", "stage1"), Stop("stage2", "stage2"), Stop("full", None)],
                     epochs=30),
        "c": Setting("c", "mnist1d 5+5, 1-D CNN", load_mnist1d, lambda: Conv1dNet(width=32),
                     [Stop("stage1", "stage1"), Stop("stage2", "stage2"),
                      Stop("stage3", "stage3"), Stop("full", None)], epochs=30,
                     note=POOL_NOTE.format(last="stage3")),
        "d": Setting("d", f"digits 5+5, ResNet-20x{width} into a shared d={EMBED_DIM} "
                          f"cosine-embedding space (T={TEMPERATURE})", load_digits,
                     lambda: ResNet20(width=width, num_classes=EMBED_DIM),
                     RESNET_STOPS + [Stop("shared", None, shared_output=True)], epochs=20,
                     embedding=True, note=POOL_NOTE.format(last="layer3")),
    }


# -- training -------------------------------------------------------------------------------------
class CosineClassifier(nn.Module):
    """Training wrapper: cosine similarity of `body`'s embedding to fixed class embeddings, / T."""

    def __init__(self, body: nn.Module, anchors: torch.Tensor, temperature: float = TEMPERATURE):
        super().__init__()
        self.body = body
        self.register_buffer("anchors", F.normalize(anchors, dim=1))
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.body(x), dim=1) @ self.anchors.T / self.temperature


def train_embedding_pair(split: DigitsSplit, make_model: Callable[[], nn.Module], anchors: torch.Tensor,
                         *, seed: int, epochs: int) -> list[nn.Module]:
    """Two embedding models (seeds as in `train_task_pair`), each trained with cross-entropy over
    the cosine similarities to its own 5 classes' embeddings."""
    models = []
    for k, classes in enumerate(TASK_CLASSES):
        torch.manual_seed(seed * 100 + k)
        x, y = split.task(classes)
        wrapper = CosineClassifier(make_model(), anchors[list(classes)])
        train_classifier(wrapper, x, y, epochs=epochs, seed=seed * 100 + k)
        models.append(wrapper.body.eval())
    return models


def train_pair(setting: Setting, data: TaskData, seed: int, epochs: int) -> list[nn.Module]:
    """The model pair of one seed for a setting."""
    if setting.embedding:
        return train_embedding_pair(data.split, setting.make_model, class_embeddings(),
                                    seed=seed, epochs=epochs)
    return train_task_pair(data.split, setting.make_model, seed=seed, epochs=epochs)


# -- evaluation -----------------------------------------------------------------------------------
def as_heads(output: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A model's output as a list of heads (a shared-output merge returns one tensor)."""
    return [output] if isinstance(output, torch.Tensor) else list(output)


def embedding_accuracy(heads: Sequence[torch.Tensor], y: torch.Tensor) -> Accuracy:
    """Cosine-similarity accuracy (setting d). One head: it serves both tasks. Two heads: a
    class's joint score is the max over both heads' similarities; task k uses head k."""
    sims = [F.normalize(h, dim=1) @ class_embeddings().T for h in heads]
    joint = (torch.stack(sims).amax(0).argmax(1) == y).float().mean().item()
    per_task = []
    for k, classes in enumerate(TASK_CLASSES):
        keep = torch.isin(y, torch.tensor(classes))
        scores = sims[min(k, len(sims) - 1)][keep][:, list(classes)]
        per_task.append((torch.tensor(classes)[scores.argmax(1)] == y[keep]).float().mean().item())
    return Accuracy(joint, *per_task)


def single_head_accuracy(logits: torch.Tensor, task: int, y: torch.Tensor) -> Accuracy:
    """One cross-entropy model alone: joint = argmax over its own 5 classes on all test samples;
    its own task measured; the other task CHANCE by definition (it has no outputs there)."""
    classes = torch.tensor(TASK_CLASSES[task])
    pred = classes[logits.argmax(1)]
    keep = torch.isin(y, classes)
    own = (pred[keep] == y[keep]).float().mean().item()
    joint = (pred == y).float().mean().item()
    return Accuracy(joint, own, CHANCE) if task == 0 else Accuracy(joint, CHANCE, own)


@torch.no_grad()
def accuracy_of(setting: Setting, model: nn.Module | Sequence[nn.Module], x: torch.Tensor,
                y: torch.Tensor, *, single_task: int | None = None) -> Accuracy:
    """Accuracy of a merged model, of an ensemble (a list of models) or of one original model
    (`single_task` = its task index)."""
    if isinstance(model, (list, tuple)):
        heads = [m(x) for m in model]
    else:
        heads = as_heads(model(x))
    if setting.embedding:
        return embedding_accuracy(heads, y)
    if single_task is not None:
        return single_head_accuracy(heads[0], single_task, y)
    return evaluate_heads(tuple(heads), y)  # = fxzip.demo.digits.evaluate on the model or the pair


# -- one pair -------------------------------------------------------------------------------------
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

            tick = time.perf_counter()
            default_merge(zipper, stop)  # statistics are cached by now: the merge's own cost
            t_default = time.perf_counter() - tick
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


def reference_rows(setting: Setting, pair: int, models: list[nn.Module], data: TaskData,
                   layers_total: int) -> list[Row]:
    """Model A, model B and their ensemble, each with BatchNorm statistics reset."""
    x, y = data.split.x_test, data.split.y_test
    reset = [fxzip.reset_bn(copy.deepcopy(m), data.calibration, progress=False) for m in models]
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


def merged_rows(setting: Setting, pair: int, zipper: fxzip.Zipper, data: TaskData,
                choices: dict[str, Choice]) -> list[Row]:
    """Every method at every stop point (zipit with the chosen alpha/beta)."""
    x, y = data.split.x_test, data.split.y_test
    rows = []
    for stop in setting.stops:
        merged = default_merge(zipper, stop)  # the row "default": fxzip.merge's defaults
        report = merged.fxzip_report
        rows.append(Row(pair, "default", stop.label, f"{report.layers_zipped}/{report.layers_total}",
                        count_parameters(merged), count_flops(merged, x),
                        accuracy_of(setting, merged, x, y), 0.5, 1.0, "default"))
        for method in METHOD_NAMES:
            chosen = choices[stop.label] if method == "zipit" else None
            alpha, beta = (chosen.alpha, chosen.beta) if chosen else (None, None)
            merged = merge(zipper, stop, method, **({"alpha": alpha, "beta": beta} if chosen else {}))
            report = merged.fxzip_report
            rows.append(Row(pair, method, stop.label,
                            f"{report.layers_zipped}/{report.layers_total}",
                            count_parameters(merged), count_flops(merged, x),
                            accuracy_of(setting, merged, x, y), alpha, beta))
    return rows


# -- one setting ----------------------------------------------------------------------------------
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


def train_and_check(setting: Setting, data: TaskData, pair: int, epochs: int,
                    log: Callable[[str], None]) -> tuple[list[nn.Module], tuple[float, float]]:
    """Train one pair and measure each model's own-task test accuracy (before any BN reset)."""
    tick = time.perf_counter()
    models = train_pair(setting, data, seed=pair, epochs=epochs)
    x, y = data.split.x_test, data.split.y_test
    own = [accuracy_of(setting, m, x, y, single_task=k) for k, m in enumerate(models)]
    log(f"  [{setting.key}] pair {pair}: trained in {time.perf_counter() - tick:.1f}s, task "
        f"accuracy A {own[0].task_a:.3f} B {own[1].task_b:.3f}")
    return models, (own[0].task_a, own[1].task_b)


def format_choices(choices: dict[str, Choice]) -> str:
    return ", ".join(f"{k}: a={c.alpha} b={c.beta} (val joint {c.val.joint:.3f})"
                     for k, c in choices.items())


def run_setting(setting: Setting, *, pairs: int, epochs: int, grid: Grid,
                log: Callable[[str], None], auto: bool = True) -> SettingResult:
    """Train `pairs` pairs, grid-search on pair 0, evaluate pairs 1..pairs-1."""
    seconds = {"data": 0.0, "train": 0.0, "grid": 0.0, "evaluate": 0.0}
    if auto:
        seconds["auto"] = 0.0
    start = time.perf_counter()
    data = setting.load()
    seconds["data"] = time.perf_counter() - start
    result = SettingResult(setting, [], {}, [], seconds, epochs, pairs)
    for pair in range(pairs):
        tick = time.perf_counter()
        models, own = train_and_check(setting, data, pair, epochs, log)
        result.single_acc.append(own)
        seconds["train"] += time.perf_counter() - tick
        tick = time.perf_counter()
        zipper = fxzip.Zipper(models, data.calibration, progress=False)
        if pair == 0:
            result.choices = grid_search(setting, zipper, data, grid,
                                         result.study if auto else None)
            seconds["grid"] += time.perf_counter() - tick
            log(f"  [{setting.key}] held-out choices: {format_choices(result.choices)}")
            continue
        layers_total = len(zipper.analysis.all_layers)
        result.rows += reference_rows(setting, pair, models, data, layers_total)
        merged = merged_rows(setting, pair, zipper, data, result.choices)
        seconds["evaluate"] += time.perf_counter() - tick
        if auto:
            tick = time.perf_counter()
            merged += auto_rows(setting, pair, zipper, data, result.study, result.merge_seconds)
            seconds["auto"] += time.perf_counter() - tick
        stops = {stop.label: i for i, stop in enumerate(setting.stops)}
        first = {"default": 0, "auto": 1}  # per stop point: default, auto, then the paper's methods
        result.rows += sorted(merged, key=lambda r: (stops[r.stop], first.get(r.method, 2)))
    seconds["total"] = time.perf_counter() - start
    return result


# -- reporting ------------------------------------------------------------------------------------
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


METRICS = ("joint", "task_a", "task_b", "avg")


def metric(acc: Accuracy, name: str) -> float:
    return acc.avg if name == "avg" else getattr(acc, name)


def summarise(rows: Sequence[Row]) -> list[Summary]:
    """Group rows by (method, stop) in order of appearance; mean and sample std (ddof=1)."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.method, r.stop), []).append(r)
    out = []
    for (method, stop), group in groups.items():
        values = {m: np.array([metric(r.acc, m) for r in group]) for m in METRICS}
        out.append(Summary(method, stop, group[0].zipped, group[0].params, group[0].flops,
                           {m: float(v.mean()) for m, v in values.items()},
                           {m: float(v.std(ddof=1)) if len(v) > 1 else 0.0
                            for m, v in values.items()}))
    return out


CHANCE_CELLS = {("model A", "task_b"), ("model B", "task_a")}


def cell(setting: Setting, s: Summary, name: str) -> str:
    """One table cell in %: mean ± std; chance-by-definition cells of the cross-entropy settings'
    single models are marked, and so is the avg that includes them (*)."""
    single = not setting.embedding and s.method in ("model A", "model B")
    if single and (s.method, name) in CHANCE_CELLS:
        return f"{100 * s.mean[name]:.1f} (chance)"
    text = f"{100 * s.mean[name]:.1f} ± {100 * s.std[name]:.1f}"
    return text + (" *" if single and name == "avg" else "")


def markdown(result: SettingResult) -> str:
    """The mean ± std table with the protocol's details."""
    setting = result.setting
    summaries = summarise(result.rows)
    n_eval = result.pairs - 1
    lines = [f"## Setting ({setting.key}): {setting.title}", "",
             f"{n_eval} evaluation pairs (seeds 1..{n_eval}) + held-out pair (seed 0); "
             f"{result.epochs} training epochs; accuracies in % on the test data, "
             f"mean ± sample std over the evaluation pairs. BatchNorm statistics reset on the "
             f"calibration data (training inputs of both tasks) for every row.", "",
             tables.markdown_table(["method", "stop", "zipped", "params", "FLOPs", "joint",
                                    "task A", "task B", "avg"],
                                   ([s.method, s.stop, s.zipped, f"{s.params:,}",
                                     f"{s.flops / 1e6:.2f}M", *(cell(setting, s, m) for m in METRICS)]
                                    for s in summaries),
                                   right=range(3, 9)),
             ""]
    if setting.embedding:
        lines.append("Scores are cosine similarities to the 10 fixed class embeddings; split heads and "
                     "the ensemble take the max over both heads' similarities; 'ensemble (mean emb)' "
                     "scores the mean of the two normalised embeddings; model A/B and the 'shared' "
                     "merge (ONE output: the output layer averaged) use their single embedding for "
                     "both tasks.")
    else:
        lines.append("Model A/B alone: joint = argmax over its own 5 classes counted on all 10 classes; "
                     "the other task is chance level (0.2) by definition (no outputs for those "
                     "classes); * avg includes that chance value.")
    if setting.note:
        lines.append(setting.note)
    lines.append("")
    lines.append("zipit (alpha, beta) chosen per stop point on the held-out pair's validation "
                 "joint accuracy (20% of the training data, not trained on): " + ", ".join(
                     f"{k}: ({c.alpha}, {c.beta}) val joint {100 * c.val.joint:.1f}"
                     for k, c in result.choices.items()) + ".")
    own = np.array(result.single_acc)
    lines.append(f"Original models' own-task test accuracy (all {result.pairs} pairs, before BN reset): "
                 f"A {100 * own[:, 0].mean():.1f} (min {100 * own[:, 0].min():.1f}), "
                 f"B {100 * own[:, 1].mean():.1f} (min {100 * own[:, 1].min():.1f}).")
    lines.append("Run time: " + ", ".join(f"{k} {v:.0f}s" for k, v in result.seconds.items()) + ".")
    if result.study:
        lines += ["", study_markdown(result)]
    return "\n".join(lines) + "\n"


# -- fidelity study ---------------------------------------------------------------------------------
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


def _pm(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    v = np.asarray(values, dtype=float) * scale
    v = v[~np.isnan(v)]
    if not len(v):
        return "-"
    std = v.std(ddof=1) if len(v) > 1 else 0.0
    return f"{v.mean():.{digits}f} ± {std:.{digits}f}"


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
            rows.append([stop, _pm(rho_kl), _pm(rho_rel), _pm(rho_on), _pm(auto, 100, 1),
                         _pm(by_kl, 100, 1), _pm(by_rel, 100, 1),
                         _pm(by_val, 100, 1), _pm(oracle, 100, 1), _pm(delta, 100, 1),
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


def write_csv(result: SettingResult, path: Path) -> None:
    """One line per evaluation pair, method and stop point."""
    tables.write_csv(path, ["setting", "pair", "method", "stop", "zipped", "params", "flops",
                            "joint", "task_a", "task_b", "avg", "alpha", "beta", "corrections"],
                     ([result.setting.key, r.pair, r.method, r.stop, r.zipped, r.params, r.flops]
                      + [f"{metric(r.acc, m):.4f}" for m in METRICS]
                      + ["" if r.alpha is None else r.alpha, "" if r.beta is None else r.beta,
                         r.corrections]
                      for r in result.rows))


def plot(result: SettingResult, path: Path) -> None:
    """Joint accuracy vs FLOPs: one line per method through its stop points, the ensemble and
    the single models as reference markers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summaries = summarise(result.rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {"average": "tab:gray", "permute": "tab:blue", "zipit": "tab:red", "default": "tab:orange",
               "auto": "tab:brown"}
    for method, colour in colours.items():
        points = sorted((s for s in summaries if s.method == method), key=lambda s: s.flops)
        ax.errorbar([s.flops / 1e6 for s in points], [100 * s.mean["joint"] for s in points],
                    yerr=[100 * s.std["joint"] for s in points], marker="o", color=colour,
                    label=method, capsize=3)
        if method == "zipit":
            labels: dict[tuple[float, float], list[str]] = {}
            for s in points:  # stop points that coincide share one label
                labels.setdefault((s.flops / 1e6, round(100 * s.mean["joint"], 2)), []).append(s.stop)
            for xy, names in labels.items():
                ax.annotate("/".join(names), xy, fontsize=7, textcoords="offset points",
                            xytext=(4, 4))
    finish_plot(fig, ax, summaries, f"({result.setting.key}) {result.setting.title}", path)


REFERENCE_MARKERS = {"ensemble": ("*", "black"), "ensemble (mean emb)": ("P", "tab:purple"),
                     "model A": ("^", "tab:green"), "model B": ("v", "tab:olive")}


def finish_plot(fig: Any, ax: Any, summaries: Sequence[Summary], title: str, path: Path,
                legend: dict | None = None) -> None:
    """The rest of a joint-accuracy-vs-FLOPs plot (shared with benchmarks/width.py): the
    ensemble and the single models as reference markers, axes, title, legend; saved and closed."""
    import matplotlib.pyplot as plt

    for s in summaries:
        if s.method in REFERENCE_MARKERS:
            marker, colour = REFERENCE_MARKERS[s.method]
            ax.errorbar([s.flops / 1e6], [100 * s.mean["joint"]], yerr=[100 * s.std["joint"]],
                        marker=marker, markersize=11, color=colour, linestyle="none", label=s.method)
    ax.set_xlabel("FLOPs per sample (M)")
    ax.set_ylabel("joint accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(**(legend or dict(fontsize=8, loc="best")))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- command line ---------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="a,b,c,d", help="comma-separated subset of a,b,c,d,e")
    parser.add_argument("--pairs", type=int, default=None,
                        help="model pairs per setting INCLUDING the held-out pair 0 (default 5; "
                             "--quick: 3); at least 2")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs of every setting (default: per setting, 20-30; "
                             "--quick: 10)")
    parser.add_argument("--width", type=int, default=None,
                        help="ResNet-20 width multiplier of (a) and (d) (default 4, as in the paper; --quick: 1)")
    parser.add_argument("--quick", action="store_true",
                        help="2 evaluation pairs + 1 held-out, 10 epochs, a 3x2 grid, width 1")
    parser.add_argument("--no-auto", dest="auto", action="store_false",
                        help="leave out the 'auto' rows and the fidelity study (about half the time)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    args.pairs = args.pairs or (3 if args.quick else 5)
    args.width = args.width or (1 if args.quick else 4)
    if args.pairs < 2:
        parser.error("--pairs must be at least 2 (one held-out pair and one evaluation pair)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = make_settings(args.width)
    keys = [k.strip() for k in args.settings.split(",") if k.strip()]
    unknown = [k for k in keys if k not in settings]
    if unknown:
        print(f"unknown settings {unknown}; choose from {', '.join(settings)}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    grid = QUICK_GRID if args.quick else FULL_GRID
    start = time.perf_counter()
    for key in keys:
        setting = settings[key]
        epochs = args.epochs or (setting.quick_epochs if args.quick else setting.epochs)
        print(f"setting ({key}): {setting.title}; {args.pairs} pairs, {epochs} epochs", flush=True)
        result = run_setting(setting, pairs=args.pairs, epochs=epochs, grid=grid,
                             log=lambda line: print(line, flush=True), auto=args.auto)
        write_csv(result, args.out / f"accuracy_{key}.csv")
        if result.study:
            write_study_csv(result, args.out / f"accuracy_{key}_fidelity.csv")
        table = markdown(result)
        (args.out / f"accuracy_{key}.md").write_text(table)
        plot(result, args.out / f"accuracy_{key}.png")
        print(table, flush=True)
    print(f"all settings done in {time.perf_counter() - start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
