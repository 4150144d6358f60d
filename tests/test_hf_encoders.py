"""Hugging Face encoders and vision models through the torch.export front end: tiny
random-initialised models (`benchmarks.common.hf_families`) whose position ids come from integer
buffers (BERT, RoBERTa, ELECTRA: token-type ids gathered from one too; DistilBERT, CLIP's vision
tower), whose attention adds an interpolated relative position bias per head (BEiT) or folds
its heads into the batch axis for `torch.bmm` (DeBERTa-v2), or a CNN with layer scales
(ConvNeXt). Each merged with a PERMUTED copy of itself
(`fxzip.testing.permuted_copy`) must give the model's output back, zipped through every layer
but the output layers, the heads returning the model's own output type."""
import pytest
import torch

import fxzip
from permute_util import rel_err as relative_error

pytest.importorskip("transformers")
from benchmarks.common import hf_families  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::fxzip.CalibrationWarning")

FAMILIES = ["bert", "roberta", "electra", "distilbert", "clip_vision", "beit", "convnext",
            "deberta_v2"]
# CLIP's vision tower returns its residual stream (last_hidden_state): every layer writes to an
# output, so each model keeps them all unless the merge has one shared output
SHARED_OUTPUT = {"clip_vision"}


@pytest.mark.parametrize("family", FAMILIES)
def test_permuted_self_merge_gives_the_model_back(family):
    model, batch = hf_families.build(family), hf_families.batch(family)
    permuted, count = fxzip.testing.permuted_copy(model, batch, seed=1)
    with torch.no_grad():
        expected = model(**batch)
        ref = hf_families.logits(expected)
        assert count >= 3
        assert relative_error(hf_families.logits(permuted(**batch)), ref) < 1e-5
    shared = family in SHARED_OUTPUT
    merged = fxzip.merge(model, permuted, [batch], reset_bn=False, progress=False,
                         capture="export", shared_output=shared)
    report = merged.fxzip_report
    assert not report.barriers
    assert report.layers_zipped >= report.layers_total - (0 if shared else 2)
    with torch.no_grad():
        outs = [merged(**batch)] if shared else merged(**batch)
    assert len(outs) == (1 if shared else 2)
    for out in outs:
        assert type(out) is type(expected)  # the model's own ModelOutput
        assert relative_error(hf_families.logits(out), ref) < 1e-5
