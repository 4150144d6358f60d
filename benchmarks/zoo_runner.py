"""What the model-zoo benchmarks (`timm_zoo.py`, `torchvision_zoo.py`) share: one architecture
measured in a fresh process, the table of all of them.

A zoo script gives its model list `[(name, input size, family), ...]` and a `build(name, size,
seed)` and calls `main(...)`; the script re-runs itself with `--one NAME SIZE` per model.
Columns:

- traced: torch.fx traces it with fxzip's tracer;
- zipped n/m: parametrised layers in the trunk of a full zip (stop_at=None) of all m;
- heads: attentions merged head-aware;
- first barrier: the first op that stops zipping (node, op, reason);
- self-merge error: a model merged with a copy of itself (zipit, stop_at=None, reset_bn=False):
  max relative error of both outputs against the model's own;
- two inits: a zipit merge of two instances from different seeds runs end to end with finite
  outputs;
- s: seconds for all of it.
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.tables import markdown_table, write_dict_csv  # noqa: E402

EXACT = 1e-4
Models = list[tuple[str, int, str]]  # (name, input size, family)


def run_one(name: str, size: int, build: Callable, images: int) -> dict:
    """Everything measured for one architecture (runs in its own process): both instances get
    BatchNorm statistics estimated on `images` random calibration images (as after training)."""
    import torch

    import fxzip

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    start = time.perf_counter()
    result = dict(model=name, size=size, traced=False, zipped="", heads=0, barrier="-",
                  self_merge_error=None, two_inits=False, error="")
    try:
        x = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(0))
        a = fxzip.reset_bn(build(name, size, 0), x, progress=False)
        b = fxzip.reset_bn(build(name, size, 1), x, progress=False)
        analysis = fxzip.analyze(a, x)
        result["traced"] = True
        stops = set(analysis.stop_points)
        result["zipped"] = (f"{sum(1 for n in analysis.all_layers if n in stops)}/"
                            f"{len(analysis.all_layers)}")
        result["heads"] = len(analysis.head_groups)
        if analysis.barriers:
            first = analysis.barriers[0]
            result["barrier"] = f"{first.node} ({first.op}): {first.reason}"
        merged = fxzip.merge(a, copy.deepcopy(a), x, reset_bn=False, progress=False)
        with torch.no_grad():
            ref = a(x)
            result["self_merge_error"] = max(
                ((out - ref).norm() / ref.norm().clamp_min(1e-12)).item() for out in merged(x))
        two = fxzip.merge(a, b, x, progress=False)
        with torch.no_grad():
            result["two_inits"] = all(bool(torch.isfinite(o).all()) for o in two(x))
    except Exception as exc:  # reported per model, the run goes on
        result["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    result["seconds"] = time.perf_counter() - start
    return result


def run_all(script: str, models: Models, timeout: int) -> list[dict]:
    """Each model in a fresh process (`script --one NAME SIZE`), one table row printed each."""
    rows = []
    for name, size, family in models:
        try:
            done = subprocess.run([sys.executable, script, "--one", name, str(size)],
                                  capture_output=True, text=True, timeout=timeout)
            line = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
            row = json.loads(line[-1]) if line else dict(  # e.g. killed for memory: -9
                model=name, size=size, traced=False,
                error=f"exit status {done.returncode}: {done.stderr.strip()[-180:]}")
        except subprocess.TimeoutExpired:
            row = dict(model=name, size=size, traced=False, error=f"timeout after {timeout}s")
        row["family"] = family
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def ok(row: dict) -> bool:
    """Traced, merged with itself exactly, and merged across two initialisations."""
    err = row.get("self_merge_error")
    return bool(row.get("traced")) and err is not None and err < EXACT and bool(row.get("two_inits"))


COLUMNS = ["model", "family", "traced", "zipped", "heads", "first barrier", "self-merge error",
           "two inits", "ok", "s"]
CSV_FIELDS = ["model", "family", "size", "traced", "zipped", "heads", "barrier", "self_merge_error",
              "two_inits", "seconds", "error"]


def cells(row: dict) -> list[str]:
    """One architecture's table cells (COLUMNS)."""
    err = row.get("self_merge_error")
    return [row["model"], row.get("family", ""), "yes" if row.get("traced") else "no",
            row.get("zipped") or "-", str(row.get("heads") or "-"),
            (row.get("barrier") or "-").replace("|", "/")[:110] if not row.get("error")
            else f"error: {row['error']}".replace("|", "/")[:110],
            "-" if err is None else f"{err:.1e}", "yes" if row.get("two_inits") else "no",
            "yes" if ok(row) else "no", f"{row.get('seconds', 0):.1f}"]


def format_row(row: dict) -> str:
    return "| " + " | ".join(cells(row)) + " |"


def markdown(rows: list[dict]) -> str:
    full = sum(1 for r in rows if ok(r) and r.get("barrier") == "-")
    good = sum(1 for r in rows if ok(r))
    lines = [f"{good}/{len(rows)} architectures merge end to end with an exact self-merge "
             f"(relative error < {EXACT:g}); {full} of them are zipped completely (no barrier).",
             "", markdown_table(COLUMNS, [cells(r) for r in rows])]
    return "\n".join(lines)


def main(script: str, doc: str, models: Models, build: Callable, results_name: str,
         images: int, argv: list[str] | None = None) -> None:
    """The zoo's command line: all models (or `--models a,b`), the tables written to
    `--out/<results_name>.md` and `.csv`; `--one NAME SIZE` measures one (the child process)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated subset of model names")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per model")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--one", nargs=2, metavar=("NAME", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), build, images)))
        return
    if args.models:
        wanted = args.models.split(",")
        models = [m for m in models if m[0] in wanted]
    start = time.perf_counter()
    rows = run_all(script, models, args.timeout)
    text = markdown(rows) + f"\n\nRun time: {time.perf_counter() - start:.0f}s.\n"
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{results_name}.md").write_text(text)
    write_dict_csv(args.out / f"{results_name}.csv", rows, CSV_FIELDS)
