"""fxzip statistics on one process against several ranks of torch.distributed.

    python -m benchmarks.scale [--ranks 2] [--images 32] [--size 128] [--batch 8] [--threads 1]
                               [--out benchmarks/results]

Two timm resnet50 (random weights from seeds 0 and 1, BatchNorm statistics estimated on the
calibration images first, as `benchmarks.speed` builds them: `benchmarks.common.cases`). The
statistics of every mergeable space (`Zipper.statistics`, float32 products by default) are
collected (a) in one process over all batches with one rank's threads (`--threads`, default 1),
(b) the same with all ranks' threads, and (c) under `torchrun --standalone
--nproc_per_node=<ranks> -m benchmarks.scale --worker ...` (gloo, CPU; all three processes are
started from the repository root), each rank with `--threads` threads and the batches dealt
round-robin (rank r takes batches r, r + ranks, ...).
Reported: the wall time of the statistics on each side (rank 0's, from a barrier; the trace is
not counted), the part of it spent in the all-reduces, and the equality of the result: the largest
difference of any correlation between (a) and (c), and whether the ZipIt! matching (alpha 0.5,
beta 1) of every space is the same. Written to `<out>/scale.md` and `scale.csv`.

On GPUs, and across machines, run the worker yourself from the repository root (see the
README's "Scale out"):

    torchrun --nproc_per_node=8 -m benchmarks.scale --worker OUT --backend nccl
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 \\
        --rdzv-id=fxzip -m benchmarks.scale --worker OUT --backend nccl
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import fxzip
from fxzip.matching import get_method
from fxzip.passes import statistics
from fxzip.runtime import distributed as fxzip_distributed

from benchmarks.common.cases import resnet50_case
from benchmarks.common.tables import Table
from benchmarks.common.timing import Stopwatch

REPO = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    """One process (not distributed) or one rank: collect the statistics of this rank's batches,
    time them, save rank 0's correlations and timings to `args.worker`."""
    torch.set_num_threads(args.threads)
    # the models are built before torch.distributed is initialised: their BatchNorm estimation
    # on all the images is then the same computation as in the one-process run
    case = resnet50_case(args.images, args.size, args.batch)
    distributed = "RANK" in os.environ
    if distributed:
        backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend)
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device("cpu")
    if distributed and dist.get_backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    models = [m.to(device) for m in case.models]
    shard = [x.to(device) for x in case.batches[rank::world]]
    watch = Stopwatch("all_reduce", "statistics")
    reduce = statistics.all_reduce_moments

    def timed_reduce(*a, **k):
        with watch("all_reduce"):
            reduce(*a, **k)
            _sync(device)

    statistics.all_reduce_moments = timed_reduce
    zipper = fxzip.Zipper(models, shard, progress=False, statistics_precision=args.precision)
    spaces = zipper.analysis.mergeable_spaces()
    if distributed:
        dist.barrier()
    sent = fxzip_distributed.traffic["bytes"]
    with watch("statistics"):
        stats = zipper.statistics(spaces)
        _sync(device)
    seconds = watch.seconds["statistics"]
    sent = fxzip_distributed.traffic["bytes"] - sent
    full = sum(stats[s].features.m2.numel() * 8 for s in spaces)  # the square float64 matrices
    if rank == 0:
        out = Path(args.worker)
        np.savez(out / f"correlations-{args.tag}.npz",
                 **{str(s): stats[s].correlation() for s in spaces})
        torch.save({"seconds": seconds, "all_reduce": watch.seconds["all_reduce"], "world": world,
                    "threads": args.threads, "batches": len(case.batches),
                    "precision": zipper.statistics_precision, "device": str(device),
                    "backend": dist.get_backend() if distributed else "-",
                    "spaces": len(spaces), "sent_bytes": sent, "full_bytes": full},
                   out / f"timing-{args.tag}.pt")
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(out: Path, tags: list[str]) -> tuple[float, int, int]:
    """The largest difference of any correlation between the first and the other runs, and how
    many spaces have the same ZipIt! matching in all of them (of how many)."""
    runs = [np.load(out / f"correlations-{t}.npz") for t in tags]
    zipit = get_method("zipit")
    largest, same = 0.0, 0
    for key in runs[0].files:
        corrs = [r[key] for r in runs]
        largest = max([largest] + [float(np.abs(c - corrs[0]).max()) for c in corrs[1:]])
        size = corrs[0].shape[0] // 2
        matches = [zipit.match(c, [size, size], alpha=0.5, beta=1.0).assign for c in corrs]
        same += all(all(np.array_equal(a, b) for a, b in zip(m, matches[0])) for m in matches[1:])
    return largest, same, len(runs[0].files)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--precision", default="float32",
                        help="statistics_precision (default float32: with bfloat16 products, "
                        "float32 differences of the activations (thread counts, kernels) become "
                        "bfloat16 rounding noise of about 2.5e-3/sqrt(samples) in correlations)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="run", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help="worker: gloo or nccl (default: nccl with CUDA)")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = args.out / "scale-scratch"
    scratch.mkdir(exist_ok=True)
    common = ["-m", "benchmarks.scale", "--worker", str(scratch.resolve()), "--images",
              str(args.images), "--size", str(args.size), "--batch", str(args.batch),
              "--precision", args.precision]
    runs = {"single": args.threads, "single-all-threads": args.threads * args.ranks}
    for tag, threads in runs.items():  # one process: the threads of one rank, and of all ranks
        subprocess.run([sys.executable, *common, "--threads", str(threads), "--tag", tag],
                       check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={args.ranks}", *common, "--threads", str(args.threads),
                    "--backend", "gloo", "--tag", "ranks"], check=True, cwd=REPO,
                   env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    tags = ["single", "single-all-threads", "ranks"]
    timings = [torch.load(scratch / f"timing-{t}.pt") for t in tags]
    largest, same, total = compare(scratch, ["single", "ranks"])
    table = Table("scale", f"Statistics of two timm resnet50 ({args.images} images of {args.size}², "
                  f"batches of {args.batch}, {timings[0]['spaces']} spaces, "
                  f"{timings[0]['precision']} products): one process vs {args.ranks} ranks (gloo, CPU)",
                  ["run", "threads per process", "batches per rank", "statistics s",
                   "of which all-reduce s", "all-reduce MB per rank", "full matrices MB",
                   "speed-up", "max abs Δ correlation", "same matchings"])
    base = timings[0]["seconds"]
    for tag, t in zip(tags, timings):
        world = t["world"]
        table.add("one process" if world == 1 else f"{world} ranks ({t['backend']})",
                  t["threads"], f"{-(-t['batches'] // world)}", t["seconds"], t["all_reduce"],
                  t["sent_bytes"] / 1e6 if world > 1 else "-", t["full_bytes"] / 1e6,
                  base / t["seconds"], largest if tag == "ranks" else "-",
                  f"{same}/{total}" if tag == "ranks" else "-")
    table.notes.append("speed-up against the one-process run with one rank's threads; the "
                       "correlations and ZipIt! matchings (alpha 0.5, beta 1) of the ranks are "
                       "compared with that run's")
    table.notes.append("all-reduce MB: what this rank handed to the all-reduces "
                       "(`fxzip.runtime.distributed.traffic`): the packed upper triangles of the co-moments "
                       "plus counts, means and dead units' rows; full matrices MB: the square "
                       "float64 co-moment matrices that were sent before")
    table.notes.append(f"host: {os.cpu_count()} CPU cores, load average "
                       f"{os.getloadavg()[0]:.1f} at the end (shared with other work: wall times "
                       "are single runs and noisy)")
    print(table.text())
    table.write(args.out)
    for f in scratch.iterdir():
        f.unlink()
    scratch.rmdir()


if __name__ == "__main__":
    main()
