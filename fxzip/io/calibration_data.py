"""Calibration data from files: an image folder (class subfolders or flat) or a saved tensor.

Images are decoded with PIL and transformed the way the model expects them: timm's eval transform
(`timm.data.create_transform`) from the model's data config — input size, interpolation, crop,
mean and std — each overridable by the recipe. Without a config (a user's own class) images are
only converted to tensors in [0, 1], resized and centre-cropped if the recipe gives a size, and
normalised if it gives mean/std. `.npy` and `.pt` files hold one tensor (N, C, H, W) used as is.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import InputError

TENSOR_SUFFIXES = (".npy", ".pt", ".pth")


def image_files(folder: Path) -> list[Path]:
    """Every image below `folder` (torchvision's image extensions), in sorted order."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


class ImageFiles(Dataset):
    """Images decoded by PIL and transformed; an unreadable file is an `InputError` naming it."""

    def __init__(self, files: Sequence[Path], transform: Any, mode: str = "RGB"):
        self.files, self.transform, self.mode = list(files), transform, mode

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(self.files[i]) as image:
                image = image.convert(self.mode)
        except (OSError, UnidentifiedImageError) as e:
            raise InputError(f"cannot read image {self.files[i]}: {e}") from None
        return self.transform(image)


def image_transform(config: dict[str, Any], *, size: tuple[int, int] | None = None,
                    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                    interpolation: str | None = None, crop_pct: float | None = None) -> Any:
    """The eval transform: timm's, from `config` with the recipe's overrides; plain resize + crop
    + to-tensor (+ normalise) without a config."""
    if config:
        from timm.data import create_transform

        config = dict(config)
        if size is not None:
            config["input_size"] = (config["input_size"][0], *size)
        for key, value in (("mean", mean), ("std", std), ("interpolation", interpolation),
                           ("crop_pct", crop_pct)):
            if value is not None:
                config[key] = tuple(value) if key in ("mean", "std") else value
        keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
        return create_transform(**{k: config[k] for k in keys if k in config}, is_training=False)
    from torchvision import transforms as T

    steps: list[Any] = []
    if size is not None:
        mode = T.InterpolationMode(interpolation or "bilinear")
        resize = tuple(int(round(s / (crop_pct or 1.0))) for s in size)
        steps += [T.Resize(resize if resize[0] != resize[1] else resize[0], interpolation=mode),
                  T.CenterCrop(size)]
    steps.append(T.ToTensor())
    if mean is not None or std is not None:
        steps.append(T.Normalize(mean or (0.0,), std or (1.0,)))
    return T.Compose(steps)


def load_calibration(data: str | Path, config: dict[str, Any] | None = None, *,
                     limit: int | None = None, batch_size: int = 64, seed: int = 0,
                     size: tuple[int, int] | None = None, mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None, interpolation: str | None = None,
                     crop_pct: float | None = None) -> DataLoader | list[torch.Tensor] | list[dict[str, torch.Tensor]]:
    """Calibration batches for `fxzip.merge`: a DataLoader over an image folder (re-iterable,
    decoded on the fly, in a fixed order), or the batches of a tensor file (one tensor; or a dict
    of tensors, each batch then a dict of keyword inputs). `limit` takes a random subset (fixed by
    `seed`) of the images, or the first `limit` samples of a tensor file."""
    path = Path(data)
    if not path.exists():
        raise InputError(f"calibration data {path} not found")
    if path.is_file():
        return _tensor_batches(path, limit, batch_size)
    files = image_files(path)
    if not files:
        raise InputError(f"calibration folder {path} holds no images (looked for "
                         "jpg/jpeg/png/ppm/bmp/pgm/tif/tiff/webp files, in subfolders too)")
    if limit is not None and limit < len(files):
        keep = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))[:limit]
        files = [files[i] for i in sorted(keep.tolist())]
    config = config or {}
    channels = config.get("input_size", (3,))[0]
    transform = image_transform(config, size=size, mean=mean, std=std,
                                interpolation=interpolation, crop_pct=crop_pct)
    dataset = ImageFiles(files, transform, mode="L" if channels == 1 else "RGB")
    first = dataset[0]
    if size is None and not config:
        _check_same_size(dataset, first)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def _check_same_size(dataset: ImageFiles, first: torch.Tensor) -> None:
    """Without a size to resize to, every image must already have the first one's size."""
    from PIL import Image

    for path in dataset.files:
        with Image.open(path) as image:
            if image.size != (first.shape[-1], first.shape[-2]):
                raise InputError(
                    f"calibration image {path} is {image.size[0]}x{image.size[1]} but "
                    f"{dataset.files[0]} is {first.shape[-1]}x{first.shape[-2]}; give "
                    "calibration.size in the recipe to resize them all")


def _tensor_batches(path: Path, limit: int | None, batch_size: int) -> list[torch.Tensor]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            tensor: Any = torch.from_numpy(np.load(path, allow_pickle=False))
        elif suffix in (".pt", ".pth"):
            tensor = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise InputError(f"calibration data {path}: give an image folder or a "
                             f"{' / '.join(TENSOR_SUFFIXES)} file holding one tensor (N, C, H, W)")
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure is an unreadable file
        raise InputError(f"cannot read calibration data {path}: {str(e).splitlines()[0]}") from None
    if isinstance(tensor, dict) and tensor and all(isinstance(v, torch.Tensor)
                                                   for v in tensor.values()):
        return _keyword_batches(path, tensor, limit, batch_size)
    if not isinstance(tensor, torch.Tensor):
        raise InputError(f"calibration data {path} holds a {type(tensor).__name__}, not one tensor "
                         "(N, C, H, W) or a dict of tensors of N samples each (a model's keyword "
                         "inputs: input_ids, attention_mask, ...)")
    if tensor.dim() < 2 or tensor.shape[0] == 0:
        raise InputError(f"calibration data {path} has shape {tuple(tensor.shape)}; expected "
                         "(N, C, H, W) with N > 0 (or (N, T) token ids)")
    # images as floats; integer tensors (token ids) as they are
    tensor = tensor[:limit] if not tensor.is_floating_point() else tensor[:limit].float()
    return list(tensor.split(batch_size))


def _keyword_batches(path: Path, tensors: dict[str, torch.Tensor], limit: int | None,
                     batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Dict batches of a file holding {keyword: tensor (N, ...)} (a transformers model's inputs)."""
    sizes = {k: v.shape[0] if v.dim() else 0 for k, v in tensors.items()}
    if len(set(sizes.values())) != 1 or 0 in sizes.values():
        raise InputError(f"calibration data {path}: every tensor of the dict must hold the same "
                         f"number N > 0 of samples along its first axis; found {sizes}")
    parts = {k: v[:limit].split(batch_size) for k, v in tensors.items()}
    return [dict(zip(parts, batch)) for batch in zip(*parts.values())]
