"""`python -m benchmarks.vit_digits --methods weights --update` on tiny ViTs (one epoch, width 16):
the Git Re-Basin weight-matching rows it adds are those a full run writes, every other CSV row and
table line stays as it was, and a pair that does not reproduce its ensemble row is refused."""
import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("sklearn")

import benchmarks.vit_digits as vit  # noqa: E402


def tiny_vit(num_classes: int = 5):
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=num_classes,
                             embed_dim=16, depth=4, num_heads=2, mlp_ratio=2.0)


CHOSEN = {stop: (0.5, 1.0) for stop, _ in vit.STOPS}


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """One pair's rows of every method and the files a full run writes from them."""
    patch = pytest.MonkeyPatch()
    patch.setattr(vit, "digits_vit", tiny_vit)
    torch.manual_seed(0)
    rows = vit.run_pair(1, 1, 1e-3, CHOSEN)
    out = tmp_path_factory.mktemp("vit")
    (out / "vit_digits.md").write_text(vit.render(rows, 1, 1e-3, CHOSEN, 1.0))
    vit.write_dict_csv(out / "vit_digits.csv", rows, vit.COLUMNS)
    yield rows, out
    patch.undo()


def test_full_run_has_weights_rows(full):
    rows, _ = full
    weights = [r for r in rows if r["method"] == "weights"]
    assert [r["stop"] for r in weights] == [label for _, label in vit.STOPS]
    average = {r["stop"]: r for r in rows if r["method"] == "average"}
    for r in weights:
        assert r["zipped"] == average[r["stop"]]["zipped"]
        assert 0.0 < r["joint"] <= 1.0
    assert [r["method"] for r in rows if r["stop"] == "full"] == list(vit.MERGE_METHODS)


def test_update_adds_exactly_the_weights_rows(full, tmp_path, monkeypatch):
    rows, out = full
    monkeypatch.setattr(vit, "digits_vit", tiny_vit)
    csv_full, md_full = (out / "vit_digits.csv").read_text(), (out / "vit_digits.md").read_text()
    (tmp_path / "vit_digits.csv").write_text("".join(
        line for line in csv_full.splitlines(keepends=True) if ",weights," not in line))
    (tmp_path / "vit_digits.md").write_text("\n".join(
        line for line in md_full.split("\n") if not line.startswith("| weights |")))

    vit.update(tmp_path, ["weights"])
    assert (tmp_path / "vit_digits.csv").read_text() == csv_full  # same numbers, same order
    after = (tmp_path / "vit_digits.md").read_text().split("\n")
    assert [ln for ln in after if ln.startswith("|")] == \
        [ln for ln in md_full.split("\n") if ln.startswith("|")]
    added = [ln for ln in after if ln not in md_full.split("\n")]
    assert len(added) == 1 and added[0].startswith("Rows added later (weights): ")

    # an ensemble row that retraining does not give back: refused, nothing written
    changed = csv_full.replace(f"{rows[0]['joint']}", f"{rows[0]['joint'] - 0.01}", 1)
    (tmp_path / "vit_digits.csv").write_text(changed)
    with pytest.raises(ValueError, match="pair 1 was not reproduced"):
        vit.update(tmp_path, ["weights"])
    assert (tmp_path / "vit_digits.csv").read_text() == changed
