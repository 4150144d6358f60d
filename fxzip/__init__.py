"""fxzip: merge trained networks of one architecture into one multi-head network, without
training, by the ZipIt! method, with the merge structure worked out from the torch.fx graph."""
from . import testing  # fxzip.testing.permuted_copy: exactness checks
from .api import analyze, merge, merge_all
from .corrections import AutoSettings, CorrectionReport, Corrections, reset_bn
from .errors import (ArchitectureMismatchError, CalibrationWarning, CheckpointError, ExportError,
                     FxzipError, InputError, MatchingError, MemoryWarning, NonFiniteError,
                     RecipeError, StopPointError, TraceError)
from .io.saving import load, save
from .io.to_model import to_model
from .matching import Match, match_features
from .options import MergeOptions
from .passes.analysis import Analysis
from .report import MergeReport
from .runtime.synthetic_inputs import Synthesis
from .zipper import Zipper

__version__ = "0.1.0"

__all__ = [
    "merge", "merge_all", "analyze", "save", "load", "to_model", "reset_bn", "Zipper", "MergeOptions",
    "MergeReport", "Analysis", "Match", "Corrections", "CorrectionReport", "AutoSettings",
    "Synthesis",
    "match_features", "FxzipError", "TraceError", "ArchitectureMismatchError", "StopPointError",
    "InputError", "NonFiniteError", "MatchingError", "RecipeError", "CheckpointError", "ExportError",
    "CalibrationWarning", "MemoryWarning",
]
