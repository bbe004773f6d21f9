"""Large images: bounded memory with today's numbers, and long strips that say they are coarse.

A 6000x4000 image peaked at 12.9 GB because SSIM, PSNR and the upsample ran on
whole-image float copies; a 10000x10000 one ran out of memory. The oracles
below are those whole-image versions, kept here to hold the banded ones to the
same numbers: to float32 rounding for the maps, to float64 rounding for SSIM,
exactly for PSNR and the largest change. bench/memory.py measures the memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import fixative.engine.geometry
from fixative.engine.geometry import Geometry
from fixative.engine.metrics import max_delta, psnr, ssim
from fixative.engine.model import load_model
from fixative.engine.options import EngineOptions
from fixative.engine.protect import protect_file
from conftest import painting

ROOT = Path(__file__).resolve().parent.parent
TINY = (128, 16)
SHAPES = [(300, 400), (257, 1500), (1200, 256), (512, 512)]


@pytest.fixture(autouse=True)
def small_bands(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bands of 2**13 pixels instead of 2**19, so that small images (fast oracles) cross many band edges."""
    monkeypatch.setattr(fixative.engine.geometry, "BAND_PIXELS", 2**13)


def whole_ssim(original: np.ndarray, protected: np.ndarray) -> float:
    a = torch.tensor(original).double().permute(2, 0, 1)[:, None]
    b = torch.tensor(protected).double().permute(2, 0, 1)[:, None]
    taps = torch.arange(11, dtype=torch.float64) - 5
    window = torch.exp(-(taps**2) / (2 * 1.5**2))
    window = window / window.sum()

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(x, window.view(1, 1, 1, 11)), window.view(1, 1, 11, 1))

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    score = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(score.mean())


def whole_psnr(original: np.ndarray, protected: np.ndarray) -> float:
    mse = np.mean((original.astype(np.float64) - protected.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def whole_perturb(rgb: np.ndarray, delta: torch.Tensor, geometry: Geometry, strength: float) -> np.ndarray:
    levels = torch.round(geometry.up(delta) * 127.5)[0].permute(1, 2, 0)
    original = torch.tensor(rgb, dtype=torch.float32)
    return (original + levels.clamp(-strength, strength)).clamp(0, 255).round().to(torch.uint8).numpy()


def _image(height: int, width: int) -> np.ndarray:
    grain = np.random.default_rng(0).integers(-3, 4, (height, width, 3))
    tiled = np.tile(painting(256, 256), (height // 256 + 1, width // 256 + 1, 1))[:height, :width]
    return (tiled + grain).clip(0, 255).astype(np.uint8)


def _signs(shape: tuple[int, int], eps: float = 8 / 127.5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.randint(0, 2, (1, 3, *shape), generator=generator).float().mul(2).sub(1) * eps


@pytest.mark.parametrize(("height", "width"), SHAPES)
def test_banded_maps_are_the_whole_image_maps(height: int, width: int) -> None:
    """Equal to float32 rounding, which can tip a pixel at an exact rounding tie by one level."""
    rgb = _image(height, width)
    g = Geometry.plan(height, width, *TINY)
    whole = g.down(torch.tensor(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1)
    assert (g.down_image(rgb) - whole).abs().max() < 1e-6
    delta = _signs(g.work) * torch.rand(1, 1, *g.work, generator=torch.Generator().manual_seed(4))
    banded, today = g.perturb(rgb, delta, 8.0).astype(int), whole_perturb(rgb, delta, g, 8.0)
    assert np.abs(banded - today).max() <= 1 and np.mean(banded != today) < 1e-5
    assert np.abs(banded - rgb).max() == 8


@pytest.mark.parametrize(("height", "width"), SHAPES)
def test_seen_one_axis_at_a_time_is_down_of_up(height: int, width: int) -> None:
    g = Geometry.plan(height, width, *TINY)
    delta = _signs(g.work)
    assert (g.seen(delta) - g.down(g.up(delta))).abs().max() < 1e-6


@pytest.mark.parametrize(("height", "width"), SHAPES)
def test_visibility_figures_are_the_whole_image_figures(height: int, width: int) -> None:
    original = _image(height, width)
    g = Geometry.plan(height, width, *TINY)
    protected = g.perturb(original, _signs(g.work), 8.0)
    assert psnr(original, protected) == whole_psnr(original, protected)  # integer sums: exact
    assert abs(ssim(original, protected) - whole_ssim(original, protected)) < 1e-12  # float64 summation order
    assert max_delta(original, protected) == int(np.abs(original.astype(int) - protected).max()) == 8


def test_the_full_resolution_work_of_a_6_megapixel_image_stays_small(tmp_path: Path, tiny_model: Path) -> None:
    """Through bench.memory, in a process of its own: 0.4 GiB above the model's peak (it was 2.6 GiB)."""
    out = tmp_path / "memory.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.memory", "--sizes", "3000x2000", "--threads", "1", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["size"] == [3000, 2000] and row["error"] is None
    assert row["extra_bytes"] < 2**30, row


def test_running_out_of_memory_is_the_engine_s_own_error(tiny_model: Path) -> None:
    """A real allocation failure (an address-space limit) comes out as OutOfMemory, naming the image's size."""
    code = f"""
import resource, sys
import numpy as np
from fixative.engine.errors import OutOfMemory
from fixative.engine.model import load_model
from fixative.engine.options import EngineOptions
from fixative.engine.imaging import SourceImage
from fixative.engine.protect import protect_image
model = load_model(EngineOptions(model={str(tiny_model)!r}, device="cpu", steps=1))
source = SourceImage.from_rgb(np.full((8000, 6000, 3), 128, np.uint8))
size = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (size + 100 * 2**20, resource.RLIM_INFINITY))
try:
    protect_image(source, model, EngineOptions(model={str(tiny_model)!r}, device="cpu", steps=1))
except OutOfMemory as error:
    print("OutOfMemory:", error)
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # The allocation that fails first may be torch's ("can't allocate memory") or numpy's ("Unable to
    # allocate ..."), whichever comes first under the limit:
    # either must come out as OutOfMemory.
    assert done.stdout.startswith("OutOfMemory: out of memory protecting this 6000x8000 image on cpu: "), done.stdout


def test_a_long_strip_is_protected_coarsely_and_says_so(tiny_model: Path, tmp_path: Path) -> None:
    """a 6000x300 strip was worked at 1619x81, far under the model's scale, without a word."""
    model = load_model(EngineOptions(model=str(tiny_model), device="cpu", dtype="fp32"))
    options = EngineOptions(model=str(tiny_model), device="cpu", dtype="fp32", steps=1)
    for name, (height, width) in {"strip": (256, 2000), "two_to_one": (256, 512)}.items():
        Image.fromarray(_image(height, width)).save(tmp_path / f"{name}.png")
    strip = protect_file(tmp_path / "strip.png", model, options)
    assert strip.report["working_size"] == [506, 65]  # the tiny model's scripts would see 1000x128
    (warning,) = [w for w in strip.warnings if "long image" in w]
    assert "506x65" in warning and "128 px" in warning and "twice as long" in warning
    two_to_one = protect_file(tmp_path / "two_to_one.png", model, options)
    assert two_to_one.report["working_size"] == [256, 128] and two_to_one.warnings == []
