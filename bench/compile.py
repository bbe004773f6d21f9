#!/usr/bin/env python
"""torch.compile and channels_last at full SD-1.5 scale, end to end: compile time included, per image and per 10 images.

    python bench/compile.py [--variants eager,compile,channels_last] [--size 512] [--threads 1] [--rounds 2]

Issue 10, item 4. The variants run one after the other on one model, in one
process (the daemon keeps its model loaded, so it would compile once per run,
as here); each variant's first calls are timed apart from its steady ones.
The model is SD-1.5's architecture with random weights (bench/sd15.py) at the
engine's defaults (``sds``, ``robust`` on; UNet fp32, VAE bf16 on an
AVX512-BF16 CPU). ``compile`` is ``nn.Module.compile()`` (TorchInductor, the
CPU backend, default mode) on the UNet and on the VAE's encoder;
``channels_last`` converts both modules' weights to that memory format (the
engine's inputs follow, as oneDNN propagates it).

What one image costs, by what the engine runs (the defaults: coarse to fine
with robust on): 50 PGD steps at half the working side and 50 at the working
size, then the per-image report, whose four protection-gain evaluations
(``engine.metrics.protection_figures`` on the saved file, then after each of
the three reported pipelines) each run the encoder on a batch of 2 and the UNet
on 8 batches of 4, without gradients. Each of these four calls is timed cold
for every variant (eager first, so eager's cold calls also pay the process's
first touches; then each other variant's, which for ``compile`` is where
compilation happens), then in rounds, the variants alternating call by call so
that the load of a shared machine falls on all alike. Extrapolated:

    per image = 50 x coarse step + 50 x step + 4 x (encoder(2) + 8 x UNet(4))   (steady calls, mean of rounds)
    start-up  = the sum of (cold call - steady call) over the four
    one image = start-up + per image;   ten images = start-up + 10 x per image

Switching variants only swaps what the modules call (the compiled code is
kept) and converts the weights' memory format; neither is timed.
Results: bench/README.md, "Compilation and memory format".
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

VARIANTS = ("eager", "channels_last", "compile", "compile+channels_last")


def apply(variant: str, model, compiled: dict) -> None:
    """Set the UNet's and the VAE encoder's memory format, and their compiled or eager forward, for ``variant``.

    ``nn.Module.compile()`` stores the compiled forward in ``_compiled_call_impl``;
    it is kept in ``compiled`` and swapped in and out, so that switching back
    does not compile again.
    """
    import torch

    memory_format = torch.channels_last if "channels_last" in variant else torch.contiguous_format
    for name, module in (("unet", model.unet), ("encoder", model.vae.encoder)):
        module.to(memory_format=memory_format)
        if "compile" in variant and name not in compiled:
            # Static shapes: with the default automatic dynamic shapes, the second input size (the
            # full-size step after the coarse one) recompiled with symbolic sizes and Inductor failed
            # ("InductorError: TypeError: cannot determine truth value of Relational:
            # 512*((s30//8))*((s91//8)) < 1", torch 2.13.0+cpu). Each size now compiles once.
            module.compile(dynamic=False)
            compiled[name] = module._compiled_call_impl
        module._compiled_call_impl = compiled[name] if "compile" in variant else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="eager,compile,channels_last")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")

    import torch

    from fixative.engine.attacks import ATTACKS
    from fixative.engine.geometry import Geometry
    from fixative.engine.diffusion import encode
    from fixative.engine.options import EngineOptions
    from fixative.engine.pgd import coarse_steps, run_pgd
    from fixative.engine.metrics import GAIN_SAMPLES, UNET_BATCH
    from fixative.engine.publishing import REPORTED_PIPELINES
    from fixative.engine.transforms import PublishingTransform
    from sd15 import load_engine_model

    torch.set_num_threads(args.threads)
    options = EngineOptions(device="cpu")
    model, _ = load_engine_model(options)
    geometry = Geometry.plan(args.size, args.size, model.resolution, model.size_multiple)
    x = torch.rand(1, 3, *geometry.work, generator=torch.Generator().manual_seed(5)) * 2 - 1
    attack = ATTACKS[options.mode](model, options, (1, 3, *geometry.padded))
    eps, alpha = 2 * options.strength / 255, 2 * options.step_size / 255

    def timed(call) -> float:
        started = time.perf_counter()
        call()
        return time.perf_counter() - started

    half = geometry.halved(model.size_multiple)
    coarse, fine = coarse_steps(options), options.steps - coarse_steps(options)
    report_evaluations = 1 + len(REPORTED_PIPELINES)  # the report's gain, then after each reported pipeline
    unet_batches = 2 * GAIN_SAMPLES // UNET_BATCH  # two images' samples, UNET_BATCH per forward
    original = geometry.pad(x)
    latents = torch.randn(UNET_BATCH, 4, *(side // 8 for side in geometry.padded))
    timesteps = torch.randint(0, model.num_train_timesteps, (UNET_BATCH,))
    calls = {
        # name: (what one call runs, how many such calls one image makes)
        "coarse step": (lambda: step(half, half.down(x)), coarse),
        "step": (lambda: step(geometry, x), fine),
        "encoder(2)": (lambda: encode_batch(torch.cat([original, original])), report_evaluations),
        "UNet(batch)": (lambda: unet_batch(latents, timesteps), report_evaluations * unet_batches),
    }

    def step(where, x_in):
        transforms = [PublishingTransform(options.seed)] if options.robust else None
        generators = [torch.Generator().manual_seed(options.seed)]
        run_pgd(attack, x_in, [where], eps, alpha, 1, generators, None, transforms)

    @torch.no_grad()
    def encode_batch(images):
        encode(model, images)

    @torch.no_grad()
    def unet_batch(z, t):
        model.unet(z.to(model.dtype), t, model.text_embedding.expand(len(t), -1, -1))

    variants, compiled = args.variants.split(","), {}
    cold = {variant: {} for variant in variants}
    steady = {variant: {name: [] for name in calls} for variant in variants}
    for variant in variants:
        apply(variant, model, compiled)
        for name, (call, _) in calls.items():
            cold[variant][name] = timed(call)
            print(f"{variant}: {name} cold {cold[variant][name]:.1f} s", flush=True)
    for round_ in range(args.rounds):
        for name, (call, _) in calls.items():
            for variant in variants:
                apply(variant, model, compiled)
                steady[variant][name].append(timed(call))
                print(f"round {round_ + 1}: {variant}: {name} {steady[variant][name][-1]:.1f} s", flush=True)
    print(f"dynamo counters: {dict(torch._dynamo.utils.counters['stats'])}", flush=True)

    results = []
    for variant in variants:
        mean = {name: statistics.fmean(values) for name, values in steady[variant].items()}
        per_image = sum(mean[name] * count for name, (_, count) in calls.items())
        start_up = sum(cold[variant][name] - mean[name] for name in calls)
        results.append({
            "variant": variant, "cold": cold[variant], "steady": steady[variant], "steady_mean": mean,
            "start_up": start_up, "per_image": per_image, "one_image": start_up + per_image,
            "ten_images": start_up + 10 * per_image,
        })

    print(f"\n{args.size}x{args.size}, {args.threads} thread(s), torch {torch.__version__}; per image extrapolated to "
          f"{coarse} coarse and {fine} full-size steps and {report_evaluations} report evaluations:\n")
    print("| variant | " + " | ".join(f"{name} s" for name in calls) + " | start-up s | one image s | ten images s | vs first, one | vs first, ten |")
    print("|---" * (len(calls) + 6) + "|")
    eager = results[0]
    for r in results:
        print(f"| {r['variant']} | " + " | ".join(f"{r['steady_mean'][name]:.2f}" for name in calls) + f" | {r['start_up']:.0f} | "
              f"{r['one_image']:.0f} | {r['ten_images']:.0f} | {r['one_image'] / eager['one_image']:.2f}x | "
              f"{r['ten_images'] / eager['ten_images']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "threads": args.threads, "torch": torch.__version__,
                                         "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                                         "variants": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
