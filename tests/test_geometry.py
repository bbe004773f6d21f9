"""fixative.engine.geometry: the working size, padding and the maps between full and working resolution. Pure and fast."""

from __future__ import annotations

import math

import pytest
import torch

from fixative.engine.geometry import Geometry
from fixative.engine.imaging import MAX_PIXELS, MIN_SHORT_SIDE

SD15 = (512, 64)  # SD 1.5: training resolution, model-input multiple
TINY = (128, 16)  # the test model

# (H, W) of images of many shapes: square, 3:2, 2:3, panoramas, smaller than the resolution.
SHAPES = [
    (1024, 1024),
    (512, 512),
    (1000, 1500),
    (1500, 1000),
    (3000, 2000),
    (500, 4000),
    (4000, 500),
    (300, 400),
    (257, 263),
    (700, 500),
    (256, 320),
    (4032, 3024),
]


@pytest.mark.parametrize(("resolution", "multiple"), [SD15, TINY])
@pytest.mark.parametrize(("height", "width"), SHAPES)
def test_plan_invariants(height: int, width: int, resolution: int, multiple: int) -> None:
    g = Geometry.plan(height, width, resolution, multiple)
    h, w = g.work
    assert g.full == (height, width)
    # Never upscaled; short side at most the resolution; area at most twice a square's.
    assert h <= height and w <= width
    assert min(h, w) <= resolution
    assert h * w <= 2 * resolution**2 * 1.01
    # Not shrunk more than needed: either the full image, or the short side at the resolution, or the area cap.
    assert g.work == (height, width) or min(h, w) == resolution or h * w >= 2 * resolution**2 * 0.98
    # Aspect kept within rounding (each working side is rounded to the nearest pixel).
    scale = h / height
    assert abs(w - width * scale) <= 1.0
    assert abs(h / w - height / width) <= (height / width) * (1 / h + 1 / w) + 1e-9
    # Padded: multiples of the model's size multiple, at least the working size, less than one multiple more.
    for padded, side in zip(g.padded, g.work):
        assert padded % multiple == 0
        assert side <= padded < side + multiple
    assert g.resized == (g.work != g.full)


def test_square_larger_than_resolution() -> None:
    g = Geometry.plan(1024, 1024, *SD15)
    assert g.work == (512, 512) and g.padded == (512, 512) and g.resized


def test_landscape_and_portrait_3_2() -> None:
    assert Geometry.plan(1000, 1500, *SD15).work == (512, 768)
    assert Geometry.plan(1500, 1000, *SD15).work == (768, 512)
    assert Geometry.plan(1000, 1500, *SD15).padded == (512, 768)


def test_panorama_is_capped_at_twice_the_area_of_a_square() -> None:
    g = Geometry.plan(500, 4000, *SD15)
    assert g.work == (256, 2048)  # short side 256 < 512 because of the area cap
    assert g.work[0] * g.work[1] == 2 * 512**2
    assert Geometry.plan(4000, 500, *SD15).work == (2048, 256)


def test_smaller_than_resolution_is_not_upscaled_only_padded() -> None:
    g = Geometry.plan(300, 400, *SD15)
    assert g.work == (300, 400)
    assert g.padded == (320, 448)
    assert not g.resized


def test_tiny_model_working_size_for_the_test_paintings() -> None:
    assert Geometry.plan(256, 320, *TINY).work == (128, 160)
    g = Geometry.plan(700, 500, *TINY)
    assert g.work == (179, 128) and g.padded == (192, 128)


@pytest.mark.parametrize(("height", "width"), [(1000, 1500), (700, 500), (300, 400), (300, 2400)])
def test_maps_have_the_right_shapes(height: int, width: int) -> None:
    g = Geometry.plan(height, width, *SD15 if min(height, width) > 512 else TINY)
    image = torch.rand(1, 3, height, width) * 2 - 1
    down = g.down(image)
    assert down.shape[-2:] == g.work
    delta = torch.rand(1, 3, *g.work) * 2 - 1
    assert g.up(delta).shape[-2:] == g.full
    assert g.seen(delta).shape[-2:] == g.work
    padded = g.pad(down)
    assert padded.shape[-2:] == g.padded
    # Cropping the padding off gives the working image back unchanged.
    assert torch.equal(padded[..., : g.work[0], : g.work[1]], down)
    # Edge replication, not zeros: padded pixels are copies of the last image row.
    if g.padded[0] > g.work[0]:
        h = g.work[0]
        assert torch.equal(padded[..., h, :g.work[1]], down[..., h - 1, :])


def test_unresized_maps_are_identities() -> None:
    g = Geometry.plan(300, 400, *SD15)
    x = torch.rand(1, 3, 300, 400)
    assert g.down(x) is x and g.up(x) is x and g.seen(x) is x


@pytest.mark.parametrize(
    ("height", "width", "eps"), [(700, 500, 8 / 255), (1000, 1500, 32 / 255), (257, 263, 16 / 255), (300, 2400, 8 / 255)]
)
def test_up_stays_inside_the_budget(height: int, width: int, eps: float) -> None:
    g = Geometry.plan(height, width, *TINY)
    generator = torch.Generator().manual_seed(1)
    # Worst cases for overshoot: a +-eps checkerboard (sign steps produce these) and uniform noise.
    yy, xx = torch.meshgrid(torch.arange(g.work[0]), torch.arange(g.work[1]), indexing="ij")
    checker = ((yy + xx) % 2 * 2 - 1).float().expand(1, 3, -1, -1) * eps
    uniform = (torch.rand(1, 3, *g.work, generator=generator) * 2 - 1) * eps
    signs = torch.randint(0, 2, (1, 3, *g.work), generator=generator).float().mul(2).sub(1) * eps
    for delta in (checker, uniform, signs):
        up = g.up(delta)
        assert up.abs().max() <= eps + 1e-6
        assert g.seen(delta).abs().max() <= eps + 1e-6


def test_seen_keeps_most_of_a_smooth_perturbation() -> None:
    # The point of optimising seen(delta): a working-size delta survives up then down nearly intact.
    g = Geometry.plan(1000, 1500, *SD15)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, g.work[0]), torch.linspace(0, 1, g.work[1]), indexing="ij")
    delta = torch.sin(2 * math.pi * 6 * xx) * torch.cos(2 * math.pi * 4 * yy)
    delta = delta.expand(1, 3, -1, -1) * 0.06
    seen = g.seen(delta)
    assert (seen - delta).abs().max() < 0.01


@pytest.mark.parametrize("multiple_and_resolution", [SD15, TINY])
def test_pad_works_for_the_most_extreme_accepted_panorama(multiple_and_resolution: tuple[int, int]) -> None:
    """Any image engine.imaging accepts (short side >= 256, <= MAX_PIXELS) must get a usable geometry.

    The area cap shrinks a 256 x 390625 strip to a working height of a few pixels,
    smaller than its padding, and reflection padding cannot pad more than the side.
    """
    height, width = MIN_SHORT_SIDE, MAX_PIXELS // MIN_SHORT_SIDE
    g = Geometry.plan(height, width, *multiple_and_resolution)
    padded = g.pad(torch.zeros(1, 3, *g.work))
    assert padded.shape[-2:] == g.padded
