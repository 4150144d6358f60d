"""A SinGAN-style generator (`benchmarks.common.singan`): a pyramid of scales whose images are
added to noise taken from the model's input and to the next scale's output.

* fxzip's analysis pins the spaces that carry images (and the noise): the residual adds tie them
  to the input, so they keep their channel order; the hidden spaces of every scale are merged.
* The generator merged with a PERMUTED copy of itself (every hidden space permuted at random,
  `fxzip.testing.permuted_copy`) into one shared output gives back its images to float error with
  zipit, permute and weights, and the image-writing layers keep their channels.
"""
from __future__ import annotations

import pytest
import torch

import fxzip
from benchmarks.common.singan import SinGAN, random_noise, reconstruction_input
from permute_util import permuted_by_analysis, rel_err

SIZES = [(9, 12), (12, 16)]
CHANNELS = 8


@pytest.fixture(scope="module")
def generator() -> SinGAN:
    """A tiny untrained 2-scale generator with BatchNorm statistics of random noise and a
    noise amplitude below 1 at the second scale, as training leaves them."""
    torch.manual_seed(0)
    model = SinGAN(SIZES, channels=CHANNELS, layers=3)
    with torch.no_grad():
        model.scales[1].noise_amp.weight.fill_(0.3)
        model.train()
        model(random_noise(model, 64, seed=1))
    return model.eval()


@pytest.fixture(scope="module")
def noise(generator) -> torch.Tensor:
    z = random_noise(generator, 12, seed=2)
    return torch.cat([z, reconstruction_input(z[:2])])


def _image_spaces(analysis) -> list:
    return [s for s in analysis.spaces.values()
            if any(p.endswith("_tail") for p in s.producers)]


def test_image_and_noise_spaces_are_pinned_hidden_spaces_merged(generator, noise):
    analysis = fxzip.analyze(generator, noise)
    assert not analysis.barriers
    images = _image_spaces(analysis)
    assert len(images) == 1, "both scales' images are one space, tied by the residual adds"
    assert images[0].pinned and images[0].size == 3
    assert set(images[0].producers) == {"scales_0_tail", "scales_1_tail"}
    first_noise = [s for s in analysis.spaces.values() if "scales_0_head_0" in s.consumers]
    assert len(first_noise) == 1 and first_noise[0].pinned
    hidden = [s for s in analysis.spaces.values() if not s.pinned]
    assert len(hidden) == 4 and all(s.size == CHANNELS for s in hidden)


def test_the_permuted_copy_computes_the_same_images(generator, noise):
    permuted, count = permuted_by_analysis(generator, noise, seed=1)
    assert count == 4
    weight = generator.scales[0].head[0].weight
    assert not torch.allclose(permuted.scales[0].head[0].weight, weight)
    with torch.no_grad():
        torch.testing.assert_close(permuted(noise), generator(noise), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["zipit", "permute", "weights"])
def test_merging_with_a_permuted_copy_gives_the_images_back(generator, noise, method):
    permuted, _ = permuted_by_analysis(generator, noise, seed=1)
    keywords = dict(weight_similarity=0.0) if method == "zipit" else {}
    merged = fxzip.merge(generator, permuted, noise, method=method, shared_output=True,
                         corrections=None, reset_bn=False, progress=False, **keywords)
    with torch.no_grad():
        out, ref = merged(noise), generator(noise)
    assert isinstance(out, torch.Tensor) and out.shape == ref.shape
    assert rel_err(out, ref) < 1e-4, (method, rel_err(out, ref))
    for n in range(len(SIZES)):  # the image channels are not permuted: biases and a_n as given
        own = generator.scales[n]
        torch.testing.assert_close(merged.get_submodule(f"scales.{n}.tail").bias, own.tail.bias)
        torch.testing.assert_close(merged.get_submodule(f"scales.{n}.noise_amp").weight,
                                   own.noise_amp.weight)
