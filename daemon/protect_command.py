"""``fixative protect IMAGE...`` and ``fixative model pull ID``: the engine, by hand.

``protect`` starts from the ``[engine]`` table of the config file (so a model
configured once for the daemon works here too) and lets flags override it.
The model is loaded once for all the images. A bad image is reported and
skipped; the exit code is 1 when any image failed, after doing the others.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.options import STRENGTH_PRESETS

EX_FAILED = 1
EX_USAGE = 2


def _strength(value: str) -> int | str:
    if value.lower() in STRENGTH_PRESETS:
        return value.lower()
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of 0-255 levels or one of {', '.join(STRENGTH_PRESETS)}, got {value!r}"
        ) from None


def add_parsers(commands: argparse._SubParsersAction) -> None:
    protect = commands.add_parser(
        "protect",
        help="protect image files now, without the daemon",
        description="Write a protected copy <stem>.protected.<format> of each IMAGE. "
        "Settings start from the config file's [engine] table; flags override them.",
    )
    protect.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    protect.add_argument("-o", "--output-dir", type=Path, help="folder for the protected copies (default: beside each image)")
    protect.add_argument("--model", help="diffusers folder, .safetensors file, or Hugging Face id in the local cache")
    protect.add_argument("--mode", choices=["advdm", "mist", "sds", "encoder"])
    protect.add_argument("--strength", type=_strength, help="budget in 0-255 levels, or subtle (4) / balanced (8) / strong (16)")
    protect.add_argument("--steps", type=int)
    protect.add_argument("--seed", type=int)
    protect.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"])
    protect.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"])
    protect.add_argument("--format", choices=["png", "jpeg", "webp"])
    protect.add_argument("--quality", type=int, help="JPEG/WebP quality, 1-100")
    protect.add_argument("--target", type=Path, help="target image for the mist and encoder modes")
    protect.add_argument("--json", action="store_true", help="print one JSON object per image instead of a report")
    protect.set_defaults(run=run_protect)

    model = commands.add_parser("model", help="manage the Stable Diffusion model on disk")
    model_commands = model.add_subparsers(dest="model_command", required=True, metavar="COMMAND")
    pull = model_commands.add_parser(
        "pull",
        help="download a model's VAE, UNet, text encoder and configs (safetensors only) into the Hugging Face cache",
    )
    pull.add_argument("model_id", nargs="?", help="Hugging Face id (default: the configured [engine] model)")
    pull.set_defaults(run=run_pull)


ENGINE_FLAGS = ("model", "mode", "strength", "steps", "seed", "device", "dtype", "format", "quality", "target")


def _options(args: argparse.Namespace):
    from daemon.settings import load_settings
    from engine.options import EngineOptions

    configured = load_settings(args.config).engine.model_dump()
    flags = {name: getattr(args, name) for name in ENGINE_FLAGS if getattr(args, name) is not None}
    return EngineOptions(**{**configured, **flags})


def _output_path(image: Path, output_dir: Path | None, suffix: str) -> Path:
    return (output_dir or image.parent) / f"{image.stem}.protected{suffix}"


def _print_report(image: Path, output: Path, report: dict, warnings: list[str]) -> None:
    print(
        f"{image} -> {output}\n"
        f"  {report['mode']} · strength {report['strength']} · {report['steps']} steps · "
        f"{report['seconds']:.1f} s on {report['device']}\n"
        f"  protection gain {report['protection_gain']:.3f} · latent shift {report['latent_shift']:.3f} · "
        f"PSNR {report['psnr']:.1f} dB · SSIM {report['ssim']:.3f} · max change {report['max_delta']} levels"
    )
    for warning in warnings:
        print(f"  warning: {warning}")


def run_protect(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    try:
        options = _options(args)  # a ConfigError from the config file is reported by cli.main (exit 78)
    except ValidationError as error:
        for problem in error.errors():
            print(f"fixative: --{problem['loc'][0]}: {problem['msg']}", file=sys.stderr)
        return EX_USAGE

    from tqdm import tqdm

    from daemon.worker import write_atomically
    from engine.errors import EngineError
    from engine.model import load_model
    from engine.protect import protect_file

    try:
        model = load_model(options)
    except EngineError as error:
        print(f"fixative: {error}", file=sys.stderr)
        return EX_FAILED
    if args.output_dir:
        args.output_dir.mkdir(parents=True, exist_ok=True)

    failed = 0
    for image in args.images:
        with tqdm(total=options.steps, desc=image.name, unit="step", file=sys.stderr, leave=False) as bar:

            def progress(step: int, total: int, loss: float) -> None:
                bar.update(step - bar.n)
                bar.set_postfix(loss=f"{loss:.4f}")

            try:
                result = protect_file(image, model, options, progress)
                output = _output_path(image, args.output_dir, result.suffix)
                write_atomically(output, result.data)  # a full disk leaves no half-written copy
            except (EngineError, OSError) as error:
                failed += 1
                if args.json:
                    print(json.dumps({"image": str(image), "error": str(error)}), flush=True)
                else:
                    print(f"{image}: failed: {error}", file=sys.stderr)
                continue
        if args.json:
            print(json.dumps({"image": str(image), "output": str(output), **result.report, "warnings": result.warnings}), flush=True)
        else:
            _print_report(image, output, result.report, result.warnings)
    return EX_FAILED if failed else 0


def run_pull(args: argparse.Namespace) -> int:
    from engine.model import pull_model

    model_id = args.model_id
    if model_id is None:
        from daemon.settings import load_settings

        model_id = load_settings(args.config).engine.model
    print(f"downloading {model_id} (VAE, UNet, text encoder, configs; about 2.5 GB for SD 1.5) ...", file=sys.stderr)
    try:
        folder = pull_model(model_id)
    except Exception as error:  # network, auth, unknown repo: all end the same way for the user
        print(f"fixative: could not download {model_id}: {error}", file=sys.stderr)
        return EX_FAILED
    print(f"{model_id} is in {folder}")
    return 0
