"""Several images protected as one batch per PGD step (engine.protect.protect_batch).

Each image of a batch must get what it gets alone with the same seed: its own
random draws, its own EOT draws, its own momentum. The batch here mixes three
256 x 320 paintings with a 512 x 640 one: all four work at 128 x 160 on the
tiny model (one batch_key), so the batch also carries a row whose script's
view (``Geometry.seen``) differs from its neighbours'.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fixative.engine.errors import BadImage
from fixative.engine.imaging import SourceImage, read_back_rgb
from fixative.engine.model import LoadedModel, load_model
from fixative.engine.options import EngineOptions
from fixative.engine.protect import Protected, batch_key, protect_batch, protect_image
from conftest import painting

STEPS = 10


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> LoadedModel:
    return load_model(EngineOptions(model=str(tiny_model), device="cpu", dtype="fp32"))


@pytest.fixture(scope="module")
def sources() -> list[SourceImage]:
    return [SourceImage.from_rgb(painting(256, 320, seed=seed)) for seed in (5, 6, 7)] + [
        SourceImage.from_rgb(painting(512, 640, seed=8))
    ]


def options(model: LoadedModel, **overrides) -> EngineOptions:
    return EngineOptions(**{"model": model.source, "device": "cpu", "dtype": "fp32", "steps": STEPS, **overrides})


def changes(source: SourceImage, protected: Protected) -> np.ndarray:
    return np.abs(read_back_rgb(protected.data).astype(np.int16) - source.rgb.astype(np.int16))


@pytest.mark.parametrize("mode", ["sds", "advdm"])
def test_each_image_of_a_batch_gets_what_it_gets_alone(model: LoadedModel, sources: list[SourceImage], mode: str) -> None:
    settings = options(model, mode=mode)
    assert len({batch_key(source, model) for source in sources}) == 1
    batched = protect_batch(sources, model, settings)
    for source, together in zip(sources, batched):
        alone = protect_image(source, model, settings)
        assert_alike(together, alone)
        assert together.report["batch_size"] == len(sources) and alone.report["batch_size"] == 1


def assert_alike(together: Protected, alone: Protected) -> None:
    """The same image protected in a batch and alone: the same output, within the kernels' rounding."""
    differ = read_back_rgb(together.data) != read_back_rgb(alone.data)
    gap = np.abs(read_back_rgb(together.data).astype(np.int16) - read_back_rgb(alone.data)).max()
    print(f"{together.report['size']}: {differ.mean():.4%} of values differ, by at most {gap} levels")
    # Measured on this 2-core CPU (10 steps, the default robust mode with coarse to fine):
    # sds's files are byte-identical; advdm's differ in 0.19% of one image's values (by up to
    # 3 levels) and 0.001% of another's. The rows are independent in exact arithmetic, but
    # the CPU kernels block a batch of 4 differently from a batch of 1, so a float sum
    # rounds differently, and where the accumulated gradient is near zero its sign flips.
    # The UNet's backward (advdm) has the most such sums. So: under 1% of the values, and
    # the same protection to the report's 4 decimals. Mutants fail on the first image (sds):
    # a batch-wide momentum normalisation changes 57% of its values, one generator shared
    # by the rows 92%, one EOT transform shared by the rows 90%.
    assert differ.mean() < 0.01
    assert together.report["protection_gain"] == pytest.approx(alone.report["protection_gain"], abs=2e-4)
    assert together.report["latent_shift"] == pytest.approx(alone.report["latent_shift"], abs=2e-3)


@pytest.mark.parametrize(
    "settings",
    [{"mode": "advdm"}, {"mode": "mist"}, {"mode": "sds"}, {"mode": "encoder"}, {"mode": "mist", "low_vram": True}],
    ids=["advdm", "mist", "sds", "encoder", "mist-low-vram"],
)
def test_the_budget_stays_exact_for_every_image_of_a_batch(tiny_model: Path, model: LoadedModel, sources: list[SourceImage], settings: dict) -> None:
    if settings.get("low_vram"):  # its split backward and gradient checkpointing are the model's
        model = load_model(EngineOptions(model=str(tiny_model), device="cpu", dtype="fp32", low_vram=True))
    pair = [sources[0], sources[3]]  # different full sizes, one working size
    results = protect_batch(pair, model, options(model, strength=6, steps=3, **settings))
    for source, protected in zip(pair, results):
        change = changes(source, protected)
        assert change.max() <= 6
        assert change.max() >= 5  # the budget is used, not wasted
        assert protected.report["max_delta"] == change.max()


def test_images_of_different_working_sizes_are_refused(model: LoadedModel, sources: list[SourceImage]) -> None:
    square = SourceImage.from_rgb(painting(256, 256, seed=5))
    assert batch_key(square, model) != batch_key(sources[0], model)
    with pytest.raises(ValueError, match="batch_key"):
        protect_batch([sources[0], square], model, options(model, steps=1))


def test_one_image_s_failure_after_the_pgd_leaves_the_others_intact(model: LoadedModel, sources: list[SourceImage]) -> None:
    # A real per-image failure: JPEG cannot keep the second image's transparency (encode_image).
    alpha = np.full(sources[1].rgb.shape[:2], 255, np.uint8)
    alpha[:10] = 0
    transparent = SourceImage(rgb=sources[1].rgb, alpha=alpha, icc_profile=None, dpi=None, exif=None, notes=())
    settings = options(model, steps=3, format="jpeg")
    first, failed, third = protect_batch([sources[0], transparent, sources[2]], model, settings)
    assert isinstance(failed, BadImage) and "transparency" in str(failed)
    for source, protected in ((sources[0], first), (sources[2], third)):
        assert isinstance(protected, Protected)
        # The survivors are whole results, the same as when protected without the failing image.
        assert_alike(protected, protect_image(source, model, settings))
    # Alone, the same failure is raised as in a batch.
    with pytest.raises(BadImage, match="transparency"):
        protect_image(transparent, model, settings)
