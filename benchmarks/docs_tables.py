"""Every table and measured number in README.md and docs/*.md, regenerated from benchmarks/results/.

A document marks a generated table as

    <!-- table: NAME -->
    | ... |
    <!-- /table -->

and a number in running text as ``<!-- value: NAME -->3.26×<!-- /value -->``. NAME is a generator
registered in this module (``@table("NAME")`` or ``@value("NAME")``): a table copied from a result
``.md`` file, a subset of a result CSV's columns, or a table derived from the per-pair CSVs (the
headline). Nothing between the markers is written by hand.

    python -m benchmarks.docs_tables            # rewrite the generated blocks in place
    python -m benchmarks.docs_tables --check    # rewrite nothing; exit 1 naming each stale block
    python -m benchmarks.docs_tables --list     # the generators and the result files they read

Standard library only (csv, re, pathlib), so that the documentation check runs anywhere.
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean

__all__ = ["ROOT", "RESULTS", "TABLES", "VALUES", "doc_files", "render", "blocks", "differences",
           "update", "main"]

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

TABLE_RE = re.compile(r"(<!-- table: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /table -->)",
                      re.DOTALL)
VALUE_RE = re.compile(r"(<!-- value: (?P<name>[\w.-]+) -->)(?P<body>[^\n]*?)(<!-- /value -->)")


@dataclass
class Generator:
    """A registered generator: what it makes and which result files it reads."""

    name: str
    make: Callable[[], str]
    sources: tuple[str, ...]
    doc: str = ""


TABLES: dict[str, Generator] = {}
VALUES: dict[str, Generator] = {}


def table(name: str, *sources: str) -> Callable[[Callable[[], str]], Callable[[], str]]:
    """Register a table generator: a function returning markdown (no trailing newline)."""
    def deco(make: Callable[[], str]) -> Callable[[], str]:
        TABLES[name] = Generator(name, make, sources, (make.__doc__ or "").strip())
        return make
    return deco


def value(name: str, *sources: str) -> Callable[[Callable[[], str]], Callable[[], str]]:
    """Register an inline value generator: a function returning one line of text."""
    def deco(make: Callable[[], str]) -> Callable[[], str]:
        VALUES[name] = Generator(name, make, sources, (make.__doc__ or "").strip())
        return make
    return deco


# ---------------------------------------------------------------------------------------------
# reading result files
# ---------------------------------------------------------------------------------------------

@dataclass
class Table:
    """A markdown table: header cells, alignment cells (`---`, `---:`), rows of cells."""

    header: list[str]
    align: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [self.header, self.align, *self.rows]
        return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)

    def column(self, name: str) -> int:
        try:
            return self.header.index(name)
        except ValueError:
            raise KeyError(f"no column {name!r} in a table with columns {self.header}") from None

    def select(self, columns: Sequence[str], rename: dict[str, str] | None = None) -> Table:
        """The named columns, in that order, headers renamed by `rename`."""
        rename = rename or {}
        idx = [self.column(c) for c in columns]
        return Table([rename.get(c, c) for c in columns], [self.align[i] for i in idx],
                     [[row[i] for i in idx] for row in self.rows])

    def where(self, keep: Callable[[dict[str, str]], bool]) -> Table:
        """The rows for which `keep(row as a dict of header -> cell)` is true."""
        return Table(self.header, self.align,
                     [row for row in self.rows if keep(dict(zip(self.header, row)))])


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def md_tables(name: str) -> list[Table]:
    """Every table of result file `name` (a markdown file in benchmarks/results/), in order."""
    lines = (RESULTS / name).read_text(encoding="utf-8").splitlines()
    tables, current = [], []
    for line in [*lines, ""]:
        if line.startswith("|"):
            current.append(line)
            continue
        if len(current) >= 2:
            header, align, *rows = [_cells(ln) for ln in current]
            tables.append(Table(header, align, rows))
        current = []
    return tables


def md_table(name: str, index: int = 0) -> Table:
    tables = md_tables(name)
    if index >= len(tables):
        raise KeyError(f"benchmarks/results/{name} holds {len(tables)} tables, not {index + 1}")
    return tables[index]


def read_csv(name: str) -> list[dict[str, str]]:
    """The rows of result file `name` (a CSV in benchmarks/results/) as dicts."""
    with open(RESULTS / name, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def markdown(header: Sequence[str], rows: Iterable[Sequence[str]],
             right: Iterable[int] = ()) -> str:
    right = set(right)
    return Table(list(header), ["---:" if i in right else "---" for i in range(len(header))],
                 [list(r) for r in rows]).markdown()


# ---------------------------------------------------------------------------------------------
# README: the headline
# ---------------------------------------------------------------------------------------------

# (label, result CSV, stop points shown); 'layer3' equals 'full' in (a) and (d), 'stage3' in (c)
HEADLINE = (
    ("(a) ResNet-20×4, digits", "accuracy_a.csv", ("layer1", "layer2", "full")),
    ("(b) VGG-style CNN, flattening classifier, digits", "accuracy_b.csv",
     ("stage1", "stage2", "full")),
    ("(c) 1-D CNN, mnist1d", "accuracy_c.csv", ("stage1", "stage2", "full")),
    ("(d) ResNet-20×4 into shared class embeddings, digits", "accuracy_d.csv",
     ("layer1", "layer2", "full", "shared")),
    ("(e) VGG-style CNN without BatchNorm, digits", "accuracy_e.csv", ("stage1", "stage2", "full")),
    ("ViT (LayerNorm, head-aware attention), digits", "vit_digits.csv",
     ("block 1/4", "block 2/4", "block 3/4", "full")),
)


def joint_means(name: str) -> dict[tuple[str, str], float]:
    """Mean joint accuracy (%) over the evaluation pairs, per (method, stop)."""
    runs: dict[tuple[str, str], list[float]] = {}
    for row in read_csv(name):
        runs.setdefault((row["method"], row["stop"]), []).append(100 * float(row["joint"]))
    return {key: mean(v) for key, v in runs.items()}


def _pairs(name: str) -> int:
    rows = read_csv(name)
    key = "pair" if "pair" in rows[0] else "seed"
    return len({row[key] for row in rows})


@table("headline", *(source for _, source, _ in HEADLINE))
def headline() -> str:
    """Per setting and stop point: the paper's ZipIt! (alpha/beta chosen on a held-out pair, no
    corrections), fxzip's default merge, the ensemble of the two models (joint accuracy %, mean
    over the evaluation pairs), and the share of zipit's gap to the ensemble that the default
    closes: (default - zipit) / (ensemble - zipit)."""
    rows = []
    for label, source, stops in HEADLINE:
        means = joint_means(source)
        ensemble = means[("ensemble", "-")]
        zipit = [means[("zipit", s)] for s in stops]
        default = [means[("default", s)] for s in stops]
        closed = [(d - z) / (ensemble - z) for z, d in zip(zipit, default)]
        rows.append([label, ", ".join(stops), ", ".join(f"{z:.1f}" for z in zipit),
                     ", ".join(f"{d:.1f}" for d in default), f"{ensemble:.1f}",
                     ", ".join(f"{c:.2f}" for c in closed)])
    return markdown(["setting", "stops", "zipit (paper)", "default", "ensemble", "gap closed"],
                    rows, right=[4])


@value("headline_pairs", *(source for _, source, _ in HEADLINE))
def headline_pairs() -> str:
    """The number of evaluation pairs behind each headline mean (one number if all agree)."""
    counts = sorted({_pairs(source) for _, source, _ in HEADLINE})
    return " or ".join(str(c) for c in counts)


# ---------------------------------------------------------------------------------------------
# docs/results.md: the paper's protocol, the ViT, multi-task, width, CCA, corrections
# ---------------------------------------------------------------------------------------------

def _accuracy(setting: str) -> str:
    """The paper's protocol, one setting: every method at every stop point. The settings="auto"
    rows are left out (the runs chose by different measures; see the `fidelity` table)."""
    return md_table(f"accuracy_{setting}.md").where(lambda r: r["method"] != "auto").markdown()


for _setting in "abcde":
    table(f"accuracy_{_setting}", f"accuracy_{_setting}.md")(
        lambda s=_setting: _accuracy(s))


def _run_seconds(name: str) -> int:
    """The total of a result file's 'Run time: ... total Ns.' line."""
    text = (RESULTS / name).read_text(encoding="utf-8")
    found = re.search(r"Run time:.*?total (\d+)s", text)
    if not found:
        raise KeyError(f"no 'Run time: ... total Ns' line in benchmarks/results/{name}")
    return int(found.group(1))


@value("accuracy_minutes", *(f"accuracy_{s}.md" for s in "abcd"))
def accuracy_minutes() -> str:
    """Minutes `python -m benchmarks.accuracy` (settings a-d) took: the result files' run times."""
    return f"{round(sum(_run_seconds(f'accuracy_{s}.md') for s in 'abcd') / 60)}"



FIDELITY = (("(a)", "accuracy_a.md"), ("(b)", "accuracy_b.md"), ("(c)", "accuracy_c.md"),
            ("(d)", "accuracy_d.md"))


@table("fidelity", *(source for _, source in FIDELITY))
def fidelity() -> str:
    """Does fidelity (no labels) rank settings as joint accuracy does? Per setting and stop: rho
    (Spearman, -relative error vs joint accuracy) over the paper's alpha/beta grid on the
    held-out pair and over the settings="auto" grid on the evaluation pairs; the test joint
    accuracy of the grid point chosen by relative error (what settings="auto" returns), by KL, by
    validation labels, and the grid's best (oracle); seconds of one auto merge and one default."""
    header = ["setting", "stop", "rho, paper's α/β grid", "rho, auto grid", "by rel. err (auto)",
              "by KL", "by val. labels", "oracle", "seconds auto / default"]
    rows = []
    for label, source in FIDELITY:
        paper = {r[0]: r for r in md_table(source, 1).select(["stop", "rho rel.err cal"]).rows}
        grid = md_table(source, 2)
        by_kl = "by KL" if "by KL" in grid.header else "auto (KL)"  # runs that chose by KL
        auto = grid.select(["stop", "rho rel.err cal", "by rel.err", by_kl, "by val labels",
                            "oracle", "seconds auto / default"])
        for stop, rho, by_err, by_kl, by_val, oracle, seconds in auto.rows:
            rows.append([label, stop, paper[stop][1], rho, by_err, by_kl, by_val, oracle, seconds])
    return markdown(header, rows, right=range(2, len(header)))


table("vit_digits", "vit_digits.md")(lambda: md_table("vit_digits.md").markdown())
table("bert_digits", "bert_digits.md")(lambda: md_table("bert_digits.md").markdown())
table("lm_text", "lm_text.md")(lambda: md_table("lm_text.md").markdown())


@value("lm_text_to_model", "lm_text.csv")
def lm_text_to_model() -> str:
    """The largest difference of a written-back model's logits (`fxzip.to_model`) to its merged
    GraphModule's, over every merge of the language-model benchmark."""
    cells = [r["to_model_max_abs_diff"] for r in read_csv("lm_text.csv") if r["merge_seconds"]]
    try:
        return f"{max(float(c) for c in cells):.1e}"
    except ValueError:
        raise KeyError("lm_text.csv: a merge without a to_model difference (to_model failed)"
                       ) from None


@value("lm_text_minutes", "lm_text.md")
def lm_text_minutes() -> str:
    """Minutes `python -m benchmarks.lm_text` took (its 'Run time: Ns.' line)."""
    text = (RESULTS / "lm_text.md").read_text(encoding="utf-8")
    found = re.search(r"Run time: (\d+)s", text)
    if not found:
        raise KeyError("no 'Run time: Ns' line in benchmarks/results/lm_text.md")
    return f"{round(int(found.group(1)) / 60)}"


table("multi_task", "multi_task.md")(lambda: md_table("multi_task.md").markdown())
table("five_tasks", "five_tasks.md")(lambda: md_table("five_tasks.md").markdown())
table("demo", "demo/demo.md")(lambda: md_table("demo/demo.md").markdown())
table("generator", "generator.md")(lambda: md_table("generator.md").markdown())
table("data_free", "data_free.md")(lambda: md_table("data_free.md").markdown())


@value("data_free_summary", "data_free.csv")
def data_free_summary() -> str:
    """Per model family: the data-free default's joint accuracy minus the data default's, per
    stop point (means over the pairs, points)."""
    rows = read_csv("data_free.csv")
    parts = []
    for family in dict.fromkeys(r["family"] for r in rows):
        gaps = []
        for stop in dict.fromkeys(r["stop"] for r in rows if r["family"] == family):
            def joint(variant: str) -> float:
                values = [float(r["joint"]) for r in rows if (r["family"], r["stop"],
                                                             r["variant"]) == (family, stop, variant)]
                return 100 * mean(values) if values else float("nan")
            if stop != "-":
                gaps.append(f"{joint(DATA_FREE_DEFAULT) - joint(DATA_DEFAULT):+.1f} ({stop})")
        parts.append(f"{family}: {', '.join(gaps)}")
    return ("The data-free default against the default merge with data, joint accuracy points: "
            + "; ".join(parts) + ".")


DATA_DEFAULT = "data: default (zipit + corrections)"
DATA_FREE_DEFAULT = "data-free: default (weights + corrections)"


@table("width", "width.md")
def width() -> str:
    """Joint accuracy against the merged width (setting (a), 3 pairs), with the emitted model's
    parameters, non-zero parameters and FLOPs."""
    return md_table("width.md").select(
        ["method", "stop", "width", "params", "nonzero params", "FLOPs", "joint"]).markdown()


@table("cca", "cca.md", "width.md")
def cca() -> str:
    """CCA Merge against ZipIt!, with and without the default corrections (setting (a), 3
    pairs, width 1): joint accuracy % at the layer2 and full stops."""
    rows = {}
    for source in ("cca.md", "width.md"):
        t = md_table(source)
        for r in t.rows:
            r = dict(zip(t.header, r))
            if r["width"] in ("1", "-"):
                rows.setdefault(r["method"], {})[r["stop"]] = r["joint"]
    names = (("cca", "cca, no corrections"), ("zipit", "zipit (α 0.5, β 1), no corrections"),
             ("cca+corrections", "cca + the default corrections"),
             ("default", "default (zipit + corrections)"))
    out = [[label, rows[m]["layer2"], rows[m]["full"]] for m, label in names]
    out.append(["ensemble", rows["ensemble"]["-"], rows["ensemble"]["-"]])
    return markdown(["method", "layer2", "full"], out, right=[1, 2])


for _setting in "ace":
    table(f"corrections_{_setting}", f"corrections_{_setting}.md")(
        lambda s=_setting: md_table(f"corrections_{s}.md").markdown())


table("scarce_data", "scarce_data.md")(lambda: md_table("scarce_data.md").markdown())


@table("scarce_data_validation", "scarce_data_validation.csv")
def scarce_data_validation() -> str:
    """The few-sample settings tried on the validation split: joint accuracy % per calibration
    sample count, mean over pairs, draws and both stop points (layer2, full)."""
    runs: dict[tuple[str, int], list[float]] = {}
    for row in read_csv("scarce_data_validation.csv"):
        runs.setdefault((row["variant"], int(row["samples"])), []).append(100 * float(row["joint"]))
    counts = sorted({n for _, n in runs})
    names = {"paper": "paper's merge", "fixed": "no few-sample rule (bn_prior=0)",
             "default": "default (bn_prior=16)"}
    variants = list(dict.fromkeys(v for v, _ in runs))
    rows = [[names.get(v, v)] + [f"{mean(runs[(v, n)]):.1f}" for n in counts] for v in variants]
    return markdown(["variant"] + [str(n) for n in counts], rows, right=range(1, len(counts) + 1))


# ---------------------------------------------------------------------------------------------
# docs/scale-out.md: speed, memory, torch.distributed
# ---------------------------------------------------------------------------------------------

table("scale", "scale.md")(lambda: md_table("scale.md").markdown())

MEMORY_COLUMNS = ["case", "params per model", "models GiB", "memory_gib",
                  "resident before merge GiB", "peak GiB", "bound GiB", "peak ≤ bound", "merge s",
                  "statistics passes", "peak GiB per phase"]


@table("memory", "memory_vit.md", "memory.md")
def memory() -> str:
    """The default merge of ViT-B/16 and of the decoders within memory_gib: the ViT's row from
    its own run (memory_vit.md), the decoders' from memory.md."""
    vit = md_table("memory_vit.md").where(lambda r: r["case"].startswith("vit"))
    decoders = md_table("memory.md").where(lambda r: not r["case"].startswith("vit"))
    return Table(vit.header, vit.align, vit.rows + decoders.rows).select(MEMORY_COLUMNS).markdown()


table("memory_ranks", "memory_ranks.md")(lambda: md_table("memory_ranks.md").select(
    ["case", "rank", "memory_gib", "peak GiB", "merge s", "statistics passes", "statistics GiB",
     "statistics ÷ one process"]).markdown())
table("memory_compare", "memory_compare.md")(
    lambda: md_table("memory_compare.md").markdown())
table("wide_matching", "wide_matching.md")(lambda: md_table("wide_matching.md").markdown())
table("merge_breakdown", "1_merge_breakdown.md")(
    lambda: md_table("1_merge_breakdown.md").markdown())
table("matching", "3_matching.md")(lambda: md_table("3_matching.md").markdown())
table("inference", "5_inference.md")(lambda: md_table("5_inference.md").markdown())


@table("statistics_vs_forward", "2_statistics_vs_forward.md")
def statistics_vs_forward() -> str:
    """The statistics pass against plain forwards of both models (wall time)."""
    return md_table("2_statistics_vs_forward.md").select(
        ["case", "batches", "spaces", "statistics s (bfloat16)", "plain fwd s", "ratio",
         "statistics s (float32)", "ratio (float32)", "tap fwd/plain", "Gram/fwd FLOPs"]).markdown()


@table("peak_memory", "4_peak_memory.md")
def peak_memory() -> str:
    """Peak resident memory of a merge above the models and data."""
    return md_table("4_peak_memory.md").select(
        ["case", "params (both)", "param MiB (both)", "merge - models+data",
         "(merge - models+data)/param MiB", "peak in trace+analysis", "peak in statistics",
         "peak in matching+rewrite+bn_reset"]).markdown()


FLOOR_COLUMNS = ["case", "merge", "taps", "statistics/plain CPU (≤ 1.5)", "merge/plain CPU (≤ 3)",
                 "Gram/fwd FLOPs", "statistics peak MiB", "merge peak MiB"]
PHASE_COLUMNS = ["case", "merge", "taps", "plain fwd s", "trace", "statistics", "matching",
                 "rewrite", "bn_reset", "corrections", "other"]


def _joined(name: str, columns: Sequence[str]) -> Table:
    tables = [t.select(columns) for t in md_tables(name)]
    return Table(tables[0].header, tables[0].align, [r for t in tables for r in t.rows])


table("floor", "6_floor.md")(lambda: _joined("6_floor.md", FLOOR_COLUMNS).markdown())

WALL_COLUMNS = ["case", "merge", "taps", "threads", "plain fwd s", "statistics/plain wall (≤ 1.5)",
                "merge/plain wall (≤ 3; default ≤ 4)", "statistics/plain CPU (≤ 1.5)",
                "merge/plain CPU (≤ 3)", "Gram/fwd FLOPs", "trace", "statistics", "matching",
                "rewrite", "bn_reset", "corrections"]


@table("floor_wall", "6_floor_wall_resnet50.md", "6_floor_wall_vit.md")
def floor_wall() -> str:
    """The cost against the floor in wall-clock time with torch's default threads, per model."""
    tables = [_joined(name, WALL_COLUMNS) for name in ("6_floor_wall_resnet50.md",
                                                         "6_floor_wall_vit.md")]
    return Table(tables[0].header, tables[0].align, [r for t in tables for r in t.rows]).markdown()

table("floor_256", "6_floor_256.md")(lambda: _joined("6_floor_256.md", FLOOR_COLUMNS).markdown())
table("floor_phases", "6_floor.md")(lambda: _joined("6_floor.md", PHASE_COLUMNS).markdown())


def _floor_ratio(case_prefix: str) -> float:
    """CPU time of fxzip's default merge ÷ the paper's merge (taps all) in 6_floor.csv."""
    merges = {}
    for row in read_csv("6_floor.csv"):
        if row["case"].startswith(case_prefix) and row["taps"] == "all":
            merges[row["merge"].split()[0]] = float(row["merge CPU s"])
    return merges["default"] / merges["paper"]


value("default_cost_resnet50", "6_floor.csv")(lambda: f"{_floor_ratio('resnet50'):.2f}×")
value("default_cost_vit", "6_floor.csv")(lambda: f"{_floor_ratio('ViT-S/16'):.2f}×")

table("spread_accuracy", "6_spread_accuracy.md")(
    lambda: md_table("6_spread_accuracy.md", 1).markdown())
table("positions_accuracy", "6_positions_accuracy.md")(
    lambda: md_table("6_positions_accuracy.md", 0).markdown())
table("positions_vit", "6_positions_accuracy.md")(
    lambda: md_table("6_positions_accuracy.md", 1).markdown())
table("spread_positions_vit", "6_positions_accuracy.md")(
    lambda: md_table("6_positions_accuracy.md", 2).markdown())


# ---------------------------------------------------------------------------------------------
# docs/architectures.md: the zoos
# ---------------------------------------------------------------------------------------------

EXACT = 1e-4  # the zoo runner's bound on a self-merge's relative error


def _barrier(text: str) -> str:
    """A barrier as the zoo wrote it, without the layout dump that follows some reasons."""
    text = text.split(" ((", 1)[0]
    return text.replace("|", "/")


def _zoo_ok(row: dict[str, str]) -> bool:
    err = row["self_merge_error"]
    return row["traced"] == "True" and err != "" and float(err) < EXACT and \
        row["two_inits"] == "True"


def _zoo_table(name: str) -> str:
    """The zoo's CSV without the run and timing columns. "self-merge": what the model was merged
    with, a permuted copy or a plain one (rows written before the runner recorded it: plain)."""
    rows = []
    for r in read_csv(name):
        err = r["self_merge_error"]
        rows.append([r["model"], r["family"], r["zipped"] or "-",
                     r["heads"] if r["heads"] not in ("", "0") else "-",
                     _barrier(r["barrier"]) if not r["error"] else f"error: {_barrier(r['error'])}",
                     r.get("self_merge") or "plain copy", f"{float(err):.1e}" if err else "-",
                     "yes" if r["two_inits"] == "True" else "no", "yes" if _zoo_ok(r) else "no"])
    return markdown(["model", "family", "zipped", "head groups", "first barrier", "self-merge",
                     "self-merge error", "two inits", "ok"], rows)


def _zoo_summary(name: str) -> str:
    rows = read_csv(name)
    complete = sum(1 for r in rows if r["barrier"] == "-" and r["traced"] == "True"
                   and not r["error"])
    ok = [r for r in rows if _zoo_ok(r)]
    permuted = sum(1 for r in ok if (r.get("self_merge") or "plain copy") == "permuted")
    return (f"{len(ok)}/{len(rows)} architectures merge end to end and give their outputs back "
            f"when merged with a copy of themselves (relative error < {EXACT:g}): {permuted} "
            f"with a permuted copy, {len(ok) - permuted} with a plain copy; {complete}/{len(rows)} "
            "are zipped completely (no barrier)")


def _zoo_notes(name: str) -> str:
    """One line per row the zoo wrote a note for (why a plain copy, float32 rounding) or that is
    not ok, with its self-merge error."""
    lines = []
    for r in read_csv(name):
        note = r.get("self_merge_note") or ""
        if note or not _zoo_ok(r):
            err = r["self_merge_error"]
            error = f"self-merge error {float(err):.1e}" if err else "no self-merge"
            lines.append(f"- {r['model']} ({error}{'' if _zoo_ok(r) else ', not ok'}): "
                         f"{note or _barrier(r['error']) or 'no note'}")
    return "\n".join(lines) or "- none"


def _capture_comparison() -> str:
    """Per zoo: how many architectures each front end zips completely, how many zip as far under
    torch.export as under torch.fx, and how many self-merges each gives back."""
    rows = []
    for label, name in (("timm", "timm_zoo"), ("torchvision", "torchvision_zoo")):
        fx_rows = {r["model"]: r for r in read_csv(f"{name}.csv")}
        export_rows = {r["model"]: r for r in read_csv(f"{name}_export.csv")}
        shared = [m for m in fx_rows if m in export_rows]
        complete = {k: sum(1 for m in shared if rows_[m]["barrier"] == "-"
                           and rows_[m]["traced"] == "True" and not rows_[m]["error"])
                    for k, rows_ in (("fx", fx_rows), ("export", export_rows))}
        as_far = sum(1 for m in shared if export_rows[m]["zipped"] == fx_rows[m]["zipped"])
        ok = {k: sum(1 for m in shared if _zoo_ok(rows_[m]))
              for k, rows_ in (("fx", fx_rows), ("export", export_rows))}
        rows.append([label, str(len(shared)), str(complete["fx"]), str(complete["export"]),
                     str(as_far), str(ok["fx"]), str(ok["export"])])
    return markdown(["zoo", "architectures", "zipped completely: fx", "zipped completely: export",
                     "export zips as far as fx", "self-merge given back: fx",
                     "self-merge given back: export"], rows)


table("capture_comparison", "timm_zoo.csv", "timm_zoo_export.csv", "torchvision_zoo.csv",
      "torchvision_zoo_export.csv")(_capture_comparison)


table("hf_zoo", "hf_zoo.md")(lambda: md_table("hf_zoo.md").markdown())
value("hf_zoo_summary", "hf_zoo.md")(
    lambda: (RESULTS / "hf_zoo.md").read_text(encoding="utf-8").split("\n\n")[1].strip())
table("timm_zoo", "timm_zoo.csv")(lambda: _zoo_table("timm_zoo.csv"))
table("timm_zoo_notes", "timm_zoo.csv")(lambda: _zoo_notes("timm_zoo.csv"))
table("torchvision_zoo_notes", "torchvision_zoo.csv")(lambda: _zoo_notes("torchvision_zoo.csv"))
table("torchvision_zoo", "torchvision_zoo.csv")(lambda: _zoo_table("torchvision_zoo.csv"))
value("timm_zoo_summary", "timm_zoo.csv")(lambda: _zoo_summary("timm_zoo.csv"))
value("torchvision_zoo_summary", "torchvision_zoo.csv")(
    lambda: _zoo_summary("torchvision_zoo.csv"))


# ---------------------------------------------------------------------------------------------
# the documents
# ---------------------------------------------------------------------------------------------

def doc_files() -> list[Path]:
    """README.md and every docs/*.md."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _generate(kind: str, name: str, where: str) -> str:
    registry = TABLES if kind == "table" else VALUES
    if name not in registry:
        raise KeyError(f"{where}: unknown {kind} generator {name!r}; known: "
                       f"{', '.join(sorted(registry))}")
    return registry[name].make()


def blocks(text: str) -> list[tuple[str, str, str]]:
    """(kind, name, current body) of every generated block of a document, in order."""
    found = [(m.start(), "table", m["name"], m["body"]) for m in TABLE_RE.finditer(text)]
    found += [(m.start(), "value", m["name"], m["body"]) for m in VALUE_RE.finditer(text)]
    return [(kind, name, body) for _, kind, name, body in sorted(found)]


def render(text: str, where: str = "<text>") -> str:
    """`text` with every generated block replaced by what its generator gives now."""
    text = TABLE_RE.sub(lambda m: m.group(1) + _generate("table", m["name"], where).rstrip("\n")
                        + "\n" + m.group(4), text)
    return VALUE_RE.sub(lambda m: m.group(1) + _generate("value", m["name"], where) + m.group(4),
                        text)


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def differences(paths: Iterable[Path] | None = None) -> list[str]:
    """One line per generated block whose text differs from what the result files give."""
    out = []
    for path in (doc_files() if paths is None else paths):
        text = path.read_text(encoding="utf-8")
        where = _relative(path)
        for kind, name, body in blocks(text):
            want = _generate(kind, name, where)
            have = body.rstrip("\n") if kind == "table" else body
            if have != want.rstrip("\n"):
                out.append(f"{where}: {kind} '{name}' differs from what benchmarks/results/ gives "
                           f"({', '.join((TABLES if kind == 'table' else VALUES)[name].sources)})")
    return out


def update(paths: Iterable[Path] | None = None) -> list[Path]:
    """Rewrite the generated blocks of the documents; the paths that changed."""
    changed = []
    for path in (doc_files() if paths is None else paths):
        text = path.read_text(encoding="utf-8")
        new = render(text, _relative(path))
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed.append(path)
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.docs_tables",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 naming every block that is out of date")
    parser.add_argument("--list", action="store_true",
                        help="list the generators and the result files each reads")
    args = parser.parse_args(argv)
    if args.list:
        for kind, registry in (("table", TABLES), ("value", VALUES)):
            for gen in registry.values():
                print(f"{kind} {gen.name}: {', '.join(gen.sources)}")
        return 0
    try:
        if args.check:
            stale = differences()
            for line in stale:
                print(line)
            if stale:
                print("run `python -m benchmarks.docs_tables` to regenerate them", file=sys.stderr)
            return 1 if stale else 0
        for path in update():
            print(f"updated {_relative(path)}")
    except KeyError as e:
        print(f"docs_tables: error: {e.args[0]}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"docs_tables: error: {e.filename}: no such file", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
