"""`fxzip merge RECIPE.yaml -o OUT_DIR`: run a recipe on model files and calibration data.

OUT_DIR receives `merged.pt2` (a torch.export program, dynamic batch), `recipe.yaml` (the recipe
as resolved), `report.json`, `report.png` and a `README.md` model card. Where every model is a
transformers folder (`transformers:AUTO_CLASS:DIR`) and the merge kept the architecture (one
shared output at width 1: `fxzip.to_model` takes it), `model/` replaces `merged.pt2`: the merged
model written by `save_pretrained`, with the first model's tokenizer files, that
`AUTO_CLASS.from_pretrained(OUT_DIR / "model")` loads. Everything is written to a
temporary folder next to OUT_DIR and renamed into place at the end, so a failed merge leaves
nothing behind.

Under torchrun (`torchrun --nproc_per_node=N -m fxzip merge RECIPE.yaml -o OUT_DIR`; torchrun sets
RANK and WORLD_SIZE) the command joins the process group (gloo on the CPU, nccl on CUDA, each
rank on its LOCAL_RANK's GPU), deals the calibration batches round-robin (rank r takes batches r,
r + N, ...), and every rank computes the same merge over its shard (`fxzip.merge_all` all-reduces
the statistics). Only rank 0 prints progress and writes OUT_DIR; the other ranks wait for it and
fail too if it could not write.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

from ..api import merge_all
from ..errors import FxzipError, InputError
from ..io.calibration_data import load_calibration
from ..io.model_loading import (build_model, data_config, is_transformers, load_checkpoint,
                                transformers_folder)
from ..io.recipe import CalibrationSpec, Recipe, dump, load_recipe, resolved
from ..io.saving import MERGED_FILE, MODEL_FOLDER, report_dict, save
from ..io.to_model import to_model
from ..runtime import distributed
from ..runtime.inputs import call_model, describe, leading, to_device
from .guard import guarded

OUTPUT_FILES = (MERGED_FILE, "recipe.yaml", "report.json", "report.png", "README.md")
# files of a transformers folder that the merged model's own save_pretrained writes afresh
WRITTEN_BY_SAVE = ("config.json", "generation_config.json", "model.safetensors.index.json")


def add_parser(sub: Any) -> None:
    """Declare `fxzip merge RECIPE.yaml -o OUT_DIR [--device auto|cpu|cuda] [--quiet]`."""
    parser = sub.add_parser("merge", help="merge model checkpoints as a YAML recipe says",
                            description="Merge the models of RECIPE (checkpoints, calibration "
                            "data, fxzip.merge options) and write OUT_DIR: "
                            f"{', '.join(OUTPUT_FILES)}.")
    parser.add_argument("recipe", metavar="RECIPE.yaml")
    parser.add_argument("-o", "--out", dest="out_dir", metavar="OUT_DIR", required=True,
                        help="a new folder for the results")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                        help="where to merge (default: the recipe's device, else auto)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    return guarded(lambda a: run_merge(a.recipe, a.out_dir, device=a.device, quiet=a.quiet), args)


def resolve_device(device: str) -> torch.device:
    """`auto` is CUDA when there is a GPU, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("device cuda was asked for, but torch sees no CUDA device; "
                         "use --device cpu")
    if device not in ("cpu", "cuda"):
        raise InputError(f"device {device!r} is not one of auto, cpu, cuda")
    return torch.device(device)


def load_models(recipe: Recipe, device: torch.device, progress: bool = True) -> list[nn.Module]:
    """Build every model of the recipe and load its checkpoint (progress bar per model)."""
    from tqdm.auto import tqdm

    search = [recipe.path.parent] if recipe.path is not None else []
    search.append(Path.cwd())
    models = []
    for k, spec in enumerate(tqdm(recipe.models, desc="fxzip: loading models", unit="model",
                                  disable=not progress)):
        model = build_model(spec.model, spec.kwargs, search_paths=search)
        spec.check_checksum()
        if spec.checkpoint is not None:
            load_checkpoint(model, spec.checkpoint, name=f"models[{k}] ({spec.model})")
        models.append(model.to(device).eval())
    return models


def calibration_batches(recipe: Recipe, model: nn.Module) -> tuple[Any, dict[str, Any]]:
    """The calibration batches and the preprocessing they got (for the model card)."""
    spec: CalibrationSpec = recipe.calibration
    first = recipe.models[0]
    config = data_config(model, first.model, first.kwargs) if spec.data.is_dir() else {}
    batches = load_calibration(spec.data, config, limit=spec.limit, batch_size=spec.batch_size,
                               seed=recipe.seed, size=spec.size, mean=spec.mean, std=spec.std,
                               interpolation=spec.interpolation, crop_pct=spec.crop_pct)
    if not spec.data.is_dir():
        return batches, {"source": "tensor file, used as is"}
    dataset = batches.dataset
    preprocessing = {"source": "image folder", "images": len(dataset),
                     "transform": repr(dataset.transform)}
    return batches, preprocessing


def run_merge(recipe_path: str | Path, out_dir: str | Path, *, device: str | None = None,
              quiet: bool = False) -> Path:
    """Run a recipe and write OUT_DIR; returns OUT_DIR. Bad input raises an `FxzipError`.
    Under torchrun every rank merges its shard of the calibration data and rank 0 writes."""
    recipe = load_recipe(recipe_path)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(f"output folder {out_dir} already exists and is not empty; choose a new "
                         "one or remove it")
    torch_device = resolve_device(device or recipe.device)
    with process_group(torch_device):
        rank, world = distributed.rank(), distributed.world_size()
        writer = rank == 0
        quiet = quiet or not writer
        _seed(recipe.seed)

        def say(text: str) -> None:
            if not quiet:
                print(f"fxzip: {text}", file=sys.stderr, flush=True)

        models = load_models(recipe, torch_device, progress=not quiet)
        batches, preprocessing = calibration_batches(recipe, models[0])
        if world > 1:
            batches = shard(batches, rank, world)
            say(f"merging {len(models)} models on {world} ranks ({torch_device}), rank 0 of "
                f"{world} writes the output")
        else:
            say(f"merging {len(models)} models on {torch_device}")
        merged = merge_all(models, batches, progress=not quiet, **recipe.merge)
        problem = None
        if writer:
            try:
                write_output(merged, batches, recipe, preprocessing, out_dir, torch_device, say,
                             models)
            except BaseException as exc:
                problem = exc
        # every rank waits here for rank 0's result (a barrier that carries whether it wrote)
        written = distributed.all_gather_objects(problem is None)[0]
        if problem is not None:
            raise problem
        if not written:
            raise OutputNotWritten(f"rank 0 could not write {out_dir} (see its error)")
        if writer:
            say(f"wrote {', '.join(p.name for p in sorted(out_dir.iterdir()))} to {out_dir}")
    return out_dir


class OutputNotWritten(FxzipError):
    """Under torchrun: rank 0 failed to write OUT_DIR (its own error says why)."""


def write_output(merged: nn.Module, batches: Any, recipe: Recipe, preprocessing: dict[str, Any],
                 out_dir: Path, torch_device: torch.device, say: Any,
                 models: list[nn.Module] | None = None) -> None:
    """Write OUT_DIR's files into a temporary folder next to it and rename that into place."""
    example = to_device(_first_batch(batches), torch_device)
    created = _missing_parents(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        model, why = as_transformers_model(merged, models or [], recipe, example)
        if why:
            say(f"the merged model stays a {MERGED_FILE}, not a transformers folder: {why}")
        if model is not None:
            say(f"writing {out_dir / MODEL_FOLDER} (save_pretrained)")
            model.save_pretrained(work / MODEL_FOLDER)
            _copy_tokenizer(recipe, work / MODEL_FOLDER)
        else:
            say(f"exporting {out_dir / MERGED_FILE}")
            save(merged, work / MERGED_FILE, example=to_device(example, torch.device("cpu"))
                 if isinstance(example, dict) else (example.cpu(),))
        report = report_dict(merged.fxzip_report)
        report["inputs"] = {"batch": describe(example), "preprocessing": preprocessing}
        if isinstance(example, torch.Tensor):
            report["inputs"].update(shape=["batch", *example.shape[1:]], dtype=str(example.dtype))
        report["outputs"] = describe_outputs(merged, example, recipe)
        if model is not None:
            report["transformers"] = {"folder": MODEL_FOLDER, "class": type(model).__name__,
                                      "auto_class": recipe.models[0].model.split(":", 2)[1]}
        (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (work / "recipe.yaml").write_text(dump(resolved(recipe, str(torch_device))))
        merged.fxzip_report.plot(work / "report.png")
        (work / "README.md").write_text(model_card(recipe, report))
        os.replace(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        for folder in reversed(created):
            shutil.rmtree(folder, ignore_errors=True)
        raise


def as_transformers_model(merged: nn.Module, models: list[nn.Module], recipe: Recipe,
                          example: Any) -> tuple[nn.Module | None, str]:
    """The merged model as the first model's transformers class, where every model of the recipe
    is a transformers folder and the merge kept the architecture; else None (a `.pt2`) and why
    ("" where not every model is a transformers folder)."""
    if not models or not all(is_transformers(spec.model) for spec in recipe.models):
        return None, ""
    try:
        return to_model(merged, like=models[0], example=example), ""
    except InputError as exc:
        return None, str(exc)


def _copy_tokenizer(recipe: Recipe, folder: Path) -> None:
    """The first model's tokenizer and other non-weight files, next to the merged weights."""
    search = [recipe.path.parent] if recipe.path is not None else []
    source = transformers_folder(recipe.models[0].model, [*search, Path.cwd()])
    for path in source.iterdir():
        if path.is_file() and path.name not in WRITTEN_BY_SAVE and \
                path.suffix not in (".safetensors", ".bin", ".pt", ".pth") and \
                not (folder / path.name).exists():
            shutil.copy2(path, folder / path.name)


@contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Under torchrun (WORLD_SIZE > 1 in the environment) join the process group for the
    command's duration: nccl for CUDA (this rank's LOCAL_RANK GPU), gloo for the CPU. Nothing
    when not launched by torchrun or when the caller already initialised torch.distributed."""
    if distributed.is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield
        return
    if not dist.is_available():
        raise InputError("WORLD_SIZE is set (torchrun?) but this torch has no torch.distributed")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    except BaseException:
        dist.destroy_process_group()
        raise
    # every rank done with its collectives before any tears the group down (a gloo rank that
    # destroyed it while its peer was still finishing aborted once, under load, at exit)
    dist.barrier()
    dist.destroy_process_group()


def shard(batches: Any, rank: int, world: int) -> Any:
    """This rank's batches: batch r, r + world, ... of the whole calibration data (a DataLoader
    keeps loading lazily, over the images of those batches, with the same batch boundaries)."""
    if isinstance(batches, DataLoader):
        size = batches.batch_size
        indices = [i for i in range(len(batches.dataset)) if (i // size) % world == rank]
        return DataLoader(Subset(batches.dataset, indices), batch_size=size, shuffle=False)
    return list(batches)[rank::world]


def describe_outputs(merged: nn.Module, example: Any, recipe: Recipe) -> list[dict[str, Any]]:
    """One entry per output: the model it stands for and its shape (or its type)."""
    with torch.no_grad():
        outputs = call_model(merged, leading(example, 2))
    if not isinstance(outputs, (tuple, list)):
        outputs = (outputs,)
    described = []
    for k, out in enumerate(outputs):
        shape = ["batch", *out.shape[1:]] if isinstance(out, torch.Tensor) else type(out).__name__
        entry: dict[str, Any] = {"index": k, "shape": shape}
        if len(outputs) == len(recipe.models):
            spec = recipe.models[k]
            entry["model"] = spec.model
            entry["checkpoint"] = spec.checkpoint.name if spec.checkpoint else None
        else:
            entry["model"] = "shared output of all models"
        described.append(entry)
    return described


def model_card(recipe: Recipe, report: dict[str, Any]) -> str:
    """README.md for OUT_DIR: inputs, outputs, stop point, costs, how to load."""
    inputs, c = report["inputs"], report.get("costs", {})
    lines = ["# Merged model (fxzip)", "",
             f"{len(recipe.models)} models merged with fxzip (ZipIt!) into one multi-head "
             "model.", "",
             "## Inputs", "",
             (f"One tensor of shape ({', '.join(map(str, inputs['shape']))}), {inputs['dtype']}; "
              "any batch size." if "shape" in inputs else
              f"Keyword inputs as the calibration batches: {inputs['batch']}; any batch size."),
             "",
             f"Preprocessing: {inputs['preprocessing'].get('source')}", ""]
    if "transform" in inputs["preprocessing"]:
        lines += ["```", inputs["preprocessing"]["transform"], "```", ""]
    lines += ["## Outputs", "", "A tuple, one entry per input model:", ""]
    for out in report["outputs"]:
        where = f", checkpoint `{out['checkpoint']}`" if out.get("checkpoint") else ""
        shape = out["shape"]
        shape = ", ".join(map(str, shape)) if isinstance(shape, list) else shape
        lines.append(f"- output {out['index']}: `{out['model']}`{where}, shape ({shape})")
    stop = report.get("stop_at")
    lines += ["", "## The merge", "",
              f"- method: {report.get('method')}, stop point: "
              f"{stop if stop is not None else 'none (full zip)'}",
              f"- layers zipped: {report.get('layers_zipped')}/{report.get('layers_total')}"]
    if c:
        lines += [f"- parameters: {c['parameters']:,} (ensemble of the inputs: "
                  f"{c['ensemble_parameters']:,})",
                  f"- FLOPs per sample: {c['flops']:,} (ensemble: {c['ensemble_flops']:,})"]
    lines += ["", "Details per feature space: `report.json`, `report.png`; the recipe as run: "
              "`recipe.yaml`.", "", "## Loading", ""]
    hf = report.get("transformers")
    if hf:
        lines += [f"A transformers {hf['class']} in `{hf['folder']}/` (the inputs' own class, "
                  "written by `save_pretrained`):", "", "```python", "import transformers",
                  f"model = transformers.{hf['auto_class']}.from_pretrained('{hf['folder']}')",
                  "```", ""]
    else:
        lines += ["Plain PyTorch, no fxzip or timm needed:", "",
                  "```python", "import torch", "model = torch.export.load('merged.pt2').module()",
                  "outputs = model(x)  # one output per input model", "```", "",
                  "or `fxzip.load('merged.pt2')`, which also attaches the merge report.", ""]
    return "\n".join(lines)


def _first_batch(batches: Any) -> Any:
    batch = next(iter(batches))
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _missing_parents(path: Path) -> list[Path]:
    """The ancestors of `path` that do not exist yet, outermost first."""
    missing = [p for p in path.absolute().parents if not p.exists()]
    return list(reversed(missing))


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
