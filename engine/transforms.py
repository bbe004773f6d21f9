"""The publishing pipeline as the attack sees it: one random, differentiable draw per PGD step.

Expectation over transformation (EOT; Athalye et al., "Synthesizing Robust
Adversarial Examples", ICML 2018): instead of the objective of x + delta, each
step differentiates the objective of T(x + delta) for a transformation T drawn
from what happens to a published image. A perturbation that only works on the
exact lossless pixels (which is what plain PGD finds: fine detail that JPEG
quantises away) then stops paying off, and the steps move it into what
survives. MetaCloak (Liu et al., CVPR 2024) does this over flips, blur and
resizing; we add the codec, which is what every platform applies.

A draw, in the order an upload meets them:
1. half the time, the platform's downscale (antialiased) by a factor in
   [0.5, 1), and the fine-tuner's resize back to the working size (the
   working size *is* what a script resizes to: short side at the model's
   resolution);
2. most of the time, the platform's JPEG at a quality in [70, 95], through
   kornia's differentiable codec (Reich et al., "Differentiable JPEG: The
   Devil is in the Details", WACV 2024), before that resize back;
3. now and then, a little Gaussian noise or blur (a filter, a re-save).

What is left out, by measurement (tiny model, bench/README.md "Robustness"):
the fine-tuner's crop offset and horizontal flip. Drawn at every step, a
shift of 0-7 px (the crop offset modulo the VAE's 8 px latent grid) took the
protection gain to 1.000 on both test images, before any codec: what the
steps found in register with the grid, the next shift undid. A flip drawn at
every step kept a gain (1.01) but none of it survived JPEG. Diffusers' LoRA and
DreamBooth scripts crop square images without an offset and flip only when
asked (--random_flip), so the defaults here serve the common case; the
bench's table shows what a flip does to the result.

The saved file's budget is untouched by any of this: the transformations act
only on what the objective sees, and the perturbation is still projected
into the L-infinity ball and rounded around the original's own values.
"""

from __future__ import annotations

import random

import torch
from kornia.enhance import jpeg_codec_differentiable
from kornia.filters import gaussian_blur2d
from kornia.geometry.transform import resize

JPEG_PROBABILITY = 0.8  # the codec is what every platform applies, and what undid the plain attack
JPEG_QUALITY = (70, 95)
DOWNSCALE_PROBABILITY = 0.5
DOWNSCALE_FACTOR = (0.5, 1.0)
NOISE_PROBABILITY = 0.1
NOISE_LEVELS = 4.0  # sigma in 0-255 levels, at most
BLUR_PROBABILITY = 0.1
BLUR_PIXELS = (0.3, 1.0)  # sigma
SMALLEST_SIDE = 8  # pixels: one latent cell of SD's VAE


def jpeg(image: torch.Tensor, quality: float) -> torch.Tensor:
    """Differentiable JPEG of an image in [-1, 1] (kornia's codec works in [0, 1])."""
    quality_tensor = torch.tensor([float(quality)], device=image.device)
    return jpeg_codec_differentiable((image + 1) / 2, quality_tensor) * 2 - 1


class PublishingTransform:
    """Draws T from the publishing pipeline at each call; parameters from its own seeded RNG.

    The parameters come from Python's RNG, not torch's, so drawing them never
    waits on the GPU; the noise tensor comes from the attack's generator.
    """

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        height, width = image.shape[-2:]
        rng = self.rng
        scaled = rng.random() < DOWNSCALE_PROBABILITY
        if scaled:
            factor = rng.uniform(*DOWNSCALE_FACTOR)
            size = (max(SMALLEST_SIDE, round(height * factor)), max(SMALLEST_SIDE, round(width * factor)))
            image = resize(image, size, interpolation="bilinear", antialias=True)
        if rng.random() < JPEG_PROBABILITY:
            image = jpeg(image, rng.uniform(*JPEG_QUALITY))
        if scaled:
            image = resize(image, (height, width), interpolation="bilinear")
        if rng.random() < NOISE_PROBABILITY:
            sigma = rng.uniform(0, NOISE_LEVELS) * 2 / 255
            noise = torch.randn(image.shape, generator=generator, device=image.device, dtype=image.dtype)
            image = image + sigma * noise
        elif rng.random() < BLUR_PROBABILITY:
            sigma = rng.uniform(*BLUR_PIXELS)
            image = gaussian_blur2d(image, (5, 5), (sigma, sigma), border_type="replicate")
        return image.clamp(-1, 1)
