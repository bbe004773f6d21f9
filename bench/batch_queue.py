#!/usr/bin/env python
"""Images per hour for one engine protecting one image at a time against batches, draining one queue on the tiny model.

    python bench/batch_queue.py [--images 16] [--steps 20] [--rounds 2] [--batch-size 4]

The queue-level figure of ``[engine] batch_size`` (bench/README.md,
"Batching"; bench/batching.py measures the engine's batches alone). Each
setting is a real ``fixative run`` with one CPU engine of one thread, drained
as in bench/engines.py: the images are in the inbox before it starts, and
throughput is the number of images over the time from the first claim to the
last finish, as the job table records them, so the model load is left out.
The settings run in alternation, ``--rounds`` times, so that other load on a
shared machine falls on both alike.
"""

from __future__ import annotations

import argparse
import os
import sys

from engines import SIDE, drain, table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args(argv)

    from run import physical_cores, tiny_model

    model, _ = tiny_model(physical_cores())
    results: dict[int, list[float]] = {1: [], args.batch_size: []}
    print(f"{args.images} images of {SIDE}x{SIDE}, {args.steps} steps, tiny model, one engine of one thread; "
          f"images per hour, first claim to last finish; load average {os.getloadavg()[0]:.1f} at the start",
          flush=True)
    for round_number in range(args.rounds):
        for batch_size in results:
            per_hour = drain(model, args.images, args.steps, engines=1, batch_size=batch_size)
            results[batch_size].append(per_hour)
            print(f"  round {round_number + 1}: batch_size {batch_size}: {per_hour:.0f}/h "
                  f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    table("batch_size", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
