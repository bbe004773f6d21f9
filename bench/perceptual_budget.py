"""The perceptual-budget table: how visible each budget's perturbation is, and how much protection it keeps after JPEG.

    python -m bench.perceptual_budget [--model measuring|tiny] [--images ink,astronaut,coffee,colorwheel]
                                      [--perceptual-strengths 8] [--steps N] [--threads 1] [--json FILE]

Each image is protected by ``engine.protect.protect_image`` at the engine's
defaults, once with the uniform budget at the default strength and once with
the perceptual budget (``engine.budget``) at each of ``--perceptual-strengths``
(to find the strength at which it matches the uniform budget's protection, if
it loses some at the default). Visibility is measured on the saved file
against the original: PSNR and SSIM (skimage.metrics), and the colour change
on flat areas (``engine.metrics.flat_chroma_change``). Protection is the
report's own: protection gain on the PNG and after Pillow's JPEG q75, and the
survival after it.

The images, 128 px on the short side (the measuring model's training size):
``ink`` is the first of the measuring model's ink-style works
(``engine.styles.works``: black strokes on flat white), the others real
photographs from ``skimage.data`` (``engine.photos``), ``colorwheel`` being
flat colour, the picture flat-colour illustration is most like. bench/README.md
("Perceptual budget") has the results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import machine_info, mean_se, tiny_engine_model

IMAGES = ("ink", "astronaut", "coffee", "colorwheel")
SIDE = 128


def bench_image(name: str) -> np.ndarray:
    """``name`` as uint8 RGB, short side SIDE: an ink-style work, or a photograph downscaled with Lanczos."""
    from PIL import Image

    from fixative.engine.photos import photo
    from fixative.engine.pixels import to_rgb
    from fixative.engine.styles import works

    if name == "ink":
        return to_rgb(works("ink", SIDE, count=1)[0])
    picture = Image.fromarray(photo(name))
    scale = SIDE / min(picture.size)
    return np.array(picture.resize((round(picture.width * scale), round(picture.height * scale)), Image.LANCZOS))


def measured(model, rgb: np.ndarray, options) -> dict:
    """Protect ``rgb``; the saved file's visibility figures and the report's protection figures."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from fixative.engine.imaging import SourceImage, read_back_rgb
    from fixative.engine.metrics import flat_chroma_change
    from fixative.engine.protect import protect_image

    protected = protect_image(SourceImage.from_rgb(rgb), model, options)
    saved = read_back_rgb(protected.data)
    jpeg = protected.report["survival"]["jpeg75"]
    return {
        "budget": options.budget,
        "strength": options.strength,
        "psnr": float(peak_signal_noise_ratio(rgb, saved, data_range=255)),
        "ssim": float(structural_similarity(rgb, saved, channel_axis=2, data_range=255)),
        "flat_chroma": flat_chroma_change(rgb, saved),
        "max_delta": protected.report["max_delta"],
        "gain": protected.report["protection_gain"],
        "gain_jpeg75": jpeg["protection_gain"],
        "survival_jpeg75": jpeg["survival"],
        "seconds": protected.report["seconds"],
    }


def cell(values: list[float | None], digits: int) -> str:
    known = [value for value in values if value is not None]
    if not known:
        return "n/a"
    mean, se = mean_se(known)
    return f"{mean:.{digits}f}" if se is None else f"{mean:.{digits}f} ± {se:.{digits}f}"


COLUMNS = (("psnr", "PSNR dB", 1), ("ssim", "SSIM", 3), ("flat_chroma", "flat |ΔCb|+|ΔCr|", 2),
           ("gain", "gain", 4), ("gain_jpeg75", "gain after jpeg75", 4), ("survival_jpeg75", "survival jpeg75", 2))


def print_tables(runs: list[dict]) -> None:
    settings = list(dict.fromkeys((run["budget"], run["strength"]) for run in runs))
    header = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    print("\nPer image:\n")
    print("| image | budget | strength " + header)
    print("|---|---|---|" + "---|" * len(COLUMNS))
    for run in runs:
        figures = " | ".join("n/a" if run[key] is None else f"{run[key]:.{digits}f}" for key, _, digits in COLUMNS)
        print(f"| {run['image']} | {run['budget']} | {run['strength']} | {figures} |")
    print("\nMean ± standard error over the images:\n")
    print("| budget | strength " + header)
    print("|---|---|" + "---|" * len(COLUMNS))
    for budget, strength in settings:
        rows = [run for run in runs if (run["budget"], run["strength"]) == (budget, strength)]
        print(f"| {budget} | {strength} | " + " | ".join(cell([r[key] for r in rows], digits) for key, _, digits in COLUMNS) + " |")
    print("\nPaired with the uniform budget, image by image (perceptual - uniform), mean ± standard error:\n")
    print("| strength | Δ gain after jpeg75 | Δ gain | Δ flat chroma | Δ PSNR dB |")
    print("|---|---|---|---|---|")
    uniform = {run["image"]: run for run in runs if run["budget"] == "uniform"}
    for budget, strength in settings:
        if budget == "uniform":
            continue
        rows = [run for run in runs if (run["budget"], run["strength"]) == (budget, strength)]
        differences = [cell([r[key] - uniform[r["image"]][key] for r in rows], digits)
                       for key, digits in (("gain_jpeg75", 4), ("gain", 4), ("flat_chroma", 2), ("psnr", 1))]
        print(f"| {strength} | " + " | ".join(differences) + " |")


def load(which: str, threads: int):
    import torch

    from fixative.engine.model import load_model
    from fixative.engine.options import EngineOptions

    from bench.measuring_model import OUT

    if which == "tiny":
        return tiny_engine_model(threads=threads)
    torch.set_num_threads(threads)
    return load_model(EngineOptions(model=str(OUT), device="cpu")), OUT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("measuring", "tiny"), default="measuring")
    parser.add_argument("--images", default=",".join(IMAGES))
    parser.add_argument("--perceptual-strengths", default=None, help="comma-separated levels (default: the default strength)")
    parser.add_argument("--steps", type=int, default=None, help="PGD steps (default: the engine's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from fixative.engine.options import EngineOptions

    model, folder = load(args.model, args.threads)
    base = EngineOptions(model=str(folder), device="cpu", **({"steps": args.steps} if args.steps else {}))
    strengths = [int(s) for s in args.perceptual_strengths.split(",")] if args.perceptual_strengths else [base.strength]
    settings = [("uniform", base.strength)] + [("perceptual", strength) for strength in strengths]
    runs = []
    started = time.perf_counter()
    for name in args.images.split(","):
        rgb = bench_image(name)
        for budget, strength in settings:
            options = base.model_copy(update={"budget": budget, "strength": strength})
            runs.append({"image": name, **measured(model, rgb, options)})
            print(f"[{time.perf_counter() - started:6.0f} s] {name} {budget} {strength}: PSNR {runs[-1]['psnr']:.1f} dB, "
                  f"flat chroma {runs[-1]['flat_chroma']:.2f}, gain {runs[-1]['gain']:.4f}, "
                  f"after jpeg75 {runs[-1]['gain_jpeg75']:.4f}", flush=True)
    print(f"\nperceptual budget, {args.model} model, {base.mode} mode, {base.steps} steps, {SIDE} px")
    print_tables(runs)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_info(), "args": vars(args) | {"json": str(args.json)},
                                         "runs": runs}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
