"""Decoders whose weights are laid out in less common ways, through both front ends:

* GPT-2's `Conv1D` (a Linear whose weight is stored (in, out), exported as `addmm(bias, x, W)`):
  W's rows read the input space (U), its columns and the bias open the output space (M); its
  fused `c_attn` output is split into q, k and v;
* tied input and output embeddings (OPT, StarCoder2, Gemma, GPT-2): one table is the first layer
  (its columns open the residual space, M) and the output layer (its columns read it, U; its
  rows open the vocabulary). The merged model unties it: the embedding holds the merged table,
  the output layer (a head, per model) its own copy — or, where the output layer is zipped too,
  its own merged table;
* Phi-3's grouped-query attention over a fused `qkv_proj` sliced into q (4 heads), k and v
  (2 heads each), with a rotary embedding that cats an empty pass-through slice to head_dim.

Each is merged with a PERMUTED copy of itself (`fxzip.testing.permuted_copy`) and must give the
model's outputs back; plain-torch models traced by torch.fx check the same rules there."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxzip
from permute_util import rel_err as relative_error

pytestmark = pytest.mark.filterwarnings("ignore::fxzip.CalibrationWarning")


# ---------------------------------------------------------------------------------------------
# transformers decoders (torch.export)
# ---------------------------------------------------------------------------------------------

def _family(name: str):
    pytest.importorskip("transformers")
    from benchmarks.common import hf_families

    return hf_families, hf_families.build(name), hf_families.batch(name)


@pytest.mark.parametrize("family", ["gpt2", "opt", "starcoder2", "gemma", "phi3"])
def test_decoder_merges_its_permuted_copy_exactly(family):
    """No barrier, every layer but the output layer zipped, the model's own output type."""
    hf, model, batch = _family(family)
    permuted, count = fxzip.testing.permuted_copy(model, batch, seed=1)
    with torch.no_grad():
        ref = hf.logits(model(**batch))
        assert count >= 3
        assert relative_error(hf.logits(permuted(**batch)), ref) < 1e-5
    merged = fxzip.merge(model, permuted, [batch], reset_bn=False, capture="export",
                         progress=False)
    report = merged.fxzip_report
    assert not report.barriers
    assert report.layers_zipped == report.layers_total - 1
    with torch.no_grad():
        outs = merged(**batch)
    assert len(outs) == 2
    for out in outs:
        assert type(out) is type(model(**batch))
        assert relative_error(hf.logits(out), ref) < 1e-5


def test_gpt2_conv1d_is_a_layer_with_its_weight_transposed():
    """addmm(bias, x, W): W's axis 0 reads (U), axis 1 and the bias open (M); c_attn's output
    is opened as three spaces where `split` cuts it into q, k and v."""
    hf, model, batch = _family("gpt2")
    analysis = fxzip.analyze(model, batch, capture="export")
    assert not analysis.barriers
    uses = {(u.axis, u.role) for u in analysis.param_uses["transformer.h.0.mlp.c_fc.weight"]}
    assert uses == {(0, "U"), (1, "M")}
    c_attn = next(n for n in analysis.nodes if n.target is torch.addmm
                  and n.args[2].target == "transformer.h.0.attn.c_attn.weight")
    assert len(analysis.feat(c_attn.name).blocks) == 3
    assert sum(1 for n in analysis.all_layers if n.startswith("addmm")) == 8


def test_tied_table_becomes_two_tensors():
    """One table, two uses: the embedding's merged columns (M) in the trunk, the output layer's
    columns (U) and rows (M, the vocabulary) in each model's head, a copy of its own table."""
    hf, model, batch = _family("opt")
    analysis = fxzip.analyze(model, batch, capture="export")
    embedding = analysis.param_uses["model.decoder.embed_tokens.weight"]
    # the output layer is a call of the model's own nn.Linear (graph/module_calls.py)
    output = [u for u in analysis.param_uses["lm_head"] if u.param == "weight"]
    assert [(u.axis, u.role) for u in embedding] == [(1, "M")]
    assert {(u.axis, u.role) for u in output} == {(0, "M"), (1, "U")}
    assert embedding[0].feat.blocks[0].space == \
        next(u for u in output if u.axis == 1).feat.blocks[0].space  # the residual space
    permuted, _ = fxzip.testing.permuted_copy(model, batch, seed=1)
    merged = fxzip.merge(model, permuted, [batch], reset_bn=False, capture="export",
                         progress=False)
    state = merged.state_dict()
    heads = [k for k in state if k.endswith("lm_head.weight")]
    assert len(heads) == 2 and "model.decoder.embed_tokens.weight" in state
    torch.testing.assert_close(state[heads[0]], model.lm_head.weight)
    torch.testing.assert_close(state[heads[1]], permuted.lm_head.weight)
    assert state[heads[1]].data_ptr() != state["model.decoder.embed_tokens.weight"].data_ptr()


@pytest.mark.parametrize("family,stop_at", [("gpt2", "transformer.h.0"), ("gpt2", 3),
                                            ("opt", "model.decoder.layers.1"),
                                            ("phi3", "model.layers.0"), ("gemma", "last")])
def test_stop_points_inside_the_trunk_are_exact(family, stop_at):
    """Stop points in the trunk (a block, a number of layers) and past the output layer ("last":
    the output layer zipped too, its tied table merged as its own tensor)."""
    hf, model, batch = _family(family)
    if stop_at == "last":
        stop_at = fxzip.analyze(model, batch, capture="export").all_layers[-1]
    permuted, _ = fxzip.testing.permuted_copy(model, batch, seed=1)
    merged = fxzip.merge(model, permuted, [batch], stop_at=stop_at, reset_bn=False,
                         capture="export", progress=False)
    with torch.no_grad():
        ref = hf.logits(model(**batch))
        for out in merged(**batch):
            assert relative_error(hf.logits(out), ref) < 1e-5


# ---------------------------------------------------------------------------------------------
# plain torch (torch.fx)
# ---------------------------------------------------------------------------------------------

class TiedLM(nn.Module):
    """Embedding, a residual MLP, an output layer tied to the embedding: by a module whose weight
    is the embedding's ("module"), by `F.linear(h, self.embed.weight)` ("functional"), or one
    plain parameter read by `F.embedding` and `F.linear` ("parameter")."""

    def __init__(self, tie: str, vocab: int = 40, dim: int = 16, hidden: int = 32):
        super().__init__()
        self.tie = tie
        if tie == "parameter":
            self.table = nn.Parameter(torch.randn(vocab, dim))
        else:
            self.embed = nn.Embedding(vocab, dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        if tie == "module":
            self.out = nn.Linear(dim, vocab, bias=False)
            self.out.weight = self.embed.weight

    def forward(self, ids):
        h = F.embedding(ids, self.table) if self.tie == "parameter" else self.embed(ids)
        h = torch.relu(h + self.fc2(torch.relu(self.fc1(h))))
        if self.tie == "module":
            return self.out(h)
        return F.linear(h, self.table if self.tie == "parameter" else self.embed.weight)


def _ids() -> torch.Tensor:
    return torch.randint(0, 40, (64, 8), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("tie", ["module", "functional"])
def test_tied_output_layer_merges_exactly_at_every_stop_point(tie):
    torch.manual_seed(0)
    model, ids = TiedLM(tie).eval(), _ids()
    analysis = fxzip.analyze(model, ids)
    assert not analysis.barriers
    permuted, count = fxzip.testing.permuted_copy(model, ids, seed=1)
    with torch.no_grad():
        ref = model(ids)
        torch.testing.assert_close(permuted(ids), ref)
    for stop_at in (None, 1, 2, "fc2", analysis.all_layers[-1]):
        merged = fxzip.merge(model, permuted, ids, stop_at=stop_at, reset_bn=False,
                             progress=False)
        with torch.no_grad():
            for out in merged(ids):
                assert relative_error(out, ref) < 1e-5, stop_at


@pytest.mark.parametrize("tie", ["module", "functional"])
def test_zipped_tied_output_layer_gets_its_own_merged_table(tie):
    """Full width keeps every feature apart: the merge is the two models, the output layer
    zipped too. The embedding's table is merged by averaging its columns (M) and the output
    layer's by summing them (U) and averaging its rows: one tensor for both gives twice the
    logits (or the wrong width)."""
    torch.manual_seed(0)
    a, ids = TiedLM(tie).eval(), _ids()
    torch.manual_seed(1)
    b = TiedLM(tie).eval()
    last = fxzip.analyze(a, ids).all_layers[-1]
    merged = fxzip.merge(a, b, ids, stop_at=last, width=2, reset_bn=False, corrections=None,
                         progress=False)
    with torch.no_grad():
        out_a, out_b = merged(ids)
        assert relative_error(out_a, a(ids)) < 1e-5 and relative_error(out_b, b(ids)) < 1e-5


def test_one_parameter_read_in_opposite_roles_is_a_barrier():
    """One tensor cannot be merged as an embedding (M) and as an output layer (U): the output
    layer stays per model (a barrier that says why), and the merge is exact."""
    torch.manual_seed(0)
    model, ids = TiedLM("parameter").eval(), _ids()
    analysis = fxzip.analyze(model, ids)
    assert len(analysis.barriers) == 1 and "merged both ways" in analysis.barriers[0].reason
    permuted, _ = fxzip.testing.permuted_copy(model, ids, seed=1)
    merged = fxzip.merge(model, permuted, ids, reset_bn=False, progress=False)
    with torch.no_grad():
        ref = model(ids)
        for out in merged(ids):
            assert relative_error(out, ref) < 1e-5


class Conv1D(nn.Module):
    """transformers' Conv1D: a Linear whose weight is stored (in, out)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * n_in ** -0.5)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x):
        shape = x.shape[:-1] + (self.weight.shape[1],)
        return torch.addmm(self.bias, x.view(-1, x.shape[-1]), self.weight).view(shape)


class Conv1DBlock(nn.Module):
    """A fused Conv1D split into a gate and a value, then a Conv1D back (GPT-2's layers)."""

    def __init__(self, dim: int = 16, hidden: int = 24):
        super().__init__()
        self.hidden = hidden
        self.fused, self.proj = Conv1D(dim, 2 * hidden), Conv1D(hidden, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        gate, value = self.fused(x).split(self.hidden, dim=-1)
        h = x + self.proj(F.gelu(gate) * torch.tanh(value))
        return self.head(h)


def test_addmm_with_a_parameter_is_a_layer_under_torch_fx():
    torch.manual_seed(0)
    model = Conv1DBlock().eval()
    x = torch.randn(32, 6, 16)
    analysis = fxzip.analyze(model, x)
    assert not analysis.barriers
    assert len(analysis.all_layers) == 3
    permuted, count = fxzip.testing.permuted_copy(model, x, seed=1)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(permuted(x), ref)
        assert not torch.allclose(permuted.fused.weight, model.fused.weight)
    for stop_at in (None, 1, 2):
        merged = fxzip.merge(model, permuted, x, stop_at=stop_at, reset_bn=False,
                             progress=False)
        with torch.no_grad():
            for out in merged(x):
                assert relative_error(out, ref) < 1e-5, stop_at


class FeatureProduct(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)
        self.bias = nn.Parameter(torch.zeros(8))

    def forward(self, x):
        return torch.addmm(self.bias, self.fc1(x), self.fc2(x))


def test_addmm_of_two_feature_tensors_is_a_barrier():
    """A product of two models' features is no layer: a barrier that says so."""
    analysis = fxzip.analyze(FeatureProduct().eval(), torch.randn(8, 8))
    assert len(analysis.barriers) == 1 and "not a parameter" in analysis.barriers[0].reason


def test_cat_of_an_empty_part_keeps_the_layout():
    """Concatenating an empty tensor adds no channel (Phi-3's rotary embedding): the result is
    the other part's layout, attention heads and all."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 12), nn.Linear(12, 3)

        def forward(self, x):
            B, N, _ = x.shape
            h = self.fc1(x).view(B, N, 3, 4).transpose(1, 2)  # 3 heads of 4
            h = torch.cat([torch.tanh(h), h[..., 4:]], dim=-1)  # nothing passes through
            return self.fc2(h.transpose(1, 2).reshape(B, N, 12))

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(16, 5, 8)
    analysis = fxzip.analyze(model, x)
    assert not analysis.barriers
    assert analysis.feat("cat").headed
    permuted, _ = fxzip.testing.permuted_copy(model, x, seed=1)
    merged = fxzip.merge(model, permuted, x, reset_bn=False, progress=False)
    with torch.no_grad():
        for out in merged(x):
            assert relative_error(out, model(x)) < 1e-5
