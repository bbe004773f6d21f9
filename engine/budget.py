"""How far PGD may move each pixel: the perturbation's budget, uniform or shaped the way the eye sees.

Both budgets keep the L-infinity bound the option ``strength`` names: no
channel of any pixel moves by more than ``eps``, the ball Algorithm 1 of
AdvDM (Liang, Wu et al., ICML 2023) and Mist project onto. The saved file is
clipped to it again in whole levels (``fixative.engine.geometry.Geometry.perturb``).

``uniform`` gives every R, G and B value the whole bound, so sign steps move
most of them to it: a flat backdrop gets the same noise as a busy one, and
in colour.

``perceptual`` spends the same bound where it is least seen:

* **Less chroma than luma.** PGD works on the change's luma and chroma
  (YCbCr, ITU-R BT.601, as ``kornia.color.rgb_to_ycbcr`` computes them);
  Cb and Cr get CHROMA_SHARE of luma's bound. The eye resolves fine colour
  detail far worse than fine brightness detail (its contrast sensitivity to
  chroma falls off at a lower spatial frequency: Mullen, J. Physiol. 1985), which is also
  why JPEG keeps chroma at half resolution: chroma noise is what shows as pink
  and green blotches, and the first thing a JPEG upload halves.
* **Less change where the picture is flat.** A change is harder to see on a
  busy background than on a flat one: the spatial-masking term of
  just-noticeable-difference models (Chou and Li, "A perceptually tuned
  subband image coder based on the measure of just-noticeable-distortion
  profile", IEEE TCSVT 1995, raise the visibility threshold with the
  background's local activity). Here the
  activity is luma's standard deviation over a TEXTURE_WINDOW box; the bound
  is scaled by :func:`texture_mask`, from TEXTURE_FLOOR on a flat area to 1
  at TEXTURE_FULL levels of local deviation and above.

The per-pixel bounds are :func:`budget_map`'s. Each component's sign step is
scaled by its bound, which is the steepest step in the norm whose unit ball
is the budget's box.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from kornia.color import rgb_to_ycbcr
from kornia.filters import box_blur

CHROMA_SHARE = 0.25  # Cb's and Cr's bound, as a share of luma's
TEXTURE_WINDOW = 5  # pixels at the working size, a side of the box the local deviation is taken over
TEXTURE_FULL = 8.0  # 0-255 levels of local luma deviation from which a pixel gets the whole bound
TEXTURE_FLOOR = 0.25  # the share of the bound a perfectly flat area keeps


def _ycbcr_matrix() -> torch.Tensor:
    """kornia's RGB -> YCbCr as a 3 x 3 matrix: its linear part, which is what a signed change goes through.

    kornia's YCbCr -> RGB clamps to [0, 1], so it cannot carry a change of
    either sign; the change goes back through this matrix's inverse instead.
    """
    basis = torch.eye(3)[:, :, None, None]  # pure R, pure G, pure B
    return (rgb_to_ycbcr(basis) - rgb_to_ycbcr(torch.zeros_like(basis)))[:, :, 0, 0].T


YCBCR_FROM_RGB = _ycbcr_matrix()
RGB_FROM_YCBCR = torch.linalg.inv(YCBCR_FROM_RGB)


def _colour_map(matrix: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,njhw->nihw", matrix.to(image.device), image)


def local_luma_std(images: torch.Tensor) -> torch.Tensor:
    """Luma's standard deviation over a TEXTURE_WINDOW box around each pixel, (N, 1, h, w), in 0-255 levels.

    ``images`` is (N, 3, h, w) in [-1, 1].
    """
    luma = _colour_map(YCBCR_FROM_RGB, images)[:, :1] * 127.5
    mean = box_blur(luma, TEXTURE_WINDOW)
    return (box_blur(luma.square(), TEXTURE_WINDOW) - mean.square()).clamp_min(0).sqrt()


def texture_mask(images: torch.Tensor) -> torch.Tensor:
    """Each pixel's share of the bound, (N, 1, h, w) in [TEXTURE_FLOOR, 1]: linear in the local deviation up to TEXTURE_FULL."""
    busy = (local_luma_std(images) / TEXTURE_FULL).clamp(max=1)
    return TEXTURE_FLOOR + (1 - TEXTURE_FLOOR) * busy


def budget_map(images: torch.Tensor, eps: float, shape: str) -> torch.Tensor:
    """The bound of each component of each pixel's change, (N, 3, h, w), in [-1, 1] units; ``images`` (N, 3, h, w).

    ``shape`` "uniform": eps for R, G and B everywhere. "perceptual": eps x the
    texture mask for luma, CHROMA_SHARE of that for Cb and Cr.
    """
    if shape == "uniform":
        return torch.full_like(images, eps)
    share = torch.tensor([1.0, CHROMA_SHARE, CHROMA_SHARE], device=images.device)[None, :, None, None]
    return eps * texture_mask(images) * share


@dataclass(frozen=True)
class Budget:
    """The box PGD's perturbation lives in: a bound per component (RGB, or YCbCr when shaped) and the RGB bound eps."""

    bound: torch.Tensor  # (N, 3, h, w), see budget_map
    eps: float
    luma_chroma: bool  # the perturbation's components are (Y, Cb, Cr), not (R, G, B)
    grey: torch.Tensor | None = None  # (N,) bool: rows whose three channels share one perturbation

    @classmethod
    def plan(cls, images: torch.Tensor, eps: float, shape: str, grey: torch.Tensor | None = None) -> "Budget":
        return cls(bound=budget_map(images, eps, shape), eps=eps, luma_chroma=shape == "perceptual", grey=grey)

    def share_grey(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (a start or a gradient, in this budget's components) with its grey rows made colourless.

        In RGB, the three channels averaged; in YCbCr, chroma zeroed. Sign
        steps and the box projection keep either, so a grey image stays grey.
        """
        if self.grey is None or not self.grey.any():
            return tensor
        if self.luma_chroma:
            colourless = torch.cat([tensor[:, :1], torch.zeros_like(tensor[:, 1:])], dim=1)
        else:
            colourless = tensor.mean(dim=1, keepdim=True).expand_as(tensor)
        return torch.where(self.grey.view(-1, 1, 1, 1), colourless, tensor)

    def project(self, delta: torch.Tensor) -> torch.Tensor:
        return torch.clamp(delta, -self.bound, self.bound)

    def step(self, delta: torch.Tensor, signs: torch.Tensor, alpha: float) -> torch.Tensor:
        """``delta`` moved by ``alpha`` along ``signs``, each component in proportion to its bound, then projected."""
        return self.project(delta + alpha * (self.bound / self.eps) * signs)

    def rgb(self, delta: torch.Tensor) -> torch.Tensor:
        """The perturbation as an RGB change, within eps in every channel.

        Luma at its bound plus chroma can take one channel past eps; the clip
        keeps the strength's promise, at the cost of a little of that pixel's shape.
        """
        if not self.luma_chroma:
            return delta
        return _colour_map(RGB_FROM_YCBCR, delta).clamp(-self.eps, self.eps)
