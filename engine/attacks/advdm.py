"""AdvDM: maximise the diffusion training loss of the perturbed image.

Algorithm 1 of Liang, Wu et al., "Adversarial Example Does Good" (ICML 2023,
arXiv 2302.04578): at each PGD step draw t and eps, encode the image to a
posterior sample z, and ascend || eps_theta(z_t, t, c) - eps ||^2. A model
fine-tuned on such images learns to denoise the perturbation's latent pattern
instead of the artist's style.

``samples_per_step`` > 1 averages the loss over several (t, eps) pairs for a
single VAE encode: the encoder (the costlier half at 512 px) runs once, and the
gradient estimate is less noisy.
"""

from __future__ import annotations

import torch

from fixative.engine.diffusion import diffusion_loss, draw_timesteps_and_noise, latent_objective
from fixative.engine.model import LoadedModel
from fixative.engine.options import EngineOptions


class AdvDM:
    maximize = True

    def __init__(self, model: LoadedModel, options: EngineOptions, input_shape: tuple[int, ...]):
        self.model = model
        self.samples = options.samples_per_step
        self.split_backward = options.low_vram

    def __call__(self, x: torch.Tensor, generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        def loss(mean: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            t, eps = draw_timesteps_and_noise(self.model, z, self.samples, generators)
            return diffusion_loss(self.model, z, t, eps)

        return latent_objective(self.model, x, generators, loss, self.split_backward)
