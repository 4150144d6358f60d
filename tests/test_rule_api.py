"""The rule API: a rule's records count only when it returns; plugins register once."""
import pytest
import torch
import torch.nn as nn

from fxzip.rules import api as rule_api, timm as timm_rules
from fxzip.passes.analysis import Analysis
from fxzip.rules.api import Barrier, ParamHandle
from fxzip.graph.capture import trace


class Joint(nn.Module):
    """An op outside the table that reads two feature maps and has a per-channel weight."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(6))

    def forward(self, a, b):
        return a * self.weight.view(1, -1, 1, 1) + b


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 6, 1)
        self.joint, self.head = Joint(), nn.Linear(6, 2)

    def forward(self, x):
        a, b = self.c1(x), self.c2(x)
        return self.head((a + self.joint(a, b)).mean((2, 3))), self.head(b.mean((2, 3)))


def records_then_gives_up(ctx, node):
    """Records one of everything (a union, a parameter use, a new space, a production, a
    consumption, a head group), then raises."""
    a, b = node.args
    fa, fb = ctx.info(a), ctx.info(b)
    ctx.unify(fa, fb)
    ctx.tie(ParamHandle(node.target, "weight"), 0, fa)
    out = ctx.produce(node, 1, 6)
    ctx.consume(node, a, fa)
    ctx.head_group((fa.blocks[0].space, out.blocks[0].space), 2, "test")
    raise Barrier("gives up after recording")


def gives_up(ctx, node):
    raise Barrier("gives up after recording")


def _state(rule, monkeypatch) -> tuple:
    monkeypatch.setitem(rule_api.MODULE_RULES, Joint, rule)
    x = torch.randn(2, 3, 4, 4)
    analysis = Analysis(trace(Model().eval(), x, leaf_modules=(Joint,)))
    return (str(analysis), analysis.spaces, dict(analysis.param_uses), analysis.infos,
            analysis.head_groups, analysis.uf.count, [str(b) for b in analysis.barriers])


def test_a_barrier_leaves_no_trace_of_what_the_rule_recorded(monkeypatch):
    recorded = _state(records_then_gives_up, monkeypatch)
    clean = _state(gives_up, monkeypatch)
    assert recorded == clean
    infos = recorded[3]
    assert infos["c1"].blocks[0].space != infos["c2"].blocks[0].space  # not tied by the union
    assert recorded[2].get("joint") is None and not recorded[4]


def test_timm_plugin_registers_once():
    pytest.importorskip("timm")
    timm_rules.register()
    table = dict(rule_api.FUNCTION_RULES)
    timm_rules.register()
    assert rule_api.FUNCTION_RULES == table
    from timm.models.swin_transformer import window_reverse
    assert window_reverse in rule_api.FUNCTION_RULES
