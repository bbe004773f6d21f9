"""The perceptual budget (engine.budget) end to end on the tiny trained model: real photographs in, saved files read back.

The photographs are skimage.data's (engine.photos), scaled to 256 px on the
short side (working size 128 on the tiny model, so the down/up-scaling path
runs): astronaut for texture, colorwheel for flat colour.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from kornia.color import rgb_to_ycbcr
from PIL import Image

from fixative.engine.budget import TEXTURE_FLOOR, Budget, budget_map, texture_mask
from fixative.engine.metrics import flat_chroma_change
from fixative.engine.model import LoadedModel, load_model
from fixative.engine.options import EngineOptions
from fixative.engine.photos import photo
from fixative.engine.pixels import to_model
from fixative.engine.protect import protect_file

STEPS = 10
STRENGTH = 8


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> LoadedModel:
    return load_model(EngineOptions(model=str(tiny_model), device="cpu", dtype="fp32"))


@pytest.fixture(scope="module")
def photographs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("photographs")
    paths = {}
    for name in ("astronaut", "colorwheel"):
        picture = Image.fromarray(photo(name))
        scale = 256 / min(picture.size)
        paths[name] = folder / f"{name}.png"
        picture.resize((round(picture.width * scale), round(picture.height * scale)), Image.LANCZOS).save(paths[name])
    return paths


@pytest.fixture(scope="module")
def protected(model: LoadedModel, photographs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """``protected(name, budget)``: (original, saved) uint8 RGB of one STEPS run, the saved file written and read back."""
    folder = tmp_path_factory.mktemp("protected")
    cache: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}

    def run(name: str, budget: str) -> tuple[np.ndarray, np.ndarray]:
        if (name, budget) not in cache:
            options = EngineOptions(model=model.source, device="cpu", dtype="fp32", steps=STEPS, strength=STRENGTH, budget=budget)
            out = folder / f"{name}-{budget}.png"
            out.write_bytes(protect_file(photographs[name], model, options).data)
            with Image.open(photographs[name]) as original, Image.open(out) as saved:
                cache[name, budget] = np.array(original.convert("RGB")), np.array(saved)
        return cache[name, budget]

    return run


def ycbcr_change(original: np.ndarray, saved: np.ndarray) -> torch.Tensor:
    """Mean |dY|, |dCb|, |dCr| over the image, in 0-255 levels."""
    change = rgb_to_ycbcr(to_model(saved)) - rgb_to_ycbcr(to_model(original))
    return change[0].abs().mean(dim=(1, 2)) * 127.5


def test_the_saved_file_keeps_the_exact_l_infinity_bound(protected) -> None:
    original, saved = protected("astronaut", "perceptual")
    changes = np.abs(saved.astype(np.int16) - original)
    assert changes.max() == STRENGTH, f"largest change {changes.max()} levels, the strength is {STRENGTH}"
    # Not only where texture lets luma reach the bound: a share of the pixels get there.
    assert (changes == STRENGTH).mean() > 0.001


def test_chroma_moves_less_than_luma(protected) -> None:
    shaped = ycbcr_change(*protected("astronaut", "perceptual"))
    uniform = ycbcr_change(*protected("astronaut", "uniform"))
    shaped_ratio = float(shaped[1:].max() / shaped[0])
    uniform_ratio = float(uniform[1:].max() / uniform[0])
    assert shaped_ratio < 0.5, f"perceptual: chroma / luma change {shaped_ratio:.2f}, want under 0.5 (|dY| {shaped[0]:.2f})"
    # The test can tell: under the uniform budget chroma moves about as much as luma.
    assert uniform_ratio > 0.7, f"uniform: chroma / luma change {uniform_ratio:.2f}"


def test_flat_colour_changes_less_in_colour_than_with_the_uniform_budget(protected) -> None:
    shaped = flat_chroma_change(*protected("colorwheel", "perceptual"))
    uniform = flat_chroma_change(*protected("colorwheel", "uniform"))
    assert shaped < 0.5 * uniform, (
        f"flat-area |dCb|+|dCr|: perceptual {shaped:.2f} levels, uniform {uniform:.2f}; "
        f"margin {0.5 * uniform - shaped:.2f} levels under half the uniform budget's"
    )


def test_the_shaped_budget_never_exceeds_the_bound_and_is_lowest_where_flat() -> None:
    eps = 2 * STRENGTH / 255
    flat = torch.zeros(1, 3, 32, 32)
    busy = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.allclose(texture_mask(flat), torch.full((1, 1, 32, 32), TEXTURE_FLOOR))
    assert torch.allclose(texture_mask(busy), torch.ones(1, 1, 32, 32))
    for images in (flat, busy):
        budget = Budget.plan(images, eps, "perceptual")
        assert float(budget.bound.max()) <= eps * (1 + 1e-6)  # (eps held in float32)
        # The largest change the box allows, in every sign pattern, is still within eps in RGB.
        corners = budget.bound * torch.randint(0, 2, budget.bound.shape, generator=torch.Generator().manual_seed(1)) * 2 - budget.bound
        assert float(budget.rgb(corners).abs().max()) <= eps * (1 + 1e-6)
    assert torch.equal(budget_map(busy, eps, "uniform"), torch.full_like(busy, eps))


def test_alpha_is_kept_byte_identical(model: LoadedModel, tmp_path: Path) -> None:
    rgb = photo("astronaut")[::2, ::2]
    alpha = np.tile(np.linspace(0, 255, rgb.shape[1]).astype(np.uint8), (rgb.shape[0], 1))
    source = tmp_path / "alpha.png"
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(source)
    options = EngineOptions(model=model.source, device="cpu", dtype="fp32", steps=3, budget="perceptual")
    out = tmp_path / "out.png"
    out.write_bytes(protect_file(source, model, options).data)
    with Image.open(out) as image:
        saved = np.array(image)
    assert image.mode == "RGBA"
    assert np.array_equal(saved[..., 3], alpha)
    assert 0 < np.abs(saved[..., :3].astype(np.int16) - rgb).max() <= options.strength


def test_the_fingerprint_changes_with_the_budget() -> None:
    # The job store keys jobs on the fingerprint: changing the budget must re-protect.
    assert EngineOptions(budget="uniform").fingerprint() != EngineOptions(budget="perceptual").fingerprint()
