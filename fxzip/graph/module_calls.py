"""Exported graphs call the model's own layers again: `F.linear(x, W, b)` whose weight and bias
are an `nn.Linear`'s own tensors becomes a call of that module (the same for convolutions and
BatchNorm in eval mode), as a symbolic trace has it. The passes after capture then see one
vocabulary for both front ends: the corrections refit and reset layers by module, the report
and stop points name them, the merged model holds the model's own module classes."""
from __future__ import annotations

from typing import Any, Callable

import torch.nn.functional as F
from torch import fx, nn

_CONV_KEYS = ("stride", "padding", "dilation", "groups")


def _linear(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    if type(module) is not nn.Linear:  # a subclass may compute more
        return None
    return _tensors(args[1:3], kwargs, ("weight", "bias"))


def _conv(kind: type) -> Callable[[nn.Module, tuple, dict], dict[str, Any] | None]:
    def match(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any] | None:
        if type(module) is not kind or module.padding_mode != "zeros":
            return None
        given = dict(zip(_CONV_KEYS, args[3:]))
        given.update({k: v for k, v in kwargs.items() if k in _CONV_KEYS})
        defaults = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1}
        spatial = len(module.kernel_size)
        for key in _CONV_KEYS:
            value = given.get(key, defaults[key])
            if _spread(value, spatial) != _spread(getattr(module, key), spatial):
                return None
        return _tensors(args[1:3], kwargs, ("weight", "bias"))
    return match


def _spread(value: Any, spatial: int) -> Any:
    """A convolution setting as a tuple per spatial axis (`1` → `(1, 1)`); strings as they are."""
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return (value,) * spatial
    return tuple(value)


def _batch_norm(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    # F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if not isinstance(module, nn.modules.batchnorm._BatchNorm) or type(module).forward is not \
            nn.modules.batchnorm._BatchNorm.forward or module.training:
        return None
    rest = list(args[5:]) + [None] * 3
    if rest[0] or not module.track_running_stats or \
            (rest[2] is not None and abs(rest[2] - module.eps) > 1e-12):
        return None
    return _tensors(args[1:5], kwargs, ("running_mean", "running_var", "weight", "bias"))


MODULE_CALLS: dict[Any, Callable[[nn.Module, tuple, dict], dict[str, Any] | None]] = {
    F.linear: _linear,
    F.conv1d: _conv(nn.Conv1d), F.conv2d: _conv(nn.Conv2d), F.conv3d: _conv(nn.Conv3d),
    F.batch_norm: _batch_norm,
}


def module_calls(gm: fx.GraphModule, model: nn.Module) -> int:
    """Replace every functional layer of `gm` whose tensors are exactly one module's of `model`
    (its weight and bias, read by get_attr under that module's names) with a call of the module;
    return how many were replaced. `model` is the private copy `gm` was captured from; its
    modules are put into `gm`."""
    modules = dict(model.named_modules())
    replaced = 0
    for node in list(gm.graph.nodes):
        match = MODULE_CALLS.get(node.target) if node.op == "call_function" else None
        if match is None or not node.args:
            continue
        owner = _owner(node)
        module = modules.get(owner) if owner is not None else None
        if module is None:
            continue
        reads = match(module, node.args, node.kwargs)
        if reads is None or not _reads_own_tensors(owner, module, reads):
            continue
        attributes = [n for n in node.all_input_nodes if n.op == "get_attr"]
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(owner, (node.args[0],))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        for attribute in attributes:
            if not attribute.users:
                gm.graph.erase_node(attribute)
        _put_module(gm, owner, module)
        replaced += 1
    if replaced:
        gm.graph.lint()
        gm.recompile()
    return replaced


def _owner(node: fx.Node) -> str | None:
    """The module whose tensor the op's first tensor argument after the input reads (a layer's
    weight, a BatchNorm's running mean): its get_attr's owner."""
    first = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    if isinstance(first, fx.Node) and first.op == "get_attr" and "." in first.target:
        return first.target.rpartition(".")[0]
    return None


def _tensors(values: tuple, kwargs: dict, names: tuple[str, ...]) -> dict[str, Any]:
    """What each tensor argument reads, by its name (positional, then keyword; None if not
    given): a get_attr's target, or the argument itself."""
    given = dict(zip(names, values))
    given.update({k: v for k, v in kwargs.items() if k in names})
    return {name: given[name].target if isinstance(given.get(name), fx.Node) and
            given[name].op == "get_attr" else given.get(name) for name in names}


def _reads_own_tensors(owner: str, module: nn.Module, reads: dict[str, Any]) -> bool:
    """Whether each tensor argument reads the module's own tensor of that name (and nothing
    where the module has none)."""
    for name, target in reads.items():
        own = getattr(module, name, None)
        if own is None and target is None:
            continue
        if own is None or target != f"{owner}.{name}":
            return False
    return True


def _put_module(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    """`module` at `path` in `gm`, in place of the container export made there; tensors the
    graph still reads there stay readable (the module holds them under the same names)."""
    parent, _, name = path.rpartition(".")
    holder = gm.get_submodule(parent) if parent else gm
    old = getattr(holder, name, None)
    if old is module:
        return
    if isinstance(old, nn.Module):
        for child, value in old.named_children():  # nothing of the container is lost
            if not hasattr(module, child):
                module.add_module(child, value)
    setattr(holder, name, module)
