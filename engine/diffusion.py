"""The pieces of latent diffusion training that every attack differentiates through.

Notation follows the AdvDM paper (Liang, Wu et al., ICML 2023, arXiv 2302.04578):
x is the image in [-1, 1], z = s * (E(x) - shift) its latent (SD's VAEs have no shift), z_t = sqrt(a_t) z + sqrt(1 - a_t) eps
the noised latent at step t, and the training loss is || eps_theta(z_t, t, c) - eps ||^2.

Every function takes a batch of N images, one row each, and one generator per
row (``fixative.engine.protect.protect_batch``): row i's random draws come from its own
generator in the order they would come alone, so a row's result does not
depend on the others in its batch.
"""

from __future__ import annotations

from typing import Callable

import torch

from fixative.engine.model import LoadedModel, LoadedVAE


def encode(model: LoadedModel | LoadedVAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior of ``x`` as (mean, std), shifted and scaled into latent units, fp32.

    AdvDM differentiates through a posterior *sample*, as training does (see
    :func:`sample_latent`); the mean is the stable quantity that textural
    losses and the latent-shift metric compare.
    """
    posterior = model.vae.encode(x.to(model.vae.dtype)).latent_dist
    mean = model.scaling_factor * (posterior.mean.float() - model.shift_factor)
    return mean, model.scaling_factor * posterior.std.float()


def latent_noise(like: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Standard normal noise shaped like the latents ``like`` (N, C, H, W), row i drawn from ``generators[i]``."""
    return torch.cat([torch.randn((1, *like.shape[1:]), generator=g, device=like.device, dtype=like.dtype) for g in generators])


def sample_latent(mean: torch.Tensor, std: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    return mean + std * latent_noise(mean, generators)


def row_sums(values: torch.Tensor) -> torch.Tensor:
    """(N, ...) -> (N,): each row's sum, the attacks' objective per image."""
    return values.flatten(1).sum(dim=1)


def row_means(values: torch.Tensor) -> torch.Tensor:
    """(N, ...) -> (N,): each row's mean."""
    return values.flatten(1).mean(dim=1)


def latent_objective(
    model: LoadedModel,
    x: torch.Tensor,
    generators: list[torch.Generator],
    objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    split_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluate ``objective(mean, z)`` (one value per row) on the latents of ``x``; return (surrogate, value) per row.

    Each row's surrogate has the gradient of that row's objective. Normally
    the surrogate is the objective itself. With ``split_backward`` (the
    low-VRAM mode, Mist v2's trick) the encoder first runs without keeping
    activations, the objective's gradient with respect to the latent is taken
    (and the UNet's activations freed), and only then does the encoder run
    again with a graph, so encoder and UNet activations never coexist. The
    price is one more encoder forward per step.
    """
    if not split_backward:
        mean, std = encode(model, x)
        value = objective(mean, sample_latent(mean, std, generators))
        return value, value.detach()
    with torch.no_grad():
        mean, std = encode(model, x)
    noise = latent_noise(mean, generators)
    mean_leaf = mean.requires_grad_(True)
    z_leaf = (mean + std * noise).detach().requires_grad_(True)
    value = objective(mean_leaf, z_leaf)
    grad_mean, grad_z = torch.autograd.grad(value.sum(), [mean_leaf, z_leaf], allow_unused=True)
    mean, std = encode(model, x)
    surrogate = row_sums((mean + std * noise).mul(grad_z))
    if grad_mean is not None:
        surrogate = surrogate + row_sums(mean.mul(grad_mean))
    return surrogate, value.detach()


def draw_timesteps_and_noise(
    model: LoadedModel, like: torch.Tensor, count: int, generators: list[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` pairs (t ~ U{0..T-1}, eps ~ N(0, I)) per row of latents like ``like`` (N, C, H, W).

    t is (N * count,) and eps (N * count, C, H, W), row i's pairs together and
    drawn from ``generators[i]``.
    """
    t, eps = [], []
    for generator in generators:
        t.append(torch.randint(0, model.num_train_timesteps, (count,), generator=generator, device=like.device))
        eps.append(torch.randn((count, *like.shape[1:]), generator=generator, device=like.device, dtype=torch.float32))
    return torch.cat(t), torch.cat(eps)


def denoiser_residual(model: LoadedModel, z: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """eps_theta(z_t, t, c) - target, fp32, one row per (t, eps) pair.

    ``z`` is (N, C, H, W) and each of its rows serves len(t) / N consecutive
    pairs (as :func:`draw_timesteps_and_noise` lays them out). For
    v-prediction models (SD 2.x 768) the target is v = sqrt(a) eps - sqrt(1 - a) z,
    the quantity those models were trained to predict.
    """
    a = model.alphas_cumprod[t].view(-1, 1, 1, 1)
    z = z.repeat_interleave(len(t) // len(z), dim=0)
    z_t = a.sqrt() * z + (1 - a).sqrt() * eps
    context = model.text_embedding.expand(len(t), -1, -1)
    prediction = model.unet(z_t.to(model.dtype), t, context).sample.float()
    target = eps if model.prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * z
    return prediction - target


def diffusion_loss(model: LoadedModel, z: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Each row's mean training loss over its (t, eps) pairs, (N,): the quantity AdvDM maximises."""
    return row_means(denoiser_residual(model, z, t, eps).square().unflatten(0, (len(z), -1)))
