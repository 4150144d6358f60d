"""`benchmarks.memory`'s pieces on the tiny decoder: its parameter counts, its capture and
default merge, the self-merge that gives the model back, and the watcher that kills a child
process past its memory limit."""
from __future__ import annotations

import os
import sys

import pytest
import torch

import fxzip
from benchmarks.common.decoders import CONFIGS, Decoder, build_decoder, random_tokens
from benchmarks.memory import QUICK_CASES, merge_row, module_bytes, report_memory, watched


@pytest.mark.parametrize("name, count", [("tiny", 20_640), ("0.25B", 276_071_424),
                                         ("1B", 1_038_682_112)])
def test_the_configs_have_the_stated_parameter_counts(name, count):
    with torch.device("meta"):  # no memory: the 1B decoder is 4 GB in float32
        model = Decoder(CONFIGS[name])
    assert sum(p.numel() for p in model.parameters()) == CONFIGS[name].parameters() == count


def test_the_decoder_ties_its_output_and_is_random_by_seed():
    a, b, again = build_decoder("tiny", 0), build_decoder("tiny", 1), build_decoder("tiny", 0)
    tokens = random_tokens("tiny", 4)
    assert tokens.dtype == torch.int64 and tokens.shape == (4, CONFIGS["tiny"].max_len)
    with torch.no_grad():
        assert a(tokens).shape == (4, CONFIGS["tiny"].max_len, CONFIGS["tiny"].vocab)
        assert torch.equal(a(tokens), again(tokens)) and not torch.equal(a(tokens), b(tokens))
    assert module_bytes(a) == 4 * CONFIGS["tiny"].parameters() + 2 * a.cos.numel() * 4


@pytest.mark.filterwarnings("ignore::fxzip.errors.CalibrationWarning")
def test_the_default_merge_of_two_decoders_reports_and_fits_its_bound():
    models, batches = QUICK_CASES["0.25B"].build()
    merged = fxzip.merge(*models, batches, progress=False, memory_gib=1.0)
    report = merged.fxzip_report
    assert report.layers_zipped == report.layers_total - 1  # all but the output
    tokens = torch.cat(batches)
    with torch.no_grad():
        outs = merged(tokens)
        assert [o.shape for o in outs] == [m(tokens).shape for m in models]
    memory = report_memory(report, 1.0)
    assert memory["budget_gib"] == 1.0
    result = {"rank": 0, "world": 1, "params": 20_640, "models_gib": 0.0, "data_gib": 0.0,
              "merged_gib": 0.5, "rss_before_gib": 1.0, "peak_gib": 3.0, "wall_s": 1.0,
              "seconds": {"statistics": 1.0}, **memory}
    row = merge_row(QUICK_CASES["0.25B"], result, "ok", 3.1)
    assert row[9] == pytest.approx(1.2 * (1.0 + 0.5 + 1.0)) and row[10] == "yes"
    killed = {"rank": 0, "world": 1, "params": 20_640, "rss_before_gib": 1.0, "requested": "none",
              "where": "_match_in_passes > collect"}
    row = merge_row(QUICK_CASES["0.25B"], killed, "killed (out of memory) after 9 s", 20.1)
    assert row[2] == 20_640 and row[6] == "none" and row[8:11] == ["-", "-", "-"]
    assert row[-1] == "killed (out of memory) after 9 s, in _match_in_passes > collect"


@pytest.mark.filterwarnings("ignore::fxzip.errors.CalibrationWarning")
def test_a_decoder_merged_with_its_permuted_copy_gives_it_back():
    model = build_decoder("tiny", 0)
    tokens = random_tokens("tiny", 16)
    permuted, count = fxzip.testing.permuted_copy(model, tokens, seed=1)
    assert count > 0
    with torch.no_grad():
        ref = model(tokens)
        assert not torch.equal(permuted.layers[0].mlp.up_proj.weight,
                               model.layers[0].mlp.up_proj.weight)
        torch.testing.assert_close(permuted(tokens), ref, rtol=1e-4, atol=1e-5)
        merged = fxzip.merge(model, permuted, list(tokens.split(8)), progress=False)
        for out in merged(tokens):
            assert ((out - ref).norm() / ref.norm()).item() < 1e-4


def test_the_watcher_kills_a_child_past_its_memory_limit(tmp_path):
    hog = "import time, torch; x = torch.ones(2**28); time.sleep(60)"  # 1 GiB
    status, highest = watched([sys.executable, "-c", hog], 0.5, tmp_path / "log.txt",
                              dict(os.environ))
    assert status == "killed (out of memory)" and highest > 0.5
    status, _ = watched([sys.executable, "-c", "raise SystemExit('no luck')"], 0.5,
                        tmp_path / "log.txt", dict(os.environ))
    assert status == "failed: no luck"
