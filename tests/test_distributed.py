"""Statistics over torch.distributed: a merge under `torchrun --nproc_per_node=2` (gloo, CPU) from two
shards equals the one-process merge over the union of the shards, on every rank; and a merge runs
on CUDA with its statistics on the device (skipped without a GPU)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import fxzip
from fxzip import distributed
from fxzip.errors import InputError

WORKER = Path(__file__).with_name("distributed_worker.py")


def _worker_module():
    spec = importlib.util.spec_from_file_location("distributed_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_two_ranks_equal_one_process_merge(tmp_path):
    """Rank 0 holds batches 0-2 and rank 1 batches 3-4 ("unequal"), or rank 0 all and rank 1 none
    ("empty"): both ranks return the same model (bitwise), with the one-process merge's matchings,
    sample counts and dead-unit fallbacks, its correlations to 1e-12 and its outputs to 1e-5."""
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(WORKER.parent.parent), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([*torchrun, "--standalone", "--nproc_per_node=2", str(WORKER),
                          str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    worker = _worker_module()
    for case in worker.SHARDS:
        single = worker.merge_case(case, None)
        ranks = [torch.load(tmp_path / f"{case}-rank{r}.pt", weights_only=False) for r in (0, 1)]
        assert single["fallbacks"], "the dead-unit pass should run"
        for result in ranks:
            assert result["matchings"] == single["matchings"], case
            assert result["counts"] == single["counts"], case
            assert result["fallbacks"] == single["fallbacks"], case
            for s, corr in single["correlations"].items():
                assert torch.allclose(result["correlations"][s], corr, atol=1e-12, rtol=0), case
            for out, ref in zip(result["outputs"], single["outputs"]):
                assert torch.allclose(out, ref, atol=1e-5, rtol=0), case
        for key, value in ranks[0]["state"].items():
            assert torch.equal(value, ranks[1]["state"][key]), (case, key)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_merge_runs_on_cuda_with_statistics_on_the_device():
    """Models on the GPU: the statistics and the merged model live there, and the merge equals the
    CPU merge (same matchings, outputs to 1e-4: float32 products on both)."""
    worker = _worker_module()
    data = worker.batches()
    results = {}
    for device in ("cpu", "cuda"):
        models = [worker.SmallCNN(seed).eval().to(device) for seed in (0, 1)]
        zipper = fxzip.Zipper(models, [x.to(device) for x in data], progress=False,
                              statistics_precision="float32")
        merged = zipper.merge()
        moments = next(iter(zipper._moments.values())).features
        assert moments.m2.device.type == device and moments.mean.device.type == device
        assert all(p.device.type == device for p in merged.parameters())
        with torch.no_grad():
            outputs = [o.cpu() for o in merged(worker.probe().to(device))]
        results[device] = ({k[0]: [a.tolist() for a in m.assign]
                            for k, m in zipper._matches.items()}, outputs)
    assert results["cuda"][0] == results["cpu"][0]
    for out, ref in zip(results["cuda"][1], results["cpu"][1]):
        assert torch.allclose(out, ref, atol=1e-4, rtol=0)


def test_not_distributed_by_default():
    """Without init_process_group, nothing is reduced and a shard must not be empty."""
    assert not distributed.is_distributed()
    assert distributed.world_size() == 1
    with pytest.raises(InputError, match="empty"):
        fxzip.Zipper([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)], [], progress=False)
