"""The PGD loop's momentum (MI-FGSM): the budget stays exact, and it buys protection at equal steps.

Fixed sign steps are the same loop with the momentum's decay set to 0, so the
comparison runs the real engine both ways.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import fixative.engine.pgd
from fixative.engine.imaging import SourceImage, read_back_rgb, read_image
from fixative.engine.model import LoadedModel, load_model
from fixative.engine.options import EngineOptions
from fixative.engine.protect import protect_image
from fixative.engine.synthetic import family_images


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> LoadedModel:
    return load_model(EngineOptions(model=str(tiny_model), device="cpu", dtype="fp32"))


@pytest.mark.parametrize("strength", [4, 8])
def test_momentum_keeps_the_saved_file_within_the_budget(model: LoadedModel, painting_png: Path, strength: int) -> None:
    source = read_image(painting_png)
    options = EngineOptions(model=model.source, device="cpu", dtype="fp32", strength=strength, steps=10)
    assert fixative.engine.pgd.MOMENTUM > 0 and options.robust
    protected = protect_image(source, model, options)
    changes = np.abs(source.rgb.astype(np.int16) - read_back_rgb(protected.data).astype(np.int16))
    assert changes.max() <= strength
    assert changes.max() >= strength - 1  # the budget is used, not wasted
    assert protected.report["max_delta"] == changes.max()


def test_momentum_beats_fixed_sign_steps_at_equal_steps(model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    # The bench's first test image, bench.common.IMAGES[0] (a painting at the tiny model's resolution,
    # under the 256 px file floor, so handed over as read_image would make it), seed 0.
    rgb = ((family_images("fields", 1, 128, seed=5)[0].permute(1, 2, 0).numpy() + 1) * 127.5).round()
    source = SourceImage(rgb=rgb.astype(np.uint8), alpha=None, icc_profile=None, dpi=None, exif=None, notes=())
    # Every step at the working size, as in the table this test stands for (coarse to fine came later).
    options = EngineOptions(model=model.source, device="cpu", dtype="fp32", steps=25, seed=0, coarse_to_fine=False)
    after_jpeg = {}
    for decay in (0.0, fixative.engine.pgd.MOMENTUM):
        monkeypatch.setattr(fixative.engine.pgd, "MOMENTUM", decay)
        report = protect_image(source, model, options).report
        after_jpeg[decay] = report["survival"]["jpeg75"]["protection_gain"] - 1
        print(f"momentum {decay}: gain {report['protection_gain']:.4f}, after jpeg75 1 + {after_jpeg[decay]:.4f}")
    # Measured: 1.0041 with fixed steps, 1.0063 with momentum after Pillow's JPEG q75
    # (what a fine-tuner trains on once a platform serves the image): 1.5x the effect.
    # Over 3 seeds x 3 images, momentum won every pair (bench/README.md, "Step schedule").
    assert after_jpeg[fixative.engine.pgd.MOMENTUM] > 1.3 * after_jpeg[0.0] > 0

