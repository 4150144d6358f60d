"""fxzip over the timm model zoo: which architectures trace, how far they zip, and whether
merging a model with itself gives the model back.

    python benchmarks/timm_zoo.py [--models resnet18,vit_tiny_patch16_224] [--out DIR]

Per architecture (smallest variant, `pretrained=False`, 5 classes, a small input; each in a
fresh subprocess): two instances from seeds 0 and 1, their BatchNorm statistics estimated on 16
random calibration images (as after training; with timm's initial statistics many units are
dead), zero-initialised classifiers re-drawn (timm zero-inits some heads, which makes every
output 0). Columns:

- traced: torch.fx traces it with fxzip's tracer;
- zipped n/m: parametrised layers in the trunk of a full zip (stop_at=None) of all m;
- heads: attentions merged head-aware;
- first barrier: the first op that stops zipping (node, op, reason);
- self-merge error: a model merged with a copy of itself (zipit, stop_at=None, reset_bn=False):
  max relative error of both outputs against the model's own;
- two inits: a zipit merge of the two different instances runs end to end with finite outputs;
- s: seconds for all of it.

Writes `timm_zoo.md` and `timm_zoo.csv` to `--out` (default benchmarks/results).
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.tables import markdown_table, write_dict_csv  # noqa: E402

# (timm name, input size, family)
MODELS = [
    ("resnet18", 64, "ResNet"), ("resnet50", 64, "ResNet"), ("resnext26ts", 64, "ResNeXt"),
    ("seresnet18", 64, "SE-ResNet"), ("wide_resnet50_2", 64, "Wide-ResNet"),
    ("resnet26d", 64, "ResNet-D"), ("vgg11", 64, "VGG"), ("densenet121", 64, "DenseNet"),
    ("efficientnet_b0", 64, "EfficientNet"), ("efficientnet_lite0", 64, "EfficientNet"),
    ("mobilenetv2_050", 64, "MobileNet v2"), ("mobilenetv3_small_050", 64, "MobileNet v3"),
    ("mnasnet_050", 64, "MnasNet"), ("tinynet_e", 64, "TinyNet"), ("lcnet_050", 64, "LCNet"),
    ("ghostnet_050", 64, "GhostNet"), ("regnetx_002", 64, "RegNet"), ("repvgg_a0", 64, "RepVGG"),
    ("dla34", 64, "DLA"), ("hrnet_w18_small", 64, "HRNet"), ("inception_v3", 96, "Inception"),
    ("legacy_xception", 96, "Xception"), ("dpn68", 64, "DPN"), ("rexnet_100", 64, "ReXNet"),
    ("cspresnet50", 64, "CSPNet"), ("res2net50_14w_8s", 64, "Res2Net"),
    ("nf_resnet26", 64, "NF-ResNet"), ("gernet_s", 64, "GENet"),
    ("ese_vovnet19b_slim", 64, "VoVNet"), ("convnext_atto", 64, "ConvNeXt"),
    ("convnextv2_atto", 64, "ConvNeXt v2"), ("vit_tiny_patch16_224", 64, "ViT"),
    ("deit_tiny_patch16_224", 64, "DeiT"), ("swin_tiny_patch4_window7_224", 224, "Swin"),
    ("cait_xxs24_224", 64, "CaiT"), ("pit_ti_224", 64, "PiT"), ("coat_lite_tiny", 64, "CoaT"),
    ("mixer_s16_224", 64, "MLP-Mixer"), ("resmlp_12_224", 64, "ResMLP"),
    ("poolformer_s12", 64, "PoolFormer"), ("edgenext_xx_small", 64, "EdgeNeXt"),
    ("fastvit_t8", 64, "FastViT"), ("maxvit_nano_rw_256", 64, "MaxViT"),
    ("eva02_tiny_patch14_224", 56, "EVA-02"), ("levit_128s", 224, "LeViT"),
    ("mobilevit_xxs", 64, "MobileViT"), ("crossvit_tiny_240", 240, "CrossViT"),
]
EXACT = 1e-4


def build(name: str, size: int, seed: int):
    import timm
    import torch

    torch.manual_seed(seed)
    try:
        model = timm.create_model(name, pretrained=False, num_classes=5, img_size=size)
    except TypeError:  # no img_size argument
        model = timm.create_model(name, pretrained=False, num_classes=5)
    heads = model.get_classifier() if hasattr(model, "get_classifier") else ()
    heads = heads if isinstance(heads, (tuple, list)) else (heads,)  # LeViT: (head, head_dist)
    with torch.no_grad():
        for head in heads:
            for p in head.parameters():
                if p.dim() > 1 and not p.any():
                    p.normal_(0.0, 0.02)
    return model


def run_one(name: str, size: int) -> dict:
    """Everything measured for one architecture (runs in its own process)."""
    import torch

    import fxzip

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    start = time.perf_counter()
    result = dict(model=name, size=size, traced=False, zipped="", heads=0, barrier="-",
                  self_merge_error=None, two_inits=False, error="")
    try:
        x = torch.randn(16, 3, size, size, generator=torch.Generator().manual_seed(0))
        a = fxzip.reset_bn(build(name, size, 0), x, progress=False)
        b = fxzip.reset_bn(build(name, size, 1), x, progress=False)
        analysis = fxzip.analyze(a, x)
        result["traced"] = True
        stops = set(analysis.stop_points)
        result["zipped"] = (f"{sum(1 for n in analysis.all_layers if n in stops)}/"
                            f"{len(analysis.all_layers)}")
        result["heads"] = len(analysis.head_groups)
        if analysis.barriers:
            first = analysis.barriers[0]
            result["barrier"] = f"{first.node} ({first.op}): {first.reason}"
        merged = fxzip.merge(a, copy.deepcopy(a), x, reset_bn=False, progress=False)
        with torch.no_grad():
            ref = a(x)
            result["self_merge_error"] = max(
                ((out - ref).norm() / ref.norm().clamp_min(1e-12)).item() for out in merged(x))
        two = fxzip.merge(a, b, x, progress=False)
        with torch.no_grad():
            result["two_inits"] = all(bool(torch.isfinite(o).all()) for o in two(x))
    except Exception as exc:  # reported per model, the run goes on
        result["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    result["seconds"] = time.perf_counter() - start
    return result


def run_all(models: list[tuple[str, int, str]], timeout: int) -> list[dict]:
    rows = []
    for name, size, family in models:
        try:
            done = subprocess.run([sys.executable, __file__, "--one", name, str(size)],
                                  capture_output=True, text=True, timeout=timeout)
            line = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
            row = json.loads(line[-1]) if line else dict(
                model=name, size=size, traced=False, error=done.stderr.strip()[-200:])
        except subprocess.TimeoutExpired:
            row = dict(model=name, size=size, traced=False, error=f"timeout after {timeout}s")
        row["family"] = family
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def ok(row: dict) -> bool:
    """Traced, merged with itself exactly, and merged across two initialisations."""
    err = row.get("self_merge_error")
    return bool(row.get("traced")) and err is not None and err < EXACT and bool(row.get("two_inits"))


COLUMNS = ["model", "family", "traced", "zipped", "heads", "first barrier", "self-merge error",
           "two inits", "ok", "s"]
CSV_FIELDS = ["model", "family", "size", "traced", "zipped", "heads", "barrier", "self_merge_error",
              "two_inits", "seconds", "error"]


def cells(row: dict) -> list[str]:
    """One architecture's table cells (COLUMNS)."""
    err = row.get("self_merge_error")
    return [row["model"], row.get("family", ""), "yes" if row.get("traced") else "no",
            row.get("zipped") or "-", str(row.get("heads") or "-"),
            (row.get("barrier") or "-").replace("|", "/")[:110] if not row.get("error")
            else f"error: {row['error']}".replace("|", "/")[:110],
            "-" if err is None else f"{err:.1e}", "yes" if row.get("two_inits") else "no",
            "yes" if ok(row) else "no", f"{row.get('seconds', 0):.1f}"]


def format_row(row: dict) -> str:
    return "| " + " | ".join(cells(row)) + " |"


def markdown(rows: list[dict]) -> str:
    full = sum(1 for r in rows if ok(r) and r.get("barrier") == "-")
    good = sum(1 for r in rows if ok(r))
    lines = [f"{good}/{len(rows)} architectures merge end to end with an exact self-merge "
             f"(relative error < {EXACT:g}); {full} of them are zipped completely (no barrier).",
             "", markdown_table(COLUMNS, [cells(r) for r in rows])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated subset of timm names")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per model")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--one", nargs=2, metavar=("NAME", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]))))
        return
    models = MODELS
    if args.models:
        wanted = args.models.split(",")
        models = [m for m in MODELS if m[0] in wanted]
    start = time.perf_counter()
    rows = run_all(models, args.timeout)
    text = markdown(rows) + f"\n\nRun time: {time.perf_counter() - start:.0f}s.\n"
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "timm_zoo.md").write_text(text)
    write_dict_csv(args.out / "timm_zoo.csv", rows, CSV_FIELDS)


if __name__ == "__main__":
    main()
