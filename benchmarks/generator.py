"""Two SinGAN image generators, each trained on one photograph, merged into one generator.

    python -m benchmarks.generator [--quick] [--out benchmarks/results] [--cache DIR]

The ZipIt! paper's proof that merging is not tied to classifiers, on offline data. Two
SinGAN pyramids of one architecture (`benchmarks.common.singan`: 4 scales from 17×25 to 40×60
pixels, 32 channels, 5 conv layers per scale), each from its own initialisation, are trained on
one of scikit-learn's sample photographs: A on `china.jpg`, B on `flower.jpg`. Each maps a noise
tensor to an image; its reconstruction noise z* (a fixed noise at the coarsest scale, zeros
elsewhere) gives back its photograph, random noise gives new images with the photograph's patches.

They are merged with `fxzip.merge(A, B, noise, shared_output=True)`: every layer zipped, the
layers writing the image averaged, ONE image out. Methods: `average` (weight averaging),
`permute` (activation matching), `weights` (Git Re-Basin weight matching), `zipit` (the paper's:
α 0.5, β 1, no corrections, no weight similarity), all without corrections, and fxzip's default
merge (zipit + the default corrections); the BatchNorm statistics are re-estimated for every
method. Calibration: 8 batches of 4 random noises, 2 copies of z*_A and 2 of z*_B, so that the
merge sees the inputs whose images matter most (one more row: the default merge calibrated on
random noise alone).

Measured per generator, against each photograph:
- reconstruction: PSNR (dB, images in [-1, 1] clamped, peak-to-peak 2) of the image from z*_A
  against photograph A, and from z*_B against B;
- patch statistics: a Fréchet distance between the distributions of 7×7 RGB patches (every
  position) of 32 random samples and of a photograph (or of both photographs' patches pooled),
  after projecting the 147-dimensional patches on the 16 leading principal axes of the two
  photographs' pooled patches. 0: the samples' patches have the photograph's mean and covariance;
- fidelity: the PSNR of the images from z*_A, z*_B and the 32 samples against the same images of
  the parents' output average (the function a merge with one shared output is fitted to).
The references: each parent (its own photograph, and the other's as the score of an unrelated
generator) and the average of the two parents' output images (the function a merge with one
shared output is fitted to). Everything is deterministic for the seeds.

Outputs in `--out`: `generator.md` (the table), `generator.csv` (every number) and `generator.png`
(rows: the photographs, the parents and each merge; columns: the image from z*_A, from z*_B, two
random samples). `--quick`: small models, few iterations, written as `generator_quick.*`.
Trained generators are cached in `--cache` (default /tmp/singan_cache).
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxzip
from benchmarks.common.plots import pyplot
from benchmarks.common.singan import TrainSettings, load_photo, random_noise, train_singan
from benchmarks.common.tables import markdown_table, write_dict_csv

PHOTOS = (("china.jpg", 0), ("flower.jpg", 1))   # (photograph, seed) of parents A and B
PATCH, PCA_DIMS, SAMPLES = 7, 16, 32
METHODS = (  # (row name, fxzip.merge keywords, calibration)
    ("average", dict(method="average", corrections=None), "mixed"),
    ("permute", dict(method="permute", corrections=None), "mixed"),
    ("weights", dict(method="weights", corrections=None), "mixed"),
    ("zipit", dict(method="zipit", alpha=0.5, beta=1.0, corrections=None, weight_similarity=0.0),
     "mixed"),
    ("default", dict(), "mixed"),
    ("default, random-noise calibration", dict(), "random"),
)


class OutputAverage(nn.Module):
    """The mean of the parents' images: what one shared output is fitted to (a reference)."""

    def __init__(self, a: nn.Module, b: nn.Module):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (self.a(z) + self.b(z)) / 2


def calibration(sizes, z_stars: list[torch.Tensor], mixed: bool, seed: int = 100,
                batches: int = 8) -> list[torch.Tensor]:
    """Noise batches: 4 random noises and (`mixed`) 2 copies of each parent's z*; or 8 random."""
    out = []
    for b in range(batches):
        if mixed:
            out.append(torch.cat([random_noise(sizes, 4, seed + b),
                                  *(z.expand(2, -1, -1, -1) for z in z_stars)]))
        else:
            out.append(random_noise(sizes, 8, seed + b))
    return out


def patches(images: torch.Tensor) -> torch.Tensor:
    """Every 7×7 RGB patch of a batch of images, flattened: (count, 147), float64."""
    return F.unfold(images.double(), PATCH).transpose(1, 2).reshape(-1, 3 * PATCH * PATCH)


class PatchSpace:
    """The 16 leading principal axes of the photographs' pooled patches, and each
    photograph's patch mean and covariance in them."""

    def __init__(self, photos: list[torch.Tensor]):
        pooled = torch.cat([patches(p[None]) for p in photos])
        self.center = pooled.mean(0)
        _, _, v = torch.linalg.svd(pooled - self.center, full_matrices=False)
        self.axes = v[:PCA_DIMS].T
        self.refs = [self.moments(p[None]) for p in photos]
        self.refs.append(self.moments_of(pooled))

    def moments_of(self, flat: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        x = ((flat - self.center) @ self.axes).numpy()
        return x.mean(0), np.cov(x, rowvar=False)

    def moments(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return self.moments_of(patches(images))

    def distances(self, images: torch.Tensor) -> list[float]:
        """Fréchet distances of the images' patches to photograph A, B and both pooled."""
        mine = self.moments(images)
        return [frechet(*mine, *ref) for ref in self.refs]


def frechet(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """The Fréchet distance of two Gaussians: |μ1-μ2|² + tr(Σ1 + Σ2 - 2 (Σ1 Σ2)^½)."""
    from scipy.linalg import sqrtm

    root = sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(root)))


def psnr(image: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """(PSNR in dB, MSE) of an image in [-1, 1] (clamped) against the target: peak-to-peak 2."""
    mse = F.mse_loss(image.clamp(-1, 1), target).item()
    return 10 * np.log10(4.0 / mse), mse


def images(model: Callable, z_stars: list[torch.Tensor],
           samples: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A generator's images from each z* and from the random samples (clamped to [-1, 1])."""
    with torch.no_grad():
        recs = [model(z)[0] for z in z_stars]
        drawn = torch.cat([model(chunk) for chunk in samples.split(8)]).clamp(-1, 1)
    return recs, drawn


def evaluate(name: str, model: Callable, photos: list[torch.Tensor], z_stars: list[torch.Tensor],
             samples: torch.Tensor, space: PatchSpace,
             target: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
    """One row of metrics, and the model's images for the grid (from z*_A, z*_B, 2 samples).
    `target`: the parents' output average on z*_A, z*_B and the samples (None: this is it)."""
    recs, drawn = images(model, z_stars, samples)
    row: dict = {"model": name}
    for key, rec, photo in zip("AB", recs, photos):
        row[f"psnr_{key}"], row[f"mse_{key}"] = psnr(rec, photo)
    row["fd_A"], row["fd_B"], row["fd_AB"] = space.distances(drawn)
    row["psnr_target"] = None if target is None else \
        psnr(torch.cat([torch.stack(recs), drawn]), target)[0]
    grid = torch.stack([*recs, drawn[0], drawn[1]]).clamp(-1, 1)
    return row, grid


def draw(grids: list[tuple[str, list[torch.Tensor | None]]], path: Path) -> None:
    """The image grid: one row per generator (label at the left), four images per row."""
    plt = pyplot()
    rows = len(grids)
    h, w = grids[0][1][0].shape[-2:]
    fig, axes = plt.subplots(rows, 4, figsize=(4 * 1.6 * w / h, rows * 1.6 + 0.3), squeeze=False)
    for r, (label, pictures) in enumerate(grids):
        for c, picture in enumerate(pictures):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if picture is not None:
                ax.imshow(((picture.permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
        axes[r, 0].set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    axes[0, 0].set_title("photograph A", fontsize=9)
    axes[0, 1].set_title("photograph B", fontsize=9)
    fig.suptitle("columns 1-2: from z*_A and z*_B; 3-4: random samples", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.generator",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/singan_cache"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = TrainSettings(iterations=30, finest=(24, 36), channels=16) if args.quick \
        else TrainSettings()
    sizes = settings.sizes()
    started = time.perf_counter()
    parents, z_stars, infos = [], [], []
    for name, seed in PHOTOS:
        model, z_star, info = train_singan(name, seed, settings, cache=args.cache)
        parents.append(model)
        z_stars.append(z_star)
        infos.append(info)
    photos = [load_photo(name, sizes[-1]) for name, _ in PHOTOS]
    space = PatchSpace(photos)
    samples = random_noise(sizes, SAMPLES, seed=7)
    analysis = fxzip.analyze(parents[0], samples[:2])
    print(analysis, flush=True)

    rows, grids = [], [("photographs", [photos[0], photos[1], None, None])]
    recs, drawn = images(OutputAverage(*parents), z_stars, samples)
    target = torch.cat([torch.stack(recs).clamp(-1, 1), drawn])

    def add(name: str, model: Callable, extra: dict) -> None:
        row, grid = evaluate(name, model, photos, z_stars, samples, space,
                             None if isinstance(model, OutputAverage) else target)
        row.update(extra)
        rows.append(row)
        grids.append((name, list(grid)))
        print(f"{name:36s} PSNR A {row['psnr_A']:5.2f} B {row['psnr_B']:5.2f}  patch FD A "
              f"{row['fd_A']:7.3f} B {row['fd_B']:7.3f} A∪B {row['fd_AB']:7.3f}  PSNR to the "
              f"average {row['psnr_target'] or 0:5.2f}", flush=True)

    add("parent A (china)", parents[0], {"merge_s": 0.0})
    add("parent B (flower)", parents[1], {"merge_s": 0.0})
    add("output average of A and B", OutputAverage(*parents), {"merge_s": 0.0})
    for name, keywords, calib in METHODS:
        t0 = time.perf_counter()
        merged = fxzip.merge(parents[0], parents[1], calibration(sizes, z_stars, calib == "mixed"),
                             shared_output=True, progress=False, **keywords)
        add(name, merged, {"merge_s": time.perf_counter() - t0})

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "generator_quick" if args.quick else "generator"
    write_dict_csv(out / f"{stem}.csv", rows, ["model", "psnr_A", "psnr_B", "mse_A", "mse_B",
                                               "fd_A", "fd_B", "fd_AB", "psnr_target",
                                               "merge_s"])
    table = markdown_table(
        ["generator", "PSNR z*_A → A (dB)", "PSNR z*_B → B (dB)", "patch FD to A",
         "patch FD to B", "patch FD to A∪B", "PSNR to the output average (dB)"],
        [[r["model"], f"{r['psnr_A']:.2f}", f"{r['psnr_B']:.2f}", f"{r['fd_A']:.2f}",
          f"{r['fd_B']:.2f}", f"{r['fd_AB']:.2f}",
          "-" if r["psnr_target"] is None else f"{r['psnr_target']:.2f}"] for r in rows],
        right=range(1, 7))
    pinned = sum(s.pinned for s in analysis.spaces.values())
    train_s = ", ".join(f"{i['train_seconds'] / 60:.1f}" for i in infos)
    header = (
        f"# Two SinGAN generators merged into one\n\n"
        f"A: `{PHOTOS[0][0]}` (seed {PHOTOS[0][1]}), B: `{PHOTOS[1][0]}` (seed {PHOTOS[1][1]}); "
        f"{settings.scales} scales {' → '.join(f'{h}×{w}' for h, w in sizes)}, "
        f"{settings.channels} channels, {settings.layers} conv layers per scale, "
        f"{settings.iterations} iterations per scale ({settings.critic_steps} critic + "
        f"{settings.generator_steps} generator steps); training took {train_s} min on one CPU "
        f"thread. fxzip's analysis: {len(analysis.spaces)} feature spaces, {pinned} pinned "
        "(the coarsest scale's noise; every scale's image, which the residual adds tie to the "
        "finer scales' noise). Merged with `shared_output=True`; "
        "calibration: 32 random noises + 16 copies each of z*_A and z*_B (the last row: 64 "
        f"random noises). Patch FD: Fréchet distance of 7×7 patches of {SAMPLES} random "
        f"samples, {PCA_DIMS} principal axes. The output average: the mean of A's and B's "
        "images for the same noise.\n\n")
    (out / f"{stem}.md").write_text(header + table + "\n")
    draw(grids, out / f"{stem}.png")
    print(f"wrote {out / stem}.md/.csv/.png in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
