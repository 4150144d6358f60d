"""Forward arguments beyond the input, models with several inputs (dict batches of keyword
arguments), and shape-propagation failures that name the op that failed."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxzip
from fxzip.graph.capture import trace
from permute_util import permuted_by_analysis

VOCAB, TOKENS = 11, 6


class MaskedClassifier(nn.Module):
    """Token ids and a padding mask: one-hot tokens, an MLP per token, a masked mean, a head."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(VOCAB, 16), nn.Linear(16, 12), nn.Linear(12, 3)

    def forward(self, input_ids, attention_mask):
        h = F.relu(self.fc1(F.one_hot(input_ids, VOCAB).float()))
        h = F.gelu(self.fc2(h)) * attention_mask.unsqueeze(-1)
        pooled = h.sum(1) / attention_mask.sum(1, keepdim=True).clamp_min(1)
        return self.head(pooled)


class Scaled(nn.Module):
    """A second tensor input that scales the hidden features."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 16), nn.Linear(16, 3)

    def forward(self, x, scale):
        return self.fc2(torch.relu(self.fc1(x)) * scale)


class OptionalMask(nn.Module):
    """`forward(x, mask=None, temperature=1.0)`: the optional arguments are fixed to their
    defaults when tracing (the `if` would otherwise fail on a traced value)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 16), nn.Linear(16, 3)

    def forward(self, x, mask=None, temperature=1.0):
        h = torch.relu(self.fc1(x))
        if mask is not None:
            h = h * mask
        return self.fc2(h) / temperature


def _tokens(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, TOKENS), generator=g)
    mask = (torch.rand(n, TOKENS, generator=g) > 0.3).float()
    mask[:, 0] = 1.0
    return {"input_ids": ids, "attention_mask": mask}


def _merges_permuted_copy_exactly(model, batch, layers):
    torch.manual_seed(0)
    model.eval()
    analysis = fxzip.analyze(model, batch)
    assert not analysis.barriers, analysis.barriers
    assert len(analysis.stop_points) >= layers
    permuted, count = permuted_by_analysis(model, batch, seed=1)
    assert count >= 1
    call = (lambda m: m(**batch)) if isinstance(batch, dict) else (lambda m: m(batch))
    with torch.no_grad():
        ref = call(model)
        assert not torch.allclose(permuted.fc1.weight, model.fc1.weight)
        torch.testing.assert_close(call(permuted), ref, rtol=1e-5, atol=1e-6)
    merged = fxzip.merge(model, permuted, [batch, batch], reset_bn=False, progress=False)
    with torch.no_grad():
        outs = call(merged)
    assert len(outs) == 2
    for out in outs:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    return merged


def test_dict_batches_feed_forward_by_name():
    torch.manual_seed(0)
    merged = _merges_permuted_copy_exactly(MaskedClassifier(), _tokens(), 2)
    params = [n.target for n in merged.graph.nodes if n.op == "placeholder"]
    assert params == ["input_ids", "attention_mask"]  # the merged model takes the same keywords


def test_a_second_tensor_input_by_name():
    torch.manual_seed(0)
    batch = {"x": torch.randn(32, 4), "scale": torch.rand(32, 1) + 0.5}
    _merges_permuted_copy_exactly(Scaled(), batch, 1)


def test_dict_batches_in_tuples_and_dataloaders():
    torch.manual_seed(0)
    a, b = MaskedClassifier().eval(), MaskedClassifier().eval()
    batches = [(_tokens(8, seed), torch.zeros(8)) for seed in range(3)]  # (inputs, labels)
    merged = fxzip.merge(a, b, batches, progress=False)
    with torch.no_grad():
        out_a, out_b = merged(**_tokens(5, 9))
    assert out_a.shape == out_b.shape == (5, 3)


def test_optional_forward_arguments_are_fixed_to_their_defaults():
    torch.manual_seed(0)
    x = torch.randn(32, 4)
    merged = _merges_permuted_copy_exactly(OptionalMask(), x, 1)
    params = [n.target for n in merged.graph.nodes if n.op == "placeholder"]
    assert params == ["x", "mask", "temperature"]
    with pytest.raises(Exception, match="mask"):  # the traced model holds mask=None fixed
        merged(x, mask=torch.ones(32, 16))


def test_a_required_second_input_asks_for_dict_batches():
    with pytest.raises(fxzip.InputError, match="'scale'.*dicts of forward's keyword arguments"):
        fxzip.analyze(Scaled(), torch.randn(8, 4))


def test_unknown_keywords_are_named():
    with pytest.raises(fxzip.InputError, match=r"\['bias'\]"):
        fxzip.analyze(Scaled(), {"x": torch.randn(8, 4), "bias": torch.randn(8, 1)})


def test_dict_batches_must_share_keys_and_shapes():
    batches = [_tokens(8), {"input_ids": torch.zeros(8, TOKENS, dtype=torch.long)}]
    with pytest.raises(fxzip.InputError, match="batch 1"):
        fxzip.merge(MaskedClassifier(), MaskedClassifier(), batches, progress=False)


class FailsInside(nn.Module):
    """Runs on the input, then a reshape that cannot hold (the op, not the input, is wrong)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)

    def forward(self, x):
        return self.fc(x).view(-1, 4)


def test_a_failing_op_is_named_and_no_traceback_is_printed(capfd):
    with pytest.raises(fxzip.TraceError, match=r"node 'view' \(call_method view\)") as info:
        trace(FailsInside(), torch.randn(5, 4))
    assert "the input" not in str(info.value).split("failed at")[1]
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


def test_a_wrong_input_shape_is_blamed_on_the_input(capfd):
    with pytest.raises(fxzip.InputError, match=r"shape \(5, 7\).*node 'fc' \(call_module fc: Linear\)"):
        trace(FailsInside(), torch.randn(5, 7))
    assert capfd.readouterr().err == ""
