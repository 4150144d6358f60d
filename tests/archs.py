"""Random tiny model architectures and an independent permutation oracle.

Models are plain ``torch.nn`` code (no fxzip import), built from a small frozen spec so that
hypothesis can generate and shrink them, and every one traces with ``torch.fx.symbolic_trace``.

Every block has ``permute_(perm_in, gen) -> perm_out``: it shuffles its hidden units in place,
consistently with the permutation ``perm_in`` of its input features, and returns the
permutation of its output features.  Convention: for a permutation ``p`` of a layer's outputs,
new unit ``j`` is old unit ``p[j]`` (``new_weight = old_weight[p]``), so a consumer's input
columns become ``old_weight[:, p]``.  ``None`` stands for the identity (the model input).

``permuted_copy(model, seed)`` = deepcopy + permute: same function, hidden units shuffled,
model input and output never permuted.

Public names:
    mlp_specs(), cnn_specs(), arch_specs()   hypothesis strategies of specs
    build(spec, seed) -> (model, example_input)
    permuted_copy(model, seed) -> model
    example_input(spec, seed, batch=None)     a (fresh) deterministic input for the spec
    degenerate_features(model, x)             why exact matching may be ill-posed, or None
    EXAMPLE_SPECS                             hand-written specs covering every feature
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

# --------------------------------------------------------------------------------------------
# activations: elementwise, so they commute with any permutation of features
# --------------------------------------------------------------------------------------------

_ACT_MODULES = {
    "relu": nn.ReLU,
    "relu_": functools.partial(nn.ReLU, inplace=True),  # in-place module
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": functools.partial(nn.LeakyReLU, 0.1),
    "hardswish": nn.Hardswish,
    "elu": nn.ELU,
}
_ACT_FUNCTIONS = {
    "F.relu": F.relu,
    "F.relu_": functools.partial(F.relu, inplace=True),  # in-place function
    "F.gelu": F.gelu,
    "F.silu": F.silu,
    "torch.tanh": torch.tanh,
    "torch.sigmoid": torch.sigmoid,
    "F.leaky_relu": functools.partial(F.leaky_relu, negative_slope=0.1),
    "F.hardswish": F.hardswish,
    "F.elu": F.elu,
}
ACTIVATIONS = tuple(_ACT_MODULES) + tuple(_ACT_FUNCTIONS)
RELUS = ("relu", "relu_", "F.relu", "F.relu_")


def _act(name: str):
    """A module (-> call_module in the graph) or a plain function (-> call_function)."""
    if name in _ACT_MODULES:
        return _ACT_MODULES[name]()
    return _ACT_FUNCTIONS[name]


# --------------------------------------------------------------------------------------------
# specs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dense:
    """MLP: Linear(width -> out) -> optional norm ("bn" | "ln" | None) -> act -> optional dropout."""
    out: int
    norm: str | None = None
    act: str = "relu"
    dropout: bool = False


@dataclass(frozen=True)
class ResMLP:
    """MLP residual block keeping the stream width.

    hidden None: ``x + act(norm(Linear(x)))``;
    hidden h:    ``x + Linear(act(norm(Linear(x))))`` with h hidden units.
    """
    hidden: int | None = None
    norm: str | None = None
    act: str = "relu"


@dataclass(frozen=True)
class MLPSpec:
    d_in: int
    blocks: tuple  # of Dense / ResMLP; blocks[0] is a Dense
    classes: int
    batch: int = 16


@dataclass(frozen=True)
class ConvBlock:
    """conv(k, stride, bias) -> BatchNorm2d -> act."""
    out: int
    k: int = 3
    stride: int = 1
    bias: bool = False
    act: str = "relu"


@dataclass(frozen=True)
class BasicBlock:
    """conv3x3(stride)-bn-act-conv3x3-bn + shortcut, then `post` (a ReLU) after the add.

    Shortcut: identity when the width and resolution are kept, else 1x1 conv(stride) + BN.
    add: "+" (out + identity), "+=" (in place in eager mode), "add_" (out.add_), "torch.add".
    """
    out: int
    stride: int = 1
    act: str = "relu"
    post: str = "relu"
    add: str = "+"


@dataclass(frozen=True)
class ConcatBlock:
    """cat([act(bn(conv3x3(x))) -> c1, act(bn(conv1x1(x))) -> c2], dim=1), c1 != c2."""
    c1: int
    c2: int
    act: str = "relu"


@dataclass(frozen=True)
class Pool:
    """Halves the resolution: "max" / "avg" (modules) or "F.max" / "F.avg" (functions)."""
    kind: str = "max"


@dataclass(frozen=True)
class ChannelLN:
    """LayerNorm over channels: x.permute(0,2,3,1) -> nn.LayerNorm(C) -> .permute(0,3,1,2)."""


@dataclass(frozen=True)
class Scale:
    """Multiply by a scalar: style "*" (x * s), "r*" (s * x) or "torch.mul"."""
    value: float = 0.5
    style: str = "*"


@dataclass(frozen=True)
class Drop:
    """Dropout (identity in eval mode): nn.Dropout2d module or F.dropout(x, p, self.training)."""
    functional: bool = False


@dataclass(frozen=True)
class CNNSpec:
    """Input (batch, 3, hw, hw); stem conv3x3(bias?) -> BN -> act; blocks; head -> classes.

    head: "pool"    AdaptiveAvgPool2d(1) + torch.flatten(x, 1) + Linear
          "mean"    x.mean((2, 3)) + Linear
          "flatten" torch.flatten(x, 1) of the C x H x W map + Linear(C*H*W)
          "flatten_method"  x.flatten(1) + Linear(C*H*W)
    """
    hw: int
    stem: int
    blocks: tuple
    head: str
    classes: int
    stem_bias: bool = False
    stem_act: str = "relu"
    batch: int = 16


# --------------------------------------------------------------------------------------------
# permutation helpers
# --------------------------------------------------------------------------------------------


def _randperm(n: int, gen: torch.Generator) -> torch.Tensor:
    """A random permutation of range(n), never the identity when n >= 2."""
    p = torch.randperm(n, generator=gen)
    if n >= 2 and torch.equal(p, torch.arange(n)):
        p = p.roll(1)
    return p


@torch.no_grad()
def _take(t: torch.Tensor | None, p: torch.Tensor | None, dim: int = 0) -> None:
    """In place: t <- t.index_select(dim, p); no-op for p None (identity) or t None."""
    if t is None or p is None:
        return
    t.copy_(t.index_select(dim, p))


def _permute_linear(lin: nn.Linear, p_in, p_out) -> None:
    _take(lin.weight, p_out, 0)
    _take(lin.bias, p_out, 0)
    _take(lin.weight, p_in, 1)


def _permute_conv(conv: nn.Conv2d, p_in, p_out) -> None:
    _take(conv.weight, p_out, 0)
    _take(conv.bias, p_out, 0)
    _take(conv.weight, p_in, 1)


def _permute_norm(norm: nn.Module | None, p) -> None:
    """BatchNorm (affine + running stats) or LayerNorm over the permuted features."""
    if norm is None:
        return
    for name in ("weight", "bias", "running_mean", "running_var"):
        _take(getattr(norm, name, None), p, 0)


def _make_norm(kind: str | None, width: int) -> nn.Module | None:
    if kind is None:
        return None
    if kind == "bn":
        return nn.BatchNorm1d(width)
    if kind == "ln":
        return nn.LayerNorm(width)
    raise ValueError(f"unknown norm {kind!r}")


# --------------------------------------------------------------------------------------------
# MLP blocks
# --------------------------------------------------------------------------------------------


class DenseBlock(nn.Module):
    def __init__(self, spec: Dense, width: int):
        super().__init__()
        self.fc = nn.Linear(width, spec.out)
        self.norm = _make_norm(spec.norm, spec.out)
        self.act = _act(spec.act)
        self.drop = nn.Dropout(0.3) if spec.dropout else None

    def forward(self, x):
        x = self.fc(x)
        if self.norm is not None:
            x = self.norm(x)
        x = self.act(x)
        if self.drop is not None:
            x = self.drop(x)
        return x

    def permute_(self, perm_in, gen):
        p = _randperm(self.fc.out_features, gen)
        _permute_linear(self.fc, perm_in, p)
        _permute_norm(self.norm, p)
        return p


class ResMLPBlock(nn.Module):
    def __init__(self, spec: ResMLP, width: int):
        super().__init__()
        inner = width if spec.hidden is None else spec.hidden
        self.fc1 = nn.Linear(width, inner)
        self.norm = _make_norm(spec.norm, inner)
        self.act = _act(spec.act)
        self.fc2 = None if spec.hidden is None else nn.Linear(inner, width)

    def forward(self, x):
        h = self.fc1(x)
        if self.norm is not None:
            h = self.norm(h)
        h = self.act(h)
        if self.fc2 is not None:
            h = self.fc2(h)
        return x + h

    def permute_(self, perm_in, gen):
        if self.fc2 is None:  # the branch's features are the stream's features
            _permute_linear(self.fc1, perm_in, perm_in)
            _permute_norm(self.norm, perm_in)
        else:
            q = _randperm(self.fc1.out_features, gen)
            _permute_linear(self.fc1, perm_in, q)
            _permute_norm(self.norm, q)
            _permute_linear(self.fc2, q, perm_in)
        return perm_in


class LinearHead(nn.Module):
    def __init__(self, width: int, classes: int):
        super().__init__()
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(x)

    def permute_(self, perm_in, gen):
        _permute_linear(self.fc, perm_in, None)
        return None


# --------------------------------------------------------------------------------------------
# CNN blocks
# --------------------------------------------------------------------------------------------


def _conv_out(hw: int, k: int, stride: int) -> int:
    return (hw + 2 * (k // 2) - k) // stride + 1


class ConvBNAct(nn.Module):
    def __init__(self, spec: ConvBlock, width: int):
        super().__init__()
        self.conv = nn.Conv2d(width, spec.out, spec.k, spec.stride, spec.k // 2, bias=spec.bias)
        self.bn = nn.BatchNorm2d(spec.out)
        self.act = _act(spec.act)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    def permute_(self, perm_in, gen):
        p = _randperm(self.conv.out_channels, gen)
        _permute_conv(self.conv, perm_in, p)
        _permute_norm(self.bn, p)
        return p


class ResBasicBlock(nn.Module):
    def __init__(self, spec: BasicBlock, width: int):
        super().__init__()
        self.add_style = spec.add
        self.conv1 = nn.Conv2d(width, spec.out, 3, spec.stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(spec.out)
        self.act = _act(spec.act)
        self.conv2 = nn.Conv2d(spec.out, spec.out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(spec.out)
        if spec.stride != 1 or spec.out != width:
            self.shortcut = nn.Sequential(
                nn.Conv2d(width, spec.out, 1, spec.stride, 0, bias=False), nn.BatchNorm2d(spec.out))
        else:
            self.shortcut = None
        self.post = _act(spec.post)

    def forward(self, x):
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.add_style == "+":
            out = out + identity
        elif self.add_style == "+=":
            out += identity
        elif self.add_style == "add_":
            out.add_(identity)
        else:
            out = torch.add(out, identity)
        return self.post(out)

    def permute_(self, perm_in, gen):
        q = _randperm(self.conv1.out_channels, gen)
        _permute_conv(self.conv1, perm_in, q)
        _permute_norm(self.bn1, q)
        r = perm_in if self.shortcut is None else _randperm(self.conv2.out_channels, gen)
        _permute_conv(self.conv2, q, r)
        _permute_norm(self.bn2, r)
        if self.shortcut is not None:
            _permute_conv(self.shortcut[0], perm_in, r)
            _permute_norm(self.shortcut[1], r)
        return r


class ConcatBranches(nn.Module):
    def __init__(self, spec: ConcatBlock, width: int):
        super().__init__()
        self.conv_a = nn.Conv2d(width, spec.c1, 3, 1, 1, bias=False)
        self.bn_a = nn.BatchNorm2d(spec.c1)
        self.conv_b = nn.Conv2d(width, spec.c2, 1, 1, 0, bias=True)
        self.bn_b = nn.BatchNorm2d(spec.c2)
        self.act = _act(spec.act)

    def forward(self, x):
        a = self.act(self.bn_a(self.conv_a(x)))
        b = self.act(self.bn_b(self.conv_b(x)))
        return torch.cat([a, b], dim=1)

    def permute_(self, perm_in, gen):
        c1, c2 = self.conv_a.out_channels, self.conv_b.out_channels
        p1, p2 = _randperm(c1, gen), _randperm(c2, gen)
        _permute_conv(self.conv_a, perm_in, p1)
        _permute_norm(self.bn_a, p1)
        _permute_conv(self.conv_b, perm_in, p2)
        _permute_norm(self.bn_b, p2)
        return torch.cat([p1, c1 + p2])


class PoolBlock(nn.Module):
    def __init__(self, spec: Pool, width: int):
        super().__init__()
        self.kind = spec.kind
        self.pool = {"max": nn.MaxPool2d(2), "avg": nn.AvgPool2d(2)}.get(spec.kind)

    def forward(self, x):
        if self.kind == "F.max":
            return F.max_pool2d(x, 2)
        if self.kind == "F.avg":
            return F.avg_pool2d(x, 2)
        return self.pool(x)

    def permute_(self, perm_in, gen):
        return perm_in


class ChannelLayerNorm(nn.Module):
    def __init__(self, spec: ChannelLN, width: int):
        super().__init__()
        self.ln = nn.LayerNorm(width)

    def forward(self, x):
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def permute_(self, perm_in, gen):
        _permute_norm(self.ln, perm_in)
        return perm_in


class ScaleBlock(nn.Module):
    def __init__(self, spec: Scale, width: int):
        super().__init__()
        self.value, self.style = spec.value, spec.style

    def forward(self, x):
        if self.style == "*":
            return x * self.value
        if self.style == "r*":
            return self.value * x
        return torch.mul(x, self.value)

    def permute_(self, perm_in, gen):
        return perm_in


class DropBlock(nn.Module):
    def __init__(self, spec: Drop, width: int):
        super().__init__()
        self.drop = None if spec.functional else nn.Dropout2d(0.2)

    def forward(self, x):
        if self.drop is None:
            return F.dropout(x, 0.2, self.training)
        return self.drop(x)

    def permute_(self, perm_in, gen):
        return perm_in


class ConvHead(nn.Module):
    def __init__(self, kind: str, width: int, hw: int, classes: int):
        super().__init__()
        self.kind, self.hw = kind, hw
        self.pool = nn.AdaptiveAvgPool2d(1) if kind == "pool" else None
        flat = kind in ("flatten", "flatten_method")
        self.fc = nn.Linear(width * hw * hw if flat else width, classes)

    def forward(self, x):
        if self.kind == "pool":
            x = torch.flatten(self.pool(x), 1)
        elif self.kind == "mean":
            x = x.mean((2, 3))
        elif self.kind == "flatten":
            x = torch.flatten(x, 1)
        else:
            x = x.flatten(1)
        return self.fc(x)

    def permute_(self, perm_in, gen):
        if perm_in is not None and self.kind in ("flatten", "flatten_method"):
            s = self.hw * self.hw  # feature c*s + k of the flattened C x H x W map
            perm_in = (perm_in[:, None] * s + torch.arange(s)).flatten()
        _permute_linear(self.fc, perm_in, None)
        return None


_CNN_BLOCKS = {
    ConvBlock: ConvBNAct,
    BasicBlock: ResBasicBlock,
    ConcatBlock: ConcatBranches,
    Pool: PoolBlock,
    ChannelLN: ChannelLayerNorm,
    Scale: ScaleBlock,
    Drop: DropBlock,
}


def _block_out(b, width: int, hw: int) -> tuple[int, int]:
    """(width, hw) after a CNN block spec."""
    if isinstance(b, ConvBlock):
        return b.out, _conv_out(hw, b.k, b.stride)
    if isinstance(b, BasicBlock):
        return b.out, _conv_out(hw, 3, b.stride)
    if isinstance(b, ConcatBlock):
        return b.c1 + b.c2, hw
    if isinstance(b, Pool):
        return width, hw // 2
    return width, hw


# --------------------------------------------------------------------------------------------
# whole models
# --------------------------------------------------------------------------------------------


class Net(nn.Module):
    """``head(body(x))``; ``body`` an nn.Sequential of blocks with ``permute_``."""

    def __init__(self, body: list[nn.Module], head: nn.Module):
        super().__init__()
        self.body = nn.Sequential(*body)
        self.head = head

    def forward(self, x):
        return self.head(self.body(x))

    def permute_(self, perm_in, gen):
        p = perm_in
        for block in self.body:
            p = block.permute_(p, gen)
        return self.head.permute_(p, gen)


def _build_mlp(spec: MLPSpec) -> Net:
    if not spec.blocks or not isinstance(spec.blocks[0], Dense):
        raise ValueError("an MLPSpec starts with a Dense block")
    width, body = spec.d_in, []
    for b in spec.blocks:
        if isinstance(b, Dense):
            body.append(DenseBlock(b, width))
            width = b.out
        elif isinstance(b, ResMLP):
            body.append(ResMLPBlock(b, width))
        else:
            raise ValueError(f"not an MLP block: {b!r}")
    return Net(body, LinearHead(width, spec.classes))


def _build_cnn(spec: CNNSpec) -> Net:
    stem = ConvBNAct(ConvBlock(spec.stem, 3, 1, spec.stem_bias, spec.stem_act), 3)
    width, hw, body = spec.stem, spec.hw, [stem]
    for b in spec.blocks:
        body.append(_CNN_BLOCKS[type(b)](b, width))
        width, hw = _block_out(b, width, hw)
        if hw < 1:
            raise ValueError(f"{spec!r} pools the map away")
    return Net(body, ConvHead(spec.head, width, hw, spec.classes))


def example_input(spec, seed: int, batch: int | None = None) -> torch.Tensor:
    """A deterministic standard-normal input for `spec` (seeded, global RNG untouched)."""
    gen = torch.Generator().manual_seed(10_007 * seed + 17)
    batch = spec.batch if batch is None else batch
    shape = (batch, spec.d_in) if isinstance(spec, MLPSpec) else (batch, 3, spec.hw, spec.hw)
    return torch.randn(shape, generator=gen)


@torch.no_grad()
def _randomise_norms(model: nn.Module, x: torch.Tensor, gen: torch.Generator) -> None:
    """Random affine params for every norm; BatchNorm running stats random but not absurd.

    The running stats are first set to the statistics of `x` (one train-mode pass of the
    BatchNorms only, cumulative momentum) and then perturbed (mean shift up to ~0.5 std,
    variance scaled by 0.5..2), so eval-mode BN is far from the identity yet the units stay
    alive on `x` (no ReLU channel that is dead on the whole batch because of a stray mean).
    """
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm))]
    for m in norms:
        n = m.weight.numel()
        m.weight.copy_(torch.empty(n).uniform_(0.5, 1.5, generator=gen))
        m.bias.copy_(0.3 * torch.randn(n, generator=gen))
    bns = [m for m in norms if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one pass = the batch statistics
        m.train()
    model(x)
    for m in bns:
        m.eval()
        m.momentum = 0.1
        std = m.running_var.clamp(min=1e-2).sqrt()
        m.running_mean.add_(0.5 * std * torch.randn(m.num_features, generator=gen))
        m.running_var.clamp_(min=1e-2).mul_(torch.empty(m.num_features).uniform_(0.5, 2.0, generator=gen))
        m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (), generator=gen)))


@torch.no_grad()
def degenerate_features(model: nn.Module, x: torch.Tensor, max_corr: float = 0.9999) -> str | None:
    """Why matching-based merging need not be exact for `model` on `x`, or None.

    Runs the traced graph on `x` and, at every node whose output is a (B, C) or (B, C, H, W)
    tensor with 2 <= C <= 64 (the model output too: `stop_at` may zip the output layer), correlates the C features (samples: batch x positions).  Two
    non-constant features of one model with correlation > `max_corr` are a degenerate case:
    e.g. a LayerNorm over 2 features gives f and -f, and a 1x1 conv / Linear fed by that
    gives features that are all affine in f (pairwise correlation +-1), so a model's feature
    can match another feature of the same model as well as its counterpart in a permuted copy.
    Constant features (dead ReLUs) are ignored: they are zero on `x` whatever they merge with.
    """
    gm = torch.fx.symbolic_trace(model)
    found: list[str] = []

    class _Probe(torch.fx.Interpreter):
        def run_node(self, n):
            r = super().run_node(n)
            if (n.op not in ("placeholder", "output") and not found and isinstance(r, torch.Tensor)
                    and r.is_floating_point() and r.dim() in (2, 4) and 2 <= r.shape[1] <= 64):
                f = r.detach().transpose(0, 1).reshape(r.shape[1], -1).double()
                f = f - f.mean(1, keepdim=True)
                norm = f.norm(dim=1)
                live = norm > 1e-6 * (norm.max() + 1e-30)
                if int(live.sum()) >= 2:
                    g = f[live] / norm[live, None]
                    corr = (g @ g.T).fill_diagonal_(-1.0)
                    if corr.max().item() > max_corr:
                        found.append(f"node {n.name}: two features with correlation "
                                     f"{corr.max().item():.6f}")
            return r

    _Probe(gm).run(x)
    return found[0] if found else None


def build(spec, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """(model in eval mode, example input of spec.batch samples); deterministic in (spec, seed).

    The global torch RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build_mlp(spec) if isinstance(spec, MLPSpec) else _build_cnn(spec)
    model.eval()
    x = example_input(spec, seed)
    _randomise_norms(model, x, torch.Generator().manual_seed(7919 * seed + 3))
    return model.eval(), x


def permuted_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A deepcopy of `model` with every hidden unit randomly permuted (same function).

    Never mutates `model`.  Every hidden layer of width >= 2 gets a non-identity permutation.
    """
    other = copy.deepcopy(model)
    out_perm = other.permute_(None, torch.Generator().manual_seed(seed))
    assert out_perm is None, "the model output must not be permuted"
    return other


# --------------------------------------------------------------------------------------------
# hypothesis strategies
# --------------------------------------------------------------------------------------------

widths = st.integers(2, 12)
activations = st.sampled_from(ACTIVATIONS)
norms = st.sampled_from([None, "bn", "ln"])


def _norms_for(width: int):
    """A LayerNorm over 2 features outputs (f, -f) up to affine maps: rank 1, a degenerate model."""
    return norms if width >= 3 else st.sampled_from([None, "bn"])
batches = st.integers(16, 32)
classes = st.integers(2, 10)


@st.composite
def mlp_specs(draw, max_blocks: int = 4) -> MLPSpec:
    """MLPs: Dense first, then Dense / residual blocks; d_in 3..12, widths 2..12, 1..max_blocks
    blocks; LayerNorm only over >= 3 features."""
    d_in = draw(st.integers(3, 12))
    n = draw(st.integers(1, max_blocks))
    blocks, width = [], d_in
    for i in range(n):
        if i == 0 or draw(st.booleans()):
            out = draw(widths)
            blocks.append(Dense(out, draw(_norms_for(out)), draw(activations), draw(st.booleans())))
            width = out
        else:
            hidden = draw(st.none() | widths)
            inner = width if hidden is None else hidden
            blocks.append(ResMLP(hidden, draw(_norms_for(inner)), draw(activations)))
    return MLPSpec(d_in, tuple(blocks), draw(classes), draw(batches))


@st.composite
def cnn_block_specs(draw, width: int, hw: int):
    kinds = (["conv", "basic", "concat", "scale", "drop"] + (["ln"] if width >= 3 else [])
             + (["pool"] if hw >= 2 else []))
    kind = draw(st.sampled_from(kinds))
    stride = draw(st.sampled_from([1, 1, 2])) if hw >= 2 else 1
    if kind == "conv":
        return ConvBlock(draw(widths), draw(st.sampled_from([3, 1])), stride, draw(st.booleans()),
                         draw(activations))
    if kind == "basic":
        out = draw(st.sampled_from([width, width]) | widths)
        return BasicBlock(out, stride, draw(activations), draw(st.sampled_from(RELUS)),
                          draw(st.sampled_from(["+", "+=", "add_", "torch.add"])))
    if kind == "concat":
        c1 = draw(st.integers(2, 10))
        c2 = draw(st.integers(2, 10).filter(lambda c: c != c1))
        return ConcatBlock(c1, c2, draw(activations))
    if kind == "pool":
        return Pool(draw(st.sampled_from(["max", "avg", "F.max", "F.avg"])))
    if kind == "ln":
        return ChannelLN()
    if kind == "scale":
        return Scale(draw(st.sampled_from([0.5, 2.0, -1.5, 0.25])), draw(st.sampled_from(["*", "r*", "torch.mul"])))
    return Drop(draw(st.booleans()))


@st.composite
def cnn_specs(draw, max_blocks: int = 4) -> CNNSpec:
    """CNNs on (batch, 3, hw, hw), hw 5..8: stem + 0..max_blocks blocks + one of four heads."""
    hw0 = draw(st.integers(5, 8))
    stem = draw(widths)
    width, hw, blocks = stem, hw0, []
    for _ in range(draw(st.integers(0, max_blocks))):
        b = draw(cnn_block_specs(width, hw))
        blocks.append(b)
        width, hw = _block_out(b, width, hw)
    head = draw(st.sampled_from(["pool", "mean", "flatten", "flatten_method"]))
    return CNNSpec(hw0, stem, tuple(blocks), head, draw(classes), draw(st.booleans()),
                   draw(activations), draw(batches))


def arch_specs():
    return mlp_specs() | cnn_specs()


# --------------------------------------------------------------------------------------------
# fixed specs that cover every feature (for parametrised tests)
# --------------------------------------------------------------------------------------------

EXAMPLE_SPECS = (
    MLPSpec(5, (Dense(8, "bn", "relu_"), ResMLP(None, "ln", "F.gelu"), Dense(6, None, "tanh", True),
                ResMLP(4, "bn", "F.leaky_relu")), 3, 24),
    MLPSpec(3, (Dense(2, "bn", "sigmoid"), Dense(7, None, "F.relu_"), ResMLP(3, None, "hardswish")), 4, 16),
    CNNSpec(8, 6, (ConvBlock(8, 3, 1, True, "F.relu_"), BasicBlock(8, 1, "silu", "relu_", "+="),
                   ConcatBlock(5, 3, "elu"), Pool("max")), "pool", 5, False, "relu_", 20),
    CNNSpec(7, 4, (BasicBlock(6, 2, "gelu", "F.relu", "add_"), ChannelLN(), Scale(-1.5, "r*"),
                   Drop(True), ConcatBlock(3, 6, "F.silu")), "flatten", 3, True, "tanh", 16),
    CNNSpec(8, 5, (Pool("F.avg"), BasicBlock(5, 1, "F.hardswish", "F.relu_", "torch.add"),
                   Drop(False), Scale(2.0, "torch.mul"), ConvBlock(4, 1, 2, False, "leaky_relu")),
            "mean", 4, True, "torch.sigmoid", 32),
    CNNSpec(6, 3, (ConcatBlock(2, 4, "F.relu"), BasicBlock(9, 1, "relu", "relu", "+"), Pool("F.max"),
                   ChannelLN()), "flatten_method", 2, False, "F.elu", 16),
)
