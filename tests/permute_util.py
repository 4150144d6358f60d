"""The helpers several test files share: the permutation oracle (`fxzip.testing.permuted_copy`:
every hidden space that fxzip's analysis finds permuted; if the analysis missed a tie, the permuted
copy computes a different function), `assert_self_merge_exact`, `rel_err`, `small_resnet`,
`as_trained_timm`."""
import copy

import torch

import fxzip
from fxzip.demo.digits import ResNet20
from fxzip.testing import permuted_copy as permuted_by_analysis


def assert_self_merge_exact(model: torch.nn.Module, x: torch.Tensor, has_barrier: bool,
                            label: str, tol: float = 1e-4) -> None:
    """Merging `model` with its permuted copy (or, past a barrier, where the oracle cannot permute
    the whole model, with a plain copy) gives the model's outputs back (relative error < tol)."""
    import fxzip

    with torch.no_grad():
        ref = model(x)
    if has_barrier:
        other = copy.deepcopy(model)
    else:
        other, count = permuted_by_analysis(model, x, seed=1)
        assert count >= 1
        with torch.no_grad():
            torch.testing.assert_close(other(x), ref, rtol=1e-4, atol=1e-5)
    merged = fxzip.merge(model, other, x, reset_bn=False, progress=False)
    with torch.no_grad():
        for out in merged(x):
            err = ((out - ref).norm() / ref.norm()).item()
            assert err < tol, (label, err)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error ||out - ref|| / ||ref|| of a merged model's output against a reference."""
    return ((out - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def small_resnet(seed: int) -> torch.nn.Module:
    """A small ResNet (one block per stage) whose BatchNorm statistics come from a random batch,
    so that they are not the trivial initial ones."""
    torch.manual_seed(seed)
    model = ResNet20(width=1, blocks_per_stage=1)
    model.train()
    with torch.no_grad():
        model(torch.randn(128, 1, 8, 8, generator=torch.Generator().manual_seed(seed + 100)))
    return model.eval()


def as_trained_timm(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """A timm model made to look trained: BatchNorm statistics estimated on `x`, and the
    classifier weights timm zero-initialises re-drawn (a zero head makes every output 0)."""
    import fxzip

    model = fxzip.reset_bn(model, x, progress=False)
    with torch.no_grad():
        for p in model.get_classifier().parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0.0, 0.1)
    return model
