#!/usr/bin/env python
"""Coarse to fine, and reusing the encoder's forward pass: protection on the tiny model, cost at full scale.

    python bench/levers.py gain [--seeds 3] [--variants fine,coarse25,coarse50,coarse75,reuse2,reuse4,fine@50] [--json FILE]
    python bench/levers.py cost [--size 512] [--steps 4] [--rounds 2] [--threads 1] [--variants fine,coarse50,reuse2,reference]

Issue 10, items 2 and 3. Each variant protects through
``fixative.engine.protect.protect_image`` (the default mode ``sds``, ``robust``
on unless ``--no-robust``, strength 8, 100 steps, momentum as in the engine):

- ``fine``: ``coarse_to_fine`` off: every step at the working size;
- ``coarseN``: the engine's coarse to fine with ``engine.pgd.COARSE_SHARE`` set
  to N%: the first N% of the steps at half the working side (a quarter of the
  pixels, so of the encoder's and the UNet's work), optimising what a
  fine-tuner training at that size would see; the perturbation is then
  upsampled (bilinear: it stays in the ball) and the rest of the steps refine
  it at the working size;
- ``reuseK`` (coarse to fine off; this loop replaces the engine's): the VAE encoder runs forward (with its graph kept) every K
  steps; the steps in between take only its backward, through the kept graph,
  of a fresh (t, noise, posterior noise) draw's score-distillation gradient.
  Those steps see the latent, and the publishing-pipeline draw, of the step
  that encoded: the gradient is up to K-1 steps stale, and K steps share one EOT draw;
- ``NAME@S``: a variant at S steps instead of 100 (``fine@50``), for comparisons at equal cost.

``gain`` runs bench/schedule.py's protocol (3 seeds x the 3 test images of
bench/robustness.py, the report's gain of the saved PNG and after Pillow's
JPEG q75) on the tests' tiny model, one thread. ``cost`` times the steps at
full SD-1.5 scale (bench/sd15.py, random weights, the engine's dtypes),
alternating the variants round by round after a warm-up of each, and
extrapolates PGD seconds per image for the default step count; the variant
``reference`` also times bench/reference.py's AdvDM steps (fp32 VAE, sharing
the engine's fp32 UNet), so that the per-step ratio to the reference comes
from one process, alternating, whatever the load does. Results:
bench/README.md, "Coarse to fine, and reusing the encoder".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from schedule import gain_runs, print_table, tiny_engine_model  # noqa: E402

VARIANTS = "fine,coarse25,coarse50,coarse75,reuse2,reuse4"


def reusing(every: int):
    """The sds attack's loop for one image, with the encoder's forward run every ``every`` steps (its graph kept in between).

    It takes engine.pgd.run_pgd's arguments (a list entry per image) and runs in its place.
    """

    def run(attack, x_work, geometries, eps, alpha, steps, generators, progress=None, transforms=None, start=None):
        import torch

        from fixative.engine.attacks.sds import SDS
        from fixative.engine.diffusion import denoiser_residual, draw_timesteps_and_noise, encode, latent_noise
        from fixative.engine.pgd import perturbed, random_start, sign_step

        if not isinstance(attack, SDS):
            raise SystemExit("reuseK is written for the sds attack")
        model = attack.model
        delta = random_start(x_work, eps, generators) if start is None else start
        direction = 1.0 if attack.maximize else -1.0
        accumulated = torch.zeros_like(delta)
        for step in range(steps):
            if step % every == 0:
                leaf = delta.detach().requires_grad_(True)
                mean, std = encode(model, perturbed(x_work, leaf, geometries, transforms, generators))
            # The same draws, in the same order, as the SDS attack's: reuse1 is the engine's loop.
            noise = latent_noise(mean, generators)
            z = (mean + std * noise).detach()
            t, eps_draw = draw_timesteps_and_noise(model, z, attack.samples, generators)
            with torch.no_grad():
                residual = denoiser_residual(model, z, t, eps_draw).mean(dim=0, keepdim=True)
            last_of_graph = step % every == every - 1 or step == steps - 1
            (gradient,) = torch.autograd.grad(
                [mean, std], leaf, grad_outputs=[residual, residual * noise], retain_graph=not last_of_graph
            )
            with torch.no_grad():
                delta, accumulated = sign_step(delta, accumulated, gradient, direction, alpha, eps)
            if progress is not None:
                progress(step + 1, steps, float(residual.square().mean()))
        return delta.detach()

    return run


def variant(name: str) -> tuple[dict, object, dict]:
    """(EngineOptions overrides, PGD loop or None for the engine's, fixative.engine.pgd constants) for a variant."""
    if name == "fine":
        return {"coarse_to_fine": False}, None, {}
    if name.startswith("coarse"):
        return {"coarse_to_fine": True}, None, {"COARSE_SHARE": int(name.removeprefix("coarse")) / 100}
    if name.startswith("reuse"):
        return {"coarse_to_fine": False}, reusing(int(name.removeprefix("reuse"))), {}
    raise SystemExit(f"unknown variant {name!r}")


def gain(args) -> None:
    model, folder = tiny_engine_model()
    rows, started = {}, time.perf_counter()
    for label in args.variants.split(","):
        name, _, steps = label.partition("@")  # fine@50: the variant at 50 steps, for equal-cost comparisons
        overrides, loop, constants = variant(name)
        options = dict(model=str(folder), steps=int(steps or args.pgd_steps), robust=args.robust, **overrides)
        rows[(label,)] = gain_runs(model, label, options, args.seeds, started, loop, **constants)
    robust = "on" if args.robust else "off"
    print_table(rows, f"sds, robust {robust}, strength 8, {args.pgd_steps} steps, {args.seeds} seeds", ("variant",))
    if args.json:
        args.json.write_text(json.dumps([{"variant": key[0], "runs": runs} for key, runs in rows.items()], indent=2))


def cost(args) -> None:
    import torch

    from fixative.engine.attacks import ATTACKS
    from fixative.engine.geometry import Geometry
    from fixative.engine.options import EngineOptions
    from fixative.engine.pgd import run_pgd
    from fixative.engine.transforms import PublishingTransform
    import reference
    import sd15
    from reference import ReferenceModel
    from sd15 import load_engine_model

    torch.set_num_threads(args.threads)
    options = EngineOptions(device="cpu")
    model, _ = load_engine_model(options)
    geometry = Geometry.plan(args.size, args.size, model.resolution, model.size_multiple)
    coarse = geometry.halved(model.size_multiple)
    x = torch.rand(1, 3, *geometry.work) * 2 - 1
    attack = ATTACKS[options.mode](model, options, (1, 3, *geometry.padded))
    eps, alpha = 2 * options.strength / 255, 2 * options.step_size / 255
    # What is timed: steps at the working size ("fine", which is also reuse1), at half the side
    # ("half"), the reusing loops at the working size, and the reference AdvDM loop's steps.
    names = args.variants.split(",")
    timed = ["fine", "half"] + [n for n in names if n.startswith("reuse") and n != "reuse1"] + [n for n in names if n == "reference"]
    if "reference" in timed:
        reference_model = ReferenceModel(
            vae=sd15.build_vae(model.device, torch.float32).eval().requires_grad_(False),
            unet=model.unet,  # the engine's is fp32 too, with the same weights: shared, to spare 3.4 GB
            context=model.text_embedding,
            alphas_cumprod=model.alphas_cumprod,
            scaling_factor=model.scaling_factor,
        )

    def seconds_per_step(name: str, steps: int) -> float:
        transforms = [PublishingTransform(options.seed)] if options.robust else None
        generators = [torch.Generator().manual_seed(options.seed)]
        started = time.perf_counter()
        if name == "reference":
            reference.protect(reference_model, geometry.pad(x), steps, eps, alpha, options.seed)
        else:
            loop = run_pgd if name in ("fine", "half") else variant(name)[1]
            where, x_in = (coarse, coarse.down(x)) if name == "half" else (geometry, x)
            loop(attack, x_in, [where], eps, alpha, steps, generators, None, transforms)
        return (time.perf_counter() - started) / steps

    print(f"{args.size}x{args.size} (half: {coarse.work[1]}x{coarse.work[0]}), mode {options.mode}, robust {options.robust}, "
          f"UNet {model.dtype}, VAE {model.vae.dtype}, {args.threads} threads: warming up", flush=True)
    for name in timed:
        seconds_per_step(name, 1)
    times: dict[str, list[float]] = {name: [] for name in timed}
    for round_ in range(args.rounds):
        for name in timed:
            times[name].append(seconds_per_step(name, args.steps))
            print(f"round {round_ + 1}: {name} {times[name][-1]:.2f} s/step", flush=True)
    per_step = {name: statistics.fmean(values) for name, values in times.items()}
    fine, steps = per_step["fine"], options.steps
    print(f"\nPGD seconds per image ({steps} steps), {args.size}x{args.size}, extrapolated from the s/step above:\n")
    print("| variant | s/step (mean of rounds) | PGD s/image | vs fine |")
    print("|---|---|---|---|")
    for name in names:
        if name == "reference":
            continue
        if name == "fine" or name == "reuse1":
            seconds = steps * fine
        elif name.startswith("coarse"):
            coarse_steps = round(int(name.removeprefix("coarse")) / 100 * steps)
            seconds = coarse_steps * per_step["half"] + (steps - coarse_steps) * fine
        else:
            seconds = steps * per_step[name]
        print(f"| {name} | {seconds / steps:.2f} | {seconds:.0f} | {seconds / (steps * fine):.2f}x |")
    print(f"half-side step: {per_step['half']:.2f} s, {per_step['half'] / fine:.2f}x a working-size step")
    if "reference" in per_step:
        print(f"reference AdvDM step: {per_step['reference']:.2f} s; a working-size sds step is "
              f"{per_step['reference'] / fine:.2f}x faster, a half-side one {per_step['reference'] / per_step['half']:.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("gain", "cost"))
    parser.add_argument("--variants", default=VARIANTS)
    parser.add_argument("--seeds", type=int, default=3, help="gain: PGD seeds")
    parser.add_argument("--pgd-steps", type=int, default=100, help="gain: PGD steps per image")
    parser.add_argument("--json", type=Path, help="gain: write every run here")
    parser.add_argument("--robust", action=argparse.BooleanOptionalAction, default=True, help="gain: robust on or off")
    parser.add_argument("--size", type=int, default=512, help="cost: square side in pixels")
    parser.add_argument("--steps", type=int, default=4, help="cost: timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=2, help="cost: rounds of alternation")
    parser.add_argument("--threads", type=int, default=1, help="cost: torch threads")
    args = parser.parse_args(argv)
    gain(args) if args.what == "gain" else cost(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
