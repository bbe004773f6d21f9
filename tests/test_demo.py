"""``fixative demo`` as a newcomer runs it: a real subprocess, with a home folder of its own.

The demo builds its own tiny random model, so these tests need no fixture
model. HOME, XDG_* and TMPDIR point into tmp_path, and a hostile user setup
(a config file and FIXATIVE_* variables naming ~/ToProtect) checks that the
demo never reads the user's settings or touches their inbox and job table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from fixative.daemon.demo import BANNER, LABEL, SAMPLES
from fixative.daemon.liveness import engine_name
from fixative.daemon.store import JobStore

REPO = Path(__file__).resolve().parents[1]


def user_env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    config = home / ".config" / "fixative" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f'inbox = "{home / "ToProtect"}"\nexport_dir = "{home / "Protected"}"\n')
    (tmp_path / "tmp").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FIXATIVE_", "XDG_", "NOTIFY_"))}
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_STATE_HOME=str(home / ".local" / "state"),
        XDG_CACHE_HOME=str(home / ".cache"),
        TMPDIR=str(tmp_path / "tmp"),
        # The user's own daemon settings, which the demo must ignore.
        FIXATIVE_INBOX=str(home / "ToProtect"),
        FIXATIVE_STATE_DIR=str(home / "real-state"),
        FIXATIVE_ENGINE__STEPS="500",
        OMP_NUM_THREADS="1",
    )
    return env


def demo(env: dict[str, str], *argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fixative.daemon.cli", "demo", *argv], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def leftover_processes(marker: str) -> list[int]:
    """Processes whose environment mentions ``marker``: a daemon or engine the demo failed to stop."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in environ.read_bytes():
                found.append(int(environ.parent.name))
        except OSError:
            pass
    return found


def test_demo_runs_the_real_daemon_on_samples_and_keeps_dir(tmp_path: Path) -> None:
    env = user_env(tmp_path)
    home, root = Path(env["HOME"]), tmp_path / "demo"
    done = demo(env, "--dir", str(root))
    assert done.returncode == 0, done.stdout + done.stderr

    # Labelled: banner, status blocks, model folder (quoted in every job's metrics), prompt.
    assert done.stdout.startswith(f"=== fixative {BANNER} ===")
    assert done.stdout.count(f"--- fixative status ({BANNER}) ---") >= 1
    assert "done 3" in done.stdout and "failed 0" in done.stdout
    assert "daemon stopped (exit status 0)" in done.stdout
    assert "PIPELINE DEMO" in (root / "config.toml").read_text().split("[engine]")[1]
    store = JobStore(root / "state" / "jobs.db")
    jobs = store.jobs()
    assert len(jobs) == 3 and {job.state for job in jobs} == {"done"}
    assert all(LABEL in job.metrics["model"] and job.metrics["steps"] == 10 for job in jobs)
    assert store.processes()[engine_name("cpu")]["status"] == "stopped"  # SIGTERM reached the engine too
    store.close()

    # Copies of the samples, byte for byte, and outputs mirrored beside them.
    for sample in SAMPLES:
        assert (root / "inbox" / sample).read_bytes() == (root / "samples" / sample).read_bytes()
    outputs = sorted(p.relative_to(root / "export").as_posix() for p in (root / "export").rglob("*") if p.is_file())
    assert outputs == ["cut-out-with-transparency.png", "sketches/study.png", "sunset.png"]
    for sample in SAMPLES:
        with Image.open(root / "inbox" / sample) as original, \
             Image.open((root / "export" / sample).with_suffix(".png")) as protected:
            assert min(original.size) >= 256 and protected.size == original.size
            assert protected.mode == original.mode  # the cut-out keeps its transparency
            if original.mode == "RGBA":
                assert np.array_equal(np.array(original)[..., 3], np.array(protected)[..., 3])

    # Nothing of the user's was read or touched.
    assert sorted(p.relative_to(home).as_posix() for p in home.rglob("*")) == [
        ".config", ".config/fixative", ".config/fixative/config.toml"]
    assert leftover_processes(str(root)) == []


def test_demo_gives_up_cleanly_and_removes_its_temporary_folder(tmp_path: Path) -> None:
    env = user_env(tmp_path)
    # 2 s is too short for the engine to load (torch alone takes longer), so the demo times out.
    done = demo(env, "--timeout", "2")
    assert done.returncode == 1
    assert "timed out after 2s" in done.stderr or "the daemon exited" in done.stderr
    assert "daemon stopped" in done.stdout
    assert list((tmp_path / "tmp").glob("fixative-demo-*")) == []
    assert leftover_processes(str(tmp_path / "tmp")) == []
    assert not (Path(env["HOME"]) / "ToProtect").exists()


def test_demo_refuses_a_folder_that_is_in_use(tmp_path: Path) -> None:
    env = user_env(tmp_path)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "precious.png").write_bytes(b"x")
    done = demo(env, "--dir", str(tmp_path / "busy"), timeout=60)
    assert done.returncode == 2 and "in use" in done.stderr
    assert json.dumps(sorted(os.listdir(tmp_path / "busy"))) == '["precious.png"]'
