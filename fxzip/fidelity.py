"""Fidelity: how well each head of a merged model reproduces its own parent model's outputs, on
unlabelled data (a held-out slice of the calibration data, say) — a label-free quality measure of
a merge, for choosing settings and corrections without labels."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from .errors import InputError

__all__ = ["Fidelity", "fidelity"]


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


def _heads(output: object) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in output):
        return list(output)
    raise InputError("fidelity() needs models whose outputs are tensors (one per head)")


@torch.no_grad()
def fidelity(merged: nn.Module, parents: Sequence[nn.Module], inputs: Iterable[torch.Tensor]) -> Fidelity:
    """Compare head k of `merged` with `parents[k]` on `inputs` (tensor batches). A merged model
    with one shared output is compared with every parent."""
    diff = [0.0] * len(parents)
    norm = [0.0] * len(parents)
    kl = [0.0] * len(parents)
    agree = [0.0] * len(parents)
    rows = 0
    training = [merged.training] + [p.training for p in parents]
    merged.eval()
    for p in parents:
        p.eval()
    try:
        for x in inputs:
            heads = _heads(merged(x))
            if len(heads) == 1:
                heads = heads * len(parents)
            if len(heads) != len(parents):
                raise InputError(f"the merged model has {len(heads)} outputs for {len(parents)} parents")
            for k, (h, p) in enumerate(zip(heads, parents)):
                ref = p(x)
                diff[k] += (h - ref).double().square().sum().item()
                norm[k] += ref.double().square().sum().item()
                if ref.dim() >= 1 and ref.shape[-1] > 1:
                    log_p, log_q = ref.double().log_softmax(-1), h.double().log_softmax(-1)
                    kl[k] += (log_p.exp() * (log_p - log_q)).sum(-1).sum().item()
                    agree[k] += (h.argmax(-1) == ref.argmax(-1)).double().sum().item()
            rows += heads[0].reshape(-1, heads[0].shape[-1]).shape[0] if heads[0].dim() else 1
    finally:
        merged.train(training[0])
        for p, t in zip(parents, training[1:]):
            p.train(t)
    if rows == 0:
        raise InputError("fidelity() needs at least one input batch")
    return Fidelity([(d / max(n, 1e-300)) ** 0.5 for d, n in zip(diff, norm)],
                    [k / rows for k in kl], [a / rows for a in agree])
