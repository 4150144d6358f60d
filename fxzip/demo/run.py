"""The demo (`fxzip demo`): two ResNet-20-style models trained on disjoint halves of the digits,
merged with every method of the paper's tables (weight averaging, Git Re-Basin weight matching
"weights", permute, zipit) and fxzip's default at every stage boundary; the paper-style table and
a plot of joint accuracy against FLOPs (it needs the `demo` extra: `pip install "fxzip[demo]"`)."""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..corrections import reset_bn
from ..runtime.costs import count_flops, count_parameters
from ..zipper import Zipper
from .digits import Accuracy, ResNet20, evaluate, load_digits_split, train_task_pair

DEMO_STOPS = (("layer1", "stage 1"), ("layer2", "stage 2"), (None, "full"))
# the methods of the paper's tables in their order: the paper's `METHOD_NAMES` with Git Re-Basin
# weight matching ("weights", its other baseline) after weight averaging; then fxzip's default merge
DEMO_METHODS = ("average", "weights", "permute", "zipit", "default")
LABELS = {"weights": "weights (Git Re-Basin)"}  # the plot's legend


@dataclass
class DemoRow:
    """One row of the demo's table: a method at a stop point (or the ensemble), its costs and
    accuracies."""

    method: str
    stop: str
    zipped: str
    params: int
    flops: int
    accuracy: Accuracy


def demo(seed: int = 0, width: int = 4, epochs: int = 10, out: Path | str = "fxzip-demo",
         progress: bool = True) -> list[DemoRow]:
    """Run the demo, print its table, write `demo.md` and `demo.png` under `out`; return rows."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"fxzip demo: digits 0-4 vs 5-9, two ResNet-20x{width} (different inits), seed {seed}",
          flush=True)
    split = load_digits_split(seed=seed)
    models = train_task_pair(split, lambda: ResNet20(width=width), seed=seed, epochs=epochs,
                             progress=progress)
    calibration = [split.x_train[i:i + 256] for i in range(0, 768, 256)]
    x_one = split.x_test[:1]
    originals = [reset_bn(m, calibration, progress=False) for m in models]  # as the paper does
    ensemble = evaluate(originals, split.x_test, split.y_test)
    rows = [DemoRow("ensemble", "-", "0/22", sum(count_parameters(m) for m in models),
                    sum(count_flops(m, x_one) for m in models), ensemble)]
    zipper = Zipper(models, calibration, progress=progress)
    for stop, label in DEMO_STOPS:
        for method in DEMO_METHODS:
            # "default": fxzip's merge (zipit + label-free corrections); the rest: the paper's
            options = {} if method == "default" else dict(method=method, corrections=None,
                                                          weight_similarity=0.0)
            merged = zipper.merge(stop, **options)
            report = merged.fxzip_report
            rows.append(DemoRow(method, label, f"{report.layers_zipped}/{report.layers_total}",
                                count_parameters(merged), count_flops(merged, x_one),
                                evaluate(merged, split.x_test, split.y_test)))
    table = format_table(rows)
    print(table)
    (out / "demo.md").write_text(table + "\n")
    plot(rows, out / "demo.png")
    print(f"wrote {out / 'demo.md'} and {out / 'demo.png'}; done in {time.perf_counter() - start:.0f}s")
    return rows


def format_table(rows: Sequence[DemoRow]) -> str:
    """The demo's markdown table."""
    lines = ["| method | stop | zipped | params | MFLOPs | joint | task A | task B | avg |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        a = r.accuracy
        lines.append(f"| {r.method} | {r.stop} | {r.zipped} | {r.params:,} | {r.flops / 1e6:.2f} | "
                     f"{a.joint:.3f} | {a.task_a:.3f} | {a.task_b:.3f} | {a.avg:.3f} |")
    return "\n".join(lines)


def plot(rows: Sequence[DemoRow], path: Path) -> None:
    """Joint accuracy against FLOPs, one line per method (like the paper's figures)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in DEMO_METHODS:
        points = [(r.flops / 1e6, r.accuracy.joint) for r in rows if r.method == method]
        ax.plot(*zip(*points), marker="o", label=LABELS.get(method, method))
    ensemble = next(r for r in rows if r.method == "ensemble")
    ax.scatter([ensemble.flops / 1e6], [ensemble.accuracy.joint], marker="*", s=150, c="k",
               label="ensemble", zorder=3)
    ax.set_xlabel("MFLOPs per sample (merged model, both heads)")
    ax.set_ylabel("joint accuracy (digits 0-9)")
    ax.set_title("two ResNet-20s on disjoint digit halves, merged")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
