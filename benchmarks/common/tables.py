"""The benchmarks' result tables: markdown for the docs and results/, CSV for the raw numbers,
aligned plain text for the terminal; `mean_std` formats a mean ± sample std cell."""
from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]],
                   right: Iterable[int] = ()) -> str:
    """A markdown table (no trailing newline); `right`: indices of right-aligned columns."""
    right = set(right)
    lines = ["| " + " | ".join(columns) + " |",
             "| " + " | ".join("---:" if i in right else "---" for i in range(len(columns))) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A CSV file: a header line of `columns`, then one line per row."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)


def write_dict_csv(path: Path, rows: Sequence[dict], columns: Sequence[str] | None = None) -> None:
    """A CSV file of dict rows: `columns` (default: the first row's keys) in that order; other
    keys are left out, missing ones left empty."""
    columns = list(rows[0]) if columns is None else list(columns)
    write_csv(path, columns, ([row.get(c, "") for c in columns] for row in rows))


def mean_std(values: Iterable[float], scale: float = 1.0, digits: int = 2) -> str:
    """The cell `mean ± std` of `values` × `scale` (sample std, ddof=1; 0 for one value; NaNs
    left out; "-" for none)."""
    v = np.asarray(list(values), dtype=float) * scale
    v = v[~np.isnan(v)]
    if not len(v):
        return "-"
    std = v.std(ddof=1) if len(v) > 1 else 0.0
    return f"{v.mean():.{digits}f} ± {std:.{digits}f}"


def fmt(value: Any) -> str:
    """A number as a table shows it: thousands separators for large values, three significant
    digits for small ones, "-" for NaN."""
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if value == 0 or abs(value) >= 100:
            return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 0.01 else f"{value:.3f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


@dataclass
class Table:
    """A titled table with free-text notes, printable and writable as `<name>.md` and `<name>.csv`
    (the CSV holds the raw values, the others `fmt`'s)."""

    name: str
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *row: Any) -> None:
        self.rows.append(list(row))

    def _cells(self) -> list[list[str]]:
        return [[fmt(v) for v in row] for row in self.rows]

    def text(self) -> str:
        """Aligned plain text for the terminal."""
        cells = self._cells()
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(self.columns)]

        def line(values: Sequence[str]) -> str:
            return "  ".join(v.rjust(w) if i else v.ljust(w)
                             for i, (v, w) in enumerate(zip(values, widths)))

        out = [f"== {self.title}", line(self.columns), line(["-" * w for w in widths])]
        out += [line(r) for r in cells] + [f"  note: {n}" for n in self.notes]
        return "\n".join(out)

    def markdown(self) -> str:
        out = [f"### {self.title}", "", markdown_table(self.columns, self._cells())]
        if self.notes:
            out += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(out) + "\n"

    def write(self, directory: Path) -> None:
        (directory / f"{self.name}.md").write_text(self.markdown())
        write_csv(directory / f"{self.name}.csv", self.columns, self.rows)
