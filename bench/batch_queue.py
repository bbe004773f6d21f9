"""Images per hour for one engine protecting one image at a time against batches, draining one queue.

    python -m bench.batch_queue [--images 16] [--steps 20] [--rounds 2] [--batch-size 4]
                                [--scale tiny|full] [--device cpu|cuda]

The queue-level figure of ``[engine] batch_size`` (bench/README.md,
"Batching"; bench/batching.py measures the engine's batches alone). Each
setting is a real ``fixative run`` with one engine (on the CPU, of one
thread), drained as in bench/engines.py: the images are in the inbox before it
starts, and throughput is the number of images over the time from the first
claim to the last finish, as the job table records them, so the model load is
left out. The settings run in alternation, ``--rounds`` times, so that other
load on a shared machine falls on both alike.

``--scale tiny`` (the default) drains 256 px images on the tests' tiny model.
``--scale full`` saves SD-1.5's architecture with random weights
(bench/sd15.py ``save_model``, in the dtype the engine picks for ``--device``)
and drains 512 px images on it: with ``--device cuda --steps 100``, the
product's own figure on a GPU, end to end.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from bench.common import physical_cores, tiny_model
from bench.engines import SIDE, drain, table

FULL_SIDE = 512


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--scale", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="fixative-sd15-") as folder:
        if args.scale == "full":
            model, side, what = save_sd15(Path(folder), args.device), FULL_SIDE, "SD-1.5 architecture, random weights"
        else:
            (model, _), side, what = tiny_model(physical_cores()), SIDE, "tiny model"
        results: dict[int, list[float]] = {1: [], args.batch_size: []}
        print(f"{args.images} images of {side}x{side}, {args.steps} steps, {what}, one engine on {args.device}; "
              f"images per hour, first claim to last finish; load average {os.getloadavg()[0]:.1f} at the start",
              flush=True)
        for round_number in range(args.rounds):
            for batch_size in results:
                per_hour = drain(model, args.images, args.steps, engines=1, batch_size=batch_size, device=args.device, side=side)
                results[batch_size].append(per_hour)
                print(f"  round {round_number + 1}: batch_size {batch_size}: {per_hour:.0f}/h "
                      f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    table("batch_size", results)
    return 0


def save_sd15(folder: Path, device: str) -> Path:
    """SD-1.5's architecture saved into ``folder`` in the dtype the engine picks for ``device``, built there."""
    from bench.sd15 import save_model
    from fixative.engine.model import pick_device, pick_dtypes

    where = pick_device(device)
    _, dtype = pick_dtypes("auto", where)
    return save_model(folder / "sd15", where, dtype)


if __name__ == "__main__":
    sys.exit(main())
