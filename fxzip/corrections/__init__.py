"""After the rewrite: BatchNorm re-estimation, label-free least-squares refits and REPAIR, the
fidelity of a merge to its parents, and settings chosen by it."""
from .auto_settings import AutoChoice, AutoSettings, choose, resolve_settings
from .batch_norm import reset_bn
from .fidelity import Fidelity, fidelity, parent_outputs
from .refit import correct
from .settings import CorrectionReport, Corrections

__all__ = ["AutoChoice", "AutoSettings", "choose", "resolve_settings", "reset_bn", "Fidelity",
           "fidelity", "parent_outputs", "CorrectionReport", "Corrections", "correct"]
