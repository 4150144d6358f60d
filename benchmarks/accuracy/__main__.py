"""The command line of `python -m benchmarks.accuracy` (the protocol: the package docstring):
which settings, how many pairs and epochs, where the files go."""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

import benchmarks.accuracy
from benchmarks.common.settings import make_settings

from .protocol import FULL_GRID, MERGE_METHODS, QUICK_GRID, run_setting
from .report import markdown, plot, write_csv
from .fidelity_study import write_study_csv
from .update import UpdateError, update_setting

ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accuracy",
                                     description=benchmarks.accuracy.__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="a,b,c,d", help="comma-separated subset of a,b,c,d,e")
    parser.add_argument("--pairs", type=int, default=None,
                        help="model pairs per setting INCLUDING the held-out pair 0 (default 5; "
                             "--quick: 3); at least 2")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs of every setting (default: per setting, 20-30; "
                             "--quick: 10)")
    parser.add_argument("--width", type=int, default=None,
                        help="ResNet-20 width multiplier of (a) and (d) (default 4, as in the paper; --quick: 1)")
    parser.add_argument("--quick", action="store_true",
                        help="2 evaluation pairs + 1 held-out, 10 epochs, a 3x2 grid, width 1")
    parser.add_argument("--no-auto", dest="auto", action="store_false",
                        help="leave out the 'auto' rows and the fidelity study (about half the time)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--methods", default=None,
                        help=f"with --update: the comma-separated methods whose rows to compute "
                             f"(of {','.join(MERGE_METHODS)})")
    parser.add_argument("--update", action="store_true",
                        help="add (or recompute) only the --methods rows in the existing files of "
                             "--out: the evaluation pairs are retrained from their seeds and checked "
                             "against their stored reference rows (benchmarks/accuracy/update.py)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="with --update: a folder of trained pairs "
                             "(<setting>_w<width>_e<epochs>_seed<seed>.pt), read and filled")
    args = parser.parse_args(argv)
    if args.update != (args.methods is not None):
        parser.error("--methods and --update go together")
    if args.cache is not None and not args.update:
        parser.error("--cache is read by --update only")
    args.pairs = args.pairs or (3 if args.quick else 5)
    args.width = args.width or (1 if args.quick else 4)
    if args.pairs < 2:
        parser.error("--pairs must be at least 2 (one held-out pair and one evaluation pair)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = make_settings(args.width)
    keys = [k.strip() for k in args.settings.split(",") if k.strip()]
    unknown = [k for k in keys if k not in settings]
    if unknown:
        print(f"unknown settings {unknown}; choose from {', '.join(settings)}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    grid = QUICK_GRID if args.quick else FULL_GRID
    start = time.perf_counter()
    for key in keys:
        setting = settings[key]
        if args.update:
            methods = [m.strip() for m in args.methods.split(",") if m.strip()]
            print(f"setting ({key}): {setting.title}; updating the rows of {', '.join(methods)}",
                  flush=True)
            try:
                update = update_setting(setting, args.out, methods, width=args.width,
                                        cache=args.cache, log=lambda line: print(line, flush=True))
            except UpdateError as exc:
                print(f"setting ({key}): {exc}", file=sys.stderr)
                return 1
            for line in update.replaced:
                print(f"  replaced {line}", flush=True)
            print((args.out / f"accuracy_{key}.md").read_text(), flush=True)
            continue
        epochs = args.epochs or (setting.quick_epochs if args.quick else setting.epochs)
        print(f"setting ({key}): {setting.title}; {args.pairs} pairs, {epochs} epochs", flush=True)
        result = run_setting(setting, pairs=args.pairs, epochs=epochs, grid=grid,
                             log=lambda line: print(line, flush=True), auto=args.auto)
        write_csv(result, args.out / f"accuracy_{key}.csv")
        if result.study:
            write_study_csv(result, args.out / f"accuracy_{key}_fidelity.csv")
        table = markdown(result)
        (args.out / f"accuracy_{key}.md").write_text(table)
        plot(result, args.out / f"accuracy_{key}.png")
        print(table, flush=True)
    print(f"all settings done in {time.perf_counter() - start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
