"""Several engines under one ``fixative run``: ``[engine] devices = ["cpu", "cpu"]`` on the tiny model.

Real processes and signals: ``fixative run`` with two engine children, each
with its own owner id, leases and heartbeat row; kill -9 of a child; ``status``
as a subprocess. The same device twice is how two engines run on a CPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest

from fixative.daemon.liveness import engine_name
from fixative.daemon.store import JobStore
from test_daemon_end_to_end import REPO, Daemon, png_bytes

FIRST, SECOND = engine_name("cpu"), engine_name("cpu#2")


@pytest.fixture
def two_engines(tmp_path: Path, tiny_model: Path):
    def make(devices: tuple[str, str] = ("cpu", "cpu"), **env: str) -> Daemon:
        daemon = Daemon(tmp_path, tiny_model, **env)
        listed = ", ".join(f'"{device}"' for device in devices)
        daemon.config.write_text(daemon.config.read_text() + f"devices = [{listed}]\n")  # [engine] is the last table
        made.append(daemon)
        return daemon

    made: list[Daemon] = []
    yield make
    for daemon in made:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()
        daemon.store.close()


def drop(daemon: Daemon, count: int, side: int) -> None:
    for n in range(count):
        (daemon.inbox / f"{n:02d}.png").write_bytes(png_bytes(100 + n, side, side))


def events(daemon: Daemon, name: str) -> list[dict]:
    """The daemon's log events called ``name`` (the log is JSON lines: stderr is no terminal)."""
    logged = (json.loads(line) for line in daemon.log.read_text().splitlines() if line.startswith("{"))
    return [event for event in logged if event.get("event") == name]


def assert_each_done_once(daemon: Daemon, count: int) -> None:
    jobs = daemon.store.jobs(limit=1000)
    assert sorted(Path(job.source_path).name for job in jobs) == [f"{n:02d}.png" for n in range(count)]
    assert {job.state for job in jobs} == {"done"}
    assert Counter(e["job_id"] for e in events(daemon, "job.done")) == {job.id: 1 for job in jobs}  # once, by one engine
    assert daemon.outputs() == [f"{n:02d}.png" for n in range(count)]  # one file each, no -2, no temp file


def test_two_engines_drain_20_images_each_once_through_kill_9_of_each_and_status_shows_both(two_engines) -> None:
    """One story, to keep the suite short: the queue drained by two engines, each killed once mid-job.

    The default 300 s lease: only a release by the supervisor can put a dead
    engine's job back within seconds. (A job takes seconds, most of it the report's figures.)
    """
    # 40 steps: once the tiny model's UNet ran in bf16 and the report took 8 gain samples, a
    # 2-step job took 0.5 s, and jobs finished before they could be caught mid-job and killed.
    daemon = two_engines(FIXATIVE_ENGINE__STEPS="40", FIXATIVE_WORKER__LEASE_SECONDS="300")
    drop(daemon, 20, side=256)
    daemon.start()

    def busy(name: str):
        return next((job for job in daemon.store.running_jobs() if job.engine == name and job.progress_step), None)

    def pid(name: str) -> int | None:
        beat = daemon.beat(name)
        return beat["pid"] if beat else None

    daemon.wait_for(lambda: busy(FIRST) and busy(SECOND), "both engines mid-job")
    first_job, second_job = busy(FIRST), busy(SECOND)
    victim, survivor = pid(FIRST), pid(SECOND)
    assert len({victim, survivor, daemon.process.pid}) == 3  # two children, not the supervisor
    os.kill(victim, signal.SIGKILL)
    daemon.wait_for(lambda: daemon.store.get(first_job.id).state == "queued", "the dead engine's job back", timeout=5)
    assert "the engine died while working on it (killed by SIGKILL)" in daemon.store.get(first_job.id).error
    # The other engine's job is its own: not released with the dead one's.
    second_now = daemon.store.get(second_job.id)
    assert second_now.state in ("running", "done") and second_now.attempts == 1

    # While the first waits out its restart backoff, the second dies too: its job must
    # come back at once, not once the first's backoff is over (one loop supervises both).
    job = daemon.wait_for(lambda: busy(SECOND), "the second engine mid-job again", timeout=5)
    os.kill(survivor, signal.SIGKILL)
    daemon.wait_for(lambda: daemon.store.get(job.id).state == "queued", "the second engine's job back", timeout=5)
    (first_died,) = [e for e in events(daemon, "run.engine_died") if e["engine"] == "cpu"]
    backoff_over = datetime.fromisoformat(first_died["timestamp"]).timestamp() + first_died["restart_in_seconds"]
    assert daemon.store.get(job.id).updated_at < backoff_over

    daemon.wait_for(lambda: daemon.finished(20), "the 20 images, after both restarts")
    assert pid(FIRST) not in (None, victim) and pid(SECOND) not in (None, survivor)  # each restarted
    assert_each_done_once(daemon, 20)
    jobs = daemon.store.jobs(limit=1000)
    assert {j.id: j.attempts for j in jobs} == {j.id: 2 if j.id in (first_job.id, job.id) else 1 for j in jobs}
    by_engine = Counter(j.engine for j in jobs)
    assert set(by_engine) == {FIRST, SECOND}, by_engine  # both did work, and nobody else

    report = daemon.status()
    assert report["up"] is True
    engines = {engine["name"]: engine for engine in report["engines"]}
    assert list(engines) == [FIRST, SECOND]
    # Names outlive restarts: each engine's figures count the work of all its lives.
    assert {name: engine["throughput_24h"]["done"] for name, engine in engines.items()} == by_engine
    assert all(engine["alive"] and engine["device"] == "cpu" and engine["throughput_24h"]["mean_seconds"] > 0
               for engine in engines.values())
    text = subprocess.run([sys.executable, "-m", "fixative.daemon.cli", "status"], env=daemon.env, cwd=REPO,
                          capture_output=True, text=True, timeout=60).stdout.splitlines()
    assert text[0].startswith("fixative is up: watcher alive (") and text[0].endswith(", 2 engines")
    for line, name in zip(text[1:3], (FIRST, SECOND)):
        label = name.split("@")[0]
        assert line.startswith(f"  {label} (pid {engines[name]['pid']}) alive (")
        assert f" · last 24h: {by_engine[name]} done, " in line

    assert daemon.stop() == 0
    assert all(daemon.store.processes()[name]["status"] == "stopped" for name in (FIRST, SECOND))


def test_an_engine_whose_device_does_not_exist_stops_alone_and_says_why(two_engines) -> None:
    """EX_CONFIG from one child: restarting it cannot help, and the other engine must keep working."""
    daemon = two_engines(("cpu", "cuda:5"))
    daemon.start()
    (daemon.inbox / "a.png").write_bytes(png_bytes(7))
    daemon.wait_for(lambda: daemon.finished(1), "the image, by the engine that works")
    daemon.wait_for(lambda: events(daemon, "run.engine_config_error"), "the broken engine to stop")
    assert daemon.process.poll() is None  # run goes on
    assert [e["engine"] for e in events(daemon, "run.engine_config_error")] == ["cuda:5"]
    assert [e["engine"] for e in events(daemon, "run.engine_started")].count("cuda:5") == 1  # not restarted

    report = daemon.status()
    working, broken = report["engines"]
    assert working["alive"] and working["throughput_24h"]["done"] == 1
    assert not broken["alive"] and broken["status"].startswith("stopped: device 'cuda:5' was asked for, but")
    assert report["up"] is False
    text = subprocess.run([sys.executable, "-m", "fixative.daemon.cli", "status"], env=daemon.env, cwd=REPO,
                          capture_output=True, text=True, timeout=60).stdout
    assert text.startswith("fixative is DEGRADED (1 of 2 engines working)")
    assert "  engine cuda:5 (pid " in text and "stopped (" in text
    assert daemon.stop() == 0


def test_two_daemons_on_one_host_and_one_job_table_each_judge_only_their_own_engine(tmp_path: Path, tiny_model: Path,
                                                                                      postgres_url: str) -> None:
    """Two ``fixative run`` on one host (two users, or two cloned machines), each with its own state folder.

    Under one ``engine cpu@host`` row, each supervisor read the other's beats
    as its own engine's, saw no progress of its own child there, and killed a
    healthy engine once the stall limit (WatchdogSec, shortened here) had passed.
    """
    stall_seconds = 15.0
    daemons = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            daemon = Daemon(tmp_path / name, tiny_model, WATCHDOG_USEC=str(int(stall_seconds * 1e6)))
            daemon.config.write_text(f'state_db = "{postgres_url}"\n' + daemon.config.read_text())
            daemon.store.close()
            daemon.store = JobStore(postgres_url)
            daemons.append(daemon.start(wait=False))
        started = time.monotonic()
        for daemon in daemons:
            daemon.wait_for(lambda: (report := daemon.status())["up"] and report["engines"][0]["status"].startswith("idle"),
                            "its engine to be ready")
        time.sleep(max(0.0, started + 2.5 * stall_seconds - time.monotonic()))  # well past the limit, both idle
        children = [[event["pid"] for event in events(daemon, "run.engine_started")] for daemon in daemons]
        assert [events(daemon, "run.engine_stalled") for daemon in daemons] == [[], []]
        assert [len(pids) for pids in children] == [1, 1]  # never killed, never restarted

        for daemon, (mine,), (theirs,) in ((daemons[0], *children), (daemons[1], *reversed(children))):
            report = daemon.status()
            own, other = report["engines"]  # this daemon's engine first, then the other's, alive too
            assert (own["pid"], other["pid"]) == (mine, theirs) and own["name"] != other["name"]
            assert report["up"] is True
            text = subprocess.run([sys.executable, "-m", "fixative.daemon.cli", "status"], env=daemon.env, cwd=REPO,
                                  capture_output=True, text=True, timeout=60).stdout.splitlines()
            assert text[1].startswith(f"  engine cpu (pid {mine}) alive (")  # its own, as readable as alone
            assert text[2].startswith(f"  {other['name']} (pid {theirs}) alive (")
    finally:
        for daemon in daemons:
            if daemon.process is not None and daemon.process.poll() is None:
                daemon.process.kill()
                daemon.process.wait()
            daemon.store.close()
