"""Peak memory of fxzip's default merge of large models under a memory budget (`memory_gib`).

    python -m benchmarks.memory [--cases vit,0.25B,1B] [--memory-gib 4] [--threads 2]
                                [--max-rss-gib 20] [--quick] [--out benchmarks/results]
    python -m benchmarks.memory --ranks 2 [...]           the same under 2 gloo ranks (torchrun)
    python -m benchmarks.memory --compare-unbounded [--memory-gib 1]
                                                          several statistics passes vs None

Cases: `vit` — two timm vit_base_patch16_224 (random init from seeds 0 and 1) on 256 random
images of 224², batches of 32; `0.25B` (276M parameters each) and `1B` (1.04B) — two Llama-style
decoders (`benchmarks.common.decoders`, seeds 0 and 1) on 16 random sequences of 128 tokens,
batches of 8. `--quick`: timm's test_vit on
64² images and the tiny decoder, for a smoke run.

Each case runs in a fresh Python process (its peak is its own) that builds both models and the
batches, then runs `fxzip.merge(a, b, batches, memory_gib=X, progress=False)` — every layer but
the outputs zipped, the default corrections on. Reported: the process's peak resident memory
(VmHWM), its resident memory just before the merge (interpreter, torch, models, batches), the
models' and the merged model's bytes, the wall time, the report's seconds per phase, and, where
the running fxzip reports them, each phase's peak and the number of statistics passes; and the
check peak ≤ 1.2 · (resident before the merge + merged model + budget). The parent watches the
resident memory of the child's process tree and kills it above `--max-rss-gib` (default 20), so
that a shared machine stays usable: the row then reads "killed (out of memory)".

`--ranks N` runs each case under `torchrun --standalone --nproc_per_node N` (gloo, CPU): every
rank builds the models and passes its shard of the batches (r, r + N, ...) to `fxzip.merge`,
which treats `inputs` as the rank's shard; one row per rank. `--compare-unbounded` merges a
4-block 0.25B decoder (tiny with --quick) with the budget of `--memory-gib` and with
memory_gib=None in one process, without the corrections (whose samples the budget bounds by
design), and says whether the merged weights and the report's spaces are identical.

Written to `<out>/memory.md` and `memory.csv` (`memory_ranks.*`, `memory_compare.*`; `_quick`
before the suffix with --quick), rewritten after every case.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from benchmarks.common.decoders import CONFIGS, build_decoder, random_tokens
from benchmarks.common.tables import Table, write_csv
from benchmarks.common.timing import current_rss_mib, load_average, peak_rss_mib, reset_peak_rss

REPO = Path(__file__).resolve().parents[1]
GIB = float(1 << 30)
DEFAULT_THREADS = 2
DEFAULT_MEMORY_GIB = 4.0
DEFAULT_MAX_RSS_GIB = 20.0
COMPARE_LAYERS = 4  # --compare-unbounded: the 0.25B decoder cut to this many blocks
COMPARE_GIB = 1.0  # its bounded side: below one MLP space's statistics and matching (2.6 GiB)
COMPARE_QUICK_GIB = 0.001  # the same for the tiny decoder: about one space a pass
POLL_SECONDS = 0.2  # how often the parent samples the child's resident memory
SAMPLE_SECONDS = 0.02  # how often the child samples its own VmHWM (fxzip resets it per phase)
STACK_DEPTH = 5  # a killed child's row names this many of the outermost fxzip functions it was in
BOUND_SLACK = 1.2  # the check: peak ≤ 1.2 · (resident before the merge + merged + budget)
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class MemoryCase:
    """Two models and their batches, as plain data so that a child process builds the same."""

    name: str
    model: str  # a timm name, or "decoder:<config>" (`benchmarks.common.decoders.CONFIGS`)
    samples: int
    batch: int
    size: int = 224  # timm: the image side (decoders read sequences of their max_len)
    layers: int | None = None  # decoders: another number of blocks

    def build(self) -> tuple[list[nn.Module], list[torch.Tensor]]:
        """Both models (seeds 0 and 1, eval mode) and the random batches (seed 0)."""
        if self.model.startswith("decoder:"):
            config = CONFIGS[self.model.split(":", 1)[1]]
            config = config.with_layers(self.layers) if self.layers else config
            models = [build_decoder(config, seed) for seed in (0, 1)]
            return models, list(random_tokens(config, self.samples).split(self.batch))
        import timm

        models = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            models.append(timm.create_model(self.model, pretrained=False,
                                            img_size=self.size).eval())
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(self.samples, 3, self.size, self.size, generator=generator)
        return models, list(images.split(self.batch))

    def label(self) -> str:
        """The case's name and what it builds, for the table."""
        if self.model.startswith("decoder:"):
            config = CONFIGS[self.model.split(":", 1)[1]]
            blocks = f", {self.layers} blocks" if self.layers else ""
            return (f"{self.name}: decoder {self.model.split(':', 1)[1]}{blocks}, {self.samples}×"
                    f"{config.max_len} tokens (bs {self.batch})")
        return f"{self.name}: {self.model}, {self.samples}×{self.size}² (bs {self.batch})"


CASES = {
    "vit": MemoryCase("vit", "vit_base_patch16_224", samples=256, batch=32),
    "0.25B": MemoryCase("0.25B", "decoder:0.25B", samples=16, batch=8),
    "1B": MemoryCase("1B", "decoder:1B", samples=16, batch=8),
}
QUICK_CASES = {
    "vit": MemoryCase("vit", "test_vit", samples=16, batch=8, size=64),
    "0.25B": MemoryCase("0.25B", "decoder:tiny", samples=16, batch=8),
    "1B": MemoryCase("1B", "decoder:tiny", samples=16, batch=8),
}
COMPARE_CASE = MemoryCase("0.25B", "decoder:0.25B", samples=16, batch=8, layers=COMPARE_LAYERS)
QUICK_COMPARE_CASE = MemoryCase("tiny", "decoder:tiny", samples=16, batch=8)


# --- in the child process ---------------------------------------------------------------------

def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each shared tensor once (a tied embedding)."""
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def report_memory(report: Any, memory_gib: float | str | None) -> dict[str, Any]:
    """The budget, statistics passes and per-phase peaks (GiB) the running fxzip reports, read
    defensively: the report's `memory` may be phase → GiB or hold them under `peak_gib`."""
    memory = dict(getattr(report, "memory", None) or {})
    peaks = memory.get("peak_gib", {k: v for k, v in memory.items()
                                    if isinstance(v, float) and k != "budget_gib"})
    passes = getattr(report, "statistics_passes", None) or memory.get("statistics_passes")
    budget = memory.get("budget_gib", memory_gib if isinstance(memory_gib, float) else None)
    return {"budget_gib": budget, "statistics_passes": passes, "phase_peak_gib": peaks}


class MergeWatch:
    """A thread beside a merge: the resident peak, though fxzip resets VmHWM at every phase
    (`/proc/self/clear_refs`), from VmHWM sampled every `SAMPLE_SECONDS`; and, every second, where
    in fxzip the main thread is, written to `where`, so that a child killed for memory still says
    how far it got."""

    def __init__(self, where: Path | None = None) -> None:
        self.peak_gib = 0.0
        self.where = where
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        main, written = threading.main_thread().ident, 0.0
        while not self._stop.wait(SAMPLE_SECONDS):
            self.peak_gib = max(self.peak_gib, peak_rss_mib() / 1024)
            if self.where is not None and time.monotonic() - written >= 1.0:
                written = time.monotonic()
                self.where.write_text(fxzip_stack(sys._current_frames().get(main)))

    def __enter__(self) -> MergeWatch:
        self.peak_gib = peak_rss_mib() / 1024
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_gib = max(self.peak_gib, peak_rss_mib() / 1024)


def fxzip_stack(frame: Any) -> str:
    """The outermost fxzip functions on a stack, as file.function ("api.merge > zipper.merge >
    zipper._match_in_passes > statistics.collect"): the phase a merge is in."""
    names = []
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if "fxzip" in path.parts:
            names.append(f"{path.stem}.{frame.f_code.co_name}")
        frame = frame.f_back
    return " > ".join(names[::-1][:STACK_DEPTH])


def join_group() -> tuple[int, int]:
    """(rank, world size): under torchrun, join the gloo process group; else (0, 1)."""
    if "RANK" not in os.environ:
        return 0, 1
    import torch.distributed as dist

    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def leave_group() -> None:
    """Wait for every rank, then leave the process group (nothing when not distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def child_merge(case: MemoryCase, memory_gib: float | str | None, out: Path) -> None:
    """Build the case, merge with the budget (this rank's shard under torchrun), and write the
    measurements to `out/result-RANK.json` — the models' part before the merge starts."""
    import fxzip

    models, batches = case.build()
    rank, world = join_group()
    result: dict[str, Any] = {
        "rank": rank, "world": world, "params": sum(p.numel() for p in models[0].parameters()),
        "models_gib": sum(module_bytes(m) for m in models) / GIB,
        "data_gib": sum(x.numel() * x.element_size() for x in batches) / GIB,
        "rss_before_gib": current_rss_mib() / 1024, "requested": budget_text(memory_gib)}
    Path(out, f"result-{rank}.json").write_text(json.dumps(result))
    start = time.perf_counter()
    with MergeWatch(Path(out, f"where-{rank}.txt")) as watch:
        merged = fxzip.merge(*models, batches[rank::world], memory_gib=memory_gib,
                             progress=False)
    result["wall_s"] = time.perf_counter() - start
    leave_group()
    report = merged.fxzip_report
    result.update(report_memory(report, memory_gib), merged_gib=module_bytes(merged) / GIB,
                  seconds=dict(report.seconds),
                  layers=f"{report.layers_zipped}/{report.layers_total}")
    result["peak_gib"] = max([watch.peak_gib, *result["phase_peak_gib"].values()])
    Path(out, f"result-{rank}.json").write_text(json.dumps(result))


def child_compare(case: MemoryCase, memory_gib: float | str | None, out: Path) -> None:
    """Merge with the budget and unbounded, without corrections; are the results identical?
    Written to `out/result-0.json`."""
    import fxzip

    models, batches = case.build()
    runs = {}
    for label, budget in (("bounded", memory_gib), ("unbounded", None)):
        reset_peak_rss()
        start = time.perf_counter()
        with MergeWatch() as watch:
            merged = fxzip.merge(*models, batches, memory_gib=budget, corrections=None,
                                 progress=False)
        memory = report_memory(merged.fxzip_report, budget)
        runs[label] = {"merged": merged, "wall_s": time.perf_counter() - start,
                       "peak_gib": max([watch.peak_gib, *memory["phase_peak_gib"].values()]),
                       **memory}
    a, b = (runs[label].pop("merged") for label in ("bounded", "unbounded"))
    state_a, state_b = a.state_dict(), b.state_dict()
    same_weights = state_a.keys() == state_b.keys() and all(
        torch.equal(v, state_b[k]) for k, v in state_a.items())
    same_spaces = ([asdict(s) for s in a.fxzip_report.spaces]
                   == [asdict(s) for s in b.fxzip_report.spaces])
    result = {"params": sum(p.numel() for p in models[0].parameters()), "runs": runs,
              "same_weights": same_weights, "same_spaces": same_spaces}
    Path(out, "result-0.json").write_text(json.dumps(result))


def child_main(args: argparse.Namespace) -> None:
    """`--child TASK`: run it on `--child-case`, results written as JSON into `--child-out`."""
    torch.set_num_threads(args.threads)
    case = MemoryCase(**json.loads(args.child_case))
    task = child_compare if args.child == "compare" else child_merge
    task(case, args.memory_gib, Path(args.child_out))


# --- in the parent process --------------------------------------------------------------------

def tree_rss_bytes(root: int) -> int:
    """Resident bytes of a process and all its descendants (torchrun's ranks), from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, grown = {root}, True
    while grown:
        found = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= found
        grown = bool(found)
    total = 0
    for pid in tree:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except OSError:
            continue
    return total


def watched(command: Sequence[str], max_rss_gib: float, log: Path,
            env: dict[str, str]) -> tuple[str, float]:
    """Run `command` from the repository root in its own session, killing its process tree when
    its resident memory passes `max_rss_gib`; (status, highest sampled resident GiB)."""
    with open(log, "w") as out:
        child = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                 env=env, start_new_session=True)
        highest = 0.0
        while child.poll() is None:
            rss = tree_rss_bytes(child.pid) / GIB
            highest = max(highest, rss)
            if rss > max_rss_gib:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                return "killed (out of memory)", highest
            time.sleep(POLL_SECONDS)
    if child.returncode == 0:
        return "ok", highest
    if child.returncode < 0:
        return f"killed by signal {-child.returncode} (the kernel's OOM killer?)", highest
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    return f"failed: {lines[-1] if lines else f'exit status {child.returncode}'}", highest


def run_child(task: str, case: MemoryCase, memory_gib: float | str | None,
              args: argparse.Namespace) -> tuple[list[dict[str, Any]], str, float]:
    """Run `task` on `case` in a fresh process (under torchrun with --ranks > 1): (the result of
    every rank, status, highest sampled resident GiB of the process tree)."""
    with tempfile.TemporaryDirectory(prefix="fxzip-memory-") as scratch:
        child = ["-m", "benchmarks.memory", "--child", task, "--child-case",
                 json.dumps(asdict(case)), "--child-out", scratch, "--threads", str(args.threads),
                 "--memory-gib", budget_text(memory_gib)]
        launcher = [sys.executable]
        if args.ranks > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone",
                         f"--nproc_per_node={args.ranks}"]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        start = time.perf_counter()
        status, highest = watched(launcher + child, args.max_rss_gib, Path(scratch, "log.txt"),
                                  env)
        if status != "ok":
            status += f" after {time.perf_counter() - start:.0f} s"
        results = []
        for path in sorted(Path(scratch).glob("result-*.json")):
            where = path.with_name(path.name.replace("result-", "where-").replace(".json", ".txt"))
            results.append({**json.loads(path.read_text()),
                            "where": where.read_text() if where.exists() else ""})
    return results, status, highest


def parse_budget(text: str) -> float | str | None:
    """`--memory-gib`: a number of GiB, "auto" or "none" (unbounded)."""
    if text.lower() == "none":
        return None
    if text.lower() == "auto":
        return "auto"
    return float(text)


def budget_text(memory_gib: float | str | None) -> str:
    """The inverse of `parse_budget`."""
    return "none" if memory_gib is None else str(memory_gib)


def phases(values: dict[str, float], digits: int) -> str:
    """A dict of per-phase numbers as one cell: "statistics 12.3, matching 4.5" ("-": none)."""
    return ", ".join(f"{k} {v:.{digits}f}" for k, v in values.items()) or "-"


def merge_row(case: MemoryCase, result: dict[str, Any] | None, status: str,
              highest: float) -> list[Any]:
    """One table row of a merge (one rank's); a child killed or failed during the merge gives
    what it wrote before, and where in fxzip it was."""
    r = result or {}
    done = "peak_gib" in r
    budget = r.get("budget_gib")
    bound = BOUND_SLACK * (r["rss_before_gib"] + r["merged_gib"] + budget) \
        if done and budget is not None else None
    if not done and r.get("where"):
        status += f", in {r['where']}"
    statistics = r["phase_peak_gib"]["statistics"] - r["rss_before_gib"] \
        if done and "statistics" in r.get("phase_peak_gib", {}) else "-"
    return [case.label(), f"{r['rank']}/{r['world']}" if r.get("world", 1) > 1 else "-",
            *(r.get(k, "-") for k in ("params", "models_gib", "data_gib", "merged_gib")),
            ("none" if budget is None else budget) if done else r.get("requested", "-"),
            *(r.get(k, "-") for k in ("rss_before_gib", "peak_gib")),
            "-" if bound is None else bound,
            "-" if bound is None else ("yes" if r["peak_gib"] <= bound else "no"),
            r.get("wall_s", "-"), r.get("statistics_passes") or "-",
            phases(r.get("seconds", {}), 1), phases(r.get("phase_peak_gib", {}), 2),
            statistics, highest, status]


MERGE_COLUMNS = ["case", "rank", "params per model", "models GiB", "data GiB", "merged GiB",
                 "memory_gib", "resident before merge GiB", "peak GiB", "bound GiB",
                 "peak ≤ bound", "merge s", "statistics passes", "seconds per phase",
                 "peak GiB per phase", "statistics GiB", "watched peak GiB", "status"]
RANKS_COLUMNS = MERGE_COLUMNS[:-2] + ["statistics ÷ one process", *MERGE_COLUMNS[-2:]]
COMPARE_COLUMNS = ["case", "params per model", "memory_gib", "statistics passes", "merge s",
                   "peak GiB", "peak GiB per phase", "identical weights", "identical spaces",
                   "status"]


def compare_rows(case: MemoryCase, result: dict[str, Any] | None, status: str) -> list[list[Any]]:
    """The bounded and the unbounded merge of `--compare-unbounded`, with the verdicts."""
    if result is None:
        return [[case.label(), "-", "-", "-", "-", "-", "-", "-", "-", status]]
    verdicts = ["yes" if result["same_weights"] else "no",
                "yes" if result["same_spaces"] else "no"]
    rows = []
    for run in result["runs"].values():
        budget = run["budget_gib"]
        rows.append([case.label(), result["params"], "none" if budget is None else budget,
                     run["statistics_passes"] or "-", run["wall_s"], run["peak_gib"],
                     phases(run["phase_peak_gib"], 2), *verdicts, status])
    return rows


def environment(argv: Sequence[str], threads: int) -> list[str]:
    """The header lines: command, software, machine, load."""
    memory = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:")), "0")
    return [f"command: `{' '.join(['python -m benchmarks.memory', *argv])}`",
            f"torch {torch.__version__}, {threads} threads per process, python "
            f"{platform.python_version()}, {os.cpu_count()} CPUs, {platform.machine()}, "
            f"{int(memory) / 2**20:.0f} GiB memory",
            f"load average at start: {load_average()}"]


def write_results(table: Table, header: list[str], out: Path) -> None:
    """`<name>.md` (header, table, notes) and `<name>.csv` (raw values)."""
    (out / f"{table.name}.md").write_text("# fxzip memory benchmark\n\n" + "  \n".join(header)
                                          + "\n\n" + table.markdown())
    write_csv(out / f"{table.name}.csv", table.columns, table.rows)


def output_name(args: argparse.Namespace) -> str:
    """memory, memory_ranks or memory_compare, with `_quick` for --quick."""
    suffix = "_compare" if args.compare_unbounded else "_ranks" if args.ranks > 1 else ""
    return "memory" + ("_quick" if args.quick else "") + suffix


def main_table(args: argparse.Namespace) -> Table:
    """The empty table of this mode, with its notes."""
    name = output_name(args)
    if args.compare_unbounded:
        return Table(name, "A merge under a small memory_gib (several statistics passes) against "
                     "memory_gib=None, one process, no corrections", COMPARE_COLUMNS, notes=[
                         "identical weights: torch.equal on every tensor of the two merged "
                         "models' state dicts; identical spaces: the reports' per-space widths, "
                         "merge counts and mean correlations",
                         "without the corrections, whose samples the budget bounds by design, "
                         "the merged weights are a function of the matchings alone",
                         "peak GiB: VmHWM, reset before each merge (clear_refs) and sampled "
                         f"every {SAMPLE_SECONDS} s during it"])
    ranks = f" in one process and under {args.ranks} gloo ranks (torchrun; one row per rank)" \
        if args.ranks > 1 else ""
    return Table(name, f"Peak memory of the default merge (stop_at=None, corrections on){ranks}",
                 RANKS_COLUMNS if args.ranks > 1 else MERGE_COLUMNS, notes=[
                     "statistics GiB: the statistics phase's peak less the resident memory "
                     "before the merge (the accumulators, activations and columns it adds); "
                     "÷ one process: a rank's against the one-process run of the same case",
                     "peak GiB: the resident peak (VmHWM) of the fresh process (one rank's) — "
                     "it builds both models and the batches, then merges; sampled every "
                     f"{SAMPLE_SECONDS} s during the merge, since fxzip resets VmHWM at each "
                     "phase, and at least every phase's reported peak; resident before merge: "
                     "VmRSS just before `fxzip.merge`",
                     f"bound: {BOUND_SLACK} × (resident before merge + merged model + memory_gib "
                     "as the report resolved it); '-' where unbounded",
                     "seconds and peaks per phase: `merged.fxzip_report` ('-' where the running "
                     "fxzip does not report them)",
                     f"watched peak: the process tree's resident memory sampled every "
                     f"{POLL_SECONDS} s by the parent (all ranks together), which kills the tree "
                     f"above --max-rss-gib ({args.max_rss_gib:g})"])


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated, of {', '.join(CASES)} (default: all)")
    parser.add_argument("--memory-gib", type=parse_budget, default=DEFAULT_MEMORY_GIB,
                        help="the merge's budget: GiB, auto or none (default %(default)s; "
                             f"--compare-unbounded: the bounded side, default {COMPARE_GIB:g}, "
                             f"--quick {COMPARE_QUICK_GIB:g})")
    parser.add_argument("--quick", action="store_true", help="tiny models, a smoke run")
    parser.add_argument("--ranks", type=int, default=1,
                        help="run each case under torchrun with this many gloo ranks")
    parser.add_argument("--compare-unbounded", action="store_true",
                        help="several statistics passes against memory_gib=None")
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder cases: this many blocks instead of the config's")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help="torch threads per process (default %(default)s)")
    parser.add_argument("--max-rss-gib", type=float, default=DEFAULT_MAX_RSS_GIB,
                        help="kill a case whose processes hold more (default %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-case", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.cases.split(",")) - set(CASES)
    if unknown:
        parser.error(f"unknown cases {', '.join(sorted(unknown))}; choose from {', '.join(CASES)}")
    if args.compare_unbounded and not any(a.startswith("--memory-gib") for a in argv):
        args.memory_gib = COMPARE_QUICK_GIB if args.quick else COMPARE_GIB
    return args


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    header = environment(argv, args.threads)
    print("\n".join(header), flush=True)
    table = main_table(args)
    if args.compare_unbounded:
        case = QUICK_COMPARE_CASE if args.quick else COMPARE_CASE
        jobs = [("compare", case)]
    else:
        cases = QUICK_CASES if args.quick else CASES
        jobs = [("merge", cases[name]) for name in args.cases.split(",")]
    if args.layers is not None:
        jobs = [(task, replace(case, layers=args.layers) if case.model.startswith("decoder:")
                 else case) for task, case in jobs]
    for task, case in jobs:
        for ranks in ([1, args.ranks] if args.ranks > 1 and task == "merge" else [args.ranks]):
            print(f"{case.label()}: {task}, {ranks} rank(s), memory_gib="
                  f"{budget_text(args.memory_gib)} ...", end=" ", flush=True)
            results, status, highest = run_child(task, case, args.memory_gib,
                                                 replace_ranks(args, ranks))
            if task == "compare":
                rows = compare_rows(case, results[0] if results else None, status)
            else:
                rows = [merge_row(case, result, status, highest) for result in results or [None]]
            if args.ranks > 1 and task == "merge":
                rows = with_ratio(rows, ranks, MERGE_COLUMNS.index("statistics GiB"))
            for row in rows:
                table.add(*row)
            print(status, flush=True)
            write_results(table, header, args.out)
    print("\n" + table.text())
    print(f"load average at end: {load_average()}; written to {args.out}/{table.name}.md, .csv")


_ONE_PROCESS: dict[str, float] = {}  # case label -> the one-process run's statistics GiB


def with_ratio(rows: list[list[Any]], ranks: int, column: int) -> list[list[Any]]:
    """The rows with "statistics ÷ one process" inserted after `column`: 1 for the one-process
    run (remembered), each rank's statistics GiB over it for the ranked run."""
    out = []
    for row in rows:
        value = row[column]
        if ranks == 1 and isinstance(value, float):
            _ONE_PROCESS[row[0]] = value
        base = _ONE_PROCESS.get(row[0])
        ratio = value / base if isinstance(value, float) and base else "-"
        out.append(row[:column + 1] + [ratio] + row[column + 1:])
    return out


def replace_ranks(args: argparse.Namespace, ranks: int) -> argparse.Namespace:
    """`args` with another number of ranks."""
    return argparse.Namespace(**{**vars(args), "ranks": ranks})


if __name__ == "__main__":
    main()
