"""SDS: the score-distillation attack of Xue et al. (ICLR 2024, arXiv 2311.12832).

The gradient of the diffusion loss with respect to the latent is replaced by
the score-distillation estimate (eps_theta(z_t) - eps), which skips the UNet's
backward pass: the UNet runs under no_grad, and only the VAE encoder is
differentiated, via the surrogate sum(z * g) whose gradient is g pushed back
through the encoder. The paper finds the encoder to be the vulnerable part of
latent diffusion.

Directions: maximising (SDS+) ascends the same AdvDM loss as ``advdm`` with
an approximate gradient; on the tiny trained model it reaches the reference
AdvDM loop's protection gain (0.97-1.10x, within seed noise), and at full
scale on the CPU a step costs half the reference's, so SDS+ is fixative's
default. Minimising (SDS-) is what the paper recommends as stronger and less
visible against fine-tuning; its effect runs through the encoder and does not
show in the protection gain (which it lowers), so it is offered, not default.
"""

from __future__ import annotations

import torch

from fixative.engine.diffusion import denoiser_residual, draw_timesteps_and_noise, encode, row_means, row_sums, sample_latent
from fixative.engine.model import LoadedModel
from fixative.engine.options import EngineOptions


class SDS:
    def __init__(self, model: LoadedModel, options: EngineOptions, input_shape: tuple[int, ...]):
        self.model = model
        self.samples = options.samples_per_step
        self.maximize = options.sds_direction == "maximize"

    def __call__(self, x: torch.Tensor, generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = encode(self.model, x)
        z = sample_latent(mean, std, generators)
        t, eps = draw_timesteps_and_noise(self.model, z, self.samples, generators)
        with torch.no_grad():
            residual = denoiser_residual(self.model, z, t, eps).unflatten(0, (len(z), -1))  # (N, samples, C, H, W)
        surrogate = row_sums(z * residual.mean(dim=1))
        return surrogate, row_means(residual.square())
