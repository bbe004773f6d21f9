"""Real photographs for the measuring model, from the ones scikit-image's wheel ships (``skimage.data``).

Nothing can be downloaded when the measuring model is built or tested, and
synthetic images alone teach a VAE nothing about real edges, textures and
noise. scikit-image (a bench and test extra) ships a few real photographs and
textures inside its wheel; these are the ones that load without a download.

The photographs are split by *whole photograph*, never by crop, because a
model evaluated on crops of a picture it trained on is measured on what it
memorised:

* :data:`BASE` train the VAE and the UNet;
* :data:`STYLE_SUBJECTS` are the subjects an artist's works are rendered from
  (:mod:`fixative.engine.styles`): never seen by the base model, so a style
  LoRA cannot do well by recalling them;
* :data:`HELD_OUT` the VAE's reconstruction is measured on.

The greyscale ones come back as three equal channels, as an artist's scanned
ink drawing would.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from fixative.engine.pixels import to_model

# (the skimage.data function, and for a tuple the item that is the picture)
_SOURCES = {
    "astronaut": ("astronaut", None),
    "chelsea": ("chelsea", None),
    "coffee": ("coffee", None),
    "rocket": ("rocket", None),
    "hubble_deep_field": ("hubble_deep_field", None),
    "immunohistochemistry": ("immunohistochemistry", None),
    "retina": ("retina", None),
    "colorwheel": ("colorwheel", None),
    "motorcycle": ("stereo_motorcycle", 0),  # the left view; the right is nearly the same picture
    "camera": ("camera", None),
    "brick": ("brick", None),
    "grass": ("grass", None),
    "gravel": ("gravel", None),
    "coins": ("coins", None),
    "moon": ("moon", None),
    "page": ("page", None),
    "text": ("text", None),
    "clock": ("clock", None),
    "cell": ("cell", None),
}
HELD_OUT = ("coffee", "gravel")
STYLE_SUBJECTS = ("rocket", "motorcycle", "clock", "chelsea")
BASE = tuple(name for name in _SOURCES if name not in HELD_OUT + STYLE_SUBJECTS)


def photo(name: str) -> np.ndarray:
    """One photograph as uint8 ``H x W x 3`` (greyscale as three equal channels)."""
    import skimage.data

    function, item = _SOURCES[name]
    picture = getattr(skimage.data, function)()
    if item is not None:
        picture = picture[item]
    picture = np.asarray(picture)
    if picture.ndim == 2:
        picture = np.repeat(picture[..., None], 3, axis=2)
    return np.ascontiguousarray(picture[..., :3]).astype(np.uint8)


def random_crops(names: tuple[str, ...], count: int, size: int, seed: int, *, scales: tuple[float, float] = (0.15, 1.0),
                 augment: bool = True) -> torch.Tensor:
    """``count`` square crops of the photographs ``names``, resized to ``size``: float32 ``(count, 3, size, size)`` in [-1, 1].

    Each crop's side is a fraction of its photograph's short side drawn
    log-uniformly from ``scales`` (details and whole scenes alike), resized
    with Pillow's antialiased bicubic. With ``augment``, as web pictures vary:
    a horizontal flip half the time, a mild colour jitter (brightness,
    contrast, saturation within 10%), and half of them through a web JPEG of
    quality 60-95.
    """
    rng = np.random.default_rng(seed)
    pictures = [photo(name) for name in names]
    crops = []
    for _ in range(count):
        picture = pictures[int(rng.integers(len(pictures)))]
        height, width = picture.shape[:2]
        short = min(height, width)
        side = max(8, int(short * np.exp(rng.uniform(np.log(scales[0]), np.log(scales[1])))))
        top, left = int(rng.integers(height - side + 1)), int(rng.integers(width - side + 1))
        crop = Image.fromarray(picture[top:top + side, left:left + side]).resize((size, size), Image.BICUBIC)
        crop = np.asarray(crop, dtype=np.float32) / 255
        if augment:
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            grey = crop.mean(axis=2, keepdims=True)
            crop = grey + (crop - grey) * rng.uniform(0.9, 1.1)  # saturation
            crop = crop.mean() + (crop - crop.mean()) * rng.uniform(0.9, 1.1)  # contrast
            crop = crop * rng.uniform(0.9, 1.1)  # brightness
        crop = (np.clip(crop, 0, 1) * 255).round().astype(np.uint8)
        if augment and rng.random() < 0.5:
            crop = _web_jpeg(crop, int(rng.integers(60, 96)))
        crops.append(to_model(np.ascontiguousarray(crop))[0])
    return torch.stack(crops)


def _web_jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    return np.array(Image.open(buffer).convert("RGB"))


def tiles(name: str, size: int) -> torch.Tensor:
    """The whole photograph ``name`` as the non-overlapping ``size`` squares that cover it (the rest cut off)."""
    picture = photo(name)
    rows, columns = picture.shape[0] // size, picture.shape[1] // size
    return torch.stack([to_model(np.ascontiguousarray(picture[r * size:(r + 1) * size, c * size:(c + 1) * size]))[0]
                        for r in range(rows) for c in range(columns)])
