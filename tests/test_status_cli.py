"""``fixative status``: its JSON shape, its exit code, and that it never imports torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixative.daemon.status import EXIT_DAEMON_DOWN
from fixative.daemon.store import JobStore
from fixative.engine.options import EngineOptions

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("FIXATIVE_", "XDG_"))}
    (tmp_path / "inbox").mkdir()
    return {**clean, "HOME": str(tmp_path), "FIXATIVE_INBOX": str(tmp_path / "inbox"),
            "FIXATIVE_STATE_DIR": str(tmp_path / "state")}


def fixative(env: dict[str, str], *argv: str, python_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *python_flags, "-m", "fixative.daemon.cli", *argv],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=60)


def test_never_started_daemon_is_down_and_creates_nothing(env: dict[str, str], tmp_path: Path) -> None:
    done = fixative(env, "status", "--json")
    assert done.returncode == EXIT_DAEMON_DOWN, done.stderr
    report = json.loads(done.stdout)
    assert report["counts"] == {"queued": 0, "running": 0, "done": 0, "failed": 0, "skipped": 0, "superseded": 0}
    assert report["running"] is None and report["failures"] == [] and report["up"] is False
    assert not (tmp_path / "state").exists()
    assert "DOWN" in fixative(env, "status").stdout


def test_status_reports_progress_failures_and_liveness(env: dict[str, str], tmp_path: Path) -> None:
    store = JobStore(tmp_path / "state" / "jobs.db")
    for name in ("a.png", "b.png", "bad.png"):
        (tmp_path / "inbox" / name).write_bytes(name.encode())
        store.enqueue(tmp_path / "inbox" / name, EngineOptions(), inbox=tmp_path / "inbox")
    bad = store.claim("engine", 60)
    store.fail(bad.id, "engine", "not an image: cannot identify image file", permanent=True)
    job = store.claim("engine", 60)
    store.backend.execute("UPDATE jobs SET started_at = started_at - 40 WHERE id = :id", {"id": job.id})
    store.heartbeat(job.id, "engine", 60, step=20, total=100)
    store.beat("watcher", "watching")
    store.beat("engine", "protecting b.png")

    done = fixative(env, "status", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["counts"] == {"queued": 1, "running": 1, "done": 0, "failed": 1, "skipped": 0, "superseded": 0}
    running = report["running"]
    assert running["path"] == str(tmp_path / "inbox" / "b.png")
    assert (running["step"], running["total"], running["percent"]) == (20, 100, 20.0)
    assert running["seconds_per_step"] == pytest.approx(2.0, rel=0.2)
    assert running["eta_seconds"] == pytest.approx(160, rel=0.2)
    assert report["failures"] == [{"id": bad.id, "path": str(tmp_path / "inbox" / "a.png"),
                                   "error": "not an image: cannot identify image file", "state": "failed",
                                   "attempts": 1, "at": report["failures"][0]["at"]}]
    assert report["processes"]["engine"]["alive"] and report["processes"]["watcher"]["alive"]
    assert "throughput_24h" in report
    assert "b.png 20/100 (20.0%)" in fixative(env, "status").stdout

    # The engine stopped heartbeating two minutes ago: the daemon is down.
    store.backend.execute("UPDATE processes SET beat_at = beat_at - 120 WHERE name = 'engine'", {})
    done = fixative(env, "status", "--json")
    assert done.returncode == EXIT_DAEMON_DOWN
    assert json.loads(done.stdout)["processes"]["engine"]["alive"] is False


def test_status_shows_the_warnings_of_recent_outputs(env: dict[str, str], tmp_path: Path) -> None:
    """Issue 9: a long strip protected coarsely said so only in its JSON report."""
    store = JobStore(tmp_path / "state" / "jobs.db")
    (tmp_path / "inbox" / "strip.png").write_bytes(b"strip")
    store.enqueue(tmp_path / "inbox" / "strip.png", EngineOptions(), inbox=tmp_path / "inbox")
    job = store.claim("engine", 60)
    warning = "this long image was protected at 1619x81, coarser than the 512 px short side ..."
    store.finish(job.id, "engine", tmp_path / "export" / "strip.png", {"psnr": 40.0, "warnings": [warning]})
    assert f"    warning: {warning}" in fixative(env, "status").stdout.splitlines()


def test_status_never_imports_torch(env: dict[str, str], tmp_path: Path) -> None:
    JobStore(tmp_path / "state" / "jobs.db").beat("watcher")
    done = fixative(env, "status", "--json", python_flags=("-X", "importtime"))
    json.loads(done.stdout)
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert "fixative.daemon.store" in imported  # the import log is really there
    heavy = sorted(name for name in imported if name.split(".")[0] in {"torch", "diffusers", "transformers"})
    assert heavy == []


def test_a_live_but_stuck_engine_is_reported_stalled(env: dict[str, str], tmp_path: Path) -> None:
    store = JobStore(tmp_path / "state" / "jobs.db")
    store.beat("watcher", "watching")
    store.beat("engine", "protecting a.png 43%", progress_at=time.time() - 3600)  # hung in the GPU driver
    done = fixative(env, "status", "--json")
    engine = json.loads(done.stdout)["processes"]["engine"]
    assert done.returncode == EXIT_DAEMON_DOWN and engine["alive"] and engine["stalled"]
    assert "STALLED (no progress for 1h00m" in fixative(env, "status").stdout
