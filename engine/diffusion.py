"""The pieces of latent diffusion training that every attack differentiates through.

Notation follows the AdvDM paper (Liang, Wu et al., ICML 2023, arXiv 2302.04578):
x is the image in [-1, 1], z = s * E(x) its latent, z_t = sqrt(a_t) z + sqrt(1 - a_t) eps
the noised latent at step t, and the training loss is || eps_theta(z_t, t, c) - eps ||^2.
"""

from __future__ import annotations

from typing import Callable

import torch

from fixative.engine.model import LoadedModel


def encode(model: LoadedModel, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior of ``x`` as (mean, std), scaled into latent units, fp32.

    AdvDM differentiates through a posterior *sample*, as training does (see
    :func:`sample_latent`); the mean is the stable quantity that textural
    losses and the latent-shift metric compare.
    """
    posterior = model.vae.encode(x.to(model.vae.dtype)).latent_dist
    return model.scaling_factor * posterior.mean.float(), model.scaling_factor * posterior.std.float()


def sample_latent(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + std * noise


def latent_objective(
    model: LoadedModel,
    x: torch.Tensor,
    generator: torch.Generator | None,
    objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    split_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluate ``objective(mean, z)`` on the latent of ``x``; return (surrogate, value).

    The surrogate's gradient with respect to x is the objective's. Normally
    the surrogate is the objective itself. With ``split_backward`` (the
    low-VRAM mode, Mist v2's trick) the encoder first runs without keeping
    activations, the objective's gradient with respect to the latent is taken
    (and the UNet's activations freed), and only then does the encoder run
    again with a graph, so encoder and UNet activations never coexist. The
    price is one more encoder forward per step.
    """
    if not split_backward:
        mean, std = encode(model, x)
        value = objective(mean, sample_latent(mean, std, generator))
        return value, value.detach()
    with torch.no_grad():
        mean, std = encode(model, x)
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    mean_leaf = mean.requires_grad_(True)
    z_leaf = (mean + std * noise).detach().requires_grad_(True)
    value = objective(mean_leaf, z_leaf)
    grad_mean, grad_z = torch.autograd.grad(value, [mean_leaf, z_leaf], allow_unused=True)
    mean, std = encode(model, x)
    surrogate = (mean + std * noise).mul(grad_z).sum()
    if grad_mean is not None:
        surrogate = surrogate + mean.mul(grad_mean).sum()
    return surrogate, value.detach()


def draw_timesteps_and_noise(
    model: LoadedModel, like: torch.Tensor, count: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` pairs (t ~ U{0..T-1}, eps ~ N(0, I)) shaped for latents like ``like`` (1, C, H, W)."""
    t = torch.randint(0, model.num_train_timesteps, (count,), generator=generator, device=like.device)
    eps = torch.randn((count, *like.shape[1:]), generator=generator, device=like.device, dtype=torch.float32)
    return t, eps


def denoiser_residual(model: LoadedModel, z: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """eps_theta(z_t, t, c) - target, fp32, one row per (t, eps) pair.

    ``z`` is (1, C, H, W) and is broadcast over the pairs. For v-prediction
    models (SD 2.x 768) the target is v = sqrt(a) eps - sqrt(1 - a) z, the
    quantity those models were trained to predict.
    """
    a = model.alphas_cumprod[t].view(-1, 1, 1, 1)
    z = z.expand(len(t), -1, -1, -1)
    z_t = a.sqrt() * z + (1 - a).sqrt() * eps
    context = model.text_embedding.expand(len(t), -1, -1)
    prediction = model.unet(z_t.to(model.dtype), t, context).sample.float()
    target = eps if model.prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * z
    return prediction - target


def diffusion_loss(model: LoadedModel, z: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The mean training loss over the (t, eps) pairs: the quantity AdvDM maximises."""
    return denoiser_residual(model, z, t, eps).square().mean()
