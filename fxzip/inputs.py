"""Calibration inputs: turn a tensor, a list of batches or a DataLoader into re-iterable batches."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from .distributed import all_gather_objects, is_distributed
from .errors import InputError


def _first_tensor(batch: Any, position: int) -> torch.Tensor:
    """A batch is `x` or `(x, y, ...)`: return `x`, checking it is a tensor."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise InputError(f"calibration batch {position} is an empty {type(batch).__name__}; "
                             "give tensors or (x, y) tuples")
        batch = batch[0]
    if isinstance(batch, dict):
        raise InputError(f"calibration batch {position} is a dict; fxzip feeds one tensor `x` to the "
                         "models: give tensors or (x, y, ...) tuples")
    if not isinstance(batch, torch.Tensor):
        raise InputError(f"calibration batch {position} is a {type(batch).__name__}, not a tensor; "
                         "give a tensor batch, a list of batches or a DataLoader yielding x or (x, y)")
    return batch


class Batches:
    """Re-iterable calibration batches (tensors only), moved to one device on the way out.

    One-shot iterators (generators) are materialised once so that the statistics pass and the
    BatchNorm reset can both read them. With `allow_empty` (a rank's shard, see `shard_batches`)
    empty inputs give `example` None.
    """

    def __init__(self, inputs: Any, device: torch.device | None = None, *,
                 allow_empty: bool = False):
        if inputs is None:
            raise InputError("no calibration inputs given: pass a tensor batch, a list of batches "
                             "or a DataLoader")
        if isinstance(inputs, torch.Tensor):
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
        if first.dim() == 0 or first.shape[0] == 0:
            raise InputError(f"the first calibration batch has shape {tuple(first.shape)}: "
                             "batches need a non-empty leading batch axis")
        self.example = first

    def __iter__(self) -> Iterator[torch.Tensor]:
        for position, batch in enumerate(self._source):
            x = _first_tensor(batch, position)
            yield x.to(self.device) if self.device is not None else x

    def __len__(self) -> int:
        try:
            return len(self._source)  # type: ignore[arg-type]
        except TypeError:
            return sum(1 for _ in self._source)

    def check_shape(self, x: torch.Tensor, position: int) -> None:
        """Every batch must match the example batch apart from the batch size."""
        if x.shape[1:] != self.example.shape[1:] or x.dtype != self.example.dtype:
            raise InputError(
                f"calibration batch {position} has shape {tuple(x.shape)} ({x.dtype}) but the first "
                f"batch has {tuple(self.example.shape)} ({self.example.dtype}); all batches must share "
                "every axis but the first")


def shard_batches(inputs: Any, device: torch.device | None, group: Any = None) -> Batches:
    """`Batches(inputs, device)`; under torch.distributed, this rank's shard: every rank checks its
    own inputs and all ranks raise the same InputError if any shard is bad, so that no rank waits
    for another in a collective. A rank may have no batches if another has: its example (for
    tracing) is then a zero tensor shaped like the first non-empty rank's example."""
    if not is_distributed():
        return Batches(inputs, device)
    try:
        batches, problem = Batches(inputs, device, allow_empty=True), None
    except InputError as exc:
        batches, problem = None, str(exc)
    example = None if batches is None else batches.example
    mine = (problem, None if example is None else (tuple(example.shape), str(example.dtype)))
    shards = all_gather_objects(mine, group)
    for r, (message, _) in enumerate(shards):
        if message is not None:
            raise InputError(f"rank {r}'s calibration inputs: {message}")
    shapes = [(r, found) for r, (_, found) in enumerate(shards) if found is not None]
    if not shapes:
        raise InputError("the calibration inputs of every rank are empty: give at least one batch")
    r0, (shape, dtype) = shapes[0]
    for r, (other, other_dtype) in shapes[1:]:
        if other[1:] != shape[1:] or other_dtype != dtype:
            raise InputError(f"rank {r}'s first calibration batch has shape {other} ({other_dtype}) "
                             f"but rank {r0}'s has {shape} ({dtype}); all batches must share every "
                             "axis but the first")
    if example is None:
        batches.example = torch.zeros(shape, dtype=getattr(torch, dtype.removeprefix("torch.")),
                                      device=device)
    return batches
