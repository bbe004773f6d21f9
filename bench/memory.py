"""Peak memory of protecting large images: what an image's size costs above the model.

    python -m bench.memory [--scale tiny|full] [--sizes 6000x4000,10000x10000] [--json FILE]

Each size is measured in a fresh process, which:
1. writes a PNG of that size (smooth ramps plus grain, so it compresses like a
   scan, not like a flat test card);
2. loads the model: the tests' tiny model, or SD-1.5's architecture built in
   memory (``--scale full``, bench/sd15.py);
3. protects a small image that gets the same working size as the large one
   (1 step): its peak RSS is the model's own, weights plus the activations at
   that size;
4. resets the kernel's peak-RSS mark (``/proc/self/clear_refs``) and protects
   the large PNG as the daemon does: the file's bytes, read once, through
   ``engine.protect.protect_bytes``.

``extra`` = peak(large) - peak(working-size image): what full resolution
costs (decoding, the downscale, the upsample and rounding, encoding, reading
the saved file back, PSNR/SSIM). The steps run at the working size whatever
the image's size, so one step measures the same extra as a hundred. The tiny
model isolates that extra best; ``--scale full`` adds a real-sized step.
Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from bench.common import GIB, machine_info, proc_bytes, reset_peak, say, tiny_model

# 24 megapixels, a camera's or a scan's; 100, the largest image the engine takes (engine.imaging.MAX_PIXELS).
DEFAULT_SIZES = "6000x4000,10000x10000"


def _write_artwork(path: Path, width: int, height: int) -> None:
    import numpy as np
    from PIL import Image

    rgb = np.empty((height, width, 3), np.uint8)
    rng = np.random.default_rng(0)
    x = np.arange(width)
    for top in range(0, height, 512):  # in bands: a 100 MP int64 ramp would be 0.8 GB
        y = np.arange(top, min(top + 512, height))[:, None]
        for channel in range(3):
            ramp = (x * (channel + 1) // 7 + y * (3 - channel) // 5) % 224
            rgb[top : top + len(y), :, channel] = ramp + rng.integers(0, 32, ramp.shape)
    Image.fromarray(rgb).save(path, compress_level=1)


def measure(spec: dict) -> dict:
    """In a fresh process: the model's peak, then the large image's, for one size."""
    import torch

    torch.set_num_threads(spec["threads"])
    from fixative.engine.geometry import Geometry
    from fixative.engine.imaging import MIN_SHORT_SIDE
    from fixative.engine.model import load_model
    from fixative.engine.options import EngineOptions
    from fixative.engine.protect import protect_bytes

    width, height = spec["size"]
    with tempfile.TemporaryDirectory(prefix="fixative-memory-") as folder:
        large = Path(folder) / "large.png"
        _write_artwork(large, width, height)
        options = EngineOptions(model=spec["model"], device=spec["device"], steps=1)
        if spec["scale"] == "full":
            from bench import sd15

            model, _ = sd15.load_engine_model(options)
        else:
            model = load_model(options)
        model_rss = proc_bytes("VmRSS")
        reset_peak()  # writing the large PNG above must not count as the model's
        work_height, work_width = Geometry.plan(height, width, model.resolution, model.size_multiple).work
        # The tiny model works at 128 px, under the smallest image accepted: enlarge, same working size.
        scale = math.ceil(MIN_SHORT_SIDE / min(work_height, work_width))
        small = Path(folder) / "work.png"
        _write_artwork(small, work_width * scale, work_height * scale)
        protect_bytes(small.read_bytes(), small.name, model, options)
        model_peak = proc_bytes("VmHWM")

        reset_peak()
        started = time.perf_counter()
        try:
            report, error = protect_bytes(large.read_bytes(), large.name, model, options).report, None
        except Exception as failure:  # an OutOfMemory is a result here, not a crash
            report, error = {}, f"{type(failure).__name__}: {failure}"
        peak = proc_bytes("VmHWM")
    return {
        "size": [width, height],
        "megapixels": round(width * height / 1e6, 1),
        "working_size": [work_width, work_height],
        "device": str(model.device),
        "model_rss_bytes": model_rss,
        "model_peak_bytes": model_peak,
        "peak_bytes": peak,
        "extra_bytes": peak - model_peak,
        "seconds": round(time.perf_counter() - started, 1),
        "ssim": report.get("ssim"),
        "error": error,
    }


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(side) for side in item.lower().split("x")) for item in text.split(",")]
    except ValueError:
        raise SystemExit(f"bad --sizes {text!r}: write WIDTHxHEIGHT[,WIDTHxHEIGHT...]") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"WIDTHxHEIGHT list (default {DEFAULT_SIZES})")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    model = str(tiny_model(args.threads)[0]) if args.scale == "tiny" else "<sd15-random-weights>"
    rows = []
    say("| size | MP | working size | model GiB | peak GiB | extra GiB | seconds | result |")
    say("|---|---|---|---|---|---|---|---|")
    for size in _parse_sizes(args.sizes):
        spec = {"size": size, "scale": args.scale, "model": model, "device": args.device, "threads": args.threads}
        # One process per size, started fresh: its peak RSS is that size's alone.
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            row = pool.submit(measure, spec).result()
        rows.append(row)
        say(
            f"| {size[0]}x{size[1]} | {row['megapixels']} | {row['working_size'][0]}x{row['working_size'][1]} "
            f"| {row['model_peak_bytes'] / GIB:.2f} | {row['peak_bytes'] / GIB:.2f} | {row['extra_bytes'] / GIB:.2f} "
            f"| {row['seconds']} | {row['error'] or 'protected'} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_info(), "scale": args.scale, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
