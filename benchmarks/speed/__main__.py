"""fxzip speed and memory benchmarks.

    python benchmarks/speed.py [--quick] [--out DIR]

Five measurements, each printed as a table and written as markdown and CSV under `--out`
(default `benchmarks/results/`), plus `speed.md` with every table:

1. merge breakdown: seconds per phase (trace, analysis, statistics, matching, rewrite, bn_reset)
   of one full zip (`stop_at=None`) of (a) two ResNet-20×4 on the digits and (b) two timm
   resnet50, each merge run in a fresh subprocess;
2. statistics pass vs plain forward: the statistics of every mergeable space on a fresh Zipper
   divided by plain `no_grad` forwards of both models over the same batches, and how the
   statistics time splits into the tapped forwards and the moment accumulation;
3. matching alone: the fast ZipIt! greedy against the plain `benchmarks.reference_zipit`, same
   assignment required, and the Hungarian `permute`;
4. peak memory (max RSS of a fresh subprocess): the models and data alone, plain forwards, merge;
5. inference of the merged ResNet-20×4 against running both originals, per stop point, with
   parameter counts and FLOPs;
6. cost against the floor (`--ratios` runs only this): for two timm resnet50 and two timm ViT-S/16,
   each in a fresh subprocess, the statistics and the whole merge (`fxzip.merge`, full zip, BN
   reset included) for each `--ratio-taps` choice (`taps`, optionally `@positions`: "all",
   "spread", "last", "all@0.25"), divided by plain forwards of both models over the same batches
   (interleaved repeats in that one process), fxzip's default merge (corrections on) once, the
   merges' phases, and their peak memory above the models and data.

The machine may be shared and noisy: times are the minimum over repeats and ratios are taken
within one run, with repetitions of the two sides interleaved. Nothing here asserts on time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import fxzip  # noqa: E402
from fxzip.runtime.costs import count_flops, count_parameters  # noqa: E402
from fxzip.demo.digits import ResNet20, load_digits_split  # noqa: E402
from fxzip.passes import statistics  # noqa: E402
from fxzip.passes.statistics import resolve_precision  # noqa: E402
from benchmarks.reference_zipit import reference_zipit  # noqa: E402

from benchmarks.tables import Table  # noqa: E402

DEFAULT_THREADS = 2
DEFAULT_TAPS = "all"  # fxzip's default `taps`
DIGITS_BATCH = 128
INFERENCE_BATCH = 128
DIGITS_STOPS: tuple[Any, ...] = (0, "layer1", "layer2", "layer3", None)
MATCHING_SIZES = (64, 128, 256, 512, 1024, 2048)


# ---------------------------------------------------------------------------------------------
# Timing helpers
# ---------------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of `fn` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Minimum seconds of each function over `repeats` rounds that alternate between them, so that
    slow phases of a shared machine hit every side alike."""
    best = {name: math.inf for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            best[name] = min(best[name], timed(fn))
    return best


class Stopwatch:
    """Accumulates seconds per label: `with watch("label"): ...`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, label: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[label] += time.perf_counter() - start


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


# ---------------------------------------------------------------------------------------------
# Cases: two models of one architecture and their calibration batches
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseSpec:
    """What to build; plain data so that a subprocess can build the same case."""

    kind: str  # "digits", "resnet50", "vit" (timm vit_small_patch16_224) or "vit_tiny"
    images: int = 0
    size: int = 0
    batch: int = 0

    @property
    def label(self) -> str:
        if self.kind == "digits":
            return "ResNet20x4 digits"
        name = {"vit": "ViT-S/16", "vit_tiny": "ViT-Ti/16"}.get(self.kind, "resnet50")
        return f"{name} {self.images}x{self.size}² (bs {self.batch})"


@dataclass
class Case:
    spec: CaseSpec
    models: list[nn.Module]
    batches: list[torch.Tensor]


def digits_case() -> Case:
    """Two randomly initialised ResNet-20×4 (seeds 0, 1) whose BatchNorm statistics are estimated
    on the digits' training images, which are also the calibration batches."""
    x = load_digits_split().x_train
    batches = list(x.split(DIGITS_BATCH))
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(fxzip.reset_bn(ResNet20(width=4), batches, progress=False))
    return Case(CaseSpec("digits"), models, batches)


def resnet50_case(images: int, size: int, batch: int) -> Case:
    """Two timm resnet50 (10 classes) from seeds 0 and 1 with BatchNorm statistics estimated on
    the batches, and random images."""
    import timm

    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        # zero_init_last=False: with timm's default the last BN of every residual branch is 0
        # at initialisation, so those features would all be constant.
        models.append(timm.create_model("resnet50", pretrained=False, num_classes=10,
                                        zero_init_last=False))
    generator = torch.Generator().manual_seed(0)
    batches = list(torch.randn(images, 3, size, size, generator=generator).split(batch))
    # BatchNorm statistics estimated on the images, as after training: with the initial running
    # statistics (mean 0, variance 1) activations grow through the 50 layers and most units die.
    models = [fxzip.reset_bn(m, batches, progress=False) for m in models]
    return Case(CaseSpec("resnet50", images, size, batch), models, batches)


def vit_case(images: int, size: int, batch: int, kind: str = "vit") -> Case:
    """Two timm vit_small_patch16_224 (or vit_tiny_patch16_224 for kind "vit_tiny"; 10 classes)
    from seeds 0 and 1, and random images."""
    import timm

    name = "vit_tiny_patch16_224" if kind == "vit_tiny" else "vit_small_patch16_224"
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(timm.create_model(name, pretrained=False, num_classes=10,
                                        img_size=size).eval())
    generator = torch.Generator().manual_seed(0)
    batches = list(torch.randn(images, 3, size, size, generator=generator).split(batch))
    return Case(CaseSpec(kind, images, size, batch), models, batches)


def build_case(spec: CaseSpec) -> Case:
    if spec.kind == "digits":
        return digits_case()
    if spec.kind in ("vit", "vit_tiny"):
        return vit_case(spec.images, spec.size, spec.batch, spec.kind)
    return resnet50_case(spec.images, spec.size, spec.batch)


def plain_forward(models: Sequence[nn.Module], batches: Sequence[torch.Tensor]) -> None:
    """Both models over every batch, as plain inference."""
    with torch.no_grad():
        for x in batches:
            for m in models:
                m(x)


# ---------------------------------------------------------------------------------------------
# Subprocess measurements (merge phases and peak memory)
# ---------------------------------------------------------------------------------------------


def child_main(task: str, spec: CaseSpec) -> dict[str, Any]:
    """Run in a fresh process: build the case and then do `task` ("data": nothing more,
    "forward": plain forwards of both models, "merge": a full zip). Returns max RSS and timings."""
    case = build_case(spec)
    result: dict[str, Any] = {"task": task}
    if task.startswith("ratios"):
        _, repeats, choices = (task.split(":") + [",".join(TAPS_CHOICES)])[:3]
        result.update(floor_ratios(case, repeats=int(repeats), choices=choices.split(",")))
    elif task == "forward":
        plain_forward(case.models, case.batches[:1])  # warm-up
        result["seconds"] = {"forward": timed(lambda: plain_forward(case.models, case.batches))}
    elif task == "merge":
        result.update(staged_merge(case))
    result["params"] = sum(count_parameters(m) for m in case.models)
    result["max_rss_mib"] = max([peak_rss_mib(), *result.get("peaks_mib", {}).values()])
    return result


def staged_merge(case: Case) -> dict[str, Any]:
    """A full zip in three stages (Zipper; statistics of the spaces the merge needs; the merge,
    which then matches, rewrites and resets BN), with the peak RSS of each stage."""
    peaks: dict[str, float] = {}

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        can_reset = reset_peak_rss()
        value = fn()
        peaks[name] = peak_rss_mib() if can_reset else float("nan")
        return value

    start = time.perf_counter()
    zipper = stage("trace+analysis", lambda: fxzip.Zipper(case.models, case.batches,
                                                           progress=False))
    spaces = zipper.analysis.spaces_of(zipper.analysis.trunk(None))
    stage("statistics", lambda: zipper.statistics(spaces))
    merged = stage("matching+rewrite+bn_reset",
                   lambda: zipper.merge(None, method="zipit", reset_bn=True))
    report = merged.fxzip_report
    return {"seconds": dict(zipper.seconds), "wall": time.perf_counter() - start,
            "peaks_mib": peaks, "merged_params": count_parameters(merged),
            "layers": f"{report.layers_zipped}/{report.layers_total}"}


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux: clear_refs 5); False if impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """This process's peak resident set size: VmHWM, which (unlike ru_maxrss, whose high-water
    mark survives fork+exec from a large parent on Linux) belongs to this process image alone."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(task: str, spec: CaseSpec) -> dict[str, Any]:
    """`child_main` in a fresh Python process (so that its max RSS is its own)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", task,
               "--child-case", json.dumps(asdict(spec)), "--threads", str(torch.get_num_threads())]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark subprocess {task} {spec.label} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


MERGE_STAGES = ("trace+analysis", "statistics", "matching+rewrite+bn_reset")
PHASES = ("trace", "analysis", "statistics", "matching", "rewrite", "bn_reset")


def merge_breakdown(merges: dict[CaseSpec, dict[str, Any]]) -> Table:
    """Section 1: seconds per phase of one full zip per case."""
    table = Table("1_merge_breakdown", "1. One full zip (stop_at=None, zipit, reset_bn): seconds "
                  "per phase", ["case", "layers zipped", *PHASES, "total", "wall"])
    for spec, r in merges.items():
        seconds = [r["seconds"].get(p, 0.0) for p in PHASES]
        table.add(spec.label, r["layers"], *seconds, sum(seconds), r["wall"])
    table.notes.append("each merge runs in a fresh subprocess (build models, Zipper, statistics "
                       "of the spaces the merge needs, merge); phases from `Zipper.seconds`; "
                       "'wall' is measured around those calls")
    return table


def peak_memory(specs: Sequence[CaseSpec], merges: dict[CaseSpec, dict[str, Any]]) -> Table:
    """Section 4: max RSS of fresh subprocesses that build a case and then do nothing more, run
    plain forwards, or merge."""
    table = Table("4_peak_memory", "4. Peak memory (max RSS of a fresh process, MiB)",
                  ["case", "params (both)", "param MiB (both)", "models+data", "plain forwards",
                   "merge", "forwards - models+data", "merge - models+data",
                   "(merge - models+data)/param MiB", *(f"peak in {s}" for s in MERGE_STAGES)])
    for spec in specs:
        data = run_child("data", spec)["max_rss_mib"]
        forward = run_child("forward", spec)["max_rss_mib"]
        merge = merges[spec]["max_rss_mib"]
        params = merges[spec]["params"]
        param_mib = params * 4 / 2**20
        stages = [merges[spec]["peaks_mib"].get(s, float("nan")) for s in MERGE_STAGES]
        table.add(spec.label, params, param_mib, data, forward, merge, forward - data,
                  merge - data, (merge - data) / param_mib, *stages)
    table.notes += ["peak RSS = VmHWM of a fresh process that imports fxzip/torch/timm, builds "
                    "both models and the batches (for the digits this includes the originals' BN "
                    "estimate, one forward each), then does nothing more / plain no_grad "
                    "forwards of both models over all batches / Zipper + merge(None)",
                    "param MiB: float32 parameters of both models (params·4 bytes)",
                    "peak in <stage>: VmHWM reset (/proc/self/clear_refs) before each stage of "
                    "the merge process; it includes what earlier stages still hold, and memory "
                    "the allocator keeps after frees"]
    return table


# ---------------------------------------------------------------------------------------------
# Section 2: statistics pass vs plain forward
# ---------------------------------------------------------------------------------------------


TAPPED = "lockstep forward of all models (no-op observer)"


def statistics_vs_forward(cases: Sequence[Case], repeats: dict[str, int]) -> tuple[Table, Table]:
    """The statistics of every mergeable space on a fresh Zipper (default precision, and float32
    products), against plain forwards of both models over the same batches; and a breakdown of
    the statistics pass at the default precision."""
    default = resolve_precision("auto", torch.device("cpu"))
    ratio = Table("2_statistics_vs_forward", "2. Statistics pass (all mergeable spaces) vs plain "
                  "forwards of both models over the same batches",
                  ["case", "batches", "spaces", f"statistics s ({default})", "plain fwd s", "ratio",
                   "target", "statistics s (float32)", "ratio (float32)", "tap fwd s",
                   "accumulation s", "tap fwd/plain", "accum/plain", "Gram GFLOP", "fwd GFLOP",
                   "Gram/fwd FLOPs"])
    parts = Table("2b_statistics_breakdown", "2b. Where the statistics time goes (the passes of "
                  f"fxzip.passes.statistics.collect at the default precision, {default}, timed "
                  "one by one)", ["case", "part", "seconds", "share"])
    for case in cases:
        zipper = fresh_zipper(case)
        spaces = zipper.analysis.mergeable_spaces()
        plain_forward(case.models, case.batches[:1])  # warm-up
        fresh_zipper(case, "float32").statistics(spaces)  # warm-up (oneDNN kernels per shape)
        fresh_zipper(case).statistics(spaces)
        best = {"statistics": math.inf, "float32": math.inf, "plain": math.inf}
        for _ in range(repeats[case.spec.kind]):  # interleaved; each Zipper is built untimed
            unused = {p: fresh_zipper(case, p) for p in ("auto", "float32")}
            best["statistics"] = min(best["statistics"],
                                     timed(lambda: unused["auto"].statistics(spaces)))
            best["float32"] = min(best["float32"],
                                  timed(lambda: unused["float32"].statistics(spaces)))
            best["plain"] = min(best["plain"], timed(lambda: plain_forward(case.models,
                                                                           case.batches)))
        split = statistics_parts(zipper, spaces)
        taps = split.get(TAPPED, float("nan"))
        accumulation = best["statistics"] - taps
        gram = gram_flops(zipper, spaces, case.batches)
        forward = sum(count_flops(m, x, per_sample=False) for m in case.models for x in case.batches)
        ratio.add(case.spec.label, len(case.batches), len(spaces), best["statistics"],
                  best["plain"], best["statistics"] / best["plain"], "≤ 1.5", best["float32"],
                  best["float32"] / best["plain"], taps, accumulation, taps / best["plain"],
                  accumulation / best["plain"], gram / 1e9, forward / 1e9, gram / forward)
        for label, seconds in split.items():
            parts.add(case.spec.label, label, seconds, float("nan"))
        _fill_shares(parts, case.spec.label)
    ratio.notes += [
        f"statistics: `Zipper.statistics(analysis.mergeable_spaces())` on a fresh Zipper (trace "
        f"not counted), with the default `statistics_precision='auto'` (here: {default} Gram "
        "products) and with 'float32'; plain fwd: `torch.no_grad()` forwards of both eager models",
        "tap fwd: the lockstep graph the statistics pass runs (all models node by node) with an "
        "observer that does nothing at the tapped nodes, timed once in table 2b; accumulation "
        "= statistics (default precision) - tap fwd",
        "Gram GFLOP: what the Gram products of all taps would cost as full products (2·samples·"
        "features² per tap, all models' features stacked); fxzip computes only the upper "
        "triangle, in row blocks (about 0.55 of this). fwd GFLOP: FlopCounterMode over both "
        "models and all batches",
        "minimum over interleaved repeats, after one warm-up of each: "
        + ", ".join(f"{case.spec.label} {repeats[case.spec.kind]}" for case in cases)]
    parts.notes.append("single runs, not minima: the parts need not add up to the statistics "
                       "time of table 2 exactly")
    return ratio, parts


def gram_flops(zipper: fxzip.Zipper, spaces: Sequence[int], batches: Sequence[torch.Tensor],
               taps: str = "all", positions: float = 1.0) -> float:
    """Multiply-adds ×2 of the Gram products of all taps (`taps="last"`: each space's last) as
    full products: per tap and batch, samples × (N·size)², the features of the N models stacked."""
    from fxzip.graph.tracing import tensor_shape

    analysis, n = zipper.analysis, zipper.num_models
    example = zipper.batches.example.shape[0]
    samples = sum(x.shape[0] for x in batches)
    total = 0.0
    order = {node.name: i for i, node in enumerate(analysis.nodes)}
    nodes = {node.name: node for node in analysis.nodes}
    for s in spaces:
        read = analysis.spaces[s].taps
        if taps == "last" and read:
            read = [max(read, key=lambda t: order[t.node])]
        rates = [1.0] * len(read)
        if taps == "spread":
            rates = [1.0 / max(1, round(1.0 / r.rate))
                     for r in statistics.spread_reads(read, None, nodes)]
        for tap, rate in zip(read, rates):
            shape = tensor_shape(nodes[tap.node])
            per_sample = math.prod(shape) // shape[tap.axis] * tap.expand // example
            rows = per_sample * samples
            rate /= max(1, min(round(1.0 / positions), per_sample))
            total += 2 * rows * rate * (n * tap.size) ** 2
    return total


def fresh_zipper(case: Case, precision: str = "auto") -> fxzip.Zipper:
    return fxzip.Zipper(case.models, case.batches, progress=False, statistics_precision=precision)


def statistics_parts(zipper: fxzip.Zipper, spaces: Sequence[int]) -> dict[str, float]:
    """Seconds per part of one statistics pass (`statistics.collect` with its `timings`): the
    lockstep forward of all models alone (an observer that does nothing at the same tapped nodes),
    the moment updates of the consumer taps (the first pass minus that forward), and the dead-unit
    pass (producer rows of constant features; zero when there are none). Returns
    {"n/a ...": nan} when the Zipper or the statistics pass no longer offer what this needs."""

    class NullObserver(statistics.Observer):
        def forward(self, name, *tensors):
            return None

    try:
        analysis, graphs, batches = zipper.analysis, zipper.graphs, zipper.batches
        precision = zipper.statistics_precision
        taps = {t.node: [] for s in spaces for t in analysis.spaces[s].taps}
        forward_only = statistics.lockstep_module(graphs, NullObserver(taps))
    except (AttributeError, TypeError) as exc:
        return {f"n/a ({type(exc).__name__}: {exc})": float("nan")}
    with torch.no_grad():
        forward_only(batches.example)  # warm-up
        lockstep = min(timed(lambda: [forward_only(x) for x in batches]) for _ in range(2))
    seconds: dict[str, float] = {}
    stats = statistics.collect(graphs, analysis, spaces, batches, progress=False,
                               precision=precision, timings=seconds)
    dead = sum(stats[s].fallback is not None for s in spaces)
    return {TAPPED: lockstep, "moment updates (consumer taps)": seconds["consumer taps"] - lockstep,
            f"dead-unit pass ({dead} spaces)": seconds["dead units"]}


def _fill_shares(table: Table, label: str) -> None:
    rows = [r for r in table.rows if r[0] == label]
    total = sum(r[2] for r in rows if not math.isnan(r[2]))
    for r in rows:
        r[3] = r[2] / total if total else float("nan")
    table.add(label, "total", total, 1.0 if total else float("nan"))


# ---------------------------------------------------------------------------------------------
# Section 3: matching alone
# ---------------------------------------------------------------------------------------------


def realistic_correlation(n: int, seed: int = 0) -> np.ndarray:
    """Correlation of 2n features (two models of n) from low-rank data plus noise: model B's
    features load partly (a uniform share) on a permutation of model A's feature loadings, so
    that the greedy makes both across- and within-model merges."""
    rng = np.random.default_rng(seed)
    rank, samples = max(8, n // 4), 2048
    latent = rng.standard_normal((samples, rank))
    load_a = rng.standard_normal((rank, n))
    share = rng.uniform(0.0, 1.0, n)  # how much of each B feature is some A feature
    load_b = (share * load_a[:, rng.permutation(n)]
              + np.sqrt(1 - share**2) * rng.standard_normal((rank, n)))
    data = latent @ np.concatenate([load_a, load_b], axis=1)
    data += 0.5 * np.sqrt(rank) * rng.standard_normal(data.shape)
    corr = np.corrcoef(data, rowvar=False)
    return (corr + corr.T) / 2


def matching_scaling(sizes: Sequence[int], reference_max: int, alpha: float = 0.5,
                     beta: float = 1.0) -> Table:
    """Section 3: fast ZipIt! greedy vs `benchmarks.reference_zipit`, and Hungarian permute."""
    table = Table("3_matching", "3. Matching alone: 2 models × n features, zipit "
                  f"(alpha={alpha}, beta={beta}) vs the reference greedy; permute (Hungarian)",
                  ["n per model", "fast zipit s", "reference s", "speed-up", "same assign",
                   "within merges", "permute s"])
    measured: dict[int, float] = {}  # reference seconds per n
    for n in sizes:
        corr = realistic_correlation(n)
        repeats = 3 if n <= 1024 else 2
        match = fxzip.match_features(corr, [n, n], "zipit", alpha=alpha, beta=beta)
        fast = min(timed(lambda: fxzip.match_features(corr, [n, n], "zipit", alpha=alpha,
                                                      beta=beta)) for _ in range(repeats))
        permute = min(timed(lambda: fxzip.match_features(corr, [n, n], "permute"))
                      for _ in range(repeats))
        if n <= reference_max:
            start = time.perf_counter()
            ref = reference_zipit(corr, [n, n], alpha, beta, n)
            measured[n] = time.perf_counter() - start
            same = "yes" if all(np.array_equal(a, b) for a, b in zip(match.assign, ref.assign)) \
                else "NO"
            reference, label = measured[n], _times(measured[n] / fast)
        else:
            reference = _extrapolate(measured, n)
            label, same = f"~{_times(reference / fast)} (extrapolated)", "not run"
        table.add(n, fast, reference, label, same, match.within_merges, permute)
    if any(n > reference_max for n in sizes):
        table.notes.append(f"reference run up to n={reference_max}; beyond, its time is "
                           "extrapolated as t(n_max)·(n/n_max)³ (its greedy is O(D³)) (--quick)")
    table.notes.append("correlations: np.corrcoef of 2048 samples of rank-n/4 data plus noise; "
                       "each feature of B shares U(0,1) of a permuted A feature's loading; "
                       "symmetrised")
    return table


def _times(ratio: float) -> str:
    return f"{ratio:.2f}×" if ratio < 10 else f"{ratio:,.0f}×"


def _extrapolate(measured: dict[int, float], n: int) -> float:
    """The reference's time at n from the largest measured size, by its O(D³) cost."""
    largest = max(measured)
    return measured[largest] * (n / largest) ** 3


# ---------------------------------------------------------------------------------------------
# Section 5: inference per stop point
# ---------------------------------------------------------------------------------------------


def inference_per_stop(case: Case, x: torch.Tensor, stops: Sequence[Any], repeats: int) -> Table:
    """Section 5: the merged model vs both originals, per stop point."""
    table = Table("5_inference", f"5. Inference of the merged {case.spec.label} vs both originals "
                  f"(batch of {x.shape[0]}), per stop point",
                  ["stop_at", "zipped", "params", "params/both", "GFLOPs", "FLOPs/both",
                   "merged ms", "both ms", "merged/both"])
    zipper = fxzip.Zipper(case.models, case.batches, progress=False)
    both_params = sum(count_parameters(m) for m in case.models)
    both_flops = sum(count_flops(m, x, per_sample=False) for m in case.models)
    for stop in stops:
        merged = zipper.merge(stop, method="zipit", reset_bn=True)
        plain_forward([merged], [x])  # warm-up
        best = interleaved({"merged": lambda: plain_forward([merged], [x]),
                            "both": lambda: plain_forward(case.models, [x])}, repeats)
        params, flops = count_parameters(merged), count_flops(merged, x, per_sample=False)
        report = merged.fxzip_report
        table.add(repr(stop), f"{report.layers_zipped}/{report.layers_total}", params,
                  params / both_params, flops / 1e9, flops / both_flops, best["merged"] * 1e3,
                  best["both"] * 1e3, best["merged"] / best["both"])
    table.notes += [f"'both' runs the two original eager models; minimum of {repeats} interleaved "
                    "repeats; FLOPs from torch.utils.flop_counter.FlopCounterMode",
                    f"both originals: {both_params:,} parameters, {both_flops / 1e9:.3f} GFLOPs"]
    return table


# ---------------------------------------------------------------------------------------------
# Section 6: cost against the floor (plain forwards of both models)
# ---------------------------------------------------------------------------------------------


TAPS_CHOICES = ("all", "spread", "last")


def read_choice(choice: str) -> tuple[str, float]:
    """A `--ratio-taps` entry as (taps, positions): "spread" or "all@0.25" (positions 0.25)."""
    taps, _, positions = choice.partition("@")
    return taps, float(positions) if positions else 1.0
FLOOR_PHASES = ("trace", "analysis", "statistics", "matching", "rewrite", "bn_reset",
                "corrections")


def floor_ratios(case: Case, repeats: int, choices: Sequence[str] = TAPS_CHOICES) -> dict[str, Any]:
    """In this (fresh) process: plain forwards of both models, the statistics of every space a
    full zip needs and the paper's whole merge (`fxzip.merge`, stop_at=None, corrections=None,
    its BN reset) for each `taps` choice, interleaved over `repeats` rounds after a warm-up;
    then fxzip's default merge (corrections on) once per round beside another plain forward.
    Minima, the phases of the fastest merge, the Gram FLOPs read, and peak RSS (VmHWM, reset
    before each warm-up) above the RSS before (models and data resident)."""
    def statistics_of(read: str) -> Callable[[], Any]:
        taps, positions = read_choice(read)
        zipper = fxzip.Zipper(case.models, case.batches, progress=False, taps=taps,
                              positions=positions)
        spaces = zipper.analysis.spaces_of(zipper.analysis.trunk(None))
        return lambda: zipper.statistics(spaces)

    def merge_with(read: str, corrections: Any = None) -> Any:
        # the paper's zipit: no corrections and no weight similarity; the default: both on
        taps, positions = read_choice(read)
        return fxzip.merge(*case.models, case.batches, progress=False, taps=taps,
                           positions=positions, corrections=corrections,
                           **({} if corrections else {"weight_similarity": 0.0}))

    loads = [load_average()]
    plain_forward(case.models, case.batches)  # warm-up
    peaks: dict[str, float] = {}
    reports: dict[str, Any] = {}
    best: dict[str, float] = defaultdict(lambda: math.inf)

    cpu: dict[str, float] = defaultdict(lambda: math.inf)

    def keep(label: str, fn: Callable[[], Any], first: bool) -> None:
        """Time fn (wall and this process's CPU seconds); the first round also records its peak
        RSS above the RSS before."""
        base = _current_rss_mib()
        if first:
            reset_peak_rss()
        start, start_cpu = time.perf_counter(), time.process_time()
        value = fn()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
        if first:
            peaks[label] = peak_rss_mib() - base
        cpu[label] = min(cpu[label], cpu_seconds)
        if seconds < best[label]:
            best[label] = seconds
            if isinstance(value, nn.Module) and hasattr(value, "fxzip_report"):
                reports[label] = dict(value.fxzip_report.seconds)

    for round_ in range(repeats):
        first = round_ == 0
        keep("plain", lambda: plain_forward(case.models, case.batches), first)
        for taps in choices:
            # the Zipper (trace) untimed; freed after the statistics
            keep(f"statistics {taps}", statistics_of(taps), first)
            keep(f"merge {taps}", lambda: merge_with(taps), first)
        if first:  # the default merge once (its ratio is far from the floor: see the notes)
            keep("plain", lambda: plain_forward(case.models, case.batches), False)
            keep("default", lambda: merge_with(DEFAULT_TAPS, "default"), first)
    loads.append(load_average())
    zipper = fxzip.Zipper(case.models, case.batches[:1], progress=False)
    spaces = zipper.analysis.spaces_of(zipper.analysis.trunk(None))
    flops = {t: gram_flops(zipper, spaces, case.batches, *read_choice(t))
             for t in {*TAPS_CHOICES, *choices}}
    forward = sum(count_flops(m, x, per_sample=False) for m in case.models for x in case.batches)
    return {"best": dict(best), "cpu": dict(cpu), "phases": reports, "peaks_mib": peaks,
            "gram_flops": flops,
            "forward_flops": forward, "spaces": len(spaces), "loads": loads,
            "batch_mib": case.batches[0].numel() * case.batches[0].element_size() / 2**20,
            "params": sum(count_parameters(m) for m in case.models)}


def _current_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def floor_table(specs: Sequence[CaseSpec], repeats: int,
                choices: Sequence[str] = TAPS_CHOICES) -> Table:
    """Section 6: each case in a fresh subprocess (`floor_ratios`)."""
    table = Table("6_floor", "6. Cost against the floor: statistics and the whole merge (full zip, "
                  "BN reset) ÷ plain forwards of both models over the same batches, per `taps`",
                  ["case", "merge", "taps", "plain fwd CPU s", "statistics CPU s",
                   "statistics/plain CPU (≤ 1.5)", "merge CPU s", "merge/plain CPU (≤ 3)",
                   "plain fwd s", "statistics/plain wall", "merge/plain wall", *FLOOR_PHASES,
                   "other", "Gram/fwd FLOPs", "statistics peak MiB", "merge peak MiB",
                   "peak/param MiB", "plain peak MiB", "load avg (start; end)"])
    for spec in specs:
        r = run_child(f"ratios:{repeats}:{','.join(choices)}", spec)
        plain = r["best"]["plain"]
        param_mib = r["params"] * 4 / 2**20
        loads = "; ".join(r["loads"])
        rows = [("paper (corrections=None)", taps, f"merge {taps}") for taps in choices]
        rows.append(("default (corrections)", DEFAULT_TAPS, "default"))
        for kind, taps, key in rows:
            phases = r["phases"][key]
            merge = r["best"][key]
            # the default merge's taps need not be among the choices timed alone: NaN then
            stats = r["best"].get(f"statistics {taps}", math.nan)
            stats_cpu = r["cpu"].get(f"statistics {taps}", math.nan)
            parts = [phases.get(p, 0.0) for p in FLOOR_PHASES]
            peak = r["peaks_mib"][key]
            cpu = r["cpu"]
            table.add(spec.label, kind, taps, cpu["plain"], stats_cpu, stats_cpu / cpu["plain"],
                      cpu[key], cpu[key] / cpu["plain"], plain, stats / plain, merge / plain,
                      *parts, merge - sum(parts), r["gram_flops"][taps] / r["forward_flops"],
                      r["peaks_mib"].get(f"statistics {taps}", math.nan), peak, peak / param_mib,
                      r["peaks_mib"]["plain"], loads)
    table.notes += [
        f"one fresh process per case; minimum over {repeats} interleaved rounds (plain forwards, "
        "then per taps choice: statistics on a fresh Zipper, trace untimed, then the whole "
        "`fxzip.merge(a, b, batches, taps=..., corrections=None, weight_similarity=0)`: the "
        "paper's zip with its BN reset), after one plain forward as warm-up: the first round's "
        "times include first-call costs; in the first round only, plain forwards again and "
        "fxzip's default merge (corrections and weight similarity on: the label-free refit is "
        "one more pass that also resets the BatchNorms), a single run",
        "CPU s: this process's CPU time (time.process_time, 1 thread), minimum over the rounds: "
        "on a machine loaded by other processes it moves far less than wall time; the wall "
        "ratios (minimum wall times) are given beside them",
        "phases: `merged.fxzip_report.seconds` (wall) of the fastest merge; other = merge - phases "
        "(the report's parameter and FLOP counts, input checks)",
        "Gram/fwd FLOPs: the Gram products of the taps read, as full products (fxzip computes "
        "the upper triangles, about 0.55 of this), ÷ the forward FLOPs of both models; "
        "'spread' counts each tap's kept share of positions",
        "peak MiB: VmHWM reset before the first round's run and read after it, minus the RSS "
        "before (models and all batches already resident); param MiB: float32 parameters "
        "of both models"]
    return table


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


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
    command = " ".join(["python benchmarks/speed.py", *argv])
    return (f"command: `{command}`  \ntorch {torch.__version__}, {torch.get_num_threads()} "
            f"threads, numpy {np.__version__}, python {platform.python_version()}, "
            f"{os.cpu_count()} CPUs, {platform.machine()}")


def floor_specs(config: Settings, kinds: Sequence[str] = ("resnet50", "vit"),
                images: int | None = None, size: int | None = None) -> list[CaseSpec]:
    default_images, default_size = (16, 128) if config.quick else (32, 224)
    images, size = images or default_images, size or default_size
    return [CaseSpec(kind, images, size, 16) for kind in kinds]


def run_floor(config: Settings, out: Path, argv: Sequence[str],
              kinds: Sequence[str] = ("resnet50", "vit"), choices: Sequence[str] = TAPS_CHOICES,
              images: int | None = None, size: int | None = None,
              repeats: int | None = None) -> None:
    """`--ratios`: section 6 alone, written to 6_floor.md/csv."""
    header = [environment(argv), f"load average at start: {load_average()}"]
    print("\n".join(header), flush=True)
    table = floor_table(floor_specs(config, kinds, images, size),
                        repeats or (1 if config.quick else 2), choices)
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
    emit(floor_table(floor_specs(config), 1 if config.quick else 2))

    footer = (f"load average at end: {load_average()}; total {time.perf_counter() - started:.0f} s"
              f"{' (--quick)' if config.quick else ''}")
    print(footer)
    body = "\n".join(t.markdown() for t in tables)
    (out / "speed.md").write_text("# fxzip speed benchmarks\n\n" + "  \n".join(header)
                                  + "\n\n" + body + "\n" + footer + "\n")
    print(f"tables written to {out}/ (speed.md, *.md, *.csv)")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="resnet50 on 32 images of 128×128; reference matching up to n=1024 "
                             "(extrapolated beyond); fewer repeats")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results",
                        help="directory for the markdown and CSV tables")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help="torch.set_num_threads for every measurement (default %(default)s)")
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
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-case", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child_main(args.child, CaseSpec(**json.loads(args.child_case)))))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if args.ratios:
        run_floor(settings(args.quick), args.out, argv, args.ratio_cases.split(","),
                  args.ratio_taps.split(","), args.ratio_images, args.ratio_size,
                  args.ratio_repeats)
        return
    run_benchmarks(settings(args.quick), args.out, argv)


if __name__ == "__main__":
    main()
