"""One benchmark measurement, in a process of its own.

``python -m bench.worker SPEC.json RESULT.json`` runs one job (``train``,
``reference`` or ``mode``) and writes its figures as JSON. ``bench/run.py``
starts one such process per measurement, so that the peak memory each one
reports (``ru_maxrss`` on the CPU, ``torch.cuda.max_memory_allocated`` on a
GPU) belongs to that measurement alone: the peak is the process's whole-life
peak, model building included, with nothing subtracted. The resident memory
right after the model is built is reported beside it.

Progress goes to stderr, one line per step at full scale.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import mean_se, proc_bytes, source_image

# The reference's settings: what the AdvDM paper's and Mist v1's code run.
REFERENCE_STRENGTH = 8  # 0-255 levels
REFERENCE_STEP_SIZE = 1  # 0-255 levels per step
REFERENCE_STEPS = 100
REFERENCE_CHECKPOINTS = (25, 50, 100)
IMAGE_SEED = 5


def log(message: str) -> None:
    print(f"    {message}", file=sys.stderr, flush=True)


def setup(spec: dict):
    import torch

    torch.set_num_threads(int(spec["threads"]))
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    return torch


def runtime_info(torch, device) -> dict:
    info = {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": str(device),
    }
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return info


def rss_peak() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def memory_after_build(torch, device) -> dict:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return {"baseline_bytes": torch.cuda.memory_allocated(device), "kind": "cuda memory_allocated"}
    return {"baseline_bytes": proc_bytes("VmRSS"), "kind": "RSS"}


def memory_peak(torch, device) -> dict:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return {"peak_bytes": torch.cuda.max_memory_allocated(device), "peak_kind": "cuda max_memory_allocated"}
    return {"peak_bytes": rss_peak(), "peak_kind": "ru_maxrss"}


def measured_steps(spec: dict, device) -> int | None:
    """Steps to time after the warm-up; None means run whole images (tiny scale)."""
    steps = spec["measure_steps"]
    if steps is None:
        return None
    if steps == "auto":
        return 10 if device.type == "cuda" else 2
    return int(steps)


def sync(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def painting(width: int, height: int, seed: int = IMAGE_SEED) -> np.ndarray:
    """The synthetic painting both sides protect: uint8 H x W x 3, smooth fields and hard-edged strokes."""
    from fixative.engine.pixels import to_rgb
    from fixative.engine.tiny import synthetic_paintings

    return to_rgb(synthetic_paintings(1, max(width, height), seed=seed)[0, :, :height, :width])


def load_evaluator(spec: dict, device_name: str):
    """The tiny model in fp32: one fixed judge of protection gain for the reference and every mode."""
    from fixative.engine.model import load_model
    from fixative.engine.options import EngineOptions

    return load_model(EngineOptions(model=spec["tiny_folder"], dtype="fp32", device=device_name))


def evaluate(evaluator, original: np.ndarray, protected: np.ndarray) -> dict:
    """Protection gain and latent shift as the engine reports them: both images downscaled as a
    fine-tuning script would, padded, and scored by engine.metrics.protection_figures; and the gain
    after Pillow's JPEG q75 (both images served alike), the copy a fine-tuner meets once posted."""
    from fixative.engine.geometry import Geometry
    from fixative.engine.metrics import as_seen, max_delta, protection_figures, psnr
    from fixative.engine.publishing import serve

    height, width = original.shape[:2]
    geometry = Geometry.plan(height, width, evaluator.resolution, evaluator.size_multiple)
    seen = [as_seen(rgb, geometry, evaluator.device) for rgb in (original, protected)]
    figures = protection_figures(evaluator, *seen)
    served = [as_seen(serve(rgb, "jpeg75"), geometry, evaluator.device) for rgb in (original, protected)]
    return {
        "protection_gain": round(figures["protection_gain"], 4),
        "gain_after_jpeg75": round(protection_figures(evaluator, *served)["protection_gain"], 4),
        "latent_shift": round(figures["latent_shift"], 4),
        "psnr": round(psnr(original, protected), 2),
        "max_delta": max_delta(original, protected),
    }


# --------------------------------------------------------------------------------------------- jobs


def train_job(spec: dict) -> dict:
    setup(spec)
    from fixative.engine.tiny import build_tiny_model, train_tiny_model

    folder = Path(spec["tiny_folder"])
    started = time.perf_counter()
    build_tiny_model(folder)
    train_tiny_model(folder, steps=int(spec["training_steps"]))
    return {"seconds": round(time.perf_counter() - started, 1)}


def _reference_model(spec: dict, torch, device):
    from bench.reference import ReferenceModel

    if spec["scale"] == "full":
        from bench import sd15

        vae = sd15.build_vae(device, torch.float32)
        unet = sd15.build_unet(device, torch.float32)
        scheduler = sd15.build_scheduler()
        context = sd15.text_embedding()
        params = {"unet": sd15.count_params(unet), "vae": sd15.count_params(vae)}
    else:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        folder = Path(spec["tiny_folder"])
        vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32)
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32)
        scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
        ids = tokenizer("a painting", padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
        with torch.no_grad():
            context = text_encoder(ids.input_ids)[0]
        del text_encoder, tokenizer
        params = {"unet": sum(p.numel() for p in unet.parameters()), "vae": sum(p.numel() for p in vae.parameters())}
    vae = vae.to(device).eval().requires_grad_(False)
    unet = unet.to(device).eval().requires_grad_(False)
    model = ReferenceModel(
        vae=vae,
        unet=unet,
        context=context.to(device),
        alphas_cumprod=scheduler.alphas_cumprod.to(device=device, dtype=torch.float32),
        scaling_factor=float(vae.config.scaling_factor),
    )
    return model, params


def _dtype_text(vae_dtype, unet_dtype) -> str:
    unet = str(unet_dtype).removeprefix("torch.")
    vae = str(vae_dtype).removeprefix("torch.")
    return unet if vae == unet else f"{unet}/vae {vae}"


def aggregate(figures: list[dict]) -> dict:
    """Per-seed evaluations -> means (and the gain's standard error, since PGD's gain varies a lot by seed)."""
    gains = [f["protection_gain"] for f in figures]
    mean, se = mean_se(gains)
    return {
        "protection_gain": round(mean, 4),
        "protection_gain_se": round(se, 4) if se is not None else None,
        "protection_gains": gains,
        "gain_after_jpeg75": round(sum(f["gain_after_jpeg75"] for f in figures) / len(figures), 4),
        "latent_shift": round(sum(f["latent_shift"] for f in figures) / len(figures), 4),
        "psnr": round(sum(f["psnr"] for f in figures) / len(figures), 2),
        "max_delta": max(f["max_delta"] for f in figures),
    }


def reference_job(spec: dict) -> dict:
    torch = setup(spec)
    import gc

    from bench import reference
    from fixative.engine.model import pick_device
    from fixative.engine.options import EngineOptions
    from fixative.engine.pixels import to_model

    device = pick_device(EngineOptions().device)  # the device the engine would use, so both sides share it
    width, height = spec["size"]
    label = f"[reference {width}x{height}]"
    started = time.perf_counter()
    model, params = _reference_model(spec, torch, device)
    build_seconds = time.perf_counter() - started
    memory = memory_after_build(torch, device)
    log(f"{label} model built in {build_seconds:.1f} s (UNet {params['unet'] / 1e6:.1f}M, VAE {params['vae'] / 1e6:.1f}M params, fp32)")

    rgb = painting(width, height)
    x = to_model(rgb, device)
    eps, alpha = 2 * REFERENCE_STRENGTH / 255, 2 * REFERENCE_STEP_SIZE / 255

    warm = time.perf_counter()
    reference.protect(model, x, 1, eps, alpha, seed=0)
    sync(torch, device)
    warmup_seconds = time.perf_counter() - warm
    log(f"{label} warm-up step {warmup_seconds:.2f} s")

    measured = measured_steps(spec, device)
    full_run = measured is None
    steps = REFERENCE_STEPS if full_run else measured
    seeds = spec.get("seeds") or [0]
    runs = []
    for seed in seeds:
        stamps: list[float] = []
        snapshots: dict[int, np.ndarray] = {}

        def on_step(step: int, x_adv) -> None:
            sync(torch, device)
            stamps.append(time.perf_counter())
            if not full_run:
                log(f"{label} step {step}/{steps} {stamps[-1] - (stamps[-2] if len(stamps) > 1 else begin):.2f} s")
            if step in REFERENCE_CHECKPOINTS:
                snapshots[step] = ((x_adv[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().cpu().numpy()

        begin, cpu_begin = time.perf_counter(), time.process_time()
        reference.protect(model, x, steps, eps, alpha, seed=seed, on_step=on_step)
        runs.append(
            {
                "seed": seed,
                "seconds": stamps[-1] - begin,
                "cpu_seconds": time.process_time() - cpu_begin,
                "at": {step: stamps[step - 1] - begin for step in snapshots},
                "snapshots": snapshots,
            }
        )
    run_seconds = sum(r["seconds"] for r in runs) / len(runs)
    seconds_per_step = run_seconds / steps
    result = {
        "kind": "reference",
        "size": [width, height],
        "device": str(device),
        "dtype": "float32",
        "params": params,
        "build_seconds": round(build_seconds, 2),
        "warmup_step_seconds": round(warmup_seconds, 3),
        "seeds": seeds,
        "steps_measured": steps,
        "steps_per_image": REFERENCE_STEPS,
        "strength": REFERENCE_STRENGTH,
        "step_size": REFERENCE_STEP_SIZE,
        "seconds_per_step": seconds_per_step,
        "cpu_seconds_per_step": sum(r["cpu_seconds"] for r in runs) / len(runs) / steps,
        "overhead_seconds": 0.0,
        "seconds_per_image": run_seconds if full_run else REFERENCE_STEPS * seconds_per_step,
        "per_image_extrapolated": not full_run,
        **memory,
        **memory_peak(torch, device),
        "runtime": runtime_info(torch, device),
    }
    log(f"{label} {seconds_per_step:.3f} s/step, peak {result['peak_bytes'] / 2**30:.2f} GiB")
    if spec.get("evaluate"):
        del model
        gc.collect()
        evaluator = load_evaluator(spec, str(device))
        result["by_steps"] = [
            {
                "steps": step,
                "seconds": round(sum(r["at"][step] for r in runs) / len(runs), 3),
                **aggregate([evaluate(evaluator, rgb, r["snapshots"][step]) for r in runs]),
            }
            for step in REFERENCE_CHECKPOINTS
            if step <= steps
        ]
        result.update({k: v for k, v in result["by_steps"][-1].items() if k not in ("steps", "seconds")})
    return result


def _stage_rate(marks: list[tuple[int, float, float]]) -> tuple[float, float, int] | None:
    """(s/step, CPU s/step, steps timed) between a stage's first and last progress marks; None under two marks."""
    if len(marks) < 2 or marks[-1][0] <= marks[0][0]:
        return None
    (s0, t0, c0), (s1, t1, c1) = marks[0], marks[-1]
    return (t1 - t0) / (s1 - s0), (c1 - c0) / (s1 - s0), s1 - s0


def _protect_timed(protect_image, source, model, options, label: str, verbose: bool) -> dict:
    """Run protect_image once and time it.

    Seconds per step come from the progress callback's timestamps, leaving out
    everything before the first callback (setup, and step 1, which warms the
    caches and the allocator). The callback fires at most twice a second, so at
    tiny scale the marks are a few steps apart; at full scale every step is
    longer than that and each one is marked. With coarse to fine
    (engine.pgd.coarse_steps, named in the report), the steps at half the
    working side and those at the working size are timed apart, each from its
    own marks, when each stage has two; the first mark of each stage is then a
    warm-up (the fine stage's first step meets the working size cold).
    """
    import torch

    marks: list[tuple[int, float, float]] = []
    pgd_peak: list[int] = []
    begin = time.perf_counter()

    def progress(step: int, total: int, loss: float) -> None:
        marks.append((step, time.perf_counter(), time.process_time()))
        if step == total:  # the peak so far covers model building and every PGD step, not the report
            pgd_peak.append(memory_peak(torch, model.device)["peak_bytes"])
        if verbose:
            previous = marks[-2][1] if len(marks) > 1 else begin
            log(f"{label} step {step}/{total} {marks[-1][1] - previous:.2f} s (loss {loss:.4f})")

    protected = protect_image(source, model, options, progress)
    wall = time.perf_counter() - begin
    coarse = protected.report.get("coarse_steps", 0)
    stages = {
        "coarse": _stage_rate([m for m in marks if m[0] <= coarse]),
        "fine": _stage_rate([m for m in marks if m[0] > coarse]),
    }
    whole = _stage_rate(marks)
    if coarse and stages["coarse"] and stages["fine"]:
        per_step = {name: rate[0] for name, rate in stages.items()}
        cpu = sum(rate[1] * rate[2] for rate in stages.values()) / sum(rate[2] for rate in stages.values())
        timed = sum(rate[2] for rate in stages.values())
        source_of = f"progress timestamps, per stage: {stages['coarse'][2]} coarse and {stages['fine'][2]} fine step(s)"
    elif whole:
        per_step, cpu, timed = {"coarse": whole[0], "fine": whole[0]}, whole[1], whole[2]
        source_of = f"progress timestamps, steps {marks[0][0] + 1}..{marks[-1][0]}"
    else:
        rate = float(protected.report["seconds_per_step"])
        per_step, cpu, timed = {"coarse": rate, "fine": rate}, None, options.steps
        source_of = "engine report (pgd seconds / steps, first step included)"
    run_seconds = coarse * per_step["coarse"] + (options.steps - coarse) * per_step["fine"]
    return {
        "protected": protected,
        "wall": wall,
        "seconds_per_step": run_seconds / options.steps,
        "seconds_per_coarse_step": per_step["coarse"] if coarse else None,
        "seconds_per_fine_step": per_step["fine"],
        "cpu_seconds_per_step": cpu,
        "timed_steps": timed,
        "overhead": max(0.0, wall - run_seconds),
        "seconds_per_step_from": source_of,
        "peak_bytes_through_pgd": pgd_peak[-1] if pgd_peak else None,
    }


def timed_run_steps(measured: int, options) -> int:
    """Steps in a full-scale timed run: 1 + ``measured`` in each stage, the first of each being its warm-up."""
    from fixative.engine.pgd import coarse_steps

    def stages(steps: int) -> tuple[int, int]:
        coarse = coarse_steps(options.model_copy(update={"steps": steps}))
        return coarse, steps - coarse

    steps = 1 + measured
    if coarse_steps(options):
        while min(stages(steps)) < 1 + measured:
            steps += 1
    return steps


def mode_job(spec: dict) -> dict:
    torch = setup(spec)
    import gc

    from fixative.engine.imaging import read_back_rgb
    from fixative.engine.options import EngineOptions
    from fixative.engine.protect import protect_image

    mode = spec["mode"]
    width, height = spec["size"]
    label = f"[{spec.get('label', mode)} {width}x{height}]"
    model_ref = spec["tiny_folder"] if spec["scale"] == "tiny" else EngineOptions().model
    options = EngineOptions(mode=mode, model=model_ref, **spec.get("overrides", {}))
    settings = options.model_dump(mode="json")

    started = time.perf_counter()
    if spec["scale"] == "full":
        from bench import sd15

        model, built_via = sd15.load_engine_model(options)
    else:
        from fixative.engine.model import load_model

        model, built_via = load_model(options), "fixative.engine.model.load_model from the tiny model's folder"
    build_seconds = time.perf_counter() - started
    device = model.device
    memory = memory_after_build(torch, device)
    params = {"unet": sum(p.numel() for p in model.unet.parameters()), "vae": sum(p.numel() for p in model.vae.parameters())}
    dtype_name = str(model.dtype).removeprefix("torch.")
    log(
        f"{label} model built in {build_seconds:.1f} s via {built_via} "
        f"(UNet {params['unet'] / 1e6:.1f}M, VAE {params['vae'] / 1e6:.1f}M params, {dtype_name})"
    )

    rgb = painting(width, height)
    source = source_image(rgb)
    measured = measured_steps(spec, device)
    full_run = measured is None
    # A whole image first, so the measured runs start warm. Cheap at tiny scale (1 step) and on a GPU, where
    # it matters: the first step of a process took 3.3 s (sds) to 8.1 s (advdm) against about 0.06 s warm
    # (H200, bench/README.md "On a GPU"), the kernels' loading and the libraries' setup, which an engine pays
    # once and not per image, as the reference's warm-up step is left out of its figure. On a GPU, 10 steps:
    # both stages, and most of the EOT's branches, each of which loads its own kernels the first time it is
    # drawn. Not at full scale on a CPU, where a warm-up image would cost minutes and the cold step is noise.
    warm_steps = 1 if spec["scale"] == "tiny" else 10 if device.type == "cuda" else 0
    if warm_steps:
        protect_image(source, model, EngineOptions(**{**settings, "steps": warm_steps}))
    steps = options.steps if full_run else timed_run_steps(measured, options)
    seeds = spec.get("seeds") or [options.seed]
    runs = [
        _protect_timed(protect_image, source, model, EngineOptions(**{**settings, "steps": steps, "seed": seed}), label, not full_run)
        for seed in seeds
    ]

    def mean(key: str):
        values = [r[key] for r in runs]
        return None if None in values else sum(values) / len(values)

    from fixative.engine.pgd import coarse_steps

    overhead, coarse = mean("overhead"), coarse_steps(options)
    fine_rate, coarse_rate = mean("seconds_per_fine_step"), (mean("seconds_per_coarse_step") if coarse else 0.0)
    extrapolated = overhead + coarse * coarse_rate + (options.steps - coarse) * fine_rate
    # Per step of a whole image: with coarse to fine, the mean over both stages at the default steps.
    seconds_per_step = (extrapolated - overhead) / options.steps
    report = runs[0]["protected"].report
    result = {
        "kind": "mode",
        "mode": mode,
        "overrides": spec.get("overrides", {}),
        "size": [width, height],
        "device": str(device),
        "dtype": dtype_name,
        "vae_dtype": str(model.vae.dtype).removeprefix("torch."),
        "built_via": built_via,
        "params": params,
        "engine_defaults": settings,
        "build_seconds": round(build_seconds, 2),
        "seeds": seeds,
        "steps_run": steps,
        "steps_measured": runs[0]["timed_steps"],
        "steps_per_image": options.steps,
        "samples_per_step": options.samples_per_step,
        "strength": options.strength,
        "step_size": options.step_size,
        "seconds_per_step": seconds_per_step,
        "coarse_steps_per_image": coarse,
        "seconds_per_coarse_step": coarse_rate if coarse else None,
        "seconds_per_fine_step": fine_rate,
        "seconds_per_step_from": runs[0]["seconds_per_step_from"],
        "cpu_seconds_per_step": mean("cpu_seconds_per_step"),
        "overhead_seconds": overhead,
        "peak_bytes_through_pgd": max((r["peak_bytes_through_pgd"] or 0) for r in runs) or None,
        "seconds_per_image": mean("wall") if full_run else extrapolated,
        "seconds_per_image_extrapolated": extrapolated,
        "per_image_extrapolated": not full_run,
        "working_size": report.get("working_size"),
        "engine_report": report,
        **memory,
        **memory_peak(torch, device),
        "runtime": runtime_info(torch, device),
    }
    log(f"{label} {seconds_per_step:.3f} s/step, overhead {overhead:.2f} s, peak {result['peak_bytes'] / 2**30:.2f} GiB")

    if spec.get("evaluate"):
        from fixative.engine.model import load_model, pick_dtypes

        own = (model.vae.dtype, model.dtype)
        evaluator = model if own == (torch.float32, torch.float32) else load_evaluator(spec, str(device))
        result.update(aggregate([evaluate(evaluator, rgb, read_back_rgb(r["protected"].data)) for r in runs]))
        result["sweep"] = []
        models = {own: model}
        for overrides in spec.get("sweep", []):
            try:
                variant = EngineOptions(**{**settings, **overrides})
                dtype = pick_dtypes(variant.dtype, device) if "dtype" in overrides else own
            except Exception as error:  # e.g. fp16 asked for on a CPU
                result["sweep"].append({"changed": overrides, "error": str(error)})
                continue
            if "dtype" in overrides and dtype == own:
                continue  # the default already resolves to these dtypes here
            if dtype not in models:
                models[dtype] = load_model(variant)
                protect_image(source, models[dtype], EngineOptions(**{**settings, **overrides, "steps": 1}))
            sweep_runs = [
                _protect_timed(protect_image, source, models[dtype], EngineOptions(**{**settings, **overrides, "seed": seed}), label, False)
                for seed in seeds
            ]
            result["sweep"].append(
                {
                    "changed": overrides,
                    "steps": variant.steps,
                    "samples_per_step": variant.samples_per_step,
                    "step_size": variant.step_size,
                    "dtype": _dtype_text(*dtype),
                    "seconds": round(sum(r["wall"] for r in sweep_runs) / len(sweep_runs), 3),
                    **aggregate([evaluate(evaluator, rgb, read_back_rgb(r["protected"].data)) for r in sweep_runs]),
                }
            )
        del models
        gc.collect()
    for run in runs:
        run.pop("protected")
    return result


JOBS = {"train": train_job, "reference": reference_job, "mode": mode_job}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    result = JOBS[spec["job"]](spec)
    Path(sys.argv[2]).write_text(json.dumps(result, default=str))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
