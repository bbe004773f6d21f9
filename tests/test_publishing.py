"""fixative.engine.publishing: the real serving pipelines that survival is measured against."""

from __future__ import annotations

import numpy as np
import pytest

from fixative.engine.publishing import PIPELINES, REPORTED_PIPELINES, serve
from conftest import painting


def test_every_pipeline_is_deterministic_and_changes_the_image():
    rgb = painting(96, 128)
    for name in PIPELINES:
        once, twice = serve(rgb, name), serve(rgb, name)
        assert once.dtype == np.uint8 and once.shape[2] == 3
        assert np.array_equal(once, twice), name
        if once.shape == rgb.shape:
            assert not np.array_equal(once, rgb), name


def test_half_halves_the_size_and_the_reported_pipelines_exist():
    assert serve(painting(96, 128), "half+jpeg75").shape == (48, 64, 3)
    assert set(REPORTED_PIPELINES) <= set(PIPELINES)


def test_lower_quality_loses_more():
    rgb = painting(128, 128)
    error = {q: np.abs(serve(rgb, f"jpeg{q}").astype(int) - rgb).mean() for q in (95, 85, 75)}
    assert error[95] < error[85] < error[75]


def test_unknown_pipeline_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown pipeline 'webp50'"):
        serve(painting(64, 64), "webp50")
