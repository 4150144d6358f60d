"""The `fxzip` command line, one module per command: `demo` (the digits demo), `merge` (a YAML
recipe of model files and calibration data into a saved merged model), `analyze` (a model's
feature spaces and stop points). Each declares its arguments in `add_parser(subparsers)` and runs
in `run(args) -> exit status`; `main` dispatches."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import analyze, demo, merge

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fxzip", description="Merge trained networks of one architecture into one "
        "multi-task network without training (ZipIt! and beyond).")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (demo, merge, analyze):
        command.add_parser(sub)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
