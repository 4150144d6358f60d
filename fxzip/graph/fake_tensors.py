"""Private copies of modules on fake tensors: shape-only runs that compute nothing and change nothing
of the original (used by shape propagation and FLOP counting)."""
from __future__ import annotations

import copy

import torch.nn as nn
from torch._subclasses.fake_tensor import FakeCopyMode, FakeTensorMode


def fake_copy(module: nn.Module, mode: FakeTensorMode) -> tuple[nn.Module, dict[int, type]]:
    """A copy of `module` whose every tensor (parameters, buffers, constants) is a fake tensor of
    `mode`, so that a run on it computes and mutates nothing of the original and leaves nothing on
    it (BatchNorms in training mode count batches on the copy; modules that cache tables in eval
    mode, TinyViT's and LeViT's attention biases, cache on the copy); and the types in the original
    of the copy's parameters (nn.Parameter), by id."""
    with FakeCopyMode(mode):
        fake = copy.deepcopy(module)
    pairs = zip(module.parameters(), fake.parameters())  # deepcopy keeps their order and sharing
    return fake, {id(f): type(p) for p, f in pairs}
