"""Matching of very wide feature spaces: seconds and peak memory of "zipit" and "permute" for two
models of n features each, up to D = 2n = 16,384 (the MLP of a 1B decoder).

    python -m benchmarks.speed.wide_matching [--sizes 1024,2048,4096,8192]
        [--samples 20000] [--repeats 1] [--baseline DIR] [--out benchmarks/results]

For each n, the correlation of the 2n features of two random "models" (`wide_correlation`) is
computed once, in float32, and saved; each matching then runs in a fresh Python process that
loads it, casts it to float64 (what `Zipper` hands the matching) and calls
`fxzip.match_features`; its peak memory is the peak resident memory above that input
(VmHWM after, less VmRSS before). `--baseline DIR` runs the same processes with the `fxzip`
package found in DIR (e.g. `git archive <commit> fxzip | tar -x -C DIR`), interleaved with the
current one, and adds its seconds and peak, the speed-up and whether the Match is the same.
Written to `<out>/wide_matching.md` and `wide_matching.csv`; nothing asserts on time.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common.tables import Table
from benchmarks.common.timing import current_rss_mib, load_average, peak_rss_mib, reset_peak_rss

REPO = Path(__file__).resolve().parents[2]
#: (label, method, merged width as a multiple of n): the default merge, a wider one (`width=`
#: above 1 keeps features apart) and a narrower one (only through `match_features`)
SETTINGS = (("zipit", "zipit", 1.0), ("zipit width 1.5", "zipit", 1.5),
            ("zipit out n/2", "zipit", 0.5), ("permute", "permute", 1.0))


def wide_correlation(n: int, samples: int, seed: int = 0) -> np.ndarray:
    """The (2n, 2n) float32 correlation of two models' features over `samples` inputs: model A's
    features load on a shared latent of rank n/8 plus noise; three in four of model B's features
    are noisy copies of A's, in a random order, the rest are features of their own."""
    rng = np.random.default_rng(seed)
    rank = max(8, n // 8)
    latent = rng.standard_normal((rank, samples), dtype=np.float32)
    features = np.empty((2 * n, samples), dtype=np.float32)
    a, b = features[:n], features[n:]
    np.matmul(rng.standard_normal((n, rank), dtype=np.float32), latent, out=a)
    a += rng.standard_normal((n, samples), dtype=np.float32)
    copied = rng.random(n) < 0.75
    k = int(copied.sum())
    b[copied] = a[rng.permutation(n)[copied]]
    b[copied] += 0.5 * rng.standard_normal((k, samples), dtype=np.float32)
    own = rng.standard_normal((n - k, rank), dtype=np.float32) @ latent
    b[~copied] = own + rng.standard_normal((n - k, samples), dtype=np.float32)
    features -= features.mean(axis=1, keepdims=True)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    return features @ features.T


def child(corr_path: str, method: str, width: float, assign_path: str) -> dict[str, Any]:
    """In a fresh process whose `fxzip` is already importable: load the correlation, match it
    once, save the assignment; its seconds and peak memory above the float64 input."""
    import fxzip

    corr = np.load(corr_path).astype(np.float64)
    n = corr.shape[0] // 2
    base = current_rss_mib()
    can_reset = reset_peak_rss()
    start = time.perf_counter()
    match = fxzip.match_features(corr, [n, n], method, out_size=round(width * n))
    seconds = time.perf_counter() - start
    np.save(assign_path, np.concatenate(match.assign))
    return {"seconds": seconds, "peak_mib": peak_rss_mib() - base if can_reset else float("nan"),
            "within": match.within_merges, "fxzip": str(Path(fxzip.__file__).parents[1])}


def run_child(corr_path: Path, method: str, width: float, assign_path: Path,
              fxzip_dir: Path) -> dict[str, Any]:
    """`child` in a fresh Python process with `fxzip` imported from `fxzip_dir`."""
    command = [sys.executable, "-m", "benchmarks.speed.wide_matching", "--child", str(corr_path),
               method, str(width), str(assign_path), "--fxzip", str(fxzip_dir)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"wide matching child {method} {width} failed:\n{done.stderr}")
    result = json.loads(done.stdout.splitlines()[-1])
    if Path(result["fxzip"]).resolve() != fxzip_dir.resolve():  # not the package asked for
        raise RuntimeError(f"the child imported fxzip from {result['fxzip']}, not {fxzip_dir}")
    return result


def measure(n: int, corr_path: Path, scratch: Path, sides: dict[str, Path],
            repeats: int) -> list[dict[str, Any]]:
    """Every setting on every side (interleaved, `repeats` times; the minimum seconds and peak)."""
    rows = []
    for label, method, width in SETTINGS:
        best: dict[str, dict[str, Any]] = {}
        for _ in range(repeats):
            for side, fxzip_dir in sides.items():
                r = run_child(corr_path, method, width, scratch / f"{side}.npy", fxzip_dir)
                old = best.get(side, r)
                best[side] = {**r, "seconds": min(r["seconds"], old["seconds"]),
                              "peak_mib": min(r["peak_mib"], old["peak_mib"])}
        same = None
        if "baseline" in sides:
            same = np.array_equal(np.load(scratch / "current.npy"), np.load(scratch / "baseline.npy"))
        rows.append({"n": n, "label": label, "out_size": round(width * n), **best, "same": same})
        print(f"  n={n} {label}: " + ", ".join(f"{s} {r['seconds']:.2f} s {r['peak_mib']:.0f} MiB"
                                              for s, r in best.items()), flush=True)
    return rows


def table(rows: Sequence[dict[str, Any]], samples: int, repeats: int,
          baseline: Path | None) -> Table:
    """The result table: one row per size and setting."""
    columns = ["D", "n per model", "setting", "out_size", "input MiB", "seconds",
               "peak MiB above input", "within merges"]
    if baseline is not None:
        columns += ["baseline seconds", "baseline peak MiB", "speed-up", "same Match"]
    out = Table("wide_matching", "Matching of wide spaces: 2 models × n features, seconds and "
                "peak memory above the float64 input (fresh process per run)", columns)
    for r in rows:
        n, cur = r["n"], r["current"]
        cells = [2 * n, n, r["label"], r["out_size"], (2 * n) ** 2 * 8 / 2**20, cur["seconds"],
                 cur["peak_mib"], cur["within"]]
        if baseline is not None:
            old = r["baseline"]
            cells += [old["seconds"], old["peak_mib"], f"{old['seconds'] / cur['seconds']:.2f}×",
                      "yes" if r["same"] else "NO"]
        out.add(*cells)
    out.notes.append(f"correlation: `wide_correlation`, {samples:,} samples in float32, cast to "
                     "float64; alpha 0.5, beta 1; out_size = width × n")
    out.notes.append(f"seconds: the minimum of {repeats} run(s); peak: VmHWM less VmRSS before "
                     "the call, in the same process")
    if baseline is not None:
        out.notes.append(f"baseline: the fxzip package in `{baseline}`, run interleaved with "
                         "the current one on the same inputs")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1024,2048,4096,8192",
                        help="features per model, comma-separated (D = 2n)")
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--baseline", type=Path, default=None,
                        help="a directory holding another fxzip package to compare with")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--child", nargs=4, metavar=("CORR", "METHOD", "WIDTH", "ASSIGN"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--fxzip", default=str(REPO), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        sys.path.insert(0, args.fxzip)
        corr, method, width, assign = args.child
        print(json.dumps(child(corr, method, float(width), assign)))
        return
    sides = {"current": REPO, **({"baseline": args.baseline} if args.baseline else {})}
    print(f"load average at start: {load_average()}", flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="wide_matching_"))
    rows: list[dict[str, Any]] = []
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            corr_path = scratch / "corr.npy"
            np.save(corr_path, wide_correlation(n, args.samples))
            rows += measure(n, corr_path, scratch, sides, args.repeats)
    finally:
        shutil.rmtree(scratch)
    result = table(rows, args.samples, args.repeats, args.baseline)
    result.notes.append(f"load average at end: {load_average()}")
    print("\n" + result.text())
    args.out.mkdir(parents=True, exist_ok=True)
    result.write(args.out)


if __name__ == "__main__":
    main()
