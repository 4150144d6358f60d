"""Checkpoints are read lazily — `.safetensors` through `safe_open`, zip-format `.pt` memory-mapped —
and copied in one module at a time: the same model as an eager load, the same errors, and never
the whole file in memory at once."""
from __future__ import annotations

import re
import weakref
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
import torch.nn as nn

from fxzip.errors import CheckpointError
from fxzip.io.model_loading import load_checkpoint
from merge_files import save_checkpoint


class Mixed(nn.Module):
    """A parameter on the root, nested modules, BatchNorm buffers and an output tied to the input
    embedding: every place a state-dict key can live."""

    def __init__(self, width: int = 6):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width))
        self.embed = nn.Embedding(10, width)
        self.body = nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU())
        self.head = nn.Linear(width, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(tokens) * self.scale))


def trained(seed: int, width: int = 6) -> Mixed:
    """A Mixed with every tensor random, BatchNorm statistics included (as if trained)."""
    torch.manual_seed(seed)
    model = Mixed(width)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.copy_(torch.randint_like(tensor, 0, 7) if not tensor.is_floating_point()
                         else torch.randn_like(tensor).abs() + 0.1)
    return model


def eager_state(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint read whole, as fxzip read it before (the reference)."""
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(str(path))
    state = torch.load(path, weights_only=True)
    state = state.get("model", state)
    return {k.removeprefix("module."): v for k, v in state.items()}


def legacy_pt(model: nn.Module, path: Path) -> Path:
    """A state dict in torch's pre-1.6 format, which cannot be memory-mapped."""
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
    return path


FILES = {
    "safetensors": lambda m, d: save_checkpoint(m, d / "ckpt.safetensors"),
    "pt nested, DDP prefix": lambda m, d: save_checkpoint(m, d / "ckpt.pt", nested=True),
    "bin": lambda m, d: save_checkpoint(m, d / "ckpt.bin"),
    "pt legacy format": lambda m, d: legacy_pt(m, d / "ckpt.pt"),
}


@pytest.mark.parametrize("kind", list(FILES))
def test_lazy_load_equals_the_eager_load(tmp_path, kind):
    path = FILES[kind](trained(1), tmp_path)
    lazy = load_checkpoint(trained(2), path)
    eager = trained(2)
    eager.load_state_dict(eager_state(path), strict=True)
    lazy_state, eager_state_ = lazy.state_dict(), eager.state_dict()
    assert list(lazy_state) == list(eager_state_)
    for key, value in eager_state_.items():
        assert torch.equal(lazy_state[key], value), key
    assert lazy.head.weight is lazy.embed.weight
    assert not torch.equal(lazy.scale, trained(2).scale)  # it did load something


def test_zip_pt_files_are_memory_mapped(tmp_path, monkeypatch):
    calls = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k.get("mmap")) or load(*a, **k))
    load_checkpoint(trained(2), save_checkpoint(trained(1), tmp_path / "zip.pt"))
    load_checkpoint(trained(2), legacy_pt(trained(1), tmp_path / "legacy.pt"))
    assert calls == [True, False]


class SpyOpen:
    """safe_open that records, at every tensor read, which earlier-read tensors are still alive."""

    def __init__(self, real_open, opened: list[SpyOpen], *args, **kwargs):
        self.inner = real_open(*args, **kwargs)
        self.reads: list[tuple[str, list[str]]] = []
        self.alive: list[tuple[str, weakref.ref]] = []
        opened.append(self)

    def __enter__(self) -> SpyOpen:
        self.inner.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.inner.__exit__(*exc)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def get_tensor(self, key: str) -> torch.Tensor:
        self.reads.append((key, [k for k, ref in self.alive if ref() is not None]))
        tensor = self.inner.get_tensor(key)
        self.alive.append((key, weakref.ref(tensor)))
        return tensor


def test_safetensors_are_read_one_module_at_a_time(tmp_path, monkeypatch):
    path = save_checkpoint(trained(1, width=32), tmp_path / "ckpt.safetensors")
    opened: list[SpyOpen] = []
    real_open = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: SpyOpen(real_open, opened, *a, **k))
    monkeypatch.setattr(safetensors.torch, "load_file",
                        lambda *a, **k: pytest.fail("the whole file was read"))
    model = load_checkpoint(trained(2, width=32), path)
    (spy,) = opened
    keys = list(model.state_dict())
    assert sorted(k for k, _ in spy.reads) == sorted(keys)  # each tensor read once, checks read none
    owner = lambda key: key.rpartition(".")[0]  # noqa: E731
    for key, alive in spy.reads:
        assert all(owner(k) == owner(key) for k in alive), (key, alive)
    assert max(len(alive) for _, alive in spy.reads) == 4  # BatchNorm's five tensors


def fitting_errors(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Checkpoints that do not fit Mixed(6), and the error each must give."""
    state = {k: v.clone() for k, v in trained(1).state_dict().items()}
    wide = save_checkpoint(trained(1, width=8), tmp_path / "wide.safetensors")
    fewer = {k: v for k, v in state.items() if not k.startswith("body.1.")}
    more = dict(state, **{f"extra.{i}": torch.zeros(1) for i in range(4)})
    safetensors.torch.save_file(fewer, str(tmp_path / "fewer.safetensors"))
    torch.save(more, tmp_path / "more.pt")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "broken.pt").write_bytes(b"not a pickle")
    torch.save([1, 2], tmp_path / "list.pt")
    torch.save({"epoch": 3}, tmp_path / "none.pt")
    (tmp_path / "weights.npz").write_bytes(b"")
    fit = "does not fit the model: "
    return {
        "mis-shaped": (wide, fit + r"mis-shaped scale \(checkpoint \(8,\), model \(6,\)\), "
                       r"embed.weight \(checkpoint \(10, 8\), model \(10, 6\)\), body.0.weight "
                       r"\(checkpoint \(8, 8\), model \(6, 6\)\) and 6 more$"),
        "missing": (tmp_path / "fewer.safetensors", fit + r"missing keys body.1.weight, "
                    r"body.1.bias, body.1.running_mean and 2 more$"),
        "unexpected": (tmp_path / "more.pt", fit + r"unexpected keys extra.0, extra.1, extra.2 "
                       r"and 1 more$"),
        "not a file": (tmp_path, "is not a file$"),
        "not found": (tmp_path / "nowhere.safetensors", "nowhere.safetensors not found$"),
        "broken safetensors": (tmp_path / "broken.safetensors", "cannot read checkpoint .*broken"),
        "broken pt": (tmp_path / "broken.pt", "cannot read checkpoint .*broken.pt: "),
        "not a state dict": (tmp_path / "list.pt", r"holds a list, not a state dict"),
        "no tensors": (tmp_path / "none.pt", "holds no tensors$"),
        "unknown type": (tmp_path / "weights.npz", "unknown file type '.npz'"),
    }


def test_errors_name_what_is_wrong(tmp_path):
    for case, (path, pattern) in fitting_errors(tmp_path).items():
        model = trained(2)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(model, path)
        assert re.search(pattern, str(info.value)), (case, str(info.value))
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), case
