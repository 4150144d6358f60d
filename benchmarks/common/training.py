"""Training a setting's model pair (`benchmarks.common.settings`), a cache of trained pairs, and
BatchNorm-reset copies of the originals (the paper resets BN statistics for every row)."""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import fxzip
from fxzip.demo.digits import TASK_CLASSES, DigitsSplit, train_classifier, train_task_pair

from .data import TaskData
from .evaluation import accuracy_of
from .settings import TEMPERATURE, Setting, class_embeddings

Log = Callable[[str], None]


class CosineClassifier(nn.Module):
    """Training wrapper: cosine similarity of `body`'s embedding to fixed class embeddings, / T."""

    def __init__(self, body: nn.Module, anchors: torch.Tensor, temperature: float = TEMPERATURE):
        super().__init__()
        self.body = body
        self.register_buffer("anchors", F.normalize(anchors, dim=1))
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.body(x), dim=1) @ self.anchors.T / self.temperature


def train_embedding_pair(split: DigitsSplit, make_model: Callable[[], nn.Module],
                         anchors: torch.Tensor, *, seed: int, epochs: int) -> list[nn.Module]:
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


def train_and_check(setting: Setting, data: TaskData, pair: int, epochs: int,
                    log: Log) -> tuple[list[nn.Module], tuple[float, float]]:
    """Train one pair and measure each model's own-task test accuracy (before any BN reset)."""
    tick = time.perf_counter()
    models = train_pair(setting, data, seed=pair, epochs=epochs)
    x, y = data.split.x_test, data.split.y_test
    own = [accuracy_of(setting, m, x, y, single_task=k) for k, m in enumerate(models)]
    log(f"  [{setting.key}] pair {pair}: trained in {time.perf_counter() - tick:.1f}s, task "
        f"accuracy A {own[0].task_a:.3f} B {own[1].task_b:.3f}")
    return models, (own[0].task_a, own[1].task_b)


def cached_pair(setting: Setting, data: TaskData, seed: int, epochs: int, width: int,
                cache: Path | None, log: Log) -> list[nn.Module]:
    """The trained pair of one seed (`train_and_check`), its state dicts kept in `cache` as
    `<setting>_w<width>_e<epochs>_seed<seed>.pt` and loaded from there when present (`cache`
    None: always trained, nothing kept)."""
    path = None if cache is None else cache / f"{setting.key}_w{width}_e{epochs}_seed{seed}.pt"
    if path is not None and path.exists():
        states = torch.load(path)
        models = [setting.make_model() for _ in states]
        for model, state in zip(models, states):
            model.load_state_dict(state)
        log(f"  pair {seed}: loaded from {path}")
        return [m.eval() for m in models]
    models, _ = train_and_check(setting, data, seed, epochs, log)
    if path is not None:
        cache.mkdir(parents=True, exist_ok=True)
        torch.save([m.state_dict() for m in models], path)
    return models


def reset_copies(models: Sequence[nn.Module], batches) -> list[nn.Module]:
    """Copies of `models` with BatchNorm statistics re-estimated on `batches` (the originals are
    left as they are)."""
    return [fxzip.reset_bn(copy.deepcopy(m), batches, progress=False) for m in models]
