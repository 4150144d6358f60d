"""The paper's multi-dataset protocol on offline data: four models, four tasks, one merge.

    python -m benchmarks.multi_task [--quick] [--epochs N] [--width W] [--seed S]
                                    [--out benchmarks/results]

Four models of one architecture (`fxzip.demo.digits.ResNet20(width=W)`; `--quick`: the small
`DigitsCNN`), each from its own initialisation, trained on a disjoint subset of scikit-learn's
digits with its own number of classes: {0,1}, {2,3}, {4,5,6}, {7,8,9} (2, 2, 3, 3 classes; so the
output layers differ in width). They are merged ALL AT ONCE (`fxzip.merge_all`, zipit and
permute) at several stop points: one trunk, four heads. Against: the ensemble of the four, and
merging pairs ({0,1}+{2,3} and {4,5,6}+{7,8,9}, zipit, two trunks with two heads each).

Reported per row: each head's accuracy on its own task's test samples, their mean, the joint
accuracy over all 10 classes (argmax over the concatenated per-head softmaxes), parameters and
FLOPs per sample (`fxzip.runtime.costs`). Calibration data (statistics and the BatchNorm reset, done for
every row, the ensemble included) = the training inputs of all four tasks.

Methods: `default` is fxzip's default merge of all four (zipit matching, a small weight
similarity, the label-free corrections); `zipit` and `permute` are the paper's merges (no
corrections, no weight similarity; the BatchNorm reset); `pairs` merges two pairs with fxzip's
defaults.

Outputs in `--out`: `multi_task.csv`, `multi_task.md` and `multi_task.png` (joint accuracy vs
FLOPs). `--quick`: the small CNN, few epochs, for a smoke run, written as `multi_task_quick.*`.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import fxzip
from fxzip.demo.digits import DigitsCNN, ResNet20, load_digits_split, train_classifier
from fxzip.runtime.costs import count_flops, count_parameters

from benchmarks.common.data import calibration_batches
from benchmarks.common.plots import pyplot
from benchmarks.common.tables import markdown_table, write_csv
from benchmarks.common.training import reset_copies

TASKS = ((0, 1), (2, 3), (4, 5, 6), (7, 8, 9))
PAIRS = ((0, 1), (2, 3))


def evaluate(outputs, y: torch.Tensor, tasks: tuple[tuple[int, ...], ...] = TASKS
             ) -> dict[str, float]:
    """Per-task accuracy of each head on its own classes, their mean, and the joint accuracy
    (`outputs`: one per task of `tasks`, in order)."""
    probs = torch.cat([o.softmax(-1) for o in outputs], dim=-1)
    classes = torch.tensor([c for task in tasks for c in task])
    row = {"joint": (classes[probs.argmax(-1)] == y).float().mean().item()}
    for k, task in enumerate(tasks):
        keep = torch.isin(y, torch.tensor(task))
        pred = torch.tensor(task)[outputs[k][keep].argmax(-1)]
        row[f"task{k}"] = (pred == y[keep]).float().mean().item()
    row["mean"] = sum(row[f"task{k}"] for k in range(len(tasks))) / len(tasks)
    return row


def plot(rows: list[dict], arch: str, path: Path) -> None:
    """Joint accuracy against FLOPs: one line per method through its stop points, the ensemble
    (the first row) as a marker."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, marker in (("default", "D-"), ("zipit", "o-"), ("permute", "s--"),
                           ("pairs", "^:")):
        pts = [(r["flops"] / 1e6, 100 * r["joint"]) for r in rows if r["method"] == method]
        ax.plot(*zip(*pts), marker, label=method)
    ens = rows[0]
    ax.plot([ens["flops"] / 1e6], [100 * ens["joint"]], "k*", markersize=12, label="ensemble")
    ax.set_xlabel("MFLOPs per sample")
    ax.set_ylabel("joint accuracy (%)")
    ax.set_title(f"4 tasks (2+2+3+3 classes), 4 x {arch}")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.multi_task",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    epochs = args.epochs or (8 if args.quick else 30)
    if args.quick:
        make = lambda classes: DigitsCNN(width=16, num_classes=classes)  # noqa: E731
        stops = ["bn1", "pool", None]
        arch = "DigitsCNN(width=16)"
    else:
        make = lambda classes: ResNet20(width=args.width, num_classes=classes)  # noqa: E731
        stops = ["layer1", "layer2", "layer3", None]
        arch = f"ResNet20(width={args.width})"
    split = load_digits_split(seed=args.seed)
    calibration = calibration_batches(split.x_train)
    x_test, y_test = split.x_test, split.y_test
    sample = x_test[:1]

    started = time.perf_counter()
    models = []
    for k, task in enumerate(TASKS):
        torch.manual_seed(args.seed * 100 + k)
        x, y = split.task(task)
        models.append(train_classifier(make(len(task)), x, y, epochs=epochs,
                                       seed=args.seed * 100 + k))
    models = reset_copies(models, calibration)
    print(f"trained 4 x {arch} in {time.perf_counter() - started:.0f} s", flush=True)

    rows = []

    def add(name: str, stop: str, outputs, params: int, flops: int) -> None:
        row = {"method": name, "stop": stop, **evaluate(outputs, y_test), "params": params,
               "flops": flops}
        rows.append(row)
        print(f"{name:10s} {stop:8s} joint {row['joint']:.3f} mean {row['mean']:.3f} "
              f"params {params} flops {flops}", flush=True)

    with torch.no_grad():
        add("ensemble", "-", [m(x_test) for m in models], sum(map(count_parameters, models)),
            sum(count_flops(m, sample) for m in models))
        zipper = fxzip.Zipper(models, calibration, progress=False)
        for stop in stops:  # fxzip's default merge
            merged = zipper.merge(stop)
            add("default", str(stop), merged(x_test), count_parameters(merged),
                count_flops(merged, sample))
        for method in ("zipit", "permute"):  # the paper's: no corrections, no weight similarity
            for stop in stops:
                merged = zipper.merge(stop, method=method, corrections=None,
                                      weight_similarity=0.0)
                add(method, str(stop), merged(x_test), count_parameters(merged),
                    count_flops(merged, sample))
        for stop in stops:  # pairs: two merges of two models each
            merged = [fxzip.merge(models[i], models[j], calibration, stop_at=stop, progress=False)
                      for i, j in PAIRS]
            outputs = [o for m in merged for o in m(x_test)]
            add("pairs", str(stop), outputs, sum(map(count_parameters, merged)),
                sum(count_flops(m, sample) for m in merged))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "multi_task_quick" if args.quick else "multi_task"
    columns = ["method", "stop", "task0", "task1", "task2", "task3", "mean", "joint", "params",
               "flops"]
    write_csv(out / f"{name}.csv", columns, [[r[c] for c in columns] for r in rows])
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    table = markdown_table(
        ["method", "stop", "{0,1}", "{2,3}", "{4,5,6}", "{7,8,9}", "mean", "joint", "params",
         "MFLOPs"],
        [[r["method"], r["stop"], *(pct(r[f"task{k}"]) for k in range(4)), pct(r["mean"]),
          pct(r["joint"]), r["params"], f"{r['flops'] / 1e6:.2f}"] for r in rows])
    header = (f"# Four tasks, one merge: 4 x {arch}, {epochs} epochs, seed {args.seed}\n\n"
              "Test accuracy (%) of each head on its own task, their mean, joint accuracy over "
              "all 10 classes; parameters and FLOPs per sample. `default`: all four merged at "
              "once (`merge_all`) with fxzip's defaults (zipit matching and the label-free "
              "corrections); `zipit`/`permute`: all four at once by the paper's merge (no "
              "corrections, no weight similarity, the BatchNorm reset); `pairs`: {0,1}+{2,3} and "
              "{4,5,6}+{7,8,9} merged separately with fxzip's defaults; stop `None`: every layer "
              "but the output layers.\n\n")
    (out / f"{name}.md").write_text(header + table + "\n")
    plot(rows, arch, out / f"{name}.png")
    print(f"wrote {out / name}.md/.csv/.png in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
