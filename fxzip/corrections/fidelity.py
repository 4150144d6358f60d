"""Fidelity: how well each head of a merged model reproduces its own parent model's outputs, on
unlabelled data (a held-out slice of the calibration data, say) — a label-free quality measure of
a merge, for choosing settings and corrections without labels (`fxzip.corrections.auto_settings`)."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import InputError
from ..runtime.inputs import Batch, call_model

__all__ = ["Fidelity", "fidelity", "parent_outputs", "MEASURES"]

# the measures a merge can be scored by (lower is better), see `Fidelity.score`
MEASURES = ("kl", "relative_error")


@dataclass
class Fidelity:
    """Per head k: `relative_error[k]` = ‖out_k − parent_k‖ / ‖parent_k‖ over all inputs (0 =
    exact); `kl[k]` = mean KL(softmax(parent_k) ‖ softmax(out_k)) over the last axis (per row);
    `agreement[k]` = share of rows whose argmax equals the parent's."""

    relative_error: list[float]
    kl: list[float]
    agreement: list[float]

    @property
    def mean_relative_error(self) -> float:
        return sum(self.relative_error) / len(self.relative_error)

    @property
    def mean_kl(self) -> float:
        return sum(self.kl) / len(self.kl)

    def score(self, measure: str = "kl") -> float:
        """One number per merge, lower is better: the mean over heads of `measure` (one of
        MEASURES)."""
        if measure == "kl":
            return self.mean_kl
        if measure == "relative_error":
            return self.mean_relative_error
        raise InputError(f"unknown fidelity measure {measure!r}; choose one of {', '.join(MEASURES)}")


def _heads(output: object) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in output):
        return list(output)
    raise InputError("fidelity() needs models whose outputs are tensors (one per head)")


@torch.no_grad()
def parent_outputs(parents: Sequence[nn.Module], inputs: Iterable[Batch]) -> list[list[torch.Tensor]]:
    """The parents' outputs on `inputs` (per batch, the heads of every parent in order, a merged
    parent contributing each of its heads), in eval mode: `fidelity(..., references=)` takes
    them so that many merges can be scored against one forward of the parents."""
    training = [p.training for p in parents]
    for p in parents:
        p.eval()
    try:
        return [[h for p in parents for h in _heads(call_model(p, x))] for x in inputs]
    finally:
        for p, t in zip(parents, training):
            p.train(t)


@torch.no_grad()
def fidelity(merged: nn.Module, parents: Sequence[nn.Module], inputs: Iterable[Batch], *,
             references: Sequence[Sequence[torch.Tensor]] | None = None) -> Fidelity:
    """Compare head k of `merged` with `parents[k]` on `inputs` (tensor batches or dicts of
    forward's keyword arguments). A merged model with one shared output is compared with every
    parent. `references`: the parents' outputs from `parent_outputs(parents, inputs)` (the
    parents are then not run)."""
    inputs = list(inputs)
    refs = parent_outputs(parents, inputs) if references is None else references
    if len(refs) != len(inputs):
        raise InputError(f"fidelity(): {len(refs)} reference batches for {len(inputs)} input batches")
    count = len(refs[0]) if refs else len(parents)
    diff, norm, kl, agree = ([0.0] * count for _ in range(4))
    rows = 0
    training = merged.training
    merged.eval()
    try:
        for x, ref_heads in zip(inputs, refs):
            heads = _heads(call_model(merged, x))
            if len(heads) == 1:
                heads = heads * len(ref_heads)
            if len(heads) != len(ref_heads):
                raise InputError(f"the merged model has {len(heads)} outputs for {len(ref_heads)} "
                                 "parent outputs")
            for k, (h, ref) in enumerate(zip(heads, ref_heads)):
                diff[k] += (h - ref).double().square().sum().item()
                norm[k] += ref.double().square().sum().item()
                if ref.dim() >= 1 and ref.shape[-1] > 1:
                    log_p, log_q = ref.double().log_softmax(-1), h.double().log_softmax(-1)
                    kl[k] += (log_p.exp() * (log_p - log_q)).sum(-1).sum().item()
                    agree[k] += (h.argmax(-1) == ref.argmax(-1)).double().sum().item()
            rows += heads[0].reshape(-1, heads[0].shape[-1]).shape[0] if heads[0].dim() else 1
    finally:
        merged.train(training)
    if rows == 0:
        raise InputError("fidelity() needs at least one input batch")
    return Fidelity([(d / max(n, 1e-300)) ** 0.5 for d, n in zip(diff, norm)],
                    [k / rows for k in kl], [a / rows for a in agree])
