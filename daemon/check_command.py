"""``fixative check ORIGINALS_DIR``: fine-tune on the protected copies as a mimic would, and show the result.

The math is ``fixative.engine.mimicry``'s; this module finds and vets the files,
makes the protected (and served) copies, drives one progress bar, and writes
the contact sheet, the JSON report and the verdict. Everything that can be
wrong with the input (no images, a copy that does not match its original, a
pickle model) is found before any training starts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fixative.daemon.inbox_filter import IMAGE_SUFFIXES, ignore_reason
from fixative.daemon.protect_command import EX_FAILED, EX_USAGE, MODEL_HELP, engine_options, print_option_errors, strength_argument

DEFAULT_STEPS = 500  # LoRA steps: what diffusers' DreamBooth LoRA example trains for
# A "protected copy" further than this from its original is some other picture:
# the strongest preset (16 levels) keeps PSNR near 30 dB.
MIN_COPY_PSNR = 20.0
# A PGD step in UNet forwards: at 512 px the VAE encoder's forward (1.1 TFLOP) outweighs the UNet's (0.8),
# and the attack runs the encoder forward and backward, the UNet forward (and backward for advdm).
PGD_STEP_UNITS = 6
TILE = 128  # contact-sheet tile side, pixels
LABEL_WIDTH = 150


class CheckError(Exception):
    """Bad input, explained."""


def add_parser(commands: argparse._SubParsersAction) -> None:
    check = commands.add_parser(
        "check",
        help="does it work? fine-tune a LoRA on the protected copies as a mimic would, and compare",
        description="Train a LoRA (rank 4, the diffusers recipe) once on the originals and once on their protected "
        "copies, with the same seed and steps, and compare what each learned of the originals: denoising loss and "
        "sample distances, with a contact sheet. Protected copies come from --protected, or are made now with the "
        "config file's [engine] settings.",
    )
    check.add_argument("originals", type=Path, metavar="ORIGINALS_DIR", help="the works of one style, typically 5-20")
    check.add_argument("--protected", type=Path, metavar="DIR",
                       help="their protected copies, in the same subfolders, named NAME.png, NAME.protected.png or, "
                       "as check saves them, NAME.jpg.png; default: made now")
    check.add_argument("--after", action="append", default=[], metavar="PIPELINE",
                       help="also train on the protected copies as a platform serves them, e.g. jpeg75 or half+jpeg75 "
                       "(repeatable)")
    check.add_argument("-o", "--output-dir", type=Path,
                       help="where the report, contact sheet and copies go (default: ./fixative-check-DATE-TIME)")
    check.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"LoRA training steps (default {DEFAULT_STEPS})")
    check.add_argument("--prompt", help="the mimic's caption (default: 'a painting in the style of sks')")
    check.add_argument("--guidance", type=float, help="classifier-free guidance for the samples (default 7.5; 1 = none)")
    check.add_argument("--seed", type=int, default=0, help="one seed for every LoRA's crops, noise and order")
    check.add_argument("--model", action="append", help=MODEL_HELP + " (the mimic fine-tunes the first)")
    check.add_argument("--mode", choices=["advdm", "mist", "sds", "encoder"], help="for copies made now")
    check.add_argument("--strength", type=strength_argument, help="for copies made now: 0-255 levels or a preset")
    check.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"])
    check.set_defaults(run=run_check)


# ------------------------------------------------------------------------------------------- input


def find_originals(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise CheckError(f"{folder} is not a folder")
    found = sorted(p for p in folder.rglob("*") if p.is_file() and ignore_reason(p, folder) is None)
    if not found:
        raise CheckError(f"no images in {folder} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return found


def copy_paths(originals: list[Path], originals_dir: Path, protected_dir: Path, suffix: str) -> list[Path]:
    """Where the copies made now go: each original's relative path, ``suffix`` added where the format differs.

    ``a/x.png`` and ``b/x.png`` keep their folders, and ``y.jpg`` becomes
    ``y.jpg.png`` beside ``y.png``'s ``y.png``, so no copy takes another's
    name. Only ``y.jpg`` beside an original named ``y.jpg.png`` could: that is
    refused before any work, never overwritten.
    """
    paths = []
    for original in originals:
        relative = original.relative_to(originals_dir)
        name = relative.name if relative.suffix.lower() == suffix else f"{relative.name}{suffix}"
        paths.append(protected_dir / relative.parent / name)
    clashes = sorted({path for path in paths if paths.count(path) > 1})
    if clashes:
        raise CheckError(f"two originals would both have their protected copy saved as {clashes[0]}; "
                         "rename one of them")
    return paths


def find_copy(original: Path, originals_dir: Path, protected_dir: Path) -> Path:
    """The copy in the same subfolder of ``protected_dir``: ``NAME.SUFFIX.*`` (as :func:`copy_paths` names a copy
    in another format), else ``NAME.*`` or ``NAME.protected.*`` (what ``fixative protect`` writes)."""
    relative = original.relative_to(originals_dir)
    folder = protected_dir / relative.parent
    images = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    # The whole name first: y.jpg.png is y.jpg's copy alone, where the stem y would also take y.png's.
    matches = ([p for p in images if p.stem == relative.name]
               or [p for p in images if p.stem in {relative.stem, f"{relative.stem}.protected"}])
    if not matches:
        raise CheckError(f"no protected copy of {relative} in {folder} "
                         f"(looked for {relative.name}.*, {relative.stem}.* and {relative.stem}.protected.*)")
    if len(matches) > 1:
        raise CheckError(f"several candidates for the protected copy of {relative}: {', '.join(p.name for p in matches)}")
    return matches[0]


def vet_copy(original_rgb, copy_rgb, original: Path, copy: Path) -> None:
    """Refuse a "protected copy" that is not one: another size, the original itself, or another picture."""
    from fixative.engine.metrics import max_delta, psnr

    if copy_rgb.shape != original_rgb.shape:
        height, width = original_rgb.shape[:2]
        raise CheckError(
            f"{copy} is {copy_rgb.shape[1]}x{copy_rgb.shape[0]}, but its original {original} is {width}x{height}: "
            "not its protected copy"
        )
    if max_delta(original_rgb, copy_rgb) == 0:
        raise CheckError(f"{copy} is identical to {original}: it is not protected")
    quality = psnr(original_rgb, copy_rgb)
    if quality < MIN_COPY_PSNR:
        raise CheckError(f"{copy} differs from {original} far beyond any protection (PSNR {quality:.1f} dB): not its protected copy")


def read(path: Path):
    from fixative.engine.errors import BadImage
    from fixative.engine.imaging import read_image

    try:
        return read_image(path)
    except BadImage as error:
        raise CheckError(str(error)) from error


# ------------------------------------------------------------------------------------------ output


def contact_sheet(rows: list[tuple[str, list]]):
    """One labelled row of tiles per (label, images), images as uint8 HxWx3 arrays."""
    from PIL import Image, ImageDraw

    columns = max(len(images) for _, images in rows)
    sheet = Image.new("RGB", (LABEL_WIDTH + columns * TILE, len(rows) * TILE), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, images) in enumerate(rows):
        draw.text((6, r * TILE + TILE // 2 - 6), label, fill="black")
        for c, rgb in enumerate(images):
            tile = Image.fromarray(rgb).resize((TILE, TILE), Image.Resampling.LANCZOS)
            sheet.paste(tile, (LABEL_WIDTH + c * TILE, r * TILE))
    return sheet


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def verdict(report: dict) -> list[str]:
    """The figures, and what they mean; never more than they show."""
    base, loras = report["base"], report["loras"]
    held = report["held_out"]
    lines = [
        f"{'':26}{'loss, trained':>15}{'loss, held out':>16}{'colour dist':>13}{'style dist':>13}",
    ]
    for name, figures in [("base (no LoRA)", base)] + [(f"LoRA on {name}", f) for name, f in loras.items()]:
        held_text = "-" if figures["loss_held_out_originals"] is None else f"{figures['loss_held_out_originals']:.5f}"
        lines.append(
            f"{name:26}{figures['loss_trained_originals']:>15.5f}{held_text:>16}"
            f"{figures['colour_distance']:>13.3f}{figures['style_distance']:>13.3f}"
        )
    lines.append("")
    clean = loras["clean"]
    if clean["loss_trained_originals"] >= base["loss_trained_originals"]:
        lines.append(
            "The clean LoRA did not lower the loss on the originals: it learned nothing measurable in "
            f"{report['recipe']['steps']} steps, so this run cannot say whether the protection works. Try more --steps."
        )
        return lines
    drop = 1 - clean["loss_trained_originals"] / base["loss_trained_originals"]
    lines.append(
        f"The clean LoRA lowered the loss on the works it trained on by {100 * drop:.1f}% against the base model; "
        "the smaller that is, the noisier the percentages below."
    )
    lines.append(
        "Loss: how badly each model predicts the noise on your originals (lower = it learned your images better). "
        "Distances: how far its samples are from your originals in colour and in style statistics "
        "(higher = further from your style)."
    )
    for name, figures in loras.items():
        if name == "clean":
            continue
        ratio, learned = figures["ratio"], figures["learned"]
        held_text = f", held-out works {_percent(learned['loss_held_out_originals'])}" if held else ""
        lines.append(
            f"- {name}: learned {_percent(learned['loss_trained_originals'])} of what the clean LoRA learned "
            f"(trained works{held_text}); its samples are {ratio['colour_distance']:.2f}x as far in colour and "
            f"{ratio['style_distance']:.2f}x in style statistics as the clean LoRA's."
        )
    lines.append(
        "Below 100% learned and above 1.00x distance mean the copies taught your style less well than the originals. "
        f"This is one seed and one recipe (a rank-{report['recipe']['lora_rank']} LoRA): differences of a few percent "
        "are within run-to-run noise, "
        "and other fine-tuning methods may learn more. Look at the contact sheet."
    )
    for key, what in (("colour_distance", "colour"), ("style_distance", "style statistics")):
        if clean[key] >= base[key]:
            lines.append(
                f"Note: the clean LoRA's samples are no closer to your originals in {what} than the base model's, "
                "so on this run that distance does not measure what was learned; read the loss."
            )
    return lines


# --------------------------------------------------------------------------------------------- run


def _human(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def run_check(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    try:
        options = engine_options(args, ("mode", "strength", "device"))
    except ValidationError as error:
        print_option_errors(error)
        return EX_USAGE
    try:
        return _check(args, options)
    except CheckError as error:
        print(f"fixative check: {error}", file=sys.stderr)
        return EX_FAILED


def _check(args: argparse.Namespace, options) -> int:
    from fixative.engine.publishing import PIPELINES

    unknown = [name for name in args.after if name not in PIPELINES]
    if unknown:
        raise CheckError(f"unknown --after pipeline {', '.join(unknown)}; known: {', '.join(PIPELINES)}")
    if args.steps < 1:
        raise CheckError("--steps must be at least 1")
    paths = find_originals(args.originals)
    sources = [read(path) for path in paths]
    output_dir = args.output_dir or Path(f"fixative-check-{time.strftime('%Y%m%d-%H%M%S')}")
    copies = None
    if args.protected:
        copies = []
        for path, source in zip(paths, sources):
            copy = find_copy(path, args.originals, args.protected)
            rgb = read(copy).rgb
            vet_copy(source.rgb, rgb, path, copy)
            copies.append(rgb)
    else:
        from fixative.engine.imaging import OUTPUT_FORMATS

        planned = copy_paths(paths, args.originals, output_dir / "protected", OUTPUT_FORMATS[options.format])

    from tqdm import tqdm

    from fixative.engine import mimicry
    from fixative.engine.ensemble import load_protector
    from fixative.engine.errors import EngineError
    from fixative.engine.model import load_model
    from fixative.engine.pixels import to_rgb
    from fixative.engine.protect import protect_image
    from fixative.engine.publishing import serve

    try:
        # The mimic fine-tunes the first model; an ensemble protects with a copy of its own,
        # loaded first so that a missing member is named before any loading.
        ensemble = load_protector(options) if options.models and copies is None else None
        mimic_base = load_model(options.model_copy(update={"models": None}), generation=True)
        protector = ensemble or mimic_base
    except EngineError as error:
        raise CheckError(str(error)) from error
    output_dir.mkdir(parents=True, exist_ok=True)
    model = mimicry.with_prompt(mimic_base, args.prompt or mimicry.DEFAULT_PROMPT)

    loras = 2 + len(args.after)
    units = mimicry.work_units(len(paths), loras, args.steps)
    units += 0 if copies else len(paths) * options.steps * PGD_STEP_UNITS
    seconds, flops = mimicry.unit_cost(model)
    estimate = (
        f"{len(paths)} originals, {loras} LoRAs of {args.steps} steps: about {units * flops / 1e12:.0f} TFLOP; "
        f"at this machine's measured speed, about {_human(units * seconds)} (an estimate)"
    )
    if model.device.type == "cpu":
        print(f"fixative check runs on the CPU, which is slow: {estimate}. A GPU takes minutes.", file=sys.stderr)
    else:
        print(f"fixative check on {model.device}: {estimate}.", file=sys.stderr)

    started = time.perf_counter()
    bar_format = "{desc}: {percentage:3.0f}%|{bar}| {elapsed} elapsed, {remaining} left"
    with tqdm(total=round(units), file=sys.stderr, desc="check", bar_format=bar_format, mininterval=0.5) as bar:
        if copies is None:
            copies = []
            for path, source, copy in zip(paths, sources, planned):
                bar.set_description(f"protecting {path.name}")
                done = [0]

                def step(n: int, total: int, loss: float) -> None:
                    bar.update((n - done[0]) * PGD_STEP_UNITS)
                    done[0] = n

                try:
                    result = protect_image(source, protector, options, step)
                except EngineError as error:
                    raise CheckError(f"{path}: {error}") from error
                copy.parent.mkdir(parents=True, exist_ok=True)
                copy.write_bytes(result.data)
                copies.append(read(copy).rgb)
        originals = [source.rgb for source in sources]
        training_sets = {"clean": originals, "protected": copies}
        for name in args.after:
            training_sets[f"protected+{name}"] = [serve(rgb, name) for rgb in copies]
        bar.set_description("fine-tuning and judging")
        report, samples = mimicry.mimicry_check(
            model, originals, training_sets, args.steps, args.seed,
            mimicry.GUIDANCE if args.guidance is None else args.guidance, bar.update,
        )

    judged = mimicry.Originals.prepare(model, originals).pixels[: mimicry.SAMPLE_COUNT]
    rows = [("originals", [to_rgb(x) for x in judged])]
    rows += [(f"LoRA: {name}", [to_rgb(x) for x in samples[name]]) for name in training_sets]
    sheet_path = output_dir / "contact-sheet.png"
    contact_sheet(rows).save(sheet_path)
    report.update(
        {
            "originals_dir": str(args.originals),
            "files": [str(p) for p in paths],
            "protected": str(args.protected) if args.protected else "made now",
            "engine": options.model_dump(mode="json"),
            "prompt": args.prompt or mimicry.DEFAULT_PROMPT,
            "device": str(model.device),
            "seconds": round(time.perf_counter() - started, 1),
            "contact_sheet": {"path": str(sheet_path), "rows": [label for label, _ in rows], "tile": TILE},
        }
    )
    (output_dir / "check.json").write_text(json.dumps(report, indent=2, default=str))
    print("\n".join(verdict(report)))
    print(f"\ncontact sheet: {sheet_path}\nreport: {output_dir / 'check.json'}")
    return 0
