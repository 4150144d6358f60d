"""The model-zoo runner (`benchmarks.timm_zoo`, `benchmarks.torchvision_zoo`): one architecture
measured in a fresh process, the table of all of them.

A zoo module gives its model list `[(name, input size, family), ...]` and a `build(name, size,
seed)` and calls `main(...)`; the runner re-runs the module with
`python -m benchmarks.<zoo> --one NAME SIZE` per model (from the repository root). Columns:

- traced: torch.fx traces it with fxzip's tracer;
- zipped n/m: parametrised layers in the trunk of a full zip (stop_at=None) of all m;
- heads: attentions merged head-aware;
- first barrier: the first op that stops zipping (node, op, reason);
- self-merge: what the model was merged with to check that a merge gives it back.
  "permuted": `fxzip.testing.permuted_copy(model, x, seed=1)`, a copy with every hidden space the
  analysis finds permuted at random, checked first to compute the same outputs (relative error
  < 1e-4); the matching has to find the permutation again. "plain copy": `copy.deepcopy`, where
  no permuted copy can be built (it raises, permutes nothing, or computes another function past
  a barrier); the matching then only has to pair identical features. The CSV's
  `permuted_spaces` counts the spaces permuted, `self_merge_note` says why a row fell back, that
  a permuted copy differs from the model only by float32 rounding (exact in float64), or that a
  permuted copy without a barrier computed another function (the analysis missed a tie).
  Rows measured before this column existed were plain copies;
- self-merge error: that merge (zipit, stop_at=None, reset_bn=False), max relative error of
  both heads' outputs against the model's own;
- two inits: a zipit merge of two instances from different seeds runs end to end with finite
  outputs;
- ok: traced, self-merge error < 1e-4 and two inits;
- s: seconds for all of it (one row, in its own process);
- run: which run measured the row (`--run`, default the UTC date).

`--models a,b` measures only those and updates their rows in the existing `<results_name>.csv`
(the others are kept, in the module's model order); the `.md` is regenerated from all rows. The
file is re-read and re-written under a lock after every model, so several runs of different
subsets at the same time (and an interrupted run) lose nothing.
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime
import fcntl
import gc
import json
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .tables import markdown_table, write_dict_csv

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
PERMUTED, PLAIN = "permuted", "plain copy"
EXACT = 1e-4
Models = list[tuple[str, int, str]]  # (name, input size, family)


def relative_error(out: Any, ref: Any) -> float:
    """||out - ref|| / ||ref|| (a tuple of outputs: the largest over its tensors)."""
    if isinstance(out, (tuple, list)):
        return max(relative_error(o, r) for o, r in zip(out, ref))
    return ((out - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def self_merge_partner(model: Any, x: Any, has_barrier: bool) -> tuple[Any, str, int, str]:
    """What to merge `model` with to check that the merge gives it back: (partner, "permuted" or
    "plain copy", spaces permuted, note). A permuted copy where it can be built with the same
    function (relative error < EXACT); a plain copy where building it raises, permutes nothing,
    or, past a barrier, changes the function. A permuted copy of a model WITHOUT a barrier whose
    function changed is kept (and noted): the analysis missed a tie, which the merge will show."""
    import torch

    import fxzip

    try:
        permuted, count = fxzip.testing.permuted_copy(model, x, seed=1)
    except Exception as exc:  # noqa: BLE001 - any failure: the plain copy, with the reason
        reason = " ".join(str(exc).split())[:120]  # one line
        return copy.deepcopy(model), PLAIN, 0, f"no permuted copy: {type(exc).__name__}: {reason}"
    if count == 0:
        return copy.deepcopy(model), PLAIN, 0, "no space to permute"
    with torch.no_grad():
        err = relative_error(permuted(x), model(x))
    if err < EXACT:
        return permuted, PERMUTED, count, ""
    wide = _float64_error(model, permuted, x)
    if wide is not None and wide < 1e-9:  # the same function: float32 rounding, amplified
        return (permuted, PERMUTED, count, f"float32 rounding: the permuted copy differs from "
                f"the model by {err:.1e} in float32, by {wide:.0e} in float64")
    if has_barrier:
        return (copy.deepcopy(model), PLAIN, 0, f"the permuted copy computes another function "
                f"past the barrier (relative error {err:.1e})")
    return (permuted, PERMUTED, count, f"the permuted copy computes another function (relative "
            f"error {err:.1e}) with no barrier: the analysis missed a tie")


def _float64_error(model: Any, permuted: Any, x: Any) -> float | None:
    """The permuted copy's relative error to the model with both run in float64 (None where the
    model cannot run in float64)."""
    import torch

    try:
        with torch.no_grad():
            return relative_error(copy.deepcopy(permuted).double()(x.double()),
                                  copy.deepcopy(model).double()(x.double()))
    except Exception:  # noqa: BLE001 - e.g. float32 constants inside the model
        return None


def run_one(name: str, size: int, build: Callable, images: int, capture: str = "auto") -> dict:
    """Everything measured for one architecture (runs in its own process): both instances get
    BatchNorm statistics estimated on `images` random calibration images (as after training);
    `capture` is the front end (`fxzip.merge`'s `capture=`)."""
    import torch

    import fxzip

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    start = time.perf_counter()
    result = dict(model=name, size=size, traced=False, zipped="", heads=0, barrier="-",
                  self_merge="", permuted_spaces=0, self_merge_error=None, self_merge_note="",
                  two_inits=False, error="")
    try:
        x = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(0))
        a = fxzip.reset_bn(build(name, size, 0), x, progress=False)
        b = fxzip.reset_bn(build(name, size, 1), x, progress=False)
        analysis = fxzip.analyze(a, x, capture=capture)
        result["traced"] = True
        stops = set(analysis.stop_points)
        result["zipped"] = (f"{sum(1 for n in analysis.all_layers if n in stops)}/"
                            f"{len(analysis.all_layers)}")
        result["heads"] = len(analysis.head_groups)
        has_barrier = bool(analysis.barriers)
        if has_barrier:
            first = analysis.barriers[0]
            result["barrier"] = f"{first.node} ({first.op}): {first.reason}"
        del analysis  # one model's worth of memory at a time (VGG's head: 100M weights)
        partner, kind, count, note = self_merge_partner(a, x, has_barrier)
        result.update(self_merge=kind, permuted_spaces=count, self_merge_note=note)
        merged = fxzip.merge(a, partner, x, reset_bn=False, progress=False, capture=capture)
        del partner
        with torch.no_grad():
            ref = a(x)
            result["self_merge_error"] = max(relative_error(out, ref) for out in merged(x))
        del merged
        gc.collect()
        two = fxzip.merge(a, b, x, progress=False, capture=capture)
        with torch.no_grad():
            result["two_inits"] = all(bool(torch.isfinite(o).all()) for o in two(x))
    except Exception as exc:  # reported per model, the run goes on
        result["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    result["seconds"] = time.perf_counter() - start
    return result


def run_all(module: str, models: Models, timeout: int,
            on_row: Callable[[dict], None] = lambda row: None, capture: str = "auto") -> list[dict]:
    """Each model in a fresh process (`python -m <module> --one NAME SIZE`, from the repository
    root), one table row printed (and handed to `on_row`) each."""
    rows = []
    for name, size, family in models:
        try:
            done = subprocess.run([sys.executable, "-m", module, "--one", name, str(size),
                                   "--capture", capture],
                                  capture_output=True, text=True, timeout=timeout, cwd=REPO)
            line = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
            row = json.loads(line[-1]) if line else dict(  # e.g. killed for memory: -9
                model=name, size=size, traced=False,
                error=f"exit status {done.returncode}: {done.stderr.strip()[-180:]}")
        except subprocess.TimeoutExpired:
            row = dict(model=name, size=size, traced=False, error=f"timeout after {timeout}s")
        row["family"] = family
        rows.append(row)
        on_row(row)
        print(format_row(row), flush=True)
    return rows


def ok(row: dict) -> bool:
    """Traced, merged back exactly with its self-merge partner (permuted or plain copy), and
    merged across two initialisations."""
    err = row.get("self_merge_error")
    return bool(row.get("traced")) and err is not None and err < EXACT and bool(row.get("two_inits"))


COLUMNS = ["model", "family", "traced", "zipped", "heads", "first barrier", "self-merge",
           "self-merge error", "two inits", "ok", "s", "run"]
CSV_FIELDS = ["model", "family", "size", "traced", "zipped", "heads", "barrier", "self_merge",
              "permuted_spaces", "self_merge_error", "self_merge_note", "two_inits", "seconds",
              "error", "run"]


def cells(row: dict) -> list[str]:
    """One architecture's table cells (COLUMNS)."""
    err = row.get("self_merge_error")
    return [row["model"], row.get("family", ""), "yes" if row.get("traced") else "no",
            row.get("zipped") or "-", str(row.get("heads") or "-"),
            (row.get("barrier") or "-").replace("|", "/")[:110] if not row.get("error")
            else f"error: {row['error']}".replace("|", "/")[:110],
            row.get("self_merge") or "-",
            "-" if err is None else f"{err:.1e}", "yes" if row.get("two_inits") else "no",
            "yes" if ok(row) else "no", f"{row.get('seconds') or 0:.1f}", row.get("run") or "-"]


def format_row(row: dict) -> str:
    return "| " + " | ".join(cells(row)) + " |"


def markdown(rows: list[dict], listed: int | None = None) -> str:
    """The table with a summary line; `listed`: how many models the script lists (rows not
    measured yet are counted as such)."""
    listed = len(rows) if listed is None else listed
    full = sum(1 for r in rows if ok(r) and r.get("barrier") == "-")
    good = [r for r in rows if ok(r)]
    permuted = sum(1 for r in good if r.get("self_merge") == PERMUTED)
    runs: dict[str, int] = {}
    for r in rows:
        runs[r.get("run") or "-"] = runs.get(r.get("run") or "-", 0) + 1
    lines = [f"{len(good)}/{listed} architectures merge end to end and are given back by a merge "
             f"with a copy of themselves (relative error < {EXACT:g}): {permuted} with a permuted "
             f"copy (every hidden space permuted: the matching must find the permutation), "
             f"{len(good) - permuted} with a plain copy (identical features: no permuted copy "
             f"with the same function could be built, or the row predates the permuted check); "
             f"{full}/{listed} are zipped completely (no barrier). "
             f"Rows by run: " + ", ".join(f"{n} {k}" for k, n in runs.items())
             + f"; {listed - len(rows)} not run yet.",
             "", markdown_table(COLUMNS, [cells(r) for r in rows])]
    return "\n".join(lines)


def _parse(record: dict[str, str]) -> dict:
    """A row read back from the CSV: the raw fields `CSV_FIELDS`, or an older form: without
    `self_merge` (then every measured self-merge was a plain copy), or table cells
    (`first_barrier` holding "error: ..." for failures, yes/no, "-" for none)."""
    def value(key: str) -> str:
        v = (record.get(key) or "").strip()
        return "" if v == "-" else v

    barrier = value("barrier") or value("first_barrier")
    error = value("error")
    if not error and barrier.startswith("error: "):
        error, barrier = barrier[len("error: "):], ""
    err = value("self_merge_error")
    kind = value("self_merge") or (PLAIN if err and "self_merge" not in record else "")
    return dict(model=value("model"), family=value("family"),
                size=int(value("size")) if value("size") else None,
                traced=value("traced") in ("yes", "True"), zipped=value("zipped"),
                heads=int(value("heads")) if value("heads") else 0, barrier=barrier or "-",
                self_merge=kind,
                permuted_spaces=int(value("permuted_spaces")) if value("permuted_spaces") else 0,
                self_merge_error=float(err) if err else None,
                self_merge_note=value("self_merge_note"),
                two_inits=value("two_inits") in ("yes", "True"),
                seconds=float(value("seconds")) if value("seconds") else 0.0, error=error,
                run=value("run"))


def read_rows(path: Path) -> dict[str, dict]:
    """The rows of an existing results CSV by model name (none if there is no file)."""
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        return {r["model"]: r for r in map(_parse, csv.DictReader(f)) if r["model"]}


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock for `path` (runs of different subsets writing the same table), held on a
    file in the temporary directory so that none appears next to the results."""
    name = str(path.resolve()).strip("/").replace("/", "+")
    with open(Path(tempfile.gettempdir()) / f"{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def update_tables(out: Path, results_name: str, models: Models, new: list[dict],
                  note: str = "") -> str:
    """Replace `new`'s rows in `<out>/<results_name>.csv` (others kept, in `models`' order; rows
    of models no longer listed are dropped), regenerate the `.md` from all rows; the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{results_name}.csv"
    with _locked(path):
        rows = read_rows(path)
        rows.update({r["model"]: r for r in new})
        ordered = [rows[name] for name, _, _ in models if name in rows]
        text = markdown(ordered, listed=len(models)) + note + "\n"
        (out / f"{results_name}.md").write_text(text)
        write_dict_csv(path, ordered, CSV_FIELDS)
    return text


def main(module: str, doc: str, models: Models, build: Callable, results_name: str,
         images: int, argv: list[str] | None = None) -> None:
    """The zoo's command line (`python -m <module>`): all models (or `--models a,b`), the tables
    written to `--out/<results_name>.md` and `.csv`; `--one NAME SIZE` measures one (the child
    process)."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated subset of model names")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per model")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--run", default=datetime.datetime.now(datetime.timezone.utc)
                        .strftime("%Y-%m-%d"), help="label of this run in the table's run column")
    parser.add_argument("--one", nargs=2, metavar=("NAME", "SIZE"), help=argparse.SUPPRESS)
    parser.add_argument("--capture", choices=("auto", "fx", "export"), default="auto",
                        help="the front end (fxzip.merge's capture=); other than auto, the tables "
                        "are <name>_<capture>.md and .csv")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), build, images, args.capture)))
        return
    chosen = models
    if args.models:
        wanted = args.models.split(",")
        unknown = sorted(set(wanted) - {m[0] for m in models})
        if unknown:
            parser.error(f"not in the model list: {', '.join(unknown)}")
        chosen = [m for m in models if m[0] in wanted]
    start = time.perf_counter()
    if args.capture != "auto":
        results_name = f"{results_name}_{args.capture}"

    def record(row: dict) -> None:
        row["run"] = args.run
        update_tables(args.out, results_name, models, [row])

    rows = run_all(module, chosen, args.timeout, on_row=record, capture=args.capture)
    print("\n" + update_tables(args.out, results_name, models, rows))
    print(f"Run time of these {len(rows)}: {time.perf_counter() - start:.0f}s.")
