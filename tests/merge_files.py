"""Files for the tests of `fxzip merge`: digit images, checkpoints of a user's own class and of a
timm model, recipes, and a reload of saved programs in a process without fxzip and timm."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent


def write_digit_images(folder: Path, count: int = 40, flat: bool = False) -> Path:
    """sklearn's 8×8 digits upsampled to 32×32 RGB PNGs, in class subfolders (or flat)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(count):
        image = np.kron(digits.images[i] / 16 * 255, np.ones((4, 4))).astype(np.uint8)
        where = folder if flat else folder / str(digits.target[i])
        where.mkdir(parents=True, exist_ok=True)
        tint = np.array([1.0, 0.8, 0.6])  # three channels that differ
        Image.fromarray((image[..., None] * tint).astype(np.uint8)).save(where / f"{i:03d}.png")
    return folder


def save_checkpoint(model: torch.nn.Module, path: Path, nested: bool = False) -> Path:
    """A state dict as .safetensors, or as .pt (nested under `model` with a `module.` prefix,
    as DDP training scripts save them)."""
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3} if nested
                   else state, path)
    return path


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def reload_without_fxzip(cases: list[tuple[Path, list[torch.Tensor], list]], work: Path) -> str:
    """Load every program with plain `torch.export.load` in a fresh process where fxzip and timm
    cannot be imported; assert its outputs equal the reference ones bit for bit."""
    data = work / "reload_cases.pt"
    torch.save([(str(p), xs, refs) for p, xs, refs in cases], data)
    script = textwrap.dedent("""
        import sys
        sys.modules["fxzip"] = None
        sys.modules["timm"] = None
        import torch
        torch.set_num_threads(1)
        for path, xs, refs in torch.load(sys.argv[1]):
            module = torch.export.load(path).module()
            for x, ref in zip(xs, refs):
                out = module(x)
                out = out if isinstance(out, (tuple, list)) else (out,)
                assert len(out) == len(ref), (path, len(out), len(ref))
                for a, b in zip(out, ref):
                    assert a.shape == b.shape and torch.equal(a, b), (path, x.shape, (a - b).abs().max())
        print("reloaded", len(sys.argv), "ok")
    """)
    result = subprocess.run([sys.executable, "-c", script, str(data)], capture_output=True,
                            text=True, cwd=work, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
