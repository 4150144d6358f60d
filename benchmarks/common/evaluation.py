"""Accuracy of a merged model, an ensemble or one original model on a setting's two tasks
(fractions; `fxzip.demo.digits.Accuracy`: joint, task A, task B).

- split heads: joint = argmax over both heads' softmaxes over all 10 classes; task A/B = each head
  on its own classes' test samples (`fxzip.demo.digits.evaluate_heads`);
- one cross-entropy model alone: joint = argmax over its own 5 classes counted on all 10 classes'
  samples; its own task measured; the other task CHANCE (0.2) by definition;
- embedding settings: class scores are cosine similarities to the fixed class embeddings; with
  two heads a class's joint score is the max over both heads, task k uses head k; one head (a
  single model or a shared-output merge) serves both tasks.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxzip.demo.digits import TASK_CLASSES, Accuracy, evaluate_heads

from .settings import Setting, class_embeddings

CHANCE = 0.2


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
