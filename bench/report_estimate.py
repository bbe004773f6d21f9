"""How far the report's protection gain is from the value it estimates, for a few ways of drawing its samples.

    python -m bench.report_estimate [--draws 30] [--truth 1024]

The report's gain (``engine.metrics.protection_figures``) is a ratio of two
mean diffusion losses over a few (t, eps, posterior noise) samples. Each image
is protected once at the engine's defaults (tiny model, seed 0, the three
test images of bench/common.py); then, for its saved PNG and its copy
after Pillow's JPEG q75 (with the original served alike), the gain is
estimated ``--draws`` times with fresh samples by each estimator, and compared
with a "truth" from ``--truth`` uniform samples, each with its own posterior
noise. The figure is the root-mean-square error of gain - 1, x 1000.

Estimators:
- ``uniform16-shared``: 16 uniform timesteps, one posterior noise shared by
  all samples (the baseline: one shared noise, which no number of samples averages out);
- ``stratifiedN``: one timestep drawn in each of N equal slices of [0, T),
  each sample with its own posterior noise (``engine.metrics.gain_samples``,
  the report's, with N = GAIN_SAMPLES). The bench checks that its own
  stratified8 estimate equals the engine's figure on the same draws.

Last, the engine's figure with the model in bf16 (what ``dtype = "auto"``
gives the default mode on a CPU with native bf16) against fp32, on the same
images: the difference should be far below the estimator's error.
bench/README.md ("The report's cost") has the results.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from bench.common import IMAGES, test_image, tiny_engine_model

ESTIMATORS = ("uniform16-shared", "stratified4", "stratified8", "stratified16")


def draws(model, like, name: str, generator):
    """(t, eps, posterior noise) for an estimator named in ESTIMATORS, or ``uniformN`` for the truth."""
    import torch

    from fixative.engine.metrics import GAIN_SAMPLES, gain_samples

    total = model.num_train_timesteps
    if name == f"stratified{GAIN_SAMPLES}":
        return gain_samples(model, like, generator)
    count = int(name.removeprefix("uniform").removeprefix("stratified").removesuffix("-shared"))
    if name.startswith("stratified"):
        t = ((torch.arange(count) + torch.rand(count, generator=generator)) * total / count).long().clamp_max(total - 1)
    else:
        t = torch.randint(0, total, (count,), generator=generator)
    eps = torch.randn((count, *like.shape[1:]), generator=generator)
    noise = torch.randn((1 if name.endswith("-shared") else count, *like.shape[1:]), generator=generator)
    return t, eps, noise


def gain_minus_one(model, original, protected, t, eps, noise) -> float:
    """(gain - 1) over the given samples, by the engine's own loss (engine.metrics.mean_losses)."""
    import torch

    from fixative.engine.diffusion import encode
    from fixative.engine.metrics import mean_losses

    with torch.no_grad():
        mean, std = encode(model, torch.cat([original, protected]))
    loss_original, loss_protected = mean_losses(model, mean, std, t, eps, noise)
    return loss_protected / loss_original - 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=30)
    parser.add_argument("--truth", type=int, default=1024)
    args = parser.parse_args(argv)

    import torch

    from fixative.engine.geometry import Geometry
    from fixative.engine.imaging import read_back_rgb
    from fixative.engine.metrics import GAIN_SEED, as_seen, protection_figures
    from fixative.engine.options import EngineOptions
    from fixative.engine.protect import protect_image
    from fixative.engine.publishing import serve

    (model, folder), (bf16, _) = tiny_engine_model("fp32"), tiny_engine_model("bf16")
    models = {"fp32": model, "bf16": bf16}
    print("rms error of (gain - 1) x 1000 against the truth; truth; engine figure in fp32 and bf16 (x 1000)")
    print("| image | served | truth | " + " | ".join(ESTIMATORS) + " | fp32 | bf16 |")
    print("|---|---|---|" + "---|" * (len(ESTIMATORS) + 2))
    for family, image_seed, side in IMAGES:
        source = test_image(family, image_seed, side)
        saved = read_back_rgb(protect_image(source, model, EngineOptions(model=str(folder), device="cpu", dtype="fp32")).data)
        geometry = Geometry.plan(*source.rgb.shape[:2], model.resolution, model.size_multiple)
        for served in ("png", "jpeg75"):
            pair = [image if served == "png" else serve(image, served) for image in (source.rgb, saved)]
            original, protected = (as_seen(image, geometry, model.device) for image in pair)
            like = torch.zeros(1, 4, *(side // 8 for side in original.shape[-2:]))
            truth = gain_minus_one(model, original, protected, *draws(model, like, f"uniform{args.truth}", torch.Generator().manual_seed(1)))
            errors = {}
            for name in ESTIMATORS:
                estimates = [
                    gain_minus_one(model, original, protected, *draws(model, like, name, torch.Generator().manual_seed(100 + k)))
                    for k in range(args.draws)
                ]
                errors[name] = statistics.fmean((e - truth) ** 2 for e in estimates) ** 0.5
            engine = {dtype: protection_figures(m, original, protected)["protection_gain"] - 1 for dtype, m in models.items()}
            ours = gain_minus_one(model, original, protected, *draws(model, like, "stratified8", torch.Generator().manual_seed(GAIN_SEED)))
            assert abs(ours - engine["fp32"]) < 1e-6, "the bench's stratified8 is not the engine's figure"
            print(f"| {family}{image_seed}@{side} | {served} | {truth * 1000:.2f} | "
                  + " | ".join(f"{errors[name] * 1000:.2f}" for name in ESTIMATORS)
                  + f" | {engine['fp32'] * 1000:.2f} | {engine['bf16'] * 1000:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
