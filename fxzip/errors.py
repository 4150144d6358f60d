"""fxzip's exceptions: every error a user can cause says what is wrong and how to fix it."""


class FxzipError(Exception):
    """Base class of every error fxzip raises on purpose."""


class TraceError(FxzipError):
    """A model could not be traced by torch.fx, or its shapes could not be propagated."""


class ArchitectureMismatchError(FxzipError):
    """The models to merge do not have the same traced graph (ops, targets or shapes)."""


class StopPointError(FxzipError):
    """`stop_at` names no node, or a node that zipping cannot reach (past a barrier)."""


class InputError(FxzipError):
    """The calibration inputs are empty, of the wrong shape or type, or the models are unusable."""


class NonFiniteError(FxzipError):
    """A model produced NaN or Inf activations on the calibration inputs."""


class MatchingError(FxzipError):
    """Feature matching was given inconsistent sizes or options."""


class RecipeError(InputError):
    """A merge recipe (YAML) is unreadable, or has an unknown key or a bad value."""


class CheckpointError(InputError):
    """A model could not be built, or its checkpoint is missing, unreadable or does not fit it."""


class ExportError(FxzipError):
    """A merged model could not be exported (`torch.export`) for saving."""


class CalibrationWarning(UserWarning):
    """The calibration data are too few for the statistics of some space: the merge runs, but
    matches between features that look alike on so few samples are arbitrary."""


class MemoryWarning(UserWarning):
    """A feature space needs more memory to collect and match than the merge's memory budget
    leaves for it: the merge runs (a space is matched whole), but goes over the budget."""
