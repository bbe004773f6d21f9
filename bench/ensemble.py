"""The cost of one perturbation against several models: an ensemble's step against its members' steps alone.

    python -m bench.ensemble [--steps 8] [--rounds 3] [--threads 1] [--json FILE]

The members are tiny: the tests' trained model (A), a second one built with
another seed (B), and a 16-channel VAE alone with Flux.1's scale and shift (V).
Every configuration (each member alone, A+B, A+B+V) protects the same 256 px
painting through ``engine.protect.protect_bytes``, in one process, the
configurations interleaved round by round so that the machine's load falls on
all of them alike; a step's time is the report's ``seconds_per_step``, the
median over rounds. The figure is the same-run ratio of an ensemble's step to
the sum of its members' steps (the target: about 1, no more).

Memory: the members are held together, so the weights add up; the table gives
each configuration's weights and the peak RSS a protection adds above the
loaded models (``/proc/self/clear_refs``, Linux).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
from pathlib import Path

from bench.common import machine_info, proc_bytes, reset_peak, say, tiny_model

CONFIGURATIONS = {"A": "A", "B": "B", "V": "V", "A+B": "AB", "A+B+V": "ABV"}


def _members(folder: Path, threads: int) -> dict[str, Path]:
    import torch
    from diffusers import AutoencoderKL

    from fixative.engine.tiny import build_tiny_model, tiny_vae

    model_a, _ = tiny_model(threads)
    model_b = build_tiny_model(folder / "b", seed=1)
    # Only the arguments: the config's _use_default_values would put the defaults back over Flux's scale and shift.
    arguments = {k: v for k, v in tiny_vae().config.items() if not k.startswith("_")}
    torch.manual_seed(3)
    flux = dict(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    AutoencoderKL(**{**arguments, **flux}).save_pretrained(folder / "v", safe_serialization=True)
    return {"A": model_a, "B": model_b, "V": folder / "v"}


def _painting_png() -> bytes:
    from PIL import Image

    from fixative.engine.tiny import synthetic_paintings

    rgb = ((synthetic_paintings(1, 256, seed=5)[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def _weight_bytes(ensemble) -> int:
    """The bytes of the weights an ensemble holds: every member's VAE encoder, and UNet where it has one."""
    parts = [part for member in ensemble.members.values() for part in (member.vae, getattr(member, "unet", None)) if part]
    return sum(p.numel() * p.element_size() for part in parts for p in part.parameters())


def measure(steps: int, rounds: int, threads: int) -> dict:
    import torch

    from fixative.engine.ensemble import load_ensemble
    from fixative.engine.options import EngineOptions
    from fixative.engine.protect import protect_bytes

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as folder:
        paths = _members(Path(folder), threads)
        protectors, options = {}, {}
        for name, letters in CONFIGURATIONS.items():
            members = [str(paths[letter]) for letter in letters]
            options[name] = EngineOptions(models=members, device="cpu", dtype="fp32", steps=steps, mode="sds")
            # One member alone is an ensemble of one: the same code path as the ensembles, so the ratio is the members'.
            protectors[name] = load_ensemble(options[name])
        png = _painting_png()
        times: dict[str, list[float]] = {name: [] for name in CONFIGURATIONS}
        peaks: dict[str, int] = {}
        for _ in range(rounds):
            for name in CONFIGURATIONS:
                resident = proc_bytes("VmRSS")
                reset_peak()
                report = protect_bytes(png, "painting.png", protectors[name], options[name]).report
                times[name].append(report["seconds_per_step"])
                peaks[name] = max(peaks.get(name, 0), proc_bytes("VmHWM") - resident)
        weights = {name: _weight_bytes(protector) for name, protector in protectors.items()}
    step = {name: statistics.median(values) for name, values in times.items()}
    ratios = {name: step[name] / sum(step[letter] for letter in letters)
              for name, letters in CONFIGURATIONS.items() if len(letters) > 1}
    return {"machine": machine_info(), "steps": steps, "rounds": rounds, "threads": threads,
            "seconds_per_step": step, "all_seconds_per_step": times, "ratio_to_members_sum": ratios,
            "weight_bytes": weights, "protection_peak_rss_bytes": peaks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    figures = measure(args.steps, args.rounds, args.threads)
    say(f"{figures['machine']['cpu']}, {args.threads} thread(s), {args.steps} sds steps, median of {args.rounds} rounds")
    say("| members | s/step | ratio to the members' sum | weights MB | protection's peak RSS MB |")
    say("|---|---|---|---|---|")
    for name in CONFIGURATIONS:
        ratio = figures["ratio_to_members_sum"].get(name)
        say(f"| {name} | {figures['seconds_per_step'][name]:.4f} | {'' if ratio is None else f'{ratio:.2f}'} | "
            f"{figures['weight_bytes'][name] / 1e6:.1f} | {figures['protection_peak_rss_bytes'][name] / 1e6:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
