"""The memory a merge may use (`memory_gib`) and what it did use: the budget resolved from the
models' device, the bytes a space's statistics and matching hold, and the peak of each phase.

The budget covers everything a merge adds beside the models and the merged model: the
activations of the statistics and corrections passes, the spaces' accumulators, and the matching's
matrices. On the CPU a phase's peak is the process's resident high-water mark (reset at the start
of the phase where Linux allows it); on a GPU, the device's peak allocated memory.
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.fx as fx

from ..errors import InputError

__all__ = ["AUTO_SHARE", "check_memory_gib", "resolve_memory_gib", "available_bytes",
           "accumulator_bytes", "matching_bytes", "PhasePeaks", "GIB",
           "activation_bytes_per_sample", "model_bytes"]

GIB = float(1 << 30)
# "auto": this share of the memory free on the models' device when the merge starts, less one
# model (the merged model is built beside the inputs)
AUTO_SHARE = 0.8
# a space of D features (all models) holds its float64 co-moments (D² · 8 bytes) and, while the
# statistics pass runs, the float32 Gram products of the upper triangle (about D² · 2 bytes)
_ACCUMULATOR_BYTES_PER_ENTRY = 10
# matching one space (statistics used once): its correlation is written over its co-moments,
# the weights' similarity is mixed over itself, and the matching works on a copy: float64 D × D
# matrices beside the co-moments
_MATCHING_MATRICES = 2


def check_memory_gib(value: Any) -> Any:
    """`value` if it is a budget: "auto", None (unbounded) or a number of GiB > 0."""
    if value is None or (isinstance(value, str) and value == "auto"):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise InputError(f"memory_gib must be \"auto\" (a share of the free memory of the models' "
                         f"device), None (no bound) or a number of GiB > 0, got {value!r}")
    return float(value)


def available_bytes(device: torch.device) -> int | None:
    """Bytes free on `device`: MemAvailable on a Linux CPU, the free device memory on CUDA;
    None where unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return _proc_bytes("/proc/meminfo", "MemAvailable")


def _proc_bytes(path: str, field: str) -> int | None:
    """A "FIELD: N kB" line of a /proc file in bytes; None where the file or line is missing."""
    try:
        with open(path) as f:
            found = re.search(rf"{field}:\s+(\d+) kB", f.read())
    except OSError:
        return None
    return int(found.group(1)) * 1024 if found else None


def resolve_memory_gib(value: Any, device: torch.device, model_bytes: int) -> float | None:
    """The budget in GiB: a number as given, None unbounded, "auto" `AUTO_SHARE` of the memory
    free on the models' device less `model_bytes` (the merged model to come); unbounded where the
    free memory is unknown."""
    value = check_memory_gib(value)
    if value != "auto":
        return value
    free = available_bytes(device)
    if free is None:
        return None
    return max(AUTO_SHARE * free - model_bytes, 0.0) / GIB or 0.25


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers (each shared tensor once)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def accumulator_bytes(dim: int) -> int:
    """Bytes a space of `dim` features (all models) holds during the statistics pass."""
    return _ACCUMULATOR_BYTES_PER_ENTRY * dim * dim


def matching_bytes(dim: int) -> int:
    """Bytes the matching of a space of `dim` features adds beside its co-moments."""
    return _MATCHING_MATRICES * 8 * dim * dim


def meta_bytes(meta: Any) -> int | None:
    """Bytes of the tensors a node's recorded metadata describes (nested tuples summed)."""
    if hasattr(meta, "shape") and hasattr(meta, "dtype"):
        try:
            return math.prod(int(d) for d in meta.shape) * meta.dtype.itemsize
        except (TypeError, ValueError, RuntimeError):  # symbolic or unknown sizes
            return None
    if isinstance(meta, (list, tuple)):
        sizes = [meta_bytes(m) for m in meta]
        return sum(s for s in sizes if s is not None)
    if isinstance(meta, dict):
        return meta_bytes(list(meta.values()))
    return 0


def activation_bytes_per_sample(gm: fx.GraphModule) -> float | None:
    """The largest sum of live activations (bytes per sample) while `gm` runs node by node and
    frees each value after its last use, from the shapes traced on the example batch; None where
    the example's batch size is unknown."""
    nodes = list(gm.graph.nodes)
    last = {}
    for i, node in enumerate(nodes):
        for arg in node.all_input_nodes:
            last[arg] = i
    batch = None
    live: dict[fx.Node, int] = {}
    total = peak = 0
    for i, node in enumerate(nodes):
        meta = node.meta.get("tensor_meta", node.meta.get("val"))
        if node.op == "placeholder" and batch is None:
            shape = getattr(meta, "shape", None)
            batch = int(shape[0]) if shape is not None and len(shape) else None
        if node.op not in ("get_attr", "output"):
            live[node] = meta_bytes(meta) or 0
            total += live[node]
            peak = max(peak, total)
        for arg in node.all_input_nodes:
            if last.get(arg) == i:
                total -= live.pop(arg, 0)
    return peak / batch if batch else None


def _resident_peak_bytes() -> int | None:
    """The process's resident high-water mark (VmHWM), None where /proc is not there."""
    return _proc_bytes("/proc/self/status", "VmHWM")


def _reset_resident_peak() -> bool:
    """Reset VmHWM to the current resident size (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PhasePeaks:
    """The peak memory (GiB) of each phase of a merge, measured on the models' device: the
    process's resident peak on the CPU, the peak allocated memory on CUDA. A phase run twice keeps
    its larger peak."""

    def __init__(self, device: torch.device):
        self.device = device
        self.gib: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Measure the peak of the block as phase `name`."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _reset_resident_peak()
        try:
            yield
        finally:
            peak = torch.cuda.max_memory_allocated(self.device) if cuda \
                else _resident_peak_bytes()
            if peak is not None:
                self.gib[name] = max(self.gib.get(name, 0.0), peak / GIB)
