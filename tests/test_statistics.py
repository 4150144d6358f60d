"""The statistics pass: streamed moments equal the moments of all data at once; the lockstep graph
observes what the models compute; dead units fall back to their producers' outputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxzip
from fxzip.errors import InputError, NonFiniteError
from fxzip.passes import statistics
from fxzip.runtime import moments as runtime_moments
from fxzip.runtime.moments import Moments, SpaceStats, resolve_precision


def _columns(rng: np.random.Generator, widths: list[int], n: int, offset: float) -> list[torch.Tensor]:
    latent = rng.standard_normal((3, n))
    return [torch.tensor(rng.standard_normal((w, 3)) @ latent + rng.standard_normal((w, n))
                         + offset, dtype=torch.float32) for w in widths]


@pytest.mark.parametrize("offset", [0.0, 50.0])
@pytest.mark.parametrize("widths", [[4, 4], [3, 5, 2]])
def test_streamed_moments_equal_numpy(widths, offset):
    rng = np.random.default_rng(0)
    batches = [_columns(rng, widths, n, offset) for n in (37, 1, 64, 20)]
    moments = Moments(sum(widths), torch.device("cpu"))
    for cols in batches:
        moments.update(cols)
    data = np.concatenate([torch.cat(cols).double().numpy() for cols in batches], axis=1)
    corr, constant = moments.correlation()
    assert not constant.any()
    np.testing.assert_allclose(moments.mean.numpy(), data.mean(1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(corr, np.corrcoef(data), atol=2e-5)


def test_gram_in_many_row_blocks_equals_numpy(monkeypatch):
    """The upper triangle is accumulated block row by block row; blocks of 3 rows over 11
    features leave a ragged last block."""
    monkeypatch.setattr(runtime_moments, "GRAM_BLOCK_ROWS", 3)
    rng = np.random.default_rng(2)
    batches = [_columns(rng, [5, 6], n, 2.0) for n in (40, 9, 33)]
    moments = Moments(11, torch.device("cpu"))
    for cols in batches:
        moments.update(cols)
    data = np.concatenate([torch.cat(cols).double().numpy() for cols in batches], axis=1)
    np.testing.assert_allclose(moments.correlation()[0], np.corrcoef(data), atol=2e-5)


def test_row_subset_moments_equal_full_rows():
    rng = np.random.default_rng(1)
    batches = [_columns(rng, [5, 5], n, 1.0) for n in (30, 50, 7)]
    rows = [1, 6, 9]
    full, part = Moments(10, torch.device("cpu")), Moments(10, torch.device("cpu"), rows=rows)
    for cols in batches:
        full.update(cols)
        part.update(cols)
    np.testing.assert_allclose(part.correlation()[0], full.correlation()[0][rows], atol=1e-6)


def test_non_finite_batch_is_refused_with_the_node():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    broken = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        broken[0].bias[2] = float("inf")
    with pytest.raises(NonFiniteError, match="model 1 .*NaN/Inf"):
        fxzip.merge(model, broken, torch.randn(16, 4), progress=False)


def test_dead_units_take_their_correlation_from_the_producer():
    """A unit that ReLU kills on all data is constant where the next layer reads it; its
    correlations come from the Linear output before the ReLU (a second, partial pass)."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        a[0].bias[0] = -100.0  # unit 0 is dead after the ReLU
    perm = torch.tensor([3, 0, 5, 1, 4, 2])  # b's unit j is a's unit perm[j]
    b = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        b[0].weight.copy_(a[0].weight[perm])
        b[0].bias.copy_(a[0].bias[perm])
        b[2].weight.copy_(a[2].weight[:, perm])
        b[2].bias.copy_(a[2].bias)
    zipper = fxzip.Zipper([a, b], torch.randn(64, 4), progress=False)
    space = next(s for s in zipper.analysis.mergeable_spaces() if zipper.analysis.spaces[s].size == 6)
    stats: SpaceStats = zipper.statistics([space])[space]
    assert stats.fallback is not None and stats.fallback.rows.tolist() == [0, 6 + 1]
    corr = stats.correlation()
    assert corr[0, 6 + 1] == pytest.approx(1.0, abs=1e-6)  # the dead unit finds its twin
    merged = zipper.merge(None, method="permute", reset_bn=False)
    x = torch.randn(32, 4)
    out_a, out_b = merged(x)
    torch.testing.assert_close(out_a, a(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_b, b(x), rtol=1e-5, atol=1e-5)


def test_correlation_is_read_only_and_cached():
    torch.manual_seed(0)
    a, b = (nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)) for _ in range(2))
    zipper = fxzip.Zipper([a, b], torch.randn(32, 4), progress=False)
    space = zipper.analysis.mergeable_spaces()[0]
    stats = zipper.statistics([space])[space]
    assert stats.correlation() is stats.correlation()
    with pytest.raises(ValueError):
        stats.correlation()[0, 0] = 0.0


def test_too_few_calibration_samples_warn():
    torch.manual_seed(0)
    a, b = (nn.Sequential(nn.Linear(4, 40), nn.ReLU(), nn.Linear(40, 3)) for _ in range(2))
    with pytest.warns(fxzip.CalibrationWarning, match="fewer calibration samples"):
        fxzip.merge(a, b, torch.randn(16, 4), progress=False)  # 16 samples, 80 features
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxzip.CalibrationWarning)
        fxzip.merge(a, b, torch.randn(100, 4), progress=False)


def test_precision_option_is_checked():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("float32", cpu) == "float32"
    assert resolve_precision("auto", gpu) == "float32"
    assert resolve_precision("auto", cpu) in ("float32", "bfloat16")
    with pytest.raises(InputError, match="one of"):
        resolve_precision("half", cpu)
    with pytest.raises(InputError, match="for the CPU"):
        resolve_precision("bfloat16", gpu)


def test_bfloat16_products_match_float32_statistics():
    """bfloat16-rounded inputs with float32 accumulation: correlations within bfloat16's rounding
    noise of float32's, the same matching, and the global matmul setting restored (the models
    never run in it).

    oneDNN rounds each centred float32 input to nearest bfloat16 (relative error up to 2^-9) and
    accumulates in float32; its products equal that rounding done by hand, accumulated in float64,
    to 7e-8. The rounding errors are independent across samples, so a correlation over N samples
    moves by about 2.5e-3/sqrt(N) (rms over the entries; measured 2.5e-3/sqrt(N) here at N = 768
    to 49,152), the largest entry about 4-5 times that (1.2e-2/sqrt(N): 4.3e-4 at N = 768). A
    fixed bound such as 1e-4 only holds from N of about 15,000 on; these bounds scale with N."""
    torch.manual_seed(0)
    a, b = (nn.Sequential(nn.Linear(8, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(),
                          nn.Linear(48, 3)) for _ in range(2))
    x = [torch.randn(256, 8) * 3 + 1 for _ in range(3)]
    samples = sum(len(batch) for batch in x)
    before = torch.backends.mkldnn.matmul.fp32_precision
    zippers = {p: fxzip.Zipper([a, b], x, progress=False, statistics_precision=p)
               for p in ("float32", "bfloat16")}
    spaces = zippers["float32"].analysis.mergeable_spaces()
    differences = []
    for s in spaces:
        exact, rounded = (z.statistics([s])[s].correlation() for z in zippers.values())
        differences.append(np.abs(exact - rounded).max())
        assert differences[-1] < 3e-2 / np.sqrt(samples)  # 1.1e-3 for these 768 samples
        assert np.sqrt(np.mean((exact - rounded) ** 2)) < 5e-3 / np.sqrt(samples)  # 1.8e-4
        assert np.abs(exact).max() > 0.1  # the comparison is not of zeros
        for left, right in zip(*(z.match(s, "zipit", 0.5, 1.0).assign for z in zippers.values())):
            np.testing.assert_array_equal(left, right)
    assert torch.backends.mkldnn.matmul.fp32_precision == before
    if runtime_moments.cpu_has_fast_bfloat16():  # the rounding did happen
        assert max(differences) > 1e-8


def test_collect_reports_the_seconds_of_each_pass():
    """The timing hook the speed benchmark reads: the consumer-tap pass and the dead-unit pass."""
    torch.manual_seed(0)
    a, b = (nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)) for _ in range(2))
    with torch.no_grad():
        a[0].bias[0] = -100.0  # a dead unit: the second pass runs
    zipper = fxzip.Zipper([a, b], torch.randn(64, 4), progress=False)
    spaces = zipper.analysis.mergeable_spaces()
    timings: dict[str, float] = {}
    stats = statistics.collect(zipper.graphs, zipper.analysis, spaces, zipper.batches,
                               pairing=zipper.pairing, progress=False, timings=timings)
    assert set(timings) == {"consumer taps", "dead units"}
    assert all(seconds >= 0.0 for seconds in timings.values())
    assert any(stats[s].fallback is not None for s in spaces)


class _Residual(nn.Module):
    """A stream read by three blocks and the head: four taps of one space with taps="all"."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 16))
                                    for _ in range(3))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(torch.relu(h))


def test_taps_last_reads_a_stream_once_and_self_merges_exactly():
    """taps="last" reads each space only at its last consumer read (the stream after its last
    block), so the stream's statistics count one read's samples; a model merged with a permuted
    copy of itself is still exact; an unknown choice is an InputError."""
    from permute_util import permuted_by_analysis

    torch.manual_seed(0)
    a = _Residual().eval()
    x = torch.randn(64, 4)
    zippers = {t: fxzip.Zipper([a, _Residual().eval()], x, progress=False, taps=t)
               for t in ("all", "last")}
    analysis = zippers["all"].analysis
    stream = max(analysis.mergeable_spaces(), key=lambda s: len(analysis.spaces[s].taps))
    assert len(analysis.spaces[stream].taps) == 4
    counts = {t: z.statistics([stream])[stream].features.count for t, z in zippers.items()}
    assert counts == {"all": 4 * 64, "last": 64}
    b, _ = permuted_by_analysis(a, x, seed=3)
    merged = fxzip.merge(a, b, x, progress=False, taps="last", reset_bn=False)
    with torch.no_grad():
        out_a, out_b = merged(x)
        assert torch.allclose(out_a, a(x), atol=1e-5) and torch.allclose(out_b, b(x), atol=1e-5)
    with pytest.raises(InputError, match="taps must be one of"):
        fxzip.merge(a, b, x, progress=False, taps="some")


def test_moments_move_float32_products_after_a_number_of_products_or_samples(monkeypatch):
    """The float32 products stay in the buffer across calibration batches and move into the
    float64 sums once FLUSH_EVERY products or FLUSH_ROWS samples are in it, whichever first."""
    monkeypatch.setattr(Moments, "FLUSH_EVERY", 4)
    monkeypatch.setattr(Moments, "FLUSH_ROWS", 50)
    rng = np.random.default_rng(0)
    by_rows = Moments(5, torch.device("cpu"))
    held = []
    for _ in range(3):  # 20 samples each: the third reaches 60 >= 50
        by_rows.update(_columns(rng, [2, 3], 20, 0.0))
        held.append(by_rows._buffered)
    assert held == [1, 2, 0] and by_rows._m2 is not None
    by_count = Moments(5, torch.device("cpu"))
    held = []
    for _ in range(5):  # 3 samples each: the fourth product moves them
        by_count.update(_columns(rng, [2, 3], 3, 0.0))
        held.append(by_count._buffered)
    assert held == [1, 2, 3, 0, 1]


def test_moments_fold_buffered_products_and_pending_means_exactly(monkeypatch):
    """Products buffered in float32 for a few batches and batch means folded in groups (small
    FLUSH_EVERY / FLUSH_ROWS / MAX_PENDING here) give numpy's moments, away from zero mean too;
    reads in the middle of the stream settle what is pending and the stream goes on."""
    monkeypatch.setattr(Moments, "FLUSH_EVERY", 3)
    monkeypatch.setattr(Moments, "FLUSH_ROWS", 40)
    monkeypatch.setattr(Moments, "MAX_PENDING", 4)
    rng = np.random.default_rng(5)
    batches = [_columns(rng, [4, 3], n, 50.0) for n in (5, 12, 1, 30, 8, 17, 9, 40, 2, 11)]
    moments = Moments(7, torch.device("cpu"))
    for i, cols in enumerate(batches):
        moments.update(cols)
        if i == 5:
            seen = np.concatenate([torch.cat(c).double().numpy() for c in batches[:6]], axis=1)
            assert moments.count == seen.shape[1]
            np.testing.assert_allclose(moments.mean.numpy(), seen.mean(1), rtol=1e-6)  # float32 batch means
    data = np.concatenate([torch.cat(cols).double().numpy() for cols in batches], axis=1)
    assert moments.count == data.shape[1]
    np.testing.assert_allclose(moments.mean.numpy(), data.mean(1), rtol=1e-6)
    centred = data - data.mean(1, keepdims=True)
    np.testing.assert_allclose(torch.triu(moments.m2).numpy(), np.triu(centred @ centred.T),
                               rtol=2e-5, atol=1e-3)
    np.testing.assert_allclose(moments.correlation()[0], np.corrcoef(data), atol=2e-5)


class _ConvStream(nn.Module):
    """A convolutional stream read by three blocks and the pooled head: four taps of one space,
    three of them with 36 positions per image and the pooled one with 1."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(8, 12, 1), nn.ReLU(),
                                                  nn.Conv2d(12, 8, 3, padding=1))
                                    for _ in range(3))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h.mean((2, 3)))


def _stream_read_in_part(splits: list[int], **read) -> tuple[Moments, Moments]:
    """The moments of _ConvStream's stream read with the Zipper options `read` (a share of the
    positions) and read whole, after the checks every partial read must pass: the batching
    `splits` gives the same samples and moments (positions are chosen per image), the
    correlations estimate the whole read's, and a permuted self-merge read so is exact."""
    from permute_util import permuted_by_analysis

    torch.manual_seed(0)
    a, other = _ConvStream().eval(), _ConvStream().eval()
    x = torch.randn(48, 3, 6, 6)
    one = fxzip.Zipper([a, other], [x], progress=False, **read)
    analysis = one.analysis
    stream = max(analysis.mergeable_spaces(), key=lambda s: len(analysis.spaces[s].taps))
    assert len(analysis.spaces[stream].taps) == 4
    part = one.statistics([stream])[stream].features
    full = fxzip.Zipper([a, other], [x], progress=False).statistics([stream])[stream].features
    assert full.count == 48 * (3 * 36 + 1)
    split = fxzip.Zipper([a, other], list(x.split(splits)), progress=False, **read)
    moved = split.statistics([stream])[stream].features
    assert moved.count == part.count
    np.testing.assert_allclose(moved.mean.numpy(), part.mean.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(moved.correlation()[0], part.correlation()[0], atol=1e-5)
    difference = np.abs(part.correlation()[0] - full.correlation()[0])
    assert 0 < difference.max() < 0.2 and difference.mean() < 0.03
    b, _ = permuted_by_analysis(a, x[:8], seed=1)
    merged = fxzip.merge(a, b, x, progress=False, reset_bn=False, corrections=None, **read)
    with torch.no_grad():
        out_a, out_b = merged(x)
        assert torch.allclose(out_a, a(x), atol=1e-5) and torch.allclose(out_b, b(x), atol=1e-5)
    return part, full


def test_taps_spread_reads_a_share_of_positions_that_does_not_depend_on_batching():
    """taps="spread" reads a stream at every tap but each at about max(P)/sum(P) of its
    positions (here 36/(3·36 + 1): every 3rd position from an offset per image), so the stream's
    samples are about those of one read; which positions are kept depends on each image alone,
    so other batch sizes give the same samples and moments; the correlations estimate those of
    taps="all"; a model merged with a permuted copy of itself is still exact."""
    spread, full = _stream_read_in_part([7, 25, 16], taps="spread")
    assert abs(spread.count - full.count / 3) <= 48 * 2  # every 3rd position, the pooled 1/3


@pytest.mark.parametrize("expand", [1, 3])
@pytest.mark.parametrize("layout", ["tokens", "channels_last", "channels_first"])
def test_centring_a_tap_is_the_same_in_every_memory_layout(layout, expand):
    """A tap whose channels are innermost in memory (token features (B, N, C), channels-last
    images) is copied into the channel-major matrix by one 2-D transpose; the centred matrix and
    the mean equal those of the plain channels-first layout."""
    from fxzip.passes.analysis import Tap

    torch.manual_seed(3)
    if layout == "tokens":
        tensor, axis = torch.randn(4, 7, 6) * 3 + 1, 2
    else:
        tensor, axis = torch.randn(4, 6, 3, 5) * 3 + 1, 1
        if layout == "channels_last":
            tensor = tensor.contiguous(memory_format=torch.channels_last)
    if expand == 3:  # 2 features, each spread over 3 channels (as a flatten's positions)
        tensor = torch.cat([tensor, tensor.narrow(axis, 0, 3)], axis)  # 9 channels
    size = 4 if expand == 1 else 2
    tap = Tap("x", axis, 1, size, expand)  # channels 1..4 of 6, or 1..6 of 9
    view = statistics.tap_view(tensor, tap)
    assert (statistics.channels_innermost(view) is not None) == (layout != "channels_first")
    out = torch.empty(size, view[0].numel() * expand)
    mean = statistics.centre_into(view, tap, out)
    rows = tensor.movedim(axis, 0)[1:1 + size * expand].double()  # feature f: rows f·e..f·e+e-1
    reference = rows.reshape(size, -1)  # row-major: a feature's copies are its samples
    np.testing.assert_allclose(mean.numpy(), reference.mean(1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(out.numpy(), (reference - reference.mean(1, keepdim=True)).numpy(),
                               atol=1e-5)


def test_positions_read_a_share_of_each_images_positions():
    """positions=0.25 reads every 4th position of each image (an offset per image, from the
    image's own values) at every tap with positions, and the pooled tap (1 position) whole; the
    samples do not depend on the batching; the correlations estimate the full read's; a model
    merged with a permuted copy of itself is still exact; bad values are refused."""
    thinned, _ = _stream_read_in_part([5, 30, 13], positions=0.25)
    assert thinned.count == 48 * (3 * 9 + 1)  # 36 positions: exactly 9 per image and tap
    a = _ConvStream().eval()
    x = torch.randn(8, 3, 6, 6)
    for bad in (0, 0.0, 1.5, -0.25, True, "half", float("nan")):
        with pytest.raises(InputError, match="positions"):
            fxzip.merge(a, a, x, progress=False, positions=bad)


def test_spread_offsets_cover_every_position_evenly():
    """The per-sample keys lie in (-1, 1) (a fractional part keeps the sign); the offsets of
    spread and thinned reads come from them mapped into [0, 1), so every offset of a stride is
    about equally likely (clamping negative keys to 0 made offset 0 take half the samples)."""
    from fxzip.runtime.sampling import sample_keys, unit_keys

    keys = sample_keys(torch.randn(4000, 3, 4, 4, generator=torch.Generator().manual_seed(0)), 0)
    assert (keys < 0).any()
    unit = unit_keys(keys)
    assert 0 <= float(unit.min()) and float(unit.max()) < 1
    shares = torch.bincount((unit * 4).long(), minlength=4).double() / len(unit)
    assert torch.all((shares > 0.22) & (shares < 0.28)), shares
