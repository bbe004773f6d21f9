"""Encoder attack: pull the image's latent toward a target texture's, no UNet at all.

The PhotoGuard encoder attack (Salman et al., "Raising the Cost of Malicious
AI-Powered Image Editing", ICML 2023), and Mist's textural term on its own.
It is the fastest mode (encoder forward and backward only), and, per Xue et
al. (ICLR 2024), the encoder is where latent diffusion is weakest. It is also
the easiest to wash out with JPEG, so it is not the default.
"""

from __future__ import annotations

import torch

from fixative.engine.diffusion import encode, row_means
from fixative.engine.model import LoadedModel
from fixative.engine.options import EngineOptions
from fixative.engine.texture import target_latent


class EncoderAttack:
    maximize = False

    def __init__(self, model: LoadedModel, options: EngineOptions, input_shape: tuple[int, ...]):
        self.model = model
        self.target = target_latent(model, options.target, input_shape)

    def __call__(self, x: torch.Tensor, generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        mean, _ = encode(self.model, x)
        distance = row_means((mean - self.target).square())  # the target's one latent, broadcast over the rows
        return distance, distance.detach()
