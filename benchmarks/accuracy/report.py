"""Part of `benchmarks.accuracy` (`python -m benchmarks.accuracy`): a setting's results as files:
`accuracy_<setting>.md` (the mean ± std table with the protocol's details and the fidelity study),
`accuracy_<setting>.csv` (one line per evaluation pair, method and stop point) and
`accuracy_<setting>.png` (joint accuracy against FLOPs)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.common import tables
from benchmarks.common.plots import finish_plot, pyplot
from benchmarks.common.rows import METRICS, Summary, cell, metric, summarise
from benchmarks.common.settings import Setting

from .fidelity_study import study_markdown
from .protocol import SettingResult


TABLE_COLUMNS = ["method", "stop", "zipped", "params", "FLOPs", "joint", "task A", "task B", "avg"]
# what the method names of the table mean (a line under every setting's table)
METHODS_LEGEND = ("Methods: default = fxzip's default merge (zipit, weight similarity, the label-free "
                  "corrections); auto = settings=\"auto\"; the paper's baselines, uncorrected: average "
                  "= weight averaging, weights = Git Re-Basin weight matching (no data), permute = "
                  "Git Re-Basin activation matching (feature correlations); zipit = ZipIt! with the "
                  "alpha/beta below.")


def table_cells(setting: Setting, s: Summary) -> list[str]:
    """One line of the mean ± std table: a (method, stop) summary's cells."""
    return [s.method, s.stop, s.zipped, f"{s.params:,}", f"{s.flops / 1e6:.2f}M",
            *(cell(setting, s, m) for m in METRICS)]


def markdown(result: SettingResult) -> str:
    """The mean ± std table with the protocol's details."""
    setting = result.setting
    summaries = summarise(result.rows)
    n_eval = result.pairs - 1
    lines = [f"## Setting ({setting.key}): {setting.title}", "",
             f"{n_eval} evaluation pairs (seeds 1..{n_eval}) + held-out pair (seed 0); "
             f"{result.epochs} training epochs; accuracies in % on the test data, "
             f"mean ± sample std over the evaluation pairs. BatchNorm statistics reset on the "
             f"calibration data (training inputs of both tasks) for every row.", "",
             tables.markdown_table(TABLE_COLUMNS, (table_cells(setting, s) for s in summaries),
                                   right=range(3, 9)),
             "", METHODS_LEGEND]
    if setting.embedding:
        lines.append("Scores are cosine similarities to the 10 fixed class embeddings; split heads and "
                     "the ensemble take the max over both heads' similarities; 'ensemble (mean emb)' "
                     "scores the mean of the two normalised embeddings; model A/B and the 'shared' "
                     "merge (ONE output: the output layer averaged) use their single embedding for "
                     "both tasks.")
    else:
        lines.append("Model A/B alone: joint = argmax over its own 5 classes counted on all 10 classes; "
                     "the other task is chance level (0.2) by definition (no outputs for those "
                     "classes); * avg includes that chance value.")
    if setting.note:
        lines.append(setting.note)
    lines.append("")
    lines.append("zipit (alpha, beta) chosen per stop point on the held-out pair's validation "
                 "joint accuracy (20% of the training data, not trained on): " + ", ".join(
                     f"{k}: ({c.alpha}, {c.beta}) val joint {100 * c.val.joint:.1f}"
                     for k, c in result.choices.items()) + ".")
    own = np.array(result.single_acc)
    lines.append(f"Original models' own-task test accuracy (all {result.pairs} pairs, before BN reset): "
                 f"A {100 * own[:, 0].mean():.1f} (min {100 * own[:, 0].min():.1f}), "
                 f"B {100 * own[:, 1].mean():.1f} (min {100 * own[:, 1].min():.1f}).")
    lines.append("Run time: " + ", ".join(f"{k} {v:.0f}s" for k, v in result.seconds.items()) + ".")
    if result.study:
        lines += ["", study_markdown(result)]
    return "\n".join(lines) + "\n"


def write_csv(result: SettingResult, path: Path) -> None:
    """One line per evaluation pair, method and stop point."""
    tables.write_csv(path, ["setting", "pair", "method", "stop", "zipped", "params", "flops",
                            "joint", "task_a", "task_b", "avg", "alpha", "beta", "corrections"],
                     ([result.setting.key, r.pair, r.method, r.stop, r.zipped, r.params, r.flops]
                      + [f"{metric(r.acc, m):.4f}" for m in METRICS]
                      + ["" if r.alpha is None else r.alpha, "" if r.beta is None else r.beta,
                         r.corrections]
                      for r in result.rows))


def plot(result: SettingResult, path: Path) -> None:
    """Joint accuracy vs FLOPs: one line per method through its stop points, the ensemble and
    the single models as reference markers."""
    plt = pyplot()
    summaries = summarise(result.rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {"average": "tab:gray", "weights": "tab:cyan", "permute": "tab:blue", "zipit": "tab:red",
               "default": "tab:orange", "auto": "tab:brown"}
    for method, colour in colours.items():
        points = sorted((s for s in summaries if s.method == method), key=lambda s: s.flops)
        if not points:
            continue
        ax.errorbar([s.flops / 1e6 for s in points], [100 * s.mean["joint"] for s in points],
                    yerr=[100 * s.std["joint"] for s in points], marker="o", color=colour,
                    label="weights (Git Re-Basin)" if method == "weights" else method, capsize=3)
        if method == "zipit":
            labels: dict[tuple[float, float], list[str]] = {}
            for s in points:  # stop points that coincide share one label
                labels.setdefault((s.flops / 1e6, round(100 * s.mean["joint"], 2)), []).append(s.stop)
            for xy, names in labels.items():
                ax.annotate("/".join(names), xy, fontsize=7, textcoords="offset points",
                            xytext=(4, 4))
    finish_plot(fig, ax, summaries, f"({result.setting.key}) {result.setting.title}", path)
