"""The benches (bench/): each one runs, at tiny sizes, as bench/README.md runs it; and bench/ stays a client of the package.

The smoke runs are marked slow: each starts processes that import torch and
protect images, a minute or more apiece. bench/run.py's, at tiny scale, runs
five measurement processes and about twenty whole 100-step images (3 seeds for
the reference and the default mode, and the default mode's settings sweep).
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


# Every bench but the parts the others are made of; each one needs a smoke run below.
BENCHES = {path.stem for path in (ROOT / "bench").glob("*.py")} - {"__init__", "common", "reference", "sd15", "worker"}


def _bench(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """``python -m bench.NAME ARGS...`` from the repository root, as bench/README.md runs them; it must succeed."""
    done = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done


def path_edits_and_patches(source: str) -> list[str]:
    """What in Python ``source`` edits sys.path (or a child's PYTHONPATH), or assigns to an attribute of a fixative module.

    A bench measures the installed package as a user's code runs it: with its
    path edited it may measure other code than what is installed, and with a
    module patched other code than what ships. Where a bench needs a knob, the
    engine takes it as an option.
    """
    tree = ast.parse(source)
    imported = set()  # names bound by importing fixative: modules, or what they define
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.asname or alias.name.split(".")[0] for alias in node.names if alias.name.split(".")[0] == "fixative"}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "fixative":
            imported |= {alias.asname or alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module == "sys" and "path" in {a.name for a in node.names}:
            found.append("from sys import path")

    def root(node: ast.AST) -> str | None:
        while isinstance(node, (ast.Attribute, ast.Subscript)):
            node = node.value
        return node.id if isinstance(node, ast.Name) else None

    for node in ast.walk(tree):
        targets = []
        if isinstance(node, (ast.Assign, ast.Delete)):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for leaf in (leaf for target in targets for leaf in ast.walk(target)):
            if isinstance(leaf, ast.Attribute) and (root(leaf) in imported or ast.unparse(leaf) == "sys.path"):
                found.append(ast.unparse(node))
        if isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            patched = name in ("setattr", "delattr") and node.args and root(node.args[0]) in imported
            if patched or name.startswith("sys.path.") or {"patch", "monkeypatch"} & set(name.split(".")):
                found.append(ast.unparse(node))
        if isinstance(node, ast.Constant) and node.value == "PYTHONPATH":
            found.append("PYTHONPATH")
    return found


def test_the_check_for_path_edits_and_patches_finds_them():
    edits = [
        "sys.path.insert(0, x)",
        "import sys\nsys.path = [ROOT] + sys.path",
        "import os\nos.environ['PYTHONPATH'] = str(ROOT)",
        "import fixative.engine.pgd\nfixative.engine.pgd.MOMENTUM = 0.0",
        "from fixative.engine import pgd\npgd.MOMENTUM += 0.1",
        "import fixative.engine.protect as protect\nsetattr(protect, 'run_pgd', print)",
        "from unittest import mock\nwith mock.patch('fixative.engine.pgd.MOMENTUM', 0.0):\n    pass",
    ]
    for source in edits:
        assert path_edits_and_patches(source), source
    clean = "import sys\nfrom fixative.engine.options import EngineOptions\noptions = EngineOptions()\noptions.steps = 3\nprint(sys.path)"
    assert path_edits_and_patches(clean) == []


def test_no_bench_edits_sys_path_or_patches_fixative():
    for path in sorted(path for path in (ROOT / "bench").rglob("*") if path.is_file() and path.suffix not in (".md", ".pyc")):
        if path.suffix == ".py":
            assert path_edits_and_patches(path.read_text()) == [], path
        else:  # scripts (gpu.sh); data files are read as bytes, so that weights and images pass
            assert not re.search(rb"sys\.path|PYTHONPATH", path.read_bytes()), path


def _python_lines(folder: str) -> int:
    return sum(len(path.read_text().splitlines()) for path in (ROOT / folder).rglob("*.py"))


def test_bench_is_smaller_than_the_engine():
    assert _python_lines("bench") < _python_lines("engine")


def test_every_bench_has_a_smoke_run_and_its_commands_run_as_modules():
    smoked = set(re.findall(r'_bench\(\s*"bench\.(\w+)"', Path(__file__).read_text()))
    assert BENCHES <= smoked, BENCHES - smoked
    readme = (ROOT / "bench" / "README.md").read_text().partition("## Dropped experiments")[0]
    for text in (readme, (ROOT / "bench" / "gpu.sh").read_text()):
        assert not re.search(r"python3? bench/", text)
        for name in re.findall(r"-m bench\.([a-z_]+)", text):
            assert (ROOT / "bench" / f"{name}.py").is_file(), name


def test_bench_finds_the_tests_tiny_model(tiny_model: Path):
    from bench.common import tiny_model as bench_tiny_model

    assert bench_tiny_model(threads=1) == (tiny_model, None)


def test_sd15_configs_are_stable_diffusion_1_5():
    from bench import sd15

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
    from bench import sd15

    model, how = sd15.load_engine_model(EngineOptions(device="cpu", dtype="bf16", low_vram=True))
    assert vars(fixative.engine.model) == before
    assert "assemble_model" in how
    assert model.vae.decoder is None and model.unet.is_gradient_checkpointing
    assert (model.resolution, model.size_multiple) == (512, 64)
    assert model.vae.dtype == model.dtype == torch.bfloat16


@pytest.mark.slow
def test_full_scale_model_saved_loads_through_the_product_s_loader(tmp_path: Path):
    """bench/batch_queue.py --scale full drains a real queue on this folder: it must load as a user's model does."""
    import torch

    from bench import sd15
    from fixative.engine.model import load_model
    from fixative.engine.options import EngineOptions

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
    done = _bench("bench.run", "--scale", "tiny", "--threads", "1", "--json", str(figures), timeout=1200)
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
def test_mimicry_table_runs_with_the_noise_control_and_jpeg(tmp_path: Path):
    figures = tmp_path / "mimicry.json"
    done = _bench("bench.mimicry", "--seeds", "2", "--steps", "5", "--modes", "encoder",
                  "--json", str(figures), timeout=1200)
    table = json.loads(figures.read_text())["table"]
    assert set(table) == {"clean", "encoder", "noise ±8", "clean+jpeg75", "encoder+jpeg75", "noise ±8+jpeg75"}
    mean, se = table["encoder"]["loss ratio, held out"]
    assert mean > 0 and se is not None  # two seeds: a standard error
    assert "| noise ±8+jpeg75 |" in done.stdout
    assert re.search(r"\| encoder \|.*\| (below|within noise) \|", done.stdout)


@pytest.mark.slow
def test_batching_table_runs_on_the_tiny_model(tmp_path: Path, tiny_model: Path):
    figures = tmp_path / "batching.json"
    done = _bench("bench.batching", "--batches", "1,2", "--steps", "2", "--rounds", "1", "--json", str(figures), timeout=600)
    rows = json.loads(figures.read_text())["rows"]
    assert [row["batch"] for row in rows] == [1, 2]
    assert all(row["pgd_seconds_per_image"] > 0 and row["peak_bytes"] > 0 for row in rows)
    assert rows[0]["extra_bytes_per_image"] is None and rows[1]["extra_bytes_per_image"] is not None
    assert "| 2 |" in done.stdout


@pytest.mark.slow
def test_op_count_table_counts_the_eot_and_the_model(tmp_path: Path, tiny_model: Path):
    """bench/op_count.py: a robust step is the plain step plus the EOT's operations, and the EOT has some."""
    figures = tmp_path / "ops.json"
    done = _bench("bench.op_count", "--steps", "4", "--json", str(figures))
    counts = json.loads(figures.read_text())
    plain, full = counts["sd15"]["sds, robust off"], counts["sd15"]["sds, a full-size robust step"]
    assert plain["ops"] > 500  # SD-1.5's encoder forward and backward and UNet forward: about 1100
    assert counts["eot"]["ops"] > 0 and full["ops"] == plain["ops"] + counts["eot"]["ops"]
    assert "| sds, a half-side robust step |" in done.stdout


@pytest.mark.slow
def test_robustness_table_runs_with_robust_off_and_on(tmp_path: Path, tiny_model: Path):
    figures = tmp_path / "robustness.json"
    done = _bench("bench.robustness", "--seeds", "1", "--steps", "2", "--modes", "sds", "--json", str(figures))
    rows = json.loads(figures.read_text())
    assert [(row["mode"], row["robust"], len(row["runs"])) for row in rows] == [("sds", False, 3), ("sds", True, 3)]
    assert "| sds | on |" in done.stdout


@pytest.mark.slow
def test_perceptual_budget_table_compares_both_budgets(tmp_path: Path, tiny_model: Path):
    figures = tmp_path / "perceptual_budget.json"
    done = _bench("bench.perceptual_budget", "--model", "tiny", "--images", "ink,colorwheel", "--steps", "2",
                  "--perceptual-strengths", "8,10", "--json", str(figures))
    runs = json.loads(figures.read_text())["runs"]
    assert [(run["image"], run["budget"], run["strength"]) for run in runs] == [
        (image, budget, strength) for image in ("ink", "colorwheel")
        for budget, strength in (("uniform", 8), ("perceptual", 8), ("perceptual", 10))
    ]
    assert all(run["max_delta"] <= run["strength"] for run in runs)
    assert "| perceptual | 10 |" in done.stdout and "| 10 |" in done.stdout


@pytest.mark.slow
def test_report_estimate_table_runs_and_matches_the_engine_s_figure(tiny_model: Path):
    # The bench asserts that its stratified8 estimate is the engine's own figure on the same draws.
    done = _bench("bench.report_estimate", "--draws", "2", "--truth", "16")
    assert "| fractal9@128 | jpeg75 |" in done.stdout


@pytest.mark.slow
def test_precision_table_times_both_dtypes():
    done = _bench("bench.precision", "--rounds", "1", "--threads", "1", "--size", "128")
    assert "| forward + backward |" in done.stdout


@pytest.mark.slow
def test_memory_table_protects_a_large_image(tmp_path: Path, tiny_model: Path):
    figures = tmp_path / "memory.json"
    _bench("bench.memory", "--sizes", "640x480", "--threads", "1", "--json", str(figures))
    (row,) = json.loads(figures.read_text())["rows"]
    assert row["size"] == [640, 480] and row["error"] is None and row["peak_bytes"] > 0


@pytest.mark.slow
def test_ensemble_table_times_each_member_and_their_ensembles(tmp_path: Path, tiny_model: Path):
    figures = tmp_path / "ensemble.json"
    _bench("bench.ensemble", "--steps", "2", "--rounds", "1", "--json", str(figures))
    table = json.loads(figures.read_text())
    assert set(table["seconds_per_step"]) == {"A", "B", "V", "A+B", "A+B+V"}
    assert all(ratio > 0 for ratio in table["ratio_to_members_sum"].values())
    assert table["weight_bytes"]["A+B"] == table["weight_bytes"]["A"] + table["weight_bytes"]["B"]  # held together


@pytest.mark.slow
def test_engines_table_drains_a_queue_with_one_engine_and_two(tiny_model: Path):
    done = _bench("bench.engines", "--images", "2", "--steps", "2", "--rounds", "1")
    assert "round 1: 1 engine(s)" in done.stdout and "round 1: 2 engine(s)" in done.stdout


@pytest.mark.slow
def test_batch_queue_table_drains_a_queue_one_at_a_time_and_batched(tiny_model: Path):
    done = _bench("bench.batch_queue", "--images", "2", "--steps", "2", "--rounds", "1", "--batch-size", "2")
    assert "round 1: batch_size 1" in done.stdout and "round 1: batch_size 2" in done.stdout


@pytest.mark.slow
def test_job_table_claims_every_job_once():
    # The bench checks each row: every job claimed exactly once. PostgreSQL's rows where its binaries are installed.
    done = _bench("bench.job_table", "--jobs", "30", "--claimers", "1,2")
    assert re.search(r"^sqlite +2 ", done.stdout, re.M), done.stdout


@pytest.mark.slow
def test_the_measuring_model_build_writes_a_loadable_model_and_its_recipe(tmp_path: Path):
    # A few steps of each part: this checks the script and the folder it writes, not the model's quality.
    from fixative.engine.model import load_model
    from fixative.engine.options import EngineOptions

    out = tmp_path / "measuring"
    _bench("bench.measuring_model", "--out", str(out), "--vae-steps", "2", "--unet-steps", "2", "--lora-steps", "2")
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["vae_steps"] == 2 and set(recipe["figures"]) >= {"flip_error", "shift8_error"}
    model = load_model(EngineOptions(model=str(out), device="cpu", dtype="fp32"))
    assert model.resolution == 128 and model.scaling_factor == pytest.approx(recipe["scaling_factor"])
