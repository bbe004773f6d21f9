"""fixative's benchmark: each protection mode at the engine's defaults against a reference AdvDM loop.

    python -m bench.run [--scale tiny|full] [--json FILE] [--steps N]
                        [--sizes 512x512,768x512] [--modes advdm,mist,sds,encoder]

``--scale full`` builds Stable Diffusion 1.5's architecture with random weights
(bench/sd15.py; no download) and measures seconds per PGD step, the fixed
per-image overhead and peak memory, for the reference loop (bench/reference.py)
and for each mode through ``engine.protect.protect_image`` at the current
``EngineOptions()`` defaults. A few steps are measured after a warm-up step and
the per-image time is extrapolated; the output says so.

``--scale tiny`` does the same on the small trained model the tests use, with
whole images (every step run), and also judges the protection: the gain of the
reference and of each mode and setting, against wall time. A full-scale run
also does that tiny quality pass (skip it with ``--no-quality``), since random
SD-1.5 weights cannot tell a good perturbation from a bad one.

Each measurement runs in its own process (bench/worker.py), so peak memory is
that measurement's own. The last line printed is a one-line summary.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import get_args

from bench.common import GIB, BenchError, machine_info, proc_bytes, run_worker, say, tiny_model
from fixative.engine.options import EngineOptions, Mode

MODES = tuple(get_args(Mode))
DEFAULT_SIZES = {"full": "512x512,768x512", "tiny": "128x128"}
QUALITY_SIZE = (128, 128)  # the tiny model's training resolution, its 512x512
# The tiny settings sweep: (steps, samples_per_step, step_size) tried besides the defaults,
# and each other dtype at the default settings.
SWEEP_GRID = (
    (100, 1, 1.0),  # the AdvDM paper's / Mist v1's settings
    (50, 1, 2.0),  # half the steps, twice the step
    (25, 4, 1.0),  # a quarter of the encodes, 4 (t, eps) samples each
)
SWEEP_DTYPES = ("fp32", "bf16")
# PGD's gain varies a lot from seed to seed on the tiny model, so the reference and the default
# mode (and its sweep) are run with several seeds and compared by their means. The other modes
# get one seed: their gain is shown, but they do not aim at the AdvDM loss the gain measures.
DEFAULT_SEEDS = 3


def reference_ram_estimate(width: int, height: int) -> float:
    """Bytes the fp32 reference needs on a CPU: ~3.8 GB of weights plus ~5.7 GB of activations at 512x512
    (bench/README.md: an 8.8 GiB peak at 512x512), the activations growing with the pixel count."""
    return 3.8e9 + 5.7e9 * (width * height) / 512**2


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        width, _, height = item.strip().lower().partition("x")
        try:
            size = (int(width), int(height))
        except ValueError:
            raise SystemExit(f"bad size {item!r}: write WIDTHxHEIGHT, e.g. 768x512") from None
        if min(size) < 64 or size[0] % 64 or size[1] % 64:
            raise SystemExit(f"bad size {item!r}: both sides must be multiples of 64 (the reference works on the image as is)")
        sizes.append(size)
    return sizes


def parse_variant(text: str) -> dict:
    """``advdm`` or ``advdm+low_vram`` or ``sds+samples_per_step=4+dtype=fp32``: a mode and option overrides."""
    mode, *settings = [part.strip() for part in text.split("+")]
    overrides: dict = {}
    for setting in settings:
        key, sep, raw = setting.partition("=")
        if not sep:
            overrides[key] = True
            continue
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    if mode not in MODES:
        raise SystemExit(f"unknown mode {mode!r} in {text!r}; choose from {', '.join(MODES)}")
    try:
        EngineOptions(mode=mode, **overrides)
    except Exception as error:  # pydantic's ValidationError, with its own one-line-per-field text
        raise SystemExit(f"bad settings in {text!r}: {error}") from None
    return {"label": text, "mode": mode, "overrides": overrides}


def sweep_for(mode: str, defaults: EngineOptions) -> list[dict]:
    """Settings to try besides the defaults: the grid, then each other dtype (as option overrides)."""
    rows = []
    for steps, samples, step_size in SWEEP_GRID:
        if mode == "encoder" and samples != defaults.samples_per_step:
            continue  # the encoder attack draws no (t, eps) samples
        setting = {"steps": steps, "samples_per_step": samples, "step_size": step_size}
        changed = {k: v for k, v in setting.items() if getattr(defaults, k) != v}
        if changed:
            rows.append(changed)
    rows += [{"dtype": dtype} for dtype in SWEEP_DTYPES if dtype != defaults.dtype]
    return rows


# ----------------------------------------------------------------------------------------- phases


def measure(
    scale: str,
    sizes: list[tuple[int, int]],
    modes: list[dict],
    threads: int,
    tiny_folder: Path | None,
    measure_steps,
    evaluate: bool,
    sweep: str,
    seeds: list[int],
    errors: list[str],
) -> dict[str, dict]:
    """Reference and modes at each size, one process each. Returns {"WxH": {"reference": {...}, mode: {...}}}."""
    defaults = EngineOptions()
    results: dict[str, dict] = {}
    for width, height in sizes:
        key = f"{width}x{height}"
        results[key] = {}
        base = {
            "scale": scale,
            "size": [width, height],
            "threads": threads,
            "tiny_folder": str(tiny_folder) if tiny_folder else None,
            "measure_steps": measure_steps,
            "evaluate": evaluate,
        }
        for variant in [None, *modes]:
            what = variant["label"] if variant else "reference"
            say(f"  {key} {what} ...")
            if variant is None:
                spec = {**base, "job": "reference", "seeds": seeds}
            else:
                spec = {**base, "job": "mode", "mode": variant["mode"], "overrides": variant["overrides"], "label": what}
                plain = not variant["overrides"]
                spec["seeds"] = seeds if plain and what == defaults.mode else seeds[:1]
                if evaluate and plain and (sweep == "all" or (sweep == "default" and what == defaults.mode)):
                    spec["sweep"] = sweep_for(what, defaults)
            started = time.perf_counter()
            try:
                results[key][what] = run_worker(spec)
                results[key][what]["process_seconds"] = round(time.perf_counter() - started, 1)
            except BenchError as error:
                errors.append(str(error))
                results[key][what] = {"error": str(error)}
        add_ratios(results[key])
    return results


def weaker(entry: dict, reference: dict) -> str:
    """'WEAKER' when the gain is below the reference's by more than twice the combined standard error."""
    difference = reference["protection_gain"] - entry["protection_gain"]
    if difference <= 0:
        return ""
    se = ((reference.get("protection_gain_se") or 0) ** 2 + (entry.get("protection_gain_se") or 0) ** 2) ** 0.5
    if se == 0 or difference > 2 * se:
        return "WEAKER than reference"
    return "lower, within noise"


def add_ratios(row: dict) -> None:
    reference = row.get("reference", {})
    for what, figures in row.items():
        if what == "reference" or "error" in figures or "error" in reference:
            continue
        figures["speedup"] = reference["seconds_per_image"] / figures["seconds_per_image"]
        figures["memory_ratio"] = figures["peak_bytes"] / reference["peak_bytes"]
        if "protection_gain" in figures and "protection_gain" in reference:
            figures["gain_ratio"] = figures["protection_gain"] / reference["protection_gain"]
            figures["gain_ratio_after_jpeg75"] = figures["gain_after_jpeg75"] / reference["gain_after_jpeg75"]
            figures["verdict"] = weaker(figures, reference)
            for sweep_row in figures.get("sweep", []):
                if "protection_gain" in sweep_row:
                    sweep_row["gain_ratio"] = sweep_row["protection_gain"] / reference["protection_gain"]
                    sweep_row["speedup"] = reference["seconds_per_image"] / sweep_row["seconds"]
                    sweep_row["verdict"] = weaker(sweep_row, reference)


# ---------------------------------------------------------------------------------------- printing


def _num(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def _gib(value) -> str:
    return f"{value / GIB:.2f}" if isinstance(value, (int, float)) else "-"


def print_speed_table(results: dict, scale: str) -> None:
    for size, row in results.items():
        say()
        say(f"{size} ({scale} scale)")
        say(
            f"  {'what':<10} {'dtype':<22} {'s/step':>9} {'cpu s/step':>10} {'overhead s':>10} {'s/image':>10} {'speed-up':>9} "
            f"{'peak GiB':>9} {'model GiB':>9} {'memory':>7}"
        )
        for what, figures in row.items():
            if "error" in figures:
                say(f"  {what:<10} FAILED: {figures['error']}")
                continue
            star = "*" if figures.get("per_image_extrapolated") else " "
            speed = f"{figures['speedup']:.2f}x" if "speedup" in figures else "1.00x"
            memory = f"{figures['memory_ratio']:.2f}x" if "memory_ratio" in figures else "1.00x"
            dtype = figures["dtype"] if figures.get("vae_dtype", figures["dtype"]) == figures["dtype"] else f"{figures['dtype']}/vae {figures['vae_dtype']}"
            say(
                f"  {what:<10} {dtype:<22} {figures['seconds_per_step']:>9.4f} {_num(figures.get('cpu_seconds_per_step')):>10} "
                f"{figures['overhead_seconds']:>10.2f} "
                f"{figures['seconds_per_image']:>9.1f}{star} {speed:>9} {_gib(figures['peak_bytes']):>9} "
                f"{_gib(figures['baseline_bytes']):>9} {memory:>7}"
            )
        any_figures = next((f for f in row.values() if "error" not in f), None)
        if any_figures and any(f.get("per_image_extrapolated") for f in row.values()):
            measured = sorted({f["steps_measured"] for f in row.values() if "steps_measured" in f})
            say(
                "  * per image EXTRAPOLATED: overhead + steps per image x s/step, from "
                f"{'/'.join(map(str, measured))} measured step(s) per process after a warm-up step "
                "(modes: the overhead includes that first step, which on a GPU follows a 10-step warm-up image; "
                "reference: its warm-up step is excluded)"
            )
        for what, figures in row.items():
            if figures.get("coarse_steps_per_image"):
                coarse, steps = figures["coarse_steps_per_image"], figures["steps_per_image"]
                say(
                    f"  {what}: s/step is the mean over an image's {steps} steps, coarse to fine: {coarse} at half the "
                    f"working side, {figures['seconds_per_coarse_step']:.4f} s each, then {steps - coarse} at the working "
                    f"size, {figures['seconds_per_fine_step']:.4f} s each (each stage timed after its own warm-up step)"
                )
        mode_rows = [f for w, f in row.items() if w != "reference" and "error" not in f]
        if mode_rows:
            working = {tuple(f["working_size"]) for f in mode_rows if f.get("working_size")}
            if working and working != {tuple(int(s) for s in size.split("x"))}:
                say(f"  note: the engine worked at {', '.join('x'.join(map(str, w)) for w in working)}; the reference at {size}")
        say("  cpu s/step = process CPU time per step over all threads: on a shared machine it shows the work when wall time is inflated")
        for what, figures in row.items():
            through = figures.get("peak_bytes_through_pgd")
            if through and figures.get("peak_bytes", 0) > through * 1.02:
                say(f"  {what}: peak {_gib(through)} GiB through the PGD steps; the per-image report (gain, metrics) raised it to {_gib(figures['peak_bytes'])} GiB")
        reference = row.get("reference", {})
        if "peak_kind" in reference:
            say(
                f"  memory: peak = {reference['peak_kind']} of the measurement's own process, model building included, "
                f"nothing subtracted; model = {reference['kind']} right after building the model"
            )


def _gain_text(entry: dict) -> str:
    se = entry.get("protection_gain_se")
    return f"{entry['protection_gain']:.3f}" + (f" ± {se:.3f}" if se is not None else "")


def print_quality_table(results: dict) -> None:
    for size, row in results.items():
        reference = row.get("reference", {})
        if "protection_gain" not in reference:
            continue
        seeds = len(reference.get("seeds", [0]))
        say()
        say(f"quality against cost: tiny model, {size}, whole images (every step run), mean of {seeds} seed(s), "
            "gain judged by the fp32 tiny model")
        say(f"  {'what':<40} {'seconds':>8} {'speed-up':>9} {'gain ± s.e.':>15} {'vs ref':>7} {'jpeg75':>7} {'vs ref':>7} {'psnr':>5}")
        ref_gain, ref_after = reference["protection_gain"], reference["gain_after_jpeg75"]
        ref_seconds = reference["seconds_per_image"]
        lines = [(f"reference steps={b['steps']}", b["seconds"], b, weaker(b, reference)) for b in reference.get("by_steps", [])]
        for what, figures in row.items():
            if what == "reference" or "protection_gain" not in figures:
                continue
            one_seed = " (1 seed)" if len(figures.get("seeds", [])) == 1 and seeds > 1 else ""
            lines.append((f"{what} (defaults){one_seed}", figures["seconds_per_image"], figures, figures.get("verdict", "")))
            for entry in figures.get("sweep", []):
                changed = ", ".join(f"{k}={v}" for k, v in (entry.get("changed") or entry).items() if k != "error")
                lines.append((f"{what} {changed}", entry.get("seconds"), entry, entry.get("verdict", "")))
        for name, seconds, entry, verdict in lines:
            if "protection_gain" not in entry:
                say(f"  {name:<40} FAILED: {entry.get('error')}")
                continue
            say(
                f"  {name:<40} {seconds:>8.2f} {ref_seconds / seconds:>8.2f}x {_gain_text(entry):>15} "
                f"{entry['protection_gain'] / ref_gain:>6.2f}x {entry['gain_after_jpeg75']:>7.4f} "
                f"{(entry['gain_after_jpeg75'] - 1) / (ref_after - 1):>6.2f}x {entry['psnr']:>5.1f}  {verdict}"
            )
        say(
            "  gain = mean AdvDM loss of the saved image / the original's over 8 fixed (t, eps, posterior noise) samples "
            "(engine.metrics.protection_figures); 'vs ref' = gain / the reference's 100-step gain; WEAKER = below "
            "the reference by more than twice the combined standard error; jpeg75 = the same gain after Pillow's JPEG "
            "q75 (mean), its 'vs ref' = (gain - 1) / the reference's (gain - 1); seconds = whole image, report included"
        )


def summary_line(speed: dict, quality: dict | None, modes: list[dict]) -> str:
    labels = [variant["label"] for variant in modes]
    default_mode = EngineOptions().mode
    mode = default_mode if default_mode in labels else labels[0]
    size = next(iter(speed))
    figures = speed[size].get(mode, {})
    if "speedup" not in figures:
        return f"{mode}: FAILED ({figures.get('error') or speed[size].get('reference', {}).get('error', 'no figures')})"
    line = f"{mode}: {figures['speedup']:.1f}x faster than reference, memory {figures['memory_ratio']:.2f}x, gain "
    row = next(iter(quality.values())) if quality else {}
    if "gain_ratio" not in row.get(mode, {}):
        return line + "n/a of reference"
    # After JPEG q75 the ratio is of gain - 1: the effect a fine-tuner meets once the image is posted.
    after = (row[mode]["gain_after_jpeg75"] - 1) / (row["reference"]["gain_after_jpeg75"] - 1)
    return line + f"{row[mode]['gain_ratio']:.2f}x of reference ({after:.2f}x after JPEG q75)"


# -------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    parser.add_argument(
        "--steps",
        type=int,
        help="full scale: PGD steps to time per process after one warm-up step (default 2 on a CPU, 10 on a GPU); "
        "tiny scale runs every step of every image and ignores this",
    )
    parser.add_argument("--sizes", help=f"WIDTHxHEIGHT list (default {DEFAULT_SIZES['full']} full, {DEFAULT_SIZES['tiny']} tiny)")
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"comma-separated, from {', '.join(MODES)}; MODE+OPTION[=VALUE]... measures a variant, "
        "e.g. advdm+low_vram or sds+samples_per_step=4+dtype=fp32",
    )
    parser.add_argument("--threads", type=int, help="torch threads for every measurement (default: physical cores)")
    parser.add_argument("--sweep", choices=("default", "all", "none"), default="default", help="tiny settings sweep for the default mode, every mode, or none")
    parser.add_argument("--no-quality", action="store_true", help="full scale: skip the tiny-model quality pass")
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help=f"tiny scale: PGD seeds for the reference and the default mode, gains averaged (default {DEFAULT_SEEDS}; other modes get 1)")
    args = parser.parse_args(argv)

    modes = [parse_variant(m) for m in args.modes.split(",") if m.strip()]
    if not modes:
        parser.error(f"no modes given; choose from {', '.join(MODES)}")
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    seeds = list(range(args.seeds))
    sizes = parse_sizes(args.sizes or DEFAULT_SIZES[args.scale])
    machine = machine_info()
    threads = args.threads or machine["physical_cores"]
    defaults = EngineOptions()
    started = time.perf_counter()

    say(f"fixative bench: scale {args.scale}, sizes {', '.join(f'{w}x{h}' for w, h in sizes)}, modes {', '.join(m['label'] for m in modes)}")
    say(
        f"machine: {machine['cpu']}, {machine['physical_cores']} physical cores ({machine['logical_cpus']} logical), "
        f"{_gib(machine['memory_bytes'])} GiB RAM, load average {machine['load_average_at_start']}; torch threads {threads}"
    )
    shown = {k: v for k, v in defaults.model_dump(mode="json").items() if k not in ("model", "format", "quality", "target", "prompt")}
    say("engine defaults (EngineOptions()): " + ", ".join(f"{k} {v}" for k, v in shown.items()))
    load = machine["load_average_at_start"]
    if load and load[0] > 0.5 * machine["physical_cores"]:
        say(f"WARNING: the machine is busy (load average {load[0]:.1f} on {machine['physical_cores']} cores): "
            "other processes share the cores, so the timings below are noisy, and multi-threaded steps suffer most")
    say("reference: AdvDM as the paper's / Mist v1's code runs it: fp32, 1 (t, eps) per step, encoder + UNet forward and "
        "backward every step, strength 8, step 1, 100 steps, random start, image as given")
    if defaults.strength != 8 or defaults.step_size != 1:
        say(f"WARNING: the engine's default budget ({defaults.strength}, step {defaults.step_size}) is not the reference's (8, step 1)")

    errors: list[str] = []
    report: dict = {"scale": args.scale, "machine": machine, "threads": threads, "engine_defaults": defaults.model_dump(mode="json")}

    need_tiny = args.scale == "tiny" or not args.no_quality
    tiny_folder = None
    if need_tiny:
        from fixative.engine.tiny import TRAINING_STEPS

        tiny_folder, trained = tiny_model(threads)
        report["tiny_model"] = {"folder": str(tiny_folder), "training_seconds": trained, "training_steps": TRAINING_STEPS}
        say(f"tiny model: {tiny_folder}" + (f" (trained now in {trained:.0f} s, not counted below)" if trained else " (cached)"))

    if args.scale == "full":
        say("full scale: SD-1.5 architecture with random weights, built in memory (no save/load), SDPA attention; "
            "text encoder replaced by a random (1, 77, 768) embedding")
        measure_steps = args.steps if args.steps is not None else "auto"
        available, needed = proc_bytes("MemAvailable", "/proc/meminfo"), max(reference_ram_estimate(w, h) for w, h in sizes)
        if available is not None and available < needed:
            say(
                f"WARNING: {available / GIB:.1f} GiB of memory is available and the fp32 reference needs about "
                f"{needed / GIB:.1f} GiB on a CPU: the kernel may kill this run, or another process, for memory"
            )
        speed = measure("full", sizes, modes, threads, None, measure_steps, False, "none", [0], errors)
        print_speed_table(speed, "full")
        quality = None
        if not args.no_quality:
            say()
            say("quality pass on the tiny model ...")
            quality = measure("tiny", [QUALITY_SIZE], modes, threads, tiny_folder, None, True, args.sweep, seeds, errors)
            print_speed_table(quality, "tiny")
            print_quality_table(quality)
    else:
        speed = measure("tiny", sizes, modes, threads, tiny_folder, None, True, args.sweep, seeds, errors)
        quality = {k: v for k, v in speed.items() if (k == f"{QUALITY_SIZE[0]}x{QUALITY_SIZE[1]}")} or speed
        print_speed_table(speed, "tiny")
        print_quality_table(speed)

    first = next((f for row in speed.values() for f in row.values() if "runtime" in f), None)
    if first:
        runtime = first["runtime"]
        gpu = f", GPU {runtime['gpu']}" if "gpu" in runtime else ", no GPU"
        say()
        say(f"runtime: torch {runtime['torch']}, diffusers {runtime.get('diffusers')}, python {runtime['python']}, "
            f"device {runtime['device']}{gpu}, torch threads {runtime['torch_threads']}")
        report["runtime"] = runtime
    report.update({"results": speed, "quality": quality, "seconds": round(time.perf_counter() - started, 1), "errors": errors})
    line = summary_line(speed, quality, modes)
    report["summary"] = line
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
        say(f"figures written to {args.json}")
    say(f"bench took {report['seconds']:.0f} s" + (f"; {len(errors)} measurement(s) FAILED" if errors else ""))
    say(line)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
