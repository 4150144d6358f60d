"""fxzip over Hugging Face `transformers` families: how each is captured, how far it zips, and
whether merging a model with a permuted copy of itself gives the model back.

    python -m benchmarks.hf_zoo [--families bert,llama] [--out benchmarks/results]

Per family (`benchmarks.common.hf_families`: a tiny config — hidden 32, 2 layers, 4 heads —,
random weights, nothing downloaded; text families take 4 sequences of 12 tokens with one padded
sequence, vision families 4 images of 32²), with `capture="auto"` (torch.fx where it traces,
torch.export where it does not):

- capture: the front end that ran;
- zipped n/m: weight layers in the trunk of a full zip (`stop_at=None`) of all m;
- first barrier: the first op that stops zipping (node, op, reason);
- self-merge: "permuted" — merged with `fxzip.testing.permuted_copy(model, batch, seed=1)`, a copy
  with every hidden space permuted (attention heads as wholes), checked first to compute the same
  outputs (relative error < 1e-5); "plain copy" where none can be built (its reason in the CSV);
- self-merge error: that merge's (`reset_bn=False`, default corrections) largest relative error of
  the heads' logits (or last hidden state) against the model's;
- own type: the heads return the model's own output class (a `ModelOutput`);
- two inits: a merge of two instances from different seeds runs with finite outputs;
- ok: captured, self-merge error < 1e-5, own type and two inits;
- s: seconds for the row.

Writes `hf_zoo.md` and `hf_zoo.csv` to `--out`; `--families` re-measures those rows only.
"""
from __future__ import annotations

import argparse
import copy
import csv
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import hf_families
from benchmarks.common.tables import markdown_table, write_dict_csv

RESULTS = Path(__file__).resolve().parent / "results"
EXACT = 1e-5
FIELDS = ["family", "model", "capture", "zipped", "barrier", "self_merge", "self_merge_note",
          "self_merge_error", "own_type", "two_inits", "seconds", "error"]


def relative_error(out: Any, ref: Any) -> float:
    a, b = hf_families.logits(out), hf_families.logits(ref)
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def measure(family: str) -> dict[str, Any]:
    """One family's row (errors are reported in the row, the run goes on)."""
    import fxzip

    start = time.perf_counter()
    row: dict[str, Any] = dict(family=family, model=hf_families.FAMILIES[family][0], capture="",
                               zipped="", barrier="-", self_merge="", self_merge_note="",
                               self_merge_error="", own_type=False, two_inits=False, error="")
    try:
        model, batch = hf_families.build(family), hf_families.batch(family)
        analysis = fxzip.analyze(model, batch)
        stops = set(analysis.stop_points)
        row["zipped"] = (f"{sum(1 for n in analysis.all_layers if n in stops)}/"
                         f"{len(analysis.all_layers)}")
        if analysis.barriers:
            first = analysis.barriers[0]
            row["barrier"] = f"{first.node} ({first.op}): {first.reason}"
        partner, row["self_merge"], row["self_merge_note"] = _partner(model, batch)
        merged = fxzip.merge(model, partner, [batch], reset_bn=False, progress=False)
        row["capture"] = merged.fxzip_report.settings["capture"]
        with torch.no_grad():
            ref = model(**batch)
            outs = merged(**batch)
        row["self_merge_error"] = max(relative_error(o, ref) for o in outs)
        row["own_type"] = all(type(o) is type(ref) for o in outs)
        other = hf_families.build(family, seed=1)
        batches = [hf_families.batch(family, seed=s) for s in range(2)]
        two = fxzip.merge(model, other, batches, progress=False)
        with torch.no_grad():
            row["two_inits"] = all(bool(torch.isfinite(hf_families.logits(o)).all())
                                   for o in two(**batch))
    except Exception as exc:  # noqa: BLE001 - reported per family
        row["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def _partner(model: torch.nn.Module, batch: dict) -> tuple[torch.nn.Module, str, str]:
    """A permuted copy computing the model's function, else a plain copy and why."""
    import fxzip

    try:
        permuted, count = fxzip.testing.permuted_copy(model, batch, seed=1)
    except Exception as exc:  # noqa: BLE001
        return copy.deepcopy(model), "plain copy", f"no permuted copy: {type(exc).__name__}"
    with torch.no_grad():
        err = relative_error(permuted(**batch), model(**batch))
    if count and err < EXACT:
        return permuted, "permuted", ""
    return copy.deepcopy(model), "plain copy", (f"the permuted copy computes another function "
                                                f"(relative error {err:.1e})" if count else
                                                "no space to permute")


def ok(row: dict) -> bool:
    err = row.get("self_merge_error")
    return (not row.get("error") and err not in ("", None) and float(err) < EXACT
            and str(row.get("own_type")) == "True" and str(row.get("two_inits")) == "True")


def table(rows: list[dict]) -> str:
    """The markdown table of every family's row, in the families' order, with a summary."""
    cells = [[r["family"], r["model"], r["capture"] or "-", r["zipped"] or "-",
              r["barrier"] if not r["error"] else f"error: {r['error']}", r["self_merge"] or "-",
              f"{float(r['self_merge_error']):.1e}" if r["self_merge_error"] != "" else "-",
              "yes" if str(r["own_type"]) == "True" else "no",
              "yes" if str(r["two_inits"]) == "True" else "no", "yes" if ok(r) else "no",
              r["seconds"]] for r in rows]
    complete = sum(1 for r in rows if ok(r) and r["barrier"] == "-")
    summary = (f"{sum(map(ok, rows))}/{len(rows)} families merge end to end and give their outputs "
               f"back when merged with a copy of themselves ({sum(1 for r in rows if ok(r) and r['self_merge'] == 'permuted')} "
               f"with a permuted copy); {complete}/{len(rows)} are zipped completely (no barrier).")
    return "\n\n".join([summary, markdown_table(
        ["family", "model", "capture", "zipped", "first barrier", "self-merge",
         "self-merge error", "own type", "two inits", "ok", "s"], cells)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hf_zoo",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", help="comma-separated subset of families")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    chosen = args.families.split(",") if args.families else list(hf_families.FAMILIES)
    unknown = sorted(set(chosen) - set(hf_families.FAMILIES))
    if unknown:
        parser.error(f"not a family: {', '.join(unknown)}")
    path = args.out / "hf_zoo.csv"
    old = {r["family"]: r for r in csv.DictReader(open(path))} if path.exists() else {}
    for family in chosen:
        old[family] = measure(family)
        print(f"{family}: {'ok' if ok(old[family]) else 'NOT ok'} {old[family]}", flush=True)
    rows = [old[f] for f in hf_families.FAMILIES if f in old]
    args.out.mkdir(parents=True, exist_ok=True)
    write_dict_csv(path, rows, FIELDS)
    text = table(rows)
    (args.out / "hf_zoo.md").write_text(f"command: `python -m benchmarks.hf_zoo`\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
