"""Images per hour for one engine against two, draining one queue on the tiny model.

    python -m bench.engines [--images 16] [--steps 20] [--rounds 2]

Each setting is a real ``fixative run`` (bench/README.md, "Several engines"):
the watcher and ``[engine] devices`` children, all on the CPU, in a folder of
its own. The images are copied into the inbox before it starts. Throughput is
the number of images over the time from the first claim to the last finish, as
the job table records them, so model loading is left out. The settings run in
alternation, ``--rounds`` times, so that other load on a shared machine falls
on all of them alike.

On the CPU an engine's share of the machine is a core: one engine with one
thread, against two one-thread engines, as with one GPU per engine. (One engine with every core's thread is no fair third: on a
shared machine its OpenMP threads spin-wait on each other, and it ran 17x
slower than with one thread here.)
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, physical_cores, tiny_model

SIDE = 256


def write_images(folder: Path, count: int, side: int = SIDE) -> None:
    from PIL import Image

    from fixative.engine.synthetic import FAMILIES, family_images

    folder.mkdir(parents=True)
    for number in range(count):
        family = list(FAMILIES)[number % len(FAMILIES)]
        image = family_images(family, 1, side, seed=number)[0]
        rgb = ((image.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype("uint8")
        Image.fromarray(rgb).save(folder / f"{number:03d}.png")


def drain(model: Path, images: int, steps: int, engines: int, batch_size: int = 1, device: str = "cpu", side: int = SIDE) -> float:
    """Run ``fixative run`` with ``engines`` engines on ``device`` until ``images`` are done; images per hour.

    ``batch_size``: ``[engine] batch_size``; ``device`` and ``side``: a GPU and
    512 px images for bench/batch_queue.py ``--scale full``.
    """
    from fixative.daemon.store import JobStore

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_images(root / "inbox", images, side)
        devices = ", ".join([f'"{device}"'] * engines)
        (root / "config.toml").write_text(f"""
inbox = "{root / 'inbox'}"
export_dir = "{root / 'export'}"
state_dir = "{root / 'state'}"
[watcher]
stability_seconds = 0.5
[engine]
model = "{model}"
steps = {steps}
devices = [{devices}]
batch_size = {batch_size}
""")
        env = {k: v for k, v in os.environ.items() if not k.startswith("FIXATIVE_")}
        env.update(FIXATIVE_CONFIG=str(root / "config.toml"), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        with open(root / "run.log", "wb") as log:
            daemon = subprocess.Popen([sys.executable, "-m", "fixative.daemon.cli", "run"], env=env, cwd=ROOT,
                                      stdout=log, stderr=subprocess.STDOUT)
        try:
            store = None
            deadline = time.monotonic() + 3600
            while time.monotonic() < deadline:
                time.sleep(1)
                if daemon.poll() is not None:
                    raise RuntimeError(f"fixative run exited {daemon.returncode}: {(root / 'run.log').read_text()[-2000:]}")
                if store is None and (root / "state" / "jobs.db").exists():
                    store = JobStore(root / "state" / "jobs.db")
                if store is not None and (counts := store.counts())["done"] + counts["failed"] == images:
                    break
            jobs = store.jobs(limit=images)
            failed = [job for job in jobs if job.state != "done"]
            if failed:
                raise RuntimeError(f"{len(failed)} images not done: {failed[0].error}")
            first = min(job.started_at for job in jobs)
            last = max(job.finished_at for job in jobs)
            store.close()
            return images / (last - first) * 3600
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=300)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)

    model, _ = tiny_model(physical_cores())
    results: dict[int, list[float]] = {1: [], 2: []}
    print(f"{args.images} images of {SIDE}x{SIDE}, {args.steps} steps, tiny model, one thread per engine; "
          f"images per hour, first claim to last finish", flush=True)
    for round_number in range(args.rounds):
        for engines in results:
            per_hour = drain(model, args.images, args.steps, engines)
            results[engines].append(per_hour)
            print(f"  round {round_number + 1}: {engines} engine(s): {per_hour:.0f}/h",
                  flush=True)
    table("engines", results)
    return 0


def table(setting: str, results: dict[int, list[float]]) -> None:
    """Mean images per hour for each value of ``setting``, and its ratio to the first's."""
    baseline = statistics.mean(next(iter(results.values())))
    print(f"{setting:>10} {'images/h':>9} {'vs first':>8}")
    for value, per_hour in results.items():
        print(f"{value:>10} {statistics.mean(per_hour):>9.0f} {statistics.mean(per_hour) / baseline:>7.2f}x")


if __name__ == "__main__":
    sys.exit(main())
