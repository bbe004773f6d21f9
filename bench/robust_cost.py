#!/usr/bin/env python
"""What a robust step costs at full SD-1.5 scale: PGD steps with and without the publishing transform, one process.

    python bench/robust_cost.py [--size 512] [--steps 2] [--threads N]

The full SD-1.5 architecture with random weights (bench/sd15.py) at the engine's
defaults for everything but ``robust``; the same model, image and seed for both,
timed in alternation (off, on, off, on, ...) after a warm-up step of each, so that
load on a shared machine falls on both alike. Seconds per step and their ratio
are printed. The per-image report is left out: it is the same for both.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per setting and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    from fixative.engine.attacks import ATTACKS
    from fixative.engine.geometry import Geometry
    from fixative.engine.options import EngineOptions
    from fixative.engine.pgd import run_pgd
    from fixative.engine.transforms import PublishingTransform
    from sd15 import load_engine_model

    torch.set_num_threads(args.threads)
    options = EngineOptions(device="cpu")
    model, _ = load_engine_model(options)
    geometry = Geometry.plan(args.size, args.size, model.resolution, model.size_multiple)
    x = torch.rand(1, 3, *geometry.work) * 2 - 1
    attack = ATTACKS[options.mode](model, options, (1, 3, *geometry.padded))
    eps, alpha = 2 * options.strength / 255, 2 * options.step_size / 255

    def seconds_per_step(robust: bool, steps: int) -> float:
        transforms = [PublishingTransform(options.seed)] if robust else None
        generators = [torch.Generator().manual_seed(options.seed)]
        started = time.perf_counter()
        run_pgd(attack, x, [geometry], eps, alpha, steps, generators, None, transforms)
        return (time.perf_counter() - started) / steps

    print(f"{args.size}x{args.size}, mode {options.mode}, UNet {model.dtype}, VAE {model.vae.dtype}, "
          f"{args.threads} threads: warming up", flush=True)
    seconds_per_step(False, 1), seconds_per_step(True, 1)
    times: dict[bool, list[float]] = {False: [], True: []}
    for round_ in range(args.rounds):
        for robust in (False, True):
            times[robust].append(seconds_per_step(robust, args.steps))
            print(f"round {round_ + 1}: robust {'on' if robust else 'off'} {times[robust][-1]:.2f} s/step", flush=True)
    off, on = statistics.fmean(times[False]), statistics.fmean(times[True])
    print(f"robust off {off:.2f} s/step, on {on:.2f} s/step: a robust step costs {on / off:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
