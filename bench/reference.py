"""The reference: AdvDM as the paper's and Mist v1's code run it, re-implemented here.

This deliberately shares no code with ``engine/``: it is the yardstick the
engine is measured against. It does what Algorithm 1 of Liang, Wu et al.
(ICML 2023, arXiv 2302.04578) does and what Mist v1's "mode 0" runs:

- fp32 VAE and UNet, both resident (the text encoder is not: like fixative,
  the prompt is embedded once and the encoder freed, so both sides hold the
  same weights);
- the image at the size it is given, no resizing;
- a random start, uniform in the eps-ball, clipped to [-1, 1];
- every step: one t ~ U{0..T-1} and one eps ~ N(0, I); a VAE encoder forward
  to a posterior *sample*, times the scaling factor; the noised latent; a UNet
  forward; the mean squared error against eps; the full backward through the
  UNet and the encoder; a sign step of alpha, projected into the eps-ball
  around the original and into [-1, 1].

eps and alpha are in [-1, 1] units, i.e. twice the 0-255 levels / 255.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class ReferenceModel:
    vae: torch.nn.Module  # AutoencoderKL, fp32
    unet: torch.nn.Module  # UNet2DConditionModel, fp32
    context: torch.Tensor  # (1, 77, D) prompt embedding
    alphas_cumprod: torch.Tensor  # (T,)
    scaling_factor: float


def advdm_loss(model: ReferenceModel, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    latents = model.vae.encode(x).latent_dist.sample(generator) * model.scaling_factor
    noise = torch.randn(latents.shape, generator=generator, device=latents.device)
    t = torch.randint(0, len(model.alphas_cumprod), (1,), generator=generator, device=latents.device)
    a = model.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    prediction = model.unet(noisy, t, encoder_hidden_states=model.context).sample
    return F.mse_loss(prediction, noise)


def protect(
    model: ReferenceModel,
    x: torch.Tensor,
    steps: int,
    eps: float,
    alpha: float,
    seed: int,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Run ``steps`` PGD steps on ``x`` (1, 3, H, W) in [-1, 1]; return the perturbed image."""
    generator = torch.Generator(x.device).manual_seed(seed)
    x_adv = (x + (torch.rand(x.shape, generator=generator, device=x.device) * 2 - 1) * eps).clamp(-1, 1)
    for step in range(1, steps + 1):
        x_adv.requires_grad_(True)
        loss = advdm_loss(model, x_adv, generator)
        (gradient,) = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            x_adv = x_adv + alpha * gradient.sign()
            x_adv = (x + (x_adv - x).clamp(-eps, eps)).clamp(-1, 1)
        if on_step is not None:
            on_step(step, x_adv)
    return x_adv.detach()
