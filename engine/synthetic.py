"""Families of synthetic images for the tiny measuring model: what it learns from, and a style it never saw.

The tiny model stands in for Stable Diffusion, which saw billions of varied,
mostly JPEG-compressed images. A denoiser trained on one narrow kind of image
(smooth colour fields, say) has never seen fine texture, so *any* fine-grained
perturbation looks wildly out of distribution to it: protection gains of 4-6
where SD shows far less, and a codec that removes that fine detail looks
devastating. So the tiny model is pre-trained on several families that between
them cover flat areas, hard edges, line work, fine grain and natural 1/f
spectra, half of them JPEG-compressed as web images are.

One more family, :data:`STYLE_FAMILY`, is never used in pre-training: it is the
"artist's style" that ``fixative check`` and the bench's mimicry table
fine-tune on, so that fine-tuning has something new to learn.

Every generator takes (count, size, rng) and returns float32 (count, 3, size,
size) in [-1, 1].
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from fixative.engine.pixels import to_model, to_rgb
from fixative.engine.publishing import jpeg

Generator = Callable[[int, int, np.random.Generator], np.ndarray]


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size] / size
    return yy, xx


def fields(count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth colour fields with a few hard-edged rectangles: paint and flat shapes."""
    yy, xx = _grid(size)
    images = np.empty((count, 3, size, size), dtype=np.float32)
    for i in range(count):
        for c in range(3):
            fx, fy, phase = rng.uniform(0.5, 4.0), rng.uniform(0.5, 4.0), rng.uniform(0, 2 * np.pi)
            images[i, c] = 0.6 * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)
        for _ in range(3):
            x0, y0 = rng.integers(0, size - size // 4, 2)
            w, h = rng.integers(size // 16, size // 4, 2)
            images[i, :, y0 : y0 + h, x0 : x0 + w] = rng.uniform(-1, 1, (3, 1, 1))
    return images


def cells(count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Flat-coloured Voronoi cells with dark outlines: cel shading, stained glass."""
    yy, xx = _grid(size)
    images = np.empty((count, 3, size, size), dtype=np.float32)
    for i in range(count):
        seeds = rng.uniform(0, 1, (int(rng.integers(6, 30)), 2))
        distance = np.sqrt((yy[None] - seeds[:, 0, None, None]) ** 2 + (xx[None] - seeds[:, 1, None, None]) ** 2)
        order = np.sort(distance, axis=0)
        colours = rng.uniform(-0.9, 0.9, (len(seeds), 3))
        images[i] = colours[distance.argmin(axis=0)].transpose(2, 0, 1)
        outline = (order[1] - order[0]) < rng.uniform(0.005, 0.02)
        images[i][:, outline] = -0.9
    return images


def hatching(count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Ink line work on paper: patches of parallel strokes at several angles and spacings."""
    yy, xx = _grid(size)
    images = np.empty((count, 3, size, size), dtype=np.float32)
    for i in range(count):
        paper = rng.uniform(0.6, 0.95, (3, 1, 1))
        ink = rng.uniform(-1, -0.4, (3, 1, 1))
        coverage = np.zeros((size, size))
        for _ in range(int(rng.integers(2, 5))):
            angle, spacing = rng.uniform(0, np.pi), rng.uniform(3, 8) / size
            stripes = np.cos(2 * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy) / spacing) > rng.uniform(0.3, 0.7)
            cy, cx, radius = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.2, 0.6)
            region = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
            coverage = np.maximum(coverage, stripes & region)
        images[i] = paper * (1 - coverage) + ink * coverage
    return images


def _one_over_f(size: int, beta: float, rng: np.random.Generator) -> np.ndarray:
    """Noise with a 1/f^beta power spectrum, scaled to [-1, 1]: the spectrum of natural photographs."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    radius = np.sqrt(fx**2 + fy**2)
    radius[0, 0] = 1.0
    spectrum = (rng.normal(size=radius.shape) + 1j * rng.normal(size=radius.shape)) / radius ** (beta / 2)
    spectrum[0, 0] = 0
    field = np.fft.irfft2(spectrum, s=(size, size))
    return np.clip(field / (2.5 * field.std() + 1e-8), -1, 1)


def fractal(count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Colour 1/f textures: clouds, foliage, rock; the statistics of photographs."""
    images = np.empty((count, 3, size, size), dtype=np.float32)
    for i in range(count):
        beta = rng.uniform(1.6, 2.8)
        base = np.stack([_one_over_f(size, beta, rng) for _ in range(3)])
        mix = rng.uniform(-1, 1, (3, 3)) * 0.6 + np.eye(3) * 0.4
        images[i] = np.einsum("cd,dhw->chw", mix, base) * rng.uniform(0.5, 1.0) + rng.uniform(-0.3, 0.3, (3, 1, 1))
    return images


def dots(count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Pointillism: many small discs from a small palette over a flat ground."""
    yy, xx = np.mgrid[0:size, 0:size]
    images = np.empty((count, 3, size, size), dtype=np.float32)
    for i in range(count):
        palette = rng.uniform(-1, 1, (5, 3))
        image = np.broadcast_to(rng.uniform(-0.5, 0.5, (3, 1, 1)), (3, size, size)).copy()
        for _ in range(int(rng.integers(150, 500))):
            cy, cx = rng.integers(0, size, 2)
            radius = rng.uniform(1, 4)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
            image[:, disc] = palette[rng.integers(0, 5)][:, None]
        images[i] = image
    return images


def grain(count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth photographic content under film or sensor grain: fine noise that belongs to the image."""
    images = fractal(count, size, rng) * 0.8
    sigma = rng.uniform(0.02, 0.12, (count, 1, 1, 1))
    return images + sigma * rng.normal(size=images.shape).astype(np.float32)


def swirls(count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """The held-out "style": banded swirls around a few centres in a four-colour palette."""
    yy, xx = _grid(size)
    images = np.empty((count, 3, size, size), dtype=np.float32)
    for i in range(count):
        palette = rng.uniform(-1, 1, (4, 3))
        phase = np.zeros((size, size))
        for _ in range(int(rng.integers(1, 4))):
            cy, cx = rng.uniform(0, 1, 2)
            radius = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
            angle = np.arctan2(yy - cy, xx - cx)
            phase += np.sin(radius * rng.uniform(15, 40) + angle * rng.integers(1, 4) + rng.uniform(0, 6))
        bands = np.digitize(phase, np.quantile(phase, [0.25, 0.5, 0.75]))
        images[i] = palette[bands].transpose(2, 0, 1)
    return images


FAMILIES: dict[str, Generator] = {
    "fields": fields,
    "cells": cells,
    "hatching": hatching,
    "fractal": fractal,
    "dots": dots,
    "grain": grain,
    "swirls": swirls,
}
STYLE_FAMILY = "swirls"
PRETRAINING_FAMILIES = tuple(name for name in FAMILIES if name != STYLE_FAMILY)


def family_images(name: str, count: int, size: int, seed: int = 0) -> torch.Tensor:
    """``count`` images of family ``name``, float32 (count, 3, size, size) in [-1, 1]."""
    rng = np.random.default_rng([seed, list(FAMILIES).index(name)])
    return torch.from_numpy(FAMILIES[name](count, size, rng).clip(-1, 1).astype(np.float32))


def as_web_jpeg(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Each image through Pillow's JPEG at a quality drawn from 60-95: most training images on the web were JPEGs."""
    rng = np.random.default_rng(seed)
    return torch.stack([to_model(jpeg(to_rgb(image), int(rng.integers(60, 96))))[0] for image in images])


def pretraining_set(per_family: int, size: int, seed: int = 0) -> torch.Tensor:
    """The tiny model's pre-training images: every family but the style, half of them as web JPEGs."""
    images = torch.cat([family_images(name, per_family, size, seed) for name in PRETRAINING_FAMILIES])
    images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))]
    half = len(images) // 2
    return torch.cat([as_web_jpeg(images[:half], seed), images[half:]])
