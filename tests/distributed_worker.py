"""Worker of tests/test_distributed.py: merges two small CNNs with BatchNorm from this rank's shard
of the calibration batches and saves what the test compares (matchings, correlations, the merged
model's outputs and state) to OUT/<case>-rank<r>.pt.

Under torchrun (gloo) every rank takes its shard of each case; run without torchrun it merges over
all batches in one process (the reference). Cases: "unequal" (rank 0: batches 0-2, rank 1: 3-4,
of different sizes) and "empty" (rank 0: all batches, rank 1: none).

    torchrun --standalone --nproc_per_node=2 tests/distributed_worker.py OUT
    python tests/distributed_worker.py OUT
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

import fxzip
from fxzip.runtime import distributed

BATCH_SIZES = (6, 4, 5, 3, 7)
SHARDS = {"unequal": ((0, 1, 2), (3, 4)), "empty": ((0, 1, 2, 3, 4), ())}
SHARDED_BUDGETS = (None, 1e-6)  # one pass; a pass per space


class SmallCNN(nn.Module):
    """Two conv-BN-ReLU, a residual conv-BN-ReLU block, pooling and a linear head; channel 0 of
    the first conv is dead after its ReLU (so the dead-unit pass runs)."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 5)
        with torch.no_grad():
            self.stem[1].bias[0] = -100.0  # a dead unit
            for bn in (self.stem[1], self.stem[4], self.block[1]):  # trained-looking running statistics
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        h = self.stem(x)
        h = h + self.block(h)
        return self.head(h.mean((2, 3)))


def batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    return [torch.randn(n, 3, 8, 8, generator=gen) * 2 + 0.5 for n in BATCH_SIZES]


def probe() -> torch.Tensor:
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(99))


def merge_case(case: str, rank: int | None) -> dict:
    """Merge SmallCNN(0) and SmallCNN(1) on this rank's shard of `case` (all batches if rank is
    None) with a Zipper; return the matchings, correlations, outputs on the probe and state."""
    data = batches()
    shard = data if rank is None else [data[i] for i in SHARDS[case][rank]]
    models = [SmallCNN(0).eval(), SmallCNN(1).eval()]
    zipper = fxzip.Zipper(models, shard, progress=False, statistics_precision="float32")
    sent = distributed.traffic["bytes"]
    zipper.statistics(zipper.analysis.mergeable_spaces())
    sent = distributed.traffic["bytes"] - sent
    merged = zipper.merge(method="zipit")
    with torch.no_grad():
        outputs = [o.clone() for o in merged(probe())]
    return {
        "matchings": {key[0]: [a.tolist() for a in m.assign]
                      for key, m in zipper._matches.items()},
        "correlations": {s: torch.from_numpy(st.correlation().copy())
                         for s, st in zipper._moments.items()},
        "counts": {s: st.features.count for s, st in zipper._moments.items()},
        "fallbacks": sorted(s for s, st in zipper._moments.items() if st.fallback is not None),
        "outputs": outputs,
        "state": {k: v.clone() for k, v in merged.state_dict().items()},
        "sent_bytes": sent,
        "full_m2_bytes": sum(st.features.m2.numel() * 8 for st in zipper._moments.values()),
    }


def sharded_case(case: str, rank: int | None, memory_gib: float | None) -> dict:
    """Merge (the paper's zip with its BN reset) straight from `Zipper.merge`, without replicated
    statistics first, so each rank collects and matches only the spaces it owns: the matchings,
    outputs, state and the spaces whose statistics this rank held (with their sizes). Rank None:
    all batches in one process."""
    import fxzip.zipper as zipper_module

    data = batches()
    shard = data if rank is None else [data[i] for i in SHARDS[case][rank]]
    models = [SmallCNN(0).eval(), SmallCNN(1).eval()]
    held: list[tuple[int, int]] = []
    collect = zipper_module.collect

    def recording(*args, **kwargs):
        found = collect(*args, **kwargs)
        held.extend((s, st.features.mean.numel()) for s, st in found.items())
        return found

    zipper_module.collect = recording
    try:
        zipper = fxzip.Zipper(models, shard, progress=False, statistics_precision="float32",
                              memory_gib=memory_gib)
        merged = zipper.merge(method="zipit", corrections=None)
    finally:
        zipper_module.collect = collect
    with torch.no_grad():
        outputs = [o.clone() for o in merged(probe())]
    return {"matchings": {key[0]: [a.tolist() for a in m.assign]
                          for key, m in zipper._matches.items()},
            "outputs": outputs, "held": held,
            "passes": merged.fxzip_report.memory["statistics_passes"],
            "state": {k: v.clone() for k, v in merged.state_dict().items()}}


def chained_case(case: str, rank: int | None, memory_gib: float | None = 1e-6) -> dict:
    """Merge two tiny decoders (`benchmarks.common.decoders`) under a ~zero budget, so that
    every space has a statistics pass and each pass resumes where the last saved the models'
    values (their share of the budget raised), from this rank's shard of `case`: the matchings,
    the outputs on a probe, the state and how many batches were resumed (`memory_gib=None`:
    the one-pass reference)."""
    import fxzip.zipper as zipper_module
    from benchmarks.common.decoders import build_decoder, random_tokens

    tokens = random_tokens("tiny", sum(BATCH_SIZES), seed=5)
    data = list(tokens.split(list(BATCH_SIZES)))
    shard = data if rank is None else [data[i] for i in SHARDS[case][rank]]
    share = zipper_module.CHECKPOINT_SHARE
    zipper_module.CHECKPOINT_SHARE = 1e5  # 0.1 GiB of the 1e-6 GiB budget
    try:
        merged = fxzip.merge(build_decoder("tiny", 0), build_decoder("tiny", 1), shard,
                             memory_gib=memory_gib, method="zipit", corrections=None,
                             progress=False,
                             statistics_precision="float32")
    finally:
        zipper_module.CHECKPOINT_SHARE = share
    with torch.no_grad():
        outputs = [o.clone() for o in merged(random_tokens("tiny", 3, seed=9))]
    return {"spaces": [(r.space, r.merged_width, r.within_by_model)
                       for r in merged.fxzip_report.spaces],
            "outputs": outputs, "memory": merged.fxzip_report.memory,
            "state": {k: v.clone() for k, v in merged.state_dict().items()}}


def main(out: str) -> None:
    torch.set_num_threads(1)
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else None
    for case in SHARDS:
        result = merge_case(case, rank)
        name = f"{case}-rank{rank}.pt" if distributed else f"{case}-single.pt"
        torch.save(result, os.path.join(out, name))
        if distributed:
            for budget in SHARDED_BUDGETS:
                torch.save(sharded_case(case, rank, budget),
                           os.path.join(out, f"sharded-{case}-{budget}-rank{rank}.pt"))
            torch.save(chained_case(case, rank),
                       os.path.join(out, f"chained-{case}-rank{rank}.pt"))
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
