"""One daemon per state folder: real ``fixative`` processes contend for ``state_dir/daemon.lock``."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixative.daemon.lock import EXIT_ALREADY_RUNNING, LOCK_FILE
from fixative.daemon.liveness import engine_name, watcher_name
from fixative.daemon.store import JobStore

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "config.toml").write_text(f"""
inbox = "{tmp_path / 'inbox'}"
export_dir = "{tmp_path / 'export'}"
state_dir = "{tmp_path / 'state'}"
[worker]
lease_seconds = 5
heartbeat_seconds = 0.5
""")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("FIXATIVE_", "NOTIFY_", "WATCHDOG_"))}
    return {**clean, "HOME": str(tmp_path), "FIXATIVE_CONFIG": str(tmp_path / "config.toml"),
            "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def start(env: dict[str, str], command: str, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "fixative.daemon.cli", command], env=env, cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT)


def refused(env: dict[str, str], command: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fixative.daemon.cli", command], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def wait_for(condition, what: str, process: subprocess.Popen, log: Path, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        assert process.poll() is None, f"exited ({process.returncode}) waiting for {what}:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=60)
    finally:
        process.kill()


def test_a_second_daemon_on_one_state_folder_is_refused_naming_the_holder(env, tmp_path: Path, tiny_model: Path) -> None:
    log = tmp_path / "watch.log"
    first = start(env, "watch", log)
    try:
        store = JobStore(tmp_path / "state" / "jobs.db")
        wait_for(lambda: store.processes().get(watcher_name()), "the watcher to beat", first, log)
        for command in ("run", "watch", "engine"):
            # A model on disk: run checks it is there before it takes the lock.
            second = refused({**env, "FIXATIVE_ENGINE__MODEL": str(tiny_model)}, command)
            assert second.returncode == EXIT_ALREADY_RUNNING, (command, second.stderr)
            assert f"in use by fixative watch (pid {first.pid})" in second.stderr, second.stderr
            assert "Traceback" not in second.stderr
        assert first.poll() is None  # the holder is untouched
        assert stop(first) == 0
        store.close()
    finally:
        first.kill()
    # The kernel released the lock with its holder: the file left behind does not block the next start.
    assert (tmp_path / "state" / LOCK_FILE).exists()
    assert refused_or_started(env, tmp_path) is None


def test_run_shares_its_lock_with_its_engine_child_and_keeps_others_out(env, tmp_path: Path,
                                                                      tiny_model: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(config.read_text() + f'[engine]\nmodel = "{tiny_model}"\ndevice = "cpu"\nsteps = 2\n')
    log = tmp_path / "run.log"
    daemon = start(env, "run", log)
    store = JobStore(tmp_path / "state" / "jobs.db")
    try:
        # The engine child took the inherited lock and loaded the model: it was let in.
        engine = wait_for(lambda: (beat := store.processes().get(engine_name("cpu"))) and beat["status"].startswith("idle")
                          and beat, "the engine child to be ready", daemon, log)
        assert engine["pid"] != daemon.pid
        for command in ("run", "engine"):
            second = refused(env, command)
            assert second.returncode == EXIT_ALREADY_RUNNING, (command, second.stderr)
            assert f"in use by fixative run (pid {daemon.pid})" in second.stderr, second.stderr

        # `run` killed outright while its engine child is held frozen: the child still has the
        # shared lock, so nothing new may start beside it.
        os.kill(engine["pid"], signal.SIGSTOP)
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
        assert refused(env, "watch").returncode == EXIT_ALREADY_RUNNING
        # Let go, it gets the SIGTERM that run's death sent it, exits, and the lock is free.
        os.kill(engine["pid"], signal.SIGCONT)
        deadline = time.monotonic() + 60
        while _alive(engine["pid"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(engine["pid"])
        assert refused_or_started(env, tmp_path) is None
    finally:
        daemon.kill()
        store.close()


def refused_or_started(env: dict[str, str], tmp_path: Path) -> str | None:
    """Start a watcher; None if it ran (the lock was free), else its refusal."""
    log = tmp_path / "after.log"
    process = start(env, "watch", log)
    time.sleep(3)
    if process.poll() is not None:
        return log.read_text()
    stop(process)
    return None


def _alive(pid: int) -> bool:
    """Running, not a zombie: the orphaned engine's exit is reaped by whoever adopted it, maybe never."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_the_state_folder_and_what_it_holds_are_private_whatever_the_umask(env, tmp_path: Path) -> None:
    """Under the usual umask 022, the job table, every file name and error in it, was readable by every local user."""
    state, log = tmp_path / "state", tmp_path / "watch.log"
    old = os.umask(0o022)  # the child inherits it
    try:
        watcher = start(env, "watch", log)
    finally:
        os.umask(old)
    try:
        # The write-ahead log appears with the first write: the watcher's first beat.
        wait_for(lambda: (state / "jobs.db-wal").exists(), "the watcher to write", watcher, log)
        modes = {path.name: oct(stat.S_IMODE(path.stat().st_mode))
                 for path in (state, state / LOCK_FILE, state / "jobs.db", state / "jobs.db-wal", state / "jobs.db-shm")}
        assert modes == {"state": "0o700", LOCK_FILE: "0o600", "jobs.db": "0o600", "jobs.db-wal": "0o600",
                         "jobs.db-shm": "0o600"}
    finally:
        assert stop(watcher) == 0
