"""A generative merge on real text: two byte-level Llama models, one trained on English, one on
Python, zipped into one language model over their one vocabulary and written back as a
transformers model.

    python -m benchmarks.lm_text [--seeds 2] [--steps 500] [--out benchmarks/results] [--quick]

Per seed: two `transformers.LlamaForCausalLM` of one tiny config (`CONFIG`: bytes as tokens, a
vocabulary of 256, hidden 128, 4 layers, 4 heads with 2 key/value heads, MLP 256, contexts of 128
bytes), from different initialisations, each trained on the CPU for a fixed number of AdamW steps
on its own text, all offline:

- A: English — the values of `pydoc_data.topics.topics` (Python's own help texts), in key order;
- B: Python — the standard library's top-level `*.py` files in name order, concatenated, the first
  `B_BYTES` bytes.

The last 10% of each text is held out as its test text. The two models are merged with
`shared_output=True` (every layer zipped, `stop_at=None`, the output layers averaged over the
one vocabulary: one language model), on calibration batches of 128-byte windows from both
training texts (`{"input_ids": LongTensor[B, T]}`); the graphs are captured by torch.export
(`capture="auto"`). Rows: each parent, the ensemble (the mean of the two parents' next-byte
probabilities: two models' cost), weight averaging (`method="average"`), Git Re-Basin-style
permutation (`method="permute"`), the paper's ZipIt! (`corrections=None, weight_similarity=0`,
alpha 0.5, beta 1) and fxzip's default merge; the merges without corrections are the paper's
algorithms as published. One `fxzip.Zipper` per seed serves every merge row: the same models as
`fxzip.merge(a, b, batches, shared_output=True, ...)` with one capture and one statistics pass.
Columns: perplexity per byte on each test text (non-overlapping 129-byte windows, evenly spread
over the text; the first byte of each window is context only) and their mean.

Each merge is written back with `fxzip.to_model(merged, like=model_a)` (a `LlamaForCausalLM`
under the original parameter names) and its logits compared with the merged GraphModule's (max
|difference|). The default merge's model is saved with `save_pretrained`, reloaded with
`transformers.AutoModelForCausalLM.from_pretrained` and asked (`generate`, greedy) for a
continuation of one prompt from each test text; the parents continue the same prompts.

Writes `lm_text.md` and `lm_text.csv` to `--out` (`lm_text_quick.*` with `--quick`: fewer steps,
one seed, fewer windows).
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import platform
import sys
import sysconfig
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

import fxzip

from benchmarks.common.tables import markdown_table, mean_std, write_dict_csv

CONFIG = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              tie_word_embeddings=False)
CONTEXT = 128          # bytes per window: training, calibration and test
B_BYTES = 1 << 20      # the first MiB of the standard library's sources
TEST_SHARE = 0.1
BATCH = 8              # training batch (windows)
PROMPT_BYTES = 48
NEW_BYTES = 40

PAPER = dict(corrections=None, weight_similarity=0.0)
# (row label, Zipper.merge keywords)
MERGES = (
    ("average", dict(method="average", **PAPER)),
    ("permute", dict(method="permute", **PAPER)),
    ("zipit (paper)", dict(method="zipit", alpha=0.5, beta=1.0, **PAPER)),
    ("default", dict()),
)


# ---------------------------------------------------------------------------------------------
# the texts
# ---------------------------------------------------------------------------------------------

@dataclass
class Corpus:
    name: str
    description: str
    train: torch.Tensor   # bytes as int64
    test: torch.Tensor


def _tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def _split(name: str, description: str, data: bytes) -> Corpus:
    cut = int(len(data) * (1 - TEST_SHARE))
    return Corpus(name, description, _tensor(data[:cut]), _tensor(data[cut:]))


def english() -> Corpus:
    """Python's own help texts (`pydoc_data.topics`), in key order."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    data = "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")
    return _split("A", f"English: `pydoc_data.topics` ({len(topics)} help texts)", data)


def python_sources() -> Corpus:
    """The standard library's top-level .py files in name order, the first `B_BYTES` bytes."""
    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(stdlib, "*.py")))
    chunks, total, used = [], 0, 0
    for path in files:
        with open(path, "rb") as f:
            chunks.append(f.read())
        total += len(chunks[-1]) + 2
        used += 1
        if total >= B_BYTES:
            break
    data = b"\n\n".join(chunks)[:B_BYTES]
    first, last = os.path.basename(files[0]), os.path.basename(files[used - 1])
    return _split("B", f"Python: the standard library's first {used} top-level files "
                       f"({first} … {last}), first {B_BYTES:,} bytes", data)


def random_windows(data: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` windows of CONTEXT + 1 bytes at random offsets."""
    starts = torch.randint(0, len(data) - CONTEXT - 1, (count,), generator=generator)
    return torch.stack([data[s:s + CONTEXT + 1] for s in starts.tolist()])


def test_windows(data: torch.Tensor, limit: int) -> torch.Tensor:
    """Non-overlapping windows of CONTEXT + 1 bytes, at most `limit`, evenly spread."""
    all_windows = data[:len(data) // (CONTEXT + 1) * (CONTEXT + 1)].view(-1, CONTEXT + 1)
    if len(all_windows) <= limit:
        return all_windows
    return all_windows[torch.linspace(0, len(all_windows) - 1, limit).round().long()]


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------

def make_model(seed: int) -> torch.nn.Module:
    import transformers

    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))


def train(corpus: Corpus, seed: int, steps: int, lr: float) -> tuple[torch.nn.Module, float]:
    """A model from initialisation `seed`, trained `steps` AdamW steps (linear warm-up over the
    first 10%, cosine decay) on random windows of the corpus; (model in eval mode, seconds)."""
    model = make_model(seed).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min((i + 1) / warmup,
                                 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))))
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(steps):
        batch = random_windows(corpus.train, BATCH, generator)
        logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    return model.eval(), time.perf_counter() - start


def logits_of(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """input_ids -> next-byte logits, for a transformers model or a merged GraphModule."""
    return lambda ids: model(input_ids=ids).logits


def ensemble_of(a: torch.nn.Module, b: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The log of the mean of both models' next-byte probabilities."""
    def log_probs(ids: torch.Tensor) -> torch.Tensor:
        both = torch.stack([F.log_softmax(m(input_ids=ids).logits, -1) for m in (a, b)])
        return torch.logsumexp(both, 0) - math.log(2)
    return log_probs


@torch.no_grad()
def perplexity(fn: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor,
               batch: int = 64) -> float:
    """exp(mean negative log-likelihood per predicted byte) over the windows."""
    total, count = 0.0, 0
    for chunk in windows.split(batch):
        logits = fn(chunk[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                 chunk[:, 1:].reshape(-1), reduction="sum").item()
        count += chunk[:, 1:].numel()
    return math.exp(total / count)


def calibration(corpora: list[Corpus], batches: int, per_corpus: int,
                seed: int) -> list[dict[str, torch.Tensor]]:
    """`batches` batches of `per_corpus` training windows of each corpus (CONTEXT bytes)."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    out = []
    for _ in range(batches):
        ids = torch.cat([random_windows(c.train, per_corpus, generator)[:, :-1] for c in corpora])
        out.append({"input_ids": ids})
    return out


# ---------------------------------------------------------------------------------------------
# back into transformers
# ---------------------------------------------------------------------------------------------

def to_model_difference(merged: Any, like: torch.nn.Module, ids: torch.Tensor
                        ) -> tuple[torch.nn.Module | None, float | str]:
    """`fxzip.to_model(merged, like=like)` and the max |difference| of its logits to the merged
    GraphModule's on `ids` (an error message instead where it fails)."""
    if not hasattr(fxzip, "to_model"):
        return None, "no fxzip.to_model"
    try:
        model = fxzip.to_model(merged, like=like).eval()
    except Exception as e:  # reported in the table, the run goes on
        return None, f"{type(e).__name__}: {e}"
    with torch.no_grad():
        diff = (model(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max().item()
    return model, diff


def prompt_of(corpus: Corpus) -> torch.Tensor:
    """PROMPT_BYTES of the test text, from its first line after 1/3 of it that starts with a
    letter."""
    data, third = corpus.test, len(corpus.test) // 3
    starts = [i + 1 for i in (data[third:-PROMPT_BYTES] == ord("\n")).nonzero().flatten().tolist()]
    start = next((third + i for i in starts if chr(int(data[third + i])).isalpha()), third)
    return data[start:start + PROMPT_BYTES]


@torch.no_grad()
def continuation(model: torch.nn.Module, prompt: torch.Tensor) -> bytes:
    """NEW_BYTES greedy bytes after `prompt`."""
    ids = prompt[None]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                         max_new_tokens=NEW_BYTES, min_new_tokens=NEW_BYTES, do_sample=False,
                         pad_token_id=0)
    return bytes(out[0, ids.shape[1]:].tolist())


def shown(data: bytes | torch.Tensor) -> str:
    """Bytes as one line: UTF-8 where it decodes, newlines and tabs escaped."""
    if isinstance(data, torch.Tensor):
        data = bytes(data.tolist())
    text = data.decode("utf-8", errors="backslashreplace")
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace(
        "\r", "\\r").replace("\\\\x", "\\x")


def round_trip(merged: Any, model: torch.nn.Module, parents: list[torch.nn.Module],
               corpora: list[Corpus], ids: torch.Tensor) -> dict[str, Any]:
    """save_pretrained / AutoModelForCausalLM.from_pretrained of the written-back model: its
    logits against the merged GraphModule's, and greedy continuations of one prompt per text by
    the parents and the reloaded model."""
    import transformers

    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        files = sorted(os.listdir(directory))
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        diff = (reloaded(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max().item()
    samples = []
    for corpus in corpora:
        prompt = prompt_of(corpus)
        samples.append((corpus, prompt, [(label, continuation(m, prompt)) for label, m in
                                         (("parent A", parents[0]), ("parent B", parents[1]),
                                          ("merged (reloaded)", reloaded))]))
    return dict(reloaded_class=type(reloaded).__name__, reload_diff=diff, files=files,
                samples=samples)


# ---------------------------------------------------------------------------------------------
# one seed
# ---------------------------------------------------------------------------------------------

def run_seed(seed: int, corpora: list[Corpus], args: argparse.Namespace,
             tests: list[torch.Tensor], log: Callable[[str], None]) -> tuple[list[dict], dict]:
    rows: list[dict] = []
    parents, training = [], []
    for k, corpus in enumerate(corpora):
        model, seconds = train(corpus, 2 * seed + k, args.steps, args.lr)
        parents.append(model)
        training.append(dict(seed=seed, model=f"parent {corpus.name}", init=2 * seed + k,
                             steps=args.steps, seconds=seconds))
        log(f"  seed {seed}: parent {corpus.name} trained, {args.steps} steps, {seconds:.0f}s")

    def add(label: str, fn: Callable, **extra: Any) -> dict:
        ppl = [perplexity(fn, t) for t in tests]
        row = dict(seed=seed, row=label, zipped="-", ppl_a=ppl[0], ppl_b=ppl[1],
                   ppl_mean=sum(ppl) / 2, to_model_max_abs_diff="", merge_seconds="", refitted="",
                   capture="", barriers="")
        row.update(extra)
        rows.append(row)
        log(f"  seed {seed}: {label}: ppl A {ppl[0]:.3f}, B {ppl[1]:.3f}")
        return row

    for k, model in enumerate(parents):
        add(f"parent {corpora[k].name}", logits_of(model))
        training[k].update(ppl_a=rows[-1]["ppl_a"], ppl_b=rows[-1]["ppl_b"])
    add("ensemble (2 models)", ensemble_of(*parents))

    calib = calibration(corpora, args.calibration_batches, args.calibration_windows, seed)
    probe = tests[0][:8, :-1]
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zipper = fxzip.Zipper(parents, calib, shared_output=True, progress=False)
    prepare = time.perf_counter() - start
    barriers = "; ".join(f"{b.node} ({b.op}): {b.reason}" for b in zipper.analysis.barriers) or "-"
    extra: dict[str, Any] = dict(prepare_seconds=prepare, barriers=barriers)
    for label, keywords in MERGES:
        start = time.perf_counter()
        merged = zipper.merge(**keywords)
        seconds = time.perf_counter() - start
        report = merged.fxzip_report
        model, diff = to_model_difference(merged, parents[0], probe)
        refitted = "-" if report.corrections is None else len(report.corrections.refitted)
        add(label, logits_of(merged), zipped=f"{report.layers_zipped}/{report.layers_total}",
            to_model_max_abs_diff=diff, merge_seconds=seconds, refitted=refitted,
            capture=report.settings.get("capture", ""), barriers=barriers)
        if label == "default" and model is not None and args.samples:
            extra["round_trip"] = round_trip(merged, model, parents, corpora, probe)
            extra["round_trip"]["to_model_diff"] = diff
    extra["training"] = training
    return rows, extra


# ---------------------------------------------------------------------------------------------
# the tables
# ---------------------------------------------------------------------------------------------

def summary(rows: list[dict]) -> str:
    labels = list(dict.fromkeys(r["row"] for r in rows))
    table = []
    for label in labels:
        group = [r for r in rows if r["row"] == label]
        table.append([label, group[0]["zipped"],
                      *(mean_std([r[k] for r in group], 1, 2)
                        for k in ("ppl_a", "ppl_b", "ppl_mean"))])
    return markdown_table(["model", "zipped", "A: English", "B: Python", "mean"], table,
                          right=range(2, 5))


def _diff_cell(value: Any) -> str:
    return f"{value:.1e}" if isinstance(value, float) else str(value)


def write_back_table(rows: list[dict]) -> str:
    merges = [r for r in rows if r["merge_seconds"] != ""]
    table = [[r["seed"], r["row"], r["capture"], r["refitted"], f"{r['merge_seconds']:.1f}",
              _diff_cell(r["to_model_max_abs_diff"])] for r in merges]
    return markdown_table(["seed", "merge", "capture", "layers refitted", "merge s",
                           "to_model max abs diff"], table, right=(3, 4, 5))


def samples_text(trip: dict) -> str:
    lines = [f"`fxzip.to_model(merged, like=model_a)` gave a {trip['reloaded_class']} "
             f"(logits max abs diff to the merged GraphModule {trip['to_model_diff']:.1e}); "
             f"`save_pretrained` wrote {', '.join(trip['files'])}; reloaded with "
             f"`AutoModelForCausalLM.from_pretrained`, its logits differ from the merged "
             f"GraphModule's by at most {trip['reload_diff']:.1e}. Greedy continuations "
             f"({NEW_BYTES} bytes, `generate`) of a {PROMPT_BYTES}-byte prompt from each test "
             "text (newlines shown as \\n):", ""]
    for corpus, prompt, outs in trip["samples"]:
        lines.append("```text")
        lines.append(f"prompt ({corpus.name}'s test text): {shown(prompt)}")
        for label, out in outs:
            lines.append(f"{label + ':':<19}{shown(out)}")
        lines.append("```")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lm_text",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=2, help="model pairs (seeds 1..N)")
    parser.add_argument("--steps", type=int, default=None,
                        help="AdamW steps per model (default 500; 100 with --quick)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate")
    parser.add_argument("--test-windows", type=int, default=None,
                        help="test windows per text (default 256; 64 with --quick)")
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--calibration-windows", type=int, default=8,
                        help="windows of each text per calibration batch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true",
                        help="one seed, 100 steps, 64 test windows: lm_text_quick.*")
    parser.add_argument("--no-samples", dest="samples", action="store_false",
                        help="skip save_pretrained / from_pretrained / generate")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds = 1 if args.seeds == 2 else args.seeds
    args.steps = args.steps or (100 if args.quick else 500)
    args.test_windows = args.test_windows or (64 if args.quick else 256)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - start:5.0f}s] {text}", flush=True)

    corpora = [english(), python_sources()]
    tests = [test_windows(c.test, args.test_windows) for c in corpora]
    for c, t in zip(corpora, tests):
        log(f"{c.name}: {c.description}: {len(c.train):,} train bytes, {len(c.test):,} test "
            f"bytes, {len(t)} test windows")
    rows, extras = [], []
    for seed in range(1, args.seeds + 1):
        seed_rows, extra = run_seed(seed, corpora, args, tests, log)
        rows.extend(seed_rows)
        extras.append(extra)
    seconds = time.perf_counter() - start

    training = [t for e in extras for t in e["training"]]
    train_table = markdown_table(
        ["seed", "model", "init seed", "steps", "seconds", "ppl A: English", "ppl B: Python"],
        [[t["seed"], t["model"], t["init"], t["steps"], f"{t['seconds']:.0f}", f"{t['ppl_a']:.2f}",
          f"{t['ppl_b']:.2f}"] for t in training], right=range(2, 7))
    config = ", ".join(f"{k}={v}" for k, v in CONFIG.items())
    n_params = sum(p.numel() for p in make_model(0).parameters())
    barriers = sorted({r["barriers"] for r in rows if r["barriers"] not in ("", "-")})
    barrier_text = "barriers: " + ", ".join(barriers) if barriers else "no barrier"
    inert = [r for r in rows if r["row"] == "default" and r["refitted"] == 0]
    inert_note = (
        " The default merge's corrections refitted no layer (see \"layers refitted\" below): "
        "they refit `nn.Linear`/`nn.Conv` modules called as modules, and this capture "
        f"({inert[0]['capture']}) calls the linear layers as functions, so the default merge "
        "differs from the paper's only by its weight similarity (0.01)." if inert else "")
    corpora_text = "\n".join(
        f"- {c.name}: {c.description}; {len(c.train):,} bytes to train on, the last "
        f"{len(c.test):,} held out ({len(t)} test windows of {CONTEXT + 1} bytes)"
        for c, t in zip(corpora, tests))
    text = (
        f"## Two byte-level Llama models, English and Python, merged into one "
        f"({args.seeds} seed{'s' if args.seeds > 1 else ''}; perplexity per byte on each held-out "
        f"text, mean ± std over the seeds)\n\n"
        + summary(rows) +
        "\n\n\"mean\" is the mean of the two perplexities; \"zipped\": weight layers merged "
        "of all; \"ensemble\" runs both models and averages their next-byte probabilities. "
        "Every merge has `shared_output=True` (one output over the 256 byte values) and zips "
        f"every layer; {barrier_text}.{inert_note}\n\n"
        f"Models: `transformers.LlamaForCausalLM` ({n_params:,} parameters; {config}); "
        f"AdamW, peak lr {args.lr}, batch {BATCH} windows of {CONTEXT} bytes, "
        f"{args.steps} steps each, one CPU thread; Python {platform.python_version()}, torch "
        f"{torch.__version__}, transformers {transformers.__version__}. Calibration: "
        f"{args.calibration_batches} batches of {args.calibration_windows} training windows of "
        f"each text ({CONTEXT} bytes).\n\n" + corpora_text + "\n\n"
        "### Training\n\n" + train_table + "\n\n"
        "### Back into transformers\n\n"
        "Each merge written back with `fxzip.to_model(merged, like=model_a)`: the largest "
        "difference of its logits to the merged GraphModule's on 8 test windows. \"layers "
        "refitted\": the layers the default merge's label-free corrections refitted "
        "(`merged.fxzip_report.corrections`; \"-\": corrections off); \"merge s\": the merge "
        "from the prepared `Zipper`, whose capture and analysis took "
        + ", ".join(f"{e['prepare_seconds']:.0f}s" for e in extras) + ".\n\n"
        + write_back_table(rows) + "\n\n")
    trip = next((e["round_trip"] for e in extras if "round_trip" in e), None)
    if trip is not None:
        text += samples_text(trip) + "\n"
    elif not hasattr(fxzip, "to_model"):
        text += "This fxzip has no `to_model`: no model written back.\n\n"
    text += f"Run time: {seconds:.0f}s.\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "lm_text_quick" if args.quick else "lm_text"
    (args.out / f"{name}.md").write_text(text, encoding="utf-8")
    write_dict_csv(args.out / f"{name}.csv", rows,
                   ["seed", "row", "zipped", "ppl_a", "ppl_b", "ppl_mean",
                    "to_model_max_abs_diff", "merge_seconds", "capture", "refitted", "barriers"])


if __name__ == "__main__":
    sys.exit(main())
