"""fxzip reads timm's and torchvision's tables (not-traceable functions and modules, stand-ins,
op rules) only where those libraries are already imported: merging a plain torch model must not
import them (they import torch._dynamo and cost seconds per process), and a timm model still
gets timm's rules."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PLAIN = textwrap.dedent("""
    import sys
    import torch
    import fxzip
    from fxzip.testing import permuted_copy

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 3), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(8, 3)).eval()
    x = torch.randn(16, 1, 8, 8)
    copy, permuted = permuted_copy(model, x)
    merged = fxzip.merge(model, copy, [x], progress=False)
    error = max(float((out - model(x)).abs().max()) for out in merged(x))
    print(permuted, error, [m for m in ("timm", "torchvision") if m in sys.modules])
""")


def test_a_plain_torch_merge_imports_neither_timm_nor_torchvision():
    """A merge with a permuted copy (exact), in a fresh process: neither library is imported."""
    done = subprocess.run([sys.executable, "-c", PLAIN], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    permuted, error, imported = done.stdout.strip().split(" ", 2)
    assert int(permuted) >= 2 and float(error) < 1e-5
    assert imported == "[]", f"imported {imported}"


def test_timm_window_functions_get_their_rules_once_timm_is_imported():
    """The rules of timm's window functions are registered for its imported modules (the test
    session has imported timm), keyed by the functions themselves."""
    import timm.models.swin_transformer as swin

    from fxzip.passes.analysis import Analysis  # noqa: F401  (registers on use)
    from fxzip.rules import timm as timm_rules
    from fxzip.rules.api import FUNCTION_RULES

    timm_rules.register()
    assert "timm.models.swin_transformer" in timm_rules._registered
    assert swin.window_reverse in FUNCTION_RULES
