"""Calibration inputs: turn a tensor, a list of batches or a DataLoader into re-iterable batches.

A batch is one tensor `x` (the model's first input; `(x, y, ...)` tuples give `x`) or a dict of
keyword arguments for the model's `forward` (`{"input_ids": ..., "attention_mask": ...}`, also as
the first item of a tuple). The helpers below treat both alike: `call_model`, `leading`,
`selected`, `describe`, `batch_device`."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Union

import torch
from torch.utils.data import SequentialSampler

from .distributed import all_gather_objects, is_distributed
from ..errors import InputError

Batch = Union[torch.Tensor, dict]
_PLAIN = (type(None), bool, int, float, str)  # non-tensor values a dict batch may carry


def _first_tensor(batch: Any, position: int) -> Batch:
    """A batch is `x`, `{name: value}` or `(x, y, ...)`: return `x` (a tensor, or a dict of
    keyword arguments), checking its type."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise InputError(f"calibration batch {position} is an empty {type(batch).__name__}; "
                             "give tensors or (x, y) tuples")
        batch = batch[0]
    if isinstance(batch, dict):
        return _keyword_batch(batch, position)
    if not isinstance(batch, torch.Tensor):
        raise InputError(f"calibration batch {position} is a {type(batch).__name__}, not a tensor; "
                         "give a tensor batch, a dict of forward's keyword arguments, a list of "
                         "batches or a DataLoader yielding x or (x, y)")
    return batch


def _keyword_batch(batch: dict, position: int) -> dict:
    """A dict batch: forward's keyword arguments, at least one of them a tensor."""
    for key, value in batch.items():
        if not isinstance(key, str):
            raise InputError(f"calibration batch {position} is a dict with the key {key!r}; its "
                             "keys must be the names of the model's forward arguments")
        if not isinstance(value, (torch.Tensor, *_PLAIN)):
            raise InputError(f"calibration batch {position}'s {key!r} is a "
                             f"{type(value).__name__}; a dict batch holds tensors (or None, bools, "
                             "numbers, strings)")
    if not any(isinstance(v, torch.Tensor) for v in batch.values()):
        raise InputError(f"calibration batch {position} is a dict without tensors; give forward's "
                         "tensor inputs by name, e.g. {'input_ids': ..., 'attention_mask': ...}")
    return dict(batch)


def call_model(module: Any, batch: Batch) -> Any:
    """`module(x)`, or `module(**batch)` for a dict batch."""
    return module(**batch) if isinstance(batch, dict) else module(batch)


def batch_tensors(batch: Batch) -> list[torch.Tensor]:
    """The tensors of a batch (one, or a dict batch's in key order)."""
    if isinstance(batch, dict):
        return [v for v in batch.values() if isinstance(v, torch.Tensor)]
    return [batch]


def batch_device(batch: Batch) -> torch.device:
    return batch_tensors(batch)[0].device


def batch_size(batch: Batch) -> int:
    first = batch_tensors(batch)[0]
    return first.shape[0] if first.dim() else 0


def leading(batch: Batch, n: int) -> Batch:
    """The first n samples: every tensor whose leading axis is the batch axis is cut."""
    if not isinstance(batch, dict):
        return batch[:n]
    size = batch_size(batch)
    return {k: v[:n] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == size else v
            for k, v in batch.items()}


def selected(batch: Batch, mask: torch.Tensor) -> Batch:
    """The samples where `mask` (one bool per sample) is set, as `leading` cuts its first ones."""
    if not isinstance(batch, dict):
        return batch[mask.to(batch.device)]
    size = batch_size(batch)
    return {k: v[mask.to(v.device)] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == size
            else v for k, v in batch.items()}


def to_device(batch: Batch, device: torch.device | None) -> Batch:
    if device is None:
        return batch
    if isinstance(batch, dict):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch.to(device)


def describe(batch: Batch) -> str:
    """'shape (2, 3, 32, 32)', or each keyword's shape (or value) for a dict batch."""
    if not isinstance(batch, dict):
        return f"shape {tuple(batch.shape)}"
    parts = [f"{k}: {tuple(v.shape)}" if isinstance(v, torch.Tensor) else f"{k}={v!r}"
             for k, v in batch.items()]
    return "shapes {" + ", ".join(parts) + "}"


def batch_spec(batch: Batch) -> Any:
    """What every batch shares with the first one: shapes but the first axis, dtypes, a dict's
    keys and non-tensor values. Picklable (ranks compare theirs)."""
    def one(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return ("tensor", tuple(v.shape[1:]), str(v.dtype))
        return ("value", v)
    if isinstance(batch, dict):
        return tuple(sorted((k, one(v)) for k, v in batch.items()))
    return one(batch)


def _dtypes(batch: Batch) -> str:
    return ", ".join(sorted({str(t.dtype) for t in batch_tensors(batch)}))


def _layout(batch: Batch) -> Any:
    """Shapes (all axes), dtypes and a dict's other values, picklable: `_zeros` rebuilds it."""
    if isinstance(batch, dict):
        return {k: _layout(v) if isinstance(v, torch.Tensor) else ("value", v)
                for k, v in batch.items()}
    return ("tensor", tuple(batch.shape), str(batch.dtype))


def _zeros(layout: Any, device: torch.device | None) -> Batch:
    """A batch of zeros of a `_layout` (an empty rank's example, for tracing)."""
    if isinstance(layout, dict):
        return {k: _zeros(v, device) if v[0] == "tensor" else v[1] for k, v in layout.items()}
    _, shape, dtype = layout
    return torch.zeros(shape, dtype=getattr(torch, dtype.removeprefix("torch.")), device=device)


class Batches:
    """Re-iterable calibration batches (tensors or dicts of keyword tensors), moved to one device
    on the way out.

    One-shot iterators (generators) are materialised once so that the statistics pass and the
    BatchNorm reset can both read them. With `allow_empty` (a rank's shard, see `shard_batches`)
    empty inputs give `example` None.
    """

    def __init__(self, inputs: Any, device: torch.device | None = None, *,
                 allow_empty: bool = False):
        if inputs is None:
            raise InputError("no calibration inputs given: pass a tensor batch, a list of batches "
                             "or a DataLoader")
        if isinstance(inputs, (torch.Tensor, dict)):
            source: Iterable = [inputs]
        elif isinstance(inputs, (list, tuple)):
            source = list(inputs)
        elif isinstance(inputs, Iterable):
            source = list(inputs) if iter(inputs) is inputs else inputs
        else:
            raise InputError(f"calibration inputs of type {type(inputs).__name__} are not iterable; "
                             "pass a tensor batch, a list of batches or a DataLoader")
        self._source = source
        self.device = device
        first = next(iter(self), None)
        if first is None and allow_empty:
            self.example = None
            return
        if first is None:
            raise InputError("the calibration inputs are empty: give at least one batch")
        if any(t.dim() == 0 or t.shape[0] == 0 for t in batch_tensors(first)[:1]):
            raise InputError(f"the first calibration batch has {describe(first)}: "
                             "batches need a non-empty leading batch axis")
        self.example = first

    @property
    def same_each_read(self) -> bool:
        """Whether every read gives the same batches in the same order: a list (as tensors,
        lists and one-shot iterators are kept), or a DataLoader over a sequential sampler; a
        shuffling loader or another iterable may not (a statistics pass then never resumes from
        values an earlier pass saved for another batch)."""
        if isinstance(self._source, list):
            return True
        sampler = getattr(self._source, "sampler", None)
        return isinstance(sampler, SequentialSampler)

    def __iter__(self) -> Iterator[Batch]:
        for position, batch in enumerate(self._source):
            yield to_device(_first_tensor(batch, position), self.device)

    def __len__(self) -> int:
        try:
            return len(self._source)  # type: ignore[arg-type]
        except TypeError:
            return sum(1 for _ in self._source)

    @property
    def example_device(self) -> torch.device:
        return batch_device(self.example)

    def check_shape(self, x: Batch, position: int) -> None:
        """Every batch must match the example batch apart from the batch size."""
        if batch_spec(x) != batch_spec(self.example):
            raise InputError(
                f"calibration batch {position} has {describe(x)} ({_dtypes(x)}) but the first "
                f"batch has {describe(self.example)} ({_dtypes(self.example)}); all batches must "
                "share every axis but the first (and a dict batch its keys)")


def shard_batches(inputs: Any, device: torch.device | None, group: Any = None) -> Batches:
    """`Batches(inputs, device)`; under torch.distributed, this rank's shard: every rank checks its
    own inputs and all ranks raise the same InputError if any shard is bad, so that no rank waits
    for another in a collective. A rank may have no batches if another has: its example (for
    tracing) is then a batch of zeros shaped like the first non-empty rank's example."""
    if not is_distributed():
        return Batches(inputs, device)
    try:
        batches, problem = Batches(inputs, device, allow_empty=True), None
    except InputError as exc:
        batches, problem = None, str(exc)
    example = None if batches is None else batches.example
    mine = (problem, None if example is None else (describe(example), batch_spec(example),
                                                   _layout(example)))
    shards = all_gather_objects(mine, group)
    for r, (message, _) in enumerate(shards):
        if message is not None:
            raise InputError(f"rank {r}'s calibration inputs: {message}")
    found = [(r, info) for r, (_, info) in enumerate(shards) if info is not None]
    if not found:
        raise InputError("the calibration inputs of every rank are empty: give at least one batch")
    r0, (shape, spec, layout) = found[0]
    for r, (other, other_spec, _) in found[1:]:
        if other_spec != spec:
            raise InputError(f"rank {r}'s first calibration batch has {other} but rank {r0}'s has "
                             f"{shape}; all batches must share every axis but the first (and "
                             "their dtypes)")
    if example is None:
        batches.example = _zeros(layout, device)
    return batches
