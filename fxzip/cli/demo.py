"""`fxzip demo`: train two ResNet-20s on disjoint halves of the digits and merge them with every
method at every stage boundary (`fxzip.demo.run`)."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from ..demo.digits import require_demo_extra


def add_parser(sub: Any) -> None:
    """Declare `fxzip demo [--seed S] [--width W] [--epochs E] [--out DIR] [--no-progress]`."""
    parser = sub.add_parser("demo",
                            help="merge two ResNet-20s trained on disjoint halves of the digits")
    parser.add_argument("--seed", type=int, default=0,
                        help="data split, initialisations and training")
    parser.add_argument("--width", type=int, default=4,
                        help="ResNet-20 width multiplier (the paper: 4)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", default="fxzip-demo", help="folder for demo.md and demo.png")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        require_demo_extra()
    except ImportError as exc:
        print(f"fxzip demo: {exc}", file=sys.stderr)
        return 1
    from ..demo.run import demo

    demo(seed=args.seed, width=args.width, epochs=args.epochs, out=args.out,
         progress=not args.no_progress)
    return 0
