"""The torch.export front end: a model captured by PyTorch's own exporter (non-strict) as a graph
of ATen ops, with parameters as get_attr nodes under the model's own names and the module path
of every node in its metadata. It is the capture path PyTorch and Hugging Face `transformers`
maintain, and it captures models that symbolic tracing cannot (transformers 5 has no fx tracer).

Its ATen ops become the torch calls the op-rule table knows (`fxzip.graph.aten`), and the
exported module is made a plain GraphModule that the passes can read and copy: the shape
guards export adds are dropped (the batch axis is left dynamic where the model allows, and the
length axis of token sequences where the graph then computes the model's outputs on shorter
sequences too: a checked export, else the example's length), forward
arguments fixed while exporting (`use_cache=False`, `concrete_args`) become optional inputs with
those values, and the model's output structure (a `ModelOutput`, a dict, a tuple) is kept in
`gm.fxzip_out_spec` while the graph returns its tensors flat. A parameter that several modules
share (tied input and output embeddings) is read by each module's ops under that module's own
name for it, as a symbolic trace's module calls read it (`own_parameter_names`).
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree

from ..errors import InputError, TraceError
from ..runtime.inputs import Batch, describe
from .aten import functional_from_aten
from .capture import einsums_as_matmuls
from .capture_errors import capture_error
from .module_calls import module_calls
from .nodes import module_attribute, private_copy, route_through_inplace_ops
from .shapes import propagate_shapes

__all__ = ["export", "restore_outputs"]

# forward arguments that only change what a model caches or returns besides its outputs: fixed
# while exporting where the batches do not give them (a decoder's key/value cache is not merged)
EXPORT_DEFAULTS = {"use_cache": False}


def export(model: nn.Module, example: Batch, *, concrete_args: dict | None = None
           ) -> fx.GraphModule:
    """Capture a private eval-mode copy of `model` with `torch.export` on `example` (a tensor,
    the first input, or a dict of `forward`'s keyword arguments) and annotate every node with its
    shape. TraceError naming the exporter's reason when it cannot."""
    private = private_copy(model).eval()
    kwargs = dict(example) if isinstance(example, dict) else {}
    args = () if isinstance(example, dict) else (example,)
    fixed = _fixed_arguments(model, kwargs, concrete_args)
    overlap = sorted(set(fixed) & set(kwargs))
    if overlap:
        raise InputError(f"{overlap} are both in the calibration batches and in concrete_args; "
                         "give each forward argument once")
    kwargs.update(fixed)
    _warm_up(private, args, kwargs)
    gm = None
    if _sequences(args, kwargs):  # token ids of any length, where the graph computes the same
        try:
            gm = _plain(torch.export.export(private, args, kwargs, strict=False, dynamic_shapes=
                                            _dynamic_axes(args, kwargs, True)).module(), fixed)
        except Exception:  # noqa: BLE001 - the batch axis alone is tried next
            gm = None
        if gm is not None and not _same_when_shorter(gm, private, args, kwargs):
            gm = None
    if gm is None:
        try:
            program = torch.export.export(private, args, kwargs, strict=False,
                                          dynamic_shapes=_dynamic_axes(args, kwargs, False))
        except Exception as exc:  # torch.export raises many types
            raise capture_error("torch.export", type(model).__name__, private, exc,
                                on=f" on {describe(example)}") from exc
        gm = _plain(program.module(), fixed)
    own_parameter_names(gm, private)
    functional_from_aten(gm)
    module_calls(gm, private)
    einsums_as_matmuls(gm)
    route_through_inplace_ops(gm)
    propagate_shapes(gm, example, type(model).__name__)
    return gm


def restore_outputs(gm: fx.GraphModule, flat: Any) -> Any:
    """The outputs of an exported graph in the model's own structure (as `gm(...)` returned them
    before `export` made them flat); `flat` as is for a graph of another front end."""
    spec = getattr(gm, "fxzip_out_spec", None)
    return flat if spec is None else pytree.tree_unflatten(list(flat), spec)


def own_parameter_names(gm: fx.GraphModule, model: nn.Module) -> int:
    """Have every op that reads a tensor several modules of `model` share read it under the name
    its own module gives it; return how many readers changed.

    torch.export reads a shared tensor under one of its names (tied input and output embeddings:
    one table is `model.embed_tokens.weight` and `lm_head.weight`, and both the lookup and the
    output layer read `lm_head.weight`). The two uses are opposite: the embedding's columns open
    the residual space (merged, M) while the output layer's columns read it (unmerged, U) and its
    rows open the vocabulary; one merged tensor cannot be both. Read by its modules' own names,
    as a symbolic trace's module calls read it, each module is one parameter to the analysis
    with its own use, and the merged model gives each its own merged tensor: the tie is undone
    (the trunk's embedding holds the merged table, each model's output layer its own copy, or
    its own merged copy where the output layer is zipped too). A module registered under two
    names (one module object) keeps one name, so its weights stay one parameter."""
    names: dict[int, list[str]] = {}
    for name, tensor in [*gm.named_parameters(remove_duplicate=False),
                         *gm.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(tensor), []).append(name)
    modules = dict(model.named_modules(remove_duplicate=False))
    moved = 0
    for node in [n for n in gm.graph.nodes if n.op == "get_attr"]:
        aliases = names.get(id(module_attribute(gm, node.target, None)), [])
        if len(aliases) < 2:
            continue
        readers = {n.target: n for n in gm.graph.nodes
                   if n.op == "get_attr" and n.target in aliases and n is not node}
        before = moved
        for user in list(node.users):
            own = _own_name(user, aliases, node.target, modules)
            if own == node.target:
                continue
            if own in readers:  # its own get_attr: moved up, to be read where `node` is
                node.prepend(readers[own])
            else:
                with gm.graph.inserting_after(node):
                    readers[own] = gm.graph.get_attr(own)
                readers[own].meta = dict(node.meta)
            user.replace_input_with(node, readers[own])
            moved += 1
        if moved > before and not node.users:
            gm.graph.erase_node(node)
    if moved:
        gm.recompile()
    return moved


def _own_name(user: fx.Node, aliases: list[str], target: str,
              modules: dict[str, nn.Module]) -> str:
    """The name of a shared tensor that the innermost module running `user` gives it where that
    module is another module object than the one `target` belongs to; `target` otherwise."""
    stack = [path for path, *_ in (user.meta.get("nn_module_stack") or {}).values()]
    owners = {alias.rpartition(".")[0]: alias for alias in aliases}
    current = modules.get(target.rpartition(".")[0])
    for path in reversed(stack):
        if path in owners:
            return owners[path] if modules.get(path) is not current else target
    return target


def _fixed_arguments(model: nn.Module, given: dict, concrete_args: dict | None) -> dict:
    """`concrete_args`, and `EXPORT_DEFAULTS` for the arguments `forward` takes that neither the
    batches nor `concrete_args` give."""
    fixed = dict(concrete_args or {})
    try:
        names = set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # no signature to read
        return fixed
    for name, value in EXPORT_DEFAULTS.items():
        if name in names and name not in given and name not in fixed:
            fixed[name] = value
    return fixed


def _warm_up(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Run the private copy once before exporting it, so that a module which caches a tensor in
    its first forward (timm's ConViT: `self.rel_indices`) is captured in the same state in every
    model: reading its cache, not computing it. A failure here is left to the exporter to report."""
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception:  # noqa: BLE001 - torch.export reports the same failure with its context
        pass


def _sequences(args: tuple, kwargs: dict) -> bool:
    """Whether the inputs hold token sequences: integer or bool (batch, length) tensors."""
    return any(_is_sequence(v) for v in (*args, *kwargs.values()))


def _is_sequence(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 2 and \
        not value.is_floating_point() and value.shape[1] > 2


def _dynamic_axes(args: tuple, kwargs: dict, sequence: bool) -> Any:
    """Dynamic shapes for `torch.export`: the first axis of every tensor input automatic (dynamic
    where the model allows it, else the example's size); with `sequence` also the length axis of
    token sequences (input ids, attention masks)."""
    def spec(value: Any) -> Any:
        if not isinstance(value, torch.Tensor) or not value.dim():
            return None
        axes = {0: torch.export.Dim.AUTO}
        if sequence and _is_sequence(value):
            axes[1] = torch.export.Dim.AUTO
        return axes
    return {key: spec(value) for key, value in kwargs.items()} if kwargs else \
        tuple(spec(value) for value in args)


def _same_when_shorter(gm: fx.GraphModule, model: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether the graph exported with a dynamic length computes what the model computes on
    sequences one token shorter (a graph that specialised a length somewhere would not)."""
    def shorter(value: Any) -> Any:
        return value[:, :-1] if _is_sequence(value) else value
    short_args, short_kwargs = tuple(map(shorter, args)), \
        {k: shorter(v) for k, v in kwargs.items()}
    try:
        with torch.no_grad():
            got = pytree.tree_leaves(gm(*short_args, **short_kwargs))
            want = pytree.tree_leaves(model(*short_args, **short_kwargs))
    except Exception:  # noqa: BLE001 - a graph that cannot take another length is not kept
        return False
    got = [t for t in got if isinstance(t, torch.Tensor)]
    want = [t for t in want if isinstance(t, torch.Tensor)]
    return len(got) == len(want) and all(
        g.shape == w.shape and torch.allclose(g, w, rtol=1e-4, atol=1e-5)
        for g, w in zip(got, want))


def _plain(gm: fx.GraphModule, fixed: dict) -> fx.GraphModule:
    """The exported module as a plain GraphModule: no shape guards, fixed arguments optional (with
    the values they were exported with), flat outputs (their structure in `fxzip_out_spec`), each
    node's module stack keyed by module path (`stop_at="model.layers.3"`)."""
    graph = gm.graph
    codegen = graph._codegen
    out_spec = getattr(getattr(codegen, "pytree_info", None), "out_spec", None)
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            graph.erase_node(node)
        elif node.op == "placeholder" and node.target in fixed:
            node.args = (fixed[node.target],)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    graph._codegen = fx.graph.CodeGen()
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = (tuple(output.args[0]) if isinstance(output.args[0], (list, tuple))
                   else output.args[0],)
    for node in graph.nodes:  # module paths as keys, as symbolic traces have them
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {path: (path, kind) for path, kind in stack.values()
                                            if path and not path.startswith("_empty_nn_module")}
    plain = fx.GraphModule(gm, graph, gm.__class__.__name__)
    plain.fxzip_out_spec = out_spec
    plain.fxzip_capture = "export"
    return plain
