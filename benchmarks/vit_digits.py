"""A real transformer merge: two small timm ViTs trained on disjoint halves of the digits.

    python -m benchmarks.vit_digits [--pairs 4] [--epochs 40] [--lr 1e-3] [--out benchmarks/results]
    python -m benchmarks.vit_digits --methods weights --update     # only these rows, into the files

Each pair: two `timm` VisionTransformers (`benchmarks.common.models.digits_vit`: 8×8 digits,
2×2 patches → 16 tokens + a cls token, width 64, 4 blocks, 4 heads), different initialisations,
trained on classes 0–4 and 5–9. They are merged with every method after the first three
transformer blocks (`blocks.0` … `blocks.2`) and fully (`None`: everything but the heads):
fxzip's default merge and the paper's methods, uncorrected (average = weight averaging, weights =
Git Re-Basin weight matching, permute = Git Re-Basin activation matching, zipit).
Attention is merged head-aware (`fxzip.matching.heads`: heads paired across models, features
matched within paired heads; queries and keys share one matching, values and the output
projection another). zipit's alpha and beta are chosen per stop point by a grid search on a
held-out pair (seed 0, validated on 20% of its training digits); the evaluation pairs are seeds
1..P. Joint accuracy = argmax over both heads' softmaxes over all 10 classes on the test digits;
mean ± std over the pairs. Writes `vit_digits.md` and `vit_digits.csv` to `--out`.

`--methods M --update` computes only the rows of methods M and merges them into the existing files
of `--out`: the pairs of the CSV are retrained from their seeds with the epochs and learning rate
the markdown states, their ensemble rows must reproduce the CSV's, zipit's alpha/beta are the
markdown's; the table is re-rendered from the CSV (its other lines come out as they were) and a line
with the update's own run time is added.
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

import fxzip
from fxzip.demo.digits import evaluate, load_digits_split, train_task_pair

from benchmarks.accuracy.protocol import MERGE_METHODS
from benchmarks.common.data import validation_as_test
from benchmarks.common.models import digits_vit
from benchmarks.common.tables import markdown_table, mean_std, write_dict_csv

STOPS = (("blocks.0", "block 1/4"), ("blocks.1", "block 2/4"), ("blocks.2", "block 3/4"),
         (None, "full"))


COLUMNS = ["seed", "method", "stop", "zipped", "joint", "task_a", "task_b"]
LEGEND = ("Methods: default = fxzip's default merge (zipit with the corrections); the paper's, "
          "uncorrected: average = weight averaging, weights = Git Re-Basin weight matching (no "
          "data), permute = Git Re-Basin activation matching, zipit = ZipIt! with the alpha/beta "
          "above.")
PAPER = dict(corrections=None, weight_similarity=0.0)  # the paper's merge: no corrections
GRID = [(alpha, beta) for alpha in (0.1, 0.3, 0.5, 1.0) for beta in (0.0, 0.25, 0.5, 1.0)]


def choose_alpha_beta(epochs: int, lr: float) -> dict:
    """zipit's (alpha, beta) per stop point, chosen on the held-out pair (seed 0): models trained
    on 80% of its training digits, joint accuracy measured on the other 20%."""
    held_out = validation_as_test(load_digits_split(seed=0))
    models = train_task_pair(held_out, digits_vit, seed=0, epochs=epochs, lr=lr)
    zipper = fxzip.Zipper(models, held_out.x_train, progress=False)
    chosen = {}
    for stop, label in STOPS:
        scores = {ab: evaluate(zipper.merge(stop, method="zipit", alpha=ab[0], beta=ab[1],
                                            **PAPER), held_out.x_test, held_out.y_test).joint
                  for ab in GRID}
        chosen[stop] = max(GRID, key=lambda ab: (scores[ab], -GRID.index(ab)))
        print(f"  held-out pair: {label}: alpha={chosen[stop][0]} beta={chosen[stop][1]} "
              f"(validation joint {scores[chosen[stop]]:.3f})", flush=True)
    return chosen


def run_pair(seed: int, epochs: int, lr: float, chosen: dict,
             methods: Sequence[str] = MERGE_METHODS) -> list[dict]:
    """The ensemble row and the rows of `methods` at every stop point for the pair of `seed`
    (`chosen`: zipit's (alpha, beta) per stop, needed only with "zipit")."""
    split = load_digits_split(seed=seed)
    models = train_task_pair(split, digits_vit, seed=seed, epochs=epochs, lr=lr)
    rows = []
    ensemble = evaluate(models, split.x_test, split.y_test)
    rows.append(dict(seed=seed, method="ensemble", stop="-", zipped="0/-",
                     joint=ensemble.joint, task_a=ensemble.task_a, task_b=ensemble.task_b))
    zipper = fxzip.Zipper(models, split.x_train, progress=False)
    for stop, label in STOPS:
        for method in methods:
            if method == "default":  # fxzip's default merge (zipit with the corrections)
                merged = zipper.merge(stop)
            else:  # the paper's algorithms, uncorrected
                alpha, beta = chosen[stop] if method == "zipit" else (0.5, 1.0)
                merged = zipper.merge(stop, method=method, alpha=alpha, beta=beta, **PAPER)
            acc = evaluate(merged, split.x_test, split.y_test)
            report = merged.fxzip_report
            rows.append(dict(seed=seed, method=method, stop=label,
                             zipped=f"{report.layers_zipped}/{report.layers_total}",
                             joint=acc.joint, task_a=acc.task_a, task_b=acc.task_b))
    return rows


def summarise(rows: list[dict], pairs: int) -> str:
    keys = []
    for r in rows:
        if (r["method"], r["stop"]) not in keys:
            keys.append((r["method"], r["stop"]))
    table = []
    for method, stop in keys:
        group = [r for r in rows if (r["method"], r["stop"]) == (method, stop)]
        avg = [(r["task_a"] + r["task_b"]) / 2 for r in group]
        table.append([method, stop, group[0]["zipped"],
                      *(mean_std([r[m] for r in group], 100, 1) for m in ("joint", "task_a",
                                                                         "task_b")),
                      mean_std(avg, 100, 1)])
    return markdown_table(["method", "stop", "zipped", "joint", "task A", "task B", "avg"], table,
                          right=range(3, 7))


def render(rows: list[dict], epochs: int, lr: float, chosen: dict, seconds: float) -> str:
    """`vit_digits.md`: the setup, zipit's chosen (alpha, beta), the table, the legend, the run
    time."""
    pairs = len({r["seed"] for r in rows})
    choices = ", ".join(f"{label}: ({chosen[stop][0]}, {chosen[stop][1]})" for stop, label in STOPS)
    return (f"## Two ViTs on disjoint digit halves ({pairs} evaluation pairs, seeds 1..{pairs}; "
            f"{epochs} epochs, Adam lr {lr}; accuracies in %, mean ± std over the pairs)\n\n"
            f"zipit (alpha, beta) per stop, chosen on the held-out pair 0's validation split: "
            f"{choices}.\n\n{summarise(rows, pairs)}\n\n{LEGEND}\n\nRun time: {seconds:.0f}s.\n")


def order(rows: list[dict]) -> list[dict]:
    """Per seed (in order of first appearance): the ensemble, then by stop point: default and the
    paper's methods (`MERGE_METHODS` order)."""
    seeds = list(dict.fromkeys(r["seed"] for r in rows))
    stops = {label: i for i, (_, label) in enumerate(STOPS)}
    rank = {m: i for i, m in enumerate(MERGE_METHODS)}
    return sorted(rows, key=lambda r: (seeds.index(r["seed"]), stops.get(r["stop"], -1),
                                       rank.get(r["method"], len(rank))))


def read_rows(path: Path) -> list[dict]:
    """The rows of `vit_digits.csv` (seeds as ints, accuracies as floats)."""
    with open(path, newline="") as f:
        return [dict(r, seed=int(r["seed"]), **{m: float(r[m]) for m in ("joint", "task_a", "task_b")})
                for r in csv.DictReader(f)]


def update(out: Path, methods: Sequence[str]) -> str:
    """`--methods M --update`: the rows of `methods` for the pairs of `out/vit_digits.csv`, merged
    into it and into `vit_digits.md` (see the module docstring); returns the new markdown. A
    ValueError where the files are missing or the retrained pairs do not reproduce them."""
    unknown = [m for m in methods if m not in MERGE_METHODS]
    if unknown or not methods:
        raise ValueError(f"--methods {unknown or '(none)'}: choose from {', '.join(MERGE_METHODS)}")
    start = time.perf_counter()
    old, text = read_rows(out / "vit_digits.csv"), (out / "vit_digits.md").read_text()
    stated = re.search(r"(\d+) epochs, Adam lr ([\d.e-]+)", text)
    if not stated:
        raise ValueError("vit_digits.md states no 'N epochs, Adam lr X'")
    epochs, lr = int(stated.group(1)), float(stated.group(2))
    chosen = {stop: tuple(map(float, re.search(rf"{re.escape(label)}: \(([\d.]+), ([\d.]+)\)",
                                               text).groups()))
              for stop, label in STOPS} if "zipit" in methods else {}
    new = []
    for seed in sorted({r["seed"] for r in old}):
        rows = run_pair(seed, epochs, lr, chosen, methods)
        stored = next(r for r in old if r["seed"] == seed and r["method"] == "ensemble")
        if any(abs(rows[0][m] - stored[m]) > 1e-6 for m in ("joint", "task_a", "task_b")):
            raise ValueError(f"pair {seed} was not reproduced: ensemble {rows[0]} against the "
                             f"stored {stored} (training reproduces only on the same machine and "
                             f"torch); run the benchmark in full instead")
        new += rows[1:]
        print(f"pair {seed}: ensemble reproduced; {len(rows) - 1} rows of {', '.join(methods)} "
              f"({time.perf_counter() - start:.0f}s)", flush=True)
    replaced = {(r["seed"], r["method"], r["stop"]) for r in new}
    rows = order([r for r in old if (r["seed"], r["method"], r["stop"]) not in replaced] + new)
    lines = text.split("\n")
    first = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    last = next(i for i in range(first, len(lines)) if not lines[i].startswith("|"))
    table = summarise(rows, len({r["seed"] for r in rows})).split("\n")
    lines[first:last] = table
    if LEGEND not in lines:  # a blank line, the legend, under the table
        lines[first + len(table):first + len(table)] = ["", LEGEND]
    prefix = f"Rows added later ({', '.join(methods)})"
    lines = [ln for ln in lines if not ln.startswith(prefix)]
    at = next(i for i, ln in enumerate(lines) if ln.startswith("Run time:"))
    lines.insert(at + 1, f"{prefix}: `python -m benchmarks.vit_digits --methods {','.join(methods)} "
                         f"--update` retrained the pairs from their seeds (their ensemble rows "
                         f"reproduced exactly) and merged only these methods in "
                         f"{time.perf_counter() - start:.0f}s.")
    markdown = "\n".join(lines)
    (out / "vit_digits.md").write_text(markdown)
    write_dict_csv(out / "vit_digits.csv", rows, COLUMNS)
    return markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vit_digits",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--methods", default=None,
                        help=f"with --update: the comma-separated methods whose rows to compute "
                             f"(of {','.join(MERGE_METHODS)})")
    parser.add_argument("--update", action="store_true",
                        help="add (or recompute) only the --methods rows in the files of --out")
    args = parser.parse_args(argv)
    if args.update != (args.methods is not None):
        parser.error("--methods and --update go together")
    torch.set_num_threads(args.threads)
    if args.update:
        try:
            print(update(args.out, [m.strip() for m in args.methods.split(",") if m.strip()]))
        except (ValueError, OSError) as exc:
            print(f"vit_digits --update: {exc}", file=sys.stderr)
            return 1
        return 0
    start = time.perf_counter()
    chosen = choose_alpha_beta(args.epochs, args.lr)
    rows = []
    for seed in range(1, args.pairs + 1):
        rows.extend(run_pair(seed, args.epochs, args.lr, chosen))
        print(f"pair {seed} done ({time.perf_counter() - start:.0f}s)", flush=True)
    text = render(rows, args.epochs, args.lr, chosen, time.perf_counter() - start)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vit_digits.md").write_text(text)
    write_dict_csv(args.out / "vit_digits.csv", rows, COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
