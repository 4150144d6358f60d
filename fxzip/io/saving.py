"""Save a merged model as a `torch.export` program (`.pt2`) that loads anywhere, and load it back.

Why export, not pickle: `torch.save` of a GraphModule pickles its Python code, and `torch.load`
traces that code again with a plain `torch.fx` tracer, which steps into fxzip's own ops
(`fused_qkv_attention` iterates over a tensor shape: "Proxy object cannot be iterated") and
needs fxzip, timm and the models' classes importable. An exported program is ATen ops and
tensors only: `torch.export.load(path).module()` runs it with nothing but torch, on any batch size
(the batch axis is exported as a dynamic dimension). The merge report travels inside the archive
as `fxzip_report.json`.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import ExportError
from ..graph.prepare import device_of
from ..report import MergeReport

REPORT_FILE = "fxzip_report.json"
MERGED_FILE = "merged.pt2"  # what `fxzip merge` writes into its output folder
MODEL_FOLDER = "model"  # ... or, for transformers models merged into their own class, this folder


def example_input(model: fx.GraphModule) -> tuple[torch.Tensor, ...]:
    """Example inputs shaped like the calibration batch (from the traced shapes of the
    placeholders), with at least 2 samples so that export keeps the batch size symbolic."""
    examples = []
    for node in model.graph.nodes:
        if node.op != "placeholder" or node.args:  # inputs with a default (masks) stay unset
            continue
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            raise ExportError(f"input {node.name!r} of the merged model has no recorded shape; "
                              "pass example=(x,) to fxzip.save")
        shape = list(meta.shape)
        shape[0] = max(shape[0], 2)
        examples.append(torch.randn(shape).to(meta.dtype))
    return tuple(examples)


def export(model: nn.Module, example: tuple[torch.Tensor, ...] | dict | None = None, *,
           dynamic_batch: bool = True) -> torch.export.ExportedProgram:
    """The merged model as an exported program on the CPU, in eval mode, with a dynamic batch axis.
    `example`: positional inputs, or a dict of keyword inputs (a transformers batch). The model
    itself is not modified."""
    if example is None:
        if not isinstance(model, fx.GraphModule):
            raise ExportError("pass example=(x,) to export a model that is not a GraphModule")
        example = example_input(model)
    keywords = example if isinstance(example, dict) else {}
    example = () if keywords else tuple(x.cpu() for x in example)
    keywords = {k: v.cpu() for k, v in keywords.items()}
    if device_of(model) != torch.device("cpu") or model.training:
        model = copy.deepcopy(model).cpu().eval()
    dynamic: Any = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        axis = lambda x: {0: batch} if x.dim() else None  # noqa: E731
        dynamic = {k: axis(v) for k, v in keywords.items()} if keywords else \
            tuple(axis(x) for x in example)
    try:
        with torch.no_grad():
            return torch.export.export(model, example, kwargs=keywords or None,
                                       dynamic_shapes=dynamic, strict=False)
    except Exception as e:  # noqa: BLE001 - export failures come in many classes
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if dynamic_batch and ("Constraint" in type(e).__name__ or "batch" in str(e)):
            raise ExportError(
                f"the merged model cannot take a dynamic batch size (its graph fixes it to "
                f"{next(iter([*example, *keywords.values()])).shape[0]}): {text}; save it for one batch size with "
                "fxzip.save(..., dynamic_batch=False)") from e
        raise ExportError(f"torch.export failed on the merged model: {text}") from e


def save(merged: nn.Module, path: str | Path, *,
         example: tuple[torch.Tensor, ...] | dict | None = None,
         dynamic_batch: bool = True) -> Path:
    """Write `merged` as a `.pt2` program (plain `torch.export.load` reads it, without fxzip,
    timm or the models' classes), its `fxzip_report` inside. Returns the path written."""
    path = Path(path)
    if path.suffix != ".pt2":
        path = path.with_suffix(path.suffix + ".pt2") if path.suffix else path.with_suffix(".pt2")
    program = export(merged, example, dynamic_batch=dynamic_batch)
    report = getattr(merged, "fxzip_report", None)
    extra = {REPORT_FILE: json.dumps(report_dict(report))} if report is not None else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.export.save(program, path, extra_files=extra)
    except OSError as e:
        raise ExportError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def load(path: str | Path) -> nn.Module:
    """The module saved by `fxzip.save`, or by `fxzip merge` (its output folder or the
    `merged.pt2` in it), on the CPU, with its MergeReport in `module.fxzip_report` (None if the
    archive has none)."""
    path = Path(path)
    if path.is_dir():
        if not (path / MERGED_FILE).is_file() and (path / MODEL_FOLDER / "config.json").is_file():
            raise ExportError(f"folder {path} holds a transformers model ({path / MODEL_FOLDER}), "
                              "not a .pt2: load it with transformers' from_pretrained (see "
                              f"{path / 'README.md'})")
        if not (path / MERGED_FILE).is_file():
            raise ExportError(f"folder {path} holds no {MERGED_FILE} (the file `fxzip merge` "
                              "writes there); pass the path of a saved .pt2 file")
        path = path / MERGED_FILE
    if not path.is_file():
        raise ExportError(f"saved model {path} not found")
    extra = {REPORT_FILE: ""}
    try:
        program = torch.export.load(path, extra_files=extra)
    except Exception as e:  # noqa: BLE001
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"cannot load {path} as a torch.export program: {reason}") from None
    module = program.module()
    report = json.loads(extra[REPORT_FILE]) if extra[REPORT_FILE] else None
    module.fxzip_report = MergeReport.from_dict(report) if report is not None else None
    return module


def report_dict(report: Any) -> dict[str, Any]:
    """A JSON-ready dict of a merge report (its `to_dict()` where it has one)."""
    if hasattr(report, "to_dict"):
        return report.to_dict()
    if dataclasses.is_dataclass(report):
        return json.loads(json.dumps(dataclasses.asdict(report), default=str))
    return {"report": str(report)}
