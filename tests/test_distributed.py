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
from fxzip.runtime import distributed
from fxzip.errors import InputError

WORKER = Path(__file__).with_name("distributed_worker.py")


def _worker_module():
    spec = importlib.util.spec_from_file_location("distributed_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ranks_out(tmp_path_factory) -> Path:
    """The worker run once under `torchrun --nproc_per_node=2` (gloo): the folder of what each
    rank saved for every test below."""
    out = tmp_path_factory.mktemp("ranks")
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(WORKER.parent.parent), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([*torchrun, "--standalone", "--nproc_per_node=2", str(WORKER),
                          str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_two_ranks_equal_one_process_merge(ranks_out):
    """Rank 0 holds batches 0-2 and rank 1 batches 3-4 ("unequal"), or rank 0 all and rank 1 none
    ("empty"): both ranks return the same model (bitwise), with the one-process merge's matchings,
    sample counts and dead-unit fallbacks, its correlations to 1e-6 (each rank sums its own products
    in float32 before the float64 all-reduce: 6e-8 measured) and its outputs to 1e-5."""
    worker = _worker_module()
    for case in worker.SHARDS:
        single = worker.merge_case(case, None)
        ranks = [torch.load(ranks_out / f"{case}-rank{r}.pt", weights_only=False) for r in (0, 1)]
        assert single["fallbacks"], "the dead-unit pass should run"
        for result in ranks:
            assert result["matchings"] == single["matchings"], case
            assert result["counts"] == single["counts"], case
            assert result["fallbacks"] == single["fallbacks"], case
            for s, corr in single["correlations"].items():
                assert torch.allclose(result["correlations"][s], corr, atol=1e-6, rtol=0), case
            for out, ref in zip(result["outputs"], single["outputs"]):
                assert torch.allclose(out, ref, atol=1e-5, rtol=0), case
        # the statistics' all-reduce sends the packed upper triangles of the co-moments (plus
        # counts, means and the dead units' rows): well under the full matrices
        assert 0 < ranks[0]["sent_bytes"] < 0.75 * ranks[0]["full_m2_bytes"], case
        for key, value in ranks[0]["state"].items():
            assert torch.equal(value, ranks[1]["state"][key]), (case, key)


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_spaces_sharded_over_ranks_equal_one_process(ranks_out):
    """`Zipper.merge` under two ranks without replicated statistics: each rank holds and matches
    only the spaces it owns (about half of the features' second moments each, none on both), the
    matches are shared, and both ranks build the one-process merge's model (the paper's zip: same
    matchings, outputs to 1e-5, bitwise-equal state on both ranks) in one pass and in a pass per
    space."""
    worker = _worker_module()
    for case in worker.SHARDS:
        single = worker.sharded_case(case, None, None)
        for budget in worker.SHARDED_BUDGETS:
            ranks = [torch.load(ranks_out / f"sharded-{case}-{budget}-rank{r}.pt",
                                weights_only=False) for r in (0, 1)]
            held = [dict(r["held"]) for r in ranks]
            assert held[0] and held[1] and not set(held[0]) & set(held[1]), (case, budget)
            assert set(held[0]) | set(held[1]) == set(single["matchings"])
            squares = [sum(d * d for d in h.values()) for h in held]
            assert max(squares) < 0.75 * sum(squares), (case, budget, squares)
            # a pass per space on each rank: about half as many passes as spaces
            assert ranks[0]["passes"] == (1 if budget is None
                                          else (len(single["matchings"]) + 1) // 2)
            for result in ranks:
                assert result["matchings"] == single["matchings"], (case, budget)
                for out, ref in zip(result["outputs"], single["outputs"]):
                    assert torch.allclose(out, ref, atol=1e-5, rtol=0), (case, budget)
            for key, value in ranks[0]["state"].items():
                assert torch.equal(value, ranks[1]["state"][key]), (case, budget, key)


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_chained_statistics_passes_under_two_ranks_equal_one_process(ranks_out):
    """Two tiny decoders merged under a ~zero budget (a statistics pass per space, each resuming
    where the previous one saved the models' values on its rank's own batches): both ranks, one
    with the batches of the other's shard or with none, build the one-process merge (the same
    spaces and merges, outputs to 1e-5, bitwise-equal state on both ranks), which is bitwise the
    one-pass merge, and the passes did resume."""
    worker = _worker_module()
    for case in worker.SHARDS:
        single = worker.chained_case(case, None)
        assert single["memory"]["statistics_passes"] >= 3
        assert single["memory"]["resumed_batches"] > 0
        one_pass = worker.chained_case(case, None, memory_gib=None)
        assert single["spaces"] == one_pass["spaces"]
        for key, value in one_pass["state"].items():
            assert torch.equal(value, single["state"][key]), (case, key)
        ranks = [torch.load(ranks_out / f"chained-{case}-rank{r}.pt", weights_only=False)
                 for r in (0, 1)]
        assert ranks[0]["memory"]["resumed_batches"] > 0, case
        for result in ranks:
            assert result["spaces"] == single["spaces"], case
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


def _cli_files(tmp_path):
    """Two TinyNet checkpoints, 5 calibration batches in a tensor file, a recipe."""
    from merge_files import save_checkpoint, write_recipe
    from toy_models.nets import TinyNet

    torch.manual_seed(0)
    for name in ("a", "b"):
        save_checkpoint(TinyNet(), tmp_path / f"tiny_{name}.safetensors")
    torch.save(torch.randn(36, 3, 16, 16, generator=torch.Generator().manual_seed(3)),
               tmp_path / "calibration.pt")
    recipe = {"models": [{"model": "toy_models.nets:TinyNet", "checkpoint": f"tiny_{k}.safetensors"}
                         for k in ("a", "b")],
              "calibration": {"data": "calibration.pt", "batch_size": 8},
              "merge": {"statistics_precision": "float32"}, "device": "cpu"}
    return write_recipe(tmp_path / "recipe.yaml", recipe)


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_cli_under_torchrun_writes_once(tmp_path):
    """`torchrun --nproc_per_node=2 -m fxzip merge`: the ranks merge batches 0, 2, 4 and 1, 3;
    rank 0 alone writes OUT_DIR (and says so once), and the program equals a one-process merge."""
    from test_merge_command import OUTPUTS, merge_in_process

    recipe = _cli_files(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(WORKER.parent.parent), str(WORKER.parent), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", "-m", "fxzip", "merge", str(recipe), "-o",
                          str(tmp_path / "out")], env=env, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(OUTPUTS)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert run.stderr.count("fxzip: wrote ") == 1 and "on 2 ranks" in run.stderr
    assert "fxzip: error" not in run.stderr
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        refs = merge_in_process(recipe)(x)
    for out, ref in zip(fxzip.load(tmp_path / "out" / "merged.pt2")(x), refs):
        assert torch.allclose(out, ref, atol=1e-5, rtol=0)


def test_cli_rank_other_than_0_writes_nothing(tmp_path, monkeypatch):
    """The rank-0 logic on its own: a process that is not rank 0 merges but leaves OUT_DIR alone."""
    from fxzip.cli.merge import run_merge

    recipe = _cli_files(tmp_path)
    monkeypatch.setattr(distributed, "rank", lambda group=None: 1)
    assert run_merge(recipe, tmp_path / "out", quiet=True) == tmp_path / "out"
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
