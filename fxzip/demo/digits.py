"""Offline real data for demos and tests: scikit-learn's handwritten digits split into two
disjoint tasks (classes 0–4 and 5–9), small CNNs trained on the CPU in seconds, and the paper's
joint/per-task accuracies.

scikit-learn (the data) and matplotlib (the demo's plot) are not dependencies of the library:
they come with the `demo` extra, `pip install "fxzip[demo]"`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

TASK_CLASSES = (tuple(range(5)), tuple(range(5, 10)))
DEMO_INSTALL = 'pip install "fxzip[demo]"'
DEMO_PACKAGES = {"sklearn": "scikit-learn", "matplotlib": "matplotlib"}  # module: distribution


def require_demo_extra(modules: tuple[str, ...] = tuple(DEMO_PACKAGES)) -> None:
    """Raise ImportError, naming the `demo` extra, if any of the demo's extra dependencies
    (`modules`, default all: scikit-learn and matplotlib) cannot be imported."""
    missing = []
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(DEMO_PACKAGES[module])
    if missing:
        raise ImportError(f"the digits demo needs {' and '.join(missing)}, which the core "
                          f"install leaves out: {DEMO_INSTALL}")


@dataclass
class DigitsSplit:
    """Train/test tensors of the digits (N, 1, 8, 8), scaled to zero mean and unit variance."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def task(self, classes: tuple[int, ...], train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples of `classes`, labels renumbered 0..len(classes)-1."""
        x, y = (self.x_train, self.y_train) if train else (self.x_test, self.y_test)
        keep = torch.isin(y, torch.tensor(classes))
        lookup = torch.full((10,), -1, dtype=torch.long)
        lookup[list(classes)] = torch.arange(len(classes))
        return x[keep], lookup[y[keep]]


def load_digits_split(test_fraction: float = 0.3, seed: int = 0) -> DigitsSplit:
    """The 1,797 digits of scikit-learn (shipped inside the package), split per seed."""
    require_demo_extra(("sklearn",))
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n_test = int(len(y) * test_fraction)
    mean, std = x[n_test:].mean(), x[n_test:].std()
    x = (x - mean) / std
    return DigitsSplit(x[n_test:], y[n_test:], x[:n_test], y[:n_test])


class DigitsCNN(nn.Module):
    """A small VGG-style CNN for 8×8 digits: three conv-BN-ReLU stages, global pool, linear head."""

    def __init__(self, width: int = 16, num_classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.pool(F.relu(self.bn2(self.conv2(x))))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 30,
                     batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
                     progress: str | None = None) -> nn.Module:
    """Plain Adam + cross-entropy training on the CPU; returns the model in eval mode.
    `progress`: a label for a tqdm bar over the epochs (None: silent)."""
    from tqdm.auto import trange

    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    for _ in trange(epochs, desc=progress, unit="epoch", disable=progress is None, leave=False):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), batch_size):
            batch = order[start:start + batch_size]
            optimiser.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimiser.step()
    return model.eval()


def train_task_pair(split: DigitsSplit, make_model, *, seed: int = 0, epochs: int = 30,
                    progress: bool = False, lr: float = 3e-3) -> list[nn.Module]:
    """Two models of one architecture, different initialisations, trained on the two tasks."""
    models = []
    for k, classes in enumerate(TASK_CLASSES):
        torch.manual_seed(seed * 100 + k)
        x, y = split.task(classes)
        label = f"training model {'AB'[k]} (classes {classes[0]}-{classes[-1]})" if progress else None
        models.append(train_classifier(make_model(), x, y, epochs=epochs, seed=seed * 100 + k,
                                       progress=label, lr=lr))
    return models


@dataclass
class Accuracy:
    joint: float
    task_a: float
    task_b: float

    @property
    def avg(self) -> float:
        return (self.task_a + self.task_b) / 2


def evaluate_heads(outputs: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor) -> Accuracy:
    """Joint accuracy: argmax over the concatenated per-head softmaxes over all 10 classes;
    task accuracy: each head on its own classes."""
    probs = torch.cat([o.softmax(-1) for o in outputs], dim=-1)
    classes = torch.tensor([c for task in TASK_CLASSES for c in task])
    joint = (classes[probs.argmax(-1)] == y).float().mean().item()
    per_task = []
    for k, task in enumerate(TASK_CLASSES):
        keep = torch.isin(y, torch.tensor(task))
        pred = torch.tensor(task)[outputs[k][keep].argmax(-1)]
        per_task.append((pred == y[keep]).float().mean().item())
    return Accuracy(joint, *per_task)


def evaluate(model_or_pair, x: torch.Tensor, y: torch.Tensor) -> Accuracy:
    """Accuracy of a merged model (returning one output per task) or of a pair of models (the
    ensemble)."""
    with torch.no_grad():
        if isinstance(model_or_pair, (list, tuple)):
            outputs = tuple(m(x) for m in model_or_pair)
        else:
            outputs = tuple(model_or_pair(x))
    return evaluate_heads(outputs, y)


def seeded(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN plus an identity or 1×1 projection shortcut."""

    def __init__(self, width_in: int, width: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(width_in, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.shortcut = nn.Identity()
        if stride != 1 or width_in != width:
            self.shortcut = nn.Sequential(nn.Conv2d(width_in, width, 1, stride, bias=False),
                                          nn.BatchNorm2d(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet20(nn.Module):
    """The paper's CIFAR ResNet-20 (3 stages of 3 basic blocks), `width`× wider, for small
    images: stages of 16·w, 32·w, 64·w channels, global pooling, one linear head."""

    def __init__(self, width: int = 4, num_classes: int = 5, in_channels: int = 1,
                 blocks_per_stage: int = 3):
        super().__init__()
        widths = [16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, width_in = [], widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                blocks.append(BasicBlock(width_in, w, stride=2 if (i > 0 and j == 0) else 1))
                width_in = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
