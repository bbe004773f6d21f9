"""Engines on "several machines" sharing one PostgreSQL job table: real ``fixative engine`` processes.

Each engine gets its own state folder, as a machine of its own would, and the
same ``state_db``, inbox and export folder (the shared storage). A real server
from tests/postgres.py, really killed engines (SIGKILL) and a really restarted
database. The smallest images and two PGD steps on the tiny model keep each test to
seconds of work beyond the engines' start.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from conftest import painting
from fixative.daemon.settings import load_settings
from fixative.daemon.store import Job, JobStore, StoreUnavailable

REPO = Path(__file__).resolve().parents[1]
IMAGES = 6


@pytest.fixture
def shared(tmp_path: Path, tiny_model: Path, postgres_url: str) -> tuple[Path, JobStore]:
    """A config file for every machine, and IMAGES paintings in the shared inbox."""
    (tmp_path / "inbox").mkdir()
    (tmp_path / "config.toml").write_text(f"""
inbox = "{tmp_path / 'inbox'}"
export_dir = "{tmp_path / 'export'}"
state_db = "{postgres_url}"
[worker]
lease_seconds = 6
heartbeat_seconds = 1
[engine]
model = "{tiny_model}"
steps = 2
robust = false
""")
    for n in range(IMAGES):
        Image.fromarray(painting(256, 256, seed=n)).save(tmp_path / "inbox" / f"{n}.png")  # the smallest it takes
    store = JobStore(postgres_url)
    yield tmp_path, store
    store.close()


def queue_when_ready(root: Path, store: JobStore, *machines: str) -> None:
    """Queue the images once every engine has loaded its model, so that none drains the queue alone."""
    wait_for(lambda: all("engine.ready" in (root / f"{m}.log").read_text() for m in machines), "the engines to load")
    options = load_settings(root / "config.toml").engine
    for path in sorted((root / "inbox").iterdir()):
        store.enqueue(path, options, inbox=root / "inbox")


def start_engine(root: Path, machine: str, *, clock_behind_seconds: float = 0) -> subprocess.Popen:
    """``clock_behind_seconds``: the machine's wall clock is that far behind the others' and the server's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FIXATIVE_", "NOTIFY_", "WATCHDOG_"))}
    env.update(HOME=str(root), FIXATIVE_CONFIG=str(root / "config.toml"), OMP_NUM_THREADS="1",
               FIXATIVE_STATE_DIR=str(root / machine))  # each machine's own state folder
    command = [sys.executable, "-m", "fixative.daemon.cli", "engine"]
    if clock_behind_seconds:
        # One process's clock cannot be set back without libfaketime, nor the machine's without moving every
        # other process's: the engine's Python reads the wall clock through time.time, so that is moved.
        command[1:3] = ["-c", f"import runpy, sys, time; real = time.time; time.time = lambda: real() - "
                              f"{clock_behind_seconds}; sys.argv[0] = 'fixative'; "
                              "runpy.run_module('fixative.daemon.cli', run_name='__main__')"]
    with open(root / f"{machine}.log", "ab") as log:
        return subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def wait_for(condition: Callable[[], object], what: str, timeout: float = 180) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(StoreUnavailable):  # our own connection, once, after the restart
            if result := condition():
                return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def frozen_holding_a_job(engine: subprocess.Popen, store: JobStore) -> Job | None:
    """Stop ``engine`` (SIGSTOP) and return the job it holds; if none, let it go on and return None.

    Frozen, it cannot finish the job between our look and the kill.
    """
    engine.send_signal(signal.SIGSTOP)
    held = [job for job in store.jobs("running") if f":{engine.pid}:" in (job.owner or "")]
    if not held:
        engine.send_signal(signal.SIGCONT)
    return held[0] if held else None


def wait_until_ended(store: JobStore) -> None:
    wait_for(lambda: store.counts()["done"] + store.counts()["failed"] == IMAGES, "every job to end")
    assert store.counts()["done"] == IMAGES, [job.error for job in store.jobs("failed")]


def done_ids(root: Path, machine: str) -> list[int]:
    """The job ids an engine logged as done, in its JSON log lines."""
    events = [json.loads(line) for line in (root / f"{machine}.log").read_text().splitlines() if line.startswith("{")]
    return [event["job_id"] for event in events if event["event"] == "job.done"]


def stop(*engines: subprocess.Popen) -> None:
    for engine in engines:
        engine.send_signal(signal.SIGTERM)
    for engine in engines:
        try:
            engine.wait(timeout=60)
        finally:
            engine.kill()


def test_two_engines_share_the_work_and_a_killed_ones_job_is_done_after_its_lease(shared) -> None:
    root, store = shared
    engines = {machine: start_engine(root, machine) for machine in ("a", "b")}
    try:
        queue_when_ready(root, store, "a", "b")
        # Engine b holds a job: kill it there, mid-image, as a power cut would.
        held = wait_for(lambda: frozen_holding_a_job(engines["b"], store), "engine b to claim a job")
        engines["b"].send_signal(signal.SIGKILL)
        engines["b"].wait(timeout=30)
        wait_until_ended(store)
    finally:
        stop(*engines.values())

    a, b = done_ids(root, "a"), done_ids(root, "b")
    assert sorted(a + b) == sorted(job.id for job in store.jobs("done"))  # each job done exactly once
    assert a and held.id in a and held.id not in b
    jobs = {job.id: job for job in store.jobs()}
    # No job was claimed twice, but the one whose lease ran out with its engine.
    assert {job_id: job.attempts for job_id, job in jobs.items() if job.attempts != 1} == {held.id: 2}
    outputs = sorted(p.name for p in (root / "export").iterdir())
    assert outputs == sorted(f"{n}.png" for n in range(IMAGES))  # one output each, no "-2" copies


def test_an_engine_waits_out_a_database_restart_and_loses_nothing(shared, postgres_cluster) -> None:
    root, store = shared
    engine = start_engine(root, "a")
    try:
        queue_when_ready(root, store, "a")
        wait_for(lambda: store.counts()["done"] >= 1, "the first image to be protected")
        postgres_cluster.stop()  # every connection ends, as in a server restart
        wait_for(lambda: "engine.store_unavailable" in (root / "a.log").read_text(), "the engine to notice")
        postgres_cluster.start()
        wait_until_ended(store)
        assert engine.poll() is None  # it waited; it did not die and need a restart
    finally:
        stop(engine)
    log = (root / "a.log").read_text()
    assert "engine.store_resumed" in log and "Traceback" not in log, log[-3000:]
    assert sorted(done_ids(root, "a")) == sorted(job.id for job in store.jobs("done"))


def test_a_database_away_when_a_protection_ends_is_waited_out_and_the_image_kept(shared, postgres_cluster) -> None:
    """The server stops mid-protection and is still away when the protection ends, where the output's name is
    chosen: the engine waits there, keeping its lease, and records the image on the same attempt once it is back."""
    root, store = shared
    engine = start_engine(root, "a")
    try:
        wait_for(lambda: "engine.ready" in (root / "a.log").read_text(), "the engine to load")
        options = load_settings(root / "config.toml").engine.model_copy(update={"steps": 300})
        job = store.enqueue(root / "inbox" / "0.png", options, inbox=root / "inbox")
        wait_for(lambda: store.get(job.id).progress_step, "the protection to be under way")
        postgres_cluster.stop()
        wait_for(lambda: _idle(engine.pid), "the protection to end while the server is away")
        postgres_cluster.start()
        wait_for(lambda: store.get(job.id).state == "done", "the image to be recorded")
    finally:
        stop(engine)
    assert store.get(job.id).attempts == 1  # not protected a second time
    assert done_ids(root, "a") == [job.id]
    assert sorted(p.name for p in (root / "export").iterdir()) == ["0.png"]


def _idle(pid: int, seconds: float = 2.0) -> bool:
    """Whether process ``pid`` used next to no CPU for ``seconds``: its protection is over."""
    def used() -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    before = used()
    time.sleep(seconds)
    return used() - before < 0.1 * seconds


def test_an_engine_whose_clock_is_behind_says_so_at_start_and_when_it_loses_a_lease(shared) -> None:
    """Its leases are expiry times by its own clock, 400 s behind: the other engine finds each one expired and
    takes the job. The work gets done, and the slow engine's log says why it lost its jobs."""
    root, store = shared
    engines = {"behind": start_engine(root, "behind", clock_behind_seconds=400), "b": start_engine(root, "b")}
    try:
        wait_for(lambda: all("engine.ready" in (root / f"{m}.log").read_text() for m in engines), "the engines to load")
        options = load_settings(root / "config.toml").engine.model_copy(update={"steps": 100})
        for path in sorted((root / "inbox").iterdir()):
            store.enqueue(path, options, inbox=root / "inbox")
        wait_until_ended(store)
    finally:
        stop(*engines.values())
    events = [json.loads(line) for line in (root / "behind.log").read_text().splitlines() if line.startswith("{")]
    [skew] = [event for event in events if event["event"] == "engine.clock_skew"]
    assert 390 < skew["skew_seconds"] < 410 and "400 s behind the database server's" in skew["problem"]
    lost = [event for event in events if event["event"] == "engine.lease_expired"]
    assert lost and all("clock is behind" in event["problem"] for event in lost)
    assert not [line for line in (root / "b.log").read_text().splitlines() if "engine.clock_skew" in line]
