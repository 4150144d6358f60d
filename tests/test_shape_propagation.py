"""Shape propagation runs a fake copy of the traced graph on fake tensors (nothing computed) and
writes the meta that a run on the example writes (strides of size-1 dimensions aside); a model that
fake tensors cannot run (it reads a value) falls back to the example itself. The graph module keeps
its parameters and buffers as they were and holds no fake tensor."""
from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.passes.shape_prop import TensorMetadata

from fxzip.graph import capture, shapes

try:
    from archs import EXAMPLE_SPECS, build
except ImportError:  # tests/ made a package
    from tests.archs import EXAMPLE_SPECS, build


def _timm(name: str, size: int, **kwargs: Any) -> tuple[nn.Module, torch.Tensor]:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=3, **kwargs).eval()
    return model, torch.randn(2, 3, size, size)


def _encoder() -> tuple[nn.Module, torch.Tensor]:
    """torch's own attention modules (leaves), whose eval forward takes a fused fast path."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, dropout=0.0)
    return nn.Sequential(nn.Linear(8, 16), layer, nn.Linear(16, 3)).eval(), torch.randn(2, 5, 8)


class _Masked(nn.Module):
    """Two keyword inputs (a dict batch), a masked mean over tokens."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(6, 12), nn.Linear(12, 3)

    def forward(self, tokens, mask):
        h = F.gelu(self.fc(tokens)) * mask.unsqueeze(-1)
        return self.head(h.sum(1) / mask.sum(1, keepdim=True).clamp_min(1))


def _masked() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    return _Masked().eval(), {"tokens": torch.randn(4, 7, 6), "mask": torch.ones(4, 7)}


# name: a model in eval mode and its example (timm ones at small sizes: last stages of 1×1)
MODELS = {
    **{f"archs-{i}": (lambda spec=spec: build(spec)) for i, spec in enumerate(EXAMPLE_SPECS)},
    "encoder": _encoder,
    "dict batch": _masked,
    "resnet18": lambda: _timm("resnet18", 32),
    "vit_tiny": lambda: _timm("vit_tiny_patch16_224", 64, img_size=64),
    "convnext_atto": lambda: _timm("convnext_atto", 32),
    "efficientnet_b0": lambda: _timm("efficientnet_b0", 32),
    "mobilevit_xxs": lambda: _timm("mobilevit_xxs", 64),
    "levit": lambda: _timm("levit_128s", 64, img_size=64),
    "tiny_vit": lambda: _timm("tiny_vit_5m_224", 64),
}


def _significant(meta: Any) -> Any:
    """Recorded meta with the strides of size-1 dimensions left out: they address no second
    element, so torch gives them no meaning (contiguity and memory formats skip them), and some
    CPU kernels set them otherwise than their fake kernels (layer_norm, view)."""
    if isinstance(meta, TensorMetadata):
        return meta._replace(stride=tuple(s if n != 1 else None
                                          for s, n in zip(meta.stride, meta.shape)))
    if isinstance(meta, (list, tuple)) and not hasattr(meta, "_fields"):
        return type(meta)(_significant(m) for m in meta)
    if isinstance(meta, dict):
        return {k: _significant(v) for k, v in meta.items()}
    return meta


def _written(node: fx.Node) -> dict[str, Any]:
    return {k: node.meta[k] for k in ("tensor_meta", "type") if k in node.meta}


def _fake_tensors(gm: fx.GraphModule) -> list[str]:
    """Where a fake tensor is held on the graph module: any module attribute, nested in dicts,
    lists and tuples (parameters and buffers included)."""
    found = []

    def visit(value: Any, where: str) -> None:
        if isinstance(value, FakeTensor):
            found.append(where)
        elif isinstance(value, dict):
            for k, v in value.items():
                visit(v, f"{where}[{k!r}]")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                visit(v, f"{where}[{i}]")

    for name, module in gm.named_modules():
        for attribute, value in vars(module).items():
            visit(value, f"{name}.{attribute}")
    return found


def _run_real(gm: fx.GraphModule, example: Any) -> dict[fx.Node, dict[str, Any]]:
    return shapes._run_for_meta(gm, gm.graph, shapes.positional_args(gm, example))


def _call(model: nn.Module, example: Any) -> Any:
    return model(**example) if isinstance(example, dict) else model(example)


@pytest.mark.parametrize("name", list(MODELS))
def test_fake_propagation_writes_what_the_real_run_writes(name):
    """Every node's tensor_meta and type as the run on the example writes them (a parameter's
    get_attr is an nn.Parameter, a fake tensor a torch.Tensor); gm's state and outputs unchanged."""
    model, example = MODELS[name]()
    gm = capture.trace(model, example)  # propagates shapes itself
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    assert shapes._meta_on_fake_tensors(gm, shapes.positional_args(gm, example)) is not None
    shapes.propagate_shapes(gm, example)
    written = {n: _written(n) for n in gm.graph.nodes}
    real = _run_real(gm, example)
    assert set(real) == set(gm.graph.nodes)
    for node in gm.graph.nodes:
        assert written[node]["type"] is real[node]["type"], node.name
        assert _significant(written[node]) == _significant(real[node]), node.name
    assert not _fake_tensors(gm)
    assert all(torch.equal(v, state[k]) for k, v in gm.state_dict().items())
    with torch.no_grad():
        out, expected = _call(gm, example), _call(model, example)
    assert type(out) is torch.Tensor and torch.allclose(out, expected, atol=1e-5)


class _ReadsAValue(nn.Module):
    """Divides by a value read from its input (`.item()`): fake tensors have none to read."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)

    def forward(self, x):
        return self.fc(x).view(-1, 3, 2) / x.abs().max().item()


def test_a_model_that_reads_a_value_falls_back_to_the_real_run():
    """`.item()` fails on fake tensors: the run on the example writes the meta."""
    x = torch.randn(5, 4)
    gm = capture.trace(_ReadsAValue(), x)
    assert shapes._meta_on_fake_tensors(gm, shapes.positional_args(gm, x)) is None
    assert shapes.tensor_shape(next(n for n in gm.graph.nodes if n.op == "output")) == (5, 3, 2)
    item = next(n for n in gm.graph.nodes if n.target == "item")
    assert item.meta["type"] is float and "tensor_meta" not in item.meta
    assert all(_written(n) == meta for n, meta in _run_real(gm, x).items())


class _CachesInEval(nn.Module):
    """Caches a table made from its parameter in eval mode (as timm's LeViT and TinyViT cache
    their attention biases)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(4))
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x):
        if "table" not in self.cache:
            self.cache["table"] = self.scale * 2
        return x * self.cache["table"]


class _CountsCalls(nn.Module):
    """Adds to a buffer of its own in its forward (in place, from no input: no fake argument)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(4))

    def forward(self, x):
        return x + self.calls.add_(1)


def test_the_fake_run_leaves_the_graph_module_as_it_was():
    """A module's cache and an in-place update of its buffer stay on the fake copy."""
    model = nn.Sequential(nn.Linear(3, 4), _CachesInEval(), _CountsCalls()).eval()
    x, state = torch.randn(6, 3), {k: v.clone() for k, v in model.state_dict().items()}
    gm = capture.trace(model, x, leaf_modules=(_CachesInEval, _CountsCalls))
    assert shapes.tensor_shape(next(n for n in gm.graph.nodes if n.op == "output")) == (6, 4)
    assert not _fake_tensors(gm) and not gm.get_submodule("1").cache
    assert all(torch.equal(v, state[k]) for k, v in gm.state_dict().items())
    with torch.no_grad():
        out = gm(x)
    assert type(out) is torch.Tensor and torch.allclose(out, model(x))
