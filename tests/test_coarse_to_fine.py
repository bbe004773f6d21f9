"""Coarse to fine: the first steps run at half the working side, the budget on the saved file stays exact.

The encoder's own inputs are recorded with a forward pre-hook on the real
tiny model, so the test sees what the model was actually given: it fails if
the coarse stage is silently skipped (or runs at the working size).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fixative.engine.geometry import Geometry
from fixative.engine.imaging import read_back_rgb, read_image
from fixative.engine.model import LoadedModel, load_model
from fixative.engine.options import EngineOptions
from fixative.engine.pgd import coarse_steps
from fixative.engine.protect import protect_image


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> LoadedModel:
    return load_model(EngineOptions(model=str(tiny_model), device="cpu", dtype="fp32"))


def encoder_inputs(model: LoadedModel, run) -> list[tuple[int, ...]]:
    """The shapes the VAE encoder was called with while ``run()`` ran."""
    shapes: list[tuple[int, ...]] = []
    hook = model.vae.encoder.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    try:
        run()
    finally:
        hook.remove()
    return shapes


@pytest.mark.parametrize("strength", [4, 8])
def test_coarse_to_fine_keeps_the_saved_file_within_the_budget(model: LoadedModel, painting_png: Path, strength: int) -> None:
    source = read_image(painting_png)
    options = EngineOptions(model=model.source, device="cpu", dtype="fp32", strength=strength, steps=10)
    assert options.coarse_to_fine  # the default
    protected = protect_image(source, model, options)
    changes = np.abs(source.rgb.astype(np.int16) - read_back_rgb(protected.data).astype(np.int16))
    assert changes.max() <= strength
    assert changes.max() >= strength - 1  # the budget is used, not wasted
    assert protected.report["max_delta"] == changes.max()


def test_the_first_steps_run_at_half_the_working_side(model: LoadedModel, painting_png: Path) -> None:
    source = read_image(painting_png)  # 400x300: working size 171x128 on the tiny model, padded to 176x128
    geometry = Geometry.plan(*source.rgb.shape[:2], model.resolution, model.size_multiple)
    half = geometry.halved(model.size_multiple)
    full_input, half_input = (1, 3, *geometry.padded), (1, 3, *half.padded)
    assert half.work == (64, 86) and half_input == (1, 3, 64, 96)

    options = EngineOptions(model=model.source, device="cpu", dtype="fp32", steps=10)
    progress: list[tuple[int, int]] = []
    reports = []
    shapes = encoder_inputs(model, lambda: reports.append(protect_image(source, model, options, lambda s, t, _: progress.append((s, t)))))
    assert coarse_steps(options) == reports[0].report["coarse_steps"] == 5
    # 5 PGD steps at half the side, then 5 at the working size, then the report's evaluations (batches of 2).
    assert shapes[:10] == [half_input] * 5 + [full_input] * 5
    assert half_input not in shapes[10:]
    # Progress counts the whole run's steps, through both stages.
    assert progress[-1] == (10, 10) and [s for s, _ in progress] == sorted({s for s, _ in progress})

    for off in ({"coarse_to_fine": False}, {"robust": False}):  # robust off: the lossless file needs full-size steps
        shapes = encoder_inputs(model, lambda: protect_image(source, model, options.model_copy(update=off)))
        assert shapes[:10] == [full_input] * 10 and half_input not in shapes


def test_turning_it_off_is_a_different_output() -> None:
    # The job store keys jobs on the fingerprint: changing the setting must re-protect.
    assert EngineOptions().fingerprint() != EngineOptions(coarse_to_fine=False).fingerprint()
    assert coarse_steps(EngineOptions()) == 50
    assert coarse_steps(EngineOptions(steps=1)) == 0  # a single step runs at the working size
    assert coarse_steps(EngineOptions(coarse_to_fine=False)) == coarse_steps(EngineOptions(robust=False)) == 0
