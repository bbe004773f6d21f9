"""``fixative status``: its JSON shape, its exit code, and that it never imports torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixative.daemon.liveness import engine_name, watcher_name
from fixative.daemon.status import EXIT_DAEMON_DOWN
from fixative.daemon.store import JobStore
from fixative.engine.options import EngineOptions

REPO = Path(__file__).resolve().parents[1]
ENGINE = engine_name("auto")  # the one engine of the default settings


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
    bad = store.claim("owner", 60, engine=ENGINE)
    store.fail(bad.id, "owner", "not an image: cannot identify image file", permanent=True)
    job = store.claim("owner", 60, engine=ENGINE)
    store.backend.execute("UPDATE jobs SET started_at = started_at - 40 WHERE id = :id", {"id": job.id})
    store.heartbeat(job.id, "owner", 60, step=20, total=100)
    store.beat("watcher", "watching")
    store.beat(ENGINE, "protecting b.png", device="auto")

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
    (engine,) = report["engines"]
    assert engine["alive"] and report["processes"]["watcher"]["alive"]
    assert (engine["name"], engine["device"], engine["pid"]) == (ENGINE, "auto", os.getpid())
    assert engine["running"] == running
    assert "throughput_24h" in report
    text = fixative(env, "status").stdout.splitlines()
    assert text[0].startswith("fixative is up: watcher alive (") and ", engine alive (" in text[0]
    assert any(line.startswith("now: b.png 20/100 (20.0%)") for line in text)  # one engine: as it always read

    # The engine stopped heartbeating two minutes ago: the daemon is down.
    store.backend.execute("UPDATE processes SET beat_at = beat_at - 120 WHERE name = :name", {"name": ENGINE})
    done = fixative(env, "status", "--json")
    assert done.returncode == EXIT_DAEMON_DOWN
    assert json.loads(done.stdout)["engines"][0]["alive"] is False


def test_status_shows_the_warnings_of_recent_outputs(env: dict[str, str], tmp_path: Path) -> None:
    """a long strip protected coarsely said so only in its JSON report."""
    store = JobStore(tmp_path / "state" / "jobs.db")
    (tmp_path / "inbox" / "strip.png").write_bytes(b"strip")
    store.enqueue(tmp_path / "inbox" / "strip.png", EngineOptions(), inbox=tmp_path / "inbox")
    job = store.claim("owner", 60)
    warning = "this long image was protected at 1619x81, coarser than the 512 px short side ..."
    store.finish(job.id, "owner", tmp_path / "export" / "strip.png", {"psnr": 40.0, "warnings": [warning]})
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
    store.beat(ENGINE, "protecting a.png 43%", progress_at=time.time() - 3600, device="auto")  # hung in the GPU driver
    done = fixative(env, "status", "--json")
    (engine,) = json.loads(done.stdout)["engines"]
    assert done.returncode == EXIT_DAEMON_DOWN and engine["alive"] and engine["stalled"]
    assert "STALLED (no progress for 1h00m" in fixative(env, "status").stdout


def test_several_engines_each_show_their_job_pid_and_throughput(env: dict[str, str], tmp_path: Path) -> None:
    env = {**env, "FIXATIVE_ENGINE__DEVICES": '["cuda:0", "cuda:1", "cuda:7"]'}
    first, second, broken = (engine_name(label) for label in ("cuda:0", "cuda:1", "cuda:7"))
    store = JobStore(tmp_path / "state" / "jobs.db")
    for name in ("a.png", "b.png", "c.png", "d.png"):
        (tmp_path / "inbox" / name).write_bytes(name.encode())
        store.enqueue(tmp_path / "inbox" / name, EngineOptions(), inbox=tmp_path / "inbox")
    for engine in (first, second, first):  # a and c done by the first engine, b by the second
        job = store.claim(f"owner of {engine}", 60, engine=engine)
        store.finish(job.id, f"owner of {engine}", tmp_path / "export" / job.relative_path, {})
    job = store.claim("owner of the second", 60, engine=second)
    store.heartbeat(job.id, "owner of the second", 60, step=3, total=10)
    store.beat("watcher", "watching")
    store.beat(first, "idle", device="cuda:0")
    store.beat(second, "protecting d.png 30%", device="cuda:1")
    store.beat(broken, "stopped: device 'cuda:7' was asked for, but torch sees 2 CUDA GPU(s)", device="cuda:7")
    store.beat("engine cuda:0@studio-2", "idle", device="cuda:0")  # another machine on the same job table
    store.beat("engine cpu@old-box", "stopped", device="cpu")  # not ours, not alive: not shown

    done = fixative(env, "status", "--json")
    assert done.returncode == EXIT_DAEMON_DOWN  # not everything works: scripts must notice
    engines = {engine["name"]: engine for engine in json.loads(done.stdout)["engines"]}
    assert list(engines) == [first, second, broken, "engine cuda:0@studio-2"]  # ours in the order of [engine] devices
    assert [engines[name]["device"] for name in engines] == ["cuda:0", "cuda:1", "cuda:7", "cuda:0"]
    assert engines[first]["throughput_24h"]["done"] == 2 and engines[first]["running"] is None
    assert engines[second]["throughput_24h"]["done"] == 1
    assert (engines[second]["running"]["relative_path"], engines[second]["running"]["step"]) == ("d.png", 3)
    assert engines[first]["pid"] == engines[second]["pid"] == os.getpid()
    assert not engines[broken]["alive"]

    text = fixative(env, "status").stdout.splitlines()
    assert text[0].startswith("fixative is DEGRADED (3 of 4 engines working): watcher alive (")
    assert text[1].startswith(f"  engine cuda:0 (pid {os.getpid()}) alive (") and " · last 24h: 2 done" in text[1]
    assert text[2].startswith("  engine cuda:1 (pid ") and "protecting d.png 30%" in text[2]
    assert text[3].startswith("    now: d.png 3/10 (30.0%)")
    assert text[4].startswith("  engine cuda:7 (pid ") and "stopped (" in text[4]
    assert "torch sees 2 CUDA GPU(s)" in text[4]
    assert text[5].startswith("  engine cuda:0@studio-2 (pid ")  # another machine's: named with its host
    assert not any(line.startswith("now:") for line in text)  # each engine's job is on its own line


def test_each_machine_s_watcher_beats_under_its_own_name(env: dict[str, str], tmp_path: Path) -> None:
    """Several machines on one job table: status shows this machine's watcher, not whichever beat last.

    Under one shared "watcher" row, another machine's live watcher hid this one's death.
    """
    store = JobStore(tmp_path / "state" / "jobs.db")
    store.beat(ENGINE, "idle", device="auto")
    store.beat(watcher_name(), "watching")
    store.backend.execute("UPDATE processes SET beat_at = beat_at - 3600, progress_at = progress_at - 3600 "
                          "WHERE name = :name", {"name": watcher_name()})  # this machine's watcher died an hour ago
    store.beat("watcher@studio-2", "watching")  # another machine's watcher, alive
    report = json.loads(fixative(env, "status", "--json").stdout)
    assert report["processes"]["watcher"]["alive"] is False and report["up"] is False

    # An engines-only machine runs no watcher: it shows the one that beat last.
    store.backend.execute("DELETE FROM processes WHERE name = :name", {"name": watcher_name()})
    report = json.loads(fixative(env, "status", "--json").stdout)
    assert report["processes"]["watcher"]["alive"] is True and report["processes"]["watcher"]["status"] == "watching"


HOSTILE = "a\nWATCHDOG=trigger\nMAINPID=1\n\x1b[2J.png"  # a name that tries to add assignments and clear the screen


def test_a_file_name_with_control_characters_is_shown_escaped(env: dict[str, str], tmp_path: Path) -> None:
    """Printed raw, a newline in a name splits a job across lines and an escape sequence repaints the terminal."""
    store = JobStore(tmp_path / "state" / "jobs.db")
    (tmp_path / "inbox" / HOSTILE).write_bytes(b"pixels")
    store.enqueue(tmp_path / "inbox" / HOSTILE, EngineOptions(), inbox=tmp_path / "inbox")
    job = store.claim("owner", 60, engine=ENGINE)
    store.heartbeat(job.id, "owner", 60, step=1, total=10)
    store.beat("watcher", "watching")
    # As an engine of another version, or on another machine, may have written it.
    store.beat(ENGINE, f"protecting {HOSTILE} 10%", device="auto")
    text = fixative(env, "status").stdout
    assert "\x1b" not in text
    assert not [line for line in text.splitlines() if line.startswith(("WATCHDOG=", "MAINPID=", "\x1b"))]
    assert r"protecting a\nWATCHDOG=trigger\nMAINPID=1\n\x1b[2J.png 10%" in text.splitlines()[0]
    assert r"now: a\nWATCHDOG=trigger\nMAINPID=1\n\x1b[2J.png 1/10" in text
