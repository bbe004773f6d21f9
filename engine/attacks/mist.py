"""Mist: AdvDM's semantic loss fused with a textural loss toward a target image.

Liang et al., "Mist: Towards Improved Adversarial Examples for Diffusion
Models" (arXiv 2305.12683). Besides raising the diffusion loss, the image's
latent is pulled toward the latent of a high-contrast texture, so that what a
fine-tuned model does learn looks like the texture. We ascend

    L_semantic - texture_weight * mean((E(x') - E(target))^2)

with both terms as per-element means (Mist sums the textural term and weighs
the semantic one by 1e4; at SD's 64x64x4 latents that is the same balance
within a factor of 1.6). The target's latent is encoded once, not per step.
"""

from __future__ import annotations

import torch

from fixative.engine.diffusion import diffusion_loss, draw_timesteps_and_noise, latent_objective, row_means
from fixative.engine.model import LoadedModel
from fixative.engine.options import EngineOptions
from fixative.engine.texture import target_latent


class Mist:
    maximize = True

    def __init__(self, model: LoadedModel, options: EngineOptions, input_shape: tuple[int, ...]):
        self.model = model
        self.samples = options.samples_per_step
        self.weight = options.texture_weight
        self.target = target_latent(model, options.target, input_shape)
        self.split_backward = options.low_vram

    def __call__(self, x: torch.Tensor, generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        def objective(mean: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            t, eps = draw_timesteps_and_noise(self.model, z, self.samples, generators)
            # The target's one latent is broadcast over the rows.
            return diffusion_loss(self.model, z, t, eps) - self.weight * row_means((mean - self.target).square())

        return latent_objective(self.model, x, generators, objective, self.split_backward)
