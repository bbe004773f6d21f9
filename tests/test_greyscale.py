"""A greyscale picture comes back greyscale: one perturbation for the three channels, written as grey.

On a real grey photograph (scikit-image's camera), through the real
``fixative protect`` and the tiny model: 8-bit, 16-bit and grey with alpha.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from fixative.engine.budget import Budget
from test_protect_cli import env, fixative  # noqa: F401  (env is a fixture)

STRENGTH = 4


@pytest.mark.parametrize("shape", ["uniform", "perceptual"])
def test_grey_rows_are_made_colourless_and_colour_rows_keep_theirs(shape: str) -> None:
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    gradient = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    budget = Budget.plan(images, 8 / 255, shape, torch.tensor([True, False]))
    shared = budget.share_grey(gradient)
    rgb = budget.rgb(budget.project(shared))  # what a grey row's change is in the channels
    torch.testing.assert_close(rgb[0, 0], rgb[0, 1])
    torch.testing.assert_close(rgb[0, 0], rgb[0, 2])
    assert torch.equal(shared[1], gradient[1])
    assert Budget.plan(images, 8 / 255, shape).share_grey(gradient) is gradient


@pytest.mark.parametrize("budget", ["uniform", "perceptual"])
def test_grey_photographs_come_back_grey_within_the_budget(env: dict[str, str], tmp_path: Path, budget: str) -> None:  # noqa: F811
    camera = data.camera()  # 512 x 512, 8-bit grey
    alpha = np.tile(np.linspace(0, 255, camera.shape[1]).round().astype(np.uint8), (camera.shape[0], 1))
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    Image.fromarray(camera).save(inputs / "camera.png")
    Image.fromarray(np.stack([camera, alpha], axis=-1)).save(inputs / "camera-alpha.png")
    Image.fromarray(camera.astype(np.uint16) * 257).save(inputs / "camera-16.png")
    assert Image.open(inputs / "camera-16.png").mode.startswith("I")  # really a 16-bit file

    done = fixative({**env, "FIXATIVE_ENGINE__BUDGET": budget}, "protect", *(str(inputs / name) for name in ("camera.png", "camera-alpha.png", "camera-16.png")),
                    "-o", str(out), "--strength", str(STRENGTH), "--steps", "2")
    assert done.returncode == 0, done.stderr
    assert "equal channels" not in done.stdout

    for name, mode in (("camera", "L"), ("camera-alpha", "LA"), ("camera-16", "L")):
        with Image.open(out / f"{name}.protected.png") as image:
            assert image.mode == mode, name
            pixels = np.array(image)
        grey = pixels[..., 0] if mode == "LA" else pixels
        change = np.abs(grey.astype(int) - camera.astype(int))
        assert change.max() <= STRENGTH, name
        assert (change > 0).mean() > 0.5, name  # protected, not copied
        if mode == "LA":
            np.testing.assert_array_equal(pixels[..., 1], alpha)
