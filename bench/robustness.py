"""The robustness table: what each mode's protection keeps after the ways a published image is served.

    python -m bench.robustness [--seeds 3] [--steps 100] [--modes sds,advdm,mist,encoder] [--json FILE]

For each mode, with ``robust`` on and off, each seed and each test image, the
engine protects the image (``engine.protect.protect_image`` at the engine's
defaults, but for ``mode``, ``robust``, ``seed`` and ``steps``), and the saved
file is measured after every pipeline of ``engine.publishing`` (Pillow's real
JPEG, a Lanczos downscale, noise, blur, a noisy-upscaling stand-in) by
``engine.metrics.served_figures``: the very figures the per-image report
gives. The original goes through the same pipeline, so each figure is the
perturbation's effect on what a fine-tuner would train on.

It runs on the tests' tiny trained model (random SD-1.5 weights cannot tell a
good perturbation from a bad one), in one process with one thread: it judges
protection, not speed (bench/run.py measures the cost of a robust step).
Means ± standard error over seeds x images. bench/README.md ("Robustness")
has the results and what they can and cannot show.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from bench.common import IMAGES, mean_se, test_image, tiny_engine_model

MODES = ("sds", "advdm", "mist", "encoder")


def served_row(model, source, options) -> dict:
    """Protect ``source``; return the effect figure before and after every pipeline, and the survivals."""
    from fixative.engine.geometry import Geometry
    from fixative.engine.imaging import read_back_rgb
    from fixative.engine.metrics import effect_figure, served_figures
    from fixative.engine.protect import protect_image
    from fixative.engine.publishing import PIPELINES

    protected = protect_image(source, model, options)
    saved = read_back_rgb(protected.data)
    geometry = Geometry.plan(*source.rgb.shape[:2], model.resolution, model.size_multiple)
    figure = effect_figure(options)
    before = {key: protected.report[key] for key in ("protection_gain", "latent_shift")}
    served = served_figures(model, geometry, source.rgb, saved, before, figure, tuple(PIPELINES))
    return {
        "figure": figure,
        "none": before[figure],
        **{name: values[figure] for name, values in served.items()},
        "survival": {name: values["survival"] for name, values in served.items()},
        "psnr": protected.report["psnr"],
    }


def cell(values: list[float | None], percent: bool = False) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "n/a"
    mean, se = mean_se(known)
    se = se or 0.0
    return f"{mean:.0%} ± {se:.0%}" if percent else f"{mean:.3f} ± {se:.3f}"


def print_tables(rows: dict[tuple[str, bool], list[dict]]) -> None:
    from fixative.engine.publishing import PIPELINES

    columns = ("none", *PIPELINES)
    print("\nEffect after each pipeline (protection gain; latent shift for mist and encoder), mean ± s.e.:\n")
    print("| mode | robust | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for (mode, robust), runs in rows.items():
        print(f"| {mode} | {'on' if robust else 'off'} | " + " | ".join(cell([r[c] for r in runs]) for c in columns) + " |")
    print("\nSurvival = (gain after - 1) / (gain before - 1) (latent shifts' ratio for mist and encoder), mean ± s.e.:\n")
    print("| mode | robust | PSNR dB | " + " | ".join(PIPELINES) + " |")
    print("|---|---|---|" + "---|" * len(PIPELINES))
    for (mode, robust), runs in rows.items():
        survivals = " | ".join(cell([r["survival"][p] for r in runs], percent=True) for p in PIPELINES)
        print(f"| {mode} | {'on' if robust else 'off'} | {statistics.fmean(r['psnr'] for r in runs):.1f} | {survivals} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="PGD steps (default: the engine's)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--dtype", default="fp32", help="the model's precision while protecting (the figures are the same model's)")
    args = parser.parse_args(argv)

    from fixative.engine.options import EngineOptions

    model, folder = tiny_engine_model(args.dtype)
    steps = {"steps": args.steps} if args.steps else {}
    rows: dict[tuple[str, bool], list[dict]] = {}
    started = time.perf_counter()
    for mode in args.modes.split(","):
        for robust in (False, True):
            runs = rows.setdefault((mode, robust), [])
            for seed in range(args.seeds):
                for family, image_seed, side in IMAGES:
                    options = EngineOptions(model=str(folder), device="cpu", dtype=args.dtype, mode=mode,
                                            robust=robust, seed=seed, **steps)
                    image = f"{family}{image_seed}@{side}"
                    runs.append({"image": image, "seed": seed,
                                 **served_row(model, test_image(family, image_seed, side), options)})
                    print(f"[{time.perf_counter() - started:6.0f} s] {mode} robust={robust} seed {seed} "
                          f"{image}: {runs[-1]['figure']} {runs[-1]['none']:.4f}, "
                          f"after jpeg75 {runs[-1]['jpeg75']:.4f}", flush=True)
    print_tables(rows)
    if args.json:
        args.json.write_text(json.dumps([{"mode": m, "robust": r, "runs": runs} for (m, r), runs in rows.items()], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
