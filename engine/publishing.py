"""What happens to a published image before a mimic trains on it: the real codecs, not a model of them.

An artist's PNG reaches a fine-tuning script through a platform, which
re-encodes it (JPEG at quality 75-85 is typical) and often downscales it.
Each pipeline here is one such path, applied to 8-bit RGB with Pillow, the
same kind of encoder a platform runs. These are what the report's survival
figures, ``fixative check --after`` and the bench's robustness table measure
against. The *differentiable* stand-ins that the attack optimises through live
in ``fixative.engine.transforms``; keeping the two apart is what makes the survival
figures an honest test of those stand-ins rather than a restatement of them.

Noise is drawn from a fixed seed, so a pipeline maps the same input to the
same output every time, and an original and its protected copy meet the same
noise.
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

NOISE_SEED = 4242


def jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    """Pillow's JPEG at ``quality``, with its default 4:2:0 chroma subsampling, as platforms serve it."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    with Image.open(io.BytesIO(buffer.getvalue())) as image:
        return np.array(image.convert("RGB"))


def downscale(rgb: np.ndarray, factor: float) -> np.ndarray:
    """An antialiased (Lanczos) downscale, as platforms make their display sizes."""
    height, width = rgb.shape[:2]
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return np.array(Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS))


def gaussian_noise(rgb: np.ndarray, sigma_levels: float) -> np.ndarray:
    noise = np.random.default_rng(NOISE_SEED).normal(0.0, sigma_levels, rgb.shape)
    return (rgb.astype(np.float64) + noise).round().clip(0, 255).astype(np.uint8)


def gaussian_blur(rgb: np.ndarray, sigma_pixels: float) -> np.ndarray:
    return np.array(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(radius=sigma_pixels)))


def noisy_upscale(rgb: np.ndarray) -> np.ndarray:
    """A stand-in for the noisy-upscaling purifier of Hönig et al. (ICLR 2025, arXiv 2406.12027).

    They add Gaussian noise (sigma 0.05-0.1 on a [0, 1] scale) and let a x4
    diffusion upscaler repaint the detail. We have no upscaler model, so the
    repaint is a 2x Lanczos downscale and a bicubic upscale: it removes fine
    detail the way the upscaler's low-resolution input does, but invents none.
    A real diffusion purifier is stronger than this; see the README's Limits.
    """
    height, width = rgb.shape[:2]
    small = downscale(gaussian_noise(rgb, 0.05 * 255), 0.5)
    return np.array(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC))


PIPELINES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "jpeg95": lambda rgb: jpeg(rgb, 95),
    "jpeg85": lambda rgb: jpeg(rgb, 85),
    "jpeg75": lambda rgb: jpeg(rgb, 75),
    "half": lambda rgb: downscale(rgb, 0.5),
    "half+jpeg75": lambda rgb: jpeg(downscale(rgb, 0.5), 75),
    "noise4": lambda rgb: gaussian_noise(rgb, 4.0),
    "blur1": lambda rgb: gaussian_blur(rgb, 1.0),
    "noisy_upscale": noisy_upscale,
    "flip": lambda rgb: np.ascontiguousarray(rgb[:, ::-1]),  # a fine-tuner's random flip (diffusers' --random_flip)
}

# The pipelines every per-image report measures: the common ways a platform serves an upload.
REPORTED_PIPELINES = ("jpeg85", "jpeg75", "half+jpeg75")


def serve(rgb: np.ndarray, pipeline: str) -> np.ndarray:
    """``rgb`` (H, W, 3) uint8 as it comes out of ``pipeline``; the size may change (``half``)."""
    if pipeline not in PIPELINES:
        raise ValueError(f"unknown pipeline {pipeline!r}; known: {', '.join(PIPELINES)}")
    return PIPELINES[pipeline](np.ascontiguousarray(rgb, dtype=np.uint8))
