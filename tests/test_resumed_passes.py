"""Statistics passes under a memory budget resume where an earlier pass saved the models' values
(`fxzip.passes.lockstep.Checkpoints`) instead of running them again from their inputs: the merge
must be bitwise that of one pass, with in-place ops after a saved value, attributes read after
it (a tied output embedding) and head groups."""
from __future__ import annotations

import pytest
import timm
import torch

import fxzip
import fxzip.zipper
from archs import BasicBlock, CNNSpec, ConvBlock, build
from benchmarks.common.decoders import build_decoder, random_tokens
from fxzip.passes.lockstep import Checkpoints, Lockstep, lockstep_module, plan_cuts
from permute_util import small_resnet

# every test forces passes with a ~zero budget: its MemoryWarning is expected
pytestmark = pytest.mark.filterwarnings("ignore::fxzip.MemoryWarning")

IN_PLACE = CNNSpec(hw=8, stem=8, blocks=(BasicBlock(8, add="add_", post="relu_"),
                                         BasicBlock(16, stride=2, act="relu_", add="+="),
                                         ConvBlock(16, act="relu_")), head="pool", classes=5)


def _batches(shape: tuple[int, ...], seed: int = 0, count: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(count)]


def _in_place(seed: int) -> torch.nn.Module:
    return build(IN_PLACE, seed)[0]


def _tiny_vit(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                             num_classes=5).eval()


CASES = {
    "resnet": (small_resnet, lambda: _batches((16, 1, 8, 8))),
    "in-place adds and ReLUs": (_in_place, lambda: _batches((8, 3, 8, 8))),
    "vit (head groups)": (_tiny_vit, lambda: _batches((8, 3, 32, 32))),
    "decoder (tied embedding)": (lambda seed: build_decoder("tiny", seed),
                                 lambda: list(random_tokens("tiny", 12).split(4))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resumed_passes_give_the_one_pass_merge(case, monkeypatch):
    """A ~zero budget gives every space a pass of its own; with room for the saved values (the
    budget's share for them raised) the later passes resume from them, and the merge (the
    paper's, so that the corrections' sample budget plays no part) is bitwise the one-pass one."""
    build_model, data = CASES[case]
    a, b = build_model(0), build_model(1)
    batches = data()
    kwargs = dict(corrections=None, progress=False, statistics_precision="float32")
    one = fxzip.merge(a, b, batches, memory_gib=None, **kwargs)
    monkeypatch.setattr(fxzip.zipper, "CHECKPOINT_SHARE", 1e5)  # 0.1 GiB of a 1e-6 GiB budget
    many = fxzip.merge(a, b, batches, memory_gib=1e-6, **kwargs)
    memory = many.fxzip_report.memory
    assert memory["statistics_passes"] >= 3
    # every batch of at least one pass, those of a pass all or none (all fit the limit)
    assert memory["resumed_batches"] >= len(batches)
    assert memory["resumed_batches"] % len(batches) == 0
    assert 0 < memory["checkpoint_gib"] < 0.1
    for key, value in one.state_dict().items():
        assert torch.equal(value, many.state_dict()[key]), key
    # the statistics themselves, not only the matchings they gave
    assert [s.mean_correlation for s in one.fxzip_report.spaces] == \
        [s.mean_correlation for s in many.fxzip_report.spaces]
    assert "batches resumed" in str(many.fxzip_report)


def test_values_over_the_limit_are_recomputed_from_the_inputs():
    """With room for no saved value every batch runs from its input: the same merge, nothing
    resumed."""
    a, b = small_resnet(0), small_resnet(1)
    batches = _batches((16, 1, 8, 8))
    kwargs = dict(corrections=None, progress=False)
    one = fxzip.merge(a, b, batches, memory_gib=None, **kwargs)
    many = fxzip.merge(a, b, batches, memory_gib=1e-6, **kwargs)
    assert many.fxzip_report.memory["statistics_passes"] >= 3
    assert many.fxzip_report.memory["resumed_batches"] == 0
    for key, value in one.state_dict().items():
        assert torch.equal(value, many.state_dict()[key]), key


def test_cuts_are_taken_where_fewest_values_are_alive():
    """In a decoder the cut before an MLP space's first tap is moved back to the residual stream
    between blocks: one (batch, tokens, hidden) tensor per model, not the MLP's wide ones."""
    a, b = build_decoder("tiny", 0), build_decoder("tiny", 1)
    zipper = fxzip.Zipper([a, b], list(random_tokens("tiny", 4).split(4)), progress=False)
    lockstep = Lockstep(zipper.graphs, zipper.pairing)
    names = [n.name for n in lockstep.node_lists[0]]
    first, down = names.index("layers_0_mlp_down_proj"), names.index("layers_1_mlp_down_proj")
    cut = plan_cuts(zipper.graphs, zipper.pairing, [first, down])[1]
    assert cut is not None and first <= cut < down
    frontier = [n.meta["tensor_meta"].shape for n in lockstep.frontier(0, cut)]
    assert frontier == [torch.Size([4, 16, 32])]  # the residual stream (hidden 32) alone
    assert lockstep.frontier_bytes(cut) < lockstep.frontier_bytes(down - 1)


def test_checkpoints_chain_the_passes_and_keep_only_what_later_ones_need():
    """Each pass saves the next pass's cut only (the passes form a chain, holding one or two
    frontiers at a time); values are dropped once no later pass resumes from them, and a batch
    over the limit is not saved."""
    saved = Checkpoints([None, 5, 5, 9], limit_bytes=2 * 4 * 8)
    assert saved.plan() == (None, [5])
    for position in (0, 1):
        saved.position = position
        saved(5, torch.zeros(8))
    saved.position = 2
    saved(5, torch.zeros(8))  # over the limit
    assert saved.skipped == 1 and saved.bytes == 64 and saved.peak_bytes == 64
    saved.finish_pass()
    assert saved.plan() == (5, [])  # the next pass resumes from the same cut
    first = saved.take(5, 0)
    assert first is not saved.saved[5][0]  # a copy: pass 2 resumes from cut 5 as well
    assert saved.take(5, 2) is None  # it was not saved: run from the input
    saved.finish_pass()
    assert saved.plan() == (5, [9])
    assert saved.take(5, 1) is saved.saved[5][1]  # the last pass to read it
    saved.finish_pass()
    assert saved.saved == {} and saved.bytes == 0  # cut 9 was never saved
    assert saved.plan() == (9, [])


def test_a_pass_runs_on_to_the_next_pass_cut():
    """A pass whose taps end before the next pass's cut runs the models on to that cut and saves
    the values there (the chain), so every later pass of a decoder resumes."""
    a, b = build_decoder("tiny", 0), build_decoder("tiny", 1)
    batches = list(random_tokens("tiny", 12).split(4))
    zipper = fxzip.Zipper([a, b], batches, progress=False)
    lockstep = Lockstep(zipper.graphs, zipper.pairing)
    names = [n.name for n in lockstep.node_lists[0]]
    starts = [names.index("layers_0_mlp_down_proj"), names.index("layers_1_mlp_down_proj")]
    cuts = plan_cuts(zipper.graphs, zipper.pairing, starts)
    saved = Checkpoints(cuts)
    resume, saves = saved.plan()
    assert resume is None and saves == [cuts[1]] and cuts[1] > starts[0]
    observer = torch.nn.Module()
    observer.taps = {names[starts[0]]: []}
    observer.forward = lambda name, *values: None
    module = lockstep_module(zipper.graphs, observer, zipper.pairing, saved, resume, saves)
    with torch.no_grad():
        module(batches[0])
    assert list(saved.saved) == [cuts[1]] and saved.saved[cuts[1]][0][0].shape == (4, 16, 32)


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_shuffling_loader_is_never_resumed(shuffle, monkeypatch):
    """Values saved for a batch are only reused where every read gives the same batches: a
    sequential DataLoader resumes, a shuffling one (another order each read) runs every pass
    from its inputs."""
    data = torch.utils.data.TensorDataset(torch.cat(_batches((16, 1, 8, 8))))
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=shuffle,
                                         collate_fn=lambda rows: torch.stack([r[0] for r in rows]))
    monkeypatch.setattr(fxzip.zipper, "CHECKPOINT_SHARE", 1e5)
    merged = fxzip.merge(small_resnet(0), small_resnet(1), loader, memory_gib=1e-6,
                         corrections=None, progress=False)
    assert merged.fxzip_report.memory["statistics_passes"] >= 3
    assert (merged.fxzip_report.memory["resumed_batches"] > 0) == (not shuffle)
