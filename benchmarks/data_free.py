"""Merging without data: `fxzip.merge(a, b, None, example_inputs=x)` against the merge with data.

    python -m benchmarks.data_free [--pairs 3] [--vit-pairs 2] [--samples 512] [--steps 100]
                                   [--cache DIR] [--out benchmarks/results]

Two model families, each pair trained from two initialisations on disjoint halves of the digits
(classes 0–4 and 5–9):

  * setting (a) of `benchmarks.accuracy`: `ResNet20(width=4)` with BatchNorms, 20 epochs; pairs
    1..P (`--cache`: their state dicts kept and reused, as `benchmarks.corrections` keeps them);
  * the ViT of `benchmarks.vit_digits` (LayerNorm only: no statistics to match, so the data-free
    inputs are fitted to the class term alone); pairs 1..V.

Rows, at each stop point (joint accuracy over all 10 classes on the test digits, mean ± std):

  * with data (the training inputs of both tasks, as in the accuracy protocol): fxzip's default
    merge, and Git Re-Basin weight matching (`method="weights"`) with the same BN reset and
    corrections;
  * data-free, nothing read or made: `method="weights", reset_bn=False, corrections=None`;
  * data-free with synthesised inputs (`fxzip.Synthesis(samples, steps)`: noise optimised so
    that each model's BatchNorms see their running statistics and the model gives each input a
    random class of its own): weights + BN reset only; the
    data-free default (`fxzip.merge(a, b, None, example_inputs=x)`: weights + corrections); zipit
    on the synthesised inputs + corrections;
  * the ensemble of the two models as trained (their own BatchNorm statistics).

The gap column: the data-free default's joint accuracy minus the default merge's with data.
Writes `data_free.md` and `data_free.csv` to `--out`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import fxzip
from fxzip.demo.digits import evaluate, load_digits_split, train_task_pair

from benchmarks.common.evaluation import accuracy_of
from benchmarks.common.models import digits_vit
from benchmarks.common.settings import make_settings
from benchmarks.common.tables import markdown_table, mean_std, write_dict_csv
from benchmarks.common.training import cached_pair

RESNET_STOPS = (("layer1", "layer1"), ("layer2", "layer2"), (None, "full"))
VIT_STOPS = (("blocks.1", "block 2/4"), (None, "full"))
DATA_FREE_DEFAULT = "data-free: default (weights + corrections)"


def variants(synthesis: fxzip.Synthesis) -> list[tuple[str, bool, dict]]:
    """(row label, reads the real calibration data, merge options)."""
    return [
        ("data: default (zipit + corrections)", True, {}),
        ("data: weights + corrections", True, {"method": "weights"}),
        ("data-free: weights, nothing read", False,
         {"method": "weights", "reset_bn": False, "corrections": None}),
        ("data-free: weights + BN reset", False, {"method": "weights", "corrections": None}),
        (DATA_FREE_DEFAULT, False, {"method": "weights"}),
        ("data-free: zipit + corrections", False, {"method": "zipit"}),
    ]


def merge_rows(family: str, pair: int, models, calibration, x_test, y_test, stops, score,
               synthesis: fxzip.Synthesis, log=print) -> list[dict]:
    """Every variant at every stop point for one pair; `score(model) -> (joint, task_a, task_b)`."""
    example = calibration[0][:2]
    with_data = fxzip.Zipper(models, calibration, progress=False)
    data_free = fxzip.Zipper(models, None, example_inputs=example, synthesis=synthesis,
                             progress=False)
    rows = [dict(family=family, pair=pair, variant="ensemble (as trained)", stop="-",
                 **dict(zip(("joint", "task_a", "task_b"), score(models))), seconds=0.0)]
    for stop, label in stops:
        for name, reads_data, options in variants(synthesis):
            zipper = with_data if reads_data else data_free
            tick = time.perf_counter()
            merged = zipper.merge(stop, **options)
            seconds = time.perf_counter() - tick
            joint, task_a, task_b = score(merged)
            calibration_report = merged.fxzip_report.calibration
            assert reads_data or calibration_report["source"] == "synthesized"
            rows.append(dict(family=family, pair=pair, variant=name, stop=label, joint=joint,
                             task_a=task_a, task_b=task_b, seconds=seconds))
            log(f"  [{family} pair {pair}] {label:9s} {name:45s} joint {100 * joint:5.1f} "
                f"({seconds:.1f}s)")
    return rows


def resnet_rows(pairs: int, synthesis: fxzip.Synthesis, cache: Path | None) -> list[dict]:
    setting = make_settings(4)["a"]
    data = setting.load()
    x, y = data.split.x_test, data.split.y_test

    def score(model):
        acc = accuracy_of(setting, model, x, y)
        return acc.joint, acc.task_a, acc.task_b

    rows = []
    for pair in range(1, pairs + 1):
        models = cached_pair(setting, data, pair, setting.epochs, 4, cache, print)
        rows += merge_rows("ResNet-20x4 (BatchNorm)", pair, models, data.calibration, x, y,
                           RESNET_STOPS, score, synthesis)
    return rows


def vit_rows(pairs: int, synthesis: fxzip.Synthesis, epochs: int = 40,
             lr: float = 1e-3) -> list[dict]:
    rows = []
    for seed in range(1, pairs + 1):
        split = load_digits_split(seed=seed)
        models = train_task_pair(split, digits_vit, seed=seed, epochs=epochs, lr=lr)

        def score(model, split=split):
            acc = evaluate(model, split.x_test, split.y_test)
            return acc.joint, acc.task_a, acc.task_b

        rows += merge_rows("ViT (LayerNorm)", seed, models, [split.x_train], split.x_test,
                           split.y_test, VIT_STOPS, score, synthesis)
    return rows


def summarise(rows: list[dict]) -> str:
    keys = list(dict.fromkeys((r["family"], r["stop"], r["variant"]) for r in rows))
    means = {k: sum(r["joint"] for r in rows if (r["family"], r["stop"], r["variant"]) == k)
             / sum(1 for r in rows if (r["family"], r["stop"], r["variant"]) == k) for k in keys}
    table = []
    for family, stop, variant in keys:
        group = [r for r in rows if (r["family"], r["stop"], r["variant"]) == (family, stop, variant)]
        reference = means.get((family, stop, "data: default (zipit + corrections)"))
        gap = "" if reference is None or stop == "-" or variant.startswith("data:") else \
            f"{100 * (means[(family, stop, variant)] - reference):+.1f}"
        table.append([family, stop, variant,
                      *(mean_std([r[m] for r in group], 100, 1) for m in ("joint", "task_a",
                                                                         "task_b")),
                      gap, f"{sum(r['seconds'] for r in group) / len(group):.1f}"])
    return markdown_table(["model", "stop", "merge", "joint", "task A", "task B",
                           "joint − data default", "seconds"], table, right=range(3, 8))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_free",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3, help="ResNet pairs (seeds 1..P)")
    parser.add_argument("--vit-pairs", type=int, default=2, help="ViT pairs (seeds 1..V)")
    parser.add_argument("--samples", type=int, default=fxzip.Synthesis.samples)
    parser.add_argument("--steps", type=int, default=fxzip.Synthesis.steps)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=None,
                        help="keep the ResNet pairs' state dicts here and reuse them")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    synthesis = fxzip.Synthesis(samples=args.samples, steps=args.steps)
    start = time.perf_counter()
    rows = resnet_rows(args.pairs, synthesis, args.cache) if args.pairs else []
    rows += vit_rows(args.vit_pairs, synthesis) if args.vit_pairs else []
    seconds = time.perf_counter() - start
    text = (f"## Merging without data ({args.pairs} ResNet pairs, {args.vit_pairs} ViT pairs; "
            f"accuracies in %, mean ± std over the pairs)\n\n"
            f"Data-free rows read no calibration sample: they see only the input shapes; where "
            f"they need activations they read {synthesis.samples} synthesised inputs "
            f"({synthesis.steps} Adam steps per batch of {synthesis.batch_size} matching one "
            f"model's BatchNorm statistics, where it has them, and a random class of its own, "
            f"class_loss {synthesis.class_loss:g}). 'seconds': "
            f"the merge's own time (synthesis included the first time a data-free row needs "
            f"it), {args.threads} thread(s).\n\n"
            + summarise(rows) + f"\n\nRun time: {seconds:.0f}s.\n")
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "data_free.md").write_text(text)
    write_dict_csv(args.out / "data_free.csv", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
