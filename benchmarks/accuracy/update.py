"""Part of `benchmarks.accuracy` (`python -m benchmarks.accuracy --methods M --update`): add or
recompute the rows of some methods in a setting's EXISTING result files, without re-running the
rest of the protocol (a full run of setting (a) takes about half an hour on one thread).

The evaluation pairs named in `accuracy_<setting>.csv` are retrained from their seeds (or loaded
from a trained-pair cache, `benchmarks.common.training.cached_pair`) with the epochs and the
setting title (so the width) that `accuracy_<setting>.md` states; zipit's alpha/beta come from the
markdown's "chosen per stop point" line. Before anything is written, the reference rows (model A,
model B, the ensemble, BatchNorm reset) are recomputed and compared with the CSV at its printed
precision: retraining that does not reproduce the models is an error, not new rows beside old
ones. Rows of a method already in the files are replaced (their differences are reported).

What changes: the CSV gains or replaces the methods' rows (every other line kept verbatim), the
markdown's table gains or replaces their lines (every other line kept verbatim: the auto rows, the
fidelity study and the run-time line stay as the full run wrote them) plus the methods legend and
one line with the update's own run time; the plot is redrawn from the CSV.
"""
from __future__ import annotations

import csv
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import fxzip
from fxzip.demo.digits import Accuracy

from benchmarks.common import tables
from benchmarks.common.rows import METRICS, Row, metric, reference_rows, summarise
from benchmarks.common.settings import Setting
from benchmarks.common.timing import Stopwatch
from benchmarks.common.training import cached_pair

from .protocol import MERGE_METHODS, PAPER_METHODS, Choice, SettingResult, merged_rows
from .report import METHODS_LEGEND, plot, table_cells

__all__ = ["UpdateError", "Update", "update_setting"]

CSV_COLUMNS = ["setting", "pair", "method", "stop", "zipped", "params", "flops", "joint", "task_a",
               "task_b", "avg", "alpha", "beta", "corrections"]
REFERENCE_METHODS = ("model A", "model B", "ensemble", "ensemble (mean emb)")
PRECISION = 5e-5  # the CSV's accuracies have four decimals
UPDATE_PREFIX = "Rows added later"


class UpdateError(RuntimeError):
    """The existing result files cannot take the update (missing, other settings, or the retrained
    pairs do not reproduce their reference rows)."""


@dataclass
class Update:
    """What `update_setting` did: the new rows, the per-row differences to rows it replaced, the
    reference rows it checked and its run time."""

    rows: list[Row]
    replaced: list[str] = field(default_factory=list)  # "pair 1 average layer1: joint 0.7 -> 0.71"
    checked: int = 0  # reference rows reproduced to the CSV's precision
    cached: list[int] = field(default_factory=list)  # pairs loaded from the cache, not trained
    seconds: dict[str, float] = field(default_factory=dict)


def csv_line(setting: Setting, r: Row) -> dict[str, str]:
    """A row as `report.write_csv` writes it (strings)."""
    values = [setting.key, r.pair, r.method, r.stop, r.zipped, r.params, r.flops,
              *(f"{metric(r.acc, m):.4f}" for m in METRICS),
              "" if r.alpha is None else r.alpha, "" if r.beta is None else r.beta, r.corrections]
    return dict(zip(CSV_COLUMNS, (str(v) for v in values)))


def row_of(line: dict[str, str]) -> Row:
    """A CSV line back as a Row (accuracies at the CSV's precision)."""
    number = lambda v: None if v == "" else float(v)  # noqa: E731
    return Row(int(line["pair"]), line["method"], line["stop"], line["zipped"], int(line["params"]),
               int(line["flops"]),
               Accuracy(float(line["joint"]), float(line["task_a"]), float(line["task_b"])),
               number(line["alpha"]), number(line["beta"]), line.get("corrections", ""))


def read_stated(setting: Setting, text: str) -> tuple[int, dict[str, Choice]]:
    """The epochs and zipit's chosen (alpha, beta) per stop point that a setting's markdown states;
    UpdateError where its title (so the width) is another."""
    title = re.search(r"^## Setting \((\w+)\): (.*)$", text, re.MULTILINE)
    if not title or title.group(1) != setting.key or title.group(2) != setting.title:
        raise UpdateError(f"the markdown is of {title.group(0) if title else 'no setting'!r}, not "
                          f"'## Setting ({setting.key}): {setting.title}' (another --width?)")
    epochs = re.search(r"(\d+) training epochs", text)
    if not epochs:
        raise UpdateError("the markdown states no 'N training epochs'")
    chosen = re.search(r"zipit \(alpha, beta\) chosen per stop point.*?: (.*)\.$", text, re.MULTILINE)
    choices = {} if not chosen else {
        stop: Choice(float(a), float(b), Accuracy(float(j) / 100, float("nan"), float("nan")))
        for stop, a, b, j in re.findall(r"([\w/ ]+): \(([\d.]+), ([\d.]+)\) val joint ([\d.]+)",
                                        chosen.group(1))}
    return int(epochs.group(1)), {k.strip(): c for k, c in choices.items()}


def differences(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """The columns of `old` where two CSV lines differ (accuracies beyond the printed precision)."""
    out = []
    for column in old:
        a, b = old[column], new[column]
        if column in METRICS:
            if abs(float(a) - float(b)) > PRECISION:
                out.append(f"{column} {a} -> {b}")
        elif a != b:
            out.append(f"{column} {a!r} -> {b!r}")
    return out


def line_key(line: dict[str, str]) -> tuple[str, str, str]:
    return line["pair"], line["method"], line["stop"]


def order_lines(setting: Setting, lines: list[dict[str, str]]) -> list[dict[str, str]]:
    """Per pair (in order of first appearance): the reference rows as they were, then the merge
    rows by stop point and method (`protocol.row_order`'s order)."""
    pairs = list(dict.fromkeys(line["pair"] for line in lines))
    stops = {stop.label: i for i, stop in enumerate(setting.stops)}
    rank = {"default": 0, "auto": 1, **{m: 2 + i for i, m in enumerate(PAPER_METHODS)}}
    return sorted(lines, key=lambda ln: (pairs.index(ln["pair"]), ln["stop"] != "-",
                                         stops.get(ln["stop"], -1), rank.get(ln["method"], 99)
                                         if ln["stop"] != "-" else 0))


def splice_table(setting: Setting, text: str, rows: Sequence[Row], note: str) -> str:
    """The markdown with the first table's lines of `rows`' (method, stop) groups replaced or
    inserted (other lines verbatim), the methods legend under the table if missing, and `note`
    after the run-time line (replacing an earlier note that names the same methods)."""
    lines = text.split("\n")
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| method |"))
    end = next(i for i in range(start, len(lines) + 1) if i == len(lines)
               or not lines[i].startswith("|"))
    body = {}
    for ln in lines[start + 2:end]:
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        body[(cells[0], cells[1])] = ln
    for s in summarise(rows):
        body[(s.method, s.stop)] = "| " + " | ".join(table_cells(setting, s)) + " |"
    stops = {stop.label: i for i, stop in enumerate(setting.stops)}
    rank = {"default": 0, "auto": 1, **{m: 2 + i for i, m in enumerate(PAPER_METHODS)}}
    keys = sorted(body, key=lambda k: (k[1] != "-", stops.get(k[1], -1),
                                       rank.get(k[0], 99) if k[1] != "-" else 0))
    lines[start + 2:end] = [body[k] for k in keys]
    end = start + 2 + len(keys)
    if not any(ln.startswith("Methods: ") for ln in lines):
        lines.insert(end + 1, METHODS_LEGEND)  # after the blank line under the table
    methods = ", ".join(dict.fromkeys(r.method for r in rows))
    lines = [ln for ln in lines if not ln.startswith(f"{UPDATE_PREFIX} ({methods})")]
    at = next((i for i, ln in enumerate(lines) if ln.startswith("Run time:")), None)
    lines.insert(len(lines) if at is None else at + 1, f"{UPDATE_PREFIX} ({methods}): {note}")
    return "\n".join(lines)


def update_setting(setting: Setting, out: Path, methods: Sequence[str], *, width: int,
                   cache: Path | None = None, log: Callable[[str], None] = print) -> Update:
    """Compute the rows of `methods` (a subset of `protocol.MERGE_METHODS`) for the evaluation
    pairs of `out/accuracy_<setting>.csv` and merge them into that setting's CSV, markdown and
    plot (see the module docstring). `width`: the cache's file names only."""
    unknown = [m for m in methods if m not in MERGE_METHODS]
    if unknown or not methods:
        raise UpdateError(f"--methods {unknown or '(none)'}: choose from {', '.join(MERGE_METHODS)}")
    csv_path, md_path = out / f"accuracy_{setting.key}.csv", out / f"accuracy_{setting.key}.md"
    if not csv_path.exists() or not md_path.exists():
        raise UpdateError(f"--update needs {csv_path.name} and {md_path.name} in {out}: run the "
                          f"setting once without --update")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        old = list(reader)
        columns = list(reader.fieldnames or [])  # older files lack "corrections": kept so
    if columns not in (CSV_COLUMNS, CSV_COLUMNS[:-1]):
        raise UpdateError(f"{csv_path.name} has columns {columns}, not {CSV_COLUMNS}")
    text = md_path.read_text()
    epochs, choices = read_stated(setting, text)
    if "zipit" in methods and sorted(choices) != sorted(s.label for s in setting.stops):
        raise UpdateError(f"{md_path.name} states no zipit alpha/beta for every stop point")
    pairs = sorted({int(line["pair"]) for line in old})
    stored = {line_key(line): line for line in old}
    watch = Stopwatch("data", "train", "evaluate")
    start = time.perf_counter()
    with watch("data"):
        data = setting.load()
    update = Update([])
    for pair in pairs:
        with watch("train"):
            if cache is not None and (cache / f"{setting.key}_w{width}_e{epochs}_seed{pair}.pt"
                                      ).exists():
                update.cached.append(pair)
            models = cached_pair(setting, data, pair, epochs, width, cache, log)
        with watch("evaluate"):
            zipper = fxzip.Zipper(models, data.calibration, progress=False)
            layers_total = len(zipper.analysis.all_layers)
            for ref in reference_rows(setting, pair, models, data, layers_total):
                line = csv_line(setting, ref)
                if line_key(line) not in stored:
                    raise UpdateError(f"{csv_path.name} has no row {line_key(line)}")
                diff = differences(stored[line_key(line)], line)
                if diff:
                    raise UpdateError(f"pair {pair} was not reproduced: {ref.method}: "
                                      f"{'; '.join(diff)} (other epochs, width or code, or another "
                                      f"machine or torch: training reproduces only on the same "
                                      f"float sums); run the setting in full instead")
                update.checked += 1
            rows = merged_rows(setting, pair, zipper, data, choices, methods)
        for r in rows:
            line = csv_line(setting, r)
            if line_key(line) in stored:
                diff = differences(stored[line_key(line)], line)
                update.replaced.append(f"pair {pair} {r.method} {r.stop}: "
                                       f"{'; '.join(diff) if diff else 'same'}")
        update.rows += rows
        log(f"  [{setting.key}] pair {pair}: reference rows reproduced; "
            f"{len(rows)} rows of {', '.join(methods)} ({time.perf_counter() - start:.0f}s)")
    update.seconds = {**watch.seconds, "total": time.perf_counter() - start}
    new = {line_key(line): line for line in (csv_line(setting, r) for r in update.rows)}
    lines = order_lines(setting, [new.get(line_key(ln), ln) for ln in old]
                        + [ln for k, ln in new.items() if k not in stored])
    tables.write_csv(csv_path, columns, ([ln[c] for c in columns] for ln in lines))
    seconds = ", ".join(f"{k} {v:.0f}s" for k, v in update.seconds.items())
    trained = [p for p in pairs if p not in update.cached]
    how = ("retrained the evaluation pairs from their seeds" if not update.cached else
           f"retrained pairs {', '.join(map(str, trained)) or 'none'} from their seeds and loaded "
           f"pairs {', '.join(map(str, update.cached))} from a cache of pairs trained the same way")
    note = (f"`python -m benchmarks.accuracy --settings {setting.key} --methods "
            f"{','.join(methods)} --update` {how} (their {update.checked} reference rows "
            f"reproduced to the CSV's precision) and merged only these methods; its run time: "
            f"{seconds}.")
    md_path.write_text(splice_table(setting, text, update.rows, note))
    plot(SettingResult(setting, [row_of(ln) for ln in lines], {}, []),
         out / f"accuracy_{setting.key}.png")
    return update
