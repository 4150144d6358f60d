"""Which layers of a merged model the corrections pass corrects: each with its parents' layers and
fit point (the layer, or the affine BatchNorm after it), and why the others are not."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .settings import Corrections

__all__ = ["Layer", "plan", "origin", "MAX_REFIT_INPUTS"]

_BN = nn.modules.batchnorm._BatchNorm


@dataclass
class Layer:
    """One correctable layer of the merged model."""

    node: str                 # merged node of the layer
    module: str               # its module target in the merged model
    head: int | None          # None: trunk; k: head of model k
    parent_nodes: dict[int, str]  # the fit point's node in graph k (every k for the trunk)
    fit_node: str             # the fit point's node in the merged graph (the layer or its BN)
    bn: str | None            # merged BN module target when the fit point is a BN
    refit: bool
    repair: bool
    pending_bias: bool | None = None  # refitted with its BN: the BN's statistics are kept
    error_before: float | None = None
    axis: int = 1             # the channel axis at the fit point
    targets: list[torch.Tensor] | None = None
    target_stats: tuple[torch.Tensor, torch.Tensor] | None = None


def _producers_between(graph: fx.Graph, is_layer: set[str]) -> tuple[set[str], set[str]]:
    """(layers that read no other layer upstream, layers with no layer downstream)."""
    upstream_layer: dict[str, bool] = {}
    for node in graph.nodes:
        upstream_layer[node.name] = any(
            (a.name in is_layer) or upstream_layer.get(a.name, False) for a in node.all_input_nodes)
    downstream_layer: dict[str, bool] = {}
    for node in reversed(list(graph.nodes)):
        downstream_layer[node.name] = any(
            (u.name in is_layer) or downstream_layer.get(u.name, False) for u in node.users)
    first = {n for n in is_layer if not upstream_layer[n]}
    last = {n for n in is_layer if not downstream_layer[n]}
    return first, last


def _fit_point(graph: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The affine BatchNorm that is `node`'s only user (and reads nothing else), if any."""
    users = list(node.users)
    if len(users) != 1 or users[0].op != "call_module" or len(users[0].args) != 1 \
            or users[0].kwargs:
        return None
    module = graph.get_submodule(users[0].target)
    if isinstance(module, _BN) and module.affine and module.track_running_stats \
            and module.running_mean is not None:
        return users[0]
    return None


# A refit solves a d × d float64 system (d = in-features × kernel size; with its float32 products
# and factor, about two such matrices at once). Above this d (0.5 GB each) a layer is left as
# merged: VGG's 7×7 ConvMlp and torchvision's 25088-input classifier would need 5 GB each (and
# are fitted on far fewer rows than d).
MAX_REFIT_INPUTS = 8192


def _why_not(module: nn.Module) -> str | None:
    """Why a Linear/Conv module cannot be corrected (None: it can; "" : not a layer kind at all)."""
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) and \
            module.weight[0].numel() > MAX_REFIT_INPUTS:
        return (f"{module.weight[0].numel()} inputs per output (in-features × kernel): its "
                f"least-squares system would be too large (limit {MAX_REFIT_INPUTS})")
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.groups != 1:
            return f"grouped convolution (groups={module.groups})"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
        if isinstance(module.padding, str) and module.padding != "valid":
            return f"padding={module.padding!r}"
        return None
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return f"{type(module).__name__} layers are not refitted"
    return ""


def origin(node: fx.Node, pairing: Any, num_models: int) -> dict[int, str] | None:
    """The parent nodes a merged node computes: {k: graph k's node} for every model (a trunk
    node, through the pairing) or for its own model only (a head node); None if unknown."""
    recorded = node.meta.get("fxzip_origin")
    if recorded is None:
        return None
    head, name = recorded
    if head is not None:
        return {head: name}
    if pairing is None:
        return {k: name for k in range(num_models)}
    try:
        return {k: pairing.name(k, name) if k else name for k in range(num_models)}
    except KeyError:
        return None


def plan(merged: fx.GraphModule, graphs: Sequence[fx.GraphModule], options: Corrections,
          pairing: Any = None) -> tuple[list[Layer], dict[str, str]]:
    """The correctable layers of `merged`, each with its parents' fit-point nodes, and the
    layers left uncorrected with the reason (merged module name -> reason). A merged node's
    parents are found by the provenance the rewrite records on it (`fxzip_origin`: graph 0's node
    for the trunk, read in graph k through the pairing; model k's own node for a head)."""
    calls: dict[str, int] = {}
    for node in merged.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    nodes = [{n.name: n for n in g.graph.nodes} for g in graphs]
    parent_calls = []
    for g in graphs:
        counts: dict[str, int] = {}
        for n in g.graph.nodes:
            if n.op == "call_module":
                counts[n.target] = counts.get(n.target, 0) + 1
        parent_calls.append(counts)
    skipped: dict[str, str] = {}
    candidates: dict[str, tuple[int | None, fx.Node, list[fx.Node]]] = {}
    for node in merged.graph.nodes:
        if node.op != "call_module":
            continue
        why = _why_not(merged.get_submodule(node.target))
        if why == "":
            continue
        if why is None and calls[node.target] != 1:
            why = f"module called {calls[node.target]} times (shared weights)"
        if why is None and (len(node.args) != 1 or node.kwargs):
            why = "called with more than one input"
        parents = origin(node, pairing, len(graphs))
        if why is None and parents is None:
            why = "no parent layer known for it"
        partners: list[fx.Node] = []
        if why is None:
            for k, name in parents.items():
                partner = nodes[k].get(name)
                if partner is None or partner.op != "call_module":
                    why = f"model {k}'s layer not found"
                elif parent_calls[k][partner.target] != 1:
                    why = (f"model {k}'s module '{partner.target}' is called "
                           f"{parent_calls[k][partner.target]} times")
                else:
                    partners.append(partner)
                    continue
                break
        if why is not None:
            skipped.setdefault(node.target, why)
            continue
        head = node.meta["fxzip_origin"][0]
        candidates[node.name] = (head, node, partners)
    head_layers = {name for name, (k, _, _) in candidates.items() if k is not None}
    first_layers, last_layers = _producers_between(merged.graph, head_layers)
    chosen = {"none": set(), "all": head_layers, "first": first_layers, "last": last_layers,
              "first+last": first_layers | last_layers}[options.refit_heads]
    layers = []
    for name, (head, node, partners) in candidates.items():
        refit = options.refit_trunk if head is None else name in chosen
        repair = options.repair and (head is None or options.refit_heads == "none" or name in chosen)
        if not (refit or repair):
            continue
        bn = _fit_point(merged, node)
        graph_of = [head] if head is not None else list(range(len(graphs)))
        parent_bns = [_fit_point(graphs[k], p) for k, p in zip(graph_of, partners)]
        if bn is not None and all(b is not None for b in parent_bns):
            fits = {k: b.name for k, b in zip(graph_of, parent_bns)}
            layers.append(Layer(name, node.target, head, fits, bn.name, bn.target, refit, repair))
        else:
            fits = {k: p.name for k, p in zip(graph_of, partners)}
            layers.append(Layer(name, node.target, head, fits, name, None, refit, repair))
    return layers, skipped
