"""Build a model from its name and load a checkpoint into it, with errors that name what is wrong.

A model is a timm name (`resnet50`), `torchvision:NAME`, `transformers:AUTO_CLASS:DIR` (a
transformers model saved with `save_pretrained` into the local folder DIR, read from its files,
nothing from the hub; e.g. `transformers:AutoModelForCausalLM:runs/lm_a`), or
`package.module:callable` (any importable function or class; the recipe's folder and the working
directory are searched too).
Checkpoints are state dicts in `.safetensors` (read by safetensors) or `.pt`/`.pth`/`.bin`
(`torch.load(weights_only=True)`: no code runs), also nested under `state_dict`/`model`, and
with the `module.` prefix of DataParallel/DDP stripped. They are read lazily — `.safetensors`
memory-mapped with `safe_open`, zip-format `.pt` files with `torch.load(mmap=True)` — and copied
into the model one module at a time, so loading needs little more memory than the model.
"""
from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import CheckpointError

PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
TRANSFORMERS = "transformers:"
NESTING_KEYS = ("state_dict", "model")
SHOWN_KEYS = 3
ZIP_MAGIC = b"PK\x03\x04"  # the first bytes of a torch.save file in the zip format


def build_model(name: str, kwargs: Mapping[str, Any] | None = None,
                search_paths: Sequence[str | Path] = ()) -> nn.Module:
    """A freshly built model (random initialisation unless kwargs ask for more), in eval mode."""
    kwargs = dict(kwargs or {})
    if name.startswith("torchvision:"):
        model = _torchvision_model(name.split(":", 1)[1], kwargs)
    elif name.startswith(TRANSFORMERS):
        model = _transformers_model(name, kwargs, search_paths)
    elif ":" in name:
        model = _callable_model(name, kwargs, search_paths)
    else:
        model = _timm_model(name, kwargs)
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"model {name!r} built a {type(model).__name__}, "
                              "not a torch.nn.Module")
    return model.eval()


def _timm_model(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise CheckpointError(f"unknown model name {name!r}: not a timm model (write "
                              f"torchvision:NAME or package.module:callable for others){hint}")
    kwargs.setdefault("pretrained", False)
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as e:
        raise CheckpointError(f"timm model {name!r} rejects the kwargs {kwargs}: {e}") from None


def _torchvision_model(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import torchvision

    if name not in torchvision.models.list_models():
        close = difflib.get_close_matches(name, torchvision.models.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise CheckpointError(f"unknown model name 'torchvision:{name}': torchvision has no model "
                              f"{name!r}{hint}")
    try:
        return torchvision.models.get_model(name, **kwargs)
    except TypeError as e:
        raise CheckpointError(f"torchvision model {name!r} rejects the kwargs {kwargs}: "
                              f"{e}") from None


def is_transformers(name: str) -> bool:
    """Whether a recipe's model name is a transformers folder (`transformers:AUTO_CLASS:DIR`)."""
    return name.startswith(TRANSFORMERS)


def transformers_folder(name: str, search_paths: Sequence[str | Path] = ()) -> Path:
    """The folder of `transformers:AUTO_CLASS:DIR`: DIR as given, else under the first search
    path (the recipe's folder) that holds it."""
    parts = name.split(":", 2)
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise CheckpointError(f"model {name!r}: write transformers:AUTO_CLASS:DIR, e.g. "
                              "transformers:AutoModelForCausalLM:runs/lm_a (a folder written by "
                              "save_pretrained)")
    folder = Path(parts[2]).expanduser()
    if not folder.is_absolute():
        folder = next((Path(p) / folder for p in search_paths if (Path(p) / folder).is_dir()),
                      folder)
    return folder


def _transformers_model(name: str, kwargs: dict[str, Any],
                        search_paths: Sequence[str | Path]) -> nn.Module:
    try:
        import transformers
    except ImportError:
        raise CheckpointError(f"model {name!r} needs the transformers package: pip install "
                              "'fxzip[hf]'") from None
    auto_class = name.split(":", 2)[1]
    folder = transformers_folder(name, search_paths)
    cls = getattr(transformers, auto_class, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        close = difflib.get_close_matches(auto_class, [n for n in dir(transformers)
                                                       if n.startswith("Auto")], n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise CheckpointError(f"model {name!r}: transformers has no model class "
                              f"{auto_class!r}{hint}")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"model {name!r}: {folder} is not a folder written by "
                              "save_pretrained (no config.json there)")
    try:
        return cls.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except (OSError, ValueError, TypeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load {name!r} from {folder}: {reason}") from None


def _callable_model(name: str, kwargs: dict[str, Any],
                    search_paths: Sequence[str | Path]) -> nn.Module:
    module_name, _, attr = name.partition(":")
    added = [str(Path(p).resolve()) for p in search_paths if str(Path(p).resolve()) not in sys.path]
    sys.path[:0] = added
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise CheckpointError(f"unknown model name {name!r}: cannot import {module_name!r} "
                              f"({e})") from None
    finally:
        for p in added:
            sys.path.remove(p)
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise CheckpointError(f"unknown model name {name!r}: {module_name} has no {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise CheckpointError(f"model {name!r} is not callable")
    try:
        return target(**kwargs)
    except TypeError as e:
        raise CheckpointError(f"model {name!r} rejects the kwargs {kwargs}: {e}") from None


class CheckpointTensors(Mapping[str, torch.Tensor]):
    """A checkpoint's tensors under the model's key names, each read from the file only when it is
    indexed, so that loading holds one module's tensors at a time, not the whole file."""

    def __init__(self, path: Path, names: Mapping[str, str],
                 read: Callable[[str], torch.Tensor], shape: Callable[[str], Sequence[int]]):
        self.path, self._names, self._read, self._shape = path, dict(names), read, shape

    def __getitem__(self, key: str) -> torch.Tensor:
        """The tensor of a model key, read now (a file error becomes a `CheckpointError`)."""
        name = self._names[key]
        with _reading(self.path):
            return self._read(name)

    def __contains__(self, key: object) -> bool:
        """Whether the checkpoint has the key, without reading its tensor (Mapping's would)."""
        return key in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def shape(self, key: str) -> tuple[int, ...]:
        """The tensor's shape, from the file's header, without reading the tensor."""
        return tuple(self._shape(self._names[key]))


@contextmanager
def open_state_dict(path: str | Path) -> Iterator[CheckpointTensors]:
    """The tensors of a checkpoint file, unnested and without a `module.` prefix, on the CPU, read
    lazily inside the `with`: `.safetensors` through `safe_open` (memory-mapped), `.pt`/`.bin`
    with `torch.load(mmap=True)` when the file is in torch's zip format."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found" if not path.exists()
                              else f"checkpoint {path} is not a file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import safe_open

        with _reading(path):
            handle = safe_open(str(path), framework="pt", device="cpu")
        with handle:
            names = _model_names(path, list(handle.keys()))
            yield CheckpointTensors(path, names, handle.get_tensor,
                                    lambda key: handle.get_slice(key).get_shape())
    elif suffix in PICKLE_SUFFIXES:
        with _reading(path):
            state = torch.load(path, map_location="cpu", weights_only=True,
                               mmap=_is_zip(path))
        tensors = _unnest(state, path)
        yield CheckpointTensors(path, _model_names(path, list(tensors)), tensors.__getitem__,
                                lambda key: tensors[key].shape)
    else:
        raise CheckpointError(f"checkpoint {path}: unknown file type {path.suffix!r}; give "
                              "a .safetensors file or a state dict saved as "
                              f"{'/'.join(PICKLE_SUFFIXES)}")


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Every reader error is the same news for the user: one `CheckpointError` naming the file."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - see the docstring
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {reason}") from None


def _is_zip(path: Path) -> bool:
    """Whether a torch.save file is in the zip format, which `torch.load(mmap=True)` needs."""
    with open(path, "rb") as f:
        return f.read(4) == ZIP_MAGIC


def _unnest(state: Any, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(state, Mapping):
            nested = next((state[k] for k in NESTING_KEYS
                           if isinstance(state.get(k), Mapping)), None)
            if nested is not None:
                state = nested
                continue
        break
    if not isinstance(state, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict "
                              "(save model.state_dict())")
    return {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _model_names(path: Path, keys: list[str]) -> dict[str, str]:
    """The model key of each file key: the same, or without the `module.` prefix of DDP."""
    if not keys:
        raise CheckpointError(f"checkpoint {path} holds no tensors")
    if all(k.startswith("module.") for k in keys):
        return {k[len("module."):]: k for k in keys}
    return {k: k for k in keys}


def load_checkpoint(model: nn.Module, path: str | Path, name: str = "the model") -> nn.Module:
    """Load a checkpoint into `model`, or say which keys are missing, unexpected or mis-shaped.
    Tensors are read and copied one module at a time: the peak is the model and one module."""
    with open_state_dict(path) as state:
        expected = model.state_dict()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        shapes = [f"{k} (checkpoint {state.shape(k)}, model {tuple(v.shape)})"
                  for k, v in expected.items() if k in state and state.shape(k) != tuple(v.shape)]
        problems = [f"{label} {_first(keys)}" for label, keys in
                    (("missing keys", missing), ("unexpected keys", unexpected),
                     ("mis-shaped", shapes)) if keys]
        if problems:
            raise CheckpointError(f"checkpoint {path} does not fit {name}: " + "; ".join(problems))
        for owner, keys in _keys_by_module(model, expected).items():
            _load_module(model.get_submodule(owner), owner, keys, state)
    return model


def _keys_by_module(model: nn.Module, keys: Iterable[str]) -> dict[str, list[str]]:
    """The state-dict keys grouped by the module that holds them (the longest module path that
    prefixes the key), in the model's order."""
    modules = {name for name, _ in model.named_modules(remove_duplicate=False)}
    groups: dict[str, list[str]] = {}
    for key in keys:
        owner = key.rpartition(".")[0]
        while owner not in modules:
            owner = owner.rpartition(".")[0]
        groups.setdefault(owner, []).append(key)
    return groups


def _load_module(module: nn.Module, owner: str, keys: list[str], state: CheckpointTensors) -> None:
    """Read one module's tensors and copy them in with its own `load_state_dict` (hooks, dtype
    casts and all); they are freed when this returns, before the next module is read."""
    cut = len(owner) + 1 if owner else 0
    module.load_state_dict({key[cut:]: state[key] for key in keys}, strict=False)


def _first(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS])
    return shown + (f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else "")


def data_config(model: nn.Module, name: str,
                kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """How the model reads images — input size, interpolation, mean, std, crop_pct — from timm's
    data config (timm models) or the default weights' transforms (torchvision); {} otherwise.
    A timm model built with `img_size` reads images of that size."""
    kwargs = kwargs or {}
    if name.startswith("torchvision:"):
        import torchvision

        try:
            weights = torchvision.models.get_model_weights(name.split(":", 1)[1])
            transforms = weights.DEFAULT.transforms()
        except (ValueError, AttributeError):
            return {}
        crop, resize = transforms.crop_size[0], transforms.resize_size[0]
        return {"input_size": (3, crop, crop), "interpolation": transforms.interpolation.value,
                "mean": tuple(transforms.mean), "std": tuple(transforms.std),
                "crop_pct": crop / resize}
    if ":" in name:
        return {}
    from timm.data import resolve_data_config

    config = dict(resolve_data_config(model=model))
    if "img_size" in kwargs:
        size = kwargs["img_size"]
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        config["input_size"] = (config["input_size"][0], h, w)
    return config
