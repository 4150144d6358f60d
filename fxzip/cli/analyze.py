"""`fxzip analyze MODEL --input-size C,H,W`: print a model's feature spaces, the barriers with
their reasons and the valid stop points."""
from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from ..api import analyze
from ..errors import InputError
from ..io.model_loading import build_model, load_checkpoint
from .guard import guarded


def add_parser(sub: Any) -> None:
    """Declare `fxzip analyze MODEL [--kwargs JSON] [--checkpoint F] --input-size C,H,W`."""
    parser = sub.add_parser("analyze",
                            help="the feature spaces, barriers and stop points of a model",
                            description="Trace MODEL (a timm name, torchvision:NAME or "
                            "package.module:callable) and print its feature spaces, the barriers "
                            "with their reasons and the valid stop points.")
    parser.add_argument("model", metavar="MODEL")
    parser.add_argument("--kwargs", default="{}", metavar="JSON",
                        help='keyword arguments of the model, e.g. \'{"num_classes": 10}\'')
    parser.add_argument("--checkpoint", default=None, metavar="FILE")
    parser.add_argument("--input-size", required=True, metavar="C,H,W",
                        help="the shape of one input sample, e.g. 3,224,224")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    return guarded(_analyze, args)


def _analyze(args: argparse.Namespace) -> None:
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
