"""Traceable stand-ins for library functions marked `torch.fx.wrap`.

torchvision wraps its Swin window attention (`shifted_window_attention`) and patch merging
(`_patch_merging_pad`) with `torch.fx.wrap`, so torch.fx records each as one call that fxzip
cannot see into: a barrier at the first block. Their code branches on the input's height and
width (padding to whole windows, no shift where the window covers the map, the shifted windows'
mask), which plain torch.fx cannot trace. The stand-ins here compute the same values with those
sizes fixed: `recording(model, example)` runs the model once on the example and notes the
sizes each call sees, in call order; while `patched()` is active (fxzip's tracer enters it),
the library's functions are replaced by the stand-ins, which replay those sizes. The traced
graph is thus specialised to the example's spatial size (as the shaped tracing tiers are);
the batch size stays free. The shifted windows' mask becomes a constant of the graph.

`TRACED_INTO` lists the wrapped functions that are plain tensor code and are simply traced
into (no stand-in needed).
"""
from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

__all__ = ["TRACED_INTO", "STAND_INS", "recording", "patched"]

_SWIN = "torchvision.models.swin_transformer"

#: wrapped functions traced into as they are (module, name)
TRACED_INTO = ((_SWIN, "_get_relative_position_bias"),)


class _Sizes:
    """The sizes the stand-ins saw while recording, replayed in the same order while tracing."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, ...]] = []
        self.cursor = 0
        self.recording = False

    def of(self, x: Any) -> tuple[int, ...]:
        """The shape of `x`: its own when running eagerly (noted while recording), the next noted
        one when `x` is a proxy (tracing)."""
        if isinstance(x, torch.Tensor) and not isinstance(x, fx.Proxy):
            shape = tuple(x.shape)
            if self.recording:
                self.seen.append(shape)
            return shape
        if self.cursor >= len(self.seen):
            raise fx.proxy.TraceError(
                "fxzip's stand-in for a torch.fx.wrap-ed function has no recorded size for this "
                "call (the model calls it more often while traced than when run)")
        shape = self.seen[self.cursor]
        self.cursor += 1
        return shape


_sizes = _Sizes()


def _swin_mask(pad_h: int, pad_w: int, window: list[int], shift: list[int]) -> torch.Tensor:
    """torchvision's attention mask of shifted windows: (windows, N, N), 0 within a region, -100
    across regions (computed eagerly from sizes, as torchvision computes it in forward)."""
    mask = torch.zeros((pad_h, pad_w))
    h_slices = ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None))
    w_slices = ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None))
    count = 0
    for h in h_slices:
        for w in w_slices:
            mask[h[0]: h[1], w[0]: w[1]] = count
            count += 1
    mask = mask.view(pad_h // window[0], window[0], pad_w // window[1], window[1])
    mask = mask.permute(0, 2, 1, 3).reshape(-1, window[0] * window[1])
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def shifted_window_attention(
    input: torch.Tensor, qkv_weight: torch.Tensor, proj_weight: torch.Tensor,
    relative_position_bias: torch.Tensor, window_size: list[int], num_heads: int,
    shift_size: list[int], attention_dropout: float = 0.0, dropout: float = 0.0,
    qkv_bias: torch.Tensor | None = None, proj_bias: torch.Tensor | None = None,
    logit_scale: torch.Tensor | None = None, training: bool = True,
) -> torch.Tensor:
    """torchvision's `shifted_window_attention` (Swin and Swin-v2) with the input's height and
    width fixed (see the module's docstring); the same ops otherwise."""
    _, H, W, C = _sizes.of(input)
    pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
    x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b)) if pad_r or pad_b else input
    pad_h, pad_w = H + pad_b, W + pad_r
    shift = list(shift_size)
    if window_size[0] >= pad_h:
        shift[0] = 0
    if window_size[1] >= pad_w:
        shift[1] = 0
    shifted = sum(shift) > 0
    if shifted:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    rows, cols = pad_h // window_size[0], pad_w // window_size[1]
    n = window_size[0] * window_size[1]
    x = x.view(-1, rows, window_size[0], cols, window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, n, C)
    if logit_scale is not None and qkv_bias is not None:  # Swin-v2: no key bias
        qkv_bias = torch.cat([qkv_bias[:C], torch.zeros_like(qkv_bias[C:2 * C]),
                              qkv_bias[2 * C:]])
    qkv = F.linear(x, qkv_weight, qkv_bias)
    qkv = qkv.reshape(-1, n, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:  # cosine attention
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=4.605170185988092).exp()  # log(100)
    else:
        q = q * (C // num_heads) ** -0.5
        attn = q.matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if shifted:
        mask = _swin_mask(pad_h, pad_w, window_size, shift)
        attn = attn.view(-1, rows * cols, num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, n, n)
    attn = F.softmax(attn, dim=-1)
    attn = F.dropout(attn, p=attention_dropout, training=training)
    x = attn.matmul(v).transpose(1, 2).reshape(-1, n, C)
    x = F.linear(x, proj_weight, proj_bias)
    x = F.dropout(x, p=dropout, training=training)
    x = x.view(-1, rows, cols, window_size[0], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, pad_h, pad_w, C)
    if shifted:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    if pad_r or pad_b:
        x = x[:, :H, :W, :].contiguous()
    return x


def patch_merging_pad(x: torch.Tensor) -> torch.Tensor:
    """torchvision's `_patch_merging_pad` (Swin's patch merging: 2 × 2 neighbours concatenated
    on the channels) with the input's height and width fixed."""
    H, W, _ = _sizes.of(x)[-3:]
    if H % 2 or W % 2:
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
    x0 = x[..., 0::2, 0::2, :]
    x1 = x[..., 1::2, 0::2, :]
    x2 = x[..., 0::2, 1::2, :]
    x3 = x[..., 1::2, 1::2, :]
    return torch.cat([x0, x1, x2, x3], -1)


#: (module, name of the wrapped function) -> its stand-in
STAND_INS: dict[tuple[str, str], Callable] = {
    (_SWIN, "shifted_window_attention"): shifted_window_attention,
    (_SWIN, "_patch_merging_pad"): patch_merging_pad,
}


def _uses(model: torch.nn.Module) -> bool:
    """Whether a module of the model comes from a module that has stand-ins."""
    modules = {m for m, _ in STAND_INS}
    return any(type(sub).__module__ in modules for sub in model.modules())


@contextmanager
def _replaced() -> Iterator[None]:
    """The stand-ins in place of the library's functions (in the libraries' module globals),
    where those modules are imported: a model that calls them has imported them, and importing
    torchvision for any other model costs seconds."""
    saved = []
    for (module_name, name), stand_in in STAND_INS.items():
        module = sys.modules.get(module_name)
        if module is None:
            continue
        if hasattr(module, name):
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, stand_in)
    try:
        yield
    finally:
        for module, name, original in reversed(saved):
            setattr(module, name, original)


def recording(model: torch.nn.Module, run: Callable[[], Any]) -> None:
    """Note the sizes every stand-in sees when `run()` runs `model` (a private copy) on the
    example; nothing to note (and `run` not called) if the model uses no wrapped function that
    has a stand-in. If the example does not run, nothing is noted: the traced graph's shape
    propagation then names the failing op (a stand-in without sizes fails tracing)."""
    _sizes.seen, _sizes.cursor = [], 0
    if not _uses(model):
        return
    _sizes.recording = True
    try:
        with _replaced(), torch.no_grad():
            run()
    except Exception:  # noqa: BLE001  the example does not run: tracing reports it
        _sizes.seen = []
    finally:
        _sizes.recording = False


@contextmanager
def patched() -> Iterator[None]:
    """While tracing: torch.fx traces into the functions of `TRACED_INTO` and of `STAND_INS`
    (their `torch.fx.wrap` entries leave torch.fx's table and come back on exit), and the
    stand-ins replace their functions, replaying the recorded sizes from the first."""
    from torch.fx import _symbolic_trace

    table = _symbolic_trace._wrapped_fns_to_patch
    wanted = set(TRACED_INTO) | set(STAND_INS)
    taken = {key: frame for key, frame in list(table.items())
             if (frame.get("__name__"), key[1]) in wanted}
    for key in taken:
        del table[key]
    _sizes.cursor = 0
    try:
        with _replaced():
            yield
    finally:
        table.update(taken)
