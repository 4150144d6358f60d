"""Part of `benchmarks.speed` (`python -m benchmarks.speed`), sections 1 and 4: one full zip's
seconds per phase, and the peak memory of fresh processes that build a case and then do nothing
more, run plain forwards, or merge. Written to `1_merge_breakdown.*` and `4_peak_memory.*`."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from benchmarks.common.cases import CaseSpec
from benchmarks.common.tables import Table

from .children import MERGE_STAGES, run_child

PHASES = ("trace", "analysis", "statistics", "matching", "rewrite", "bn_reset")


def merge_breakdown(merges: dict[CaseSpec, dict[str, Any]]) -> Table:
    """Section 1: seconds per phase of one full zip per case."""
    table = Table("1_merge_breakdown", "1. One full zip (stop_at=None, zipit, reset_bn): seconds "
                  "per phase", ["case", "layers zipped", *PHASES, "total", "wall"])
    for spec, r in merges.items():
        seconds = [r["seconds"].get(p, 0.0) for p in PHASES]
        table.add(spec.label, r["layers"], *seconds, sum(seconds), r["wall"])
    table.notes.append("each merge runs in a fresh subprocess (build models, Zipper, statistics "
                       "of the spaces the merge needs, merge); phases from `Zipper.seconds`; "
                       "'wall' is measured around those calls")
    return table


def peak_memory(specs: Sequence[CaseSpec], merges: dict[CaseSpec, dict[str, Any]]) -> Table:
    """Section 4: max RSS of fresh subprocesses that build a case and then do nothing more, run
    plain forwards, or merge."""
    table = Table("4_peak_memory", "4. Peak memory (max RSS of a fresh process, MiB)",
                  ["case", "params (both)", "param MiB (both)", "models+data", "plain forwards",
                   "merge", "forwards - models+data", "merge - models+data",
                   "(merge - models+data)/param MiB", *(f"peak in {s}" for s in MERGE_STAGES)])
    for spec in specs:
        data = run_child("data", spec)["max_rss_mib"]
        forward = run_child("forward", spec)["max_rss_mib"]
        merge = merges[spec]["max_rss_mib"]
        params = merges[spec]["params"]
        param_mib = params * 4 / 2**20
        stages = [merges[spec]["peaks_mib"].get(s, float("nan")) for s in MERGE_STAGES]
        table.add(spec.label, params, param_mib, data, forward, merge, forward - data,
                  merge - data, (merge - data) / param_mib, *stages)
    table.notes += ["peak RSS = VmHWM of a fresh process that imports fxzip/torch/timm, builds "
                    "both models and the batches (for the digits this includes the originals' BN "
                    "estimate, one forward each), then does nothing more / plain no_grad "
                    "forwards of both models over all batches / Zipper + merge(None)",
                    "param MiB: float32 parameters of both models (params·4 bytes)",
                    "peak in <stage>: VmHWM reset (/proc/self/clear_refs) before each stage of "
                    "the merge process; it includes what earlier stages still hold, and memory "
                    "the allocator keeps after frees"]
    return table

