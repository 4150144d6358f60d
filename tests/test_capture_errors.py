"""Capture failures name the front end, where in the model's code it failed (file, line, module
path) and advice that fits the failure."""
import pytest
import torch
from torch import nn

import fxzip


class Branchy(nn.Module):
    """Branches on a tensor's values: neither torch.fx nor torch.export can capture it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = self.fc(x)
        if h.sum() > 0:
            h = h.relu()
        return h


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(8, 8)
        self.block = Branchy()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


class Untraceable(nn.Module):
    """Symbolic tracing fails (a proxy is not a tensor), torch.export captures it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        if not isinstance(x, torch.Tensor):  # a proxy under torch.fx
            raise TypeError("expected a tensor")
        return self.b(self.a(x))


@pytest.mark.parametrize("capture", ["auto", "fx", "export"])
def test_data_dependent_control_flow_is_named_where_it_is(capture):
    x = torch.randn(4, 8)
    with pytest.raises(fxzip.TraceError) as caught:
        fxzip.analyze(Net(), x, capture=capture)
    text = str(caught.value)
    assert "test_capture_errors.py" in text and "`if h.sum() > 0:`" in text
    assert "(module block)" in text
    assert "data-dependent control flow" in text and "leaf_modules=[Branchy]" in text
    assert ("torch.fx cannot capture Net" in text) == (capture != "export")
    assert ("torch.export cannot capture Net" in text) == (capture != "fx")


def test_advice_fits_the_failure():
    x = torch.randn(4, 8)
    with pytest.raises(fxzip.TraceError) as caught:
        fxzip.analyze(Untraceable(), x, capture="fx")
    text = str(caught.value)
    assert "control flow" not in text and 'capture="export"' in text
    assert '`raise TypeError("expected a tensor")`' in text
    analysis = fxzip.analyze(Untraceable(), x)  # auto: torch.export captures it
    assert len(analysis.all_layers) == 2
