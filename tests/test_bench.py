"""The benchmark (bench/run.py) at tiny scale: it runs, covers every mode and the reference, and ends
with its one-line summary.

Marked slow: five measurement processes, each importing torch and diffusers,
and about twenty whole 100-step images (3 seeds for the reference and the
default mode, and the default mode's settings sweep) take 1-2 minutes.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = re.compile(
    r"^(advdm|mist|sds|encoder): \d+\.\dx faster than reference, memory \d+\.\d\dx, gain (\d+\.\d\dx of reference \(-?\d+\.\d\dx after JPEG q75\)|n/a of reference)$"
)


def _constant(path: Path, name: str):
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} not found in {path}")


def test_bench_trains_the_tiny_model_as_the_tests_do():
    # Same training steps => same cache key => the bench reuses the tests' cached tiny model.
    assert _constant(ROOT / "bench" / "run.py", "TRAINING_STEPS") == _constant(ROOT / "tests" / "conftest.py", "TRAINING_STEPS")


def _import_sd15():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import sd15
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return sd15


def test_sd15_configs_are_stable_diffusion_1_5():
    sd15 = _import_sd15()
    assert sd15.UNET_CONFIG["block_out_channels"] == (320, 640, 1280, 1280)
    assert sd15.UNET_CONFIG["cross_attention_dim"] == 768
    assert sd15.UNET_CONFIG["attention_head_dim"] == 8
    assert sd15.UNET_CONFIG["layers_per_block"] == 2
    assert sd15.UNET_CONFIG["sample_size"] == 64
    assert sd15.VAE_CONFIG["block_out_channels"] == (128, 256, 512, 512)
    assert sd15.VAE_CONFIG["latent_channels"] == 4
    assert sd15.VAE_CONFIG["sample_size"] == 512


@pytest.mark.slow
def test_full_scale_model_goes_through_the_engine_s_assembly():
    """No patching of fixative.engine.model's private loaders: the bench hands its in-memory parts to assemble_model."""
    import torch

    import fixative.engine.model
    from fixative.engine.options import EngineOptions

    before = dict(vars(fixative.engine.model))
    model, how = _import_sd15().load_engine_model(EngineOptions(device="cpu", dtype="bf16", low_vram=True))
    assert vars(fixative.engine.model) == before
    assert "assemble_model" in how
    assert model.vae.decoder is None and model.unet.is_gradient_checkpointing
    assert (model.resolution, model.size_multiple) == (512, 64)
    assert model.vae.dtype == model.dtype == torch.bfloat16


@pytest.mark.slow
def test_full_scale_model_saved_loads_through_the_product_s_loader(tmp_path: Path):
    """bench/batch_queue.py --scale full drains a real queue on this folder: it must load as a user's model does."""
    import torch

    from fixative.engine.model import load_model
    from fixative.engine.options import EngineOptions

    sd15 = _import_sd15()
    folder = sd15.save_model(tmp_path / "sd15", torch.device("cpu"), torch.bfloat16)
    model = load_model(EngineOptions(model=str(folder), device="cpu", dtype="bf16"))
    assert sum(p.numel() for p in model.unet.parameters()) == pytest.approx(sd15.EXPECTED_PARAMS["unet"], rel=1e-3)
    assert (model.resolution, model.size_multiple) == (512, 64)
    assert model.dtype == torch.bfloat16
    assert model.text_embedding.shape == (1, sd15.TEXT_TOKENS, sd15.TEXT_DIM)  # the prompt, through the saved CLIP encoder


@pytest.mark.slow
def test_tiny_bench_runs_and_reports_every_mode(tmp_path: Path, tiny_model: Path):
    # tiny_model: the session's trained tiny model, so the bench finds it in pytest's cache.
    figures = tmp_path / "bench.json"
    # One thread: this checks that the bench works and what it reports, not its timings, and
    # multi-threaded tiny steps crawl when other jobs share the cores (on 2 busy cores the run
    # took over 20 minutes with 2 threads, 100 s with 1).
    done = subprocess.run(
        [sys.executable, "bench/run.py", "--scale", "tiny", "--threads", "1", "--json", str(figures)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    last_line = done.stdout.strip().splitlines()[-1]
    assert SUMMARY.match(last_line), last_line

    report = json.loads(figures.read_text())
    assert report["summary"] == last_line
    assert report["errors"] == []
    assert report["machine"]["physical_cores"] >= 1
    assert report["runtime"]["torch"]
    (row,) = report["results"].values()
    assert set(row) == {"reference", "advdm", "mist", "sds", "encoder"}
    reference = row["reference"]
    assert reference["seconds_per_step"] > 0
    assert reference["peak_bytes"] >= reference["baseline_bytes"] > 0
    assert reference["protection_gain"] > 1
    assert [r["steps"] for r in reference["by_steps"]] == [25, 50, 100]
    for mode in ("advdm", "mist", "sds", "encoder"):
        figures = row[mode]
        assert figures["seconds_per_step"] > 0
        assert figures["speedup"] > 0
        assert figures["memory_ratio"] > 0
        assert figures["gain_ratio"] > 0
        assert figures["per_image_extrapolated"] is False
    default_mode = report["engine_defaults"]["mode"]
    assert row[default_mode]["sweep"], "the default mode gets a settings sweep"
    assert all(entry["gain_ratio"] > 0 for entry in row[default_mode]["sweep"])


@pytest.mark.slow
def test_mimicry_table_runs_with_the_noise_control_and_jpeg(tmp_path: Path, tiny_model: Path):
    figures = tmp_path / "mimicry.json"
    done = subprocess.run(
        [sys.executable, "bench/mimicry.py", "--seeds", "2", "--steps", "10", "--originals", "5", "--modes", "encoder",
         "--json", str(figures)],
        cwd=ROOT, capture_output=True, text=True, timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    table = json.loads(figures.read_text())["table"]
    assert set(table) == {"clean", "encoder", "noise ±8", "clean+jpeg75", "encoder+jpeg75", "noise ±8+jpeg75"}
    mean, se = table["encoder"]["loss ratio, held out"]
    assert mean > 0 and se is not None  # two seeds: a standard error
    assert "| noise ±8+jpeg75 |" in done.stdout
    assert re.search(r"\| encoder \|.*\| (below|within noise) \|", done.stdout)


@pytest.mark.slow
def test_batching_table_runs_on_the_tiny_model(tmp_path: Path, tiny_model: Path):
    figures = tmp_path / "batching.json"
    done = subprocess.run(
        [sys.executable, "bench/batching.py", "--batches", "1,2", "--steps", "2", "--rounds", "1", "--json", str(figures)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    rows = json.loads(figures.read_text())["rows"]
    assert [row["batch"] for row in rows] == [1, 2]
    assert all(row["pgd_seconds_per_image"] > 0 and row["peak_bytes"] > 0 for row in rows)
    assert rows[0]["extra_bytes_per_image"] is None and rows[1]["extra_bytes_per_image"] is not None
    assert "| 2 |" in done.stdout


@pytest.mark.slow
def test_op_count_table_counts_the_eot_and_the_model(tmp_path: Path, tiny_model: Path):
    """bench/op_count.py: a robust step is the plain step plus the EOT's operations, and the EOT has some."""
    figures = tmp_path / "ops.json"
    done = subprocess.run(
        [sys.executable, "bench/op_count.py", "--steps", "4", "--json", str(figures)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    counts = json.loads(figures.read_text())
    plain, full = counts["sd15"]["sds, robust off"], counts["sd15"]["sds, a full-size robust step"]
    assert plain["ops"] > 500  # SD-1.5's encoder forward and backward and UNet forward: about 1100
    assert counts["eot"]["ops"] > 0 and full["ops"] == plain["ops"] + counts["eot"]["ops"]
    assert "| sds, a half-side robust step |" in done.stdout
