"""The least-squares refit of one layer: its inputs as patch rows (im2col), its outputs as rows,
and the ridge regression toward its current weights on the sums of every rank."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..runtime.distributed import is_distributed
from ..runtime.moments import add_upper_product, upper_blocks
from ..runtime.sampling import kept_rows
from .channels import reduce

__all__ = ["patches", "output_rows", "output_rows_at", "weight_matrix", "set_weight",
           "squared_norm", "total_rows", "regression_rows", "ridge_change", "fill_lower",
           "solve_spd"]


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


def total_rows(module: nn.Module, outputs: Sequence[torch.Tensor], group: Any = None) -> int:
    """The rows (samples × positions) of a layer's `outputs` (one tensor per batch) on every
    rank (all-reduced over `group`)."""
    width = module.weight.shape[0]
    counts = torch.tensor([float(sum(y.numel() // width for y in outputs))], dtype=torch.float64)
    reduce([counts], group)
    return int(counts.item())


def regression_rows(rows: int, max_rows: int | None) -> int:
    """The rows a regression reads of `rows` (`total_rows`): at most about `max_rows` (the kept
    subset's expected size)."""
    return rows if max_rows is None else min(rows, max_rows)


# The intercept's penalty relative to λ: (almost) free, as an intercept should be.
INTERCEPT_PENALTY = 1e-6
# Systems whose ridge bounds their condition number by this are solved in float32: relative
# errors of the fitted outputs up to about 1e-5 (measured on every layer of a ResNet-50 merge),
# below those of the float32 Gram products; the default ridge (1e-2) keeps every system of up to
# 8,192 inputs (`plan.MAX_REFIT_INPUTS`) below it (trace / ridge ≤ 101·d).
FLOAT32_CONDITION = 1e6


def ridge_change(module: nn.Module, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor],
                 targets: Sequence[torch.Tensor], keys: Sequence[torch.Tensor], *, ridge: float,
                 max_rows: int | None, intercept: bool, group: Any = None,
                 row_count: int | None = None) -> tuple[torch.Tensor | None, float, float]:
    """The ridge regression of a layer's effective map toward its targets, on the sums of every
    rank: ``Δ = (XᵀX + λI)⁻¹ Xᵀ (T - Y)`` with ``X`` the layer's patch rows of `inputs` (``[X 1]``
    with an almost free `intercept`), ``Y`` its current `outputs` (one tensor per batch each),
    λ = ridge · trace(XᵀX)/d; at most about `max_rows` rows of all ranks enter (each batch's kept
    by its samples' `keys`; `row_count`: `total_rows` if already known). Returns (Δ, (d [+ 1]) ×
    outputs, None if no rank has a row; Σ (T - Y)²; Σ T²): the last two the error before the fit.

    The intercept is eliminated exactly (the Schur complement of its row: the centred system),
    so a d × d system is solved; in one process, with fewer rows n than inputs d, its dual
    ``Δ = Xᵀ (XXᵀ + λI)⁻¹ R`` (n × n, the same solution) is solved instead."""
    d, width = module.weight[0].numel(), module.weight.shape[0]
    if row_count is None:
        row_count = total_rows(module, outputs, group)  # the rows of every rank
    keep = 1.0 if max_rows is None else min(1.0, max_rows / max(row_count, 1))
    masks = [kept_rows(key, y.numel() // width, keep) if keep < 1.0 else None
             for y, key in zip(outputs, keys)]
    kept = sum(y.numel() // width if m is None else int(m.sum()) for y, m in zip(outputs, masks))
    dual = not is_distributed() and 0 < kept < d
    normal = None if dual else _NormalEquations(
        d, width, inputs[0].device if inputs else torch.device("cpu"))
    errors = torch.zeros(2, dtype=torch.float64)  # Σ (t - y)², Σ t²: the error before
    blocks: list[tuple[torch.Tensor, torch.Tensor]] = []
    for x, y, t, mask in zip(inputs, outputs, targets, masks):
        difference = t - y
        errors[0] += squared_norm(difference)
        errors[1] += squared_norm(t)
        mask = None if mask is None else mask.to(x.device)
        rows = patches(module, x, mask)
        residual = output_rows(module, difference) if mask is None else \
            output_rows_at(module, difference, mask)
        if dual:
            blocks.append((rows, residual))
        else:
            normal.add(rows, residual)
    if dual:
        delta = _dual_solution(torch.cat([r for r, _ in blocks]), torch.cat([e for _, e in blocks]),
                               ridge, intercept)
    else:
        normal.all_reduce(errors, group)
        delta = normal.solution(ridge, intercept)
    before_num, before_den = errors.tolist()
    return delta, before_num, before_den


class _NormalEquations:
    """The sums of a regression's normal equations over row blocks: the upper triangle of XᵀX and
    XᵀR, float32 products added by the product itself into float32 buffers (moved into float64
    every `FLUSH_ROWS` rows), and Σx, Σr and the row count in float64: what every rank
    all-reduces before the solve."""

    FLUSH_ROWS = 1 << 16  # float32 sums of at most this many rows

    def __init__(self, d: int, width: int, device: torch.device):
        self.blocks = upper_blocks(d)
        self.gram = torch.zeros(d, d, dtype=torch.float64)  # upper row blocks until `solution`
        self.cross = torch.zeros(d, width, dtype=torch.float64)
        self.sums = torch.zeros(d, dtype=torch.float64)
        self.residual_sums = torch.zeros(width, dtype=torch.float64)
        self.count = torch.zeros(1, dtype=torch.float64)
        self._gram32 = [torch.empty(stop - start, d - start, device=device)
                        for start, stop in self.blocks]
        self._cross32 = torch.empty(d, width, device=device)
        self._pending = 0  # rows in the float32 buffers (0: the next product overwrites them)

    def add(self, rows: torch.Tensor, residual: torch.Tensor) -> None:
        """Add a block of rows (n × d) and their residuals (n × width)."""
        if not len(rows):
            return
        rows, residual = rows.float(), residual.float()
        overwrite = self._pending == 0
        add_upper_product(self._gram32, rows.T, overwrite=overwrite)
        self._cross32.addmm_(rows.T, residual, beta=0.0 if overwrite else 1.0)
        self._pending += len(rows)
        self.sums += rows.sum(0).double().cpu()  # float32 sums of at most one batch's rows
        self.residual_sums += residual.sum(0).double().cpu()
        self.count += len(rows)
        if self._pending >= self.FLUSH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            for (start, stop), block in zip(self.blocks, self._gram32):
                self.gram[start:stop, start:] += block.cpu()
            self.cross += self._cross32.cpu()
        self._pending = 0

    def all_reduce(self, errors: torch.Tensor, group: Any) -> None:
        """Sum every rank's sums (with `errors`, in one call)."""
        self._flush()
        self._gram32 = self._cross32 = None
        reduce([self.gram, self.cross, self.sums, self.residual_sums, self.count, errors], group)

    def solution(self, ridge: float, intercept: bool) -> torch.Tensor | None:
        """Δ ((d [+ 1]) × width; None without rows) of the ridge regression on these sums: the
        intercept's row eliminated first (the centred Gram matrix and cross products)."""
        n = self.count.item()
        if n == 0:
            return None
        gram, cross = fill_lower(self.gram, self.blocks), self.cross
        lam = ridge * gram.diagonal().mean().clamp_min(1e-12).item()
        if intercept:
            total = n + INTERCEPT_PENALTY * lam  # the intercept's diagonal entry, penalised
            gram.addr_(self.sums, self.sums, alpha=-1.0 / total)
            cross.addr_(self.sums, self.residual_sums, alpha=-1.0 / total)
        gram.diagonal().add_(lam)
        delta = solve_spd(gram, cross, lam)
        if not intercept:
            return delta
        constant = (self.residual_sums - self.sums @ delta) / total
        return torch.cat([delta, constant[None]])


def _dual_solution(rows: torch.Tensor, residual: torch.Tensor, ridge: float,
                   intercept: bool) -> torch.Tensor:
    """`_NormalEquations.solution` for n rows < d inputs, all in one process:
    ``Δ = Yᵀ (YYᵀ + λI)⁻¹ R̃`` (n × n) with Y, R̃ the rows centred as the intercept's elimination
    centres them (Y = P X, P² the projection that elimination applies), the same Δ as the d × d
    system's at a fraction of its cost."""
    rows, residual = rows.float(), residual.double()
    n, d = rows.shape
    lam = ridge * max(float(torch.linalg.vector_norm(rows)) ** 2 / d, 1e-12)
    sums = rows.sum(0).double()
    residual_sums = residual.sum(0)
    if intercept:
        total = n + INTERCEPT_PENALTY * lam
        # P = I - a·11ᵀ with (1 - a·n)² = 1 - n/total: P² = I - 11ᵀ/total, as eliminated
        shrink = 1.0 - math.sqrt(INTERCEPT_PENALTY * lam / total)  # a·n
        y = rows - (shrink / n) * sums.float()
        residual = residual - (shrink / n) * residual_sums
    else:
        y = rows
    kernel, blocks = torch.empty(n, n, dtype=torch.float32, device=rows.device), upper_blocks(n)
    add_upper_product([kernel[start:stop, start:] for start, stop in blocks], y, overwrite=True)
    kernel = fill_lower(kernel, blocks).double().cpu()
    kernel.diagonal().add_(lam)
    # Δ = Yᵀ Z as a float32 product: its rounding (about 1e-6 of the fitted outputs) is below
    # that of the float32 solve
    delta = (y.T @ solve_spd(kernel, residual.cpu(), lam).to(y.device, y.dtype)).double().cpu()
    if not intercept:
        return delta
    constant = (residual_sums.cpu() - sums.cpu() @ delta) / total
    return torch.cat([delta, constant[None]])


def fill_lower(matrix: torch.Tensor, blocks: Sequence[tuple[int, int]]) -> torch.Tensor:
    """`matrix`, made symmetric in place from its upper row blocks (`upper_blocks`: each block's
    rows from its diagonal on, the square diagonal block whole): below each diagonal block the
    transpose of the block's part right of it."""
    for start, stop in blocks:
        matrix[stop:, start:stop] = matrix[start:stop, stop:].T
    return matrix


def solve_spd(system: torch.Tensor, rhs: torch.Tensor, floor: float) -> torch.Tensor:
    """system⁻¹ rhs for a symmetric positive definite float64 system whose eigenvalues are all at
    least `floor` (its ridge): a float32 Cholesky solve where that bounds the condition number by
    `FLOAT32_CONDITION` (trace / floor ≥ largest / smallest eigenvalue), about twice as fast;
    else, or where the float32 factorisation fails, float64 (least squares if Cholesky fails)."""
    if float(system.diagonal().sum()) <= FLOAT32_CONDITION * floor:
        factor, info = torch.linalg.cholesky_ex(system.float())
        if int(info) == 0:
            solution = torch.cholesky_solve(rhs.float(), factor).double()
            if bool(torch.isfinite(solution).all()):
                return solution
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, factor)
    return torch.linalg.lstsq(system, rhs).solution
