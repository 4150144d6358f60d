"""Capture: each model becomes a torch.fx GraphModule (traced by fxzip's tracer, its fixed forward
arguments named, eval-mode identities dropped, einsums as matmuls) with shapes on every node."""
from __future__ import annotations

import contextlib
import inspect
import math
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import _pytree as pytree
from torch.fx.experimental.meta_tracer import MetaTracer

from . import traced_functions
from .capture_errors import capture_error
from ..errors import InputError, TraceError
from ..runtime.inputs import Batch
from .nodes import private_copy, route_through_inplace_ops
from .shapes import propagate_shapes
from .value_tracing import ValueTracing

__all__ = ["FxzipTracer", "trace", "fixed_arguments", "einsums_as_matmuls"]


class FxzipTracer(fx.Tracer):
    """A tracer that keeps torch.nn's own modules, TorchScript modules and any user-named module
    types as leaves, and wraps the functions timm marks as not traceable (plus `math` and
    `torchvision.ops`) as single calls. torch's transformer layers are traced into (their
    Linear, LayerNorm and MultiheadAttention modules are what fxzip has rules for), and a
    cross-attention call of `nn.MultiheadAttention` is spelled out (`_spelled_out_attention`)."""

    def __init__(self, leaf_modules: Sequence[type] = ()):
        functions, modules = _autowrap()
        super().__init__(autowrap_modules=modules, autowrap_functions=functions)
        self.extra_leaves = tuple(leaf_modules)
        self._spelled_out: set[int] = set()  # ids of modules whose call is traced as a stand-in

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        if self.extra_leaves and isinstance(m, self.extra_leaves):
            return True
        if isinstance(m, torch.jit.ScriptModule):
            return True
        if isinstance(m, TRACED_INTO) or id(m) in self._spelled_out:
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: torch.nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        """torch.fx's call_module; a module call with a traceable stand-in (cross-attention) is
        traced through the stand-in, under the module's name (`nn_module_stack`)."""
        stand_in = None
        if not (self.extra_leaves and isinstance(m, self.extra_leaves)):
            stand_in = _spelled_out_attention(m, args, kwargs)
        if stand_in is None:
            return super().call_module(m, forward, args, kwargs)
        self._spelled_out.add(id(m))
        try:
            return super().call_module(m, stand_in, args, kwargs)
        finally:
            self._spelled_out.discard(id(m))

    def trace(self, root: Any, concrete_args: dict | None = None) -> fx.Graph:
        """torch.fx's trace, with some `torch.fx.wrap`-ed library functions traced into or
        replaced by traceable stand-ins (`fxzip.graph.traced_functions`), and torch's fused
        transformer fast path off."""
        with traced_functions.patched(), _mha_fast_path_off():
            return super().trace(root, concrete_args)


# torch.nn's transformer layers, plain compositions of modules fxzip has rules for: traced into
# rather than kept as (opaque) leaves
TRACED_INTO = (torch.nn.TransformerEncoderLayer, torch.nn.TransformerDecoderLayer)


@contextlib.contextmanager
def _mha_fast_path_off() -> Iterator[None]:
    """torch's fast path of `TransformerEncoderLayer` (one fused kernel) is chosen by tests on
    the input (`src.dim()`, `src.is_nested`) that a proxy cannot answer; with it off, the layer
    runs its plain path of modules, which traces (the same function, in eval mode)."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def _spelled_out_attention(m: torch.nn.Module, args: tuple,
                           kwargs: dict) -> Callable[..., Any] | None:
    """A traceable stand-in for a call of `nn.MultiheadAttention` as cross-attention (keys and
    values from one tensor other than the queries, as `TransformerDecoderLayer`'s attention over
    the encoder's memory), without masks or returned weights, in eval mode; None for any other
    call. Self-attention stays one call, which `fuse_attention` fuses; a call with masks stays a
    leaf (a barrier). The packed projection is applied whole to the queries and to the keys and
    values, and each takes its part ([q | k | v]): its weight has one column space, so the
    queries' and the memory's spaces are tied through it."""
    if not isinstance(m, torch.nn.MultiheadAttention):
        return None
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
             "average_attn_weights", "is_causal")
    given = {**dict(zip(names, args)), **kwargs}
    query, key = given.get("query"), given.get("key")
    if not isinstance(query, fx.Proxy) or not isinstance(key, fx.Proxy) or query is key \
            or given.get("value") is not key or given.get("need_weights", True) is not False:
        return None
    if any(given.get(name) is not None for name in ("key_padding_mask", "attn_mask")) \
            or given.get("is_causal", False) or m.training or not m._qkv_same_embed_dim \
            or m.bias_k is not None or m.bias_v is not None or m.add_zero_attn:
        return None
    return lambda *_, **__: _cross_attention(m, query, key)


def _cross_attention(m: torch.nn.MultiheadAttention, query: Any, key: Any) -> tuple[Any, None]:
    """`nn.MultiheadAttention` (eval mode, no masks) of `query` over `key` (= value), in the
    ops fxzip follows per head: the packed projection, head splits, scaled_dot_product_attention
    (its default scale is the module's 1/√d), the heads merged and the output projection.
    Written for batched and unbatched inputs alike: (L, N, E) inputs of a module that is not
    batch_first have their two first axes swapped, which is nothing for an (L, E) one."""
    embed, heads = m.embed_dim, m.num_heads
    if not m.batch_first:
        query, key = query.transpose(0, -2), key.transpose(0, -2)
    q = F.linear(query, m.in_proj_weight, m.in_proj_bias)[..., :embed]
    kv = F.linear(key, m.in_proj_weight, m.in_proj_bias)
    k, v = kv[..., embed:2 * embed], kv[..., 2 * embed:]

    def split(t: Any) -> Any:  # (…, L, E) -> (…, H, L, d)
        return t.unflatten(-1, (heads, embed // heads)).transpose(-3, -2)
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    out = m.out_proj(out.transpose(-3, -2).flatten(-2))
    return (out if m.batch_first else out.transpose(0, -2)), None


def _autowrap() -> tuple[tuple, tuple]:
    """timm's not-traceable functions, and the modules whose functions are wrapped as leaves.
    timm and torchvision are read only where already imported: a model that calls their
    functions has imported them, and importing them for any other model costs seconds (they
    import torch._dynamo)."""
    modules: list = [math]
    if "torchvision.ops" in sys.modules:
        modules.append(sys.modules["torchvision.ops"])
    functions: tuple = ()
    if "timm" in sys.modules:
        try:
            from timm.layers import get_notrace_functions
            functions = tuple(get_notrace_functions())
        except ImportError:  # pragma: no cover - a timm without the registry
            pass
    return functions, tuple(modules)


def _timm_leaf_modules() -> tuple[type, ...]:
    """Module types timm marks as not traceable (they become leaves, hence barriers); none where
    timm was never imported (no model can hold its modules then)."""
    if "timm" not in sys.modules:
        return ()
    try:
        from timm.layers import get_notrace_modules
        return tuple(get_notrace_modules())
    except ImportError:  # pragma: no cover
        return ()


def trace(model: torch.nn.Module, example: Batch, *, leaf_modules: Sequence[type] = (),
          concrete_args: dict | None = None) -> fx.GraphModule:
    """Trace a private eval-mode copy of `model` and annotate every node with its shape.

    `example` is the model's first input (a tensor) or a dict of `forward`'s keyword arguments;
    every other argument of `forward` is fixed to its default (or to `concrete_args`), so that
    `forward(x, mask=None)` traces with `mask` None. The copy keeps the user's model untouched
    (tracing and shape propagation run modules; some timm models cache proxies or attach
    constants when traced). Modules timm marks as not traceable are traced into first and made
    leaves only if that fails.
    """
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"expected a torch.nn.Module to merge, got {type(model).__name__}")
    fixed = fixed_arguments(model, example, concrete_args)
    traced_functions.recording(model, lambda: _run(private_copy(model).eval(), example))
    gm = None
    # plain tracing; then with the example's values on the proxies (control flow on sizes taken
    # as the example takes them, sizes kept symbolic: timm's MobileViT, Twins, LiteMLA); then with
    # meta tensors (timm's VGG head); then timm's not-traceable modules as leaves
    tiers = ((tuple(leaf_modules), False), (tuple(leaf_modules), "values"),
             (tuple(leaf_modules), True), (tuple(leaf_modules) + _timm_leaf_modules(), False))
    failure: Exception | None = None
    failed_in: nn.Module | None = None  # the copy the first failure ran (modules by path)
    for leaves, shaped in tiers:
        private = private_copy(model).eval()
        tracer = (_ValueTracer(leaves) if shaped == "values" else
                  _ShapedTracer(leaves) if shaped else FxzipTracer(leaves))
        try:
            if shaped == "values":
                graph = tracer.trace(private, concrete_args=fixed or None,
                                     values=_example_values(model, example))
            elif shaped:
                with warnings.catch_warnings():  # the meta tracer warns of every value it skips
                    warnings.simplefilter("ignore")
                    graph = tracer.trace(private, concrete_args=fixed or None,
                                         meta_args=_meta_arguments(model, example))
            else:
                graph = tracer.trace(private, concrete_args=fixed or None)
        except Exception as exc:  # torch.fx raises many types here
            failure, failed_in = (failure, failed_in) if failure else (exc, private)
            continue
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
        if shaped and _holds_meta_tensors(gm):  # constants made while tracing with meta tensors
            failure, gm = failure or TraceError("meta tensors left in the traced graph"), None
            continue
        break
    if gm is None:
        raise capture_error("torch.fx", type(model).__name__, failed_in, failure) from failure
    gm.eval()
    _name_fixed_placeholders(gm, fixed)
    _drop_eval_identities(gm)
    einsums_as_matmuls(gm)
    route_through_inplace_ops(gm)
    propagate_shapes(gm, example, type(model).__name__)
    _keep_output_type(gm, model, example)
    gm.fxzip_capture = "fx"
    return gm


def _keep_output_type(gm: fx.GraphModule, model: torch.nn.Module, example: Batch) -> None:
    """A model that returns a dict subclass of tensors (transformers' `ModelOutput`) is traced as
    returning a plain dict: the graph then returns the tensors flat and `gm.fxzip_out_spec` keeps
    the model's own structure, which the merged model's heads return (as for exported graphs)."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    value = output.args[0]
    if not isinstance(value, dict) or not all(isinstance(v, fx.Node) for v in value.values()):
        return
    with torch.no_grad():
        real = _run(private_copy(model).eval(), example)
    if type(real) is dict or not isinstance(real, dict) or list(real) != list(value) \
            or not all(isinstance(v, torch.Tensor) for v in real.values()):
        return
    output.args = (tuple(value.values()),)
    gm.recompile()
    gm.fxzip_out_spec = pytree.tree_structure(real)


class _ShapedTracer(MetaTracer, FxzipTracer):
    """FxzipTracer whose proxies carry meta tensors of the example's shapes
    (`torch.fx.experimental.meta_tracer`), so that `x.shape` is concrete and branches on sizes
    are taken as the example takes them."""


class _ValueTracer(ValueTracing, FxzipTracer):
    """FxzipTracer whose proxies carry the example's values (`value_tracing`): control flow on
    sizes follows the example, sizes used in computations stay symbolic."""


def _example_values(model: torch.nn.Module, example: Batch) -> dict[str, Any]:
    """The example by forward's argument names (the values of the graph's placeholders)."""
    if isinstance(example, dict):
        return dict(example)
    return {next(iter(inspect.signature(model.forward).parameters)): example}


def _run(model: torch.nn.Module, example: Batch) -> Any:
    """The model's output for the example (a tensor: the first argument; a dict: keywords)."""
    return model(**example) if isinstance(example, dict) else model(example)


def _holds_meta_tensors(gm: fx.GraphModule) -> bool:
    """Whether a graph traced with meta tensors kept one as a parameter, buffer or constant."""
    tensors = [t for _, t in gm.named_parameters()] + [t for _, t in gm.named_buffers()]
    tensors += [v for v in vars(gm).values() if isinstance(v, torch.Tensor)]
    return any(t.is_meta for t in tensors)


def _meta_arguments(model: torch.nn.Module, example: Batch) -> dict[str, torch.Tensor]:
    """The example's tensors as meta tensors, by forward's argument names."""
    if isinstance(example, dict):
        return {k: v.to("meta") for k, v in example.items() if isinstance(v, torch.Tensor)}
    name = next(iter(inspect.signature(model.forward).parameters))
    return {name: example.to("meta")}


def fixed_arguments(model: torch.nn.Module, example: Batch,
                    concrete_args: dict | None = None) -> dict[str, Any]:
    """`concrete_args` for tracing: every argument of `forward` that the example does not give
    (the first one for a tensor, the dict's keys for a dict) fixed to its default; `concrete_args`
    override. A required argument that is not given is an InputError."""
    fixed = dict(concrete_args or {})
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # no signature to read: trace forward as it is
        return fixed
    named = [p for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if isinstance(example, dict):
        given = set(example)
        unknown = sorted(given - {p.name for p in named})
        if unknown and not any(p.kind == p.VAR_KEYWORD for p in parameters):
            raise InputError(
                f"the calibration batches give {unknown} but {type(model).__name__}.forward takes "
                f"{[p.name for p in named]}; a dict batch holds forward's keyword arguments")
        clash = sorted(given & set(fixed))
        if clash:
            raise InputError(f"{clash} are both in the calibration batches and in concrete_args; "
                             "give each forward argument once")
    else:
        given = {named[0].name} if named else set()
    for p in named:
        if p.name in given or p.name in fixed:
            continue
        if p.default is inspect.Parameter.empty:
            raise InputError(
                f"{type(model).__name__}.forward needs the argument {p.name!r} besides "
                f"{sorted(given)}: give calibration batches as dicts of forward's keyword "
                f"arguments, e.g. {{{', '.join(repr(q.name) for q in named)}: ...}}, or fix it "
                "with concrete_args=")
        fixed[p.name] = p.default
    return fixed


def _name_fixed_placeholders(gm: fx.GraphModule, fixed: dict[str, Any]) -> None:
    """torch.fx names the placeholder of a fixed argument `mask_1`: give the traced forward the
    argument's own name again (the traced graph checks the value stays the default)."""
    for node in gm.graph.nodes:
        if node.op == "placeholder" and isinstance(node.target, str):
            base, _, count = node.target.rpartition("_")
            if base in fixed and count.isdigit() and not any(
                    n.op == "placeholder" and n.target == base for n in gm.graph.nodes):
                node.target = base
    gm.recompile()


def _is_eval_stochastic_depth(node: fx.Node) -> bool:
    """torchvision's `stochastic_depth(x, p, mode, training)` with training False: an identity
    (torchvision marks it `torch.fx.wrap`, so it is a call in every traced graph)."""
    if node.op != "call_function" or getattr(node.target, "__name__", "") != "stochastic_depth" \
            or getattr(node.target, "__module__", "") != "torchvision.ops.stochastic_depth":
        return False
    training = node.args[3] if len(node.args) > 3 else node.kwargs.get("training", True)
    return training is False


def _drop_eval_identities(gm: fx.GraphModule) -> None:
    """Remove the calls that are identities in eval mode (the traced copy is in eval mode):
    their readers read their input."""
    for node in list(gm.graph.nodes):
        if _is_eval_stochastic_depth(node) and isinstance(node.args[0], fx.Node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.recompile()


def _matmul_form(equation: str) -> tuple[bool, bool] | None:
    """For a two-operand einsum that is a batched matrix product, whether the first and the
    second operand enter it transposed: "…ik,…kj->…ij" is (False, False), "…ik,…jk->…ij"
    (MaxViT's q·kᵀ) (False, True); None for any other equation."""
    equation = equation.replace(" ", "")
    if "->" not in equation or "." in equation:
        return None
    inputs, out = equation.split("->")
    operands = inputs.split(",")
    if len(operands) != 2:
        return None
    a, b = operands
    n = len(out)
    if len(a) != n or len(b) != n or n < 2 or len(set(out)) != n or \
            a[:-2] != out[:-2] or b[:-2] != out[:-2]:
        return None
    i, j = out[-2], out[-1]
    for ta in (False, True):
        rows_a = a[-2:][::-1] if ta else a[-2:]
        if rows_a[0] != i or rows_a[1] in out:
            continue
        k = rows_a[1]
        for tb in (False, True):
            rows_b = b[-2:][::-1] if tb else b[-2:]
            if rows_b == k + j:
                return ta, tb
    return None


def einsums_as_matmuls(gm: fx.GraphModule) -> None:
    """Rewrite `torch.einsum` calls that are batched matrix products (the same batch letters in
    both operands and the output, one contracted letter) as `torch.matmul` with transposes, the
    form fxzip's op rules follow (MaxViT's attention is written with einsum)."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.einsum or node.kwargs \
                or len(node.args) != 3 or not isinstance(node.args[0], str):
            continue
        form = _matmul_form(node.args[0])
        if form is None or not all(isinstance(a, fx.Node) for a in node.args[1:]):
            continue
        with gm.graph.inserting_before(node):
            a, b = node.args[1], node.args[2]
            if form[0]:
                a = gm.graph.call_method("transpose", (a, -2, -1))
            if form[1]:
                b = gm.graph.call_method("transpose", (b, -2, -1))
            product = gm.graph.call_function(torch.matmul, (a, b))
        node.replace_all_uses_with(product)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.recompile()
