"""REPAIR (Jordan et al.): rescale a corrected layer's output features to the mean and standard
deviation of the parent features they merge, folded into the layer's (or its BatchNorm's) weights."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from .channels import channel_stats
from .regression import set_weight, weight_matrix

__all__ = ["repair"]


def repair(module: nn.Module, values: Sequence[torch.Tensor], axis: int,
           target_stats: tuple[torch.Tensor, torch.Tensor], *, is_bn: bool,
           group: Any = None) -> list[torch.Tensor]:
    """Rescale the fit point's features (`values`, channels on `axis`) to the target mean/std;
    fold into the BN's affine parameters (`is_bn`: `module` is the fit point's BatchNorm) or the
    layer's rows and bias; returns the values as rescaled."""
    mean, std = channel_stats(values, axis, target_stats[0].shape[0], group)
    mean_t, std_t = target_stats
    ratio = torch.where(std > 1e-8 * std.max().clamp_min(1e-30), std_t / std.clamp_min(1e-30),
                        torch.ones_like(std))
    shift = mean_t - mean * ratio  # y' = y * ratio + shift
    device, dtype = module.weight.device, module.weight.dtype
    r, s = ratio.to(device, dtype), shift.to(device, dtype)
    if is_bn:
        module.weight.data.mul_(r)
        module.bias.data.mul_(r).add_(s)
    else:
        weight = weight_matrix(module) * r[:, None]
        bias = (module.bias.detach() if module.bias is not None else torch.zeros_like(r)) * r + s
        set_weight(module, weight, bias)
    return [v * r.reshape([-1 if a == axis else 1 for a in range(v.dim())])
            + s.reshape([-1 if a == axis else 1 for a in range(v.dim())]) for v in values]
