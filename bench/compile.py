#!/usr/bin/env python
"""torch.compile and channels_last at full SD-1.5 scale, end to end: compile time included, per image and per 10 images.

    python bench/compile.py [--variants eager,channels_last,compile] [--size 512] [--steps 1] [--threads 1]

Issue 10, item 4. The variants run one after the other on one model, in one
process (the daemon keeps its model loaded, so it would compile once per run,
as here); each variant's first calls are timed apart from its steady ones.
The model is SD-1.5's architecture with random weights (bench/sd15.py) at the
engine's defaults (``sds``, ``robust`` on; UNet fp32, VAE bf16 on an
AVX512-BF16 CPU). ``compile`` is ``nn.Module.compile()`` (TorchInductor, the
CPU backend, default mode) on the UNet and on the VAE's encoder;
``channels_last`` converts both modules' weights to that memory format (the
engine's inputs follow, as oneDNN propagates it).

What one image costs is the engine's PGD steps plus the per-image report
(``engine.metrics.protection_figures`` on the saved file, then after each of
the three reported pipelines: four evaluations). Both are timed as the engine
runs them, twice: the first call of each pays the compilation (and the cold
caches), the second is the steady state. So:

    per image  = steps x s/step + 4 x s/evaluation        (steady, extrapolated to the default steps)
    start-up   = (first step - s/step) + (first evaluation - s/evaluation)
    one image  = start-up + per image;   ten images = start-up + 10 x per image

The eager variant's start-up is its own cold first calls, counted the same way.
Results: bench/README.md, "Compilation and memory format".
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

VARIANTS = ("eager", "channels_last", "compile", "compile+channels_last")
REPORT_EVALUATIONS = 4  # the report's gain, then after jpeg85, jpeg75 and half+jpeg75 (engine.publishing.REPORTED_PIPELINES)


def apply(variant: str, model) -> None:
    """Set the memory format, and compile or uncompile, the UNet and the VAE encoder for ``variant``."""
    import torch

    memory_format = torch.channels_last if "channels_last" in variant else torch.contiguous_format
    torch._dynamo.reset()
    for module in (model.unet, model.vae.encoder):
        module.to(memory_format=memory_format)
        module._compiled_call_impl = None  # what nn.Module.compile() sets: back to eager
        if "compile" in variant:
            module.compile()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="eager,channels_last,compile")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=1, help="timed steps after the first")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")

    import torch

    from fixative.engine.attacks import ATTACKS
    from fixative.engine.geometry import Geometry
    from fixative.engine.metrics import protection_figures
    from fixative.engine.options import EngineOptions
    from fixative.engine.pgd import run_pgd
    from fixative.engine.transforms import PublishingTransform
    from sd15 import load_engine_model

    torch.set_num_threads(args.threads)
    options = EngineOptions(device="cpu")
    model, _ = load_engine_model(options)
    geometry = Geometry.plan(args.size, args.size, model.resolution, model.size_multiple)
    x = torch.rand(1, 3, *geometry.work, generator=torch.Generator().manual_seed(5)) * 2 - 1
    attack = ATTACKS[options.mode](model, options, (1, 3, *geometry.padded))
    eps, alpha = 2 * options.strength / 255, 2 * options.step_size / 255

    def timed(what, *call_args):
        started = time.perf_counter()
        result = what(*call_args)
        return time.perf_counter() - started, result

    results = []
    for variant in args.variants.split(","):
        apply(variant, model)
        transform = PublishingTransform(options.seed) if options.robust else None
        generator = torch.Generator().manual_seed(options.seed)
        first_step, delta = timed(run_pgd, attack, x, geometry, eps, alpha, 1, generator, None, transform)
        print(f"{variant}: first step {first_step:.1f} s", flush=True)
        steps_seconds, delta = timed(run_pgd, attack, x, geometry, eps, alpha, args.steps, generator, None, transform, delta)
        per_step = steps_seconds / args.steps
        print(f"{variant}: {per_step:.2f} s/step over {args.steps} step(s)", flush=True)
        original, protected = geometry.pad(x), geometry.pad((x + delta).clamp(-1, 1))
        first_evaluation, _ = timed(protection_figures, model, original, protected)
        print(f"{variant}: first evaluation {first_evaluation:.1f} s", flush=True)
        evaluation, _ = timed(protection_figures, model, original, protected)
        print(f"{variant}: evaluation {evaluation:.1f} s", flush=True)
        per_image = options.steps * per_step + REPORT_EVALUATIONS * evaluation
        start_up = (first_step - per_step) + (first_evaluation - evaluation)
        results.append({
            "variant": variant, "first_step": first_step, "seconds_per_step": per_step,
            "first_evaluation": first_evaluation, "evaluation": evaluation, "start_up": start_up,
            "per_image": per_image, "one_image": start_up + per_image, "ten_images": start_up + 10 * per_image,
            "peak_rss_bytes_so_far": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        })
        print(json.dumps(results[-1]), flush=True)

    print(f"\n{args.size}x{args.size}, {args.threads} thread(s), torch {torch.__version__}; per image extrapolated to "
          f"{options.steps} steps and {REPORT_EVALUATIONS} report evaluations:\n")
    print("| variant | s/step | s/evaluation | start-up s | one image s | ten images s | vs eager, one | vs eager, ten |")
    print("|---|---|---|---|---|---|---|---|")
    eager = results[0]
    for r in results:
        print(f"| {r['variant']} | {r['seconds_per_step']:.2f} | {r['evaluation']:.1f} | {r['start_up']:.0f} | "
              f"{r['one_image']:.0f} | {r['ten_images']:.0f} | {r['one_image'] / eager['one_image']:.2f}x | "
              f"{r['ten_images'] / eager['ten_images']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "threads": args.threads, "torch": torch.__version__,
                                         "variants": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
