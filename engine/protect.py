"""Protect an image, or a batch of them: the engine's single entry point.

An image file and options go in; the protected file's bytes and a report come
out. Several images of one working size can be protected as one batch
(:func:`protect_batch`), one PGD step for all of them at a time, which keeps a
GPU busier; an image alone is a batch of one. Nothing here knows where the
bytes will be written: the CLI writes them next to a chosen folder, the daemon
writes them atomically into its export folder.

The steps:
1. read the image (orientation applied, alpha and metadata set aside);
2. plan the working size (``fixative.engine.geometry``) and downscale to it;
3. run PGD for the chosen attack (``fixative.engine.attacks``) on the colour channels,
   against one model or several at once (``fixative.engine.ensemble``);
4. carry the perturbation to full resolution, round it to whole levels, and
   clip it to the budget around the original's own 8-bit values, so the saved
   file is within ``strength`` levels of the original in every pixel;
5. encode, read the encoded file back, and measure what was actually saved.

Only step 3 and the protection figures run on the model's device, at the
working size; everything at full resolution runs on the CPU a band at a time
(``fixative.engine.geometry``), so a large image costs little more than its own bytes.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fixative.engine.attacks import ATTACKS
from fixative.engine.budget import Budget
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
from fixative.engine.ensemble import Ensemble, EnsembleAttack, Member
from fixative.engine.model import LoadedModel, LoadedVAE
from fixative.engine.options import EngineOptions
from fixative.engine.pgd import Progress, coarse_steps, run_pgd
from fixative.engine.publishing import REPORTED_PIPELINES
from fixative.engine.transforms import PublishingTransform

# One model, or several at once (fixative.engine.ensemble): the report then has a part per member.
Protector = LoadedModel | Ensemble


@dataclass
class Protected:
    data: bytes  # the encoded output file
    suffix: str  # ".png", ".jpg" or ".webp"
    report: dict  # JSON-serialisable figures, see protect_image
    warnings: list[str] = field(default_factory=list)


def protect_file(path: Path, model: Protector, options: EngineOptions, progress: Progress | None = None) -> Protected:
    """Read ``path`` and protect it. Raises ``fixative.engine.errors.BadImage`` for files we cannot protect."""
    return protect_image(read_image(Path(path)), model, options, progress)


def protect_bytes(
    data: bytes, name: str, model: Protector, options: EngineOptions, progress: Progress | None = None
) -> Protected:
    """Protect an image file's bytes (``name`` is for messages): decoded, then :func:`protect_image`.

    bench/memory.py measures an image's peak memory through this path, from the bytes as the worker reads them.
    """
    return protect_image(decode_image(data, name), model, options, progress)


def _memory_shortage(error: Exception) -> str | None:
    """Why, when ``error`` is torch's or numpy's way of running out of memory; None for any other error."""
    if not isinstance(error, (MemoryError, torch.OutOfMemoryError)) and not (
        # The CPU allocator's failure is a plain RuntimeError: only its message tells.
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    ):
        return None
    return str(error).splitlines()[0].split("DefaultCPUAllocator: ")[-1]  # after "[enforce fail at ...]"


def _out_of_memory(sources: list[SourceImage], model: Protector, reason: str) -> OutOfMemory:
    sizes = [f"{source.rgb.shape[1]}x{source.rgb.shape[0]}" for source in sources]
    images = f"this {sizes[0]} image" if len(sizes) == 1 else f"a batch of {len(sizes)} images ({', '.join(sizes)})"
    return OutOfMemory(f"out of memory protecting {images} on {model.device}: {reason}")


def _out_of_memory_is_an_engine_error(protect):
    """Turn torch's and numpy's ways of running out of memory into :class:`OutOfMemory`.

    So that callers (the daemon's worker) need not import torch to recognise
    it, and so that the GPU's cache is emptied for the next image here, where
    the tensors live. The cache is emptied after the except block, once the
    failed frames, and the tensors they hold, are released.
    """

    @functools.wraps(protect)
    def protect_or_explain(sources, model, options, progress=None):
        try:
            return protect(sources, model, options, progress)
        except (MemoryError, RuntimeError) as error:  # torch.OutOfMemoryError is a RuntimeError
            reason = _memory_shortage(error)
            if reason is None:
                raise
        if model.device.type == "cuda":
            torch.cuda.empty_cache()
        raise _out_of_memory(sources, model, reason)

    return protect_or_explain


def perturbation(
    model: Protector,
    options: EngineOptions,
    geometries: list[Geometry],
    x_work: torch.Tensor,
    progress: Progress | None,
    grey: torch.Tensor | None = None,
) -> torch.Tensor:
    """Step 3: the PGD perturbations (RGB changes) at the working size, a row per image, coarse steps first (``fixative.engine.pgd``).

    ``grey`` (N,) bool: the rows of greyscale images, whose channels share one perturbation.
    """
    # Budgets are given in 0-255 levels; the image lives in [-1, 1], so double them.
    eps, alpha = 2 * options.strength / 255, 2 * options.step_size / 255
    # Every image its own random streams, seeded as if it were alone: every draw
    # (random start, EOT, posterior noise, t and eps) is then the one it would get
    # alone, whatever else is in its batch.
    generators = [torch.Generator(model.device).manual_seed(options.seed) for _ in geometries]
    transforms = [PublishingTransform(options.seed) for _ in geometries] if options.robust else None
    coarse = coarse_steps(options)
    start = None
    if coarse:
        half = geometries[0].halved(model.size_multiple)  # the same for every row: a batch shares its working size
        x_half = half.down(x_work)
        attack = _attack(model, options, (1, 3, *half.padded))
        progressed = _counted(progress, 0, options.steps)
        budget = Budget.plan(x_half, eps, options.budget, grey)
        delta = run_pgd(attack, x_half, [half] * len(geometries), budget, alpha, coarse, generators, progressed, transforms)
        start = half.up(delta)  # bilinear, so in the same components; run_pgd projects it into the fine budget
    attack = _attack(model, options, (1, 3, *geometries[0].padded))
    fine = options.steps - coarse
    budget = Budget.plan(x_work, eps, options.budget, grey)
    progressed = _counted(progress, coarse, options.steps)
    return budget.rgb(run_pgd(attack, x_work, geometries, budget, alpha, fine, generators, progressed, transforms, start))


def _attack(model: Protector, options: EngineOptions, input_shape: tuple[int, ...]):
    if isinstance(model, Ensemble):
        return EnsembleAttack(model, options, input_shape)
    return ATTACKS[options.mode](model, options, input_shape)


def _counted(progress: Progress | None, before: int, total: int) -> Progress | None:
    """A stage's progress callback, counting in the whole run's steps."""
    if progress is None:
        return None
    return lambda step, _stage_total, loss: progress(before + step, total, loss)


def _geometry(source: SourceImage, model: Protector) -> Geometry:
    return Geometry.plan(*source.rgb.shape[:2], model.resolution, model.size_multiple)


def batch_key(source: SourceImage, model: Protector) -> tuple[tuple[int, int], tuple[int, int]]:
    """Images batch together only when their keys are equal: the same working and padded size.

    Their full sizes may differ (a 400x300 and an 800x600 image both work at
    the same size); each row keeps its own geometry.
    """
    geometry = _geometry(source, model)
    return geometry.work, geometry.padded


def protect_image(
    source: SourceImage, model: Protector, options: EngineOptions, progress: Progress | None = None
) -> Protected:
    """Steps 2-5 of the module docstring, on an image already decoded (see protect_file, protect_bytes).

    A batch of one (:func:`protect_batch`), so that protecting an image alone
    and in a batch cannot drift apart. Running out of memory on the device or
    the CPU raises fixative.engine.errors.OutOfMemory.
    """
    (result,) = protect_batch([source], model, options, progress)
    if isinstance(result, Exception):
        raise result
    return result


@_out_of_memory_is_an_engine_error
def protect_batch(
    sources: list[SourceImage], model: Protector, options: EngineOptions, progress: Progress | None = None
) -> list[Protected | Exception]:
    """Protect images of one :func:`batch_key` as one batch per PGD step: a result or an error per image, in order.

    Each image gets the output it would get alone, up to the kernels' rounding
    (tests/test_batching.py). Running out of memory before or in the shared PGD
    raises fixative.engine.errors.OutOfMemory for the whole batch (the caller may retry
    the images one at a time); a failure after it that belongs to one image
    (encoding, the report, its own memory) is returned in that image's place and
    leaves the others alone. ``progress(step, total, loss)`` is the batch's, with
    the mean of the images' losses. Raises ValueError if the keys differ.
    """
    started = time.perf_counter()
    if len({batch_key(source, model) for source in sources}) != 1:
        raise ValueError("protect_batch needs images of one batch_key (the same working size)")
    geometries = [_geometry(source, model) for source in sources]
    x_work = torch.cat([geometry.down_image(source.rgb) for geometry, source in zip(geometries, sources)]).to(model.device)

    pgd_started = time.perf_counter()
    grey = torch.tensor([source.grey for source in sources], device=model.device)
    deltas = perturbation(model, options, geometries, x_work, progress, grey)
    # The batch's shared work, shared out: each image's report counts its part.
    pgd_seconds = (time.perf_counter() - pgd_started) / len(sources)
    shared_seconds = (time.perf_counter() - started) / len(sources)

    results: list[Protected | Exception] = []
    for i, (source, geometry) in enumerate(zip(sources, geometries)):
        finishing = time.perf_counter()
        try:
            protected = _finished(source, model, options, geometry, x_work[i : i + 1], deltas[i : i + 1])
        except Exception as error:  # this image's own failure: the others' results stand
            reason = _memory_shortage(error)
            results.append(error if reason is None else _out_of_memory([source], model, reason))
            continue
        protected.report.update(
            seconds=round(shared_seconds + time.perf_counter() - finishing, 3),
            seconds_per_step=round(pgd_seconds / options.steps, 4),
            batch_size=len(sources),
        )
        results.append(protected)
    if model.device.type == "cuda" and any(isinstance(result, OutOfMemory) for result in results):
        torch.cuda.empty_cache()
    return results


def _finished(
    source: SourceImage, model: Protector, options: EngineOptions, geometry: Geometry, x_work: torch.Tensor, delta: torch.Tensor
) -> Protected:
    """Steps 4-5 for one image of a batch: its saved file, read back and measured (the times are added by the caller)."""
    height, width = source.rgb.shape[:2]
    protected_rgb = geometry.perturb(source.rgb, delta, float(options.strength))
    data = encode_image(protected_rgb, source, options.format, options.quality)
    del protected_rgb  # the saved file, read back, is what gets measured

    saved = read_back_rgb(data)
    if isinstance(model, Ensemble):
        bite = {"models": {name: _bite(member, options, geometry, source.rgb, x_work, saved)
                           for name, member in model.members.items()}}
    else:
        bite = _bite(model, options, geometry, source.rgb, x_work, saved)
    warnings = list(source.notes)
    if min(geometry.work) < min(model.resolution, height, width) - 1:  # (- 1: the working size is rounded)
        # A 6000x300 strip is worked at 1619x81, far coarser than the scripts train at. Tiling it at
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
        "budget": options.budget,
        "steps": options.steps,
        "step_size": options.step_size,
        "samples_per_step": options.samples_per_step,
        "coarse_steps": coarse_steps(options),
        "seed": options.seed,
        "device": str(model.device),
        "size": [width, height],
        "working_size": [geometry.work[1], geometry.work[0]],
        "format": options.format,
        "psnr": round(psnr(source.rgb, saved), 2),
        "ssim": round(ssim(source.rgb, saved), 4),
        "max_delta": max_delta(source.rgb, saved),
        **bite,
    }
    return Protected(data=data, suffix=OUTPUT_FORMATS[options.format], report=report, warnings=warnings)


def _bite(
    model: Member, options: EngineOptions, geometry: Geometry, original: np.ndarray, x_work: torch.Tensor, saved: np.ndarray
) -> dict:
    """One model's part of the report: what it is, and the saved file's gain, latent shift and survival on it."""
    figures = protection_figures(model, geometry.pad(x_work), as_seen(saved, geometry, model.device))
    figure = effect_figure(options, model)
    served = served_figures(model, geometry, original, saved, figures, figure, REPORTED_PIPELINES)
    dtypes = {} if isinstance(model, LoadedVAE) else {"dtype": str(model.dtype).removeprefix("torch.")}
    return {
        **dtypes,
        "vae_dtype": str(model.vae.dtype).removeprefix("torch."),
        "model": model.source,
        **{name: round(value, 4) for name, value in figures.items()},
        "survival_figure": figure,
        "survival": {
            name: {key: None if value is None else round(value, 4) for key, value in values.items()}
            for name, values in served.items()
        },
    }
