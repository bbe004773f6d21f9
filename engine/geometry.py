"""Where the attack works: image size, model-input size, and the maps between them.

A fine-tuning script (diffusers' train_dreambooth/train_text_to_image/LoRA
scripts, kohya's) resizes an image so that its SHORT side is the model's
training resolution (bilinear, antialiased), then crops. So we work at that
same scale: the short side at ``resolution`` (512 for SD 1.5), aspect kept,
never upscaled. Very long panoramas are capped at twice the area of a square,
since a script would only crop part of them anyway. (Such strips, webtoons
say, are protected coarsely: tiling them at full scale is future work.) The working image is
padded (edge pixels repeated) to the model's size multiple (64 for SD) instead of
being stretched, and the padding is cut off again.

For images larger than the working size, the perturbation delta lives at the
working size and is carried to full resolution by bilinear upsampling. A
bilinear upsample is a convex combination of delta's values, so it never
leaves the budget. To make sure it survives the script's downscale, the attack
optimises what the script will see: ``seen(delta) = down(up(delta))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


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

    @property
    def resized(self) -> bool:
        return self.work != self.full

    def down(self, image: torch.Tensor) -> torch.Tensor:
        """Full resolution to working size, the way a training script downscales."""
        if not self.resized:
            return image
        return F.interpolate(image, size=self.work, mode="bilinear", antialias=True, align_corners=False)

    def up(self, delta: torch.Tensor) -> torch.Tensor:
        """Working size to full resolution (stays inside delta's range)."""
        if not self.resized:
            return delta
        return F.interpolate(delta, size=self.full, mode="bilinear", align_corners=False)

    def seen(self, delta: torch.Tensor) -> torch.Tensor:
        """The perturbation as a fine-tuning script sees it after its downscale."""
        return self.down(self.up(delta)) if self.resized else delta

    def pad(self, image: torch.Tensor) -> torch.Tensor:
        bottom, right = self.padded[0] - self.work[0], self.padded[1] - self.work[1]
        if not (bottom or right):
            return image
        # Replicate, not reflect: reflection needs the pad to be smaller than the
        # side, which fails for a long panorama shrunk under the area cap.
        return F.pad(image, (0, right, 0, bottom), mode="replicate")
