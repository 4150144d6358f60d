"""Part of `benchmarks.speed` (`python -m benchmarks.speed`), section 3: the matching alone, the
fast ZipIt! greedy against the paper's plain greedy (`benchmarks.common.reference_zipit`), and
the Hungarian `permute`. Written to `3_matching.*`."""
from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

import fxzip

from benchmarks.common.reference_zipit import reference_zipit
from benchmarks.common.tables import Table
from benchmarks.common.timing import timed

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
    """Section 3: fast ZipIt! greedy vs `benchmarks.common.reference_zipit`, and Hungarian permute."""
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

