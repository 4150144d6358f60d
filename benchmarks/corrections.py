"""Label-free corrections of a zipit merge (`fxzip.corrections`), measured on a setting of
`benchmarks.accuracy` (default (a): ResNet-20×W on the digits halves 0–4 / 5–9; also (b), (c),
(e)), several model pairs.

    python -m benchmarks.corrections [--setting a] [--pairs 4] [--width 4] [--epochs 20] [--quick]
                                     [--variants a,b,...] [--ridge 1e-2] [--cost] [--cache DIR]
                                     [--out benchmarks/results/corrections_<setting>.md]

Every variant merges with zipit at alpha=0.5, beta=1 (the defaults) and then applies one set of
corrections; joint accuracy (%, on the test data) at the setting's stop points (for (a): layer1
/ layer2 / full, stop_at=None) is reported as the mean over the evaluation pairs (seeds 1..P), next to the
ensemble of the two (BN-reset) models. Pair seeds, training and calibration data are those of
`benchmarks.accuracy` (`benchmarks.common`). Phase times of each merge are measured:
`merge` = `Zipper.merge` (statistics are collected once per pair before the timing and added
back as `statistics`, so every variant is charged the same), `correct` = `fxzip.corrections.refit`.

`--quick`: width 1, 8 epochs, 2 pairs, 3 variants — a smoke test in well under a minute.
`--cost`: the end-to-end cost of a merge from scratch per variant on pair 1 instead. `--out`: the
markdown file to write (results/corrections_a.md, _c.md and _e.md came from `--setting a`, `c`,
`e`); without it the table is only printed.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import fxzip
from fxzip.corrections import Corrections, correct, fidelity

from benchmarks.common.evaluation import accuracy_of
from benchmarks.common.settings import make_settings
from benchmarks.common.timing import Stopwatch, timed
from benchmarks.common.training import cached_pair, reset_copies

STOPS = {"layer1": "layer1", "layer2": "layer2", "full": None}  # setting (a)'s


def stops_of(setting) -> dict[str, str | None]:
    """A setting's stop points (label -> stop_at): (a)'s STOPS, else the setting's own but the
    last before "full" where the two zip the same layers (its note says so)."""
    if setting.key == "a":
        return dict(STOPS)
    stops = [s for s in setting.stops if not s.shared_output]
    if "same layers" in setting.note and len(stops) > 1:
        stops = stops[:-2] + stops[-1:]
    return {s.label: s.stop_at for s in stops}

# name -> Corrections (None: plain zipit with Zipper's BN reset)
VARIANTS: dict[str, Corrections | None] = {
    "zipit": None,
    "bn": Corrections(refit_trunk=False, refit_heads="none"),
    "repair": Corrections(refit_trunk=False, refit_heads="none", repair=True),
    "last": Corrections(refit_trunk=False, refit_heads="last"),
    "heads": Corrections(refit_trunk=False, refit_heads="all"),
    "trunk": Corrections(refit_trunk=True, refit_heads="none"),
    "trunk+last": Corrections(refit_trunk=True, refit_heads="last"),
    "trunk+first+last": Corrections(refit_trunk=True, refit_heads="first+last"),
    "refit": Corrections(refit_trunk=True, refit_heads="all"),
    "refit+repair": Corrections(refit_trunk=True, refit_heads="all", repair=True),
}
QUICK_VARIANTS = ("zipit", "last", "refit")


def corrected_merge(zipper: fxzip.Zipper, stop_at: str | None, options: Corrections | None, *,
                    method: str = "zipit", alpha: float = 0.5, beta: float = 1.0
                    ) -> tuple[torch.nn.Module, dict[str, float]]:
    """`Zipper.merge` followed by `fxzip.corrections.correct` (which replaces the BN reset);
    options None: the plain merge with the BN reset. Returns the model and phase seconds."""
    watch = Stopwatch()
    with watch("merge"):
        merged = zipper.merge(stop_at, method=method, alpha=alpha, beta=beta,
                              reset_bn=options is None, corrections=None)
    if options is not None:
        with watch("correct"):
            trunk = zipper.analysis.trunk(stop_at)
            matches = {s: zipper.match(s, method, alpha, beta)
                       for s in zipper.analysis.spaces_of(trunk)}
            correct(merged, zipper.graphs, zipper.analysis, matches, zipper.batches, options)
    return merged, dict(watch.seconds)


@dataclass
class Result:
    pair: int
    variant: str
    stop: str
    joint: float
    fidelity: float
    seconds: dict[str, float]


def run_pair(setting, data, pair: int, epochs: int, variants: Sequence[str], width: int,
             cache: Path | None = None, log=print) -> tuple[list[Result], float]:
    """Train one pair, merge at every stop with every variant; (results, ensemble joint acc)."""
    models = cached_pair(setting, data, pair, epochs, width, cache, log)
    x, y = data.split.x_test, data.split.y_test
    reset = reset_copies(models, data.calibration)
    ensemble = accuracy_of(setting, reset, x, y).joint
    zipper = fxzip.Zipper(models, data.calibration, progress=False)
    held_out = [data.x_val]  # fidelity (to the BN-reset parents) on data that no correction saw
    results = []
    for label, stop_at in stops_of(setting).items():
        statistics = timed(lambda: zipper.statistics(
            zipper.analysis.spaces_of(zipper.analysis.trunk(stop_at))))
        for name in variants:
            merged, seconds = corrected_merge(zipper, stop_at, VARIANTS[name])
            seconds["statistics"] = statistics
            acc = accuracy_of(setting, merged, x, y).joint
            fid = float(np.mean(fidelity(merged, reset, held_out).relative_error))
            results.append(Result(pair, name, label, acc, fid, seconds))
            log(f"  {label:6s} {name:13s} joint {100 * acc:5.1f}  rel.err {fid:.3f}  "
                + " ".join(f"{k} {v:.2f}s" for k, v in seconds.items()))
    return results, ensemble


def table(results: list[Result], ensembles: list[float], variants: Sequence[str]) -> str:
    """Mean joint accuracy per variant and stop, the gap closed, fidelity and time."""
    stops = list(dict.fromkeys(r.stop for r in results))
    pairs = sorted({r.pair for r in results})
    ens = 100 * float(np.mean(ensembles))
    mean = {(v, s): 100 * float(np.mean([r.joint for r in results if r.variant == v and r.stop == s]))
            for v in variants for s in stops}
    lines = [f"{len(pairs)} evaluation pairs (seeds {pairs[0]}..{pairs[-1]}), joint accuracy % "
             f"(mean); ensemble {ens:.1f}; 'closed' = share of zipit's gap to the ensemble closed.",
             "",
             "| variant | " + " | ".join(stops) + " | closed (" + "/".join(stops) + ") | rel. err "
             "(" + "/".join(stops) + ") | seconds (merge+correct, full) |",
             "| --- | " + " | ".join("---:" for _ in stops) + " | ---: | ---: | ---: |"]
    for v in variants:
        closed = []
        for s in stops:
            gap = ens - mean[("zipit", s)] if "zipit" in variants else float("nan")
            closed.append(f"{(mean[(v, s)] - mean[('zipit', s)]) / gap:.2f}" if gap > 0 else "-")
        fid = [float(np.mean([r.fidelity for r in results if r.variant == v and r.stop == s]))
               for s in stops]
        secs = [r.seconds for r in results if r.variant == v and r.stop == "full"]
        total = float(np.mean([sum(x.get(k, 0.0) for k in ("merge", "correct")) for x in secs]))
        lines.append(f"| {v} | " + " | ".join(f"{mean[(v, s)]:.1f}" for s in stops)
                     + f" | {'/'.join(closed)} | {'/'.join(f'{f:.3f}' for f in fid)} | {total:.2f} |")
    lines.append(f"| ensemble | " + " | ".join(f"{ens:.1f}" for _ in stops) + " | | | |")
    return "\n".join(lines)


def cost(setting, data, pair: int, epochs: int, width: int, cache: Path | None,
         variants: Sequence[str], repeats: int = 2, log=print) -> str:
    """End-to-end cost of a merge from scratch (trace, statistics, matching, rewrite, then the BN
    reset or the corrections) per variant and stop; plain and corrected runs alternate so that a
    loaded machine slows them alike. Median of `repeats`, with the phases."""
    models = cached_pair(setting, data, pair, epochs, width, cache, log)
    lines = ["| stop | variant | seconds (median) | ratio to zipit | phases |",
             "| --- | --- | ---: | ---: | --- |"]
    for label, stop_at in stops_of(setting).items():
        times: dict[str, list[float]] = {v: [] for v in variants}
        phases: dict[str, dict[str, float]] = {}
        for _ in range(repeats):
            for name in variants:
                tick = time.perf_counter()
                zipper = fxzip.Zipper(models, data.calibration, progress=False)
                _, seconds = corrected_merge(zipper, stop_at, VARIANTS[name])
                times[name].append(time.perf_counter() - tick)
                phases[name] = {**{k: v for k, v in zipper.seconds.items()}, **seconds}
        base = float(np.median(times["zipit"])) if "zipit" in times else float("nan")
        for name in variants:
            median = float(np.median(times[name]))
            lines.append(f"| {label} | {name} | {median:.2f} | {median / base:.2f} | "
                         + ", ".join(f"{k} {v:.2f}" for k, v in phases[name].items()) + " |")
            log(lines[-1])
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.corrections",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", default="a", choices=("a", "b", "c", "e"),
                        help="the benchmarks.accuracy setting (default a)")
    parser.add_argument("--pairs", type=int, default=None, help="evaluation pairs (default 4)")
    parser.add_argument("--width", type=int, default=None, help="ResNet-20 width (default 4)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs (default: the setting's, 20 for (a))")
    parser.add_argument("--variants", default=None, help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--ridge", type=float, default=None, help="override every variant's ridge")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cost", action="store_true",
                        help="measure end-to-end merge cost per variant on pair 1 instead")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write the table here (markdown)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="keep the trained pairs' state dicts in this folder and reuse them "
                             "(benchmarks.common.training.cached_pair)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pairs = args.pairs or (2 if args.quick else 4)
    width = args.width or (1 if args.quick else 4)
    setting = make_settings(width)[args.setting]
    epochs = args.epochs or (8 if args.quick else setting.epochs)
    variants = args.variants.split(",") if args.variants else \
        list(QUICK_VARIANTS if args.quick else VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}")
    if args.ridge is not None:
        for name, options in VARIANTS.items():
            if options is not None:
                VARIANTS[name] = Corrections(**{**options.__dict__, "ridge": args.ridge})
    data = setting.load()
    if args.cost:
        text = (f"## Cost on setting ({setting.key}): {setting.title}, {len(data.calibration)} "
                f"calibration batches\n\n" + cost(setting, data, 1, epochs, width, args.cache, variants) + "\n")
        print(text)
        if args.out:
            args.out.write_text(text)
        return 0
    results, ensembles = [], []
    start = time.perf_counter()
    for pair in range(1, pairs + 1):
        rows, ensemble = run_pair(setting, data, pair, epochs, variants, width, args.cache)
        results += rows
        ensembles.append(ensemble)
    text = (f"## Corrections on setting ({setting.key}): {setting.title}, {epochs} epochs\n\n"
            + table(results, ensembles, variants) + f"\n\nRun time {time.perf_counter() - start:.0f}s.\n")
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
