"""The capacity knob `width=`: joint accuracy against FLOPs for merged widths between one model's
and both models'.

    python -m benchmarks.width [--pairs 3] [--epochs 20] [--resnet-width 4]
                               [--widths 1,1.25,1.5,1.75,2] [--stops layer2,full]
                               [--methods default,zipit] [--seeds 1,2] [--name width]
                               [--cache out/width_models]
                               [--out benchmarks/results]

Setting (a) of `benchmarks.accuracy` (its data, model, training and evaluation, from
`benchmarks.common`): ResNet-20×W on the digits, model A trained on classes 0–4, model B on
5–9, different initialisations; pairs of seeds 1..P (benchmarks.accuracy's evaluation pairs: no
held-out pair is needed, nothing is tuned here). Each pair is merged at every width and stop point by
  * "default": `Zipper.merge(stop, width=w)`, fxzip's default merge (zipit 0.5/1.0, weight
    similarity 0.01, the label-free corrections);
  * "zipit": plain ZipIt! as the paper merges (alpha 0.5, beta 1, no corrections, no weight
    similarity), BatchNorm statistics reset on the calibration data;
  * "cca" / "cca+corrections" (`--methods`, width 1 only): `method="cca"` (CCA Merge, Horoi et
    al. 2024) with the corrections off / fxzip's default corrections.
width=1 is today's merge; width=2 keeps every feature of both models apart (the ensemble's
function). FLOPs (`fxzip.runtime.costs.count_flops`, one sample) and parameters are the emitted model's:
a merged layer is one dense layer over the merged width, so the weights between features that
only one model has and features that only the other has are zeros that are still computed
(column "nonzero params": the parameters that are not; the default merge's refit of each
layer fills most of them in). The trained models are cached in
`--cache` (state dicts per seed, epochs and width), so a rerun only merges.

Outputs in `--out` (basename `--name`, default "width"; `results/cca.*` came from
`python -m benchmarks.width --methods cca,cca+corrections --widths 1 --name cca`): width.csv (one row per pair, method, stop and width), width.md (mean ± std
table) and width.png (joint accuracy against FLOPs, one line per method and stop through its
widths, the ensemble and single models as markers).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

import fxzip
from fxzip.runtime.costs import count_flops, count_parameters

from benchmarks.common import tables
from benchmarks.common.data import TaskData
from benchmarks.common.evaluation import accuracy_of
from benchmarks.common.plots import finish_plot, pyplot
from benchmarks.common.rows import (METRICS, Row, Summary, cell, metric, reference_rows,
                                    summary_of)
from benchmarks.common.settings import Setting, Stop, make_settings
from benchmarks.common.training import cached_pair

ROOT = Path(__file__).resolve().parents[1]
WIDTHS = (1.0, 1.25, 1.5, 1.75, 2.0)
# "cca" and "cca+corrections" (`method="cca"`, corrections off / the default ones) keep one
# model's width: they are merged at width 1 only
METHODS = ("default", "zipit", "cca", "cca+corrections")
ONE_WIDTH = ("cca", "cca+corrections")


@dataclass
class WidthRow(Row):
    """A result row of the accuracy protocol (`benchmarks.common.rows.Row`) with the merged width
    and the nonzero parameters."""

    width: float = 1.0
    nonzero: int = 0


def nonzero_parameters(model: nn.Module) -> int:
    return int(sum(int((p != 0).sum()) for p in model.parameters()))


def merged(zipper: fxzip.Zipper, stop: Stop, method: str, width: float) -> nn.Module:
    if method == "default":
        return zipper.merge(stop.stop_at, width=width)
    if method == "cca+corrections":
        return zipper.merge(stop.stop_at, method="cca")
    if method == "cca":
        return zipper.merge(stop.stop_at, method="cca", corrections=None)
    return zipper.merge(stop.stop_at, method="zipit", alpha=0.5, beta=1.0, reset_bn=True,
                        corrections=None, weight_similarity=0.0, width=width)


def pair_rows(setting: Setting, seed: int, models: list[nn.Module], data: TaskData,
              stops: Sequence[Stop], methods: Sequence[str], widths: Sequence[float],
              log) -> list[WidthRow]:
    x, y = data.split.x_test, data.split.y_test
    zipper = fxzip.Zipper(models, data.calibration, progress=False)
    total = len(zipper.analysis.all_layers)
    rows = [WidthRow(**vars(r), width=float("nan"), nonzero=r.params)
            for r in reference_rows(setting, seed, models, data, total)]
    for stop in stops:
        for method in methods:
            for width in ([1.0] if method in ONE_WIDTH else widths):
                tick = time.perf_counter()
                model = merged(zipper, stop, method, width)
                report = model.fxzip_report
                rows.append(WidthRow(seed, method, stop.label,
                                     f"{report.layers_zipped}/{report.layers_total}",
                                     count_parameters(model), count_flops(model, x),
                                     accuracy_of(setting, model, x, y), width=width,
                                     nonzero=nonzero_parameters(model)))
                log(f"  pair {seed} {method} {stop.label} width {width}: joint "
                    f"{100 * rows[-1].acc.joint:.1f} in {time.perf_counter() - tick:.1f}s")
    return rows


def summarise(rows: Sequence[WidthRow]) -> list[tuple[float | None, int, Summary]]:
    """(width, nonzero params, Summary) per (method, stop, width), in order of appearance
    (width None for the reference rows)."""
    groups: dict[tuple, list[WidthRow]] = {}
    for r in rows:
        groups.setdefault((r.method, r.stop, r.width if r.width == r.width else None), []).append(r)
    return [(width, group[0].nonzero, summary_of(group))
            for (_, _, width), group in groups.items()]


def markdown(setting: Setting, rows: Sequence[WidthRow], seeds: Sequence[int], epochs: int,
             seconds: float) -> str:
    table = tables.markdown_table(
        ["method", "stop", "width", "zipped", "params", "nonzero params", "FLOPs", "joint",
         "task A", "task B", "avg"],
        ([s.method, s.stop, "-" if w is None else f"{w:g}", s.zipped, f"{s.params:,}",
          f"{nz:,}", f"{s.flops / 1e6:.2f}M", *(cell(setting, s, m) for m in METRICS)]
         for w, nz, s in summarise(rows)), right=range(2, 11))
    return "\n".join([
        f"## width=: {setting.title}", "",
        f"{len(seeds)} pairs (seeds {', '.join(map(str, seeds))}); {epochs} training epochs; "
        "accuracies in % on the test data, mean ± sample std over the pairs. \"default\": "
        "fxzip's default merge at that width; \"zipit\": plain ZipIt! (alpha 0.5, beta 1, no "
        "corrections); \"cca\" / \"cca+corrections\": method=\"cca\" (CCA Merge) with the "
        "corrections off / on (one model's width only). width 1 = one model's width (today's merge), 2 = both models' (nothing "
        "merged). FLOPs and params are the emitted model's (dense merged layers); \"nonzero "
        "params\" leaves out the zeros between features that only one model has and features "
        "that only the other has (zipit; the default merge's refit fills most of them). BatchNorm statistics reset on the calibration data for every "
        "row.", "", table, "",
        "Model A/B alone: joint = argmax over its own 5 classes on all 10 classes; the other task "
        "is chance (0.2) by definition; * avg includes that chance value.",
        f"Run time: {seconds:.0f}s.", ""])


def write_csv(rows: Sequence[WidthRow], path: Path) -> None:
    tables.write_csv(path, ["pair", "method", "stop", "width", "zipped", "params", "nonzero",
                            "flops", "joint", "task_a", "task_b", "avg"],
                     ([r.pair, r.method, r.stop, "" if r.width != r.width else r.width, r.zipped,
                       r.params, r.nonzero, r.flops] + [f"{metric(r.acc, m):.4f}" for m in METRICS]
                      for r in rows))


def plot(setting: Setting, rows: Sequence[WidthRow], path: Path) -> None:
    """Joint accuracy vs FLOPs: one line per (method, stop) through its widths, each point
    labelled with its width; the ensemble and the single models as markers."""
    plt = pyplot()
    summaries = summarise(rows)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colours = {"default": "tab:orange", "zipit": "tab:red", "cca": "tab:blue",
               "cca+corrections": "tab:purple"}
    styles = ["-", "--", ":", "-."]
    stops = list(dict.fromkeys(s.stop for w, _, s in summaries if w is not None))
    for method, colour in colours.items():
        for stop, style in zip(stops, styles):
            points = [(w, s) for w, _, s in summaries
                      if w is not None and s.method == method and s.stop == stop]
            if not points:
                continue
            ax.errorbar([s.flops / 1e6 for _, s in points],
                        [100 * s.mean["joint"] for _, s in points],
                        yerr=[100 * s.std["joint"] for _, s in points], marker="o",
                        color=colour, linestyle=style, capsize=3, label=f"{method}, stop {stop}")
            for w, s in points:
                ax.annotate(f"{w:g}", (s.flops / 1e6, 100 * s.mean["joint"]), fontsize=7,
                            textcoords="offset points", xytext=(4, -10 if method == "zipit" else 4))
    finish_plot(fig, ax, [s for _, _, s in summaries],
                f"width= (labels: merged width / one model's): {setting.title}", path,
                legend=dict(fontsize=7, loc="lower right"))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.width",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3, help="model pairs (seeds 1..P)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds instead of 1..P")
    parser.add_argument("--name", default="width", help="basename of the result files")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--resnet-width", type=int, default=4, help="ResNet-20 width multiplier")
    parser.add_argument("--widths", default=",".join(f"{w:g}" for w in WIDTHS))
    parser.add_argument("--stops", default="layer2,full",
                        help="stop points of setting (a) (layer1, layer2, layer3, full)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--cache", type=Path, default=ROOT / "out" / "width_models")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    setting = make_settings(args.resnet_width)["a"]
    by_label = {s.label: s for s in setting.stops}
    stops = [by_label[s] for s in args.stops.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"unknown methods {unknown}; choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2
    widths = [float(w) for w in args.widths.split(",")]
    data = setting.load()
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else \
        list(range(1, args.pairs + 1))
    rows: list[WidthRow] = []
    log = lambda line: print(line, flush=True)  # noqa: E731
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        models = cached_pair(setting, data, seed, args.epochs, args.resnet_width, args.cache, log)
        rows += pair_rows(setting, seed, models, data, stops, methods, widths, log)
        done = seeds[:seeds.index(seed) + 1]  # write after every pair: partial results survive
        write_csv(rows, args.out / f"{args.name}.csv")
        (args.out / f"{args.name}.md").write_text(markdown(setting, rows, done, args.epochs,
                                                           time.perf_counter() - start))
        plot(setting, rows, args.out / f"{args.name}.png")
    print((args.out / f"{args.name}.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
