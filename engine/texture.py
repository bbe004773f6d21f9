"""The target that the mist and encoder modes pull an image's latent toward.

Mist ships a fixed high-contrast image as its target. We ship no image: the
default target is generated here, a black-and-white interference pattern of
several orientations and periods (8 to 40 px). Hard edges at many scales give
the VAE latent a strong, style-free texture to be dragged toward. A user may
give their own target image instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fixative.engine.diffusion import encode
from fixative.engine.imaging import read_image
from fixative.engine.model import LoadedModel
from fixative.engine.pixels import to_model


def default_texture(height: int, width: int) -> np.ndarray:
    """A deterministic high-contrast pattern, float32 in [-1, 1], shape (3, H, W)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    field = np.zeros((height, width), dtype=np.float32)
    for angle, period in [(0.0, 8), (0.7, 13), (1.9, 21), (2.6, 40)]:
        field += np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    pattern = np.where(field > 0, 1.0, -1.0).astype(np.float32)
    return np.stack([pattern, np.roll(pattern, 5, axis=1), np.roll(pattern, 9, axis=0)])


def target_image(path: Path | None, height: int, width: int) -> torch.Tensor:
    """The target at the model-input size, (1, 3, H, W) in [-1, 1]; a user's image is cover-cropped, never stretched."""
    if path is None:
        return torch.from_numpy(default_texture(height, width))[None]
    rgb = to_model(read_image(Path(path)).rgb)
    scale = max(height / rgb.shape[2], width / rgb.shape[3])
    size = (max(height, round(rgb.shape[2] * scale)), max(width, round(rgb.shape[3] * scale)))
    rgb = F.interpolate(rgb, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return rgb[:, :, top : top + height, left : left + width]


@torch.no_grad()
def target_latent(model: LoadedModel, path: Path | None, input_shape: tuple[int, ...]) -> torch.Tensor:
    """Encode the target once (the posterior mean), for an input of ``input_shape`` (1, 3, H, W)."""
    target = target_image(path, input_shape[2], input_shape[3]).to(model.device)
    mean, _ = encode(model, target)
    return mean
