"""Between the pictures we read and write and the pixels the model takes.

Files, reports and contact sheets hold uint8 ``H x W x 3`` RGB; Stable
Diffusion's VAE takes float ``(N, 3, H, W)`` in [-1, 1], as its training
scripts normalise (``Normalize([0.5], [0.5])``). Every crossing goes through
these two, so the scale, the rounding and the clipping are decided once.
"""

from __future__ import annotations

import numpy as np
import torch


def to_model(rgb: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 ``H x W x 3`` -> float32 ``(1, 3, H, W)`` in [-1, 1] on ``device``.

    ``from_numpy`` shares the array's memory, so the one full-size copy is the
    float one (a 100-megapixel image is 1.2 GB per float32 copy).
    """
    return torch.from_numpy(np.ascontiguousarray(rgb)).to(device).permute(2, 0, 1)[None].float() / 127.5 - 1


def to_rgb(image: torch.Tensor) -> np.ndarray:
    """float ``(3, H, W)`` in [-1, 1] -> uint8 ``H x W x 3``: rounded, not truncated (truncating darkens by half a level)."""
    return ((image.detach().permute(1, 2, 0).cpu().numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
