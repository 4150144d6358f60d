"""Command line: `fxzip demo` trains two small CNNs on disjoint halves of the digits and merges
them with every method at every stage boundary, printing the paper-style table."""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch

from .api import Zipper
from .digits import DigitsCNN, count_parameters, evaluate, load_digits_split, train_task_pair

DEMO_STOPS = (("relu", "stage 1"), ("pool", "stage 2"), (None, "full"))


def demo(seed: int = 0, width: int = 16, epochs: int = 20, progress: bool = True) -> list[dict]:
    """Run the demo and return its table rows (also printed)."""
    start = time.perf_counter()
    print(f"fxzip demo: digits 0-4 vs 5-9, two CNNs (width {width}), seed {seed}", flush=True)
    split = load_digits_split(seed=seed)
    models = train_task_pair(split, lambda: DigitsCNN(width), seed=seed, epochs=epochs)
    calibration = [split.x_train[i:i + 256] for i in range(0, len(split.x_train), 256)]
    zipper = Zipper(models, calibration, progress=progress)
    ensemble = evaluate(models, split.x_test, split.y_test)
    rows = [dict(method="ensemble", stop="-", layers="0/4",
                 params=sum(count_parameters(m) for m in models), acc=ensemble)]
    for stop, label in DEMO_STOPS:
        for method in ("average", "permute", "zipit"):
            merged = zipper.merge(stop, method=method)
            report = merged.fxzip_report
            rows.append(dict(method=method, stop=label,
                             layers=f"{report.layers_zipped}/{report.layers_total}",
                             params=count_parameters(merged),
                             acc=evaluate(merged, split.x_test, split.y_test)))
    print(f"{'method':9s} {'stop':8s} {'zipped':>6s} {'params':>7s} {'joint':>6s} {'task A':>6s} "
          f"{'task B':>6s} {'avg':>6s}")
    for r in rows:
        a = r["acc"]
        print(f"{r['method']:9s} {r['stop']:8s} {r['layers']:>6s} {r['params']:7d} {a.joint:6.3f} "
              f"{a.task_a:6.3f} {a.task_b:6.3f} {a.avg:6.3f}")
    print(f"done in {time.perf_counter() - start:.1f}s")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fxzip", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("demo", help="merge two CNNs trained on disjoint halves of the digits")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--width", type=int, default=16)
    run.add_argument("--epochs", type=int, default=20)
    run.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    demo(seed=args.seed, width=args.width, epochs=args.epochs, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
