"""The demo (README's main job) runs end to end and writes its table and plot; without its
extra dependencies it says which extra to install."""
import sys

import pytest

from fxzip.cli import main
from fxzip.demo.digits import load_digits_split


def test_demo_writes_table_and_plot(tmp_path, capsys):
    assert main(["demo", "--width", "1", "--epochs", "2", "--no-progress", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "demo.md").read_text().splitlines()
    assert len(table) == 2 + 1 + 3 * 5  # header, ensemble, 3 stops x (4 methods + default)
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line for line in table[2:]}
    ensemble_joint = float(rows[("ensemble", "-")].split("|")[6])
    assert ensemble_joint > 0.5  # two epochs already learn the digit halves
    full = {m: float(rows[(m, "full")].split("|")[6])
            for m in ("average", "weights", "permute", "zipit", "default")}
    assert all(0.0 <= j <= ensemble_joint + 0.05 for j in full.values())
    assert "joint" in capsys.readouterr().out


@pytest.mark.parametrize("module, package", [("sklearn", "scikit-learn"),
                                             ("matplotlib", "matplotlib")])
def test_demo_without_its_extra_names_the_extra(tmp_path, capsys, monkeypatch, module, package):
    """scikit-learn and matplotlib are the `demo` extra, not core dependencies: without them the
    demo stops at once with one line that says what to install."""
    monkeypatch.setitem(sys.modules, module, None)  # `import <module>` now raises ImportError
    assert main(["demo", "--epochs", "1", "--no-progress", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert package in err and 'pip install "fxzip[demo]"' in err
    assert not (tmp_path / "demo.md").exists()


def test_digits_without_scikit_learn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.delitem(sys.modules, "sklearn.datasets", raising=False)
    with pytest.raises(ImportError, match=r'scikit-learn.*pip install "fxzip\[demo\]"'):
        load_digits_split()
