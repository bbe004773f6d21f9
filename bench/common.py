"""What the benches share: the machine, /proc's memory figures, the tests' tiny model and the test images.

Every bench runs as a module from the repository root, against the installed
package: ``python -m bench.run``. Nothing here imports torch until a function
needs it, so a bench that only starts processes stays light.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30
# The protection tables' test images: (family, seed, side). "fields" seed 5 is the painting the rest
# of the bench protects; "fractal" has a photograph's 1/f spectrum and fine texture. 128 px is the
# tiny model's training size (SD's 512): an upload at exactly the size a fine-tuner uses, the hardest
# case for a downscale. 256 px is an upload twice that size, which a platform's half-size copy still covers.
IMAGES = (("fields", 5, 128), ("fractal", 9, 128), ("fields", 5, 256))


class BenchError(RuntimeError):
    pass


def say(message: str = "") -> None:
    print(message, flush=True)


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """The mean and its standard error (None for a single value: no spread to read)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else None)


# ----------------------------------------------------------------------------------------- machine


def proc_bytes(field: str, path: str = "/proc/self/status") -> int | None:
    """A ``FIELD:  N kB`` line of a /proc file, in bytes; None where there is no such file or line."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak() -> None:
    """Set the peak-RSS mark (VmHWM) back to the current RSS (Linux 4.0+)."""
    Path("/proc/self/clear_refs").write_text("5")


def _cpuinfo() -> list[dict[str, str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    blocks = []
    for block in text.strip().split("\n\n"):
        entry = {}
        for line in block.splitlines():
            key, _, value = line.partition(":")
            entry[key.strip()] = value.strip()
        blocks.append(entry)
    return blocks


def physical_cores() -> int:
    """Cores this process may run on, counting each physical core once (SMT siblings share one)."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = {
        (entry.get("physical id", "0"), entry.get("core id", entry.get("processor")))
        for entry in _cpuinfo()
        if entry.get("processor", "").isdigit() and int(entry["processor"]) in allowed
    }
    return max(1, len(cores) if cores else len(allowed))


def machine_info() -> dict:
    model = next((entry["model name"] for entry in _cpuinfo() if "model name" in entry), None) or platform.processor()
    return {
        "cpu": model or "unknown",
        "physical_cores": physical_cores(),
        "logical_cpus": os.cpu_count(),
        "memory_bytes": proc_bytes("MemTotal", "/proc/meminfo"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


# -------------------------------------------------------------------------------------- tiny model


def _cache_dir() -> Path:
    if os.environ.get("FIXATIVE_BENCH_CACHE"):
        return Path(os.environ["FIXATIVE_BENCH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fixative-bench"


def _ready(folder: Path) -> bool:
    return (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file() and (folder / "vae").is_dir()


def tiny_model(threads: int) -> tuple[Path, float | None]:
    """The tests' tiny trained model: theirs, from pytest's cache (tests/conftest.py), or ours, or trained once now.

    Training takes minutes, so a model either side trained is reused: both
    name it by ``engine.tiny.recipe_key()`` and publish it by renaming its
    folder into place, so a folder under that name is complete. Returns
    (folder, seconds spent training, or None when it was cached).
    """
    from fixative.engine.tiny import TRAINING_STEPS, recipe_key

    key = recipe_key()
    final = _cache_dir() / f"tiny-{key}"
    for folder in (ROOT / ".pytest_cache" / "d" / "fixative-tiny-models" / key, final):
        if _ready(folder):
            return folder, None
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"tiny-{key}-", dir=final.parent))
    say(f"training the tiny model once ({TRAINING_STEPS} steps, a few minutes on 2 cores) into {final}")
    try:
        result = run_worker({"job": "train", "tiny_folder": str(staging), "training_steps": TRAINING_STEPS, "threads": threads})
        staging.rename(final)
    except OSError:  # another run published it first
        pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final, result["seconds"]


def tiny_engine_model(dtype: str = "fp32", threads: int = 1):
    """The tests' tiny trained model, loaded as the engine loads it, on the CPU: (model, folder)."""
    import torch

    from fixative.engine.model import load_model
    from fixative.engine.options import EngineOptions

    torch.set_num_threads(threads)
    folder, _ = tiny_model(threads)
    return load_model(EngineOptions(model=str(folder), device="cpu", dtype=dtype)), folder


def run_worker(spec: dict) -> dict:
    """One job of bench/worker.py (a measurement, or the tiny model's training) in a process of its own: its result.

    A process per measurement, so that its peak memory is its own.
    """
    with tempfile.TemporaryDirectory(prefix="fixative-bench-") as folder:
        spec_path, result_path = Path(folder) / "spec.json", Path(folder) / "result.json"
        spec_path.write_text(json.dumps(spec))
        env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
        sys.stdout.flush()
        done = subprocess.run([sys.executable, "-m", "bench.worker", str(spec_path), str(result_path)], cwd=ROOT, env=env)
        if done.returncode != 0 or not result_path.exists():
            what = spec.get("mode") or spec["job"]
            raise BenchError(f"the {what} measurement failed (worker exit status {done.returncode}); see its output above")
        return json.loads(result_path.read_text())


# ------------------------------------------------------------------------------------------ images


def test_image(family: str, seed: int, side: int):
    """One of IMAGES as the SourceImage read_image would make of its PNG (see SourceImage.from_rgb)."""
    from fixative.engine.imaging import SourceImage
    from fixative.engine.pixels import to_rgb
    from fixative.engine.synthetic import family_images

    return SourceImage.from_rgb(to_rgb(family_images(family, 1, side, seed)[0]))


def source_image(rgb):
    """uint8 H x W x 3 pixels as the engine reads them from a PNG (engine.imaging.read_image).

    The engine refuses images under 256 px on the short side, a floor set for
    SD's 512 px. The tiny model's 512 is 128 px, so a smaller image is handed
    to protect_image directly, as the SourceImage read_image would have made of it.
    """
    from PIL import Image

    from fixative.engine.errors import BadImage
    from fixative.engine.imaging import SourceImage, read_image

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "painting.png"
        Image.fromarray(rgb).save(path)
        try:
            return read_image(path)
        except BadImage:
            if min(rgb.shape[:2]) >= 256:
                raise
    return SourceImage.from_rgb(rgb)
