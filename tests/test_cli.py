"""The demo (README's main job) runs end to end and writes its table and plot."""
from fxzip.cli import main


def test_demo_writes_table_and_plot(tmp_path, capsys):
    assert main(["demo", "--width", "1", "--epochs", "2", "--no-progress", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "demo.md").read_text().splitlines()
    assert len(table) == 2 + 1 + 3 * 3  # header, ensemble, 3 stops x 3 methods
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line for line in table[2:]}
    ensemble_joint = float(rows[("ensemble", "-")].split("|")[6])
    assert ensemble_joint > 0.5  # two epochs already learn the digit halves
    full = [float(rows[(m, "full")].split("|")[6]) for m in ("average", "permute", "zipit")]
    assert all(0.0 <= j <= ensemble_joint + 0.05 for j in full)
    assert "joint" in capsys.readouterr().out
