"""The memory budget (`memory_gib`): a budget too small for all spaces' statistics at once makes
the merge read the calibration data in several passes, each followed by its spaces' matching, and
gives the same merged model as one pass; the report gives the passes and each phase's peak."""
from __future__ import annotations

import re
import warnings

import pytest
import timm
import torch

import fxzip
from fxzip.errors import InputError
from fxzip.passes.statistics_plan import plan_passes, unit_bytes
from fxzip.runtime.memory import accumulator_bytes, matching_bytes, resolve_memory_gib
from permute_util import small_resnet


def _batches(shape: tuple[int, ...], seed: int = 0, count: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(count)]


def _tiny_vit(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                             num_classes=5).eval()


CASES = {
    "resnet": (small_resnet, (16, 1, 8, 8)),
    "vit (head groups)": (_tiny_vit, (8, 3, 32, 32)),
}


@pytest.mark.parametrize("case,method", [(c, "zipit") for c in CASES] + [("resnet", "cca")])
def test_budget_forcing_several_passes_gives_the_one_pass_merge(case, method):
    """A ~zero budget gives every space (a head group's together) a pass of its own, whose
    correlation is then computed over its co-moments and the weight similarity mixed over itself;
    the merged weights equal the unbounded merge's bitwise (the paper's merge, so the corrections'
    own sample budget plays no part; "cca" reads the variances too), and the report counts the
    passes and each phase's peak."""
    build, shape = CASES[case]
    a, b = build(0), build(1)
    data = _batches(shape)
    kwargs = dict(corrections=None, progress=False, statistics_precision="float32",
                  method=method)
    one = fxzip.merge(a, b, data, memory_gib=None, **kwargs)
    with pytest.warns(fxzip.MemoryWarning, match="is matched whole"):
        many = fxzip.merge(a, b, data, memory_gib=1e-6, **kwargs)
    assert one.fxzip_report.memory["statistics_passes"] == 1
    passes = many.fxzip_report.memory["statistics_passes"]
    assert passes >= 3 and passes <= len(many.fxzip_report.spaces)
    for key, value in one.state_dict().items():
        assert torch.equal(value, many.state_dict()[key]), key
    assert [s.mean_correlation for s in one.fxzip_report.spaces] == \
        [s.mean_correlation for s in many.fxzip_report.spaces]
    peaks = many.fxzip_report.memory["peak_gib"]
    assert {"statistics", "matching", "rewrite", "bn_reset"} <= set(peaks)
    assert all(0 < gib < 64 for gib in peaks.values())


def test_default_merge_under_a_budget_keeps_the_matchings():
    """With the corrections on, a budget forcing several passes keeps every space's matching
    (the corrections then fit on fewer samples: the budget bounds them too)."""
    a, b = small_resnet(0), small_resnet(1)
    data = _batches((16, 1, 8, 8))
    one = fxzip.merge(a, b, data, memory_gib=None, progress=False)
    with pytest.warns(fxzip.MemoryWarning):
        many = fxzip.merge(a, b, data, memory_gib=1e-6, progress=False)
    assert many.fxzip_report.memory["statistics_passes"] > 1
    spaces = lambda m: [(s.space, s.merged_width, s.within_by_model, s.mean_correlation)
                        for s in m.fxzip_report.spaces]
    assert spaces(one) == spaces(many)
    assert many.fxzip_report.corrections.samples < one.fxzip_report.corrections.samples


def test_a_space_over_the_budget_warns_with_a_budget_that_holds_it():
    """A budget smaller than what one space needs to collect and match warns (MemoryWarning)
    with the memory_gib that holds it; that budget, and any larger one, merges without the
    warning, and the report counts the spaces over the budget (ViT head groups: matched as one
    unit); a budget 3% short of it still warns, for fewer spaces (the widest)."""
    a, b = _tiny_vit(0), _tiny_vit(1)
    data = _batches((8, 3, 32, 32))
    kwargs = dict(corrections=None, progress=False, statistics_precision="float32")
    with pytest.warns(fxzip.MemoryWarning) as record:
        tight = fxzip.merge(a, b, data, memory_gib=1e-6, **kwargs)
    messages = [str(w.message) for w in record if issubclass(w.category, fxzip.MemoryWarning)]
    assert len(messages) == 1
    over = tight.fxzip_report.memory["spaces_over_budget"]
    assert over == tight.fxzip_report.memory["statistics_passes"] > 1  # every unit, own pass
    assert messages[0].startswith(f"{over} feature space(s)")
    enough = float(re.search(r"memory_gib=([0-9.]+) or more", messages[0]).group(1))
    for budget in (enough, 2 * enough):
        with warnings.catch_warnings():
            warnings.simplefilter("error", fxzip.MemoryWarning)
            fine = fxzip.merge(a, b, data, memory_gib=budget, **kwargs)
        assert fine.fxzip_report.memory["spaces_over_budget"] == 0
        assert "over the budget" not in str(fine.fxzip_report)
        for key, value in tight.state_dict().items():  # the same merge either way
            assert torch.equal(value, fine.state_dict()[key]), key
    # a budget just short of what the widest space needs: fewer spaces over it, and it says so
    with pytest.warns(fxzip.MemoryWarning, match="feature space"):
        some = fxzip.merge(a, b, data, memory_gib=0.97 * enough, **kwargs)
    assert 0 < some.fxzip_report.memory["spaces_over_budget"] < over
    assert "space(s) over the budget on their own" in str(some.fxzip_report)


def test_plan_keeps_units_whole_and_within_the_budget():
    dims = {0: 64, 1: 64, 2: 128, 3: 32, 4: 32}
    units = [[0], [1], [2], [3, 4]]
    budget = unit_bytes([0, 1], dims)[0] + matching_bytes(64)
    passes = plan_passes(units, dims, budget)
    assert [p.spaces for p in passes] == [[0, 1], [2], [3, 4]]  # 2 exceeds it alone: own pass
    assert plan_passes(units, dims, None)[0].spaces == [0, 1, 2, 3, 4]
    # two ranks: each pass's units shared out, each rank within the budget
    two = plan_passes(units, dims, budget, ranks=2)
    for p in two:
        for r in (0, 1):
            mine = p.owned_by(r)
            if mine:
                held = sum(accumulator_bytes(dims[s]) for s in mine)
                assert held + max(matching_bytes(dims[s]) for s in mine) <= budget or \
                    len(mine) == 1 or mine == [3, 4]
        owners = {p.owners[s] for s in (3, 4) if s in p.owners}
        assert len(owners) <= 1  # a unit is never split
    assert sum(len(p.spaces) for p in two) == 5 and len(two) < len(passes)


def test_memory_gib_is_checked_and_auto_resolves():
    with pytest.raises(InputError, match="memory_gib"):
        fxzip.MergeOptions(memory_gib=-1)
    with pytest.raises(InputError, match="memory_gib"):
        fxzip.MergeOptions(memory_gib="lots")
    auto = resolve_memory_gib("auto", torch.device("cpu"), 0)
    assert auto is None or 0 < auto < 1e4
    assert resolve_memory_gib(2, torch.device("cpu"), 0) == 2.0


def test_phase_seconds_add_up_to_at_most_the_merge_time():
    """Every phase is timed once: a match inside a pass's matching, or the weight similarity
    inside a match, is not counted again (the phases' seconds were once 2x the wall time)."""
    import time

    a, b = small_resnet(0), small_resnet(1)
    data = _batches((16, 1, 8, 8))
    start = time.perf_counter()
    with pytest.warns(fxzip.MemoryWarning):
        merged = fxzip.merge(a, b, data, memory_gib=1e-6, progress=False)
    wall = time.perf_counter() - start
    seconds = merged.fxzip_report.seconds
    assert {"trace", "statistics", "matching", "corrections"} <= set(seconds)
    assert sum(seconds.values()) <= wall


def test_long_phases_show_progress_bars_and_none_without_progress(capfd):
    """With progress on, the statistics (numbered when the budget splits them into passes), the
    matching and the corrections each show a bar on stderr; with progress off nothing is
    written."""
    a, b = small_resnet(0), small_resnet(1)
    data = _batches((16, 1, 8, 8))
    fxzip.merge(a, b, data, progress=False)
    assert capfd.readouterr().err == ""
    fxzip.merge(a, b, data)
    err = capfd.readouterr().err
    assert "fxzip statistics" in err and "fxzip matching" in err and "fxzip corrections" in err
    assert "pass 1/" not in err  # one pass: not numbered
    with pytest.warns(fxzip.MemoryWarning):
        merged = fxzip.merge(a, b, data, memory_gib=1e-6)
    passes = merged.fxzip_report.memory["statistics_passes"]
    err = capfd.readouterr().err
    for i in range(1, passes + 1):
        assert f"fxzip statistics, pass {i}/{passes}" in err
        assert f"fxzip matching, pass {i}/{passes}" in err
