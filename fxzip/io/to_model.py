"""Back into the ecosystem: a merged model that kept its inputs' architecture (one shared output,
every space at width 1) loaded into the input model's own class, under its parameter names — a
timm model that `load_state_dict` takes, a transformers model that `save_pretrained` writes."""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from ..errors import InputError
from ..runtime.inputs import call_model

__all__ = ["to_model"]

UNTIED = "fxzip_untied"  # attribute of a merged model: {its own tensor's name: the name it reads}
# constants a capture lifts out of the model's code (torch.export, torch.fx): the class makes them
CONSTANTS = ("lifted_tensor_", "_tensor_constant")


def to_model(merged: fx.GraphModule, like: nn.Module, example: Any = None, *,
             atol: float = 1e-4) -> nn.Module:
    """A new instance of `like`'s class (a deep copy; `like` is not modified) holding `merged`'s
    weights under `like`'s own parameter and buffer names, for a merge that kept the architecture:
    `fxzip.merge(a, b, batches, shared_output=True)` at width 1. Weights the inputs tied (an output
    layer that is the input embedding) but the merge gave different values are untied (a
    transformers config gets `tie_word_embeddings=False`, so `save_pretrained` and `from_pretrained`
    keep both). `example` (a batch as `merge` takes it): both models are run on it and an
    `InputError` is raised where their outputs differ by more than `atol` (relative to the largest
    output) — the check that the class computes what the merged graph computes. InputError where
    the merge has one head per model, a widened space, or a tensor the class has no place for."""
    if not isinstance(merged, fx.GraphModule) or not hasattr(merged, "fxzip_trunk"):
        raise InputError(f"to_model takes a model made by fxzip.merge, not a "
                         f"{type(merged).__name__}")
    if not isinstance(like, nn.Module):
        raise InputError(f"like= must be the torch.nn.Module whose class the merged model is "
                         f"given back as (one of the merged models), not a {type(like).__name__}")
    places = dict(like.named_parameters(remove_duplicate=False))
    places.update(like.named_buffers(remove_duplicate=False))
    values = _merged_tensors(merged)
    _check_fits(values, places, type(like).__name__)
    model = copy.deepcopy(like)
    targets = dict(model.named_parameters(remove_duplicate=False))
    targets.update(model.named_buffers(remove_duplicate=False))
    untied = _load(model, targets, values)
    if untied and hasattr(getattr(model, "config", None), "tie_word_embeddings"):
        model.config.tie_word_embeddings = False
    if example is not None:
        _check_outputs(merged, model, example, atol)
    return model


def _merged_tensors(merged: fx.GraphModule) -> dict[str, torch.Tensor]:
    """The merged model's tensors by the input model's names (its untied copies under the name of
    the tensor they were tied to, listed once per name), without the constants of the code."""
    renamed = getattr(merged, UNTIED, {})
    values: dict[str, torch.Tensor] = {}
    for name, tensor in [*merged.named_parameters(), *merged.named_buffers()]:
        if not name.rpartition(".")[2].startswith(CONSTANTS):
            values[renamed.get(name, name)] = tensor
    return values


def _check_fits(values: dict[str, torch.Tensor], places: dict[str, torch.Tensor],
                cls: str) -> None:
    heads = sorted(n for n in values if n not in places)
    if heads:
        per_model = any(n.split(".", 2)[1:2] and n.split(".", 2)[1].isdigit() for n in heads)
        hint = ("it has one head per model: merge with shared_output=True (models trained into "
                "one output space, e.g. language models over one vocabulary) to get one model "
                "back" if per_model else
                "it computes something the class does not hold (a correction or an op of its "
                "own); merge with corrections=None, or use the merged model as it is")
        raise InputError(f"the merged model is not a {cls}: {len(heads)} tensor(s) have no place "
                         f"in it, e.g. {heads[0]!r}; {hint}")
    wrong = [(n, tuple(v.shape), tuple(places[n].shape)) for n, v in values.items()
             if v.shape != places[n].shape]
    if wrong:
        name, got, want = wrong[0]
        raise InputError(f"the merged model is not a {cls}: {len(wrong)} tensor(s) have other "
                         f"shapes than the model's, e.g. {name!r} {got} for {want}; merge with "
                         f"width=1 (every layer as wide as the inputs') to get one model back")


@torch.no_grad()
def _load(model: nn.Module, targets: dict[str, torch.Tensor],
          values: dict[str, torch.Tensor]) -> list[str]:
    """Copy `values` into `model`'s tensors; a tensor the model shares under two names that were
    given different values is split (the later name gets a parameter of its own). The names that
    were untied."""
    written: dict[int, torch.Tensor] = {}  # id of a model tensor -> the value written into it
    untied = []
    for name in sorted(values, key=lambda n: n not in dict(model.named_parameters())):
        target, value = targets[name], values[name]
        seen = written.get(id(target))
        if seen is not None and not torch.equal(seen, value):
            owner, _, attribute = name.rpartition(".")
            module = model.get_submodule(owner)
            fresh = nn.Parameter(value.detach().to(target).clone(),
                                 requires_grad=target.requires_grad)
            setattr(module, attribute, fresh)
            untied.append(name)
            continue
        target.copy_(value.to(target))
        written[id(target)] = value
    return untied


def _check_outputs(merged: fx.GraphModule, model: nn.Module, example: Any, atol: float) -> None:
    def tensors(module: nn.Module) -> list[torch.Tensor]:
        with torch.no_grad():
            return [t for t in pytree.tree_leaves(call_model(module, example))
                    if isinstance(t, torch.Tensor)]

    was = model.training
    want, got = tensors(merged.eval()), tensors(model.eval())
    model.train(was)
    if len(want) != len(got):
        raise InputError(f"to_model: the {type(model).__name__} returns {len(got)} tensors where "
                         f"the merged model returns {len(want)}")
    scale = max((w.abs().max().item() for w in want if w.is_floating_point()), default=1.0)
    worst = max(((w.float() - g.float()).abs().max().item() for w, g in zip(want, got)
                 if w.is_floating_point()), default=0.0)
    if worst > atol * max(scale, 1.0):
        raise InputError(f"to_model: the {type(model).__name__} with the merged weights differs "
                         f"from the merged model by {worst:.3g} on the example (largest output "
                         f"{scale:.3g}); the merged graph computes something the class does not: "
                         f"use the merged model as it is")
