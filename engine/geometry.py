"""Where the attack works: image size, model-input size, and the maps between them.

A fine-tuning script (diffusers' train_dreambooth/train_text_to_image/LoRA
scripts, kohya's) resizes an image so that its SHORT side is the model's
training resolution (bilinear, antialiased), then crops. So we work at that
same scale: the short side at ``resolution`` (512 for SD 1.5), aspect kept,
never upscaled. Very long panoramas are capped at twice the area of a square,
since a script would only crop part of them anyway. (Such strips, webtoons
say, are protected coarsely, and the report says so: tiling them at the
scripts' scale would multiply the time by the number of tiles.) The working
image is padded (edge pixels repeated) to the model's size multiple (64 for SD) instead of
being stretched, and the padding is cut off again.

For images larger than the working size, the perturbation delta lives at the
working size and is carried to full resolution by bilinear upsampling. A
bilinear upsample is a convex combination of delta's values, so it never
leaves the budget. To make sure it survives the script's downscale, the attack
optimises what the script will see: ``seen(delta) = down(up(delta))``.

Nothing at full resolution is held whole in floating point: a 100-megapixel
image is 1.2 GB per float32 copy, and a few such copies of a 24-megapixel
image already peak at 12.9 GB. Both maps are separable, so
``seen`` works one axis at a time, and the full-resolution ends
(:meth:`Geometry.down_image`, :meth:`Geometry.perturb`) work a band of rows or
columns at a time. Each gives the whole-image version's numbers to float32
rounding (tests/test_large_images.py checks this).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fixative.engine.pixels import to_model

BAND_PIXELS = 1 << 19
"""Pixels in one band of full-resolution work: 6 MB per float32 RGB copy, whatever the image size."""


def bands(length: int, across: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` slices of ``length`` rows (or columns) that are ``across`` pixels wide, about BAND_PIXELS each."""
    step = max(1, BAND_PIXELS // across)
    for start in range(0, length, step):
        yield start, min(start + step, length)


def _up(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False)


def _down(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(image, size=size, mode="bilinear", antialias=True, align_corners=False)


@dataclass(frozen=True)
class Geometry:
    full: tuple[int, int]  # (H, W) of the image
    work: tuple[int, int]  # (h, w) the perturbation lives at
    padded: tuple[int, int]  # (h, w) the model sees, multiples of the model's size multiple

    @classmethod
    def plan(cls, height: int, width: int, resolution: int, multiple: int) -> "Geometry":
        scale = min(1.0, resolution / min(height, width), math.sqrt(2 * resolution**2 / (height * width)))
        work = (max(1, round(height * scale)), max(1, round(width * scale)))
        padded = tuple(math.ceil(side / multiple) * multiple for side in work)
        return cls(full=(height, width), work=work, padded=padded)

    def halved(self, multiple: int) -> "Geometry":
        """The coarse stage's geometry: half the working side, with this geometry's working size as its 'full' size.

        So ``halved.down`` takes the working image to half its side, ``halved.seen``
        is what a model working at that size would see of a perturbation carried
        up to the working size and back, and ``halved.up`` carries the coarse
        perturbation to the working size (bilinear: it stays in the ball).
        """
        work = tuple(max(1, round(side / 2)) for side in self.work)
        return Geometry(full=self.work, work=work, padded=tuple(math.ceil(side / multiple) * multiple for side in work))

    @property
    def resized(self) -> bool:
        return self.work != self.full

    def down(self, image: torch.Tensor) -> torch.Tensor:
        """Full resolution to working size, the way a training script downscales."""
        if not self.resized:
            return image
        return _down(image, self.work)

    def up(self, delta: torch.Tensor) -> torch.Tensor:
        """Working size to full resolution (stays inside delta's range)."""
        if not self.resized:
            return delta
        return _up(delta, self.full)

    def seen(self, delta: torch.Tensor) -> torch.Tensor:
        """The perturbation as a fine-tuning script sees it after its downscale: ``down(up(delta))``.

        One axis at a time (the maps are separable; an interpolation that keeps
        a side's length leaves it exactly as it is), so the largest
        intermediate is h x W or H x w, never H x W: PGD's memory does not grow
        with the square of the image's size.
        """
        if not self.resized:
            return delta
        (height, width), (h, w) = self.full, self.work
        across = _down(_up(delta, (h, width)), (h, w))
        return _down(_up(across, (height, w)), (h, w))

    def down_image(self, rgb: np.ndarray) -> torch.Tensor:
        """uint8 H x W x 3 -> (1, 3, h, w) in [-1, 1] on the CPU: ``down`` of the whole image, in bands.

        The downscale is separable, so bands of rows are narrowed first and the
        narrow (3, H, w) image is then shortened: what ``down`` gives on the
        whole image (to float32 rounding), without its float copy.
        """
        height, width = self.full
        if not self.resized:
            return to_model(rgb)
        narrow = [_down(to_model(rgb[a:b]), (b - a, self.work[1])) for a, b in bands(height, width)]
        return _down(torch.cat(narrow, dim=2), self.work)

    def perturb(self, rgb: np.ndarray, delta: torch.Tensor, strength: float) -> np.ndarray:
        """The protected uint8 image: ``rgb`` plus ``up(delta)`` in whole levels, within ``strength`` of ``rgb``.

        Rounded, not truncated (truncating would bias every pixel down by half
        a level), and clipped around the original's own values, so the saved
        file, read back, is inside the budget exactly. Done in bands of columns
        after widening delta to (h, W): the whole-image upsample's values to
        float32 rounding.
        """
        height, width = self.full
        wide = delta.detach().float().cpu()
        if self.resized:
            wide = _up(wide, (self.work[0], width))
        out = np.empty_like(rgb)
        for a, b in bands(width, height):
            band = wide[..., a:b]
            if self.resized:
                band = _up(band, (height, b - a))
            levels = torch.round(band * 127.5)[0].permute(1, 2, 0).clamp(-strength, strength)
            original = torch.from_numpy(np.ascontiguousarray(rgb[:, a:b])).float()
            out[:, a:b] = (original + levels).clamp(0, 255).round().to(torch.uint8).numpy()
        return out

    def pad(self, image: torch.Tensor) -> torch.Tensor:
        bottom, right = self.padded[0] - self.work[0], self.padded[1] - self.work[1]
        if not (bottom or right):
            return image
        # Replicate, not reflect: reflection needs the pad to be smaller than the
        # side, which fails for a long panorama shrunk under the area cap.
        return F.pad(image, (0, right, 0, bottom), mode="replicate")
