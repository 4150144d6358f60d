"""Merge recipes: a YAML file read into dataclasses and checked before any model is loaded.

Every unknown key or bad value is a `RecipeError` that names the key and says what to write
instead, so a typo costs a second rather than a merge. Relative paths are read from the recipe's
own folder. `resolved(recipe)` gives the recipe as it ran (defaults, versions, checksums), the
`recipe.yaml` that `fxzip merge` writes next to the merged model.
"""
from __future__ import annotations

import difflib
import hashlib
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import FxzipError, RecipeError
from ..options import MergeOptions

TOP_KEYS = ("models", "calibration", "merge", "device", "seed", "versions")  # versions: a record
MODEL_KEYS = ("model", "kwargs", "checkpoint", "sha256")
CALIBRATION_KEYS = ("data", "limit", "batch_size", "size", "mean", "std", "interpolation",
                    "crop_pct")
DEVICES = ("auto", "cpu", "cuda")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


@dataclass(frozen=True)
class ModelSpec:
    """One input model: a timm name, `torchvision:NAME` or `package.module:callable`."""

    model: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None
    sha256: str | None = None  # when given, the checkpoint must still have this checksum

    def check_checksum(self) -> None:
        """A resolved recipe names its checkpoints' SHA-256: a changed file is an error."""
        if self.sha256 and self.checkpoint is not None and self.checkpoint.is_file():
            found = sha256(self.checkpoint)
            if found != self.sha256:
                raise RecipeError(f"checkpoint {self.checkpoint} has SHA-256 {found}, the recipe "
                                  f"says {self.sha256}: the file changed (drop `sha256` to "
                                  "accept it)")


@dataclass(frozen=True)
class CalibrationSpec:
    """Calibration data: an image folder or a .npy/.pt tensor (N, C, H, W), and how to read it."""

    data: Path
    limit: int | None = None
    batch_size: int = 64
    size: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str | None = None
    crop_pct: float | None = None


@dataclass(frozen=True)
class Recipe:
    """A whole merge: the models, the calibration data, `fxzip.merge` options, device, seed."""

    models: tuple[ModelSpec, ...]
    calibration: CalibrationSpec
    merge: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    seed: int = 0
    path: Path | None = None


def load_recipe(path: str | Path) -> Recipe:
    """Read and check a recipe file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError(f"recipe {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"cannot read recipe {path}: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"recipe {path} is not valid YAML{line}: {problem}") from None
    if data is None:
        raise RecipeError(f"recipe {path} is empty; it needs at least `models` and `calibration`")
    return parse_recipe(data, path.parent, path=path)


def parse_recipe(data: Any, base: str | Path = ".", *, path: Path | None = None) -> Recipe:
    """Check a recipe given as a dict (as YAML loads it); relative paths are read from `base`."""
    base = Path(base)
    _check_keys("the recipe", data, TOP_KEYS, required=("models", "calibration"))
    models = data["models"]
    if not isinstance(models, list) or len(models) < 2:
        raise RecipeError("recipe: `models` must be a list of two or more models, e.g. "
                          "[{model: resnet50, checkpoint: a.safetensors}, {model: resnet50, "
                          "checkpoint: b.pt}]")
    specs = tuple(_model_spec(m, k, base) for k, m in enumerate(models))
    device = data.get("device", "auto")
    if device not in DEVICES:
        raise RecipeError(f"recipe: device {device!r} is not one of {', '.join(DEVICES)}")
    seed = data.get("seed", 0)
    if not _is_int(seed):
        raise RecipeError(f"recipe: seed must be an integer, got {seed!r}")
    return Recipe(specs, _calibration_spec(data["calibration"], base),
                  check_merge_options(data.get("merge") or {}, len(specs)), device, seed,
                  path)


def _model_spec(entry: Any, k: int, base: Path) -> ModelSpec:
    where = f"models[{k}]"
    if isinstance(entry, str):
        entry = {"model": entry}
    _check_keys(where, entry, MODEL_KEYS, required=("model",))
    name = entry["model"]
    if not isinstance(name, str) or not name.strip():
        raise RecipeError(f"recipe: {where}.model must be a model name (a timm name, "
                          f"torchvision:NAME or package.module:callable), got {name!r}")
    kwargs = entry.get("kwargs") or {}
    if not isinstance(kwargs, dict) or not all(isinstance(key, str) for key in kwargs):
        raise RecipeError(f"recipe: {where}.kwargs must be a mapping of keyword arguments, "
                          f"e.g. {{num_classes: 10}}, got {kwargs!r}")
    checkpoint = entry.get("checkpoint")
    if checkpoint is not None and not isinstance(checkpoint, str):
        raise RecipeError(f"recipe: {where}.checkpoint must be a file path, got {checkpoint!r}")
    digest = entry.get("sha256")
    if digest is not None and not isinstance(digest, str):
        raise RecipeError(f"recipe: {where}.sha256 must be a hex string, got {digest!r}")
    return ModelSpec(name.strip(), dict(kwargs), base / checkpoint if checkpoint else None, digest)


def _calibration_spec(entry: Any, base: Path) -> CalibrationSpec:
    if isinstance(entry, str):
        entry = {"data": entry}
    _check_keys("calibration", entry, CALIBRATION_KEYS, required=("data",))
    if not isinstance(entry["data"], str):
        raise RecipeError("recipe: calibration.data must be a path: an image folder or a "
                          f".npy / .pt tensor file, got {entry['data']!r}")
    limit, batch_size = entry.get("limit"), entry.get("batch_size", 64)
    for key, value in (("limit", limit), ("batch_size", batch_size)):
        if value is not None and (not _is_int(value) or value < 1):
            raise RecipeError(f"recipe: calibration.{key} must be a positive integer, "
                              f"got {value!r}")
    size = entry.get("size")
    if size is not None:
        pair = [size, size] if _is_int(size) else size
        if not (isinstance(pair, list) and len(pair) == 2
                and all(_is_int(v) and v > 0 for v in pair)):
            raise RecipeError(f"recipe: calibration.size must be a positive integer or "
                              f"[height, width], got {size!r}")
        size = tuple(pair)
    stats = {}
    for key in ("mean", "std"):
        value = entry.get(key)
        if value is not None:
            if _is_number(value):
                value = [value]
            if not (isinstance(value, list) and value and all(_is_number(v) for v in value)):
                raise RecipeError(f"recipe: calibration.{key} must be a number or a list of "
                                  f"numbers per channel, got {value!r}")
            value = tuple(float(v) for v in value)
        stats[key] = value
    if stats["std"] is not None and any(v == 0 for v in stats["std"]):
        raise RecipeError("recipe: calibration.std must not contain 0")
    interpolation = entry.get("interpolation")
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise RecipeError(f"recipe: calibration.interpolation {interpolation!r} is not one of "
                          f"{', '.join(INTERPOLATIONS)}")
    crop_pct = entry.get("crop_pct")
    if crop_pct is not None and not (_is_number(crop_pct) and 0 < crop_pct <= 1):
        raise RecipeError(f"recipe: calibration.crop_pct must be a number in (0, 1], "
                          f"got {crop_pct!r}")
    return CalibrationSpec(base / entry["data"], limit, batch_size, size, stats["mean"],
                           stats["std"], interpolation, crop_pct)


def merge_defaults() -> dict[str, Any]:
    """The options a recipe's `merge:` section may set (those of `fxzip.merge` that are values,
    not Python objects), with their defaults."""
    return MergeOptions.recipe_defaults()


def check_merge_options(options: Any, num_models: int | None = None) -> dict[str, Any]:
    """Check the `merge:` section as `fxzip.merge` checks its keywords (one `MergeOptions`: the
    same allowed values and error texts, the key named); `width` against `num_models` if given."""
    defaults = merge_defaults()
    _check_keys("merge", options, tuple(defaults), required=())
    try:
        checked = MergeOptions(**options)
        if num_models is not None:
            checked.checked_width(num_models)
    except FxzipError as exc:
        raise RecipeError(f"recipe: merge.{getattr(exc, 'option', '?')}: {exc}") from None
    return dict(options)


def resolved(recipe: Recipe, device: str | None = None) -> dict[str, Any]:
    """The recipe as it ran: every default filled in, absolute paths, checkpoint SHA-256 sums and
    the versions of the libraries involved (what `fxzip merge` writes to `recipe.yaml`)."""
    import torch

    import fxzip

    models = []
    for spec in recipe.models:
        entry: dict[str, Any] = {"model": spec.model, "kwargs": dict(spec.kwargs)}
        if spec.checkpoint is not None:
            entry["checkpoint"] = str(spec.checkpoint.resolve())
            entry["sha256"] = sha256(spec.checkpoint)
        models.append(entry)
    cal = recipe.calibration
    calibration = {"data": str(cal.data.resolve()), "limit": cal.limit,
                   "batch_size": cal.batch_size, "size": list(cal.size) if cal.size else None,
                   "mean": list(cal.mean) if cal.mean else None,
                   "std": list(cal.std) if cal.std else None,
                   "interpolation": cal.interpolation, "crop_pct": cal.crop_pct}
    return {"models": models, "calibration": calibration,
            "merge": {**merge_defaults(), **recipe.merge},
            "device": device or recipe.device, "seed": recipe.seed,
            "versions": {"fxzip": str(fxzip.__version__), "torch": str(torch.__version__),
                         "torchvision": _version("torchvision"), "timm": _version("timm"),
                         "python": platform.python_version()}}


def _version(package: str) -> str | None:
    """The installed version of an optional package, None where it is missing."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def dump(data: dict[str, Any]) -> str:
    """YAML text of a resolved recipe, keys in recipe order."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


def _check_keys(where: str, mapping: Any, allowed: tuple[str, ...],
                required: tuple[str, ...]) -> None:
    if not isinstance(mapping, dict):
        raise RecipeError(f"recipe: {where} must be a mapping with the keys "
                          f"{', '.join(allowed)}; got {type(mapping).__name__} {mapping!r}")
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(f"recipe: unknown key {key!r} in {where}{hint}; allowed: "
                              f"{', '.join(allowed)}")
    for key in required:
        if key not in mapping:
            raise RecipeError(f"recipe: {where} needs the key {key!r}")


def sha256(path: Path) -> str | None:
    """The SHA-256 of a file (None when it cannot be read)."""
    try:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()
    except OSError:
        return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
