"""The real processes on the tiny model: ``fixative engine`` and ``fixative run``, with real signals.

Slowest tests of the daemon (a model load each, and real PGD steps), so each
covers a whole story: READY after load, work done, kill -9 survived, SIGTERM obeyed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from fixative.daemon.settings import load_settings
from fixative.daemon.liveness import engine_name
from fixative.daemon.store import JobStore
from conftest import painting

REPO = Path(__file__).resolve().parents[1]
ENGINE = engine_name("auto")  # the config below names no device


@pytest.fixture
def daemon_env(tmp_path: Path, tiny_model: Path) -> tuple[dict[str, str], Path]:
    config = tmp_path / "config.toml"
    config.write_text(f"""
inbox = "{tmp_path / 'inbox'}"
export_dir = "{tmp_path / 'export'}"
state_dir = "{tmp_path / 'state'}"
[watcher]
stability_seconds = 0.3
[worker]
lease_seconds = 3
heartbeat_seconds = 0.5
[engine]
model = "{tiny_model}"
steps = 4
""")
    (tmp_path / "inbox" / "sub").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FIXATIVE_", "NOTIFY_", "WATCHDOG_"))}
    # OMP_NUM_THREADS=1: on a busy machine, OpenMP threads waiting for each
    # other make each tiny-model step 10-50x slower.
    env.update(HOME=str(tmp_path), FIXATIVE_CONFIG=str(config), NOTIFY_SOCKET=str(tmp_path / "notify"),
               OMP_NUM_THREADS="1")
    return env, tmp_path


@pytest.fixture
def systemd(daemon_env) -> socket.socket:
    """Stands in for systemd's notification socket."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(daemon_env[0]["NOTIFY_SOCKET"])
    listener.settimeout(180)
    yield listener
    listener.close()


def start(env: dict[str, str], command: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fixative.daemon.cli", command], env=env, cwd=REPO)


def wait_for(condition: Callable[[], object], what: str, timeout: float = 240) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def wait_ready(systemd: socket.socket) -> None:
    while "READY=1" not in systemd.recv(4096).decode().splitlines():
        pass


def save_painting(path: Path, seed: int) -> bytes:
    Image.fromarray(painting(256, 288, seed)).save(path)
    return path.read_bytes()


def test_engine_reports_ready_protects_and_obeys_sigterm(daemon_env, systemd) -> None:
    env, root = daemon_env
    store = JobStore(root / "state" / "jobs.db")
    original = save_painting(root / "inbox" / "sub" / "a.png", seed=1)
    (root / "inbox" / "bad.png").write_bytes(b"not an image")
    for name in ("sub/a.png", "bad.png"):
        store.enqueue(root / "inbox" / name, load_settings(root / "config.toml").engine, inbox=root / "inbox")

    engine = start(env, "engine")
    try:
        wait_ready(systemd)
        wait_for(lambda: store.counts()["done"] == 1 and store.counts()["failed"] == 1, "both jobs to end")
        engine.send_signal(signal.SIGTERM)
        assert engine.wait(timeout=60) == 0
    finally:
        engine.kill()
    done, bad = store.jobs("done")[0], store.jobs("failed")[0]
    assert done.output_path == str(root / "export" / "sub" / "a.png") and done.metrics["psnr"] > 20
    with Image.open(done.output_path) as protected:
        assert protected.size == (288, 256)
    assert (root / "inbox" / "sub" / "a.png").read_bytes() == original
    assert "not an image" in bad.error
    assert store.processes()[ENGINE]["status"] == "stopped"


def test_a_job_is_protected_with_the_settings_it_was_queued_with(daemon_env) -> None:
    env, root = daemon_env
    config = root / "config.toml"
    save_painting(root / "inbox" / "a.png", seed=4)
    fixative = [sys.executable, "-m", "fixative.daemon.cli"]
    subprocess.run([*fixative, "enqueue", str(root / "inbox" / "a.png")], env=env, cwd=REPO, check=True)
    # The artist edits the settings while the job waits; the engine (re)starts after that.
    config.write_text(config.read_text().replace("steps = 4", "steps = 2\nstrength = 16"))
    store = JobStore(root / "state" / "jobs.db")
    engine = start(env, "engine")
    try:
        wait_for(lambda: store.counts()["done"] == 1, "the job")
        engine.send_signal(signal.SIGTERM)
        assert engine.wait(timeout=60) == 0
    finally:
        engine.kill()
    report = store.jobs("done")[0].metrics
    assert (report["steps"], report["strength"]) == (4, 8)  # as queued: the fingerprint describes the output


def test_engine_on_a_chosen_device_protects_every_job_there(daemon_env) -> None:
    """`fixative engine --device`, as a second machine or a second GPU runs it: jobs carry the device of their
    queueing, and the engine's own wins (the device is not in the fingerprint)."""
    env, root = daemon_env
    config = root / "config.toml"
    config.write_text(config.read_text() + 'device = "cuda"\n')  # [engine] is the last table
    save_painting(root / "inbox" / "a.png", seed=5)
    store = JobStore(root / "state" / "jobs.db")
    job = store.enqueue(root / "inbox" / "a.png", load_settings(config).engine, inbox=root / "inbox")
    assert job.options["device"] == "cuda"
    engine = subprocess.Popen([sys.executable, "-m", "fixative.daemon.cli", "engine", "--device", "cpu"], env=env, cwd=REPO)
    try:
        wait_for(lambda: store.get(job.id).state in ("done", "failed") or engine.poll() is not None, "the job")
        engine.send_signal(signal.SIGTERM)
        assert engine.wait(timeout=60) == 0
    finally:
        engine.kill()
    done = store.get(job.id)
    assert done.state == "done", done.error
    assert done.metrics["device"] == "cpu" and done.engine == engine_name("cpu")
    assert store.processes()[engine_name("cpu")]["device"] == "cpu"


def test_outputs_that_can_never_be_written_fail_alone_and_the_other_jobs_flow(daemon_env) -> None:
    """The oldest jobs are the hard ones; the queue behind them drains anyway.

    1. A 246-character name: legal, but its temp name ``.NAME.XXXXXXXX.tmp``
       would not be (over 255 bytes). It is written like any other.
    2. ``sub/a.png`` and ``sub/deeper/b.png`` while a plain file named ``sub``
       is in the export folder: no wait can mend that, so both fail for good,
       before any GPU time, naming the file to move; once it is moved,
       ``fixative retry --failed`` protects them.
    3. ``Y.png`` and ``Y.jpg`` for a 251-character Y: the first takes
       ``Y.png``; the second's ``Y-2.png`` would be 257 bytes, which no file
       system holds, so it fails for good, with the reason, before any GPU time.
    4. Five ordinary images, queued last.
    """
    env, root = daemon_env
    inbox, export = root / "inbox", root / "export"
    export.mkdir()
    (export / "sub").write_text("a file where the folder sub/ should be")
    (inbox / "sub" / "deeper").mkdir()
    long_name, twin = "x" * 246 + ".png", "y" * 251
    names = [long_name, "sub/a.png", "sub/deeper/b.png", f"{twin}.png", f"{twin}.jpg", *(f"{n}.png" for n in range(5))]
    store = JobStore(root / "state" / "jobs.db")
    options = load_settings(root / "config.toml").engine
    for seed, name in enumerate(names):
        if name.endswith(".jpg"):
            Image.fromarray(painting(256, 288, seed)).save(inbox / name, quality=95)
        else:
            save_painting(inbox / name, seed)
    jobs = {name: store.enqueue(inbox / name, options, inbox=inbox).id for name in names}
    blocked, unwritable = [jobs["sub/a.png"], jobs["sub/deeper/b.png"]], jobs[f"{twin}.jpg"]
    writable = [jobs[name] for name in names if jobs[name] not in (*blocked, unwritable)]

    engine = start(env, "engine")
    try:
        wait_for(lambda: all(store.get(job_id).state == "done" for job_id in writable)
                 and all(store.get(job_id).state == "failed" for job_id in (*blocked, unwritable)),
                 "every job to end", timeout=180)
        for job_id, folder in zip(blocked, (export / "sub", export / "sub" / "deeper")):
            failed = store.get(job_id)
            assert failed.attempts == 1 and failed.progress_step is None  # refused before its protection started
            assert failed.error == (f"cannot write in {folder}: the file {export / 'sub'} is in the way where a "
                                    "folder should be; move it, then run `fixative retry --failed`")
        failed = store.get(unwritable)
        assert failed.attempts == 1 and f"{twin}-2.png" in failed.error and "at most 255" in failed.error
        assert failed.progress_step is None
        (export / "sub").unlink()  # what the reason says to do
        retried = subprocess.run([sys.executable, "-m", "fixative.daemon.cli", "retry", "--failed"], env=env,
                                 cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
        assert "queued again: 3 job(s)" in retried.stdout
        wait_for(lambda: all(store.get(job_id).state == "done" for job_id in blocked), "the unblocked jobs",
                 timeout=120)
        wait_for(lambda: store.get(unwritable).state == "failed", "the unwritable name to fail again", timeout=60)
        engine.send_signal(signal.SIGTERM)
        assert engine.wait(timeout=60) == 0
    finally:
        engine.kill()
    assert all(store.get(job_id).attempts == 1 for job_id in writable)
    assert store.get(jobs[long_name]).output_path == str(export / long_name)
    assert sorted(p.relative_to(export).as_posix() for p in export.rglob("*") if p.is_file()) == sorted(
        [long_name, "sub/a.png", "sub/deeper/b.png", f"{twin}.png", *(f"{n}.png" for n in range(5))])  # no temp file


def test_run_survives_kill_9_of_the_engine_and_stops_on_sigterm(daemon_env, systemd) -> None:
    env, root = daemon_env
    # Long enough jobs (a few seconds) to be caught mid-way: progress reaches
    # the table with each heartbeat (0.5 s), and 4 steps take 0.2 s on an idle CPU.
    # The default 300 s lease: the dead engine's job must not wait for it to expire.
    env = {**env, "FIXATIVE_ENGINE__STEPS": "60", "FIXATIVE_WORKER__LEASE_SECONDS": "300"}
    store = JobStore(root / "state" / "jobs.db")
    daemon = start(env, "run")
    try:
        wait_ready(systemd)
        originals = {"a.png": save_painting(root / "inbox" / "a.png", seed=2),
                     "sub/b.png": save_painting(root / "inbox" / "sub" / "b.png", seed=3)}
        running = wait_for(lambda: (jobs := store.running_jobs()) and jobs[0].progress_step and jobs[0], "a job mid-way")
        victim = store.processes()[ENGINE]["pid"]
        os.kill(victim, signal.SIGKILL)  # the OOM killer, a driver crash...

        # The supervisor puts the dead engine's job back at once (before it restarts the engine, 5 s later)...
        wait_for(lambda: store.get(running.id).state == "queued", "the job back in the queue", timeout=20)
        status = subprocess.run([sys.executable, "-m", "fixative.daemon.cli", "status", "--json"], env=env, cwd=REPO,
                                capture_output=True, text=True)
        report = json.loads(status.stdout)
        assert report["running"] is None and report["counts"]["running"] == 0
        assert "the engine died while working on it (killed by SIGKILL)" in report["failures"][0]["error"]
        assert store.get(running.id).attempts == 1  # counted: an image that kills the engine must end

        # ...and the restarted engine redoes it.
        wait_for(lambda: store.counts()["done"] == 2, "both images protected after the restart")
        assert store.processes()[ENGINE]["pid"] != victim
        assert store.get(running.id).attempts == 2

        status = subprocess.run([sys.executable, "-m", "fixative.daemon.cli", "status", "--json"], env=env, cwd=REPO,
                                capture_output=True, text=True)
        report = json.loads(status.stdout)
        assert status.returncode == 0 and report["counts"]["done"] == 2 and report["failures"] == []

        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=120) == 0
    finally:
        daemon.kill()
    outputs = sorted(p.relative_to(root / "export").as_posix() for p in (root / "export").rglob("*") if p.is_file())
    assert outputs == ["a.png", "sub/b.png"]  # one output each, no temp files left behind
    for name, content in originals.items():
        assert (root / "inbox" / name).read_bytes() == content
    assert all(job.metrics.get("psnr") for job in store.jobs("done"))


def test_engine_child_exits_when_run_is_killed(daemon_env, systemd) -> None:
    """kill -9 of `fixative run` outside systemd must not leave an orphaned engine holding the GPU."""
    env, root = daemon_env
    store = JobStore(root / "state" / "jobs.db")
    daemon = start(env, "run")
    try:
        wait_ready(systemd)
        engine_pid = store.processes()[ENGINE]["pid"]
        daemon.kill()
        daemon.wait(timeout=10)
        wait_for(lambda: not Path(f"/proc/{engine_pid}").exists() or _is_zombie(engine_pid),
                 "the orphaned engine to exit", timeout=60)
    finally:
        daemon.kill()


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True
