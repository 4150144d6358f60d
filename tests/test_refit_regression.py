"""The least-squares refit's numerics (`fxzip.corrections.regression`, `.batch_norm`): the solution
equals a dense float64 solve of the ridge system with its (almost free) intercept row, through the
centred primal system (n ≥ d rows) and its n × n dual (n < d), on all rows or a row subset; the
float32 solve is used only where the ridge bounds the condition number; BatchNorm batch
statistics as torch computes them."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxzip.corrections.batch_norm import BatchNormStatistics, batch_mean_var
from fxzip.corrections.regression import (INTERCEPT_PENALTY, fill_lower, output_rows,
                                          output_rows_at, patches, ridge_change, solve_spd)
from fxzip.runtime.moments import add_upper_product, upper_blocks
from fxzip.runtime.sampling import kept_rows

RIDGE = 1e-2


def _dense_change(module, inputs, outputs, targets, keys, max_rows, intercept):
    """Δ of the ridge system ``([X 1]ᵀ[X 1] + diag(λ, ..., λ, 1e-6·λ)) Δ = [X 1]ᵀ(T - Y)``, in
    float64 from the same rows, and those rows ([X 1])."""
    width, d = module.weight.shape[0], module.weight[0].numel()
    total = sum(y.numel() // width for y in outputs)
    keep = 1.0 if max_rows is None else min(1.0, max_rows / total)
    xs, rs = [], []
    for x, y, t, key in zip(inputs, outputs, targets, keys):
        mask = kept_rows(key, y.numel() // width, keep) if keep < 1.0 else None
        xs.append(patches(module, x, mask).double())
        rs.append((output_rows(module, t - y) if mask is None
                   else output_rows_at(module, t - y, mask)).double())
    x, r = torch.cat(xs), torch.cat(rs)
    if intercept:
        x = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    gram = x.T @ x
    lam = RIDGE * float(gram.diagonal()[:d].mean())
    penalty = torch.full((len(gram),), lam, dtype=torch.float64)
    if intercept:
        penalty[d] = INTERCEPT_PENALTY * lam
    return torch.linalg.solve(gram + torch.diag(penalty), x.T @ r), x


CASES = {  # module, input shape per batch: rows per batch vs inputs d decide primal or dual
    "linear": (lambda: nn.Linear(24, 6), (10, 3, 24)),          # 90 rows, d 24: primal
    "linear_wide": (lambda: nn.Linear(120, 6), (8, 120)),       # 24 rows, d 120: dual
    "conv": (lambda: nn.Conv2d(4, 5, 3, padding=1), (3, 4, 6, 6)),  # 324 rows, d 36: primal
    "conv_wide": (lambda: nn.Conv2d(16, 5, 3, padding=1), (2, 16, 3, 3)),  # 54 rows, d 144
}


@pytest.mark.parametrize("intercept", [True, False])
@pytest.mark.parametrize("max_rows", [None, 40])
@pytest.mark.parametrize("name", sorted(CASES))
def test_ridge_change_is_the_dense_float64_solution(name, max_rows, intercept):
    torch.manual_seed(0)
    make, shape = CASES[name]
    module = make()
    # inputs with a large mean: the intercept's elimination (centring) matters
    inputs = [F.relu(torch.randn(shape) + 1.0) * 2 for _ in range(3)]
    with torch.no_grad():
        outputs = [module(x) for x in inputs]
    targets = [y + 0.3 * torch.randn_like(y) + 0.5 for y in outputs]
    keys = [torch.rand(shape[0], dtype=torch.float64) for _ in inputs]
    delta, before, norm = ridge_change(module, inputs, outputs, targets, keys, ridge=RIDGE,
                                       max_rows=max_rows, intercept=intercept)
    reference, x = _dense_change(module, inputs, outputs, targets, keys, max_rows, intercept)
    assert delta.shape == reference.shape
    fitted = x @ reference  # the change of the fitted outputs on the rows of the fit
    assert float((x @ delta - fitted).norm() / fitted.norm()) < 1e-4
    assert before == pytest.approx(sum(float((t - y).square().sum())
                                       for t, y in zip(targets, outputs)), rel=1e-5)
    assert norm == pytest.approx(sum(float(t.square().sum()) for t in targets), rel=1e-5)


def test_a_ridge_change_of_outputs_on_target_is_zero():
    """A layer whose outputs are its targets is left as it is (a permuted self-merge stays
    exact), in the primal and the dual."""
    torch.manual_seed(1)
    for module, shape in [(nn.Linear(8, 4), (50, 8)), (nn.Linear(64, 4), (20, 64))]:
        x = [torch.randn(shape)]
        with torch.no_grad():
            y = [module(x[0])]
        delta, before, _ = ridge_change(module, x, y, y, [torch.rand(shape[0])], ridge=RIDGE,
                                        max_rows=None, intercept=True)
        assert before == 0.0 and float(delta.abs().max()) == 0.0


def test_fill_lower_mirrors_the_upper_row_blocks():
    torch.manual_seed(2)
    rows = torch.randn(300, 20)
    product = torch.empty(300, 300)
    blocks = upper_blocks(300)
    add_upper_product([product[start:stop, start:] for start, stop in blocks], rows,
                      overwrite=True)
    assert torch.allclose(fill_lower(product, blocks), rows @ rows.T, atol=1e-4)


def test_float32_solve_only_where_the_ridge_bounds_the_condition_number():
    torch.manual_seed(3)
    a = torch.randn(400, 200, dtype=torch.float64)
    gram = a.T @ a
    rhs = torch.randn(200, 3, dtype=torch.float64)
    for ridge in (1e-2, 1e-7):  # trace / λ: 1e2·d (float32), 1e7·d (float64)
        lam = ridge * float(gram.diagonal().mean())
        system = gram + lam * torch.eye(200, dtype=torch.float64)
        exact = torch.linalg.solve(system, rhs)
        error = float((solve_spd(system.clone(), rhs, lam) - exact).norm() / exact.norm())
        assert error < (1e-4 if ridge == 1e-2 else 1e-9), (ridge, error)  # float32, float64


def test_batch_statistics_are_torch_batch_norm_statistics():
    torch.manual_seed(4)
    batches = [torch.randn(4, 6, 5, 5) * 3 + 2 for _ in range(3)]
    stats = BatchNormStatistics(6)
    bn = nn.BatchNorm2d(6, momentum=None).train()  # torch's cumulative average
    for x in batches:
        stats.add(x)
        bn(x)
        var, mean = torch.var_mean(x, (0, 2, 3))
        ours_mean, ours_var = batch_mean_var(x)
        assert torch.allclose(ours_mean, mean, atol=1e-6)
        assert torch.allclose(ours_var, var, rtol=1e-5)
    assert torch.allclose(stats.mean, bn.running_mean, atol=1e-6)
    assert torch.allclose(stats.var, bn.running_var, rtol=1e-5)
    single = torch.randn(1, 6)  # one value per channel: no variance
    assert torch.equal(batch_mean_var(single)[1], torch.zeros(6))
