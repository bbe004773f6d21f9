"""Fixtures shared across the test files.

The tiny trained model is built once and kept in pytest's cache folder
(``.pytest_cache``), keyed on ``engine.tiny.recipe_key()``: training takes
about a minute on two cores, and every engine and end-to-end test needs it.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from postgres import Cluster, server_binaries

# One OpenMP thread for the tests and every process they start: the tiny model
# gains nothing from two, and with the test process and a daemon subprocess
# sharing two cores, spinning OpenMP threads made tiny steps 10-50x slower.
# Set before anything imports torch; subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_model(request: pytest.FixtureRequest) -> Path:
    """A diffusers folder holding the tiny SD-shaped model, its VAE and UNet briefly trained."""
    from fixative.engine.tiny import TRAINING_STEPS, build_tiny_model, recipe_key, train_tiny_model

    cache = Path(request.config.cache.mkdir("fixative-tiny-models"))
    folder = cache / recipe_key()
    # Two pytest runs at once (a developer's and CI's on a shared machine) must
    # not rebuild each other's model mid-read: build under a lock, publish by rename.
    with open(cache / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not folder.exists():
            building = Path(tempfile.mkdtemp(dir=cache))
            build_tiny_model(building)
            train_tiny_model(building, steps=TRAINING_STEPS)
            building.rename(folder)
    return folder


@pytest.fixture(scope="session")
def postgres_cluster() -> Cluster:
    """A real PostgreSQL server for this test session (see tests/postgres.py)."""
    binaries = server_binaries()
    if binaries is None:
        reason = "no PostgreSQL server binaries (initdb, pg_ctl); install Debian's postgresql package"
        if os.environ.get("FIXATIVE_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"FIXATIVE_REQUIRE_POSTGRES=1, but {reason}")
        pytest.skip(reason)
    cluster = Cluster(binaries)
    yield cluster
    cluster.remove()


@pytest.fixture
def postgres_url(postgres_cluster: Cluster) -> str:
    """The URL of a new, empty PostgreSQL database of its own for one test."""
    return postgres_cluster.database()


def painting(height: int = 300, width: int = 400, seed: int = 5) -> np.ndarray:
    """A synthetic painting, uint8 H x W x 3, with smooth fields and hard edges like real artwork."""
    from fixative.engine.tiny import synthetic_paintings

    side = max(height, width)
    image = synthetic_paintings(1, side, seed=seed)[0].permute(1, 2, 0).numpy()
    return ((image[:height, :width] + 1) * 127.5).round().astype(np.uint8)


def read_terminal(controller: int) -> bytes:
    """Everything a child wrote to a pseudo-terminal, read from its ``controller`` end until the child closes it."""
    seen = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(controller)
    return seen


@pytest.fixture
def painting_png(tmp_path: Path) -> Path:
    path = tmp_path / "painting.png"
    Image.fromarray(painting()).save(path)
    return path
