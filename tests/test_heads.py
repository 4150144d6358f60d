"""Models that share a trunk but differ past it (issue 11): other class counts, other head
structures, other wrappers and names (a segmentation model with a classifier), N models, and a
model added to a merge. Every head is its own model's graph reading its own unmerged features."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fxzip

pytestmark = pytest.mark.filterwarnings("ignore::fxzip.errors.CalibrationWarning")

X = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))


class SmallCNN(nn.Module):
    """conv-bn-relu ×2, pooled; a Linear head of `classes`, or a 2-layer MLP head."""

    def __init__(self, classes: int = 3, mlp: bool = False, widths=(6, 8), seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        c1, c2 = widths
        self.conv1, self.bn1 = nn.Conv2d(3, c1, 3, padding=1), nn.BatchNorm2d(c1)
        self.conv2, self.bn2 = nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = (nn.Sequential(nn.Linear(c2, 5), nn.ReLU(), nn.Linear(5, classes)) if mlp
                     else nn.Linear(c2, classes))
        for bn in (self.bn1, self.bn2):  # non-trivial BatchNorm state
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.2, 0.2)
        self.eval()

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(self.pool(x).flatten(1))


def permuted_trunk(model: SmallCNN, seed: int, head: nn.Module | None = None) -> SmallCNN:
    """A copy of `model` whose trunk's hidden units are permuted (the same trunk function) and
    whose head is `head` (the model's own head, permuted to match, if None)."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    p1 = torch.randperm(other.conv1.out_channels, generator=g)
    p2 = torch.randperm(other.conv2.out_channels, generator=g)
    with torch.no_grad():
        for conv, bn, p in ((other.conv1, other.bn1, p1), (other.conv2, other.bn2, p2)):
            conv.weight.copy_(conv.weight[p])
            conv.bias.copy_(conv.bias[p])
            for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                t.copy_(t[p])
        other.conv2.weight.copy_(other.conv2.weight[:, p1])
        first = other.head[0] if isinstance(other.head, nn.Sequential) else other.head
        first.weight.copy_(first.weight[:, p2])
    if head is not None:
        other.head = head.eval()
    return other


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> bool:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item() < tol


def merge(models, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("reset_bn", False)
    return fxzip.merge_all(models, X, **kw)


# -- different class counts ------------------------------------------------------------------

def test_torchvision_resnets_with_different_class_counts():
    from torchvision.models import resnet18
    torch.manual_seed(0)
    a, b = resnet18(num_classes=5).eval(), resnet18(num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    out_a, out_b = fxzip.merge(a, b, x, progress=False)(x)
    assert out_a.shape == (2, 5) and out_b.shape == (2, 7)
    out_a, out_b = fxzip.merge(a, b, x, stop_at=0, reset_bn=False, progress=False)(x)
    assert torch.allclose(out_a, a(x), atol=1e-6) and torch.allclose(out_b, b(x), atol=1e-6)


def test_two_class_counts_exact_on_a_permuted_trunk():
    a = SmallCNN(classes=3)
    b = permuted_trunk(a, seed=1, head=nn.Linear(8, 5))
    merged = merge([a, b])  # stop_at=None: every layer but the output layers
    out_a, out_b = merged(X)
    assert out_a.shape == (16, 3) and out_b.shape == (16, 5)
    assert close(out_a, a(X)) and close(out_b, b(X))
    assert merged.fxzip_report.layers_zipped == 2


def test_four_models_four_heads():
    a = SmallCNN(classes=2)
    models = [a] + [permuted_trunk(a, seed=s, head=nn.Linear(8, c))
                    for s, c in ((1, 2), (2, 3), (3, 3))]
    outs = merge(models, stop_at="pool", method="permute")(X)
    assert [o.shape[1] for o in outs] == [2, 2, 3, 3]
    for out, model in zip(outs, models):
        assert close(out, model(X))


def test_four_independent_models_with_different_class_counts_run():
    models = [SmallCNN(classes=c, seed=s) for s, c in enumerate((2, 2, 3, 3))]
    outs = merge(models, reset_bn=True)(X)
    assert [tuple(o.shape) for o in outs] == [(16, 2), (16, 2), (16, 3), (16, 3)]


# -- different head structures ---------------------------------------------------------------

@pytest.mark.parametrize("mlp_first", [False, True])
def test_mlp_head_beside_a_linear_head(mlp_first):
    a = SmallCNN(classes=3, mlp=mlp_first)
    head = nn.Linear(8, 4) if mlp_first else nn.Sequential(nn.Linear(8, 5), nn.ReLU(),
                                                           nn.Linear(5, 4))
    b = permuted_trunk(a, seed=2, head=head)
    merged = merge([a, b], stop_at="pool")
    out_a, out_b = merged(X)
    assert close(out_a, a(X)) and close(out_b, b(X))
    heads = {n.target for n in merged.graph.nodes if n.op == "call_module"
             and str(n.target).startswith("heads.")}
    assert ("heads.1.head.2" in heads) != mlp_first and ("heads.0.head.2" in heads) == mlp_first


def test_none_with_a_linear_head_first_zips_up_to_the_heads():
    a = SmallCNN(classes=3)
    b = permuted_trunk(a, seed=2, head=nn.Sequential(nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 4)))
    out_a, out_b = merge([a, b])(X)
    assert close(out_a, a(X)) and close(out_b, b(X))


def test_mlp_head_first_with_none_names_the_difference_and_the_stop_point():
    a = SmallCNN(classes=3, mlp=True)
    b = SmallCNN(classes=3, seed=1)
    with pytest.raises(fxzip.ArchitectureMismatchError) as err:
        merge([a, b])
    message = str(err.value)
    assert "node 'head_0'" in message and "stop_at='flatten'" in message


# -- a difference inside the trunk -----------------------------------------------------------

def test_mismatch_inside_the_trunk_names_the_node_and_the_stop_point_that_avoids_it():
    a, b = SmallCNN(widths=(6, 8)), SmallCNN(widths=(6, 9), seed=1)
    with pytest.raises(fxzip.ArchitectureMismatchError, match="differ at node 'conv2'") as err:
        merge([a, b], stop_at="bn2")
    message = str(err.value)
    assert "model 1's node 'conv2'" in message and "stop_at='relu'" in message
    out_a, out_b = merge([a, b], stop_at="relu")(X)  # the stop point it suggests works
    assert out_b.shape == (16, 3)


def test_every_head_reads_its_own_features():
    """Three models, three different permutations: a head fed another model's unmerged features
    (or the merged ones) would be far off. (Matched by `permute`: ZipIt!'s greedy with alpha=0.5
    need not put three copies of one feature into one cluster.)"""
    a = SmallCNN(classes=3)
    b, c = permuted_trunk(a, seed=5), permuted_trunk(a, seed=6)
    for stop in ("relu", "relu_1", "pool", None):
        outs = merge([a, b, c], stop_at=stop, method="permute")(X)
        assert all(close(o, a(X)) for o in outs), stop


# -- one trunk under other wrappers and names: DeepLabV3's backbone and a ResNet-50 ----------

SEG_X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))


def _deeplab_and_resnet(shared: bool):
    from torchvision.models import resnet50
    from torchvision.models.segmentation import deeplabv3_resnet50
    torch.manual_seed(0)
    seg = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=4).eval()
    cls = resnet50(weights=None, num_classes=10).eval()
    if shared:
        seg.backbone.load_state_dict({k: v for k, v in cls.state_dict().items()
                                      if not k.startswith("fc.")})
    return seg, cls


def test_segmentation_and_classifier_sharing_a_backbone_merge_exactly():
    seg, cls = _deeplab_and_resnet(shared=True)
    zipper = fxzip.Zipper([seg, cls], SEG_X, progress=False)
    out_seg, out_cls = zipper.merge("backbone.layer2", reset_bn=False)(SEG_X)
    assert isinstance(out_seg, dict) and set(out_seg) == {"out"}
    assert close(out_seg["out"], seg(SEG_X)["out"]) and close(out_cls, cls(SEG_X))
    # where the structures part (layer3 is dilated in DeepLab), both nodes are named, and the
    # last stop point both share
    with pytest.raises(fxzip.ArchitectureMismatchError) as err:
        zipper.merge("backbone.layer3")
    message = str(err.value)
    assert "'backbone_layer3_0_conv2'" in message and "model 1's node 'layer3_0_conv2'" in message
    assert "stop_at='backbone.layer2'" in message


def test_independent_segmentation_and_classifier_run_with_their_own_outputs():
    seg, cls = _deeplab_and_resnet(shared=False)
    out_cls, out_seg = fxzip.merge(cls, seg, SEG_X, stop_at="layer2", progress=False)(SEG_X)
    assert out_cls.shape == (2, 10)
    assert isinstance(out_seg, dict) and out_seg["out"].shape == (2, 4, 64, 64)


# -- adding a model to a merge ---------------------------------------------------------------

@pytest.mark.parametrize("stop", [None, "relu"])
def test_adding_a_permuted_copy_to_a_merge_stays_exact(stop):
    a = SmallCNN(classes=3)
    b = permuted_trunk(a, seed=1)
    c = permuted_trunk(a, seed=2, head=nn.Linear(8, 4))
    merged = merge([a, b], stop_at=stop)
    state = {k: v.clone() for k, v in merged.state_dict().items()}
    grown = fxzip.merge(merged, c, X, progress=False, reset_bn=False)
    outs = grown(X)
    assert len(outs) == 3 and outs[2].shape == (16, 4)
    assert all(close(o, m(X)) for o, m in zip(outs, (a, b, c)))
    assert grown.fxzip_report.layers_zipped == merged.fxzip_report.layers_zipped
    assert all(torch.equal(v, merged.state_dict()[k]) for k, v in state.items())  # untouched
    assert sum(1 for _ in grown.named_modules() if _[0].startswith("heads.2.")) >= 1
    # and again: one trunk, four heads
    d = permuted_trunk(a, seed=3, head=nn.Linear(8, 2))
    outs = fxzip.merge(grown, d, X, progress=False, reset_bn=False)(X)
    assert len(outs) == 4 and all(close(o, m(X)) for o, m in zip(outs, (a, b, c, d)))


def test_adding_to_a_merge_within_its_trunk_only():
    a = SmallCNN(classes=3)
    merged = merge([a, permuted_trunk(a, seed=1)], stop_at="relu")
    c = permuted_trunk(a, seed=2)
    with pytest.raises(fxzip.StopPointError, match="past the merged model's trunk"):
        fxzip.merge(merged, c, X, stop_at="conv2_0", progress=False)
    with pytest.raises(fxzip.InputError, match="first model"):
        fxzip.merge(c, merged, X, progress=False)
    outs = fxzip.merge(merged, c, X, stop_at="bn1", progress=False, reset_bn=False)(X)
    assert all(close(o, a(X)) for o in outs)


class TiedDecoder(nn.Module):
    """Embedding, one MLP block, and an output projection tied to the embedding (`F.linear(h,
    embed.weight)`, as Llama-style models in plain torch write it)."""

    def __init__(self, seed: int, vocab: int = 50, width: int = 16):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, width)
        self.mlp = nn.Sequential(nn.Linear(width, 32), nn.GELU(), nn.Linear(32, width))

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.mlp(h)
        return torch.nn.functional.linear(h, self.embed.weight)


def test_tied_output_projection_stays_each_heads_own():
    """The output layer is each model's own: its tied weight is not a trunk value the heads read
    merged (the vocabulary would be matched as a feature space and each head's output weights
    replaced by clusters' averages), so each head holds its model's embedding bitwise; a permuted
    copy still merges exactly."""
    a, b = TiedDecoder(0), TiedDecoder(1)
    ids = torch.randint(0, 50, (8, 12), generator=torch.Generator().manual_seed(0))
    merged = fxzip.merge(a, b, ids, progress=False)
    assert all(r.width != 50 for r in merged.fxzip_report.spaces)  # the vocabulary is no space
    state = merged.state_dict()
    for k, model in enumerate((a, b)):
        assert torch.equal(state[f"heads.{k}.embed.weight"], model.embed.weight)
    copy_of_a, permuted = fxzip.testing.permuted_copy(a, ids)
    assert permuted >= 2
    twin = fxzip.merge(a, copy_of_a, ids, corrections=None, reset_bn=False, progress=False)
    with torch.no_grad():
        ref = a(ids)
        for out in twin(ids):
            assert ((out - ref).norm() / ref.norm()).item() < 1e-5
