#!/usr/bin/env python
"""The step-schedule table: protection against PGD steps, for fixed sign steps and the schedules tried.

    python bench/schedule.py [--seeds 3] [--steps 25,50,100] [--rules fixed,linear,cosine,apgd,momentum]
                             [--mode sds] [--strength 8] [--no-robust] [--json FILE]

Issue 10, item 1: can a schedule give the 100-step protection in fewer steps?
For each update rule, step count, seed and test image of bench/robustness.py,
the engine protects the image (``fixative.engine.protect.protect_image``: by default
the default mode, ``robust`` on, strength 8) with the rule as its PGD loop, and reads the saved file's protection gain from the report, before and
after Pillow's JPEG q75 (``engine.metrics.served_figures``, as every report
does). The rules, all in the same L-infinity ball from the same random start:

- ``fixed``: sign steps of ``step_size`` levels (1): the engine's loop
  (``fixative.engine.pgd.run_pgd``) with its momentum off, as it was before issue 10;
- ``momentum``: the engine's loop as it is, MI-FGSM (Dong et al., "Boosting
  Adversarial Attacks with Momentum", CVPR 2018, Algorithm 1): the sign of an
  accumulated, L1-normalised gradient, decay 0.9, sign steps of ``step_size``;
- ``linear`` / ``cosine``: sign steps decaying from strength/2 levels to
  ``step_size``, linearly or along half a cosine;
- ``apgd``: Auto-PGD (Croce & Hein, "Reliable evaluation of adversarial
  robustness with an ensemble of diverse parameter-free attacks", ICML 2020,
  Algorithm 1): first step 2 x strength, momentum 0.75, the step halved at
  checkpoints where fewer than 75% of the steps since the last one raised the
  loss (or the best loss and the step both stood still), restarting from the
  best point; the best point is returned.

Coarse to fine (which came later) is off, so each rule is the whole loop.
Runs on the tests' tiny trained model with one thread; judges protection, not
speed (every rule costs the same per step). Means ± standard error over seeds x
images. bench/README.md ("Step schedule") has the results.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from robustness import IMAGES, mean_se, test_image  # noqa: E402

APGD_MOMENTUM = 0.75  # Croce & Hein's alpha
APGD_RHO = 0.75


def _start(x_work, eps, generators):
    """The engine's random start (same draw, so every rule starts where the engine does)."""
    from fixative.engine.pgd import random_start

    return random_start(x_work, eps, generators)


def _gradient(attack, x_work, delta, geometries, transforms, generators):
    """(gradient of the objective, loss) at ``delta``, through one draw of the publishing pipeline.

    For one image: the rules below run in the engine's place (engine.pgd.run_pgd's
    arguments, a list entry per image), one image at a time.
    """
    import torch

    from fixative.engine.pgd import perturbed

    delta = delta.detach().requires_grad_(True)
    objective, loss = attack(perturbed(x_work, delta, geometries, transforms, generators), generators)
    (gradient,) = torch.autograd.grad(objective.sum(), delta)
    return gradient, float(loss.mean())


def decaying(shape: str):
    """Sign steps whose size decays from strength/2 levels to ``alpha`` (linear or half-cosine)."""

    def run(attack, x_work, geometries, eps, alpha, steps, generators, progress=None, transforms=None):
        delta = _start(x_work, eps, generators)
        sign = 1.0 if attack.maximize else -1.0
        first = max(eps / 2, alpha)
        for step in range(steps):
            fraction = step / max(steps - 1, 1)
            weight = 1 - fraction if shape == "linear" else (1 + math.cos(math.pi * fraction)) / 2
            size = alpha + (first - alpha) * weight
            gradient, _ = _gradient(attack, x_work, delta, geometries, transforms, generators)
            delta = (delta + sign * size * gradient.sign()).clamp_(-eps, eps)
        return delta

    return run


def apgd_checkpoints(steps: int) -> set[int]:
    """Croce & Hein's checkpoints w_j = ceil(p_j N): p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return {math.ceil(q * steps) for q in p[1:] if math.ceil(q * steps) < steps}


def apgd(attack, x_work, geometries, eps, alpha, steps, generators, progress=None, transforms=None):
    delta = _start(x_work, eps, generators)
    sign = 1.0 if attack.maximize else -1.0
    size = 2 * eps
    checkpoints = apgd_checkpoints(steps)
    previous = delta
    best = last = -math.inf
    raised = since = 0
    size_then, best_then = size, best
    for step in range(steps):
        gradient, loss = _gradient(attack, x_work, delta, geometries, transforms, generators)
        value = sign * loss
        raised, since, last = raised + (value > last), since + 1, value
        if value > best:
            best, best_delta, best_gradient = value, delta.clone(), gradient
        if step in checkpoints:
            if raised < APGD_RHO * since or (size == size_then and best == best_then):
                size /= 2
                delta, previous, gradient = best_delta.clone(), best_delta.clone(), best_gradient
            raised, since, size_then, best_then = 0, 0, size, best
        z = (delta + sign * size * gradient.sign()).clamp(-eps, eps)
        momentum_term = (1 - APGD_MOMENTUM) * (delta - previous) if step > 0 else 0
        delta, previous = (delta + APGD_MOMENTUM * (z - delta) + momentum_term).clamp_(-eps, eps), delta
        if step == 0:
            delta = z  # the first step is a plain one
    # Croce & Hein return the best point seen (the last iterate's loss is never evaluated: that would cost a step).
    return best_delta


def rule(name: str):
    """(the PGD loop, the engine's momentum decay) for a rule: fixed and momentum are the engine's own loop."""
    from fixative.engine.pgd import MOMENTUM, run_pgd

    return {
        "fixed": (run_pgd, 0.0),
        "momentum": (run_pgd, MOMENTUM),
        "linear": (decaying("linear"), 0.0),
        "cosine": (decaying("cosine"), 0.0),
        "apgd": (apgd, 0.0),
    }[name]


def tiny_engine_model():
    """The tests' tiny trained model, loaded as the engine loads it (fp32, one thread): (model, folder)."""
    import torch

    from fixative.engine.model import load_model
    from fixative.engine.options import EngineOptions
    from run import tiny_model

    torch.set_num_threads(1)
    folder, _ = tiny_model(threads=1)
    return load_model(EngineOptions(model=str(folder), device="cpu", dtype="fp32")), folder


def gain_runs(model, label: str, options: dict, seeds: int, started: float, loop=None, **constants) -> list[dict]:
    """Protect every test image with each seed; the report's gain before and after JPEG q75, per run.

    ``loop`` replaces the engine's PGD loop, and ``constants`` (``MOMENTUM=0.0``)
    those of ``fixative.engine.pgd``, for these runs only.
    """
    import fixative.engine.pgd
    import fixative.engine.protect
    from fixative.engine.options import EngineOptions

    engines = fixative.engine.protect.run_pgd, {name: getattr(fixative.engine.pgd, name) for name in constants}
    fixative.engine.protect.run_pgd = loop or engines[0]
    for name, value in constants.items():
        setattr(fixative.engine.pgd, name, value)
    runs = []
    try:
        for seed in range(seeds):
            for family, image_seed, side in IMAGES:
                settings = EngineOptions(device="cpu", dtype="fp32", seed=seed, **options)
                report = fixative.engine.protect.protect_image(test_image(family, image_seed, side), model, settings).report
                runs.append({"image": f"{family}{image_seed}@{side}", "seed": seed,
                             "gain": report["protection_gain"],
                             "jpeg75": report["survival"]["jpeg75"]["protection_gain"],
                             "psnr": report["psnr"], "seconds_per_step": report["seconds_per_step"]})
                print(f"[{time.perf_counter() - started:6.0f} s] {label} seed {seed} "
                      f"{runs[-1]['image']}: gain {runs[-1]['gain']:.4f}, after jpeg75 {runs[-1]['jpeg75']:.4f}",
                      flush=True)
    finally:
        fixative.engine.protect.run_pgd = engines[0]
        for name, value in engines[1].items():
            setattr(fixative.engine.pgd, name, value)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", default="25,50,100")
    parser.add_argument("--rules", default="fixed,linear,cosine,apgd,momentum")
    parser.add_argument("--mode", default="sds")
    parser.add_argument("--strength", type=int, default=8)
    parser.add_argument("--robust", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    model, folder = tiny_engine_model()
    rows: dict[tuple[str, int], list[dict]] = {}
    started = time.perf_counter()
    for name in args.rules.split(","):
        loop, momentum = rule(name)
        for steps in map(int, args.steps.split(",")):
            # Coarse to fine off: each rule is the whole loop, at the working size, as when this table was made.
            options = dict(model=str(folder), steps=steps, mode=args.mode, robust=args.robust, strength=args.strength,
                           coarse_to_fine=False)
            rows[(name, steps)] = gain_runs(model, f"{name} {steps} steps", options, args.seeds, started, loop, MOMENTUM=momentum)
    print_table(rows, f"mode {args.mode}, robust {'on' if args.robust else 'off'}, strength {args.strength}, {args.seeds} seeds")
    if args.json:
        args.json.write_text(json.dumps([{"rule": r, "steps": s, "runs": runs} for (r, s), runs in rows.items()], indent=2))
    return 0


def print_table(rows: dict[tuple, list[dict]], title: str, columns: tuple[str, ...] = ("rule", "steps")) -> None:
    """Gains as (gain - 1) x 1000 (the effect is a fraction of a percent), mean ± s.e. over seeds x images."""
    print(f"\nProtection gain - 1, x 1000, mean ± s.e. over seeds x images ({title}):\n")
    print("| " + " | ".join(columns) + " | PNG | after JPEG q75 | PSNR dB |")
    print("|---" * (len(columns) + 3) + "|")
    for key, runs in rows.items():
        png = mean_se([1000 * (r["gain"] - 1) for r in runs])
        jpeg = mean_se([1000 * (r["jpeg75"] - 1) for r in runs])
        psnr = sum(r["psnr"] for r in runs) / len(runs)
        print("| " + " | ".join(map(str, key)) + f" | {png[0]:.2f} ± {png[1]:.2f} | {jpeg[0]:.2f} ± {jpeg[1]:.2f} | {psnr:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
