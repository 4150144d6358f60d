"""A Hugging Face transformer merge on real data: two tiny BERTs trained on disjoint halves of the
digits, each digit read as a sequence of pixel-intensity tokens.

    python -m benchmarks.bert_digits [--pairs 3] [--epochs 15] [--lr 5e-4] [--out DIR]
    python -m benchmarks.bert_digits --quick     # one pair, 4 epochs, two stop points: a smoke run

Each pair: two `transformers.BertForSequenceClassification` built from a `BertConfig` (hidden
size 64, 4 layers of 4 heads, intermediate size 128, 5 labels; a vocabulary of the 17 pixel
intensities 0..16 of scikit-learn's digits plus [CLS] and [PAD]; weights initialised with std 0.1
instead of BERT's 0.02, which trains several times faster here; no dropout), different
initialisations, trained on classes 0–4 and 5–9 on the CPU (Adam, batch 16, cross-entropy,
`fxzip.demo.digits.train_classifier`). A digit is [CLS] and its 8×8 intensities read row by row,
65 tokens; batches are dicts of `input_ids` and `attention_mask`, as transformers takes them, and
the calibration data are the training digits of both tasks. fxzip captures the models through
torch.export (capture="auto") and merges them after each encoder layer
(`bert.encoder.layer.0` … `.3`) and fully (`None`: everything but the classifiers), with fxzip's
default merge and with the paper's (zipit, alpha 0.5, beta 1, `corrections=None,
weight_similarity=0`). alpha and beta are the defaults, not chosen by a grid on a held-out pair as
in `benchmarks.vit_digits`: that grid would cost more than the rest of the run. References: the
ensemble of both whole models, and each model alone (the other head answering uniformly, so its
joint accuracy counts only its own classes). Joint accuracy = argmax over both heads' softmaxes
over all 10 classes on the test digits; task A/B = each head on its own classes; `refitted` =
layers the default merge's corrections refitted (from the merge report); mean ± std over the
pairs (seeds 1..P). Writes `bert_digits.md` and `bert_digits.csv` to `--out`
(`bert_digits_quick.*` with `--quick`); the CSV has each pair's rows, with each merge's seconds
(the first merge of a pair includes capturing the models and collecting statistics; the ensemble's
are the training of both models).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

import fxzip
from fxzip.demo.digits import (TASK_CLASSES, DigitsSplit, evaluate_heads, load_digits_split,
                               train_classifier)

from benchmarks.common.data import calibration_batches
from benchmarks.common.tables import markdown_table, mean_std, write_dict_csv

LEVELS = 17                      # pixel intensities 0..16: tokens 0..16
CLS, PAD = LEVELS, LEVELS + 1    # the special tokens
LAYERS = 4
STOPS = tuple((f"bert.encoder.layer.{i}", f"layer {i + 1}/{LAYERS}") for i in range(LAYERS)) + (
    (None, "full"),)
QUICK_STOPS = (STOPS[1], STOPS[-1])
INIT_STD = 0.1     # BERT's 0.02: the same accuracy takes several times more epochs
BATCH_SIZE = 16
PAPER = dict(corrections=None, weight_similarity=0.0)  # the paper's merge: no corrections


def digits_bert(num_labels: int = 5) -> nn.Module:
    """A tiny BERT classifier over digit tokens (random weights from torch's global seed)."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=LEVELS + 2, hidden_size=64, num_hidden_layers=LAYERS,
                        num_attention_heads=4, intermediate_size=128,
                        max_position_embeddings=1 + 64, type_vocab_size=1, pad_token_id=PAD,
                        initializer_range=INIT_STD, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=num_labels)
    return BertForSequenceClassification(config)


def tokens(split: DigitsSplit) -> DigitsSplit:
    """`split` with each digit as [CLS] + its 64 intensities (token ids, long). The split's
    inputs are an affine map of the integer intensities (standardised), so the rank of each value
    among the 17 distinct values is its intensity."""
    x = torch.cat([split.x_train, split.x_test]).flatten(1)
    values, ids = torch.unique(x, return_inverse=True)
    if len(values) != LEVELS:
        raise ValueError(f"expected {LEVELS} distinct intensities in the digits, got {len(values)}")
    ids = torch.cat([torch.full((len(ids), 1), CLS), ids], dim=1)
    n = len(split.x_train)
    return DigitsSplit(ids[:n], split.y_train, ids[n:], split.y_test)


def as_batch(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """A batch as transformers takes it (no padding: every digit has 65 tokens)."""
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class Logits(nn.Module):
    """Token ids in, the classifier's logits out: how `train_classifier` trains a BERT."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(**as_batch(ids)).logits


def train_pair(split: DigitsSplit, seed: int, epochs: int, lr: float) -> list[nn.Module]:
    """Two BERTs, different initialisations (seeds 100·seed and 100·seed + 1, as
    `fxzip.demo.digits.train_task_pair`), trained on the two tasks; in eval mode."""
    models = []
    for k, classes in enumerate(TASK_CLASSES):
        torch.manual_seed(seed * 100 + k)
        x, y = split.task(classes)
        models.append(train_classifier(Logits(digits_bert()), x, y, epochs=epochs, lr=lr,
                                       batch_size=BATCH_SIZE, seed=seed * 100 + k).model)
    return models


def outputs(model_or_pair, ids: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, ...]:
    """The logits of each head of a merged model, or of each model of a list, on `ids`."""
    chunks = []
    with torch.no_grad():
        for i in range(0, len(ids), batch_size):
            batch = as_batch(ids[i:i + batch_size])
            if isinstance(model_or_pair, (list, tuple)):
                out = [m(**batch) for m in model_or_pair]
            else:
                out = list(model_or_pair(**batch))
            chunks.append([o.logits for o in out])
    return tuple(torch.cat(parts) for parts in zip(*chunks))


def alone(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One model on its own as a pair of heads: the other head gives uniform probabilities (so the
    joint accuracy counts its own classes only) and is not scored as a task."""
    uniform = torch.zeros_like(logits)
    return (logits, uniform) if k == 0 else (uniform, logits)


def run_pair(seed: int, epochs: int, lr: float, stops) -> list[dict]:
    """One pair's rows: the references, then both merges at every stop point. `seconds`: a
    merge's wall time (the first also pays for capturing the models and for the statistics), or
    for the ensemble the training of both models."""
    split = tokens(load_digits_split(seed=seed))
    start = time.perf_counter()
    models = train_pair(split, seed, epochs, lr)
    train_seconds = time.perf_counter() - start
    rows = []

    def add(method, stop, zipped, outs, refitted="-", seconds=float("nan"), tasks=(0, 1)):
        acc = evaluate_heads(outs, split.y_test)
        task = [acc.task_a if 0 in tasks else float("nan"),
                acc.task_b if 1 in tasks else float("nan")]
        rows.append(dict(seed=seed, method=method, stop=stop, zipped=zipped, refitted=refitted,
                         joint=acc.joint, task_a=task[0], task_b=task[1], seconds=seconds))

    parents = outputs(models, split.x_test)
    add("ensemble", "-", "0/-", parents, seconds=train_seconds)
    add("model A alone", "-", "0/-", alone(parents[0], 0), tasks=(0,))
    add("model B alone", "-", "0/-", alone(parents[1], 1), tasks=(1,))
    start = time.perf_counter()
    zipper = fxzip.Zipper(models, [as_batch(b) for b in calibration_batches(split.x_train)],
                          progress=False)
    prepare = time.perf_counter() - start
    for stop, label in stops:
        for method, options in (("default", {}), ("paper", PAPER)):
            start = time.perf_counter()
            merged = zipper.merge(stop, **options)
            seconds = time.perf_counter() - start + prepare
            prepare = 0.0
            report = merged.fxzip_report
            if report.barriers:  # nothing to hide: the table would show a shallower merge
                raise RuntimeError(f"fxzip stopped at a barrier merging at {label}: "
                                   f"{report.barriers}")
            refitted = "-" if report.corrections is None else len(report.corrections.refitted)
            add(method, label, f"{report.layers_zipped}/{report.layers_total}",
                outputs(merged, split.x_test), refitted, seconds)
    return rows


def summarise(rows: list[dict]) -> str:
    keys = []
    for r in rows:
        if (r["method"], r["stop"]) not in keys:
            keys.append((r["method"], r["stop"]))
    table = []
    for method, stop in keys:
        group = [r for r in rows if (r["method"], r["stop"]) == (method, stop)]
        avg = [(r["task_a"] + r["task_b"]) / 2 for r in group]
        table.append([method, stop, group[0]["zipped"], group[0]["refitted"],
                      *(mean_std([r[m] for r in group], 100, 1)
                        for m in ("joint", "task_a", "task_b")), mean_std(avg, 100, 1)])
    return markdown_table(["method", "stop", "zipped", "refitted", "joint", "task A", "task B",
                           "avg"], table, right=range(3, 8))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bert_digits",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=5e-4, help="Adam learning rate")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: one pair, 4 epochs, stops after layer 2 and full")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pairs, epochs, stops = (1, 4, QUICK_STOPS) if args.quick else (args.pairs, args.epochs, STOPS)
    start = time.perf_counter()
    rows = []
    for seed in range(1, pairs + 1):
        rows.extend(run_pair(seed, epochs, args.lr, stops))
        print(f"pair {seed} done ({time.perf_counter() - start:.0f}s)", flush=True)
    table = summarise(rows)
    header = (f"## Two BERTs on disjoint digit halves ({pairs} pairs, seeds 1..{pairs}; "
              f"{epochs} epochs, Adam lr {args.lr}; accuracies in %, mean ± std over the pairs)"
              "\n\n")
    text = header + table + f"\n\nRun time: {time.perf_counter() - start:.0f}s.\n"
    print(text)
    name = "bert_digits_quick" if args.quick else "bert_digits"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.md").write_text(text)
    write_dict_csv(args.out / f"{name}.csv", rows)


if __name__ == "__main__":
    sys.exit(main())
