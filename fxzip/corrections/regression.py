"""The least-squares refit of one layer: its inputs as patch rows (im2col), its outputs as rows,
and the ridge regression toward its current weights on the sums of every rank."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..runtime.sampling import kept_rows
from .channels import reduce

__all__ = ["patches", "output_rows", "output_rows_at", "weight_matrix", "set_weight",
           "squared_norm", "ridge_change"]



# -- layers -----------------------------------------------------------------------------------------
def patches(module: nn.Module, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The (rows, d) matrix of a layer's inputs, one row per output position (im2col); with
    `rows` (a mask over all of them, sample-major) only those rows, gathered straight from the
    input without unfolding the rest (the same values in the same order)."""
    if isinstance(module, nn.Linear):
        flat = x.reshape(-1, x.shape[-1])
        return flat if rows is None else flat[rows]
    padding = 0 if isinstance(module.padding, str) else module.padding
    if isinstance(module, nn.Conv1d):
        pad = padding if isinstance(padding, int) else padding[0]
        args = ((1, module.kernel_size[0]), (1, module.dilation[0]), (0, pad), (1, module.stride[0]))
        x = x.unsqueeze(2)
    else:
        args = (module.kernel_size, module.dilation, padding, module.stride)
    if rows is not None:
        return _gathered_patches(x, rows, *args)
    cols = F.unfold(x, args[0], dilation=args[1], padding=args[2], stride=args[3])
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _gathered_patches(x: torch.Tensor, rows: torch.Tensor, kernel: Any, dilation: Any,
                      padding: Any, stride: Any) -> torch.Tensor:
    """The rows of `F.unfold(x, ...)`'s patch matrix (sample-major, (C·kh·kw) columns in unfold's
    order) selected by the mask `rows`, by indexing the zero-padded input at the kept positions."""
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = map(_pair, (kernel, dilation, padding, stride))
    n, c, h, w = x.shape
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    index = rows.nonzero().flatten().to(x.device)
    sample, position = index // (oh * ow), index % (oh * ow)
    top, left = (position // ow) * sh, (position % ow) * sw
    padded = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    i = top[:, None, None] + (torch.arange(kh, device=x.device) * dh)[None, :, None]
    j = left[:, None, None] + (torch.arange(kw, device=x.device) * dw)[None, None, :]
    patches = padded[sample[:, None, None], :, i, j]  # (kept, kh, kw, C)
    return patches.permute(0, 3, 1, 2).reshape(len(index), c * kh * kw)


def output_rows(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """A layer's (or its BatchNorm's) output as (rows, out), rows in the order of `patches`."""
    if isinstance(module, nn.Linear):
        return y.reshape(-1, y.shape[-1])
    return y.movedim(1, -1).reshape(-1, y.shape[1])


def output_rows_at(module: nn.Module, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`output_rows(module, y)[rows]` (`rows` a mask over all rows, sample-major) gathered straight
    from `y`, without first copying every row into the channels-last layout."""
    if isinstance(module, nn.Linear):
        return y.reshape(-1, y.shape[-1])[rows.to(y.device)]
    flat = y.reshape(y.shape[0], y.shape[1], -1)
    index = rows.nonzero().flatten().to(y.device)
    return flat[index // flat.shape[2], :, index % flat.shape[2]]


def weight_matrix(module: nn.Module) -> torch.Tensor:
    return module.weight.detach().reshape(module.weight.shape[0], -1)


def set_weight(module: nn.Module, matrix: torch.Tensor, bias: torch.Tensor | None) -> None:
    weight = module.weight
    module.weight = nn.Parameter(matrix.reshape(weight.shape).to(weight.dtype),
                                 requires_grad=weight.requires_grad)
    if bias is not None:
        module.bias = nn.Parameter(bias.to(weight.dtype), requires_grad=weight.requires_grad)


def squared_norm(v: torch.Tensor) -> float:
    """Σ v², as a Python float (float32 norm: ample for a reported relative error)."""
    return float(torch.linalg.vector_norm(v.float())) ** 2


def ridge_change(module: nn.Module, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor],
                 targets: Sequence[torch.Tensor], keys: Sequence[torch.Tensor], *, ridge: float,
                 max_rows: int | None, intercept: bool,
                 group: Any = None) -> tuple[torch.Tensor | None, float, float]:
    """The ridge regression of a layer's effective map toward its targets, on the sums of every
    rank: ``Δ = (XᵀX + λI)⁻¹ Xᵀ (T - Y)`` with ``X`` the layer's patch rows of `inputs` (``[X 1]``
    with an almost free `intercept`), ``Y`` its current `outputs` (one tensor per batch each),
    λ = ridge · trace(XᵀX)/d; at most about `max_rows` rows of all ranks enter (each batch's kept
    by its samples' `keys`). Returns (Δ, (d [+ 1]) × outputs, None if no rank has a row;
    Σ (T - Y)²; Σ T²): the last two the error before the fit."""
    d, width = module.weight[0].numel(), module.weight.shape[0]
    gram = torch.zeros(d + 1, d + 1, dtype=torch.float64)
    cross = torch.zeros(d + 1, width, dtype=torch.float64)
    counts = torch.tensor([float(sum(y.numel() // width for y in outputs))], dtype=torch.float64)
    reduce([counts], group)  # the rows of every rank
    total_rows = counts.item()
    keep = 1.0 if max_rows is None else min(1.0, max_rows / max(total_rows, 1.0))
    errors = torch.zeros(2, dtype=torch.float64)  # Σ (t - y)², Σ t²: the error before
    for x, y, t, key in zip(inputs, outputs, targets, keys):
        difference = t - y
        errors[0] += squared_norm(difference)
        errors[1] += squared_norm(t)
        if keep < 1.0:  # the kept rows only, gathered without copying the others
            kept = kept_rows(key, y.numel() // width, keep).to(x.device)
            rows, residual = patches(module, x, kept), output_rows_at(module, difference, kept)
        else:
            rows, residual = patches(module, x), output_rows(module, difference)
        # [X 1]ᵀ[X 1] and [X 1]ᵀR by blocks (no copy of X with a column of ones appended),
        # float32 products added into the float64 sums in place
        gram[:d, :d].add_((rows.T @ rows).cpu())
        sums = rows.sum(0).double().cpu()
        gram[:d, d].add_(sums)
        gram[d, :d].add_(sums)
        gram[d, d] += rows.shape[0]
        cross[:d].add_((rows.T @ residual).cpu())
        cross[d].add_(residual.sum(0).double().cpu())
    reduce([gram, cross, errors], group)  # the sums of every rank before the solve
    before_num, before_den = errors.tolist()
    if gram[d, d] == 0:
        return None, before_num, before_den
    if not intercept:  # no parameter to hold one: fit through the origin
        gram, cross = gram[:d, :d], cross[:d]
    lam = ridge * gram.diagonal()[:d].mean().clamp_min(1e-12)
    penalty = torch.full((gram.shape[0],), float(lam), dtype=torch.float64)
    if intercept:
        penalty[d] = lam * 1e-6  # the intercept is (almost) free
    system = gram  # not needed after the solve: the penalty is added in place
    system.diagonal().add_(penalty)
    factor, info = torch.linalg.cholesky_ex(system)
    delta = torch.cholesky_solve(cross, factor) if int(info) == 0 \
        else torch.linalg.lstsq(system, cross).solution
    return delta, before_num, before_den
