"""Figures for the per-image report: how visible the perturbation is, and how much it bites.

Visibility: PSNR, SSIM and the largest change in 0-255 levels, on the saved
file read back, against the original; and the colour change on its flat
areas (:func:`flat_chroma_change`), where noise shows most.

Bite: the *protection gain* is the mean diffusion training loss of the
protected image divided by the original's, both as a fine-tuning script sees
them (downscaled to the working size), over one fixed set of (t, eps, posterior
noise) samples, so the ratio compares like with like (see
:func:`gain_samples` for how they are drawn). Above 1 means a model
fine-tuned on the protected image is trained on a target it predicts badly,
which is AdvDM's mechanism. The *latent shift* ||E(x') - E(x)|| / ||E(x)|| says
how far the VAE latent moved (what the encoder and mist modes aim at).

Survival: the same figures after a publishing pipeline (``fixative.engine.publishing``,
Pillow's real codecs), with the original put through the same pipeline, so
the ratio isolates what is left of the perturbation rather than what the codec
does to any image. survival = (gain after - 1) / (gain before - 1): 1 when the
pipeline leaves the effect whole, 0 when it removes it. For modes whose effect
is a moved latent rather than a raised loss (SDS-, encoder, mist: see
:func:`effect_figure`), survival is the ratio of latent shifts instead.
"""

from __future__ import annotations

import numpy as np
import torch
from kornia.color import rgb_to_ycbcr

from fixative.engine.budget import local_luma_std
from fixative.engine.diffusion import denoiser_residual, encode
from fixative.engine.geometry import Geometry, bands
from fixative.engine.model import LoadedModel, LoadedVAE
from fixative.engine.options import EngineOptions
from fixative.engine.pixels import to_model
from fixative.engine.publishing import serve

GAIN_SAMPLES = 8  # (t, eps, posterior noise) draws per evaluation; see gain_samples
GAIN_SEED = 20230214  # fixed, so the same image scores the same in every run and mode
UNET_BATCH = 4  # samples per UNet forward: 16 at once at 512 px set the process's peak memory


def psnr(original: np.ndarray, protected: np.ndarray) -> float:
    # Summed in int64, a band at a time: exact, and no float64 copy of a 100-megapixel image.
    total = sum(
        int(np.square(protected[a:b].astype(np.int32) - original[a:b]).sum(dtype=np.int64))
        for a, b in bands(original.shape[0], original.shape[1])
    )
    mse = total / original.size
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


SSIM_TAPS = 11  # Gaussian window of Wang et al. 2004: 11 taps, sigma 1.5


def _gaussian_window() -> list[float]:
    taps = torch.arange(SSIM_TAPS, dtype=torch.float64) - SSIM_TAPS // 2
    window = torch.exp(-(taps**2) / (2 * 1.5**2))
    return (window / window.sum()).tolist()


def _blur(x: torch.Tensor, window: list[float]) -> torch.Tensor:
    """'Valid' separable Gaussian blur of the last two dimensions, as weighted sums of shifted views.

    In place on one accumulator per axis: float64 conv2d has no fast CPU
    kernel, and the five blurs of a 97 x 6000 band took 2.9 s with it against
    0.29 s this way (one process, one thread, this project's 2-core machine).
    """
    width = x.shape[-1] - len(window) + 1
    across = x[..., :width] * window[0]
    for k, weight in enumerate(window[1:], 1):
        across.add_(x[..., k : k + width], alpha=weight)
    height = x.shape[-2] - len(window) + 1
    down = across[..., :height, :] * window[0]
    for k, weight in enumerate(window[1:], 1):
        down.add_(across[..., k : k + height, :], alpha=weight)
    return down


def ssim(original: np.ndarray, protected: np.ndarray) -> float:
    """Mean SSIM (Wang et al. 2004) over the colour channels: 11-tap Gaussian window, sigma 1.5.

    float64, over bands of output rows (each band reads its rows plus the
    window's 10 below), so its memory is bounded: whole-image float64 SSIM
    needs 26 GB for a 100-megapixel image. The bands' sums add up to
    the whole-image mean to float64 rounding (tests/test_large_images.py).
    """
    window = _gaussian_window()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    height, width = original.shape[:2]
    total, count = 0.0, 0
    for a, b in bands(height - SSIM_TAPS + 1, width):
        x, y = (torch.from_numpy(np.ascontiguousarray(rgb[a : b + SSIM_TAPS - 1])).double() for rgb in (original, protected))
        mu_x, mu_y, xx, yy, xy = _blur(torch.stack([x, y, x * x, y * y, x * y]).movedim(-1, 1), window)
        var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
        score = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
        total, count = total + float(score.sum()), count + score.numel()
    return total / count


FLAT_STD = 2.0  # 0-255 levels: a pixel whose local luma deviation (engine.budget.local_luma_std) is below this is flat


def flat_chroma_change(original: np.ndarray, protected: np.ndarray) -> float:
    """Mean |dCb| + |dCr| in 0-255 levels over the original's flat pixels (local luma deviation under FLAT_STD).

    The change a flat backdrop shows as coloured blotches; 0.0 when the picture has no flat pixel.
    """
    x, y = to_model(original), to_model(protected)
    flat = local_luma_std(x)[0, 0] < FLAT_STD
    if not bool(flat.any()):
        return 0.0
    change = (rgb_to_ycbcr(y) - rgb_to_ycbcr(x))[0, 1:].abs().sum(dim=0) * 127.5
    return float(change[flat].mean())


def max_delta(original: np.ndarray, protected: np.ndarray) -> int:
    return max(
        int(np.abs(original[a:b].astype(np.int16) - protected[a:b]).max())
        for a, b in bands(original.shape[0], original.shape[1])
    )


def gain_samples(
    model: LoadedModel, like: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The report's (t, eps, posterior noise) draws for latents like ``like`` (1, C, H, W).

    The timesteps are stratified: one uniform draw in each of GAIN_SAMPLES
    equal slices of [0, T). Each sample has its own posterior noise, as each
    training example does. The estimate's error against many samples is what
    both choices cut: on the tiny model (3 images, PNG and after JPEG q75,
    30 draws each), 8 samples drawn this way were off by 1.2-2.4 (x 1000, in
    gain - 1) against 3.0-4.6 for the 16 uniform timesteps sharing one
    posterior noise used before, at half the UNet forwards (bench/README.md,
    "The report's cost").
    """
    count, total = GAIN_SAMPLES, model.num_train_timesteps
    slices = torch.arange(count, device=like.device) + torch.rand(count, generator=generator, device=like.device)
    t = (slices * total / count).long().clamp_max(total - 1)
    shape = (count, *like.shape[1:])
    eps = torch.randn(shape, generator=generator, device=like.device)
    noise = torch.randn(shape, generator=generator, device=like.device)
    return t, eps, noise


@torch.no_grad()
def protection_figures(model: LoadedModel | LoadedVAE, original: torch.Tensor, protected: torch.Tensor) -> dict[str, float]:
    """Protection gain and latent shift for two padded model inputs (1, 3, H, W) in [-1, 1].

    A VAE alone has no denoiser to score a loss with: the latent shift only.
    """
    mean, std = encode(model, torch.cat([original, protected]))
    latent_shift = float((mean[1] - mean[0]).norm() / mean[0].norm())
    if isinstance(model, LoadedVAE):
        return {"latent_shift": latent_shift}
    generator = torch.Generator(model.device).manual_seed(GAIN_SEED)
    loss_original, loss_protected = mean_losses(model, mean, std, *gain_samples(model, mean[:1], generator))
    return {
        "loss_original": loss_original,
        "loss_protected": loss_protected,
        "protection_gain": loss_protected / loss_original,
        "latent_shift": latent_shift,
    }


@torch.no_grad()
def mean_losses(
    model: LoadedModel, mean: torch.Tensor, std: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor
) -> list[float]:
    """Each posterior's (mean[i], std[i]) mean diffusion loss over the samples (t, eps, posterior noise).

    ``noise`` has a row per sample, or one row that every sample shares.
    """
    losses = []
    for i in range(len(mean)):
        z = (mean[i : i + 1] + std[i : i + 1] * noise).expand(len(t), -1, -1, -1)
        squares = [
            denoiser_residual(model, z[j : j + UNET_BATCH], t[j : j + UNET_BATCH], eps[j : j + UNET_BATCH]).square()
            for j in range(0, len(t), UNET_BATCH)
        ]
        losses.append(torch.cat(squares).mean().item())
    return losses


def effect_figure(options: EngineOptions, model: LoadedModel | LoadedVAE | None = None) -> str:
    """The figure a mode's effect shows in: the training loss (advdm, SDS+), or the latent (the others).

    Mist raises the loss too, but its pull toward the texture dominates once
    latents have unit variance, as SD's do: on the tiny model its gain stays
    just under 1 while its latent moves (bench/README.md, "Robustness").
    A VAE alone is attacked through its latent whatever the mode
    (``fixative.engine.ensemble``).
    """
    if isinstance(model, LoadedVAE) or options.mode in ("encoder", "mist") or (options.mode == "sds" and options.sds_direction == "minimize"):
        return "latent_shift"
    return "protection_gain"


def as_seen(rgb: np.ndarray, geometry: Geometry, device: torch.device) -> torch.Tensor:
    """An 8-bit image as a fine-tuning script feeds it to the model: at the working size, padded.

    A served copy may be smaller than the original (a platform's downscale);
    the script resizes it to its training size all the same, as it would any upload.
    """
    served = Geometry(full=rgb.shape[:2], work=geometry.work, padded=geometry.padded)
    return geometry.pad(served.down_image(rgb).to(device))


def survival(before: dict[str, float], after: dict[str, float], figure: str) -> float | None:
    """What part of the effect is left: 1 whole, 0 gone; None when there was no effect to keep."""
    if figure == "latent_shift":
        return after["latent_shift"] / before["latent_shift"] if before["latent_shift"] > 0 else None
    return (after["protection_gain"] - 1) / (before["protection_gain"] - 1) if before["protection_gain"] > 1 else None


def served_figures(
    model: LoadedModel | LoadedVAE,
    geometry: Geometry,
    original: np.ndarray,
    protected: np.ndarray,
    before: dict[str, float],
    figure: str,
    pipelines: tuple[str, ...],
) -> dict[str, dict[str, float | None]]:
    """Gain, latent shift and survival after each publishing pipeline, both images served alike."""
    served = {}
    for name in pipelines:
        after = protection_figures(
            model,
            as_seen(serve(original, name), geometry, model.device),
            as_seen(serve(protected, name), geometry, model.device),
        )
        served[name] = {
            "protection_gain": after.get("protection_gain"),
            "latent_shift": after["latent_shift"],
            "survival": survival(before, after, figure),
        }
    return served
