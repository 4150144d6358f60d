"""Measuring helpers: wall-clock and CPU time of a call, interleaved repeats, a stopwatch that sums
seconds per label, the load average, and this process's (peak) resident memory on Linux.

The machines these run on may be shared and noisy: take minima over repeats, and interleave the
sides that are compared so that slow phases hit all of them alike."""
from __future__ import annotations

import math
import os
import resource
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def timed(fn: Callable[[], Any]) -> float:
    """Seconds (wall clock) one call of `fn` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measured(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(`fn()`, wall seconds, this process's CPU seconds: `time.process_time`, all threads)."""
    start, start_cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - start, time.process_time() - start_cpu


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Minimum seconds of each function over `repeats` rounds that alternate between them, so that
    slow phases of a shared machine hit every side alike."""
    best = {name: math.inf for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            best[name] = min(best[name], timed(fn))
    return best


class Stopwatch:
    """Sums wall seconds per label: `with watch("label"): ...`; `watch.seconds` in the order the
    labels were first used (or given to the constructor, starting at 0)."""

    def __init__(self, *labels: str) -> None:
        self.seconds: dict[str, float] = defaultdict(float, {label: 0.0 for label in labels})

    @contextmanager
    def __call__(self, label: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[label] += time.perf_counter() - start


def load_average() -> str:
    """The 1, 5 and 15 minute load averages ("n/a" where the system has none)."""
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux: clear_refs 5); False if impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """This process's peak resident set size: VmHWM, which (unlike ru_maxrss, whose high-water
    mark survives fork+exec from a large parent on Linux) belongs to this process image alone."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """This process's resident set size now (VmRSS; NaN where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")
