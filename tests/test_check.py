"""``fixative check``: a mimic's LoRA on the originals and on the protected copies, on the tiny model.

One real subprocess runs the whole check (copies made on the fly, a served
JPEG variant, contact sheet, JSON). The engine-level test checks that the
fine-tuning really trains and leaves the base model as it found it. The bad
inputs fail before any training, in-process through the real CLI entry point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import painting
from fixative.daemon.check_command import LABEL_WIDTH, TILE
from fixative.daemon.cli import main

REPO = Path(__file__).resolve().parents[1]


def originals(folder: Path, count: int = 5) -> Path:
    folder.mkdir()
    for i in range(count):
        width = 320 if i == 0 else 256  # one landscape work, so the random crops have room to move
        Image.fromarray(painting(256, width, seed=40 + i)).save(folder / f"work{i}.png")
    return folder


@pytest.fixture
def config(tmp_path: Path, tiny_model: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[engine]\nmodel = "{tiny_model}"\ndevice = "cpu"\nsteps = 10\n')
    return path


def test_check_end_to_end(tmp_path: Path, config: Path):
    folder = originals(tmp_path / "works")
    out = tmp_path / "out"
    env = {**os.environ, "FIXATIVE_CONFIG": str(config), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "fixative.daemon.cli", "check", str(folder), "--steps", "30", "--after", "jpeg75",
         "--guidance", "1", "-o", str(out)],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "runs on the CPU, which is slow" in done.stderr and "(an estimate)" in done.stderr
    assert "LoRA on protected+jpeg75" in done.stdout and "learned" in done.stdout

    report = json.loads((out / "check.json").read_text())
    assert report["originals"] == 5 and report["held_out"] == [4]
    assert set(report["loras"]) == {"clean", "protected", "protected+jpeg75"}
    for figures in [report["base"], *report["loras"].values()]:
        assert figures["loss_trained_originals"] > 0 and figures["loss_held_out_originals"] > 0
        assert 0 <= figures["colour_distance"] <= 1 and 0 < figures["style_distance"] < 1
    assert report["loras"]["protected"]["ratio"]["loss_held_out_originals"] > 0
    # The copies made on the fly are kept, and are protected copies of the originals.
    copies = sorted((out / "protected").iterdir())
    assert [p.name for p in copies] == [f"work{i}.png" for i in range(5)]
    delta = np.abs(np.array(Image.open(copies[1])).astype(int) - np.array(Image.open(folder / "work1.png")).astype(int))
    assert 0 < delta.max() <= 8

    rows = report["contact_sheet"]["rows"]
    assert rows == ["originals", "LoRA: clean", "LoRA: protected", "LoRA: protected+jpeg75"]
    with Image.open(out / "contact-sheet.png") as sheet:
        assert sheet.size == (LABEL_WIDTH + 4 * TILE, len(rows) * TILE)
        tiles = np.array(sheet.convert("RGB"))
    for r in range(len(rows)):
        for c in range(4):
            tile = tiles[r * TILE : (r + 1) * TILE, LABEL_WIDTH + c * TILE : LABEL_WIDTH + (c + 1) * TILE]
            assert tile.std() > 5, f"tile {r},{c} is blank"


def test_the_clean_lora_learns_and_leaves_the_base_model_untouched(tiny_model: Path):
    from fixative.engine import mimicry
    from fixative.engine.model import load_model
    from fixative.engine.options import EngineOptions

    model = mimicry.with_prompt(load_model(EngineOptions(model=str(tiny_model), device="cpu"), generation=True), "a painting in the style of sks")
    works = [painting(256, 256, seed=40 + i) for i in range(4)]
    latents = mimicry.Originals.prepare(model, works).latents
    before = mimicry.denoising_losses(model, latents)
    with mimicry.fine_tuned(model, works, steps=30, seed=0):
        during = mimicry.denoising_losses(model, latents)
    after = mimicry.denoising_losses(model, latents)
    assert np.mean(during) < np.mean(before)  # it trains on these very works
    assert after == before  # the adapter is gone: the next LoRA starts from the same base


def check(tmp_path: Path, config: Path, *argv: str) -> int:
    return main(["--config", str(config), "check", *argv, "-o", str(tmp_path / "out")])


def test_an_empty_folder_is_refused(tmp_path: Path, config: Path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    assert check(tmp_path, config, str(tmp_path / "empty")) == 1
    assert "no images in" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_protected_copies_must_match_their_originals(tmp_path: Path, config: Path, capsys):
    folder = originals(tmp_path / "works", count=2)
    protected = tmp_path / "protected"
    protected.mkdir()
    near = np.array(Image.open(folder / "work0.png")).astype(int) + 4
    Image.fromarray(near.clip(0, 255).astype(np.uint8)).save(protected / "work0.protected.png")

    def refusal() -> str:
        assert check(tmp_path, config, str(folder), "--protected", str(protected)) == 1
        return capsys.readouterr().err

    assert "no protected copy of work1.png" in refusal()
    Image.fromarray(painting(256, 256, seed=99)).save(protected / "work1.png")  # another picture
    err = refusal()
    assert "work1.png differs from" in err and "not its protected copy" in err
    Image.fromarray(painting(256, 320, seed=41)).save(protected / "work1.png")
    assert "is 320x256, but its original" in refusal()
    Image.open(folder / "work1.png").save(protected / "work1.png")
    assert "work1.png is identical to" in refusal()
    assert not (tmp_path / "out").exists()


def test_a_pickle_checkpoint_is_refused(tmp_path: Path, config: Path, capsys):
    folder = originals(tmp_path / "works", count=1)
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04K\x01.")
    assert check(tmp_path, config, str(folder), "--model", str(pickle)) == 1
    assert "pickles" in capsys.readouterr().err


def test_the_verdict_does_not_claim_what_the_run_cannot_show():
    from fixative.daemon.check_command import verdict

    def figures(loss: float, style: float) -> dict:
        return {"loss_trained_originals": loss, "loss_held_out_originals": None, "colour_distance": 0.4,
                "style_distance": style, "ratio": {"colour_distance": 1.0, "style_distance": 1.0},
                "learned": {"loss_trained_originals": 0.5, "loss_held_out_originals": None}}

    report = {"base": figures(0.010, 10.0), "held_out": [], "recipe": {"steps": 5, "lora_rank": 4},
              "loras": {"clean": figures(0.011, 12.0), "protected": figures(0.012, 12.0)}}
    text = "\n".join(verdict(report))
    assert "cannot say whether the protection works" in text and "learned 50%" not in text

    report["loras"]["clean"]["loss_trained_originals"] = 0.009
    text = "\n".join(verdict(report))
    assert "learned 50% of what the clean LoRA learned" in text
    assert "no closer to your originals in style statistics" in text and "in colour than" in text


def test_copies_made_now_mirror_the_originals_and_are_accepted_as_protected(tmp_path: Path, config: Path):
    """a/x.png and b/x.png, y.png and y.jpg: four originals, four copies, none taking another's name."""
    folder = tmp_path / "works"
    for n, name in enumerate(("a/x.png", "b/x.png", "y.png", "y.jpg")):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(painting(256, 256, seed=60 + n)).save(folder / name, quality=95)
    out = tmp_path / "out"
    assert check(tmp_path, config, str(folder), "--steps", "2", "--guidance", "1") == 0
    copies = sorted(p.relative_to(out / "protected").as_posix() for p in (out / "protected").rglob("*") if p.is_file())
    made = {"a/x.png": "a/x.png", "b/x.png": "b/x.png", "y.jpg": "y.jpg.png", "y.png": "y.png"}
    assert copies == sorted(made.values())
    for name, copy in made.items():  # each the protected copy of its own original
        original = np.array(Image.open(folder / name).convert("RGB")).astype(int)
        delta = np.abs(np.array(Image.open(out / "protected" / copy)).astype(int) - original)
        assert 0 < delta.max() <= 8, name

    # That folder is what --protected takes.
    again = main(["--config", str(config), "check", str(folder), "--protected", str(out / "protected"),
                  "--steps", "2", "--guidance", "1", "-o", str(tmp_path / "again")])
    assert again == 0
    assert json.loads((tmp_path / "again" / "check.json").read_text())["protected"] == str(out / "protected")


def test_two_originals_whose_copies_would_share_a_name_are_refused(tmp_path: Path, config: Path, capsys):
    """y.jpg's copy is y.jpg.png: beside an original of that very name, one would overwrite the other."""
    folder = tmp_path / "works"
    folder.mkdir()
    for n, name in enumerate(("y.jpg", "y.jpg.png")):
        Image.fromarray(painting(256, 256, seed=70 + n)).save(folder / name)
    assert check(tmp_path, config, str(folder)) == 1
    assert "would both have their protected copy saved as" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
