"""The attacks end to end on the tiny trained model: real files in, saved files read back with Pillow.

The paintings are 256 x 320 (working size 128 x 160 on the tiny model, whose
resolution is 128 px), so every run already goes through the down/up-scaling
path; one test uses 700 x 500 for a larger factor. Steps are kept few (10-25)
so each run takes a few seconds on two cores.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms, ImageOps

import fixative.engine.pgd
from fixative.engine.geometry import Geometry
from fixative.engine.metrics import protection_figures
from fixative.engine.model import LoadedModel, load_model
from fixative.engine.options import EngineOptions
from fixative.engine.pixels import to_model
from fixative.engine.protect import Protected, protect_file
from conftest import painting

REPORT_KEYS = {
    "mode", "strength", "budget", "steps", "step_size", "samples_per_step", "seed", "device", "dtype", "model", "size",
    "working_size", "format", "seconds", "seconds_per_step", "psnr", "ssim", "max_delta", "loss_original",
    "loss_protected", "protection_gain", "latent_shift", "robust", "survival_figure", "survival",
}
MODES = ["advdm", "mist", "sds", "encoder"]
FAST_STEPS = 10


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> LoadedModel:
    # fp32 pinned: dtype "auto" would pick bf16 on some CPUs and fp32 on others.
    return load_model(EngineOptions(model=str(tiny_model), device="cpu", dtype="fp32"))


@pytest.fixture(scope="module")
def low_vram_model(tiny_model: Path) -> LoadedModel:
    return load_model(EngineOptions(model=str(tiny_model), device="cpu", dtype="fp32", low_vram=True))


@pytest.fixture(scope="module")
def small_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("paintings") / "small.png"
    Image.fromarray(painting(256, 320, seed=5)).save(path)
    return path


@pytest.fixture(scope="module")
def mode_run(model: LoadedModel, small_png: Path):
    """``mode_run(mode)``: (result, progress calls) of one FAST_STEPS run per mode, shared by the tests below."""
    cache: dict[str, tuple[Protected, list[tuple[int, int, float]]]] = {}

    def run(mode: str) -> tuple[Protected, list[tuple[int, int, float]]]:
        if mode not in cache:
            calls: list[tuple[int, int, float]] = []
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(fixative.engine.pgd, "PROGRESS_INTERVAL_SECONDS", 0.0)  # report every step
                options = EngineOptions(model=model.source, device="cpu", dtype="fp32", mode=mode, steps=FAST_STEPS)
                result = protect_file(small_png, model, options, lambda *args: calls.append(args))
            cache[mode] = (result, calls)
        return cache[mode]

    return run


def protect(model: LoadedModel, path: Path, **overrides) -> Protected:
    settings = {"model": model.source, "device": "cpu", "dtype": "fp32", "steps": FAST_STEPS, **overrides}
    return protect_file(path, model, EngineOptions(**settings))


def save(result: Protected, folder: Path, stem: str = "out") -> Path:
    out = folder / f"{stem}{result.suffix}"
    out.write_bytes(result.data)
    return out


def read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(ImageOps.exif_transpose(image).convert("RGB"))


def level_changes(original: np.ndarray, protected: np.ndarray) -> np.ndarray:
    return np.abs(original.astype(np.int16) - protected.astype(np.int16))


def model_view(model: LoadedModel, rgb: np.ndarray, geometry: Geometry) -> torch.Tensor:
    """What a fine-tuning script feeds the model: downscaled to the working size, padded, in [-1, 1]."""
    return geometry.pad(geometry.down(to_model(rgb)))


def gain_of(model: LoadedModel, original: np.ndarray, changed: np.ndarray) -> float:
    geometry = Geometry.plan(*original.shape[:2], model.resolution, model.size_multiple)
    figures = protection_figures(model, model_view(model, original, geometry), model_view(model, changed, geometry))
    return figures["protection_gain"]


# --- every mode ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_runs_reports_and_respects_the_budget(mode_run, mode: str, small_png: Path, tmp_path: Path) -> None:
    result, _ = mode_run(mode)
    report = result.report
    assert REPORT_KEYS <= set(report), REPORT_KEYS - set(report)
    json.dumps(report)  # the daemon stores it as JSON
    assert report["mode"] == mode
    assert report["strength"] == 8 and report["steps"] == FAST_STEPS and report["step_size"] == 1.0
    assert report["device"] == "cpu" and report["dtype"] == "float32"
    assert report["size"] == [320, 256] and report["working_size"] == [160, 128]
    assert report["format"] == "png" and result.suffix == ".png"
    assert report["seconds"] > 0 and report["seconds_per_step"] > 0
    for key in ("loss_original", "loss_protected", "protection_gain", "latent_shift", "psnr", "ssim"):
        assert math.isfinite(report[key]) and report[key] > 0, key
    assert result.warnings == []

    out = save(result, tmp_path)
    original, protected = read_rgb(small_png), read_rgb(out)
    changes = level_changes(original, protected)
    assert protected.shape == original.shape
    assert changes.max() <= 8
    assert report["max_delta"] == changes.max()
    # Not a no-op: sign steps push most pixels well away from the original.
    assert changes.mean() > 2.0
    assert 25 < report["psnr"] < 50 and 0 < report["ssim"] < 1


@pytest.mark.parametrize("mode", MODES)
def test_progress_is_reported_with_increasing_steps_ending_at_the_total(mode_run, mode: str) -> None:
    _, calls = mode_run(mode)  # run with the half-second throttle off: one call per step
    assert [step for step, _, _ in calls] == list(range(1, FAST_STEPS + 1))
    assert all(total == FAST_STEPS for _, total, _ in calls)
    assert all(type(loss) is float and math.isfinite(loss) for _, _, loss in calls)
    assert calls[-1][:2] == (FAST_STEPS, FAST_STEPS)


def test_the_encoder_attack_pulls_the_latent_toward_its_target(mode_run) -> None:
    # It minimises the latent distance: the reported distance falls over the run.
    _, calls = mode_run("encoder")
    assert calls[-1][2] < calls[0][2]


@pytest.mark.parametrize(
    "overrides",
    [{"mode": "sds", "sds_direction": "maximize"}, {"mode": "advdm", "samples_per_step": 3}],
    ids=["sds-maximize", "advdm-3-samples"],
)
def test_variants_run_within_budget(model: LoadedModel, small_png: Path, overrides: dict) -> None:
    result = protect(model, small_png, steps=3, **overrides)
    assert result.report["samples_per_step"] == overrides.get("samples_per_step", 1)
    assert 0 < result.report["max_delta"] <= 8
    assert math.isfinite(result.report["protection_gain"])


@pytest.mark.parametrize("strength", [4, 16])
def test_budget_holds_exactly_at_other_strengths(
    model: LoadedModel, small_png: Path, tmp_path: Path, strength: int
) -> None:
    result = protect(model, small_png, strength=strength, step_size=max(1.0, strength / 8), steps=5)
    changes = level_changes(read_rgb(small_png), read_rgb(save(result, tmp_path)))
    assert changes.max() <= strength
    assert changes.max() >= strength - 1  # the budget is used, not wasted
    assert result.report["max_delta"] == changes.max()
    assert result.report["strength"] == strength


def test_larger_than_working_size_is_carried_to_full_resolution_within_budget(
    model: LoadedModel, tmp_path: Path
) -> None:
    source = tmp_path / "large.png"
    Image.fromarray(painting(700, 500, seed=11)).save(source)
    result = protect(model, source, steps=5)
    assert result.report["size"] == [500, 700]
    assert result.report["working_size"] == [128, 179]
    out = save(result, tmp_path)
    with Image.open(out) as image:
        assert image.size == (500, 700) and image.mode == "RGB"
    original, protected = read_rgb(source), read_rgb(out)
    changes = level_changes(original, protected)
    assert changes.max() <= 8
    assert changes.mean() > 2.0
    # Carried up from the working size, not fresh per-pixel noise: neighbouring changes agree...
    delta = protected.astype(np.int16) - original.astype(np.int16)
    same_sign = np.mean(np.sign(delta[:, 1:]) == np.sign(delta[:, :-1]))
    assert same_sign > 0.6
    # ...so it survives the downscale a fine-tuning script applies (independent noise would mostly average out).
    geometry = Geometry.plan(700, 500, model.resolution, model.size_multiple)
    full = torch.tensor(delta, dtype=torch.float32).permute(2, 0, 1)[None]
    seen = geometry.down(full)
    assert seen.abs().mean() > 0.6 * full.abs().mean()
    noise = torch.tensor(np.random.default_rng(0).choice([-8.0, 8.0], delta.shape), dtype=torch.float32)
    assert geometry.down(noise.permute(2, 0, 1)[None]).abs().mean() < 0.4 * 8


def test_named_strength_presets(model: LoadedModel, small_png: Path) -> None:
    assert EngineOptions(strength="subtle").strength == 4
    assert EngineOptions(strength="strong").strength == 16
    result = protect(model, small_png, strength="subtle", steps=2)
    assert result.report["strength"] == 4 and result.report["max_delta"] <= 4


# --- what the file keeps ------------------------------------------------------------------


def test_alpha_is_kept_byte_identical_and_only_colour_is_perturbed(model: LoadedModel, tmp_path: Path) -> None:
    rgb = painting(256, 320, seed=3)
    yy, xx = np.mgrid[0:256, 0:320]
    alpha = ((xx * 255) // 319).astype(np.uint8)  # 0 (transparent) to 255 across the image
    alpha[100:140, :] = 255
    source = tmp_path / "alpha.png"
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(source)

    out = save(protect(model, source, steps=3), tmp_path)
    with Image.open(out) as image:
        assert image.mode == "RGBA" and image.size == (320, 256)
        saved = np.array(image)
    assert np.array_equal(saved[..., 3], alpha)
    changes = level_changes(rgb, saved[..., :3])
    assert 0 < changes.max() <= 8


def test_icc_profile_and_dpi_are_kept(model: LoadedModel, tmp_path: Path) -> None:
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    source = tmp_path / "profiled.png"
    Image.fromarray(painting(256, 320, seed=4)).save(source, icc_profile=profile, dpi=(300, 300))
    out = save(protect(model, source, steps=3), tmp_path)
    with Image.open(out) as image:
        assert image.info.get("icc_profile") == profile
        assert tuple(round(d) for d in image.info["dpi"]) == (300, 300)


def test_exif_orientation_is_applied_and_the_output_is_upright(model: LoadedModel, tmp_path: Path) -> None:
    upright_pixels = painting(320, 256, seed=6)  # portrait as the artist sees it
    stored = Image.fromarray(upright_pixels).transpose(Image.Transpose.ROTATE_90)  # landscape as the camera wrote it
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    exif[0x013B] = "The Artist"
    source = tmp_path / "rotated.png"
    stored.save(source, exif=exif.tobytes())
    with Image.open(source) as image:
        assert image.size == (320, 256)
        expected = np.array(ImageOps.exif_transpose(image).convert("RGB"))
    assert np.array_equal(expected, upright_pixels)  # the fixture itself is right

    result = protect(model, source, steps=3)
    assert result.report["size"] == [256, 320]
    assert any("orientation 6" in note for note in result.warnings)
    out = save(result, tmp_path)
    with Image.open(out) as image:
        assert image.size == (256, 320)  # stored upright
        assert image.getexif().get(0x0112, 1) == 1  # so no viewer rotates it again
        assert image.getexif().get(0x013B) == "The Artist"
        saved = np.array(image.convert("RGB"))
    changes = level_changes(expected, saved)
    assert changes.max() <= 8
    # Same orientation as the upright original: far closer to it than to any other orientation.
    assert changes.mean() < 6


# --- the attack bites -----------------------------------------------------------------------


def test_advdm_gain_beats_one_and_random_noise_of_the_same_budget(
    model: LoadedModel, mode_run, small_png: Path, tmp_path: Path
) -> None:
    result, _ = mode_run("advdm")
    original = read_rgb(small_png)
    protected = read_rgb(save(result, tmp_path))
    gain = result.report["protection_gain"]
    # The report measures the saved file the way this test measures the noise.
    assert gain == pytest.approx(gain_of(model, original, protected), rel=1e-3)

    rng = np.random.default_rng(0)
    strength = 8
    noise_gains = []
    for _ in range(2):
        uniform = rng.integers(-strength, strength + 1, original.shape)
        signs = rng.choice([-strength, strength], original.shape)
        for noise in (uniform, signs):
            noisy = np.clip(original.astype(np.int16) + noise, 0, 255).astype(np.uint8)
            noise_gains.append(gain_of(model, original, noisy))
    print(f"advdm gain {gain:.4f} after {FAST_STEPS} steps; random noise gains {np.round(noise_gains, 4)}")
    assert gain > 1.0
    assert gain > max(noise_gains)
    # Not by a hair: noise moves the loss by about 0.1%, the attack by several percent.
    assert gain - 1 > 5 * max(abs(g - 1) for g in noise_gains)


# --- determinism, formats, progress -------------------------------------------------------


def test_same_seed_same_bytes_different_seed_different_output(model: LoadedModel, small_png: Path) -> None:
    first = protect(model, small_png, seed=7, steps=3)
    again = protect(model, small_png, seed=7, steps=3)
    other = protect(model, small_png, seed=8, steps=3)
    assert first.data == again.data
    assert first.data != other.data
    a = np.array(Image.open(io.BytesIO(first.data)))
    b = np.array(Image.open(io.BytesIO(other.data)))
    assert (a != b).mean() > 0.3


def test_jpeg_output_warns_that_it_weakens_the_protection(model: LoadedModel, small_png: Path, tmp_path: Path) -> None:
    calls: list[tuple[int, int, float]] = []
    options = EngineOptions(model=model.source, device="cpu", dtype="fp32", mode="encoder", steps=3, format="jpeg", quality=90)
    result = protect_file(small_png, model, options, lambda *args: calls.append(args))
    assert result.suffix == ".jpg" and result.report["format"] == "jpeg"
    assert any("lossy" in warning and "PNG" in warning for warning in result.warnings)
    with Image.open(save(result, tmp_path)) as image:
        assert image.format == "JPEG" and image.size == (320, 256)
    # With the default half-second throttle, the last step is still always reported.
    steps = [step for step, _, _ in calls]
    assert steps == sorted(set(steps)) and calls[-1][:2] == (3, 3) and isinstance(calls[-1][2], float)


def test_bf16_model_protects_within_budget(tiny_model: Path, small_png: Path, tmp_path: Path) -> None:
    bf16 = load_model(EngineOptions(model=str(tiny_model), device="cpu", dtype="bf16"))
    result = protect(bf16, small_png, steps=3, dtype="bf16")
    assert result.report["dtype"] == "bfloat16"
    changes = level_changes(read_rgb(small_png), read_rgb(save(result, tmp_path)))
    assert 0 < changes.max() <= 8
    assert math.isfinite(result.report["protection_gain"])


def test_user_target_changes_the_encoder_attack(model: LoadedModel, small_png: Path, tmp_path: Path) -> None:
    target = tmp_path / "target.png"
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(target)
    default = protect(model, small_png, mode="encoder", steps=3)
    custom = protect(model, small_png, mode="encoder", steps=3, target=target)
    assert default.data != custom.data
    assert custom.report["max_delta"] <= 8


@pytest.mark.parametrize("mode", ["advdm", "mist"])
def test_low_vram_split_backward_takes_the_same_steps(
    model: LoadedModel, low_vram_model: LoadedModel, small_png: Path, mode: str
) -> None:
    """The split backward (encoder re-run after the latent gradient) is the same gradient, computed in two passes."""
    plain = protect(model, small_png, mode=mode, steps=3)
    split = protect(low_vram_model, small_png, mode=mode, steps=3, low_vram=True)
    a = np.array(Image.open(io.BytesIO(plain.data)))
    b = np.array(Image.open(io.BytesIO(split.data)))
    # Sign steps can flip only where the gradient is ~0, so almost every pixel is the same.
    assert (a != b).mean() < 0.01
    assert split.report["protection_gain"] == pytest.approx(plain.report["protection_gain"], abs=2e-3)
