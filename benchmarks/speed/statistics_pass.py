"""Part of `benchmarks.speed` (`python -m benchmarks.speed`), section 2: the statistics pass
against plain forwards of both models over the same batches, and where its time goes. Written to
`2_statistics_vs_forward.*` and `2b_statistics_breakdown.*`."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

import fxzip
from fxzip.graph.shapes import tensor_shape
from fxzip.passes import statistics
from fxzip.runtime.costs import count_flops
from fxzip.runtime.moments import resolve_precision

from benchmarks.common.cases import Case, plain_forward
from benchmarks.common.tables import Table
from benchmarks.common.timing import timed

TAPPED = "lockstep forward of all models (no-op observer)"


def statistics_vs_forward(cases: Sequence[Case], repeats: dict[str, int]) -> tuple[Table, Table]:
    """The statistics of every mergeable space on a fresh Zipper (default precision, and float32
    products), against plain forwards of both models over the same batches; and a breakdown of
    the statistics pass at the default precision."""
    default = resolve_precision("auto", torch.device("cpu"))
    ratio = Table("2_statistics_vs_forward", "2. Statistics pass (all mergeable spaces) vs plain "
                  "forwards of both models over the same batches",
                  ["case", "batches", "spaces", f"statistics s ({default})", "plain fwd s", "ratio",
                   "target", "statistics s (float32)", "ratio (float32)", "tap fwd s",
                   "accumulation s", "tap fwd/plain", "accum/plain", "Gram GFLOP", "fwd GFLOP",
                   "Gram/fwd FLOPs"])
    parts = Table("2b_statistics_breakdown", "2b. Where the statistics time goes (the passes of "
                  f"fxzip.passes.statistics.collect at the default precision, {default}, timed "
                  "one by one)", ["case", "part", "seconds", "share"])
    for case in cases:
        zipper = fresh_zipper(case)
        spaces = zipper.analysis.mergeable_spaces()
        plain_forward(case.models, case.batches[:1])  # warm-up
        fresh_zipper(case, "float32").statistics(spaces)  # warm-up (oneDNN kernels per shape)
        fresh_zipper(case).statistics(spaces)
        best = {"statistics": math.inf, "float32": math.inf, "plain": math.inf}
        for _ in range(repeats[case.spec.kind]):  # interleaved; each Zipper is built untimed
            unused = {p: fresh_zipper(case, p) for p in ("auto", "float32")}
            best["statistics"] = min(best["statistics"],
                                     timed(lambda: unused["auto"].statistics(spaces)))
            best["float32"] = min(best["float32"],
                                  timed(lambda: unused["float32"].statistics(spaces)))
            best["plain"] = min(best["plain"], timed(lambda: plain_forward(case.models,
                                                                           case.batches)))
        split = statistics_parts(zipper, spaces)
        taps = split.get(TAPPED, float("nan"))
        accumulation = best["statistics"] - taps
        gram = gram_flops(zipper, spaces, case.batches)
        forward = sum(count_flops(m, x, per_sample=False) for m in case.models for x in case.batches)
        ratio.add(case.spec.label, len(case.batches), len(spaces), best["statistics"],
                  best["plain"], best["statistics"] / best["plain"], "≤ 1.5", best["float32"],
                  best["float32"] / best["plain"], taps, accumulation, taps / best["plain"],
                  accumulation / best["plain"], gram / 1e9, forward / 1e9, gram / forward)
        for label, seconds in split.items():
            parts.add(case.spec.label, label, seconds, float("nan"))
        _fill_shares(parts, case.spec.label)
    ratio.notes += [
        f"statistics: `Zipper.statistics(analysis.mergeable_spaces())` on a fresh Zipper (trace "
        f"not counted), with the default `statistics_precision='auto'` (here: {default} Gram "
        "products) and with 'float32'; plain fwd: `torch.no_grad()` forwards of both eager models",
        "tap fwd: the lockstep graph the statistics pass runs (all models node by node) with an "
        "observer that does nothing at the tapped nodes, timed once in table 2b; accumulation "
        "= statistics (default precision) - tap fwd",
        "Gram GFLOP: what the Gram products of all taps would cost as full products (2·samples·"
        "features² per tap, all models' features stacked); fxzip computes only the upper "
        "triangle, in row blocks (about 0.55 of this). fwd GFLOP: FlopCounterMode over both "
        "models and all batches",
        "minimum over interleaved repeats, after one warm-up of each: "
        + ", ".join(f"{case.spec.label} {repeats[case.spec.kind]}" for case in cases)]
    parts.notes.append("single runs, not minima: the parts need not add up to the statistics "
                       "time of table 2 exactly")
    return ratio, parts


def gram_flops(zipper: fxzip.Zipper, spaces: Sequence[int], batches: Sequence[torch.Tensor],
               taps: str = "all", positions: float = 1.0) -> float:
    """Multiply-adds ×2 of the Gram products of all taps (`taps="last"`: each space's last) as
    full products: per tap and batch, samples × (N·size)², the features of the N models stacked."""
    analysis, n = zipper.analysis, zipper.num_models
    example = zipper.batches.example.shape[0]
    samples = sum(x.shape[0] for x in batches)
    total = 0.0
    order = {node.name: i for i, node in enumerate(analysis.nodes)}
    nodes = {node.name: node for node in analysis.nodes}
    for s in spaces:
        read = analysis.spaces[s].taps
        if taps == "last" and read:
            read = [max(read, key=lambda t: order[t.node])]
        rates = [1.0] * len(read)
        if taps == "spread":
            rates = [1.0 / max(1, round(1.0 / r.rate))
                     for r in statistics.spread_reads(read, None, nodes)]
        for tap, rate in zip(read, rates):
            shape = tensor_shape(nodes[tap.node])
            per_sample = math.prod(shape) // shape[tap.axis] * tap.expand // example
            rows = per_sample * samples
            rate /= max(1, min(round(1.0 / positions), per_sample))
            total += 2 * rows * rate * (n * tap.size) ** 2
    return total


def fresh_zipper(case: Case, precision: str = "auto") -> fxzip.Zipper:
    return fxzip.Zipper(case.models, case.batches, progress=False, statistics_precision=precision)


def statistics_parts(zipper: fxzip.Zipper, spaces: Sequence[int]) -> dict[str, float]:
    """Seconds per part of one statistics pass (`statistics.collect` with its `timings`): the
    lockstep forward of all models alone (an observer that does nothing at the same tapped nodes),
    the moment updates of the consumer taps (the first pass minus that forward), and the dead-unit
    pass (producer rows of constant features; zero when there are none). Returns
    {"n/a ...": nan} when the Zipper or the statistics pass no longer offer what this needs."""

    class NullObserver(statistics.Observer):
        def forward(self, name, *tensors):
            return None

    try:
        analysis, graphs, batches = zipper.analysis, zipper.graphs, zipper.batches
        precision, pairing = zipper.statistics_precision, zipper.pairing
        taps = {t.node: [] for s in spaces for t in analysis.spaces[s].taps}
        forward_only = statistics.lockstep_module(graphs, NullObserver(taps), pairing)
    except (AttributeError, TypeError) as exc:
        return {f"n/a ({type(exc).__name__}: {exc})": float("nan")}
    with torch.no_grad():
        forward_only(batches.example)  # warm-up
        lockstep = min(timed(lambda: [forward_only(x) for x in batches]) for _ in range(2))
    seconds: dict[str, float] = {}
    stats = statistics.collect(graphs, analysis, spaces, batches, progress=False,
                               precision=precision, pairing=pairing, timings=seconds)
    dead = sum(stats[s].fallback is not None for s in spaces)
    return {TAPPED: lockstep, "moment updates (consumer taps)": seconds["consumer taps"] - lockstep,
            f"dead-unit pass ({dead} spaces)": seconds["dead units"]}


def _fill_shares(table: Table, label: str) -> None:
    rows = [r for r in table.rows if r[0] == label]
    total = sum(r[2] for r in rows if not math.isnan(r[2]))
    for r in rows:
        r[3] = r[2] / total if total else float("nan")
    table.add(label, "total", total, 1.0 if total else float("nan"))
