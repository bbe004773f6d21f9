"""Figures for the per-image report: how visible the perturbation is, and how much it bites.

Visibility: PSNR, SSIM and the largest change in 0-255 levels, on the saved
file read back, against the original.

Bite: the *protection gain* is the mean diffusion training loss of the
protected image divided by the original's, both as a fine-tuning script sees
them (downscaled to the working size), over one fixed set of (t, eps, posterior
noise) samples, so the ratio compares like with like. Above 1 means a model
fine-tuned on the protected image is trained on a target it predicts badly,
which is AdvDM's mechanism. The *latent shift* ||E(x') - E(x)|| / ||E(x)|| says
how far the VAE latent moved (what the encoder and mist modes aim at).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from engine.diffusion import denoiser_residual, draw_timesteps_and_noise, encode
from engine.model import LoadedModel

GAIN_SAMPLES = 16
GAIN_SEED = 20230214  # fixed, so the same image scores the same in every run and mode


def psnr(original: np.ndarray, protected: np.ndarray) -> float:
    mse = np.mean((original.astype(np.float64) - protected.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def ssim(original: np.ndarray, protected: np.ndarray) -> float:
    """Mean SSIM (Wang et al. 2004) over the colour channels: 11-tap Gaussian window, sigma 1.5."""
    a = torch.tensor(original).double().permute(2, 0, 1)[:, None]
    b = torch.tensor(protected).double().permute(2, 0, 1)[:, None]
    taps = torch.arange(11, dtype=torch.float64) - 5
    window = torch.exp(-(taps**2) / (2 * 1.5**2))
    window = window / window.sum()

    def blur(x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, window.view(1, 1, 1, 11))
        return F.conv2d(x, window.view(1, 1, 11, 1))

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    score = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(score.mean())


def max_delta(original: np.ndarray, protected: np.ndarray) -> int:
    return int(np.abs(original.astype(np.int16) - protected.astype(np.int16)).max())


@torch.no_grad()
def protection_figures(model: LoadedModel, original: torch.Tensor, protected: torch.Tensor) -> dict[str, float]:
    """Protection gain and latent shift for two padded model inputs (1, 3, H, W) in [-1, 1]."""
    generator = torch.Generator(model.device).manual_seed(GAIN_SEED)
    mean, std = encode(model, torch.cat([original, protected]))
    noise = torch.randn(mean[:1].shape, generator=generator, device=mean.device)
    t, eps = draw_timesteps_and_noise(model, mean[:1], GAIN_SAMPLES, generator)
    losses = []
    for i in range(2):
        z = mean[i : i + 1] + std[i : i + 1] * noise
        # A few samples at a time: a batch of 16 UNet forwards at 512 px set the
        # process's peak memory, above that of the attack itself.
        squares = [denoiser_residual(model, z, t[j : j + 4], eps[j : j + 4]).square() for j in range(0, GAIN_SAMPLES, 4)]
        losses.append(torch.cat(squares).mean().item())
    return {
        "loss_original": losses[0],
        "loss_protected": losses[1],
        "protection_gain": losses[1] / losses[0],
        "latent_shift": float((mean[1] - mean[0]).norm() / mean[0].norm()),
    }
