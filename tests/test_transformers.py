"""Hugging Face `transformers` models through the torch.export front end (`capture="export"`, and
`"auto"` where symbolic tracing fails): tiny random-initialised models of several families
(`benchmarks.common.hf_families`), each merged with a PERMUTED copy of itself
(`fxzip.testing.permuted_copy`: every hidden space the analysis finds permuted, attention heads as
wholes) must give the model's outputs back, zipped through every layer but the output layers,
with the heads returning the model's own output type."""
import copy

import pytest
import torch

import fxzip
from permute_util import rel_err as relative_error

pytest.importorskip("transformers")
from benchmarks.common import hf_families  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::fxzip.CalibrationWarning")

# one family per kind: decoders with RMSNorm, rotary embeddings and grouped-query attention (q/k
# norms in qwen3), a vision transformer, a decoder with LayerNorm and a fused qkv projection, a
# CNN (which symbolic tracing takes, so "auto" keeps torch.fx for it)
FAST = {"llama": "export", "qwen3": "export", "vit": "export", "gpt_neox": "export",
        "resnet": "fx"}


@pytest.mark.parametrize("family", FAST)
def test_permuted_self_merge_gives_the_model_back(family):
    """capture="auto": torch.fx where it traces, torch.export where it does not."""
    model, batch = hf_families.build(family), hf_families.batch(family)
    permuted, count = fxzip.testing.permuted_copy(model, batch, seed=1)
    with torch.no_grad():
        ref = hf_families.logits(model(**batch))
        assert count >= 3
        assert relative_error(hf_families.logits(permuted(**batch)), ref) < 1e-5
        assert relative_error(hf_families.logits(copy.deepcopy(model).train(False)(**batch)),
                              ref) == 0.0
    merged = fxzip.merge(model, permuted, [batch], reset_bn=False, progress=False)
    report = merged.fxzip_report
    assert report.settings["capture"] == FAST[family]
    assert report.layers_zipped >= report.layers_total - 2 and not report.barriers
    with torch.no_grad():
        outs = merged(**batch)
        smaller = merged(**{k: v[:3] for k, v in batch.items()})  # any batch size
    assert len(outs) == 2
    for out, few in zip(outs, smaller):
        assert type(out) is type(model(**batch))  # the model's own ModelOutput
        assert relative_error(hf_families.logits(out), ref) < 1e-5
        assert relative_error(hf_families.logits(few), ref[:3]) < 1e-5


def test_two_different_models_merge_into_one_that_runs():
    """Two initialisations of a decoder: a full zip of every layer but the output layer, half
    the trunk's parameters, finite outputs of each model's type."""
    a, b = hf_families.build("llama", seed=0), hf_families.build("llama", seed=1)
    batches = [hf_families.batch("llama", seed=s) for s in range(3)]
    merged = fxzip.merge(a, b, batches, progress=False)
    report = merged.fxzip_report
    assert report.layers_zipped == report.layers_total - 1
    assert report.costs["parameters"] < 0.75 * report.costs["ensemble_parameters"]
    with torch.no_grad():
        outs = merged(**batches[0])
    assert all(torch.isfinite(o.logits).all() for o in outs)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_merged_models_take_sequences_of_any_length(family):
    """Token sequences of other lengths than the calibration's (the length axis exported as
    dynamic and checked): a permuted self-merge gives the model back at lengths 5 and 20."""
    model = hf_families.build(family)
    batches = [hf_families.batch(family, seed=0), hf_families.batch(family, seed=2)]
    copy, _ = fxzip.testing.permuted_copy(model, batches[0], seed=1)
    short = {k: v[:, :5] for k, v in hf_families.batch(family, seed=1).items()}
    merged = fxzip.merge(model, copy, batches, reset_bn=False, progress=False)
    generator = torch.Generator().manual_seed(3)
    long = {"input_ids": torch.randint(3, hf_families.VOCAB, (2, 20), generator=generator),
            "attention_mask": torch.ones(2, 20, dtype=torch.long)}
    for batch in (short, long):
        with torch.no_grad():
            want = hf_families.logits(model(**batch))
            outs = merged(**batch)
        assert all(relative_error(hf_families.logits(o), want) < 1e-5 for o in outs)


def test_capture_can_be_forced_and_is_reported():
    model, batch = hf_families.build("resnet"), hf_families.batch("resnet")
    with pytest.raises(fxzip.InputError, match="capture must be one of"):
        fxzip.merge(model, copy.deepcopy(model), [batch], capture="dynamo", progress=False)
    with pytest.raises(fxzip.TraceError):
        fxzip.analyze(hf_families.build("llama"), hf_families.batch("llama"), capture="fx")
    analysis = fxzip.analyze(model, batch, capture="export")
    assert not analysis.barriers and analysis.all_layers


def test_stop_points_are_named_by_module_path():
    """An exported graph's nodes are named after ATen ops; `stop_at` takes the module paths
    people know, and a typo gets the closest one."""
    model, batch = hf_families.build("llama"), hf_families.batch("llama")
    analysis = fxzip.analyze(model, batch)
    assert "model.layers.0" in analysis.stop_modules()
    assert "model.layers.0.mlp.down_proj" in analysis.stop_modules()
    merged = fxzip.merge(model, copy.deepcopy(model), [batch], stop_at="model.layers.0",
                         corrections=None, progress=False)
    assert merged.fxzip_report.layers_zipped == 8  # the embedding and the first layer's seven
    with pytest.raises(fxzip.StopPointError, match="did you mean 'model.layers.0'"):
        fxzip.merge(model, copy.deepcopy(model), [batch], stop_at="model.layer.0",
                    progress=False)
