"""``fixative protect`` as a real subprocess, on the tiny model, with real good and bad files.

Each subprocess imports torch and diffusers (several seconds on two cores), so
the cases are grouped into few invocations. HOME, XDG_* and the Hugging Face
cache point into tmp_path, so no real user configuration or model is read.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import painting, read_terminal

REPO = Path(__file__).resolve().parents[1]
REPORT_KEYS = {
    "mode", "strength", "steps", "step_size", "samples_per_step", "seed", "device", "dtype", "model", "size",
    "working_size", "format", "seconds", "seconds_per_step", "psnr", "ssim", "max_delta", "loss_original",
    "loss_protected", "protection_gain", "latent_shift",
}


@pytest.fixture
def env(tmp_path: Path, tiny_model: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("FIXATIVE_", "XDG_", "HF_"))}
    home = tmp_path / "home"
    home.mkdir()
    config = tmp_path / "config.toml"
    config.write_text(f'[engine]\nmodel = "{tiny_model}"\ndevice = "cpu"\nsteps = 3\n')
    return {
        **clean,
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_STATE_HOME": str(home / ".local" / "state"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "HF_HOME": str(home / ".cache" / "huggingface"),
        "HF_HUB_OFFLINE": "1",
        "FIXATIVE_CONFIG": str(config),
    }


def fixative(env: dict[str, str], *argv: str, script: bool = False) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "fixative")] if script else [sys.executable, "-m", "fixative.daemon.cli"]
    return subprocess.run([*command, *argv], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_painting(path: Path, height: int = 256, width: int = 320, seed: int = 5) -> Path:
    Image.fromarray(painting(height, width, seed=seed)).save(path)
    return path


def bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """Files that must each fail with a clear message: name -> (path, words the error must contain)."""
    empty = folder / "empty.png"
    empty.write_bytes(b"")
    text = folder / "notes.png"
    text.write_text("these are my notes, not a picture\n" * 20)
    whole = write_painting(folder / "whole.png", seed=9).read_bytes()
    truncated = folder / "truncated.png"
    truncated.write_bytes(whole[: len(whole) // 2])
    (folder / "whole.png").unlink()
    animated = folder / "animated.gif"
    frames = [Image.fromarray(painting(300, 300, seed=s)).convert("P") for s in (1, 2)]
    frames[0].save(animated, save_all=True, append_images=frames[1:], duration=100, loop=0)
    small = write_painting(folder / "thumbnail.png", height=100, width=120)
    missing = folder / "missing.png"
    return {
        "empty": (empty, "empty"),
        "not an image": (text, "not an image"),
        "truncated": (truncated, "damaged"),
        "animated": (animated, "animated"),
        "too small": (small, "at least 256"),
        "missing": (missing, "missing.png"),
    }


def test_json_mix_of_good_and_bad_files(env: dict[str, str], tmp_path: Path, tiny_model: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = write_painting(inputs / "good art.png")
    bad = bad_files(inputs)
    before = {path: digest(path) for path in inputs.iterdir()}
    out = tmp_path / "out"

    done = fixative(
        env, "protect", str(good), *(str(path) for path, _ in bad.values()),
        "-o", str(out), "--model", str(tiny_model), "--strength", "subtle", "--steps", "3", "--seed", "4", "--json", "--mode", "advdm",
    )
    assert done.returncode == 1, done.stderr

    # Good or bad, each image gets one JSON object on stdout, in order; nothing else goes there.
    objects = [json.loads(line) for line in done.stdout.splitlines()]
    assert [o["image"] for o in objects] == [str(good), *(str(path) for path, _ in bad.values())]
    report = objects[0]
    assert REPORT_KEYS <= set(report), REPORT_KEYS - set(report)
    assert "error" not in report
    assert report["output"] == str(out / "good art.protected.png")
    assert report["mode"] == "advdm" and report["strength"] == 4 and report["steps"] == 3 and report["seed"] == 4
    assert report["max_delta"] <= 4 and report["size"] == [320, 256]
    assert report["warnings"] == []
    for (name, (path, words)), failure in zip(bad.items(), objects[1:]):
        assert set(failure) == {"image", "error"}, name
        assert words in failure["error"], (name, failure["error"])
        assert str(path.name) in failure["error"], (name, failure["error"])
        assert "Traceback" not in failure["error"]

    # Only the good image was written, and it is within the budget of its original.
    assert sorted(p.name for p in out.iterdir()) == ["good art.protected.png"]
    with Image.open(out / "good art.protected.png") as image:
        assert image.size == (320, 256)
        protected = np.array(image.convert("RGB"))
    original = np.array(Image.open(good).convert("RGB"))
    assert np.abs(protected.astype(int) - original.astype(int)).max() <= 4
    # No stray outputs beside the inputs, and every input is untouched.
    assert {path: digest(path) for path in inputs.iterdir()} == before
    assert "Traceback" not in done.stderr


def test_human_report_from_config_output_beside_the_image_and_jpeg_warning(env: dict[str, str], tmp_path: Path) -> None:
    """The console script; no --model and no -o: model, device and steps come from FIXATIVE_CONFIG."""
    image = write_painting(tmp_path / "landscape.png")
    before = digest(image)
    done = fixative(env, "protect", str(image), "--mode", "encoder", "--format", "jpeg", script=True)
    assert done.returncode == 0, done.stderr
    written = tmp_path / "landscape.protected.jpg"
    with Image.open(written) as output:
        assert output.format == "JPEG" and output.size == (320, 256)
    assert f"{image} -> {written}" in done.stdout
    assert "encoder" in done.stdout and "3 steps" in done.stdout and "on cpu" in done.stdout
    assert "protection gain" in done.stdout and "PSNR" in done.stdout and "max change" in done.stdout
    assert "warning:" in done.stdout and "lossy" in done.stdout
    [survives] = [line for line in done.stdout.splitlines() if line.startswith("  survives: ")]
    assert "jpeg75 " in survives  # the figures status shows for a job, formatted by the same function
    assert digest(image) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["config.toml", "landscape.png", "landscape.protected.jpg"]


def test_pickle_model_refused_and_bad_steps_are_usage_errors(env: dict[str, str], tmp_path: Path) -> None:
    image = write_painting(tmp_path / "art.png")
    checkpoint = tmp_path / "x.ckpt"
    checkpoint.write_bytes(b"not really a pickle")
    out = tmp_path / "out"

    refused = fixative(env, "protect", str(image), "-o", str(out), "--model", str(checkpoint))
    assert refused.returncode == 1
    assert "pickle" in refused.stderr and "x.ckpt" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not out.exists() or not any(out.iterdir())
    assert not (tmp_path / "art.protected.png").exists()

    zero = fixative(env, "protect", str(image), "-o", str(out), "--steps", "0")
    assert zero.returncode == 2
    assert "steps" in zero.stderr
    assert "Traceback" not in zero.stderr
    assert not out.exists() or not any(out.iterdir())


def test_outputs_never_replace_a_file_nor_each_other(env: dict[str, str], tmp_path: Path) -> None:
    """good.png and good.jpg both wrote good.protected.png, the second over the first."""
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    out.mkdir()
    png = write_painting(inputs / "good.png")
    Image.fromarray(painting(256, 320, seed=6)).save(inputs / "good.jpg", quality=95)
    (out / "good.protected.png").write_bytes(b"the artist's own file")

    done = fixative(env, "protect", str(png), str(inputs / "good.jpg"), "-o", str(out), "--steps", "1", "--json")
    assert done.returncode == 0, done.stderr
    outputs = [json.loads(line)["output"] for line in done.stdout.splitlines()]
    assert outputs == [str(out / "good.protected-2.png"), str(out / "good.protected-3.png")]
    assert (out / "good.protected.png").read_bytes() == b"the artist's own file"
    with Image.open(outputs[0]) as first, Image.open(outputs[1]) as second:
        assert not np.array_equal(np.array(first), np.array(second))  # one from each input


def test_bad_arguments_are_explained_before_the_model_loads(env: dict[str, str], tmp_path: Path) -> None:
    """A missing input or an -o that is a file: a clear line, no traceback, and no minute spent loading a model.

    The model named does not exist: had it been loaded first, its error would show instead.
    """
    image = write_painting(tmp_path / "art.png")
    no_model = ("--model", str(tmp_path / "no-such-model"))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")

    into_file = fixative(env, "protect", str(image), "-o", str(a_file), *no_model)
    assert into_file.returncode == 2
    assert into_file.stderr.strip() == f"fixative: -o {a_file} is a file; name a folder for the protected copies"
    assert a_file.read_text() == "not a folder"

    missing = fixative(env, "protect", str(tmp_path / "typo.png"), str(tmp_path), *no_model)
    assert missing.returncode == 1
    assert missing.stderr.splitlines() == [
        f"failed: {tmp_path / 'typo.png'}: no such file",
        f"failed: {tmp_path}: is a folder; name the image files in it",
    ]


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder no file can be created in: a read-only one, or sysfs for root, whom permissions do not stop."""
    if os.geteuid() == 0:
        return Path("/sys")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def test_damaged_inputs_and_an_unwritable_output_folder_fail_before_the_model_loads(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Had the loader run, the missing model's own error ("does not exist") would show, and the exit would differ."""
    no_model = ("--model", str(tmp_path / "no-such-model"))
    text = tmp_path / "notes.png"
    text.write_text("my shopping list, not a picture\n" * 20)
    whole = write_painting(tmp_path / "whole.png").read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(whole[: len(whole) // 2])
    dot = tmp_path / "dot.png"
    Image.new("RGB", (1, 1)).save(dot)
    bomb = tmp_path / "bomb.png"  # a real PNG whose header claims 20000 x 20000 pixels
    header = bytearray(whole)
    header[16:24] = (20_000).to_bytes(4, "big") * 2
    header[29:33] = zlib.crc32(bytes(header[12:29])).to_bytes(4, "big")
    bomb.write_bytes(bytes(header))
    out = tmp_path / "out"

    done = fixative(env, "protect", str(text), str(truncated), str(dot), str(bomb), "-o", str(out), *no_model)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 4, lines
    assert lines[0] == f"failed: {text}: this is not an image file we can read (expected PNG, JPEG, WebP, TIFF, GIF, BMP...)."
    assert lines[1].startswith(f"failed: {truncated}: the image file is damaged or incomplete")
    assert lines[2].startswith(f"failed: {dot}: the image is 1x1 pixels; at least 256 pixels are needed")
    assert lines[3].startswith(f"failed: {bomb}: the image is ") and "100-megapixel limit" in lines[3]
    assert "decompression bomb" in lines[3]
    assert "does not exist" not in done.stderr and not out.exists()

    image = write_painting(tmp_path / "art.png")
    folder = unwritable_folder(tmp_path)
    refused = fixative(env, "protect", str(image), "-o", str(folder), *no_model)
    assert refused.returncode == 1
    [line] = refused.stderr.splitlines()
    assert line.startswith(f"fixative: cannot write in the output folder {folder}: ") and "does not exist" not in line


def screen(text: str) -> list[str]:
    """What a terminal shows of ``text``: each line as its carriage returns overwrite it."""
    shown = []
    for line in text.replace("\r\n", "\n").split("\n"):
        cells: list[str] = []
        for part in line.split("\r"):
            cells[: len(part)] = part
        shown.append("".join(cells).rstrip())
    return shown


# protect_file fails midway through the second image's steps, as a file swapped after it was checked would.
FAILS_MIDWAY = """
import sys
import fixative.engine.protect as protect
from fixative.daemon.cli import main
from fixative.engine.errors import BadImage

real = protect.protect_file

def protect_file(path, model, options, progress=None):
    if path.name != "swapped.png":
        return real(path, model, options, progress)
    progress(1, options.steps, 0.5)
    raise BadImage(f"{path}: the image file is damaged (it changed after it was checked)")

protect.protect_file = protect_file
sys.exit(main(sys.argv[1:]))
"""


def test_a_failure_line_starts_on_its_own_line_after_the_progress_bar(env: dict[str, str], tmp_path: Path) -> None:
    """On a terminal (a real pseudo-terminal as stderr) the bar is drawn, and cleared before the failure line."""
    good, swapped = write_painting(tmp_path / "good.png"), write_painting(tmp_path / "swapped.png", seed=7)
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 120 columns, as a window has
    child = subprocess.Popen([sys.executable, "-c", FAILS_MIDWAY, "protect", str(good), str(swapped), "--steps", "3"],
                             stdout=subprocess.PIPE, stderr=terminal, cwd=REPO, env=env)
    os.close(terminal)
    seen = read_terminal(controller)
    stdout = child.communicate(timeout=300)[0].decode()
    assert child.returncode == 1
    text = seen.decode()
    assert "good.png:" in text and "swapped.png:" in text  # the bars were drawn
    failures = [line for line in screen(text) if "failed:" in line]
    assert failures == [f"failed: {swapped}: the image file is damaged (it changed after it was checked)"]
    assert f"{good} -> {tmp_path / 'good.protected.png'}" in stdout
