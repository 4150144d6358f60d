"""Calibration inputs for a data-free merge, synthesised from the models themselves.

`fxzip.merge(a, b, None, example_inputs=x)` reads no real sample: `x` gives only the input's shapes
and dtypes (its values are never used). Where the merge needs activations (the BatchNorm reset, the
corrections, an activation matching), it reads `SyntheticBatches` instead: each batch starts as
Gaussian noise and is optimised so that every BatchNorm of one model sees its own running
statistics (the batch-norm statistics loss of data-free distillation, DeepInversion: Yin et al.
2020: those statistics are all a trained model keeps of its data) and, for a classifier, so that
the model gives each input a random class of its own confidently (DeepInversion's class term: the
one signal a model without BatchNorms gives). Batch i is matched to model i mod N, so the batches
stand for every model's data as real calibration data from every task would; a model with neither
gets its noise as is. Integer inputs (token ids, masks) are drawn uniformly from the example's
value range.

Each batch has its own seed (`Synthesis.seed` + its index): the same batches whatever the number of
ranks (under torch.distributed rank r synthesises the batches i ≡ r mod world size) and however
often they are read (they are made once, on first use, and kept)."""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import InputError
from .distributed import is_distributed, rank, world_size
from .inputs import Batch, Batches, batch_tensors, call_model, shard_batches

__all__ = ["Synthesis", "SyntheticBatches", "calibration_batches", "resolve_synthesis",
           "synthesize_batch"]

_BN = nn.modules.batchnorm._BatchNorm


@dataclass(frozen=True)
class Synthesis:
    """How a data-free merge (`inputs=None`) makes its calibration inputs.

    samples: how many inputs in all (in batches of `batch_size`); steps: Adam steps per batch
    (0: plain noise); lr: Adam's learning rate on the inputs; prior: the weight of the inputs'
    mean square in the loss (keeps them near the noise's scale where nothing else pins a
    direction); class_loss: the weight of a cross-entropy of a classifier's output (a tensor of
    N × classes, or an output's `.logits`) toward a random class per input, so that the model
    classifies the inputs as confidently as its data (DeepInversion's class term; 0: off; the
    one signal a model without BatchNorms gives); seed: the first batch's seed."""

    samples: int = 256
    batch_size: int = 64
    steps: int = 20
    lr: float = 0.1
    prior: float = 1e-3
    class_loss: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("samples", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"Synthesis.{name} must be a positive integer, got {value!r}")
        for name in ("steps", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InputError(f"Synthesis.{name} must be an integer ≥ 0, got {value!r}")
        for name in ("lr", "prior", "class_loss"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                raise InputError(f"Synthesis.{name} must be a finite number "
                                 f"{'> 0' if name == 'lr' else '≥ 0'}, got {value!r}")

    @property
    def batches(self) -> int:
        return -(-self.samples // self.batch_size)

    def size_of(self, index: int) -> int:
        """The number of inputs in batch `index` (the last one may be smaller)."""
        return min(self.batch_size, self.samples - index * self.batch_size)


def resolve_synthesis(value: Any) -> Synthesis:
    """The Synthesis a `synthesis=` value means: "default" → `Synthesis()`, a Synthesis as is, a
    mapping of its fields (as recipes give them); InputError otherwise."""
    if isinstance(value, str) and value == "default":
        return Synthesis()
    if isinstance(value, Synthesis):
        return value
    if isinstance(value, dict):
        names = [f.name for f in fields(Synthesis)]
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise InputError(f"synthesis: unknown field(s) {', '.join(map(repr, unknown))}; "
                             f"allowed: {', '.join(names)}")
        return Synthesis(**value)
    raise InputError(f"synthesis={value!r} is not allowed: pass \"default\", a mapping of "
                     "fxzip.Synthesis' fields or an fxzip.Synthesis(...)")


def calibration_batches(models: Sequence[nn.Module], inputs: Any, example_inputs: Any,
                        synthesis: Synthesis, device: torch.device | None,
                        group: Any = None, *, progress: bool = True) -> Batches:
    """The batches a merge reads: `inputs` (this rank's shard), or with `inputs=None` the
    `SyntheticBatches` of a data-free merge shaped like `example_inputs`."""
    if inputs is not None:
        if example_inputs is not None:
            raise InputError("give calibration inputs or, for a data-free merge, inputs=None and "
                             "example_inputs (a batch that gives only the input shapes), not both")
        return shard_batches(inputs, device, group)
    if example_inputs is None:
        raise InputError("no calibration inputs given: pass a tensor batch, a list of batches or "
                         "a DataLoader; or, for a merge that reads no data, inputs=None and "
                         "example_inputs=<one batch giving the input shapes and dtypes>")
    return SyntheticBatches(models, example_inputs, synthesis, device, group, progress=progress)


class SyntheticBatches(Batches):
    """A data-free merge's calibration batches (see the module docstring): `example` (the user's
    shapes) for tracing; iterating synthesises this rank's batches once, on first use."""

    def __init__(self, models: Sequence[nn.Module], example_inputs: Any, synthesis: Synthesis,
                 device: torch.device | None, group: Any = None, *, progress: bool = True):
        self.example = Batches(example_inputs, device).example  # checked as calibration data is
        self.device = device
        self.synthesis = synthesis
        self._models = list(models)
        ranks = world_size(group) if is_distributed() else 1
        mine = rank(group) if is_distributed() else 0
        self.indices = list(range(mine, synthesis.batches, ranks))
        self._made: list[Batch] | None = None
        self.progress = progress
        self.report: dict[str, Any] = {"source": "synthesized", "samples": synthesis.samples,
                                       "batches": synthesis.batches, "steps": synthesis.steps}

    @property
    def synthesized(self) -> bool:
        """Whether the batches were made (False: nothing needed activations)."""
        return self._made is not None

    def synthesize(self) -> None:
        """Make this rank's batches now (else on first read)."""
        if self._made is None:
            self._made = self._synthesize()

    @property
    def same_each_read(self) -> bool:
        """Synthesised once, read as made."""
        return True

    def __iter__(self) -> Iterator[Batch]:
        self.synthesize()
        yield from self._made

    def __len__(self) -> int:
        return len(self.indices)

    def _synthesize(self) -> list[Batch]:
        matched = [len(batch_norms(m)) > 0 for m in self._models]
        self.report["models_matched"] = sum(matched)
        total = len(self.indices) * self.synthesis.steps
        made = []
        with tqdm(total=total, desc="fxzip synthesis", unit="step",
                  disable=not self.progress or total == 0, leave=False) as bar:
            for index in self.indices:
                model = self._models[index % len(self._models)]
                made.append(synthesize_batch(model, self.example, self.synthesis, index, bar))
        return made


def batch_norms(model: nn.Module) -> list[nn.Module]:
    """The BatchNorms of `model` that keep running statistics (the targets of the synthesis)."""
    return [m for m in model.modules()
            if isinstance(m, _BN) and m.track_running_stats and m.running_mean is not None]


def synthesize_batch(model: nn.Module, example: Batch, synthesis: Synthesis, index: int,
                     bar: Any = None) -> Batch:
    """Batch `index` of a data-free merge: noise shaped like `example` (batch axis
    `synthesis.size_of(index)`), its floating tensors optimised (Adam, `synthesis.steps`) so that
    every BatchNorm of `model` sees inputs with its running mean and variance and, for a
    classifier, that the model gives each input a random class of its own confidently. `model` is
    not changed (its train/eval flags are restored; no parameter gradient is kept)."""
    generator = torch.Generator().manual_seed(synthesis.seed + index)
    size = synthesis.size_of(index)
    batch = _noise(example, size, generator)
    free = [t for t in batch_tensors(batch) if t.is_floating_point()]
    norms = batch_norms(model)
    if not free or synthesis.steps == 0:
        return batch
    seen: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0]
        dims = [0, *range(2, x.dim())]
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        seen.append(torch.linalg.vector_norm(mean - module.running_mean)
                    + torch.linalg.vector_norm(var - module.running_var))

    with _eval_mode(model), torch.enable_grad():
        with torch.no_grad():
            logits = _logits(call_model(model, batch)) if synthesis.class_loss else None
        targets = None if logits is None else \
            torch.randint(logits.shape[1], (size,), generator=generator).to(logits.device)
        if not norms and targets is None:
            return batch  # nothing to match: noise
        for t in free:
            t.requires_grad_(True)
        optimizer = torch.optim.Adam(free, lr=synthesis.lr)
        hooks = [m.register_forward_pre_hook(hook) for m in norms]
        try:
            for _ in range(synthesis.steps):
                seen.clear()
                output = call_model(model, batch)
                loss = torch.stack(seen).sum() / len(norms) if norms else 0.0
                if targets is not None:
                    loss = loss + synthesis.class_loss * F.cross_entropy(
                        _logits(output).float(), targets)
                if synthesis.prior:
                    loss = loss + synthesis.prior * sum(t.square().mean() for t in free)
                grads = torch.autograd.grad(loss, free)
                for t, g in zip(free, grads):
                    t.grad = g
                optimizer.step()
                if bar is not None:
                    bar.update(1)
        finally:
            for h in hooks:
                h.remove()
    for t in free:
        t.requires_grad_(False)
        t.grad = None
    return batch


def _logits(output: Any) -> torch.Tensor | None:
    """A classifier's scores: the output if it is an N × classes float tensor, else its
    `.logits` if that is one; None otherwise (no class term)."""
    scores = getattr(output, "logits", output)
    if isinstance(scores, torch.Tensor) and scores.dim() == 2 and scores.shape[1] > 1 \
            and scores.is_floating_point():
        return scores
    return None


def _noise(example: Batch, size: int, generator: torch.Generator) -> Batch:
    def one(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        shape = (size, *t.shape[1:])
        if t.is_floating_point():
            return torch.randn(shape, generator=generator, dtype=torch.float32).to(t.device,
                                                                                   t.dtype)
        if t.dtype == torch.bool:
            return t[:1].expand(shape).clone() if bool(t.all()) or not bool(t.any()) else \
                torch.randint(0, 2, shape, generator=generator).bool().to(t.device)
        low, high = int(t.min()), int(t.max())
        return torch.randint(low, high + 1, shape, generator=generator).to(t.device, t.dtype)
    if isinstance(example, dict):
        return {k: one(v) for k, v in example.items()}
    return one(example)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """`model` in eval mode (BatchNorms normalise by their running statistics), every module's
    train flag restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag
