"""Merges with scarce calibration data: joint accuracy against the number of calibration samples.

    python -m benchmarks.scarce_data [--quick] [--out benchmarks/results] [--cache DIR]
                                     [--counts 4,8,32,128,1024] [--pairs 3] [--split test]
                                     [--variants paper,default,fixed] [--name scarce_data]

Setting (a) of the accuracy protocol (`benchmarks.common.settings`: digits 5+5, ResNet-20×4,
20 epochs; evaluation pairs 1..3, `benchmarks.common.training.cached_pair`). For each pair and
each sample count n, the calibration set is n training inputs, half of them drawn from each
task's training inputs (the first task takes the odd one; seeded by the pair, so every method of
a pair sees the same samples; n above the training set's size means all of it). Everything that
reads data reads only these: the feature statistics, the BatchNorm reset and the corrections. Per
stop point (layer2 and full, stop_at=None) it merges with

- `paper`: ZipIt! as the paper merges (`corrections=None, weight_similarity=0`, zipit alpha 0.5
  beta 1, BatchNorm statistics reset on the samples);
- `default`: fxzip's default merge (`Zipper.merge` with every default);
- `fixed`: the default merge without its few-sample rule (`Corrections(ridge_rows=0,
  min_rows=0, bn_prior=0)`: the refits' ridge fixed, no refit skipped, BatchNorm statistics from
  the samples alone);

and the `ensemble` of the two models with their BatchNorm statistics reset on the same samples
(so that its own degradation shows). Joint test accuracy (%), mean ± std over the pairs.
`--split val` measures on the validation split instead (for choosing constants without the
test labels). Writes `<name>.md` and `<name>.csv` under `--out`.

`--quick`: one pair, counts 8 and 1024, a smoke test of about a minute (trains the pair at width
1 for 8 epochs unless `--cache` holds it).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import fxzip
from fxzip.corrections import Corrections
from fxzip.demo.digits import TASK_CLASSES

from benchmarks.common.data import CALIBRATION_BATCH, TaskData, calibration_batches
from benchmarks.common.evaluation import accuracy_of
from benchmarks.common.settings import make_settings
from benchmarks.common.tables import markdown_table, mean_std, write_csv
from benchmarks.common.training import cached_pair, reset_copies

ROOT = Path(__file__).resolve().parent.parent
COUNTS = (4, 8, 32, 128, 1024)
STOPS = {"layer2": "layer2", "full": None}

Merge = Callable[[fxzip.Zipper, "str | None"], nn.Module]

VARIANTS: dict[str, Merge] = {
    "paper": lambda zipper, stop_at: zipper.merge(stop_at, method="zipit", alpha=0.5, beta=1.0,
                                                  reset_bn=True, corrections=None,
                                                  weight_similarity=0.0),
    "default": lambda zipper, stop_at: zipper.merge(stop_at),
    "fixed": lambda zipper, stop_at: zipper.merge(
        stop_at, corrections=Corrections(ridge_rows=0.0, min_rows=0.0, bn_prior=0.0)),
}
LABELS = {"paper": "paper's merge", "default": "default merge",
          "fixed": "default without the few-sample rule", "ensemble": "ensemble"}


def variant(name: str) -> Merge:
    """A named variant, or the default merge with `Corrections` fields changed: a spec such as
    ``ridge_rows=0.1/min_rows=0.5`` (the validation study's candidates)."""
    if name in VARIANTS:
        return VARIANTS[name]
    fields = {}
    for part in name.split("/"):
        key, _, value = part.partition("=")
        if key not in Corrections.__dataclass_fields__ or not value:
            raise ValueError(f"unknown variant {name!r}: a name of {', '.join(VARIANTS)} or "
                             f"Corrections fields as key=value/key=value")
        fields[key] = value.lower() == "true" if value.lower() in ("true", "false") \
            else float(value)
    options = Corrections(**fields)
    return lambda zipper, stop_at: zipper.merge(stop_at, corrections=options)


def calibration_sample(data: TaskData, count: int, seed: int) -> torch.Tensor:
    """`count` training inputs, half from each task's (the first task takes the odd one), drawn
    at random (seeded) and shuffled together; all training inputs if `count` is not smaller."""
    x, y = data.split.x_train, data.split.y_train
    if count >= len(x):
        return x
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for k, classes in enumerate(TASK_CLASSES):
        index = torch.isin(y, torch.tensor(classes)).nonzero().flatten()
        take = count // 2 + (count % 2 if k == 0 else 0)
        chosen.append(index[torch.randperm(len(index), generator=generator)[:take]])
    chosen = torch.cat(chosen)
    return x[chosen[torch.randperm(len(chosen), generator=generator)]]


@dataclass
class Result:
    pair: int
    draw: int
    samples: int
    stop: str
    variant: str
    joint: float
    refitted: int = 0
    skipped: int = 0


def run_pair(setting, data: TaskData, pair: int, epochs: int, width: int, counts: Sequence[int],
             variants: Sequence[str], split: str, cache: Path | None, draws: int = 1,
             draw_offset: int = 0, log=print) -> list[Result]:
    """Every (count, draw, stop, variant) of one pair, and the BN-reset ensemble per count and
    draw. Draw j of pair p is seeded p + draw_offset + 1000·j (one draw where a count takes every
    training input)."""
    models = cached_pair(setting, data, pair, epochs, width, cache, log)
    x, y = (data.split.x_test, data.split.y_test) if split == "test" else (data.x_val, data.y_val)
    results = []
    for count, draw in ((c, j) for c in counts
                        for j in range(draws if c < len(data.split.x_train) else 1)):
        sample = calibration_sample(data, count, pair + draw_offset + 1000 * draw)
        batches = calibration_batches(sample, CALIBRATION_BATCH)
        n = len(sample)
        ensemble = accuracy_of(setting, reset_copies(models, batches), x, y).joint
        results += [Result(pair, draw, n, label, "ensemble", ensemble) for label in STOPS]
        zipper = fxzip.Zipper(models, batches, progress=False)
        line = [f"ensemble {100 * ensemble:.1f}"]
        for label, stop_at in STOPS.items():
            for name in variants:
                merged = variant(name)(zipper, stop_at)
                report = merged.fxzip_report.corrections
                refitted = len(report.refitted) if report is not None else 0
                skipped = len(report.skipped) if report is not None else 0
                joint = accuracy_of(setting, merged, x, y).joint
                results.append(Result(pair, draw, n, label, name, joint, refitted, skipped))
                line.append(f"{label}/{name} {100 * joint:.1f}")
        log(f"  pair {pair}, draw {draw}, {n:4d} samples: " + ", ".join(line))
    return results


def table(results: list[Result], variants: Sequence[str]) -> str:
    """One row per sample count; a column per (variant, stop) and the ensemble: mean ± std (%)."""
    counts = sorted({r.samples for r in results})
    columns = ["samples"] + [f"{LABELS.get(v, v)}, {s}" for s in STOPS for v in variants] \
        + ["ensemble"]
    rows = []
    for n in counts:
        cells = [str(n)]
        for s in STOPS:
            for v in variants:
                cells.append(mean_std((r.joint for r in results
                                       if (r.samples, r.stop, r.variant) == (n, s, v)), 100, 1))
        cells.append(mean_std((r.joint for r in results if (r.samples, r.variant) == (n, "ensemble")
                               and r.stop == next(iter(STOPS))), 100, 1))
        rows.append(cells)
    return markdown_table(columns, rows, right=range(1, len(columns)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scarce_data",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--counts", default=None, help="comma list (default 4,8,32,128,1024)")
    parser.add_argument("--pairs", type=int, default=None, help="evaluation pairs (default 3)")
    parser.add_argument("--split", default="test", choices=("test", "val"))
    parser.add_argument("--variants", default="paper,default,fixed",
                        help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--cache", type=Path, default=None,
                        help="the trained pairs' state dicts "
                             "(benchmarks.common.training.cached_pair)")
    parser.add_argument("--draws", type=int, default=1,
                        help="calibration draws per pair and count (default 1)")
    parser.add_argument("--draw-offset", type=int, default=0,
                        help="seed the draws pair + this + 1000·draw (other draws than the test "
                             "run's, for the validation study)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="scarce_data", help="result file stem")
    parser.add_argument("--out", type=Path, default=None,
                        help="write <name>.md and .csv into this folder (default: print only)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    counts = [int(c) for c in args.counts.split(",")] if args.counts else \
        ([8, 1024] if args.quick else list(COUNTS))
    pairs = args.pairs or (1 if args.quick else 3)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        try:
            variant(v)
        except (ValueError, fxzip.errors.InputError) as error:
            parser.error(str(error))
    cached = args.cache is not None and (args.cache / "a_w4_e20_seed1.pt").exists()
    width, epochs = (1, 8) if args.quick and not cached else (4, 20)
    setting = make_settings(width)["a"]
    data = setting.load()
    start = time.perf_counter()
    results = []
    for pair in range(1, pairs + 1):
        results += run_pair(setting, data, pair, epochs, width, counts, variants, args.split,
                            args.cache, args.draws, args.draw_offset)
    split = "test" if args.split == "test" else "validation"
    text = (f"## Scarce calibration data: setting (a), {setting.title}, {epochs} epochs\n\n"
            f"Joint {split} accuracy (%), mean ± std over {pairs} evaluation pair(s) (seeds "
            f"1..{pairs})" + (f" × {args.draws} draws" if args.draws > 1 else "")
            + f"; calibration samples drawn half from each task's training inputs "
            f"({len(data.split.x_train)} in all), the same for every method of a pair; the "
            f"ensemble's BatchNorm statistics are reset on them too.\n\n"
            + table(results, variants) + f"\n\nRun time {time.perf_counter() - start:.0f}s.\n")
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.name}.md").write_text(text)
        write_csv(args.out / f"{args.name}.csv",
                  ["pair", "draw", "samples", "stop", "variant", "joint", "refitted", "skipped"],
                  [[r.pair, r.draw, r.samples, r.stop, r.variant, f"{r.joint:.4f}", r.refitted,
                    r.skipped] for r in results])
    return 0


if __name__ == "__main__":
    sys.exit(main())
