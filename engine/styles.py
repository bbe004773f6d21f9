"""Artist styles the measuring model has never seen: deterministic painterly renderings of real photographs.

A mimic fine-tunes on about ten works of one artist: one consistent way of
rendering, over varied subjects. Each style here is such an artist. Its works
are renderings of crops of :data:`fixative.engine.photos.STYLE_SUBJECTS`,
photographs the base model never trained on, so a LoRA can only do well on a
style's held-out works by learning the rendering, not by recalling a subject.
The training works and the held-out works come from different photographs
(:func:`works`), so the held-out loss measures the style carried over to new
subjects.

Every rendering is a plain image operation with fixed parameters (no random
draws), so the same crop always gives the same work:

* ``oil``: a Kuwahara filter (Kuwahara et al. 1976: each pixel takes the mean
  of the least varied of its four quadrants, which flattens texture into
  brush-like patches and keeps edges) and a reduced, warm palette;
* ``ink``: dark outlines from the luminance edges over flat fills, each
  region one colour of a small pastel palette, like a coloured comic page;
* ``watercolour``: a soft, lightened wash whose pigment pools at the edges
  of each area, over a fixed paper grain;
* ``halftone``: a printed dot screen in one ink on cream paper, each dot's
  size set by the darkness under it.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from fixative.engine.photos import STYLE_SUBJECTS, random_crops
from fixative.engine.pixels import to_model, to_rgb

STYLES = ("oil", "ink", "watercolour", "halftone")
TRAINING_WORKS = 10  # what a mimic typically has of one artist
HELD_OUT_WORKS = 6
# The subjects of a style's training works, and of its held-out works: different photographs.
TRAINING_SUBJECTS = STYLE_SUBJECTS[:2]
HELD_OUT_SUBJECTS = STYLE_SUBJECTS[2:]

_OIL_PALETTE = np.array([[43, 30, 24], [94, 58, 40], [150, 96, 58], [196, 140, 80], [232, 196, 132], [246, 232, 200],
                         [70, 84, 70], [120, 140, 110], [66, 88, 128], [140, 160, 190], [170, 60, 44], [214, 110, 70]],
                        dtype=np.float32) / 255
_INK_PALETTE = np.array([[250, 246, 236], [246, 206, 196], [250, 226, 160], [196, 226, 200], [180, 206, 236],
                         [214, 196, 232], [236, 180, 140], [160, 190, 170]], dtype=np.float32) / 255
_HALFTONE_INK = np.array([28, 46, 92], dtype=np.float32) / 255
_PAPER = np.array([247, 240, 222], dtype=np.float32) / 255


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _nearest(rgb: np.ndarray, palette: np.ndarray) -> np.ndarray:
    distance = ((rgb[..., None, :] - palette) ** 2).sum(-1)
    return palette[distance.argmin(-1)]


def _shifted(values: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``values`` read ``(dy, dx)`` away from each pixel, the border repeated."""
    pad = max(abs(dy), abs(dx))
    padded = np.pad(values, ((pad, pad), (pad, pad)) + ((0, 0),) * (values.ndim - 2), mode="edge")
    return padded[pad + dy:pad + dy + values.shape[0], pad + dx:pad + dx + values.shape[1]]


def oil(rgb: np.ndarray) -> np.ndarray:
    half = max(1, rgb.shape[0] // 64)  # the quadrants are (2 half + 1)-squares with the pixel at a corner
    size = 2 * half + 1
    grey = _luminance(rgb)
    mean = np.stack([ndimage.uniform_filter(rgb[..., c], size, mode="reflect") for c in range(3)], -1)
    variance = ndimage.uniform_filter(grey**2, size, mode="reflect") - ndimage.uniform_filter(grey, size, mode="reflect") ** 2
    corners = [(dy, dx) for dy in (-half, half) for dx in (-half, half)]
    variances = np.stack([_shifted(variance, dy, dx) for dy, dx in corners])
    means = np.stack([_shifted(mean, dy, dx) for dy, dx in corners])
    best = variances.argmin(0)
    flat = np.take_along_axis(means, best[None, ..., None].repeat(3, -1), 0)[0]
    warm = flat * np.array([1.06, 1.0, 0.9], dtype=np.float32)
    return _nearest(np.clip(warm, 0, 1), _OIL_PALETTE)


def ink(rgb: np.ndarray) -> np.ndarray:
    from skimage.segmentation import slic

    regions = slic(rgb, n_segments=24, compactness=12, start_label=0, channel_axis=-1)
    labels = np.arange(regions.max() + 1)
    means = np.stack([ndimage.mean(rgb[..., c], regions, labels) for c in range(3)], -1)
    fill = _nearest(np.clip(means * 1.15 + 0.05, 0, 1), _INK_PALETTE)[regions]  # one flat pastel per region
    grey = ndimage.gaussian_filter(_luminance(rgb), 1.0)
    edges = np.hypot(ndimage.sobel(grey, 0), ndimage.sobel(grey, 1))
    boundary = np.zeros(regions.shape, bool)
    boundary[:-1] |= regions[:-1] != regions[1:]
    boundary[:, :-1] |= regions[:, :-1] != regions[:, 1:]
    line = (edges > np.percentile(edges, 88)) | (boundary & (edges > np.percentile(edges, 60)))
    return np.where(line[..., None], np.float32(0.08), fill)


def watercolour(rgb: np.ndarray) -> np.ndarray:
    wash = np.stack([ndimage.gaussian_filter(rgb[..., c], 2.0) for c in range(3)], -1)
    grey = _luminance(wash)[..., None]
    wash = grey + (wash - grey) * 1.3  # pigment is more saturated than the scene's greys
    wash = 1 - (1 - wash) * 0.65  # thinned with water: lighter
    levels = np.round(_luminance(wash) * 6) / 6  # the areas a painter lays one wash over
    pooling = np.hypot(ndimage.sobel(levels, 0), ndimage.sobel(levels, 1))
    wash = wash * (1 - 0.35 * np.clip(pooling, 0, 1))[..., None]  # pigment gathers at each area's edge
    grain_rng = np.random.default_rng(1234)  # the paper: the same sheet for every work
    grain = ndimage.gaussian_filter(grain_rng.standard_normal(rgb.shape[:2]).astype(np.float32), 0.8)
    grain = 1 + 0.06 * grain / grain.std()
    return np.clip(wash * _PAPER * grain[..., None], 0, 1)


def halftone(rgb: np.ndarray) -> np.ndarray:
    height, width = rgb.shape[:2]
    pitch = max(4, height // 28)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = np.deg2rad(45)
    u = (xx * np.cos(angle) + yy * np.sin(angle)) / pitch
    v = (-xx * np.sin(angle) + yy * np.cos(angle)) / pitch
    distance = np.hypot(u - np.round(u), v - np.round(v))  # 0 at a dot's centre, up to 0.71 between
    darkness = 1 - ndimage.gaussian_filter(_luminance(rgb), pitch / 3)
    inked = distance < 0.6 * np.sqrt(np.clip(darkness, 0, 1))
    return np.where(inked[..., None], _HALFTONE_INK, _PAPER)


RENDER = {"oil": oil, "ink": ink, "watercolour": watercolour, "halftone": halftone}


def render(style: str, images: torch.Tensor) -> torch.Tensor:
    """``images`` (N, 3, H, W) in [-1, 1], each rendered in ``style``: the same shape and range."""
    out = []
    for image in images:
        rgb = to_rgb(image).astype(np.float32) / 255
        work = (np.clip(RENDER[style](rgb), 0, 1) * 255).round().astype(np.uint8)
        out.append(to_model(work)[0])
    return torch.stack(out)


def works(style: str, size: int, *, held_out: bool = False, count: int | None = None) -> torch.Tensor:
    """A style's works at ``size``: its training set, or (``held_out``) works of other subjects it keeps back.

    Fixed seeds: the same works every call, for every mode and every seed of a bench.
    """
    subjects = HELD_OUT_SUBJECTS if held_out else TRAINING_SUBJECTS
    count = count or (HELD_OUT_WORKS if held_out else TRAINING_WORKS)
    crops = random_crops(subjects, count, size, seed=(7 if held_out else 3), scales=(0.35, 1.0), augment=False)
    return render(style, crops)
