"""The mimicry table: does a mimic's LoRA learn the style less from protected copies than from clean ones?

    python -m bench.mimicry [--style ink] [--seeds 3] [--steps 300]
                            [--modes advdm,mist,sds,encoder] [--after jpeg75] [--json FILE] [--threads 2]

On the measuring model (bench/models/measuring, ``bench.measuring_model``),
the artist is one of :data:`fixative.engine.styles.STYLES`: its 10 training
works are protected by every mode at the engine's defaults and, as a
control, perturbed by random noise of the same budget (every pixel and
channel moved by plus or minus ``strength`` levels, the L-infinity corner
that PGD's sign steps mostly end on). Its held-out works, of other subjects,
are never trained on. Then one LoRA is trained on each training set, and on
each after a platform's pipeline (``engine.publishing``, JPEG q75 by
default), and every LoRA is judged against the originals by
``engine.mimicry.mimicry_check``, the function ``fixative check`` runs. The
table gives each figure divided by the clean LoRA's, mean and standard error
over seeds (of the PGD, the noise and the LoRA: the works are fixed). See
bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import get_args

import numpy as np

from bench.common import machine_info, mean_se, source_image
from fixative.engine.options import EngineOptions, Mode

FIGURES = {  # column title -> (group, key) in a LoRA's figures
    "learned, trained": ("learned", "loss_trained_originals"),
    "learned, held out": ("learned", "loss_held_out_originals"),
    "loss ratio, held out": ("ratio", "loss_held_out_originals"),
    "colour dist ratio": ("ratio", "colour_distance"),
    "style dist ratio": ("ratio", "style_distance"),
}


def style_works(style: str) -> tuple[list[np.ndarray], list[int]]:
    """The artist's works, uint8 HxWx3: its training works, then its held-out works (other subjects); and which are held out."""
    from bench.measuring_model import RESOLUTION
    from fixative.engine.pixels import to_rgb
    from fixative.engine.styles import works

    training, held_out = works(style, RESOLUTION), works(style, RESOLUTION, held_out=True)
    return [to_rgb(x) for x in (*training, *held_out)], list(range(len(training), len(training) + len(held_out)))


def noise_copy(rgb: np.ndarray, strength: int, rng: np.random.Generator) -> np.ndarray:
    """Random noise of the same L-infinity budget: every value moved by +strength or -strength."""
    signs = rng.choice(np.array([-1, 1]), size=rgb.shape)
    return (rgb.astype(np.int16) + strength * signs).clip(0, 255).astype(np.uint8)


def protected_copies(model, images: list[np.ndarray], mode: str, seed: int) -> list[np.ndarray]:
    from fixative.engine.imaging import read_back_rgb
    from fixative.engine.protect import protect_image

    options = EngineOptions(mode=mode, model=model.source, seed=seed, device="cpu")
    return [read_back_rgb(protect_image(source_image(rgb), model, options).data) for rgb in images]


def one_seed(model, style: str, seed: int, modes: list[str], after: list[str], steps: int) -> dict:
    from fixative.engine import mimicry
    from fixative.engine.publishing import serve

    images, held_out = style_works(style)
    training = [i for i in range(len(images)) if i not in held_out]
    strength = EngineOptions().strength
    sets = {"clean": images}
    for mode in modes:
        started = time.perf_counter()
        # Only the training works: the held-out ones never reach a LoRA, so their place keeps the original.
        protected = dict(zip(training, protected_copies(model, [images[i] for i in training], mode, seed)))
        sets[mode] = [protected.get(i, image) for i, image in enumerate(images)]
        log(f"seed {seed}: protected {len(training)} images with {mode} in {time.perf_counter() - started:.0f} s")
    sets[f"noise ±{strength}"] = [noise_copy(rgb, strength, np.random.default_rng([seed, i])) for i, rgb in enumerate(images)]
    for pipeline in after:
        sets.update({f"{name}+{pipeline}": [serve(rgb, pipeline) for rgb in copies] for name, copies in list(sets.items()) if "+" not in name})
    started = time.perf_counter()
    report, _ = mimicry.mimicry_check(mimicry.with_prompt(model, mimicry.DEFAULT_PROMPT), images, sets, steps, seed,
                                      held_out=held_out)
    log(f"seed {seed}: {len(sets)} LoRAs of {steps} steps trained and judged in {time.perf_counter() - started:.0f} s")
    return report


def summarise(reports: list[dict]) -> dict[str, dict[str, tuple[float, float | None]]]:
    """{training set: {column: (mean, standard error)}} over seeds."""
    table = {}
    for name in reports[0]["loras"]:
        row = {}
        for column, (group, key) in FIGURES.items():
            values = [r["loras"][name][group].get(key) for r in reports]
            if None not in values:
                row[column] = mean_se(values)
        table[name] = row
    return table


def against_noise(table: dict, name: str, column: str = "learned, held out") -> str:
    """Whether ``name`` learned less than the noise control of its pipeline by more than twice the combined standard error."""
    suffix = name.partition("+")[2]
    noise = next((row for n, row in table.items() if n.startswith("noise") and n.partition("+")[2] == suffix), None)
    if name.startswith(("clean", "noise")) or noise is None or column not in table[name]:
        return ""
    (mean, se), (noise_mean, noise_se) = table[name][column], noise[column]
    if se is None or noise_se is None:
        return "one seed"
    return "below" if noise_mean - mean > 2 * (se**2 + noise_se**2) ** 0.5 else "within noise"


def print_table(table: dict, reports: list[dict]) -> None:
    columns = list(FIGURES)
    print("| LoRA trained on | " + " | ".join(columns) + " | held-out learning vs noise control |")
    print("|---" * (len(columns) + 2) + "|")
    for name, row in table.items():
        cells = []
        for column in columns:
            if column not in row:
                cells.append("-")
                continue
            mean, se = row[column]
            percent = column.startswith("learned")
            scale, unit = (100, "%") if percent else (1, "")
            text = f"{scale * mean:.0f}{unit}" if percent else f"{mean:.3f}"
            if se is not None:
                text += f" ± {scale * se:.0f}{unit}" if percent else f" ± {se:.3f}"
            cells.append(text)
        print(f"| {name} | " + " | ".join(cells) + f" | {against_noise(table, name)} |")
    base = [r["base"]["loss_trained_originals"] for r in reports]
    clean = [r["loras"]["clean"]["loss_trained_originals"] for r in reports]
    drop = [100 * (b - c) / b for b, c in zip(base, clean)]
    print(f"\nthe clean LoRA lowered the loss on its training works by {np.mean(drop):.1f}% "
          f"(per seed: {', '.join(f'{d:.1f}%' for d in drop)}) against the base model")


def log(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--style", default="ink", help="the measuring model's artist style (engine.styles.STYLES)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds: PGD, noise and LoRA (default 3)")
    parser.add_argument("--steps", type=int, default=300, help="LoRA training steps (default 300)")
    parser.add_argument("--modes", default=",".join(get_args(Mode)), help="protection modes, comma-separated")
    parser.add_argument("--after", default="jpeg75", help="serving pipelines, comma-separated ('' for none)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--json", type=Path, help="write every seed's full report here")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from fixative.engine.model import load_model

    from bench.measuring_model import OUT

    model = load_model(EngineOptions(model=str(OUT), device="cpu"), generation=True)
    modes = [m for m in args.modes.split(",") if m]
    after = [p for p in args.after.split(",") if p]
    started = time.perf_counter()
    reports = [one_seed(model, args.style, seed, modes, after, args.steps) for seed in range(args.seeds)]
    table = summarise(reports)
    print(f"mimicry, measuring model, the {args.style} style: {len(reports[0]['held_out'])} of {reports[0]['originals']} works held out, "
          f"{args.steps} LoRA steps, {args.seeds} seeds; "
          f"ratios against the clean LoRA, mean ± standard error over seeds")
    print_table(table, reports)
    if args.json:
        args.json.write_text(json.dumps(
            {"machine": machine_info(), "seconds": round(time.perf_counter() - started), "args": vars(args) | {"json": str(args.json)},
             "table": table, "reports": reports},
            indent=2, default=str,
        ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
