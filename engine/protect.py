"""Protect one image: the engine's single entry point.

An image file and options go in; the protected file's bytes and a report come
out. Nothing here knows where the bytes will be written: the CLI writes them
next to a chosen folder, the daemon writes them atomically into its export
folder.

The steps:
1. read the image (orientation applied, alpha and metadata set aside);
2. plan the working size (``engine.geometry``) and downscale to it;
3. run PGD for the chosen attack (``engine.attacks``) on the colour channels;
4. carry the perturbation to full resolution, round it to whole levels, and
   clip it to the budget around the original's own 8-bit values, so the saved
   file is within ``strength`` levels of the original in every pixel;
5. encode, read the encoded file back, and measure what was actually saved.

Only step 3 and the protection figures run on the model's device, at the
working size; everything at full resolution runs on the CPU a band at a time
(``engine.geometry``), so a large image costs little more than its own bytes.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fixative.engine.attacks import ATTACKS
from fixative.engine.errors import OutOfMemory
from fixative.engine.geometry import Geometry
from fixative.engine.imaging import (
    LOSSY_FORMATS,
    OUTPUT_FORMATS,
    SourceImage,
    decode_image,
    encode_image,
    read_back_rgb,
    read_image,
)
from fixative.engine.metrics import as_seen, effect_figure, max_delta, protection_figures, psnr, served_figures, ssim
from fixative.engine.model import LoadedModel
from fixative.engine.options import EngineOptions
from fixative.engine.pgd import Progress, coarse_steps, run_pgd
from fixative.engine.publishing import REPORTED_PIPELINES
from fixative.engine.transforms import PublishingTransform


@dataclass
class Protected:
    data: bytes  # the encoded output file
    suffix: str  # ".png", ".jpg" or ".webp"
    report: dict  # JSON-serialisable figures, see protect_image
    warnings: list[str] = field(default_factory=list)


def protect_file(path: Path, model: LoadedModel, options: EngineOptions, progress: Progress | None = None) -> Protected:
    """Read ``path`` and protect it. Raises ``engine.errors.BadImage`` for files we cannot protect."""
    return protect_image(read_image(Path(path)), model, options, progress)


def protect_bytes(
    data: bytes, name: str, model: LoadedModel, options: EngineOptions, progress: Progress | None = None
) -> Protected:
    """Protect an image file's bytes (``name`` is for messages). The daemon hashes and decodes the same bytes."""
    return protect_image(decode_image(data, name), model, options, progress)


def _out_of_memory_is_an_engine_error(protect):
    """Turn torch's and numpy's ways of running out of memory into :class:`OutOfMemory`.

    So that callers (the daemon's worker) need not import torch to recognise
    it, and so that the GPU's cache is emptied for the next image here, where
    the tensors live. The cache is emptied after the except block, once the
    failed frames, and the tensors they hold, are released.
    """

    @functools.wraps(protect)
    def protect_or_explain(source, model, options, progress=None):
        try:
            return protect(source, model, options, progress)
        except (MemoryError, RuntimeError) as error:  # torch.OutOfMemoryError is a RuntimeError
            # The CPU allocator's failure is a plain RuntimeError: only its message tells.
            if not isinstance(error, (MemoryError, torch.OutOfMemoryError)) and "can't allocate memory" not in str(error):
                raise
            reason = str(error).splitlines()[0].split("DefaultCPUAllocator: ")[-1]  # after "[enforce fail at ...]"
        if model.device.type == "cuda":
            torch.cuda.empty_cache()
        height, width = source.rgb.shape[:2]
        raise OutOfMemory(f"out of memory protecting this {width}x{height} image on {model.device}: {reason}")

    return protect_or_explain


def perturbation(
    model: LoadedModel, options: EngineOptions, geometry: Geometry, x_work: torch.Tensor, progress: Progress | None
) -> torch.Tensor:
    """Step 3: the PGD perturbation at the working size, coarse steps first (``engine.pgd``, coarse to fine)."""
    # Budgets are given in 0-255 levels; the image lives in [-1, 1], so double them.
    eps, alpha = 2 * options.strength / 255, 2 * options.step_size / 255
    generator = torch.Generator(model.device).manual_seed(options.seed)
    transform = PublishingTransform(options.seed) if options.robust else None
    coarse = coarse_steps(options)
    start = None
    if coarse:
        half = geometry.halved(model.size_multiple)
        attack = ATTACKS[options.mode](model, options, (1, 3, *half.padded))
        delta = run_pgd(attack, half.down(x_work), half, eps, alpha, coarse, generator, _counted(progress, 0, options.steps), transform)
        start = half.up(delta)
    attack = ATTACKS[options.mode](model, options, (1, 3, *geometry.padded))
    fine = options.steps - coarse
    return run_pgd(attack, x_work, geometry, eps, alpha, fine, generator, _counted(progress, coarse, options.steps), transform, start)


def _counted(progress: Progress | None, before: int, total: int) -> Progress | None:
    """A stage's progress callback, counting in the whole run's steps."""
    if progress is None:
        return None
    return lambda step, _stage_total, loss: progress(before + step, total, loss)


@_out_of_memory_is_an_engine_error
def protect_image(
    source: SourceImage, model: LoadedModel, options: EngineOptions, progress: Progress | None = None
) -> Protected:
    """Steps 2-5 of the module docstring, on an image already decoded (see protect_file, protect_bytes).

    Running out of memory on the device or the CPU raises engine.errors.OutOfMemory (the decorator).
    """
    started = time.perf_counter()
    height, width = source.rgb.shape[:2]
    geometry = Geometry.plan(height, width, model.resolution, model.size_multiple)
    x_work = geometry.down_image(source.rgb).to(model.device)

    pgd_started = time.perf_counter()
    delta = perturbation(model, options, geometry, x_work, progress)
    pgd_seconds = time.perf_counter() - pgd_started

    protected_rgb = geometry.perturb(source.rgb, delta, float(options.strength))
    data = encode_image(protected_rgb, source, options.format, options.quality)
    del protected_rgb  # the saved file, read back, is what gets measured

    saved = read_back_rgb(data)
    figures = protection_figures(model, geometry.pad(x_work), as_seen(saved, geometry, model.device))
    figure = effect_figure(options)
    served = served_figures(model, geometry, source.rgb, saved, figures, figure, REPORTED_PIPELINES)
    warnings = list(source.notes)
    if min(geometry.work) < min(model.resolution, height, width) - 1:  # (- 1: the working size is rounded)
        # Issue 9: a 6000x300 strip was worked at 1619x81 with no word. Tiling it at
        # the scripts' scale would multiply the time by the number of tiles; say it instead.
        warnings.append(
            f"this long image was protected at {geometry.work[1]}x{geometry.work[0]}, coarser than the "
            f"{model.resolution} px short side fine-tuning scripts train at, so its protection is weaker; "
            "cut it into pieces at most twice as long as their short side, and protect those"
        )
    if options.format in LOSSY_FORMATS:
        warnings.append(
            f"{options.format.upper()} output is lossy and washes out much of the perturbation; "
            "publish the PNG where you can"
        )
    report = {
        "mode": options.mode,
        "robust": options.robust,
        "strength": options.strength,
        "steps": options.steps,
        "step_size": options.step_size,
        "samples_per_step": options.samples_per_step,
        "coarse_steps": coarse_steps(options),
        "seed": options.seed,
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "vae_dtype": str(model.vae.dtype).removeprefix("torch."),
        "model": model.source,
        "size": [width, height],
        "working_size": [geometry.work[1], geometry.work[0]],
        "format": options.format,
        "seconds": round(time.perf_counter() - started, 3),
        "seconds_per_step": round(pgd_seconds / options.steps, 4),
        "psnr": round(psnr(source.rgb, saved), 2),
        "ssim": round(ssim(source.rgb, saved), 4),
        "max_delta": max_delta(source.rgb, saved),
        **{name: round(value, 4) for name, value in figures.items()},
        "survival_figure": figure,
        "survival": {
            name: {key: None if value is None else round(value, 4) for key, value in values.items()}
            for name, values in served.items()
        },
    }
    return Protected(data=data, suffix=OUTPUT_FORMATS[options.format], report=report, warnings=warnings)
