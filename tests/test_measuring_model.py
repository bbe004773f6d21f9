"""The measuring model's pictures: real photographs split by whole picture, and artist styles rendered from them.

These need scikit-image (the test extra), whose wheel ships the photographs;
nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fixative.engine import photos, styles


def test_every_photograph_loads_from_the_wheel_as_rgb():
    for name in photos.BASE + photos.STYLE_SUBJECTS + photos.HELD_OUT:
        picture = photos.photo(name)
        assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3, name
        assert min(picture.shape[:2]) >= 128, name
    grey = photos.photo("camera")
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()


def test_the_three_uses_of_the_photographs_share_no_photograph():
    base, subjects, held_out = set(photos.BASE), set(photos.STYLE_SUBJECTS), set(photos.HELD_OUT)
    assert base.isdisjoint(subjects) and base.isdisjoint(held_out) and subjects.isdisjoint(held_out)
    assert set(styles.TRAINING_SUBJECTS).isdisjoint(styles.HELD_OUT_SUBJECTS)


def test_crops_are_model_pixels_and_reproducible():
    a = photos.random_crops(photos.BASE, 6, 64, seed=1)
    b = photos.random_crops(photos.BASE, 6, 64, seed=1)
    assert a.shape == (6, 3, 64, 64) and a.dtype == torch.float32
    assert a.min() >= -1 and a.max() <= 1 and a.std() > 0.1
    assert torch.equal(a, b)
    assert not torch.equal(a, photos.random_crops(photos.BASE, 6, 64, seed=2))


def test_tiles_cover_a_photograph_without_overlap():
    tiles = photos.tiles("coffee", 128)  # 400 x 600
    assert tiles.shape == (3 * 4, 3, 128, 128)
    picture = torch.from_numpy(photos.photo("coffee")).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(tiles[0], picture[:, :128, :128]) and torch.equal(tiles[5], picture[:, 128:256, 128:256])


@pytest.mark.parametrize("style", styles.STYLES)
def test_each_style_is_one_way_of_rendering_deterministic_and_unlike_the_photograph(style: str):
    works = styles.works(style, 64)
    assert works.shape == (styles.TRAINING_WORKS, 3, 64, 64)
    assert torch.equal(works, styles.works(style, 64))  # the same artist every time
    held_out = styles.works(style, 64, held_out=True)
    assert held_out.shape[0] == styles.HELD_OUT_WORKS
    crops = photos.random_crops(styles.TRAINING_SUBJECTS, styles.TRAINING_WORKS, 64, seed=3, scales=(0.35, 1.0),
                                augment=False)
    assert (works - crops).abs().mean() > 0.05  # a rendering, not the photograph


def test_the_styles_differ_from_one_another():
    works = {style: styles.works(style, 64) for style in styles.STYLES}
    for a in styles.STYLES:
        for b in styles.STYLES:
            if a < b:
                assert (works[a] - works[b]).abs().mean() > 0.05, (a, b)
