"""Part of `benchmarks.speed` (`python -m benchmarks.speed --ratios`), section 6: the statistics
and the whole merge against the floor, plain forwards of both models over the same batches, per
`taps` choice, each case in a fresh process: wall clock with torch's default thread count (as
people run it: what uses the cores worse than the forwards shows), then, secondary, CPU time on
one thread (what does more work). Written to `6_floor.*`."""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

import fxzip
from fxzip.runtime.costs import count_flops, count_parameters

from benchmarks.common.cases import Case, CaseSpec, plain_forward
from benchmarks.common.tables import Table
from benchmarks.common.timing import (current_rss_mib, load_average, measured, peak_rss_mib,
                                      reset_peak_rss)

from .children import run_child
from .statistics_pass import gram_flops

DEFAULT_TAPS = "all"  # fxzip's default `taps`
TAPS_CHOICES = ("all", "spread", "last")


def read_choice(choice: str) -> tuple[str, float]:
    """A `--ratio-taps` entry as (taps, positions): "spread" or "all@0.25" (positions 0.25)."""
    taps, _, positions = choice.partition("@")
    return taps, float(positions) if positions else 1.0


FLOOR_PHASES = ("trace", "analysis", "statistics", "matching", "rewrite", "bn_reset",
                "corrections")


def floor_ratios(case: Case, repeats: int, choices: Sequence[str] = TAPS_CHOICES) -> dict[str, Any]:
    """In this (fresh) process: plain forwards of both models, the statistics of every space a
    full zip needs and the paper's whole merge (`fxzip.merge`, stop_at=None, corrections=None,
    its BN reset) for each `taps` choice, interleaved over `repeats` rounds after a warm-up;
    then fxzip's default merge (corrections on). Minima of wall and of this process's CPU time,
    the phases of the fastest merge, the thread count, the Gram FLOPs read, and peak RSS (VmHWM,
    reset before each warm-up) above the RSS before (models and data resident)."""
    def statistics_of(read: str) -> Callable[[], Any]:
        taps, positions = read_choice(read)
        zipper = fxzip.Zipper(case.models, case.batches, progress=False, taps=taps,
                              positions=positions)
        spaces = zipper.analysis.spaces_of(zipper.analysis.trunk(None))
        return lambda: zipper.statistics(spaces)

    def merge_with(read: str, corrections: Any = None) -> Any:
        # the paper's zipit: no corrections and no weight similarity; the default: both on
        taps, positions = read_choice(read)
        return fxzip.merge(*case.models, case.batches, progress=False, taps=taps,
                           positions=positions, corrections=corrections,
                           **({} if corrections else {"weight_similarity": 0.0}))

    loads = [load_average()]
    plain_forward(case.models, case.batches)  # warm-up
    peaks: dict[str, float] = {}
    reports: dict[str, Any] = {}
    best: dict[str, float] = defaultdict(lambda: math.inf)

    cpu: dict[str, float] = defaultdict(lambda: math.inf)

    def keep(label: str, fn: Callable[[], Any], first: bool) -> None:
        """Time fn (wall and this process's CPU seconds); the first round also records its peak
        RSS above the RSS before."""
        base = current_rss_mib()
        if first:
            reset_peak_rss()
        value, seconds, cpu_seconds = measured(fn)
        if first:
            peaks[label] = peak_rss_mib() - base
        cpu[label] = min(cpu[label], cpu_seconds)
        if seconds < best[label]:
            best[label] = seconds
            if isinstance(value, nn.Module) and hasattr(value, "fxzip_report"):
                reports[label] = dict(value.fxzip_report.seconds)

    for round_ in range(repeats):
        first = round_ == 0
        keep("plain", lambda: plain_forward(case.models, case.batches), first)
        for taps in choices:
            # the Zipper (trace) untimed; freed after the statistics
            keep(f"statistics {taps}", statistics_of(taps), first)
            keep(f"merge {taps}", lambda: merge_with(taps), first)
        keep("default", lambda: merge_with(DEFAULT_TAPS, "default"), first)
    loads.append(load_average())
    zipper = fxzip.Zipper(case.models, case.batches[:1], progress=False)
    spaces = zipper.analysis.spaces_of(zipper.analysis.trunk(None))
    flops = {t: gram_flops(zipper, spaces, case.batches, *read_choice(t))
             for t in {*TAPS_CHOICES, *choices}}
    forward = sum(count_flops(m, x, per_sample=False) for m in case.models for x in case.batches)
    return {"best": dict(best), "cpu": dict(cpu), "phases": reports, "peaks_mib": peaks,
            "gram_flops": flops, "threads": torch.get_num_threads(),
            "forward_flops": forward, "spaces": len(spaces), "loads": loads,
            "batch_mib": case.batches[0].numel() * case.batches[0].element_size() / 2**20,
            "params": sum(count_parameters(m) for m in case.models)}


def floor_table(specs: Sequence[CaseSpec], repeats: int, choices: Sequence[str] = TAPS_CHOICES,
                threads: int = 0, one_thread: bool = True) -> Table:
    """Section 6: each case in a fresh subprocess (`floor_ratios`) on `threads` threads (0:
    torch's default; wall clock), and with `one_thread` in another on one thread (CPU time)."""
    table = Table("6_floor", "6. Cost against the floor: statistics and the whole merge (full zip, "
                  "BN reset) ÷ plain forwards of both models over the same batches, per `taps`: "
                  "wall clock with the default thread count; CPU time on one thread beside it",
                  ["case", "merge", "taps", "threads", "plain fwd s", "statistics s",
                   "statistics/plain wall (≤ 1.5)", "merge s",
                   "merge/plain wall (≤ 3; default ≤ 4)",
                   *FLOOR_PHASES, "other", "plain fwd CPU s", "statistics CPU s",
                   "statistics/plain CPU (≤ 1.5)", "merge CPU s", "merge/plain CPU (≤ 3)",
                   "Gram/fwd FLOPs", "statistics peak MiB", "merge peak MiB", "peak/param MiB",
                   "plain peak MiB", "load avg (start; end)"])
    task = f"ratios:{repeats}:{','.join(choices)}"
    for spec in specs:
        wall = run_child(task, spec, threads)
        single = run_child(task, spec, threads=1) if one_thread else {"cpu": {}, "loads": []}
        loads = "; ".join(wall["loads"]) + (f" (1 thread: {'; '.join(single['loads'])})"
                                            if single["loads"] else "")
        rows = [("paper (corrections=None)", taps, f"merge {taps}") for taps in choices]
        rows.append(("default (corrections)", DEFAULT_TAPS, "default"))
        for kind, taps, key in rows:
            table.add(spec.label, kind, taps, *_wall_cells(wall, taps, key),
                      *_cpu_cells(single["cpu"], taps, key), *_memory_cells(wall, taps, key),
                      loads)
    table.notes += [
        f"one fresh process per case and thread count; minimum over {repeats} interleaved rounds "
        "(plain forwards, then per taps choice: statistics on a fresh Zipper, trace untimed, then "
        "the whole `fxzip.merge(a, b, batches, taps=..., corrections=None, weight_similarity=0)`: "
        "the paper's zip with its BN reset; then fxzip's default merge `fxzip.merge(a, b, "
        "batches)`: corrections and weight similarity on, the label-free refit is one more pass "
        "that also resets the BatchNorms), after one plain forward as warm-up: the first round's "
        "times include first-call costs",
        "wall: seconds with torch's default thread count (`threads`), as a user runs it: the "
        "ratios show what uses the cores worse than the forwards as well as what does more work; "
        "CPU s: a second fresh process on one thread (time.process_time), which moves far less "
        "than wall time on a machine loaded by other processes",
        "phases: `merged.fxzip_report.seconds` (wall, default threads) of the fastest merge; "
        "other = merge - phases (the report's parameter and FLOP counts, input checks)",
        "Gram/fwd FLOPs: the Gram products of the taps read, as full products (fxzip computes "
        "the upper triangles, about 0.55 of this), ÷ the forward FLOPs of both models; "
        "'spread' counts each tap's kept share of positions",
        "peak MiB (default threads): VmHWM reset before the first round's run and read after it, "
        "minus the RSS before (models and all batches already resident); param MiB: float32 "
        "parameters of both models"]
    return table


def _wall_cells(r: dict[str, Any], taps: str, key: str) -> list[Any]:
    """threads, plain s, statistics s and ratio, merge s and ratio, phases, other (wall)."""
    plain, merge = r["best"]["plain"], r["best"][key]
    # the default merge's taps need not be among the choices timed alone: NaN then
    stats = r["best"].get(f"statistics {taps}", math.nan)
    parts = [r["phases"][key].get(p, 0.0) for p in FLOOR_PHASES]
    return [r["threads"], plain, stats, stats / plain, merge, merge / plain, *parts,
            merge - sum(parts)]


def _cpu_cells(cpu: dict[str, float], taps: str, key: str) -> list[float]:
    """plain CPU s, statistics CPU s and ratio, merge CPU s and ratio (one thread; NaN if not
    run)."""
    plain = cpu.get("plain", math.nan)
    stats, merge = cpu.get(f"statistics {taps}", math.nan), cpu.get(key, math.nan)
    return [plain, stats, stats / plain, merge, merge / plain]


def _memory_cells(r: dict[str, Any], taps: str, key: str) -> list[float]:
    """Gram/fwd FLOPs, peaks, peak per parameter MiB, plain peak."""
    peak = r["peaks_mib"][key]
    param_mib = r["params"] * 4 / 2**20
    return [r["gram_flops"][taps] / r["forward_flops"],
            r["peaks_mib"].get(f"statistics {taps}", math.nan), peak, peak / param_mib,
            r["peaks_mib"]["plain"]]
