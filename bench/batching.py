"""Batching in the engine: PGD seconds per image and peak memory for batches of 1, 2, 4 and 8 images.

    python -m bench.batching [--scale tiny|full] [--batches 1,2,4,8] [--steps N] [--rounds 2] [--threads 1]
                             [--device cpu|cuda] [--json FILE]

Each batch size protects that many different paintings of one size
(``--size``: 128 px on the tiny model, 512 px at SD-1.5 scale) through
``engine.protect.perturbation``, the PGD of
``protect_batch`` (default mode ``sds``, ``robust`` on, coarse to fine: the
steps are half coarse, half fine, as in the default 100). Only the PGD is
timed: it is what a batch shares; the per-image report runs image by image
whether batched or not. ``--steps`` steps (tiny: 20, full: 2) per batch and
round, after a warm-up run of each batch size, the batch sizes alternating
round by round in one process so that a shared machine's load falls on all
alike; seconds per image = (mean time of a batch) x 100 / steps / batch size,
**extrapolated** to 100 steps. Peak memory: the process's peak RSS (VmHWM,
reset through ``/proc/self/clear_refs`` before each batch) in the warm-up,
which runs the batch sizes in increasing order (the allocator keeps what a
larger batch freed, so a smaller batch run after it would read high), and what
each image beyond the first batch size adds to it. Linux only (``/proc``). On
a GPU (``--device cuda``, full scale only) the peak is
``torch.cuda.max_memory_allocated``, reset before each batch. The queue-level
figure (images per hour for a queue of 16) is bench/batch_queue.py's.
Results: bench/README.md, "Batching".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from bench.common import GIB, machine_info, proc_bytes, reset_peak, say, tiny_engine_model

DEFAULT_STEPS = {"tiny": 20, "full": 2}
DEFAULT_SIZE = {"tiny": 128, "full": 512}
EXTRAPOLATED_STEPS = 100  # the engine's default


def load(scale: str, threads: int, device: str):
    """(model, options) at the engine's defaults: the tests' tiny model (fp32, CPU), or SD-1.5's architecture (dtype auto)."""
    import torch

    from fixative.engine.options import EngineOptions

    if scale == "tiny":
        model, folder = tiny_engine_model(threads=threads)
        return model, EngineOptions(model=str(folder), device="cpu", dtype="fp32")
    from bench.sd15 import load_engine_model

    torch.set_num_threads(threads)
    options = EngineOptions(device=device)
    return load_engine_model(options)[0], options


def measure(args: argparse.Namespace) -> dict:
    import torch

    from fixative.engine.geometry import Geometry
    from fixative.engine.protect import perturbation
    from fixative.engine.tiny import synthetic_paintings

    batches = [int(n) for n in args.batches.split(",")]
    steps = args.steps or DEFAULT_STEPS[args.scale]
    size = args.size or DEFAULT_SIZE[args.scale]
    model, options = load(args.scale, args.threads, args.device)
    cuda = model.device.type == "cuda"
    options = options.model_copy(update={"steps": steps})
    geometry = Geometry.plan(size, size, model.resolution, model.size_multiple)
    images = synthetic_paintings(max(batches), size, seed=3)  # (N, 3, size, size) in [-1, 1], each its own
    model_rss = torch.cuda.memory_allocated(model.device) if cuda else proc_bytes("VmRSS")
    say(f"{args.scale} scale, {size}x{size}, mode {options.mode}, robust {options.robust}, {steps} steps "
        f"({options.steps // 2} coarse), UNet {model.dtype}, VAE {model.vae.dtype}, {model.device}, {args.threads} threads; "
        f"model loaded: {model_rss / GIB:.2f} GiB {'allocated on the GPU' if cuda else 'RSS'}")

    def run(n: int, steps_now: int) -> tuple[float, int]:
        if cuda:
            torch.cuda.reset_peak_memory_stats(model.device)
        else:
            reset_peak()
        started = time.perf_counter()
        perturbation(model, options.model_copy(update={"steps": steps_now}), [geometry] * n, images[:n].to(model.device), None)
        if cuda:
            torch.cuda.synchronize(model.device)
            return time.perf_counter() - started, torch.cuda.max_memory_allocated(model.device)
        return time.perf_counter() - started, proc_bytes("VmHWM")

    peaks = {}
    for n in sorted(batches):
        warm, peaks[n] = run(n, 2)
        say(f"warm-up: batch {n}, 2 steps, {warm:.1f} s, peak {peaks[n] / GIB:.2f} GiB")
    seconds: dict[int, list[float]] = {n: [] for n in batches}
    for round_ in range(args.rounds):
        for n in batches:
            took, _ = run(n, steps)
            seconds[n].append(took)
            say(f"round {round_ + 1}: batch {n}: {took:.1f} s, {took / steps / n:.3f} s per step per image")
    first = batches[0]
    rows = []
    for n in batches:
        per_image = statistics.fmean(seconds[n]) * EXTRAPOLATED_STEPS / steps / n
        extra = (peaks[n] - peaks[first]) / (n - first) if n != first else None
        rows.append({"batch": n, "seconds": seconds[n], "pgd_seconds_per_image": per_image, "peak_bytes": peaks[n],
                     "extra_bytes_per_image": extra})
    say(f"\nPGD seconds per image ({EXTRAPOLATED_STEPS} steps, extrapolated from {steps}), {size}x{size}, "
        f"{args.rounds} rounds:\n")
    say(f"| batch | PGD s/image | vs batch {first} | peak GiB | GiB per image above batch {first}'s |")
    say("|---|---|---|---|---|")
    for row in rows:
        extra = "" if row["extra_bytes_per_image"] is None else f"{row['extra_bytes_per_image'] / GIB:.2f}"
        say(f"| {row['batch']} | {row['pgd_seconds_per_image']:.2f} | "
            f"{rows[0]['pgd_seconds_per_image'] / row['pgd_seconds_per_image']:.2f}x | {row['peak_bytes'] / GIB:.2f} | {extra} |")
    return {"scale": args.scale, "size": size, "steps": steps, "threads": args.threads, "device": str(model.device),
            "gpu": torch.cuda.get_device_name(model.device) if cuda else None, "model_bytes": model_rss,
            "machine": machine_info(), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--batches", default="1,2,4,8", help="batch sizes, the first is the baseline")
    parser.add_argument("--size", type=int, help="square side in pixels (tiny: 128, full: 512)")
    parser.add_argument("--steps", type=int, help="timed PGD steps per batch and round (tiny: 20, full: 2)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--device", default="cpu", help="full scale: cpu or cuda")
    parser.add_argument("--json", type=Path, help="write the measurements here")
    args = parser.parse_args(argv)
    if args.scale == "tiny" and args.device != "cpu":
        parser.error("the tiny model runs on the CPU; --device is for --scale full")
    result = measure(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
