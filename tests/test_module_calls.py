"""Exported graphs call the model's own layers (graph/module_calls.py): the corrections refit and
reset them under torch.export as under torch.fx, and a merge is the same under either front end."""
import warnings

import torch
from torch import nn

import fxzip
from fxzip.graph.export import export


def quiet_merge(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxzip.CalibrationWarning)
        return fxzip.merge(*args, progress=False, **kwargs)


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 4)).eval()


def cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False),
                        nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(16, 5))
    with torch.no_grad():  # BatchNorm statistics that are not the defaults
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


class Scaled(nn.Linear):
    """A Linear subclass that computes more than its weight and bias: not a module call."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_exported_layers_are_the_models_modules():
    gm = export(cnn(0), torch.randn(4, 3, 8, 8))
    called = {n.target: type(gm.get_submodule(n.target)) for n in gm.graph.nodes
              if n.op == "call_module"}
    assert called == {"0": nn.Conv2d, "1": nn.BatchNorm2d, "3": nn.Conv2d, "4": nn.BatchNorm2d,
                      "8": nn.Linear}
    torch.manual_seed(0)
    model = nn.Sequential(Scaled(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    gm = export(model, torch.randn(3, 4))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["2"]
    x = torch.randn(5, 4)
    assert torch.allclose(gm(x)[0] if isinstance(gm(x), tuple) else gm(x), model(x))


def test_corrections_run_under_export_as_under_fx():
    """Two MLPs of different inits and two CNNs with BatchNorm: the default merge refits the same
    layers under either front end and gives the same model."""
    for build, x in ((mlp, torch.randn(256, 8)), (cnn, torch.randn(64, 3, 8, 8))):
        merged = {capture: quiet_merge(build(0), build(1), list(x.split(32)), capture=capture)
                  for capture in ("fx", "export")}
        refits = {c: len(m.fxzip_report.corrections.refitted) for c, m in merged.items()}
        assert refits["fx"] > 0 and refits["export"] == refits["fx"]
        with torch.no_grad():
            for a, b in zip(merged["fx"](x), merged["export"](x)):
                assert (a - b).abs().max() <= 1e-4 * a.abs().max()
