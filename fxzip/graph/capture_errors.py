"""What a capture failure says: the front end, where in the model's code it failed (file, line,
module path) and advice that fits the failure — not one fixed text for every error."""
from __future__ import annotations

import os
import sysconfig
import traceback
from types import TracebackType

import torch
from torch import nn

from ..errors import TraceError

# torch's and fxzip's own code: a frame there is not the model's
_OWN = (os.path.dirname(torch.__file__) + os.sep,
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep)
_STDLIB = sysconfig.get_paths()["stdlib"] + os.sep
# how each front end says the forward branched on a tensor's values
_DATA_DEPENDENT = ("cannot be used as inputs to control flow", "data-dependent",
                   "GuardOnDataDependentSymNode", "DataDependentOutputException")


def capture_error(front_end: str, model_name: str, root: nn.Module | None, exc: BaseException,
                  on: str = "") -> TraceError:
    """A TraceError for `front_end` ("torch.fx" or "torch.export") failing on `model_name`
    (`root`: the module it ran, to name the failing module by path): the reason, where in the
    model's code it failed, and what to try."""
    reason = " ".join(f"{type(exc).__name__}: {exc}".split())
    if len(reason) > 400:
        reason = reason[:400] + " …"
    location, module = where(exc, root)
    at = f" at {location}" + (f" (module {module})" if module else "") if location else ""
    what = f"{front_end} cannot capture {model_name}{on}{at}: {reason}"
    fix = advice(front_end, exc, module, root)
    error = TraceError(f"{what}. {fix}")
    error.what, error.advice = what, fix  # `both_failed` puts two front ends' failures together
    return error


def both_failed(traced: TraceError, exported: TraceError) -> TraceError:
    """The error where neither front end captures the model (capture="auto"): both failures,
    and the advice for the second."""
    first = getattr(traced, "what", str(traced))
    return TraceError(f"{first}; and {getattr(exported, 'what', str(exported))}. "
                      f"{getattr(exported, 'advice', '')}".rstrip())


def advice(front_end: str, exc: BaseException, module: str | None,
           root: nn.Module | None) -> str:
    """What to try for this failure of this front end."""
    text = " ".join(f"{type(e).__name__} {e}" for e in _chain(exc))
    kind = type(root.get_submodule(module)).__name__ if root is not None and module else None
    leaf = (f"leaf_modules=[{kind}] with capture=\"fx\" (the zip stops at that module)" if kind
            else "the module that does it as a leaf (leaf_modules=[...], capture=\"fx\"; the zip "
            "stops there)")
    if any(marker in text for marker in _DATA_DEPENDENT):
        return ("The forward branches on a tensor's values there (data-dependent control flow): "
                "pass the input it branches on as a fixed value (concrete_args=), or make "
                f"{leaf}.")
    if front_end == "torch.fx":
        return "Try capture=\"export\" (torch.export), which runs the Python code as it is."
    return (f"Try capture=\"fx\" (symbolic tracing), or make {leaf}.")


def where(exc: BaseException, root: nn.Module | None) -> tuple[str | None, str | None]:
    """(file:line in function `code`, module path) of the innermost frame of the model's own code
    (not torch's, fxzip's or the standard library's) in the failure's traceback, and the path in
    `root` of the innermost module whose forward was running; None where there is none."""
    paths = {id(m): name for name, m in root.named_modules()} if root is not None else {}
    location = module = None
    for error in reversed(list(_chain(exc))):
        for frame, line in _frames(error.__traceback__):
            code = frame.f_code
            owner = frame.f_locals.get("self")
            if isinstance(owner, nn.Module) and id(owner) in paths and code.co_name == "forward":
                module = paths[id(owner)] or None
            if not _is_library(code.co_filename):
                source = traceback.FrameSummary(code.co_filename, line, code.co_name).line
                location = (f"{os.path.basename(code.co_filename)}:{line} in {code.co_name}"
                            + (f" `{source.strip()}`" if source else ""))
    return location, module


def _chain(exc: BaseException):
    """The exception and its causes, outermost first."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _frames(tb: TracebackType | None):
    while tb is not None:
        yield tb.tb_frame, tb.tb_lineno
        tb = tb.tb_next


def _is_library(filename: str) -> bool:
    return (filename.startswith(_OWN) or filename.startswith(_STDLIB) and
            "site-packages" not in filename or filename.startswith("<"))

