"""A small SinGAN (Shaham et al., ICCV 2019) as ONE module, for merging generators with fxzip.

A pyramid of scales, coarsest first. Scale n has a fully convolutional generator G_n (conv 3×3,
BatchNorm, LeakyReLU(0.2) blocks; a 3-channel conv and tanh at the end) and computes

    x_0 = G_0(a_0 · z_0),    x_n = G_n(a_n · z_n + up(x_{n-1})) + up(x_{n-1})

with `up` bilinear resizing to scale n's size and a_n the scale's noise amplitude, a fixed
depthwise 1×1 conv (a_0 = 1, a_n = 0.1 · the RMSE of the upsampled reconstruction against the
real image at scale n: SinGAN's rule). Each scale is trained in turn, the coarser ones frozen,
with a WGAN-GP patch discriminator of its own and a reconstruction loss: the fixed noise z* at the
coarsest scale and zeros at the others must give back the real image.

The model takes ONE noise tensor `z` of shape (N, 3·S, H, W) at the finest size (S scales):
scale n reads channels 3n..3n+2, cropped to its own size (top-left). Random samples are
`torch.randn`; the reconstruction input is z* in the first three channels and zeros elsewhere
(`reconstruction_input`). One tensor in, one image out: torch.fx traces it as it is.

`train_singan` trains one pyramid on one image (seconds to minutes on a CPU, cached by its
settings under a cache folder); `load_photo` reads scikit-learn's sample photographs.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SinGAN", "ScaleGenerator", "PatchDiscriminator", "TrainSettings", "pyramid_sizes",
           "load_photo", "random_noise", "reconstruction_input", "train_singan"]


def pyramid_sizes(finest: tuple[int, int], scales: int, factor: float) -> list[tuple[int, int]]:
    """The (height, width) of every scale, coarsest first: the finest size times factor^k."""
    h, w = finest
    return [(round(h * factor ** k), round(w * factor ** k)) for k in reversed(range(scales))]


def load_photo(name: str, size: tuple[int, int]) -> torch.Tensor:
    """A photograph that ships with scikit-learn (`china.jpg`, `flower.jpg`), area-downscaled to
    `size` (height, width), as a (3, H, W) tensor in [-1, 1]."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    names = [Path(f).name for f in photos.filenames]
    image = torch.tensor(photos.images[names.index(name)]).permute(2, 0, 1).float() / 127.5 - 1.0
    out = F.interpolate(image[None], size=size, mode="bilinear", antialias=True,
                        align_corners=False)[0]
    return out.clamp(-1.0, 1.0)


def _block(cin: int, cout: int, norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1)]
    if norm:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.LeakyReLU(0.2))
    return nn.Sequential(*layers)


class ScaleGenerator(nn.Module):
    """One scale's G_n: a head block (3 → C), `layers - 2` body blocks (C → C) and a tail conv
    (C → 3) with tanh; padding 1 keeps the size."""

    def __init__(self, channels: int = 32, layers: int = 5):
        super().__init__()
        self.head = _block(3, channels, norm=True)
        self.body = nn.Sequential(*[_block(channels, channels, norm=True)
                                    for _ in range(layers - 2)])
        self.tail = nn.Conv2d(channels, 3, 3, padding=1)
        # a_n as a fixed depthwise 1×1 conv on the noise (not trained): fxzip pins the space
        # it feeds (the noise comes from the input) and averages a_n in a merge. A Python float
        # would be a constant the parents disagree on, a scalar buffer a barrier
        self.noise_amp = nn.Conv2d(3, 3, 1, groups=3, bias=False)
        nn.init.ones_(self.noise_amp.weight)
        self.noise_amp.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.tail(self.body(self.head(x))))


class PatchDiscriminator(nn.Module):
    """One scale's WGAN critic: the generator's blocks without normalisation (the gradient
    penalty is per sample) and a 1-channel conv: a map of patch scores."""

    def __init__(self, channels: int = 32, layers: int = 5):
        super().__init__()
        self.features = nn.Sequential(_block(3, channels, norm=False),
                                      *[_block(channels, channels, norm=False)
                                        for _ in range(layers - 2)])
        self.score = nn.Conv2d(channels, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(self.features(x))


class SinGAN(nn.Module):
    """The whole pyramid: noise `z` (N, 3·S, H, W) at the finest size → the finest image
    (N, 3, H, W). `sizes`: (height, width) per scale, coarsest first."""

    def __init__(self, sizes: Sequence[tuple[int, int]], channels: int = 32, layers: int = 5):
        super().__init__()
        self.sizes = [tuple(s) for s in sizes]
        self.scales = nn.ModuleList(ScaleGenerator(channels, layers) for _ in self.sizes)

    def scale_noise(self, z: torch.Tensor, n: int) -> torch.Tensor:
        """Scale n's noise: channels 3n..3n+2 of `z`, cropped to its size, times a_n."""
        h, w = self.sizes[n]
        return self.scales[n].noise_amp(z[:, 3 * n:3 * n + 3, :h, :w])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.image_at(z, len(self.sizes) - 1)

    def image_at(self, z: torch.Tensor, last: int) -> torch.Tensor:
        """The image at scale `last` (the finest: `forward`; coarser ones for training)."""
        x = self.scales[0](self.scale_noise(z, 0))
        for n in range(1, last + 1):
            prev = F.interpolate(x, size=self.sizes[n], mode="bilinear", align_corners=False)
            x = self.scales[n](self.scale_noise(z, n) + prev) + prev
        return x


def random_noise(model_or_sizes: SinGAN | Sequence[tuple[int, int]], count: int,
                 seed: int) -> torch.Tensor:
    """`count` random noise inputs (standard normal), deterministic for `seed`."""
    sizes = model_or_sizes.sizes if isinstance(model_or_sizes, SinGAN) else model_or_sizes
    g = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3 * len(sizes), *sizes[-1], generator=g)


def reconstruction_input(z: torch.Tensor) -> torch.Tensor:
    """SinGAN's reconstruction noise: `z`'s coarsest-scale channels (z*) and zeros elsewhere."""
    out = torch.zeros_like(z)
    out[:, :3] = z[:, :3]
    return out


@dataclass(frozen=True)
class TrainSettings:
    """SinGAN's training recipe, scaled down (the paper: 2000 iterations per scale, 3 critic and
    3 generator steps each, Adam 5e-4, β = (0.5, 0.999), learning rate × 0.1 after 80%, gradient
    penalty 0.1, reconstruction weight 10)."""

    finest: tuple[int, int] = (40, 60)
    scales: int = 4
    factor: float = 0.75
    channels: int = 32
    layers: int = 5
    iterations: int = 300
    critic_steps: int = 3
    generator_steps: int = 3
    lr: float = 5e-4
    gp_weight: float = 0.1
    rec_weight: float = 10.0
    batch: int = 1            # random noise samples per step (and z* in the generator's batch)
    threads: int = 1          # one thread: on a shared CPU, two spin-wait each other

    def sizes(self) -> list[tuple[int, int]]:
        return pyramid_sizes(self.finest, self.scales, self.factor)


def _gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                      g: torch.Generator) -> torch.Tensor:
    eps = torch.rand(fake.shape[0], 1, 1, 1, generator=g)
    mix = (eps * real + (1 - eps) * fake).requires_grad_(True)
    grad, = torch.autograd.grad(critic(mix).sum(), mix, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


@torch.no_grad()
def _estimate_bn(scale: nn.Module, inputs: torch.Tensor) -> None:
    """The scale's BatchNorm running statistics: the exact mean/variance over `inputs`."""
    for m in scale.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    scale.train()
    for chunk in inputs.split(16):
        scale(chunk)
    for m in scale.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1
    scale.eval()


def _train_scale(model: SinGAN, n: int, real: torch.Tensor, z_star: torch.Tensor,
                 settings: TrainSettings, seed: int) -> None:
    """Train scale n of `model` (the coarser ones frozen, in eval mode) on `real` (3, h, w)."""
    g = torch.Generator().manual_seed(seed * 1000 + n)
    torch.manual_seed(seed * 1000 + n)
    gen = model.scales[n]
    critic = PatchDiscriminator(settings.channels, settings.layers)
    sizes = model.sizes
    rec_z = reconstruction_input(z_star)

    def previous(z: torch.Tensor) -> torch.Tensor:
        if n == 0:
            return torch.zeros(z.shape[0], 3, *sizes[0])
        with torch.no_grad():
            x = model.image_at(z, n - 1)
            return F.interpolate(x, size=sizes[n], mode="bilinear", align_corners=False)

    prev_rec = previous(rec_z)
    if n > 0:
        with torch.no_grad():
            gen.noise_amp.weight.fill_(0.1 * F.mse_loss(prev_rec[0], real).sqrt().item())
    amp = gen.noise_amp.weight[0, 0, 0, 0].item()
    real_b = real[None]
    trained = [p for p in gen.parameters() if p.requires_grad]  # not the noise amplitude
    opt_g = torch.optim.Adam(trained, lr=settings.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(critic.parameters(), lr=settings.lr, betas=(0.5, 0.999))
    milestones = [int(0.8 * settings.iterations)]
    sched_g = torch.optim.lr_scheduler.MultiStepLR(opt_g, milestones, 0.1)
    sched_d = torch.optim.lr_scheduler.MultiStepLR(opt_d, milestones, 0.1)
    h, w = sizes[n]
    gen.train()
    for _ in range(settings.iterations):
        z = random_noise(sizes, settings.batch, int(torch.randint(2**31, (1,), generator=g)))
        prev = previous(z)
        noise = z[:, 3 * n:3 * n + 3, :h, :w] * amp
        for _ in range(settings.critic_steps):
            with torch.no_grad():
                fake = gen(torch.cat([rec_z[:, 3 * n:3 * n + 3, :h, :w] * amp + prev_rec,
                                      noise + prev]))[1:] + prev
            loss_d = (critic(fake).mean() - critic(real_b).mean()
                      + settings.gp_weight * _gradient_penalty(critic, real_b, fake, g))
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()
        for _ in range(settings.generator_steps):
            out = gen(torch.cat([rec_z[:, 3 * n:3 * n + 3, :h, :w] * amp + prev_rec,
                                 noise + prev]))
            rec, fake = out[:1] + prev_rec, out[1:] + prev
            loss_g = -critic(fake).mean() + settings.rec_weight * F.mse_loss(rec, real_b)
            opt_g.zero_grad()
            loss_g.backward()
            opt_g.step()
        sched_g.step()
        sched_d.step()
    # BatchNorm statistics of what the scale sees: z* and random noise, 1 : batch as in training
    z = random_noise(sizes, 16 * settings.batch, seed * 1000 + 500 + n)
    rec_in = rec_z[:, 3 * n:3 * n + 3, :h, :w] * amp + prev_rec
    batch = torch.cat([rec_in.expand(16, -1, -1, -1), z[:, 3 * n:3 * n + 3, :h, :w] * amp
                       + previous(z)])
    _estimate_bn(gen, batch)


def _cache_key(name: str, seed: int, settings: TrainSettings) -> str:
    text = json.dumps({"image": name, "seed": seed, **asdict(settings), "version": 1},
                      sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def train_singan(name: str, seed: int, settings: TrainSettings,
                 cache: Path | None = None, log: bool = True) -> tuple[SinGAN, torch.Tensor, dict]:
    """(trained pyramid in eval mode, its reconstruction input z* (1, 3·S, H, W), info) for the
    photograph `name`; initialisation, z* and every random draw from `seed`. A cached state dict
    under `cache` is loaded instead of training."""
    sizes = settings.sizes()
    torch.manual_seed(seed)
    model = SinGAN(sizes, settings.channels, settings.layers)
    z_star = reconstruction_input(random_noise(sizes, 1, seed + 10_000))
    path = None if cache is None else Path(cache) / f"singan_{_cache_key(name, seed, settings)}.pt"
    if path is not None and path.exists():
        saved = torch.load(path)
        model.load_state_dict(saved["state"])
        return model.eval(), z_star, saved["info"]
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    start = time.perf_counter()
    try:
        for n, size in enumerate(sizes):
            real = load_photo(name, size)
            _train_scale(model, n, real, z_star, settings, seed)
            model.scales[n].eval()
            for p in model.scales[n].parameters():
                p.requires_grad_(False)
            if log:
                with torch.no_grad():
                    mse = F.mse_loss(model.image_at(z_star, n)[0], real).item()
                print(f"  {name} seed {seed}: scale {n} {size} rec MSE {mse:.4f} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
    finally:
        torch.set_num_threads(threads)
    for scale in model.scales:
        for name, p in scale.named_parameters():
            p.requires_grad_(not name.startswith("noise_amp"))
    info = {"train_seconds": time.perf_counter() - start}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state": model.state_dict(), "info": info}, path)
    return model.eval(), z_star, info
