"""``fixative protect IMAGE...`` and ``fixative model pull ID``: the engine, by hand.

``protect`` starts from the ``[engine]`` table of the config file (so a model
configured once for the daemon works here too) and lets flags override it.
The model is loaded once for all the images, and only after every input has
been decoded (a damaged, truncated, tiny or oversized file is refused by the
engine's own reader, ``fixative.engine.imaging``) and every output folder has
been test-written: loading takes most of a minute, and on a CPU an image takes
minutes more, which a typo should not cost. A bad image is reported and skipped; the exit code
is 1 when any image failed, after doing the others. No output ever replaces a
file: ``good.png`` and ``good.jpg`` become ``good.protected.png`` and
``good.protected-2.png``, and so does a second run beside the first.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

from fixative.engine.options import STRENGTH_PRESETS

EX_FAILED = 1
EX_USAGE = 2


def strength_argument(value: str) -> int | str:
    """argparse type for ``--strength`` (protect and check): a preset name, or whole 0-255 levels."""
    if value.lower() in STRENGTH_PRESETS:
        return value.lower()
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of 0-255 levels or one of {', '.join(STRENGTH_PRESETS)}, got {value!r}"
        ) from None


MODEL_HELP = ("diffusers folder, .safetensors file, Hugging Face id in the local cache, or a VAE folder; "
              "given more than once, the protection is made against all of them at once")


def add_parsers(commands: argparse._SubParsersAction) -> None:
    protect = commands.add_parser(
        "protect",
        help="protect image files now, without the daemon",
        description="Write a protected copy <stem>.protected.<format> of each IMAGE. "
        "Settings start from the config file's [engine] table; flags override them.",
    )
    protect.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    protect.add_argument("-o", "--output-dir", type=Path, help="folder for the protected copies (default: beside each image)")
    protect.add_argument("--model", action="append", help=MODEL_HELP)
    protect.add_argument("--mode", choices=["advdm", "mist", "sds", "encoder"])
    protect.add_argument("--strength", type=strength_argument,
                         help="budget in 0-255 levels, or subtle (4) / balanced (8) / strong (16)")
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


ENGINE_FLAGS = ("mode", "strength", "steps", "seed", "device", "dtype", "format", "quality", "target")


def engine_options(args: argparse.Namespace, flags: tuple[str, ...]):
    """The config file's ``[engine]`` options with the command's ``flags`` (and its ``--model``s) put over them.

    ``--model`` replaces the configured model or models: once for one, more
    than once for an ensemble.
    """
    from fixative.daemon.settings import load_settings
    from fixative.engine.options import EngineOptions

    configured = load_settings(args.config).engine.model_dump()
    given = {name: getattr(args, name) for name in flags if getattr(args, name) is not None}
    if args.model:
        configured = {name: value for name, value in configured.items() if name not in ("model", "models")}
        given["models"] = args.model
    return EngineOptions(**{**configured, **given})


def _input_problem(image: Path) -> str | None:
    """Why ``image`` cannot be protected: its path, then the picture, decoded whole by the engine's reader."""
    from fixative.engine.errors import BadImage
    from fixative.engine.imaging import read_image

    try:
        mode = image.stat().st_mode
    except FileNotFoundError:
        return f"{image}: no such file"
    except OSError as error:
        return f"{image}: cannot read it: {error.strerror or error}"
    if stat.S_ISDIR(mode):
        return f"{image}: is a folder; name the image files in it"
    if not stat.S_ISREG(mode):
        return f"{image}: not a regular file"
    if not os.access(image, os.R_OK):
        return f"{image}: no permission to read it"
    try:
        read_image(image)  # decoded again when protected: holding every input decoded could fill the memory
    except BadImage as error:
        return str(error)
    except OSError as error:
        return f"{image}: cannot read it: {error.strerror or error}"
    return None


def _folder_problems(images: list[Path], problems: list[str | None], output_dir: Path | None) -> list[str]:
    """Why the protected copies could not be written: each output folder created if needed, and test-written."""
    from fixative.daemon.files import MachineError, check_writable

    folders = [output_dir] if output_dir else [image.parent for image, problem in zip(images, problems) if not problem]
    found = []
    for folder in dict.fromkeys(folders):
        try:
            check_writable(folder, role="output folder")
        except MachineError as error:
            found.append(str(error))
    return found


def _output_paths(images: list[Path], output_dir: Path | None, suffix: str) -> Iterator[Path]:
    """A distinct output for each image, none of them an existing file (the first free ``-N``)."""
    taken: set[Path] = set()
    for image in images:
        folder = output_dir or image.parent
        for n in itertools.count(1):
            output = folder / f"{image.stem}.protected{'' if n == 1 else f'-{n}'}{suffix}"
            if output not in taken and not os.path.lexists(output):
                taken.add(output)
                yield output
                break


def _print_report(image: Path, output: Path, report: dict, warnings: list[str]) -> None:
    from fixative.daemon.status import survival_line

    print(
        f"{image} -> {output}\n"
        f"  {report['mode']} · strength {report['strength']} · {report['steps']} steps · "
        f"{report['seconds']:.1f} s on {report['device']}\n"
        f"  PSNR {report['psnr']:.1f} dB · SSIM {report['ssim']:.3f} · max change {report['max_delta']} levels"
    )
    for name, bite in report.get("models", {"": report}).items():
        gain = "" if bite.get("protection_gain") is None else f"protection gain {bite['protection_gain']:.3f} · "
        print(f"  {name + ': ' if name else ''}{gain}latent shift {bite['latent_shift']:.3f}")
    if survives := survival_line(report):
        print(f"  survives: {survives}")
    for warning in warnings:
        print(f"  warning: {warning}")


def _print_failure(args: argparse.Namespace, image: Path, error: str) -> None:
    """One line per failed image: a JSON object in input order with --json, else a line on stderr."""
    if not error.startswith(f"{image}: "):  # most messages name the file already
        error = f"{image}: {error}"
    if args.json:
        print(json.dumps({"image": str(image), "error": error}), flush=True)
    else:
        print(f"failed: {error}", file=sys.stderr)


def print_option_errors(error) -> None:
    """A pydantic ValidationError of the command's options, a line each, named by flag where one is to blame."""
    for problem in error.errors():
        # The options' own checks across flags (repeated --model) name what they blame in the message itself.
        where = f"--{problem['loc'][0]}: " if problem["loc"] else ""
        print(f"fixative: {where}{problem['msg'].removeprefix('Value error, ')}", file=sys.stderr)


def run_protect(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    try:
        options = engine_options(args, ENGINE_FLAGS)  # a ConfigError from the config file is reported by cli.main (exit 78)
    except ValidationError as error:
        print_option_errors(error)
        return EX_USAGE

    if args.output_dir and args.output_dir.exists() and not args.output_dir.is_dir():
        print(f"fixative: -o {args.output_dir} is a file; name a folder for the protected copies", file=sys.stderr)
        return EX_USAGE
    problems = [_input_problem(image) for image in args.images]
    if all(problems):  # nothing to protect: do not spend a minute loading the model
        for image, problem in zip(args.images, problems):
            _print_failure(args, image, problem)
        return EX_FAILED
    folder_problems = _folder_problems(args.images, problems, args.output_dir)
    if folder_problems:  # found now, not after every image's minutes of work
        for problem in folder_problems:
            print(f"fixative: {problem}", file=sys.stderr)
        return EX_FAILED
    from fixative.engine.imaging import OUTPUT_FORMATS

    outputs = list(_output_paths(args.images, args.output_dir, OUTPUT_FORMATS[options.format]))

    from tqdm import tqdm

    from fixative.daemon.files import write_atomically
    from fixative.engine.ensemble import load_protector
    from fixative.engine.errors import EngineError
    from fixative.engine.protect import protect_file

    try:
        model = load_protector(options)
    except EngineError as error:
        print(f"fixative: {error}", file=sys.stderr)
        return EX_FAILED

    failed = 0
    for image, problem, output in zip(args.images, problems, outputs):
        if problem:
            failed += 1
            _print_failure(args, image, problem)
            continue
        # The bar is for a person at a terminal (in a log it would be a line of carriage returns).
        with tqdm(total=options.steps, desc=image.name, unit="step", file=sys.stderr, leave=False,
                  disable=not sys.stderr.isatty()) as bar:

            def progress(step: int, total: int, loss: float) -> None:
                bar.update(step - bar.n)
                bar.set_postfix(loss=f"{loss:.4f}")

            error = None
            try:
                result = protect_file(image, model, options, progress)
            except EngineError as engine_error:
                error = str(engine_error)
            except OSError as os_error:  # it moved or lost its permissions since it was checked
                error = f"cannot read it: {os_error.strerror or os_error}"
        # Here the bar is closed and its line cleared, so no line about the image is printed onto it.
        if error is None:
            try:
                write_atomically(output, result.data)  # a full disk leaves no half-written copy
            except OSError as os_error:
                error = f"cannot write {output}: {os_error.strerror or os_error}"
        if error is not None:
            failed += 1
            _print_failure(args, image, error)
            continue
        if args.json:
            print(json.dumps({"image": str(image), "output": str(output), **result.report, "warnings": result.warnings}), flush=True)
        else:
            _print_report(image, output, result.report, result.warnings)
    return EX_FAILED if failed else 0


def run_pull(args: argparse.Namespace) -> int:
    from fixative.engine.model_files import pull_model

    model_id = args.model_id
    if model_id is None:
        from fixative.daemon.settings import load_settings

        model_id = load_settings(args.config).engine.model
    print(f"downloading {model_id} (VAE, UNet, text encoder, configs; about 2.5 GB for SD 1.5) ...", file=sys.stderr)
    try:
        folder = pull_model(model_id)
    except Exception as error:  # network, auth, unknown repo: all end the same way for the user
        print(f"fixative: could not download {model_id}: {error}", file=sys.stderr)
        return EX_FAILED
    print(f"{model_id} is in {folder}")
    return 0
