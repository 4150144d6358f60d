"""The command line of `python -m benchmarks.speed` (what it measures: the package docstring):
the settings of a full or `--quick` run, the tables in order, `speed.md`."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import benchmarks.speed
from fxzip.demo.digits import load_digits_split
from fxzip.runtime.moments import resolve_precision

from benchmarks.common.cases import CaseSpec, build_case, digits_case
from benchmarks.common.tables import Table
from benchmarks.common.timing import load_average

from .children import REPO, child_main, run_child
from .floor import TAPS_CHOICES, floor_table
from .inference import inference_per_stop
from .matching import matching_scaling
from .merge_memory import merge_breakdown, peak_memory
from .statistics_pass import statistics_vs_forward

DEFAULT_THREADS = 2
INFERENCE_BATCH = 128
DIGITS_STOPS = (0, "layer1", "layer2", "layer3", None)
MATCHING_SIZES = (64, 128, 256, 512, 1024, 2048)


@dataclass(frozen=True)
class Settings:
    quick: bool
    resnet50: CaseSpec
    reference_max: int
    statistics_repeats: dict[str, int]
    inference_repeats: int


def settings(quick: bool) -> Settings:
    if quick:
        return Settings(True, CaseSpec("resnet50", 32, 128, 16), 1024,
                        {"digits": 2, "resnet50": 1}, 10)
    return Settings(False, CaseSpec("resnet50", 64, 224, 16), max(MATCHING_SIZES),
                    {"digits": 3, "resnet50": 3}, 30)


def environment(argv: Sequence[str]) -> str:
    """The command and the software/hardware it ran on."""
    command = " ".join(["python -m benchmarks.speed", *argv])
    return (f"command: `{command}`  \ntorch {torch.__version__}, {torch.get_num_threads()} "
            f"threads, numpy {np.__version__}, python {platform.python_version()}, "
            f"{os.cpu_count()} CPUs, {platform.machine()} ({cpu_capability()}; Gram products "
            f"in {resolve_precision('auto', torch.device('cpu'))} by default)")


def cpu_capability() -> str:
    """The vector extensions torch's CPU kernels use here (e.g. AVX2, AVX512)."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        return "unknown"


def floor_specs(config: Settings, kinds: Sequence[str] = ("resnet50", "vit"),
                images: int | None = None, size: int | None = None) -> list[CaseSpec]:
    default_images, default_size = (16, 128) if config.quick else (32, 224)
    images, size = images or default_images, size or default_size
    return [CaseSpec(kind, images, size, 16) for kind in kinds]


def run_floor(config: Settings, out: Path, argv: Sequence[str],
              kinds: Sequence[str] = ("resnet50", "vit"), choices: Sequence[str] = TAPS_CHOICES,
              images: int | None = None, size: int | None = None,
              repeats: int | None = None, threads: int = 0, one_thread: bool = True) -> None:
    """`--ratios`: section 6 alone, written to 6_floor.md/csv."""
    header = [environment(argv), f"load average at start: {load_average()}"]
    print("\n".join(header), flush=True)
    table = floor_table(floor_specs(config, kinds, images, size),
                        repeats or (1 if config.quick else 2), choices, threads, one_thread)
    table.notes.append(f"load average at end: {load_average()}")
    print("\n" + table.text() + "\n", flush=True)
    table.write(out)


def run_benchmarks(config: Settings, out: Path, argv: Sequence[str]) -> None:
    started = time.perf_counter()
    header = [environment(argv), f"load average at start: {load_average()}"]
    print("\n".join(header), flush=True)
    tables: list[Table] = []

    def emit(table: Table) -> None:
        print("\n" + table.text() + "\n", flush=True)
        table.write(out)
        tables.append(table)

    digits_spec = CaseSpec("digits")
    specs = [digits_spec, config.resnet50]
    merges = {spec: run_child("merge", spec) for spec in specs}
    emit(merge_breakdown(merges))

    digits = digits_case()
    resnet = build_case(config.resnet50)
    for table in statistics_vs_forward([digits, resnet], config.statistics_repeats):
        emit(table)
    del resnet

    emit(matching_scaling(MATCHING_SIZES, config.reference_max))
    emit(peak_memory(specs, merges))
    x_test = load_digits_split().x_test[:INFERENCE_BATCH]
    emit(inference_per_stop(digits, x_test, DIGITS_STOPS, config.inference_repeats))
    emit(floor_table(floor_specs(config), 1 if config.quick else 2,
                     threads=torch.get_num_threads()))

    footer = (f"load average at end: {load_average()}; total {time.perf_counter() - started:.0f} s"
              f"{' (--quick)' if config.quick else ''}")
    print(footer)
    body = "\n".join(t.markdown() for t in tables)
    (out / "speed.md").write_text("# fxzip speed benchmarks\n\n" + "  \n".join(header)
                                  + "\n\n" + body + "\n" + footer + "\n")
    print(f"tables written to {out}/ (speed.md, *.md, *.csv)")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed",
                                     description=benchmarks.speed.__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="resnet50 on 32 images of 128×128; reference matching up to n=1024 "
                             "(extrapolated beyond); fewer repeats")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results",
                        help="directory for the markdown and CSV tables")
    parser.add_argument("--threads", type=int,
                        help=f"torch.set_num_threads for every measurement (default "
                        f"{DEFAULT_THREADS}; with --ratios torch's default thread count, left "
                        "unchanged, for the wall-clock run)")
    parser.add_argument("--ratios", action="store_true",
                        help="only section 6 (cost against the floor, resnet50 and ViT-S/16)")
    parser.add_argument("--ratio-cases", default="resnet50,vit",
                        help="with --ratios: the cases, comma-separated (default %(default)s)")
    parser.add_argument("--ratio-taps", default=",".join(TAPS_CHOICES),
                        help="with --ratios: the taps choices, each optionally @positions, e.g. "
                        "all@0.25 (default %(default)s)")
    parser.add_argument("--ratio-images", type=int, help="with --ratios: calibration images "
                        "(default 32; --quick 16), in batches of 16")
    parser.add_argument("--ratio-size", type=int, help="with --ratios: image size (default 224; "
                        "--quick 128)")
    parser.add_argument("--ratio-repeats", type=int, help="with --ratios: interleaved rounds "
                        "(default 2; --quick 1)")
    parser.add_argument("--ratio-wall-only", action="store_true", help="with --ratios: skip the "
                        "second process per case on one thread (the CPU-time columns)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-case", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads or not (args.child or args.ratios):
        torch.set_num_threads(args.threads or DEFAULT_THREADS)
    if args.child:
        print(json.dumps(child_main(args.child, CaseSpec(**json.loads(args.child_case)))))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if args.ratios:
        run_floor(settings(args.quick), args.out, argv, args.ratio_cases.split(","),
                  args.ratio_taps.split(","), args.ratio_images, args.ratio_size,
                  args.ratio_repeats, args.threads or 0, not args.ratio_wall_only)
        return
    run_benchmarks(settings(args.quick), args.out, argv)


if __name__ == "__main__":
    main()
