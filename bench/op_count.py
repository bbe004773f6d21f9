"""Operations per PGD step: what an `sds` step's time is made of when the GPU waits on the host.

    python -m bench.op_count [--steps 200] [--json FILE]

On an H200 one 512² image leaves the card mostly idle, and a half-side step
(0.24x the FLOPs) took longer than a full-size one (bench/README.md, "On a
GPU"). If a step's time there is set by how many operations the host issues,
each one a kernel launch or more, the number of operations per step, which
does not depend on the device, should track the H200's step times where the
FLOPs do not.

This counts the ATen operations that ``engine.protect.perturbation``
dispatches (``TorchDispatchMode``, forward and backward; views, which launch
nothing, counted apart), per step as (count at 2 + N steps - count at 2
steps) / N, so that setup is left out and the EOT's random draws are averaged
over N steps. The count depends on the code path, not on the tensors' sizes,
so the parts that do not involve the model (the EOT transforms, the coarse
stage's extra work) are counted on the tests' tiny model over many steps, and
the model's own share once on SD-1.5's architecture (one step at 512² on the
CPU, about a minute). Counting needs no quiet machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from bench.common import say, tiny_engine_model

SETUP_STEPS = 2  # the baseline run's steps: one coarse and one fine with coarse to fine on


def count(model, options, side: int) -> Counter:
    """ATen operations dispatched by one ``perturbation`` run: ``ops`` (all but views) and ``views``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fixative.engine.geometry import Geometry
    from fixative.engine.protect import perturbation
    from fixative.engine.tiny import synthetic_paintings

    counts: Counter = Counter()

    class Counting(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts["views" if func.is_view else "ops"] += 1
            return func(*args, **(kwargs or {}))

    geometry = Geometry.plan(side, side, model.resolution, model.size_multiple)
    image = synthetic_paintings(1, side, seed=3).to(model.device)
    with Counting():
        perturbation(model, options, [geometry], image, None)
    return counts


def per_step(model, options, side: int, steps: int) -> dict[str, float]:
    """Mean operations per step over ``steps`` steps, the setup's left out."""
    short = count(model, options.model_copy(update={"steps": SETUP_STEPS}), side)
    long = count(model, options.model_copy(update={"steps": SETUP_STEPS + steps}), side)
    return {kind: (long[kind] - short[kind]) / steps for kind in ("ops", "views")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="tiny model: steps counted per variant (even)")
    parser.add_argument("--json", type=Path, help="write the counts here")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.steps % 2:
        parser.error("--steps must be even, so that coarse to fine splits them in two halves")

    from bench.sd15 import load_engine_model
    from fixative.engine.options import EngineOptions

    tiny, folder = tiny_engine_model()
    tiny_options = EngineOptions(model=str(folder), device="cpu", dtype="fp32")
    plain = per_step(tiny, tiny_options.model_copy(update={"robust": False}), 128, args.steps)
    fine = per_step(tiny, tiny_options.model_copy(update={"coarse_to_fine": False}), 128, args.steps)
    mixed = per_step(tiny, tiny_options, 128, args.steps)  # half coarse, half fine
    coarse = {kind: 2 * mixed[kind] - fine[kind] for kind in mixed}
    eot = {kind: fine[kind] - plain[kind] for kind in fine}
    coarse_extra = {kind: coarse[kind] - fine[kind] for kind in fine}

    sd_options = EngineOptions(device="cpu", robust=False)
    sd, _ = load_engine_model(sd_options)
    sd_plain = per_step(sd, sd_options, 512, 1)
    del sd

    rows = {
        "sds, robust off": sd_plain,
        "sds, a full-size robust step": {k: sd_plain[k] + eot[k] for k in eot},
        "sds, a half-side robust step": {k: sd_plain[k] + eot[k] + coarse_extra[k] for k in eot},
    }
    say(f"ATen operations per sds PGD step, SD-1.5 architecture (the model's share counted over 1 step at 512x512; "
        f"the EOT's and the coarse stage's on the tiny model over {args.steps} steps each)")
    say(f"  EOT transforms, mean per step: {eot['ops']:.0f} ops, {eot['views']:.0f} views; "
        f"the coarse stage's extra per step: {coarse_extra['ops']:.0f} ops, {coarse_extra['views']:.0f} views")
    say("| step | ops | views |")
    say("|---|---|---|")
    for label, row in rows.items():
        say(f"| {label} | {row['ops']:.0f} | {row['views']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"steps": args.steps, "tiny": {"plain": plain, "fine": fine, "mixed": mixed},
                                         "eot": eot, "coarse_extra": coarse_extra, "sd15": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
