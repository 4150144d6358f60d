"""Op rules for timm's layers, an opt-in plugin: `register()` adds them to the rule table.

timm's window/grid partition and reverse functions are traced as single calls (timm marks them
not traceable); they move positions around while every position keeps its channel vector.
`register()` is idempotent and adds the rules of the timm modules imported so far.
"""
from __future__ import annotations

import sys
from typing import Any

import torch.fx as fx

from .layout import Feat
from .api import Barrier, Context, Rule, norm_dim, passthrough
from .api import register as register_rule

_WINDOW_FUNCTIONS = {  # timm module: {function name: channel axis of its input and output}
    "timm.models.swin_transformer": {"window_reverse": -1},
    "timm.models.swin_transformer_v2": {"window_reverse": -1},
    "timm.models.swin_transformer_v2_cr": {"window_reverse": -1},
    "timm.models.gcvit": {"window_reverse": -1},
    "timm.models.davit": {"window_reverse": -1},
    "timm.models.maxxvit": {"window_reverse": -1, "grid_reverse": -1, "window_reverse_nchw": 1,
                            "grid_reverse_nchw": 1},
}
_registered: set[str] = set()  # the modules whose functions have rules


def _window_rule(channel_axis: int) -> Rule:
    def rule(ctx: Context, node: fx.Node) -> Any:
        """Reassembles windows (or grid cells) of positions into a feature map: every position
        keeps its channel vector, the channel axis stays where it is."""
        x = node.args[0]
        info, shape_in, shape_out = ctx.info(x), ctx.shape(x), ctx.shape(node)
        if not isinstance(info, Feat):
            return passthrough(info)
        axis_in, axis_out = norm_dim(channel_axis, len(shape_in)), norm_dim(channel_axis, len(shape_out))
        if info.axis != axis_in or shape_out[axis_out] != shape_in[axis_in]:
            raise Barrier(f"rearranges windows of '{x.name}' whose channels are on axis {info.axis}")
        return info.moved(axis_out)
    return rule


def register() -> None:
    """Add the rules of timm's window functions to the rule table, for each timm module already
    imported (once each; a model that calls them has imported their module, and importing timm
    for any other model costs seconds)."""
    for module_name, functions in _WINDOW_FUNCTIONS.items():
        module = sys.modules.get(module_name)
        if module is None or module_name in _registered:
            continue
        _registered.add(module_name)
        for name, channel_axis in functions.items():
            function = getattr(module, name, None)
            if function is not None:
                register_rule(function)(_window_rule(channel_axis))
