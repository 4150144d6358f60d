"""Many tasks, narrow models: five two-class digit tasks merged into one model's width.

    python -m benchmarks.five_tasks [--quick] [--arch resnet20,resnet56] [--epochs N]
                                    [--seed S] [--cache DIR] [--out benchmarks/results]

Five models of one architecture, each from its own initialisation, trained on one two-class task
of scikit-learn's digits: {0,1}, {2,3}, {4,5}, {6,7}, {8,9}. All five are merged at once
(`fxzip.merge_all`: one trunk, five heads) into ONE model's width (`width=1.0`, the default), for
two narrow architectures: ResNet-20×1 (`ResNet20(width=1)`: 16/32/64 channels, 3 blocks per stage)
and ResNet-56×1 (the same with 9 blocks per stage: a deeper trunk of the same width). Each at
the stop points layer1, layer2, layer3.0 (the first block of the last stage) and None (every
layer but the output layers), by every method (`METHODS`): plain weight averaging, Permute
(Hungarian activation matching), Git Re-Basin weight matching, the paper's ZipIt! (alpha 0.5,
beta 1, no corrections) and fxzip's default merge (zipit with the default corrections). Against:
the ensemble of the five, whose per-head accuracies are each model alone on its own task.

Columns as in `benchmarks.multi_task`: each head's accuracy on its own task's test samples, their
mean, the joint accuracy over all 10 classes (argmax over the concatenated per-head softmaxes),
parameters and FLOPs per sample. Calibration data (statistics, BatchNorm reset for every row, the
ensemble included, and the corrections) = the training inputs of all five tasks.

Trained state dicts are kept in `--cache` (default /tmp/five_cache) and loaded from there.
Outputs in `--out`: `five_tasks.csv`, `five_tasks.md` and `five_tasks.png` (joint accuracy vs
FLOPs, one panel per architecture); `--quick` (the small `DigitsCNN`, few epochs):
`five_tasks_quick.*`.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

import fxzip
from fxzip.demo.digits import DigitsCNN, DigitsSplit, ResNet20, load_digits_split, train_classifier
from fxzip.runtime.costs import count_flops, count_parameters

from benchmarks.common.data import calibration_batches
from benchmarks.common.plots import pyplot
from benchmarks.common.tables import markdown_table, write_csv
from benchmarks.common.training import reset_copies
from benchmarks.multi_task import evaluate

TASKS = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))
PLAIN = {"corrections": None, "weight_similarity": 0.0}  # the paper's merges: BN reset only
METHODS: dict[str, dict[str, Any]] = {
    "average": {"method": "average", **PLAIN},
    "permute": {"method": "permute", **PLAIN},
    "weights": {"method": "weights", **PLAIN},
    "zipit": {"method": "zipit", "alpha": 0.5, "beta": 1.0, **PLAIN},
    "default": {},  # fxzip.merge_all's defaults: zipit + the default corrections
}
ARCHS: dict[str, tuple[str, Callable[[int], nn.Module], list[str | None]]] = {
    # key: (label, make(num_classes), stop points)
    "resnet20": ("ResNet-20x1", lambda n: ResNet20(width=1, num_classes=n),
                 ["layer1", "layer2", "layer3.0", None]),
    "resnet56": ("ResNet-56x1", lambda n: ResNet20(width=1, num_classes=n, blocks_per_stage=9),
                 ["layer1", "layer2", "layer3.0", None]),
    "cnn": ("DigitsCNN(width=8)", lambda n: DigitsCNN(width=8, num_classes=n),
            ["bn1", "pool", None]),
}


def train_models(arch: str, split: DigitsSplit, epochs: int, seed: int,
                 cache: Path | None) -> list[nn.Module]:
    """One model of `arch` per task (seed `seed * 100 + k`), its state dict kept in `cache` as
    `<arch>_e<epochs>_seed<seed>_task<k>.pt` and loaded from there when present."""
    make = ARCHS[arch][1]
    models = []
    for k, task in enumerate(TASKS):
        path = None if cache is None else cache / f"{arch}_e{epochs}_seed{seed}_task{k}.pt"
        torch.manual_seed(seed * 100 + k)
        model = make(len(task))
        if path is not None and path.exists():
            model.load_state_dict(torch.load(path))
            models.append(model.eval())
            continue
        x, y = split.task(task)
        models.append(train_classifier(model, x, y, epochs=epochs, seed=seed * 100 + k))
        if path is not None:
            cache.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), path)
    return models


def merge_rows(models: Sequence[nn.Module], calibration: list[torch.Tensor],
               x_test: torch.Tensor, y_test: torch.Tensor, stops: Sequence[str | None],
               methods: dict[str, dict[str, Any]] = METHODS) -> list[dict]:
    """The ensemble's row, then one row per method and stop point: per-head task accuracies,
    their mean, the joint accuracy, parameters and FLOPs per sample. `models` are expected with
    their BatchNorm statistics already reset on `calibration` (as every merged row's are)."""
    sample = x_test[:1]
    rows = []

    def add(method: str, stop: str, outputs, params: int, flops: int) -> None:
        rows.append({"method": method, "stop": stop, **evaluate(outputs, y_test, TASKS),
                     "params": params, "flops": flops})

    with torch.no_grad():
        add("ensemble", "-", [m(x_test) for m in models], sum(map(count_parameters, models)),
            sum(count_flops(m, sample) for m in models))
        for method, stop, merged in merges(models, calibration, stops, methods):
            add(method, str(stop), merged(x_test), count_parameters(merged),
                count_flops(merged, sample))
    return rows


def merges(models: Sequence[nn.Module], calibration: list[torch.Tensor],
           stops: Sequence[str | None], methods: dict[str, dict[str, Any]] = METHODS
           ) -> Iterator[tuple[str, str | None, fx.GraphModule]]:
    """`(method, stop, merged)` for every method and stop point: all `models` merged at once into
    one model's width, from one `fxzip.Zipper` (traced and its statistics collected once)."""
    zipper = fxzip.Zipper(models, calibration, progress=False)
    for method, options in methods.items():
        for stop in stops:
            yield method, stop, zipper.merge(stop, **options)


def plot(results: dict[str, list[dict]], path: Path) -> None:
    """Joint accuracy against FLOPs, one panel per architecture: one line per method through its
    stop points, the ensemble as a star."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    markers = dict(zip(METHODS, ("x:", "s--", "D-.", "o-", "^-")))
    for ax, (label, rows) in zip(axes[0], results.items()):
        for method, marker in markers.items():
            pts = [(r["flops"] / 1e6, 100 * r["joint"]) for r in rows if r["method"] == method]
            ax.plot(*zip(*pts), marker, label=method)
        ens = rows[0]
        ax.plot([ens["flops"] / 1e6], [100 * ens["joint"]], "k*", markersize=12,
                label="ensemble")
        ax.set_xlabel("MFLOPs per sample")
        ax.set_ylabel("joint accuracy (%)")
        ax.set_title(f"5 tasks x 2 classes, 5 x {label}")
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(results: dict[str, list[dict]], out: Path, name: str, epochs: int,
                  seed: int) -> None:
    """`<name>.csv` (every row, an `arch` column), `<name>.md` (one table) and `<name>.png`."""
    out.mkdir(parents=True, exist_ok=True)
    tasks = [f"task{k}" for k in range(len(TASKS))]
    columns = ["arch", "method", "stop", *tasks, "mean", "joint", "params", "flops"]
    flat = [{"arch": arch, **r} for arch, rows in results.items() for r in rows]
    write_csv(out / f"{name}.csv", columns, [[r[c] for c in columns] for r in flat])
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    table = markdown_table(
        ["model", "method", "stop", *("{%d,%d}" % t for t in TASKS), "mean", "joint", "params",
         "MFLOPs"],
        [[r["arch"], r["method"], r["stop"], *(pct(r[t]) for t in tasks), pct(r["mean"]),
          pct(r["joint"]), r["params"], f"{r['flops'] / 1e6:.2f}"] for r in flat])
    header = (f"# Five tasks, one narrow merge: {epochs} epochs, seed {seed}\n\n"
              "Five models per architecture, each trained on one two-class digit task, merged "
              "all at once (`merge_all`) into one model's width. Test accuracy (%) of each head "
              "on its own task, their mean, joint accuracy over all 10 classes; parameters and "
              "FLOPs per sample. `ensemble`: the five models (each head = that model alone); "
              "`average`, `permute`, `weights`, `zipit` (alpha 0.5, beta 1): no corrections, "
              "BatchNorm reset; `default`: `merge_all`'s defaults (zipit + corrections); stop "
              "`None`: every layer but the output layers.\n\n")
    (out / f"{name}.md").write_text(header + table + "\n")
    plot(results, out / f"{name}.png")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.five_tasks",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small CNN, few epochs")
    parser.add_argument("--arch", default="resnet20,resnet56",
                        help=f"comma-separated, of {', '.join(ARCHS)}")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/five_cache"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    epochs = args.epochs or (6 if args.quick else 30)
    archs = ["cnn"] if args.quick else args.arch.split(",")
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        parser.error(f"unknown --arch {', '.join(unknown)}; choose from {', '.join(ARCHS)}")
    split = load_digits_split(seed=args.seed)
    calibration = calibration_batches(split.x_train)
    results = {}
    for arch in archs:
        label, _, stops = ARCHS[arch]
        started = time.perf_counter()
        models = reset_copies(train_models(arch, split, epochs, args.seed, args.cache),
                              calibration)
        print(f"{label}: 5 models ready in {time.perf_counter() - started:.0f} s", flush=True)
        rows = merge_rows(models, calibration, split.x_test, split.y_test, stops)
        for r in rows:
            print(f"  {r['method']:9s} {r['stop']:9s} mean {r['mean']:.3f} joint "
                  f"{r['joint']:.3f} params {r['params']}", flush=True)
        print(f"{label}: done in {time.perf_counter() - started:.0f} s", flush=True)
        results[label] = rows
    name = "five_tasks_quick" if args.quick else "five_tasks"
    write_results(results, Path(args.out), name, epochs, args.seed)
    print(f"wrote {Path(args.out) / name}.md/.csv/.png")


if __name__ == "__main__":
    main()
