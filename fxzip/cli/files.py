"""The `fxzip merge` and `fxzip analyze` subcommands: their arguments, and bad input turned into
one line `fxzip: error: …` on stderr with a non-zero exit status instead of a traceback."""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from ..errors import FxzipError, InputError

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def add_merge(sub: Any) -> None:
    """Declare `fxzip merge RECIPE.yaml -o OUT_DIR [--device auto|cpu|cuda] [--quiet]`."""
    merge = sub.add_parser("merge", help="merge model checkpoints as a YAML recipe says",
                           description="Merge the models of RECIPE (checkpoints, calibration data, "
                           "fxzip.merge options) and write OUT_DIR: merged.pt2, recipe.yaml, "
                           "report.json, report.png, README.md.")
    merge.add_argument("recipe", metavar="RECIPE.yaml")
    merge.add_argument("-o", "--out", dest="out_dir", metavar="OUT_DIR", required=True,
                       help="a new folder for the results")
    merge.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                       help="where to merge (default: the recipe's device, else auto)")
    merge.add_argument("--quiet", action="store_true", help="no progress bars")
    merge.set_defaults(run=run_merge)


def add_analyze(sub: Any) -> None:
    """Declare `fxzip analyze MODEL [--kwargs JSON] [--checkpoint F] --input-size C,H,W`."""
    analyze = sub.add_parser("analyze",
                             help="the feature spaces, barriers and stop points of a model",
                             description="Trace MODEL (a timm name, torchvision:NAME or "
                             "package.module:callable) and print its feature spaces, the barriers "
                             "with their reasons and the valid stop points.")
    analyze.add_argument("model", metavar="MODEL")
    analyze.add_argument("--kwargs", default="{}", metavar="JSON",
                         help='keyword arguments of the model, e.g. \'{"num_classes": 10}\'')
    analyze.add_argument("--checkpoint", default=None, metavar="FILE")
    analyze.add_argument("--input-size", required=True, metavar="C,H,W",
                         help="the shape of one input sample, e.g. 3,224,224")
    analyze.set_defaults(run=run_analyze)


def run_merge(args: argparse.Namespace) -> int:
    return _guarded(_merge, args)


def run_analyze(args: argparse.Namespace) -> int:
    return _guarded(_analyze, args)


def _guarded(command: Any, args: argparse.Namespace) -> int:
    """Run a command; FxzipErrors and file errors become one line and exit status 1."""
    try:
        with _one_line_warnings():
            command(args)
    except FxzipError as e:
        return _fail(str(e))
    except ImportError as e:  # an optional library: timm, torchvision, matplotlib
        return _fail(f"this needs the package {e.name or e}: pip install 'fxzip[merge]' "
                     "(image folders, report.png) or 'fxzip[timm]' (timm models)")
    except OSError as e:
        return _fail(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e))
    except KeyboardInterrupt:
        _fail("interrupted")
        return EXIT_INTERRUPTED
    return 0


def _merge(args: argparse.Namespace) -> None:
    from .merge import run_merge as merge_recipe

    merge_recipe(args.recipe, args.out_dir, device=args.device, quiet=args.quiet)


def _analyze(args: argparse.Namespace) -> None:
    from ..api import analyze
    from ..io.model_loading import build_model, load_checkpoint

    try:
        kwargs = json.loads(args.kwargs)
    except json.JSONDecodeError as e:
        raise InputError(f"--kwargs is not valid JSON ({e.msg}): {args.kwargs}") from None
    if not isinstance(kwargs, dict):
        raise InputError(f"--kwargs must be a JSON object such as '{{\"num_classes\": 10}}', "
                         f"got {args.kwargs}")
    try:
        size = tuple(int(v) for v in args.input_size.split(","))
    except ValueError:
        size = ()
    if len(size) < 1 or any(v < 1 for v in size):
        raise InputError(f"--input-size must be positive integers such as 3,224,224, "
                         f"got {args.input_size!r}")
    model = build_model(args.model, kwargs, search_paths=["."])
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint, name=args.model)
    print(analyze(model, torch.randn(2, *size)))


def _fail(message: str) -> int:
    text = " ".join(line.strip() for line in message.strip().splitlines() if line.strip())
    print(f"fxzip: error: {text}", file=sys.stderr, flush=True)
    return EXIT_ERROR


@contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Warnings as `fxzip: warning: …` lines, without the source line Python adds."""
    def show(message: Any, category: type, *_: Any, **__: Any) -> None:
        print(f"fxzip: warning: {message}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield
