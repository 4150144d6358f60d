"""fxzip.save / fxzip.load: a merged ViT (fused attention) and a merged timm ResNet exported with a
dynamic batch axis, reloaded where fxzip and timm cannot be imported, outputs equal bit for bit."""
import json
import zipfile
import warnings

import pytest
import timm
import torch

import fxzip
from fxzip.errors import ExportError
from merge_files import reload_without_fxzip


def tiny_vit():
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32,
                             depth=2, num_heads=2, num_classes=5).eval()


def merged_pair(make, stop_at=None):
    torch.manual_seed(0)
    models = [make() for _ in range(2)]
    x = torch.randn(16, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxzip.CalibrationWarning)
        return fxzip.merge(*models, [x[:8], x[8:]], stop_at=stop_at, progress=False)


def test_saved_programs_reload_without_fxzip_and_timm(tmp_path):
    vit = merged_pair(tiny_vit)
    assert any("fused_qkv_attention" in str(n.target) for n in vit.graph.nodes)
    resnet = merged_pair(lambda: timm.create_model("test_resnet", num_classes=3).eval(), "layer3")
    cases = []
    for name, merged in (("vit", vit), ("resnet", resnet)):
        path = fxzip.save(merged, tmp_path / name)  # the .pt2 suffix is added
        assert path == tmp_path / f"{name}.pt2"
        xs = [torch.randn(b, 3, 32, 32) for b in (3, 1, 8)]  # calibration batches were 8
        with torch.no_grad():
            refs = [list(merged(x)) for x in xs]
        cases.append((path, xs, refs))
        loaded = fxzip.load(path)
        for x, ref in zip(xs, refs):
            assert all(torch.equal(a, b) for a, b in zip(loaded(x), ref))
        assert loaded.fxzip_report == merged.fxzip_report.__class__.from_dict(
            merged.fxzip_report.to_dict())
        assert loaded.fxzip_report.layers_zipped == merged.fxzip_report.layers_zipped
    assert "ok" in reload_without_fxzip(cases, tmp_path)
    with zipfile.ZipFile(tmp_path / "vit.pt2") as archive:
        name = next(n for n in archive.namelist() if n.endswith("fxzip_report.json"))
        assert json.loads(archive.read(name))["method"] == "zipit"


def test_load_errors(tmp_path):
    with pytest.raises(ExportError, match="not found"):
        fxzip.load(tmp_path / "missing.pt2")
    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    with pytest.raises(ExportError, match="cannot load .*junk.pt2"):
        fxzip.load(tmp_path / "junk.pt2")


def test_window_attention_core_exports_bit_for_bit(tmp_path):
    """Swin's window attention (relative position biases, shifted-window masks) is kept as an
    AttentionCore submodule: it exports and reloads like any other merged model."""
    def tiny_swin():
        return timm.create_model("swin_tiny_patch4_window7_224", img_size=32, window_size=4,
                                 embed_dim=16, depths=(1, 1), num_heads=(2, 2), num_classes=3).eval()
    merged = merged_pair(tiny_swin)
    assert any(type(m).__name__ == "AttentionCore" for m in merged.modules())
    loaded = fxzip.load(fxzip.save(merged, tmp_path / "swin"))
    for batch in (2, 5):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            assert all(torch.equal(a, b) for a, b in zip(loaded(x), merged(x)))
