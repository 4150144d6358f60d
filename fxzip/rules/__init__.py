"""The op-rule table: how each op moves feature spaces between its inputs and its output (the
extension point). Importing this package fills the table; `fxzip.rules.api` is how a rule is
written and registered."""
from . import attention, core, heads, timm  # noqa: F401  each module registers its rules
