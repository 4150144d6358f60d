"""Part of `benchmarks.speed` (`python -m benchmarks.speed`): measurements in a fresh Python process
(so that its peak memory is its own): `run_child` starts `python -m benchmarks.speed --child TASK`,
which builds a case and runs `child_main`."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

import fxzip
from fxzip.runtime.costs import count_parameters

from benchmarks.common.cases import Case, CaseSpec, build_case, plain_forward
from benchmarks.common.timing import peak_rss_mib, reset_peak_rss, timed

REPO = Path(__file__).resolve().parents[2]
MERGE_STAGES = ("trace+analysis", "statistics", "matching+rewrite+bn_reset")


def child_main(task: str, spec: CaseSpec) -> dict[str, Any]:
    """Run in a fresh process: build the case and then do `task` ("data": nothing more,
    "forward": plain forwards of both models, "merge": a full zip, "ratios:REPEATS[:TAPS,...]":
    section 6's `floor_ratios`). Returns max RSS and timings."""
    case = build_case(spec)
    result: dict[str, Any] = {"task": task}
    if task.startswith("ratios"):
        from .floor import TAPS_CHOICES, floor_ratios


        _, repeats, choices = (task.split(":") + [",".join(TAPS_CHOICES)])[:3]
        result.update(floor_ratios(case, repeats=int(repeats), choices=choices.split(",")))
    elif task == "forward":
        plain_forward(case.models, case.batches[:1])  # warm-up
        result["seconds"] = {"forward": timed(lambda: plain_forward(case.models, case.batches))}
    elif task == "merge":
        result.update(staged_merge(case))
    result["params"] = sum(count_parameters(m) for m in case.models)
    result["max_rss_mib"] = max([peak_rss_mib(), *result.get("peaks_mib", {}).values()])
    return result


def staged_merge(case: Case) -> dict[str, Any]:
    """A full zip in three stages (Zipper; statistics of the spaces the merge needs; the merge,
    which then matches, rewrites and resets BN), with the peak RSS of each stage."""
    peaks: dict[str, float] = {}

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        can_reset = reset_peak_rss()
        value = fn()
        peaks[name] = peak_rss_mib() if can_reset else float("nan")
        return value

    start = time.perf_counter()
    zipper = stage("trace+analysis", lambda: fxzip.Zipper(case.models, case.batches,
                                                           progress=False))
    spaces = zipper.analysis.spaces_of(zipper.analysis.trunk(None))
    stage("statistics", lambda: zipper.statistics(spaces))
    merged = stage("matching+rewrite+bn_reset",
                   lambda: zipper.merge(None, method="zipit", reset_bn=True))
    report = merged.fxzip_report
    return {"seconds": dict(zipper.seconds), "wall": time.perf_counter() - start,
            "peaks_mib": peaks, "merged_params": count_parameters(merged),
            "layers": f"{report.layers_zipped}/{report.layers_total}"}


def run_child(task: str, spec: CaseSpec, threads: int | None = None) -> dict[str, Any]:
    """`child_main` in a fresh Python process (so that its max RSS is its own):
    `python -m benchmarks.speed --child TASK ...`, run from the repository root, on `threads`
    threads (None: this process's count; 0: torch's default, left unchanged in the child)."""
    count = torch.get_num_threads() if threads is None else threads
    command = [sys.executable, "-m", "benchmarks.speed", "--child", task,
               "--child-case", json.dumps(asdict(spec)),
               *(["--threads", str(count)] if count else [])]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark subprocess {task} {spec.label} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])
